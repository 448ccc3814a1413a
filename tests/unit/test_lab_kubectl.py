"""`pycnictl lab apply / delete / get` as far as no kernel is involved: Namespaces and
NetworkPolicies into and out of a lab's sqlite datastore with kubectl-like lines, the checks
only a running lab can make, and what `get` lists. (Pods networked for real: the netns test
tests/netns/test_lab_yaml.py.)"""

from __future__ import annotations

import io
import json
import os

import pytest

from pycni.cluster.factory import open_objects
from pycni.ctl.main import build_parser
from pycni.lab.model import Lab

NS_AND_POLICIES = """
apiVersion: v1
kind: Namespace
metadata: {name: x, labels: {ns: x}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-a, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: all, namespace: x}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
"""


@pytest.fixture
def lab(tmp_path):
    """A lab of one node, recorded but not built: its datastore is a plain sqlite file."""
    lab = Lab.plan("ktest", str(tmp_path / "lab"), 1, 0)
    lab.nodes[0].subnet = "10.244.0.0/24"
    os.makedirs(lab.state_dir)
    lab.save()
    return lab


def run(lab: Lab, *argv: str, stdin: str = "", monkeypatch=None) -> int:
    args = build_parser().parse_args(
        ["lab", *argv, "--prefix", lab.prefix, "--state-dir", lab.state_dir]
    )
    if monkeypatch is not None:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return args.func(args)


def _pod(name: str, labels: dict, namespace: str = "x") -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"nodeName": "node1"},
        "status": {"podIPs": [{"ip": f"10.244.0.{len(name) + 1}"}]},
    }


def test_apply_then_reapply_then_delete_speaks_like_kubectl(lab, tmp_path, capsys, monkeypatch):
    manifest = tmp_path / "world.yaml"
    manifest.write_text(NS_AND_POLICIES)
    assert run(lab, "apply", "-f", str(manifest)) == 0
    assert capsys.readouterr().out.splitlines() == [
        "namespace/x created",
        "networkpolicy.networking.k8s.io/x/only-a created",
        "networkpolicy.networking.k8s.io/x/all created",
    ]
    changed = NS_AND_POLICIES.replace("{pod: a}", "{pod: b}")
    assert run(lab, "apply", "-f", "-", stdin=changed, monkeypatch=monkeypatch) == 0
    assert capsys.readouterr().out.splitlines() == [
        "namespace/x unchanged",
        "networkpolicy.networking.k8s.io/x/only-a configured",
        "networkpolicy.networking.k8s.io/x/all unchanged",
    ]
    store = open_objects("sqlite", path=lab.cluster_db)
    try:
        stored = store.get("Namespace", "", "x")
        assert stored is not None
        assert stored["metadata"]["labels"] == {"ns": "x", "kubernetes.io/metadata.name": "x"}
        policy = store.get("NetworkPolicy", "x", "only-a")
        assert policy is not None and policy["metadata"]["namespace"] == "x"
        for pod in (_pod("a", {"pod": "a"}), _pod("bb", {"pod": "b"})):
            store.apply(pod)  # stored pods the lab did not network (as another writer might)
    finally:
        store.close()

    assert run(lab, "get", "policies", "--json") == 0
    assert json.loads(capsys.readouterr().out) == [
        {
            "namespace": "x",
            "name": "all",
            "policyTypes": ["Ingress", "Egress"],
            "pods": ["a", "bb"],
        },
        {"namespace": "x", "name": "only-a", "policyTypes": ["Ingress"], "pods": ["bb"]},
    ]
    assert run(lab, "get", "netpol") == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["NAMESPACE", "NAME", "POLICY", "TYPES", "SELECTED", "PODS"]
    assert table[1].split() == ["x", "all", "Ingress,Egress", "a,bb"]
    assert run(lab, "get", "pods", "--json") == 0
    assert json.loads(capsys.readouterr().out)[0] == {
        "namespace": "x",
        "name": "a",
        "node": "node1",
        "netns": "",
        "ips": ["10.244.0.2"],
        "labels": {"pod": "a"},
    }
    assert run(lab, "get", "ns", "--json") == 0
    assert [(e["name"], e["pods"]) for e in json.loads(capsys.readouterr().out)] == [("x", 2)]

    # Deleting the namespace deletes what is in it, as Kubernetes does.
    assert run(lab, "delete", "-f", str(manifest)) == 0
    assert capsys.readouterr().out.splitlines() == [
        "networkpolicy.networking.k8s.io/x/only-a deleted",
        "networkpolicy.networking.k8s.io/x/all deleted",
        "pod/x/a deleted",
        "pod/x/bb deleted",
        "namespace/x deleted",
    ]
    assert run(lab, "delete", "-f", str(manifest)) == 1
    assert "namespace/x not found" in capsys.readouterr().err
    assert run(lab, "delete", "-f", str(manifest), "--ignore-not-found") == 0
    assert run(lab, "get", "pods", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []


def test_nothing_is_applied_when_one_document_is_wrong(lab, capsys, monkeypatch):
    text = NS_AND_POLICIES + "---\napiVersion: v1\nkind: Secret\nmetadata: {name: s}\n"
    assert run(lab, "apply", "-f", "-", stdin=text, monkeypatch=monkeypatch) == 1
    err = capsys.readouterr().err
    assert "nothing changed" in err and "stdin, document 4: kind 'Secret'" in err
    assert run(lab, "get", "namespaces", "--json") == 0
    assert json.loads(capsys.readouterr().out) == []


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, namespace: nope}\n",
            "pod/nope/a: namespace 'nope' does not exist",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {nodeName: node7}\n",
            "pod/default/a: spec.nodeName 'node7' is no lab node (node1)",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {nodeName: node1}\n",
            "pod/default/a: node1 has no CNI config (is its agent up?)",
        ),
        (
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n",
            None,  # applying default is fine (it always exists)...
        ),
    ],
)
def test_what_only_the_running_lab_can_refuse(lab, capsys, monkeypatch, text, message):
    rc = run(lab, "apply", "-f", "-", stdin=text, monkeypatch=monkeypatch)
    err = capsys.readouterr().err
    if message is None:
        assert rc == 0, err
    else:
        assert rc == 1 and message in err and "nothing changed" in err, err


def test_the_default_namespace_cannot_be_deleted_and_labs_are_found_by_prefix(
    lab, capsys, monkeypatch
):
    text = "apiVersion: v1\nkind: Namespace\nmetadata: {name: default}\n"
    assert run(lab, "delete", "-f", "-", stdin=text, monkeypatch=monkeypatch) == 1
    assert "the default namespace may not be deleted" in capsys.readouterr().err
    args = build_parser().parse_args(
        ["lab", "get", "pods", "--prefix", "other", "--state-dir", lab.state_dir]
    )
    assert args.func(args) == 1
    assert "no lab other is up in" in capsys.readouterr().err


def test_lab_up_accepts_no_pods_and_get_knows_kubectl_s_names():
    parser = build_parser()
    assert parser.parse_args(["lab", "up", "--pods", "0"]).pods == 0
    for name, resource in (("po", "pods"), ("networkpolicies", "policies"), ("ns", "namespaces")):
        assert parser.parse_args(["lab", "get", name]).resource == resource
    with pytest.raises(SystemExit):
        parser.parse_args(["lab", "get", "services"])
    with pytest.raises(SystemExit):
        parser.parse_args(["lab", "apply"])  # -f is required
