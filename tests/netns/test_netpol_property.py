"""Property: for random namespaces, pods (their namespace, node, labels and named ports) and
NetworkPolicies, the matrix a small lab enforces equals the reference evaluator's.

One lab (2 nodes, vxlan, dual stack) for every example. Each example makes the lab's world
what it drew (pods that must change namespace, node or ports are deleted and made anew, the
others relabelled, namespaces relabelled), then draws 1-3 policies from a grammar over
selectors (matchLabels and every matchExpressions operator, namespace and pod selectors alone
and together), ipBlocks (with excepts, both families, on the lab's real addresses), ports
(numbers, ranges, named ports, protocols) and both directions; applies them, waits for every
node to install them and measures every pod to every pod over TCP and UDP, ports 80 and 81,
IPv4 and IPv6. Derandomized, a few examples: it runs in CI.
"""

from __future__ import annotations

import ipaddress
import os
import time

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from conftest import RUN_ID
from netpol_lab import PORTS, NetpolLab, report
from pycni.lab.model import CLUSTER_CIDR, CLUSTER_CIDR6

pytestmark = pytest.mark.netns

EXAMPLES = int(os.environ.get("PYCNI_NETPOL_EXAMPLES", "20"))
NAMESPACES = ("n0", "n1", "n2")
NODES = ("node1", "node2")
POD_NAMES = ("p0", "p1", "p2", "p3", "p4")
NAME_LABEL = "kubernetes.io/metadata.name"

values = st.sampled_from(["a", "b"])
pod_labels = st.fixed_dictionaries({"app": values}, optional={"tier": values})
ns_labels = st.fixed_dictionaries({"team": values}, optional={"env": values})
# Named ports a pod may declare: "web" and "dns" on different ports and protocols per pod.
CONTAINER_PORTS = [
    {"name": "web", "containerPort": 80, "protocol": "TCP"},
    {"name": "web", "containerPort": 81, "protocol": "TCP"},
    {"name": "web", "containerPort": 81, "protocol": "UDP"},
    {"name": "dns", "containerPort": 80, "protocol": "UDP"},
    {"name": "dns", "containerPort": 81, "protocol": "TCP"},
]


@st.composite
def worlds(draw):
    namespaces = {n: draw(ns_labels) for n in NAMESPACES}
    pods = {}
    for name in POD_NAMES[: draw(st.integers(4, 5))]:
        ports = draw(
            st.lists(
                st.sampled_from(CONTAINER_PORTS),
                max_size=2,
                unique_by=lambda p: (p["name"], p["protocol"]),
            )
        )
        pods[name] = {
            "namespace": draw(st.sampled_from(NAMESPACES)),
            "node": draw(st.sampled_from(NODES)),
            "labels": draw(pod_labels),
            "ports": sorted(ports, key=lambda p: (p["name"], p["protocol"])),
        }
    return namespaces, pods


@st.composite
def selectors(draw, keys=("app", "tier")):
    kind = draw(st.sampled_from(["empty", "labels", "expr"]))
    if kind == "empty":
        return {}
    key = draw(st.sampled_from(keys))
    if kind == "labels":
        return {"matchLabels": {key: draw(values)}}
    op = draw(st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]))
    expr = {"key": key, "operator": op}
    if op in ("In", "NotIn"):
        expr["values"] = draw(st.lists(values, min_size=1, max_size=2, unique=True))
    return {"matchExpressions": [expr]}


@st.composite
def peers(draw, blocks):
    kind = draw(st.sampled_from(["pods", "namespaces", "both", "ipBlock"]))
    if kind == "ipBlock":
        return {"ipBlock": draw(st.sampled_from(blocks))}
    peer = {}
    if kind in ("pods", "both"):
        peer["podSelector"] = draw(selectors())
    if kind in ("namespaces", "both"):
        if draw(st.booleans()):
            peer["namespaceSelector"] = draw(selectors(("team", "env")))
        else:  # by name, as upstream's cases do
            peer["namespaceSelector"] = {
                "matchLabels": {NAME_LABEL: draw(st.sampled_from(NAMESPACES))}
            }
    return peer


@st.composite
def ports(draw):
    port: dict = {}
    proto = draw(st.sampled_from([None, "TCP", "UDP"]))
    if proto:
        port["protocol"] = proto
    kind = draw(st.sampled_from(["none", "number", "named", "range"]))
    if kind == "number":
        port["port"] = draw(st.sampled_from(PORTS))
    elif kind == "named":
        port["port"] = draw(st.sampled_from(["web", "dns", "none"]))
    elif kind == "range":
        port["port"], port["endPort"] = draw(st.sampled_from([(80, 81), (81, 90), (70, 80)]))
    return port


@st.composite
def rules(draw, peers_key, blocks):
    rule = {}
    kind = draw(st.sampled_from(["absent", "empty", "list", "list", "list"]))
    if kind != "absent":
        rule[peers_key] = (
            [] if kind == "empty" else draw(st.lists(peers(blocks), min_size=1, max_size=2))
        )
    if draw(st.sampled_from([False, True, True])):
        rule["ports"] = draw(st.lists(ports(), min_size=1, max_size=2))
    return rule


