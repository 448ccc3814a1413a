"""The lab's connectivity matrix judged against NetworkPolicies (lab/verdicts.py, probes.py):
which paths the reference evaluator denies, which probe port each target gets, what counts as
an expected denial and what as a failure, and the third colour of the picture."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from pycni.cluster.objects import Objects
from pycni.lab.draw import DENIED, FAILED, OK, lab_svg
from pycni.lab.model import PROBE_PORT, Lab
from pycni.lab.objects import builtin_pod_object, namespace_object, pod_object
from pycni.lab.probes import Probe, as_json, plan_probes, summary
from pycni.lab.verdicts import Policies


def _lab(backend: str = "vxlan", ipv6: bool = False) -> Lab:
    """2 nodes, 2 pods each (n1pod1 10.244.1.2 ...), networked on paper."""
    lab = Lab.plan("vtest", "/nonexistent", 2, 2, backend=backend, ipv6=ipv6)
    for i, node in enumerate(lab.nodes, start=1):
        node.subnet = f"10.244.{i}.0/24"
        node.subnet6 = f"fd00:10:244:{i}::/64" if ipv6 else ""
        for j, pod in enumerate(node.pods, start=2):
            pod.address = f"10.244.{i}.{j}/24"
            pod.address6 = f"fd00:10:244:{i}::{j}/64" if ipv6 else ""
    return lab


def _objects(lab: Lab, *policies: dict, extra_pods: tuple[dict, ...] = ()) -> Objects:
    pods = tuple(builtin_pod_object(n, p) for n, p in lab.pods()) + extra_pods
    return Objects((namespace_object("default"),), pods, tuple(policies))


def _policy(name: str, spec: dict, namespace: str = "default") -> dict:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def _probes(lab: Lab, *policies: dict) -> dict[tuple[str, str], Probe]:
    probes = plan_probes(lab, Policies(lab, _objects(lab, *policies)))
    return {(p.src_label, p.dst_label): p for p in probes if not p.kind.split()[0].endswith("6")}


DENY_N1POD1 = _policy(
    "deny", {"podSelector": {"matchLabels": {"pod": "n1pod1"}}, "policyTypes": ["Ingress"]}
)


def test_the_lab_s_own_pods_are_stored_as_the_kubelet_reports_them():
    lab = _lab(ipv6=True)
    node, pod = lab.pods()[0]
    obj = builtin_pod_object(node, pod)
    assert obj["metadata"] == {
        "name": "n1pod1",
        "namespace": "default",
        "labels": {"pod": "n1pod1"},
        "uid": pod.uid,
    }
    assert obj["spec"]["nodeName"] == "node1"
    assert obj["spec"]["containers"][0]["ports"] == [
        {"name": "serve", "containerPort": PROBE_PORT, "protocol": "TCP"}
    ]
    assert obj["status"]["phase"] == "Running"
    assert obj["status"]["podIP"] == "10.244.1.2"
    assert obj["status"]["podIPs"] == [{"ip": "10.244.1.2"}, {"ip": "fd00:10:244:1::2"}]
    assert obj["status"]["hostIP"] == node.lan_ip
    pod.address = pod.address6 = ""  # before its ADD: no status at all
    assert "status" not in builtin_pod_object(node, pod)
    assert namespace_object("default")["metadata"]["labels"] == {
        "kubernetes.io/metadata.name": "default"
    }


def test_without_policies_every_path_is_expected_open_and_icmp_judged():
    lab = _lab()
    probes = plan_probes(lab)  # no objects at all: everything allowed
    assert probes and all(p.allowed and p.icmp_judged for p in probes)
    assert {p.dst_port for p in probes} == {PROBE_PORT}
    assert plan_probes(lab, Policies(lab, _objects(lab))) == probes


def test_an_isolated_pod_is_denied_to_pods_and_other_nodes_but_not_to_its_own_node():
    lab = _lab()
    probes = _probes(lab, DENY_N1POD1)
    into = {src: p for (src, dst), p in probes.items() if dst == "n1pod1"}
    assert {src for src, p in into.items() if p.allowed} == {"node1"}
    assert into["node1"].icmp_judged  # node-local: always allowed, ICMP too
    assert not into["n2pod1"].icmp_judged  # a policy governs it: ICMP shown, not judged
    # Its own traffic out is not isolated (Ingress only); the other pods are untouched.
    assert probes[("n1pod1", "n2pod1")].allowed and probes[("n1pod1", "outside")].allowed
    assert probes[("n1pod2", "n2pod1")].icmp_judged


@pytest.mark.parametrize(
    "backend, source", [("vxlan", "10.244.2.0/32"), ("host-gw", "192.0.2.2/32")]
)
def test_another_node_is_only_its_address_matched_by_ip_blocks(backend, source):
    """node2 reaches node1's pods from its VTEP address (vxlan) or its underlay address
    (host-gw): an ipBlock of that address lets it in, one of the other does not."""
    lab = _lab(backend)
    other = "192.0.2.2/32" if source.startswith("10.") else "10.244.2.0/32"
    for cidr, allowed in ((source, True), (other, False)):
        allow = _policy(
            "from-node2",
            {
                "podSelector": {"matchLabels": {"pod": "n1pod1"}},
                "ingress": [{"from": [{"ipBlock": {"cidr": cidr}}]}],
            },
        )
        probes = _probes(lab, allow)
        assert probes[("node2", "n1pod1")].allowed is allowed, cidr
        assert not probes[("n2pod1", "n1pod1")].allowed


def test_named_ports_resolve_on_the_lab_s_serve_port_and_egress_denies_the_outside():
    lab = _lab()
    by_name = _policy(
        "serve",
        {
            "podSelector": {"matchLabels": {"pod": "n1pod1"}},
            "ingress": [{"ports": [{"port": "serve"}]}],
        },
    )
    other_name = _policy(
        "other",
        {
            "podSelector": {"matchLabels": {"pod": "n1pod1"}},
            "ingress": [{"ports": [{"port": "http"}]}],
        },
    )
    assert _probes(lab, by_name)[("n2pod1", "n1pod1")].allowed
    assert not _probes(lab, other_name)[("n2pod1", "n1pod1")].allowed
    no_egress = _policy("no-egress", {"podSelector": {}, "policyTypes": ["Egress"]})
    probes = _probes(lab, no_egress)
    assert not probes[("n1pod1", "outside")].allowed
    assert not probes[("n1pod1", "n2pod1")].allowed
    assert probes[("node2", "n1pod1")].allowed  # no pod egresses; ingress is open


def test_an_applied_pod_is_probed_on_its_first_tcp_container_port_and_named_ns_slash_name():
    lab = _lab()
    node = lab.nodes[1]
    pod = lab.plan_pod(node, "x", "a")
    pod.address = "10.244.2.9/24"
    obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "a", "namespace": "x", "labels": {"pod": "a"}},
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "ports": [
                        {"name": "dns", "containerPort": 53, "protocol": "UDP"},
                        {"name": "serve-80-tcp", "containerPort": 80},
                    ],
                }
            ]
        },
    }
    policies = Policies(lab, _objects(lab, extra_pods=(pod_object(obj, node, pod),)))
    probes = plan_probes(lab, policies)
    into = [p for p in probes if p.dst_label == "x/a"]
    assert into and {p.dst_port for p in into} == {80}
    assert any(p.src_label == "x/a" for p in probes)


def _measured(probe: Probe, *, icmp: bool, tcp: bool, peer: str | None = None) -> Probe:
    probe.icmp_ok, probe.tcp_ok = icmp, tcp
    probe.peer = (probe.expect[0] if peer is None else peer) if tcp else ""
    return probe


@pytest.mark.parametrize(
    "allowed, icmp_judged, icmp, tcp, verdict",
    [
        (True, True, True, True, "ok"),
        (True, True, False, True, "failed"),  # unpoliced: ICMP counts
        (True, False, False, True, "ok"),  # under a policy: ICMP is not judged
        (True, True, True, False, "failed"),
        (False, False, False, False, "denied"),  # closed, as the policies say
        (False, False, True, False, "denied"),
        (False, False, False, True, "failed"),  # got through a denying policy
    ],
)
def test_verdicts(allowed, icmp_judged, icmp, tcp, verdict):
    probe = Probe("pod->pod", "a", "na", "b", "nb", "10.0.0.2", expect=("10.0.0.1",))
    probe.allowed, probe.icmp_judged = allowed, icmp_judged
    _measured(probe, icmp=icmp, tcp=tcp)
    assert probe.verdict == verdict
    assert probe.ok is (verdict == "ok") and probe.failed is (verdict == "failed")


def test_a_wrong_source_address_is_a_failure_even_where_allowed():
    probe = Probe("pod->pod", "a", "na", "b", "nb", "10.0.0.2", expect=("10.0.0.1",))
    assert _measured(probe, icmp=True, tcp=True, peer="10.0.0.9").verdict == "failed"


def test_summary_and_json_tell_denials_from_failures():
    lab = _lab()
    probes = plan_probes(lab, Policies(lab, _objects(lab, DENY_N1POD1)))
    for p in probes:
        _measured(p, icmp=p.allowed, tcp=p.allowed)
    denied = sum(not p.allowed for p in probes)
    assert denied == 4  # n1pod2, n2pod1, n2pod2, node2
    assert summary(probes) == (
        f"all {len(probes)} paths as expected: {len(probes) - denied} OK, {denied} denied by policy"
    )
    entries = as_json(probes)
    assert {e["verdict"] for e in entries} == {"ok", "denied"}
    assert [e for e in entries if e["expected"] == "deny"] == [
        e for e in entries if e["verdict"] == "denied"
    ]
    leak = next(p for p in probes if not p.allowed)
    _measured(leak, icmp=True, tcp=True)
    assert summary(probes) == f"1 of {len(probes)} paths FAILED"
    assert summary([]) == "no paths measured: the lab has no pods"


def test_the_picture_colours_expected_denials_apart_from_failures():
    lab = _lab()
    probes = plan_probes(lab, Policies(lab, _objects(lab, DENY_N1POD1)))
    for p in probes:
        _measured(p, icmp=p.allowed, tcp=p.allowed)
    broken = next(p for p in probes if p.allowed and p.kind == "pod->pod x-node")
    _measured(broken, icmp=True, tcp=False)
    root = ET.fromstring(lab_svg(lab, probes))
    fills = {e.get("data-cell"): e.get("fill") for e in root.iter() if e.get("data-cell")}
    denied = sorted(c for c, f in fills.items() if f == DENIED)
    assert denied == sorted(f"{s}>n1pod1" for s in ("n1pod2", "n2pod1", "n2pod2", "node2"))
    assert [c for c, f in fills.items() if f == FAILED] == [
        f"{broken.src_label}>{broken.dst_label}"
    ]
    assert list(fills.values()).count(OK) == len(probes) - 5
    texts = "\n".join(t.text or "" for t in root.iter() if t.tag.endswith("text"))
    assert "denied by policy (expected)" in texts
