"""Installing a node's NetworkPolicy rules (core/masquerade.install_policy) in a real kernel, in
a throwaway network namespace: a pod that comes or is relabelled changes set elements alone
(the table, and so the policies' counters, stay), to exactly what replacing the table would
have made; a new policy, or none left, replaces (removes) the table."""

from __future__ import annotations

import json
import sys

import pytest

pytestmark = [pytest.mark.netns]

_SCENARIO = r"""
import json, subprocess, sys
from pycni.core import masquerade
from pycni.ipam.store import Store
from pycni.policy import compile_node
from pycni.rules import policy as policy_rules

NAMESPACES = [{"kind": "Namespace", "metadata": {"name": "x"}}]


def pod(name, ip, app):
    return {
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "x", "labels": {"app": app}},
        "spec": {"nodeName": "n1"},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]},
    }


def policy(name, app, peer):
    return {
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": "x"},
        "spec": {
            "podSelector": {"matchLabels": {"app": app}},
            "ingress": [
                {"from": [{"podSelector": {"matchLabels": {"app": peer}}}], "ports": [{"port": 80}]}
            ],
        },
    }


def recorded(pods, policies):
    rules = policy_rules.render(compile_node("n1", NAMESPACES, pods, policies))
    if not rules:
        return None
    return {"statements": list(rules.statements), "counters": [list(c) for c in rules.counters]}


def nft(*argv):
    return subprocess.run(["nft", *argv], capture_output=True, text=True).stdout


def handles():
    # A counter's handle is new whenever the table is made again.
    lines = nft("-a", "list", "counters").splitlines()
    return sorted(l.split("# handle")[1].strip() for l in lines if "# handle" in l)


out = {}
policies = [policy("web", "web", "client")]
pods = [pod("web1", "10.0.1.1", "web"), pod("client1", "10.0.1.2", "client")]
with Store(sys.argv[1]) as store:
    out["first"] = masquerade.install_policy(store, recorded(pods, policies))
    out["handles_first"] = handles()
    pods.append(pod("web2", "10.0.1.3", "web"))  # a pod came
    out["pod_came"] = masquerade.install_policy(store, recorded(pods, policies))
    out["listing_delta"] = nft("list", "table", "inet", "pycni")
    out["handles_delta"] = handles()
    out["repaired"] = masquerade.repair(store)  # reads the digest back: nothing to repair
    masquerade.sync(store, force=True)  # the whole table made again from the store
    out["listing_full"] = nft("list", "table", "inet", "pycni")
    out["again"] = masquerade.install_policy(store, recorded(pods, policies))
    pods[0] = pod("web1", "10.0.1.1", "batch")  # relabelled out of every set
    out["relabelled"] = masquerade.install_policy(store, recorded(pods, policies))
    out["listing_relabelled"] = nft("list", "table", "inet", "pycni")
    policies.append(policy("client", "client", "web"))
    out["policy_came"] = masquerade.install_policy(store, recorded(pods, policies))
    out["none"] = masquerade.install_policy(store, None)
    out["listing_none"] = nft("list", "tables")
print(json.dumps(out))
"""


def test_pod_changes_touch_elements_and_policy_changes_the_table(netns, tmp_path):
    ns = netns.make("pinst")
    proc = netns.exec(ns, sys.executable, "-c", _SCENARIO, str(tmp_path / "data"), check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["first"] == "table"
    assert out["pod_came"] == "elements"
    assert out["handles_delta"] == out["handles_first"] and out["handles_first"]
    assert "10.0.1.3" in out["listing_delta"]
    assert out["repaired"] is False
    assert out["listing_delta"] == out["listing_full"]  # the delta made what a table makes
    assert out["again"] == "unchanged"
    assert out["relabelled"] == "elements"
    targets = [line for line in out["listing_relabelled"].splitlines() if "10.0.1.3" in line]
    assert targets and not any("10.0.1.1" in line for line in targets)
    assert out["policy_came"] == "table"
    assert out["none"] == "table" and "pycni" not in out["listing_none"]
