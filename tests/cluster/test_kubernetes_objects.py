"""NetworkPolicy's objects from the API server (cluster/kubernetes_objects.py), against the fake
API server the official client talks HTTP to: what the controller reads, and when it wakes."""

from __future__ import annotations

import time

import pytest
from kubernetes import client

from pycni.cluster.kubernetes_objects import KubernetesObjects
from pycni.harness.k8s_fake_api import FakeAPIServer


def _ns(name: str, labels: dict) -> dict:
    return {"metadata": {"name": name, "labels": labels}}


def _pod(name: str, labels: dict, ip: str | None = None, node: str = "node1") -> dict:
    status = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]} if ip else {}
    return {
        "metadata": {"name": name, "namespace": "x", "labels": labels, "uid": name},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80}]}],
        },
        "status": status,
    }


POLICY = {
    "metadata": {"name": "deny", "namespace": "x"},
    "spec": {"podSelector": {"matchLabels": {"app": "a"}}, "policyTypes": ["Ingress"]},
}


@pytest.fixture
def server():
    srv = FakeAPIServer().start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def objects(server):
    api = client.ApiClient(client.Configuration(host=server.url))
    source = KubernetesObjects(api_client=api)
    try:
        yield source
    finally:
        source.close()
        api.close()


def test_the_three_kinds_trimmed_to_what_the_engine_reads(server, objects):
    server.put_object("namespaces", _ns("x", {"team": "a"}))
    server.put_object("pods", _pod("a", {"app": "a"}, "10.244.0.2"))
    server.put_object("networkpolicies", POLICY)
    snap = objects.snapshot()
    assert snap.namespaces == (
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "x", "labels": {"team": "a"}},
        },
    )
    (pod,) = snap.pods
    assert pod["metadata"] == {"name": "a", "namespace": "x", "labels": {"app": "a"}}
    assert pod["spec"]["nodeName"] == "node1"
    assert pod["spec"]["containers"][0]["ports"][0]["name"] == "http"
    assert pod["status"]["podIPs"] == [{"ip": "10.244.0.2"}]
    assert snap.policies[0]["spec"]["podSelector"] == {"matchLabels": {"app": "a"}}


def test_changes_wake_the_waiter_and_noise_does_not(server, objects):
    server.put_object("pods", _pod("a", {"app": "a"}))
    objects.snapshot()
    assert not objects.wait(0.2)
    # A status heartbeat that changes nothing the engine reads: no wake-up.
    server.modify_object("pods", "x/a", {"metadata": {"annotations": {"beat": "1"}}})
    assert not objects.wait(0.5)
    for change in (
        lambda: server.modify_object("pods", "x/a", {"metadata": {"labels": {"app": "b"}}}),
        lambda: server.put_object("networkpolicies", POLICY),
        lambda: server.put_object("namespaces", _ns("y", {})),
        lambda: server.delete_object("networkpolicies", "x/deny"),
    ):
        change()
        started = time.monotonic()
        assert objects.wait(5)
        assert time.monotonic() - started < 1
        objects.snapshot()
    assert objects.snapshot().policies == ()
    assert [p["metadata"]["labels"] for p in objects.snapshot().pods] == [{"app": "b"}]


def test_a_compaction_loses_no_change(server, objects):
    objects.snapshot()
    server.compact()
    server.end_watches()
    server.put_object("networkpolicies", POLICY)
    deadline = time.monotonic() + 10
    while not objects.snapshot().policies:
        assert time.monotonic() < deadline
        objects.wait(1)


def test_no_empty_view_before_the_first_list(monkeypatch):
    from pycni.cluster import kubernetes_objects
    from pycni.cluster.kv import KVError

    monkeypatch.setattr(kubernetes_objects, "SYNC_TIMEOUT", 0.5)
    api = client.ApiClient(client.Configuration(host="http://127.0.0.1:9"))
    source = KubernetesObjects(api_client=api)
    try:
        with pytest.raises(KVError, match="not listed yet"):
            source.snapshot()
    finally:
        source.close()
        api.close()
