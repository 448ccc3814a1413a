"""The two sources of NetworkPolicy's objects drive the same rules: the same Namespaces, Pods and
NetworkPolicies stored in the sqlite datastore (as pycnictl writes them) and served by the API
server (watch events: added, modified, deleted, and a 410 in between) compile to the same nft
statements for a node."""

from __future__ import annotations

import copy
import time

import pytest
from kubernetes import client

from pycni.cluster.factory import open_objects
from pycni.cluster.kubernetes_objects import KubernetesObjects
from pycni.harness.k8s_fake_api import FakeAPIServer
from pycni.policy import compile_inventory, load
from pycni.rules.policy import render

RESOURCE = {"Namespace": "namespaces", "Pod": "pods", "NetworkPolicy": "networkpolicies"}


def _ns(name: str, labels: dict) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def _pod(ns: str, name: str, labels: dict, node: str, ip: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {
            "nodeName": node,
            "containers": [
                {"name": "c", "ports": [{"name": "http", "containerPort": 80, "protocol": "TCP"}]}
            ],
        },
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }


def _policy(ns: str, name: str, spec: dict) -> dict:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


OBJECTS = [
    _ns("x", {"team": "a"}),
    _ns("y", {"team": "b"}),
    _pod("x", "a", {"app": "a"}, "node1", "10.244.0.2"),
    _pod("x", "b", {"app": "b"}, "node2", "10.244.1.2"),
    _pod("y", "c", {"app": "c"}, "node1", "10.244.0.3"),
    _policy(
        "x",
        "allow-b",
        {
            "podSelector": {"matchLabels": {"app": "a"}},
            "ingress": [
                {
                    "from": [
                        {"podSelector": {"matchLabels": {"app": "b"}}},
                        {"namespaceSelector": {"matchLabels": {"team": "b"}}},
                    ],
                    "ports": [{"port": "http"}],
                }
            ],
        },
    ),
]


class Both:
    """One change, made in both sources."""

    def __init__(self, server: FakeAPIServer, stored) -> None:
        self.server, self.stored = server, stored

    def apply(self, obj: dict) -> None:
        self.stored.apply(copy.deepcopy(obj))
        self.server.put_object(RESOURCE[obj["kind"]], copy.deepcopy(obj))

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.stored.delete(kind, namespace, name)
        self.server.delete_object(RESOURCE[kind], f"{namespace}/{name}" if namespace else name)


def rules(source, node: str = "node1") -> tuple[str, ...]:
    snap = source.snapshot()
    inventory = load(snap.namespaces, snap.pods, snap.policies)
    return render(compile_inventory(node, inventory)).statements


@pytest.fixture
def sources(tmp_path):
    server = FakeAPIServer().start()
    api = client.ApiClient(client.Configuration(host=server.url))
    stored = open_objects("sqlite", path=str(tmp_path / "cluster.db"))
    watched = KubernetesObjects(api_client=api)
    try:
        yield Both(server, stored), stored, watched
    finally:
        watched.close()
        api.close()
        stored.close()
        server.stop()


def settled(watched, stored, timeout: float = 10) -> None:
    """Until the watched source shows what the stored one holds."""
    deadline = time.monotonic() + timeout
    while rules(watched) != rules(stored) or rules(watched, "node2") != rules(stored, "node2"):
        assert time.monotonic() < deadline, "the watched source never caught up"
        watched.wait(0.5)


def test_stored_and_watched_objects_drive_the_same_rules(sources):
    both, stored, watched = sources
    for obj in OBJECTS:
        both.apply(obj)
    settled(watched, stored)
    assert rules(stored)  # something is enforced at all
    # modified: a relabel into the allowed selector, a changed policy
    both.apply(_pod("y", "c", {"app": "b"}, "node1", "10.244.0.3"))
    settled(watched, stored)
    changed = copy.deepcopy(OBJECTS[-1])
    changed["spec"]["ingress"][0]["ports"] = [{"port": 81}]
    both.apply(changed)
    settled(watched, stored)
    # a 410: the watch's resourceVersion is compacted away while a change happens
    both.server.compact()
    both.server.end_watches()
    both.apply(_ns("y", {"team": "c"}))
    settled(watched, stored)
    # deleted: a pod, then the policy (nothing enforced any more)
    both.delete("Pod", "x", "b")
    settled(watched, stored)
    both.delete("NetworkPolicy", "x", "allow-b")
    settled(watched, stored)
    assert rules(watched) == rules(stored) == ()
