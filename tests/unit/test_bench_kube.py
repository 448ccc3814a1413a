"""`pycnictl bench kube`'s readings of containerd's log and the kubelet's metrics, on lines
as containerd 2.4 and kubelet 1.37 wrote them in the lab."""

from __future__ import annotations

import pytest

from pycni.bench.kube import kubelet_sandbox_metric, pods_manifest, sandbox_seconds

LOG = r"""time="2026-12-06T19:07:38.036512086Z" level=info msg="RunPodSandbox for name:\"w0-p1\" uid:\"cb5d\" namespace:\"bench\""
time="2026-12-06T19:07:38.040000000Z" level=info msg="RunPodSandbox for name:\"pycni-m6rtz\" uid:\"aa\" namespace:\"kube-system\""
time="2026-12-06T19:07:38.156049731Z" level=info msg="RunPodSandbox for name:\"w0-p1\" uid:\"cb5d\" namespace:\"bench\" returns sandbox id \"a7a4\""
time="2026-12-06T19:07:38.200000000Z" level=info msg="RunPodSandbox for name:\"w0-p2\" uid:\"dd\" namespace:\"bench\""
time="2026-12-06T19:07:39.000000000Z" level=info msg="RunPodSandbox for name:\"pycni-m6rtz\" uid:\"aa\" namespace:\"kube-system\" returns sandbox id \"b1\""
"""  # noqa: E501


def test_sandbox_times_pair_each_request_with_its_answer():
    took = sandbox_seconds(LOG, {"w0-p1", "w0-p2"})
    assert took == {"w0-p1": pytest.approx(0.119537, abs=1e-6)}  # w0-p2 never answered


def test_kubelet_histogram_sums_every_runtime_handler():
    metrics = "\n".join([
        "# TYPE kubelet_run_podsandbox_duration_seconds histogram",
        'kubelet_run_podsandbox_duration_seconds_bucket{runtime_handler="",le="1"} 3',
        'kubelet_run_podsandbox_duration_seconds_sum{runtime_handler=""} 1.5',
        'kubelet_run_podsandbox_duration_seconds_count{runtime_handler=""} 3',
        'kubelet_run_podsandbox_duration_seconds_sum{runtime_handler="runc"} 0.5',
        'kubelet_run_podsandbox_duration_seconds_count{runtime_handler="runc"} 1',
    ])  # fmt: skip
    assert kubelet_sandbox_metric(lambda *args: metrics, "node1") == (2.0, 4)


def test_the_pods_never_pull():
    import yaml

    docs = list(yaml.safe_load_all(pods_manifest(3, 1)))
    pods = [d for d in docs if d["kind"] == "Pod"]
    assert [p["metadata"]["name"] for p in pods] == ["w1-p0", "w1-p1", "w1-p2"]
    assert {c["imagePullPolicy"] for p in pods for c in p["spec"]["containers"]} == {"Never"}
