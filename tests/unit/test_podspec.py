"""The DaemonSet pod template resolved as kubelet would (harness/podspec.py), and the offline
image build's pure parts (harness/image.py): the mirror apt uses, the cache keys."""

from __future__ import annotations

import os

import pytest

from pycni.harness import image, podspec

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
MANIFEST = os.path.join(REPO, "deploy", "kubernetes", "pycni.yaml")
UNINSTALL = os.path.join(REPO, "deploy", "kubernetes", "pycni-uninstall.yaml")
SERVICE = {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}


def agent_pod(**kw) -> podspec.PodSpec:
    return podspec.daemonset_pod(
        podspec.load(MANIFEST), "node-7", uid="0123456789", service_env=SERVICE, **kw
    )


def test_the_agents_pod_as_kubelet_sees_it():
    pod = agent_pod()
    assert pod.namespace == "kube-system" and pod.host_network and pod.host_pid
    assert pod.service_account == "pycni" and pod.termination_grace == 30
    (init,) = pod.init_containers
    (agent,) = pod.containers
    assert agent.privileged and not init.privileged
    # $(VAR) from fieldRef spec.nodeName and from the ConfigMap.
    assert "--node-name=node-7" in agent.args
    # The ConfigMap's IPv6 half is empty: kubeadm's comma form with an empty item, which the
    # agent ignores.
    assert "--cluster-cidr=10.244.0.0/16," in agent.args and "--backend=vxlan" in agent.args
    assert agent.env["NODE_NAME"] == "node-7"
    assert agent.env["KUBERNETES_SERVICE_HOST"] == "10.96.0.1"
    mounts = {m.container_path: m for m in agent.mounts}
    assert mounts["/run/netns"].propagation == "PROPAGATION_HOST_TO_CONTAINER"
    assert mounts["/run/netns"].host_path == podspec.HostPath("/run/netns", "DirectoryOrCreate")
    assert mounts["/run/xtables.lock"].host_path.type == "FileOrCreate"
    token = mounts[podspec.SERVICE_ACCOUNT_DIR]
    assert token.host_path is None and token.read_only
    assert agent.readiness == podspec.Probe(
        "http", host="127.0.0.1", port=9654, path="/readyz", period=5, timeout=5
    )
    assert agent.liveness.initial_delay == 10 and agent.liveness.failure_threshold == 6
    assert pod.host_paths() == {
        "/opt/cni/bin",
        "/etc/cni/net.d",
        "/run/pycni",
        "/var/lib/pycni",
        "/run/netns",
        "/run/xtables.lock",
    }


def test_a_new_image_replaces_every_containers():
    pod = agent_pod(image="localhost/pycni:next")
    assert pod.images() == {"localhost/pycni:next"}


def test_the_uninstall_pod_has_an_exec_probe_and_a_shell_command():
    pod = podspec.daemonset_pod(podspec.load(UNINSTALL), "node-7", uid="abcdef")
    (c,) = pod.containers
    assert c.command[:2] == ["/bin/sh", "-c"]
    assert "--node-name=node-7" in c.args
    assert c.readiness.kind == "exec" and c.readiness.command == ("test", "-e", "/tmp/uninstalled")
    assert {m.host_path.path for m in c.mounts if m.host_path} >= {"/var/lib", "/run"}


@pytest.mark.parametrize(
    "text, env, want",
    [
        ("--x=$(A)", {"A": "1"}, "--x=1"),
        ("$(MISSING)", {}, "$(MISSING)"),
        ("$$(A)", {"A": "1"}, "$(A)"),
        ("$(A)$(B)", {"A": "1", "B": "2"}, "12"),
    ],
)
def test_expansion_as_kubernetes_does(text, env, want):
    assert podspec.expand(text, env) == want


def _docs(volume: dict, mount_extra: dict | None = None) -> list[dict]:
    return [
        {
            "kind": "DaemonSet",
            "metadata": {"name": "x", "namespace": "ns"},
            "spec": {
                "template": {
                    "spec": {
                        "containers": [
                            {
                                "name": "c",
                                "image": "i",
                                "volumeMounts": [{"name": "v", "mountPath": "/m"}]
                                if volume
                                else [],
                                "env": [{"name": "E", "valueFrom": (mount_extra or {})}]
                                if mount_extra
                                else [],
                            }
                        ],
                        "volumes": [dict(volume, name="v")] if volume else [],
                    }
                }
            },
        }
    ]