@st.composite
def policies(draw, blocks):
    spec: dict = {"podSelector": draw(selectors())}
    types = draw(st.sampled_from([None, ["Ingress"], ["Egress"], ["Ingress", "Egress"]]))
    if types:
        spec["policyTypes"] = types
    for key, peers_key in (("ingress", "from"), ("egress", "to")):
        kind = draw(st.sampled_from(["absent", "empty", "rules", "rules", "rules"]))
        if kind != "absent":
            spec[key] = (
                []
                if kind == "empty"
                else draw(st.lists(rules(peers_key, blocks), min_size=1, max_size=2))
            )
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "", "namespace": draw(st.sampled_from(NAMESPACES))},
        "spec": spec,
    }


def ip_blocks(lab: NetpolLab, pods: dict[str, dict]) -> list[dict]:
    """ipBlocks over the lab's real addresses: the cluster, a node's pods, single pods (as
    cidr and as except), in both families."""
    nodes = {n.name: n for n in lab.lab().nodes}
    one, two = nodes["node1"], nodes["node2"]
    ips = sorted(ip for p in pods.values() for ip in p["ips"])
    v4 = [ip for ip in ips if ":" not in ip]
    v6 = [ip for ip in ips if ":" in ip]
    blocks = [
        {"cidr": CLUSTER_CIDR, "except": [one.subnet]},
        {"cidr": two.subnet},
        {"cidr": "0.0.0.0/0", "except": [f"{v4[0]}/32"]},
        {"cidr": f"{v4[-1]}/32"},
    ]
    inside = [ip for ip in v4 if ipaddress.ip_address(ip) in ipaddress.ip_network(one.subnet)]
    if inside:  # an except must lie inside its cidr
        blocks.append({"cidr": one.subnet, "except": [f"{inside[0]}/32"]})
    if v6:
        blocks += [
            {"cidr": CLUSTER_CIDR6, "except": [two.subnet6]},
            {"cidr": one.subnet6},
            {"cidr": f"{v6[0]}/128"},
            {"cidr": "::/0", "except": [f"{v6[-1]}/128"]},
        ]
    return blocks


def pod_object(name: str, want: dict) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": want["namespace"], "labels": want["labels"]},
        "spec": {
            "nodeName": want["node"],
            "containers": [{"name": "serve", "image": "pycni-lab/serve", "ports": want["ports"]}],
        },
    }


def make_world(lab: NetpolLab, namespaces: dict[str, dict], pods: dict[str, dict]) -> None:
    """The lab's namespaces and pods as drawn: policies gone, pods that cannot be updated in
    place (another namespace, node or ports) deleted and made anew, the rest relabelled."""
    snap = lab.snapshot()
    doomed = [
        {"apiVersion": p["apiVersion"], "kind": p["kind"], "metadata": p["metadata"]}
        for p in snap.policies
    ]
    wanted = {(w["namespace"], name): pod_object(name, w) for name, w in pods.items()}
    for obj in snap.pods:
        meta = obj["metadata"]
        want = wanted.get((meta["namespace"], meta["name"]))
        same = want is not None and (
            obj["spec"]["nodeName"] == want["spec"]["nodeName"]
            and obj["spec"]["containers"][0].get("ports", [])
            == want["spec"]["containers"][0]["ports"]
        )
        if not same:
            doomed.append({"apiVersion": "v1", "kind": "Pod", "metadata": meta})
    lab.delete(doomed)
    objects = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": n, "labels": labels}}
        for n, labels in namespaces.items()
    ]
    lab.apply(objects + list(wanted.values()))


@pytest.fixture(scope="module")
def small_lab(tmp_path_factory):
    lab = NetpolLab(
        f"pt{RUN_ID}tp", str(tmp_path_factory.mktemp("netpol-property") / "lab"), "vxlan", True
    )
    started = time.monotonic()
    try:
        lab.up()
        yield lab
    finally:
        left = lab.down()
        s = lab.stats
        print(
            f"\nproperty lab ({lab.backend}, dual stack, {lab.datastore}): {s.steps} examples, "
            f"{s.probes} probes ({s.allowed} allowed), {s.matched} matched, {s.retried} probed "
            f"again; {time.monotonic() - started:.1f} s"
        )
        assert not left, f"the lab left {left}"


@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    phases=(Phase.explicit, Phase.generate),  # no shrinking: each example costs a second
    suppress_health_check=list(HealthCheck),
)
@given(data=st.data())
def test_the_enforced_matrix_is_the_evaluators(small_lab: NetpolLab, data):
    lab = small_lab
    namespaces, pods = data.draw(worlds(), label="world")
    make_world(lab, namespaces, pods)
    blocks = ip_blocks(lab, lab.get_pods())
    drawn = data.draw(st.lists(policies(blocks), min_size=1, max_size=3), label="policies")
    for i, p in enumerate(drawn):
        p["metadata"]["name"] = f"p{i}"
    lab.apply(drawn)
    outcome = lab.check()
    assert not outcome.mismatched, (
        f"{len(outcome.mismatched)} of {outcome.probes} probes differ from the evaluator\n"
        + report(outcome, lab.families)
    )
