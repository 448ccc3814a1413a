"""Harnesses used by the end-to-end tests and `pycnictl bench`: real container runtimes
(podman, containerd) with private config, state and socket paths inside a network namespace,
and a fake Kubernetes API server (k8s_fake_api) that the official client talks HTTP to.

Nothing here touches the host's runtime state: every path a runtime reads or writes lives under
a work directory the caller owns, and `cleanup()` removes it with every container, process and
mount the runtime made. The fake API server listens on loopback and keeps its state in memory.
"""
