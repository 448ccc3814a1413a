"""The agent's policy controller around the engine (no kernel: installing, the bridge sysctls and
conntrack are stubbed): a pass whose inputs did not change does not compile again, one whose
objects or local addresses changed does, and every pass says where its time went."""

from __future__ import annotations

import pytest

from pycni.agent import policy as agent_policy
from pycni.cluster.objects import Objects, ObjectSource
from pycni.core import masquerade
from pycni.rules import sync as rules_sync

NAMESPACE = {"kind": "Namespace", "metadata": {"name": "x"}}
POLICY = {
    "kind": "NetworkPolicy",
    "metadata": {"name": "deny", "namespace": "x"},
    "spec": {"podSelector": {"matchLabels": {"app": "a"}}},
}


def pod(labels: dict) -> dict:
    return {
        "kind": "Pod",
        "metadata": {"name": "a", "namespace": "x", "labels": labels},
        "spec": {"nodeName": "n1"},
        "status": {"podIP": "10.0.1.5", "podIPs": [{"ip": "10.0.1.5"}]},
    }


class Source(ObjectSource):
    def __init__(self, objects: Objects) -> None:
        self.objects = objects

    def snapshot(self) -> Objects:
        # A fresh copy each time, as a datastore's list is: equal, never the same objects.
        import copy

        return copy.deepcopy(self.objects)

    def wait(self, timeout: float) -> bool:
        return False


@pytest.fixture
def controller(tmp_path, monkeypatch):
    installs: list[dict | None] = []
    compiles: list[str] = []

    def install(store, recorded):
        installs.append(recorded)
        return "table"

    monkeypatch.setattr(masquerade, "install_policy", install)
    monkeypatch.setattr(rules_sync, "resolve_backend", lambda backend=None: "nft")
    monkeypatch.setattr(agent_policy, "ensure_bridge_netfilter", lambda: None)
    monkeypatch.setattr(agent_policy, "cut_denied_connections", lambda compiled: 0)
    import pycni.policy as policy_pkg

    real = policy_pkg.compile_inventory

    def counting(node, inventory):
        compiles.append(node)
        return real(node, inventory)

    monkeypatch.setattr(policy_pkg, "compile_inventory", counting)
    source = Source(Objects((NAMESPACE,), (pod({"app": "a"}),), (POLICY,)))
    ctl = agent_policy.PolicyController(source, "n1", str(tmp_path / "data"))
    return ctl, source, compiles, installs


def test_unchanged_inputs_are_not_compiled_again(controller):
    ctl, source, compiles, installs = controller
    first = ctl.reconcile("start")
    assert first["sizes"]["isolated_ingress"] == 1 and len(compiles) == 1
    assert {"snapshot", "load", "compile", "render", "record", "install", "cut"} <= set(
        first["timings"]
    )
    again = ctl.reconcile("resync")
    assert len(compiles) == 1  # the same objects and addresses: the same rules
    assert "unchanged" in again["timings"] and "compile" not in again["timings"]
    assert again["sizes"] == first["sizes"] and again["counters"] == first["counters"]
    assert len(installs) == 2  # the install step still runs: it checks what is applied

    source.objects = Objects((NAMESPACE,), (pod({"app": "b"}),), (POLICY,))  # relabelled out
    moved = ctl.reconcile("objects changed")
    assert len(compiles) == 2 and "compile" in moved["timings"]
    assert moved["sizes"]["isolated_ingress"] == 0


def test_only_changed_objects_are_parsed_again(controller, monkeypatch):
    import pycni.policy.objects as objects

    ctl, source, compiles, _ = controller
    parsed: list[str] = []
    real = objects.parse_pod

    def counting(data):
        parsed.append(data["metadata"]["name"])
        return real(data)

    monkeypatch.setattr(objects, "parse_pod", counting)
    other = {
        **pod({"app": "b"}),
        "metadata": {"name": "b", "namespace": "x", "labels": {}},
        "status": {"podIP": "10.0.1.6", "podIPs": [{"ip": "10.0.1.6"}]},
    }
    broken = {"kind": "Pod", "metadata": {"name": "bad", "namespace": "x", "labels": {"?": 1}}}
    source.objects = Objects((NAMESPACE,), (pod({"app": "a"}), other, broken), (POLICY,))
    first = ctl.reconcile("start")
    # bad fails here and again in load(), which reports it.
    assert sorted(parsed) == ["a", "b", "bad", "bad"] and len(first["problems"]) == 1
    parsed.clear()
    source.objects = Objects((NAMESPACE,), (pod({"app": "c"}), other, broken), (POLICY,))
    moved = ctl.reconcile("relabelled")
    # a changed, b did not; bad never parses, so it is tried (and reported) again.
    assert sorted(parsed) == ["a", "bad", "bad"] and len(moved["problems"]) == 1
    assert moved["sizes"]["pods"] == 2 and moved["sizes"]["isolated_ingress"] == 0