@pytest.mark.parametrize(
    "volume, env_source, message",
    [
        ({"emptyDir": {}}, None, "only hostPath"),
        ({"hostPath": {"path": "/x", "type": "CharDevice"}}, None, "CharDevice"),
        ({}, {"secretKeyRef": {"name": "s", "key": "k"}}, "secretKeyRef"),
        ({}, {"configMapKeyRef": {"name": "nope", "key": "k"}}, "no ConfigMap key"),
        ({}, {"fieldRef": {"fieldPath": "status.podIP"}}, "status.podIP"),
    ],
)
def test_what_cannot_be_honoured_is_an_error(volume, env_source, message):
    with pytest.raises(podspec.PodSpecError, match=message):
        podspec.daemonset_pod(_docs(volume, env_source), "n", uid="u")


def test_apt_mirror_from_deb822_and_one_line_sources(tmp_path):
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "a.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n\n"
        "Types: deb\n# a comment: here\nURIs: http://mirror.example/debian\n"
        "Suites: bookworm bookworm-updates\nComponents: main\n"
    )
    assert image.apt_mirror((str(d),)) == "http://mirror.example/debian"
    listed = tmp_path / "sources.list"
    listed.write_text("deb [arch=amd64] http://other.example/debian bookworm main\n")
    assert image.apt_mirror((str(listed),)) == "http://other.example/debian"
    assert image.apt_mirror((str(tmp_path / "none"),)) == image.DEFAULT_MIRROR


def test_build_inputs_key_the_cached_archive(tmp_path):
    repo = tmp_path / "repo"
    (repo / "deploy").mkdir(parents=True)
    (repo / "src" / "pkg").mkdir(parents=True)
    for name in image.INPUTS:
        (repo / name).write_text(name)
    (repo / "src" / "pkg" / "a.py").write_text("a = 1\n")
    before = image.tree_digest(str(repo))
    (repo / "src" / "pkg" / "__pycache__").mkdir()
    (repo / "src" / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"x")
    assert image.tree_digest(str(repo)) == before, "bytecode is not an input"
    (repo / "src" / "pkg" / "a.py").write_text("a = 2\n")
    assert image.tree_digest(str(repo)) != before
    assert image.requirements(REPO)[0].startswith("setuptools")


def test_prune_keeps_recent_and_other_names(tmp_path):
    old, recent, other, current = (
        tmp_path / "pycni-0.1.0-aaaaaaaaaaaaaaaa.tar",
        tmp_path / "pycni-0.1.0-bbbbbbbbbbbbbbbb.tar",
        tmp_path / "pycni-0.1.0-next-cccccccccccccccc.tar",
        tmp_path / "pycni-0.1.0-dddddddddddddddd.tar",
    )
    for path in (old, recent, other, current):
        path.write_text("x")
    (tmp_path / "pycni-0.1.0-aaaaaaaaaaaaaaaa.log").write_text("log")
    for path in (old, other, current, tmp_path / "pycni-0.1.0-aaaaaaaaaaaaaaaa.log"):
        os.utime(path, (1, 1))
    removed = image.prune(str(tmp_path), "pycni-0.1.0-", keep=str(current), older_than=3600)
    assert sorted(os.path.basename(p) for p in removed) == [
        "pycni-0.1.0-aaaaaaaaaaaaaaaa.log",
        "pycni-0.1.0-aaaaaaaaaaaaaaaa.tar",
    ]
    assert recent.exists() and other.exists() and current.exists()


def test_oom_score_adjustment_as_kubelet_computes_it():
    from pycni.harness.daemonset import oom_score_adj

    gib = 1 << 30
    pod = agent_pod()
    assert oom_score_adj(pod, pod.containers[0], 16 * gib) == -997  # system-node-critical
    pod.priority_class = ""
    burstable = oom_score_adj(pod, pod.containers[0], 16 * gib)  # requests 64Mi of 16Gi
    assert burstable == 1000 - 1000 * 64 // (16 * 1024)
    for c in pod.init_containers + pod.containers:
        c.resources = {}
    assert oom_score_adj(pod, pod.containers[0], 16 * gib) == 1000  # BestEffort
    for c in pod.init_containers + pod.containers:
        c.resources = {"limits": {"cpu": "1", "memory": "1Gi"}}  # requests default to limits
    assert oom_score_adj(pod, pod.containers[0], 16 * gib) == -997  # Guaranteed
