"""Harnesses that run real container runtimes (podman, containerd) with private config, state
and socket paths inside a network namespace, used by the end-to-end tests and `pycnictl bench`.

Nothing here touches the host's runtime state: every path a runtime reads or writes lives under
a work directory the caller owns, and `cleanup()` removes it with every container, process and
mount the runtime made.
"""
