"""NetworkPolicy's objects stored in a KV datastore (cluster/objects.py)."""

from __future__ import annotations

import threading

import pytest

from pycni.cluster.factory import open_objects
from pycni.cluster.objects import ObjectError, identify


def _pod(name: str, labels: dict, namespace: str | None = "x") -> dict:
    meta = {"name": name, "labels": labels}
    if namespace is not None:
        meta["namespace"] = namespace
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta}


@pytest.fixture
def objects(tmp_path):
    store = open_objects("sqlite", path=str(tmp_path / "cluster.db"))
    yield store
    store.close()


def test_apply_reports_like_kubectl_and_snapshot_sorts_by_kind(objects):
    ns = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "x"}}
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "deny", "namespace": "x"},
        "spec": {"podSelector": {}},
    }
    assert objects.apply(ns) == "created"
    assert objects.apply(_pod("a", {"pod": "a"})) == "created"
    assert objects.apply(_pod("a", {"pod": "a"})) == "unchanged"
    assert objects.apply(_pod("a", {"pod": "b"})) == "configured"
    assert objects.apply(policy) == "created"
    snap = objects.snapshot()
    assert snap.namespaces == (ns,)
    assert [p["metadata"]["labels"] for p in snap.pods] == [{"pod": "b"}]
    assert snap.policies == (policy,)
    assert objects.delete("Pod", "x", "a") and not objects.delete("Pod", "x", "a")
    assert objects.snapshot().pods == ()


def test_a_pod_without_namespace_is_in_default(objects):
    objects.apply(_pod("a", {}, namespace=None))
    assert objects.get("Pod", "default", "a") is not None


def test_wait_wakes_up_for_a_change_from_another_client(objects, tmp_path):
    other = open_objects("sqlite", path=str(tmp_path / "cluster.db"))
    try:
        objects.snapshot()
        assert not objects.wait(0.1)
        threading.Timer(0.2, lambda: other.apply(_pod("b", {}))).start()
        assert objects.wait(5)
    finally:
        other.close()


@pytest.mark.parametrize(
    "obj, message",
    [
        ([], "must be a mapping"),
        ({"kind": "Service", "metadata": {"name": "s"}}, "is not one of"),
        ({"kind": "Pod", "metadata": {}}, "needs metadata.name"),
        ({"kind": "Pod", "metadata": {"name": "a/b"}}, "needs metadata.name"),
    ],
)
def test_objects_that_cannot_be_stored_are_refused(objects, obj, message):
    with pytest.raises(ObjectError, match=message):
        identify(obj)
    with pytest.raises(ObjectError):
        objects.apply(obj)
