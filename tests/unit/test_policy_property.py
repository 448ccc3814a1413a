"""Property: for random namespaces, pods and policies (a grammar over every v1 feature), the
interpreter over the engine's compiled rules answers every (source, destination, protocol,
port, family) question as the independent reference evaluator does; and the compiled shape
never depends on pod labels."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pycni.policy.engine import FAMILIES, compile_inventory
from pycni.policy.evaluate import Evaluator
from pycni.policy.interpret import Interpreter
from pycni.policy.objects import ContainerPort, Namespace, Node, Pod, load

NODES = {"n1": ("192.168.0.1", "fd00:ffff::1"), "n2": ("192.168.0.2", "fd00:ffff::2")}
OUTSIDE = ("203.0.113.7", "198.51.100.1", "fd00:1::7")
PROTOCOLS = ("TCP", "UDP", "SCTP")
PORTS = (53, 80, 81)  # 81 is past the end of the ranges 53-80 and 80-80
CIDRS = [
    {"cidr": "10.0.0.0/16"},
    {"cidr": "10.0.0.0/16", "except": ["10.0.1.0/24"]},
    {"cidr": "10.0.1.0/24"},
    {"cidr": "10.0.0.1/32"},
    {"cidr": "0.0.0.0/0", "except": ["10.0.0.0/24", "203.0.113.0/24"]},
    {"cidr": "203.0.113.0/24"},
    {"cidr": "fd00::/64", "except": ["fd00::1:0/112"]},
    {"cidr": "fd00::1:0/112"},
    {"cidr": "::/0"},
]

label_values = st.sampled_from(["a", "b"])
# Labels always present in part, so selectors split the pods rather than miss them all.
labels = st.fixed_dictionaries({"app": label_values}, optional={"tier": label_values})
ns_labels = st.fixed_dictionaries({"team": label_values}, optional={"env": label_values})


@st.composite
def selectors(draw, keys=("app", "tier")):
    kind = draw(st.sampled_from(["empty", "labels", "expr"]))
    if kind == "empty":
        return {}
    key = draw(st.sampled_from(keys))
    if kind == "labels":
        return {"matchLabels": {key: draw(label_values)}}
    op = draw(st.sampled_from(["In", "NotIn", "Exists", "DoesNotExist"]))
    expr = {"key": key, "operator": op}
    if op in ("In", "NotIn"):
        expr["values"] = draw(st.lists(label_values, min_size=1, max_size=2))
    return {"matchExpressions": [expr]}


@st.composite
def peers(draw):
    kind = draw(st.sampled_from(["pods", "namespaces", "both", "ipBlock"]))
    if kind == "ipBlock":
        return {"ipBlock": draw(st.sampled_from(CIDRS))}
    peer = {}
    if kind in ("pods", "both"):
        peer["podSelector"] = draw(selectors())
    if kind in ("namespaces", "both"):
        ns_keys = ("team", "env", "kubernetes.io/metadata.name")
        sel = draw(selectors(ns_keys))
        if "kubernetes.io/metadata.name" in str(sel):  # name it by a real namespace
            sel = {
                "matchLabels": {"kubernetes.io/metadata.name": draw(st.sampled_from(["n0", "n1"]))}
            }
        peer["namespaceSelector"] = sel
    return peer


@st.composite
def ports(draw):
    port: dict = {}
    proto = draw(st.sampled_from([None, *PROTOCOLS]))
    if proto:
        port["protocol"] = proto
    kind = draw(st.sampled_from(["none", "number", "named", "named", "range"]))
    if kind == "number":
        port["port"] = draw(st.sampled_from([53, 80, 81]))
    elif kind == "named":
        port["port"] = draw(st.sampled_from(["web", "dns"]))
    elif kind == "range":
        port["port"], port["endPort"] = draw(st.sampled_from([(80, 81), (53, 80), (80, 80)]))
    return port


@st.composite
def rules(draw, peers_key):
    rule = {}
    # Mostly peer and port lists: an absent or empty one allows every peer or port.
    kind = draw(st.sampled_from(["absent", "empty", "list", "list", "list", "list"]))
    if kind != "absent":
        rule[peers_key] = [] if kind == "empty" else draw(st.lists(peers(), min_size=1, max_size=2))
    if draw(st.sampled_from([False, True, True])):
        rule["ports"] = draw(st.lists(ports(), min_size=1, max_size=2))
    return rule


@st.composite
def policies(draw, namespaces):
    spec: dict = {"podSelector": draw(selectors())}
    types = draw(st.sampled_from([None, ["Ingress"], ["Egress"], ["Ingress", "Egress"]]))
    if types:
        spec["policyTypes"] = types
    for key, peers_key in (("ingress", "from"), ("egress", "to")):
        # Mostly rules (isolating pods with no rule at all is the easy case).
        kind = draw(st.sampled_from(["absent", "empty", "rules", "rules", "rules"]))
        if kind != "absent":
            spec[key] = (
                [] if kind == "empty" else draw(st.lists(rules(peers_key), min_size=1, max_size=2))
            )
    return {
        "metadata": {
            "name": f"p{draw(st.integers(0, 99))}",
            "namespace": draw(st.sampled_from(namespaces)),
        },
        "spec": spec,
    }


@st.composite
def worlds(draw):
    ns_names = [f"n{i}" for i in range(draw(st.integers(2, 3)))]
    namespaces = [Namespace(n, draw(ns_labels)) for n in ns_names]
    pods = []
    for k in range(draw(st.integers(3, 6))):
        node = draw(st.sampled_from(sorted(NODES)))
        n = 1 + sorted(NODES).index(node)
        ips = [f"10.0.{n - 1}.{k + 1}"]
        if draw(st.booleans()):
            ips.append(f"fd00::{n - 1}:{k + 1}")
        container_ports = draw(
            st.lists(
                st.sampled_from(
                    [
                        ContainerPort("web", "TCP", 80),
                        ContainerPort("web", "TCP", 81),
                        ContainerPort("web", "UDP", 80),
                        ContainerPort("dns", "UDP", 53),
                        ContainerPort("dns", "TCP", 53),
                    ]
                ),
                min_size=1,
                max_size=2,
                unique_by=lambda c: (c.name, c.protocol),
            )
        )
        pods.append(
            Pod(
                draw(st.sampled_from(ns_names)),
                f"pod{k}",
                draw(labels),
                node,
                tuple(ips),
                tuple(container_ports),
            )
        )
    if draw(st.booleans()):  # a hostNetwork pod that policies might try to select
        pods.append(Pod(ns_names[0], "hostnet", draw(labels), "n1", NODES["n1"], (), True))
    pols = draw(
        st.lists(policies(ns_names), min_size=1, max_size=3, unique_by=lambda p: str(p["metadata"]))
    )
    return namespaces, pods, pols


def endpoints(pods):
    """(what the evaluator is asked about, the ends as the interpreter sees them per family)."""
    out = []
    for p in pods:
        host = p.node if p.host_network else None
        out.append((p, {f: (_ip(p.ips, f), host) for f in FAMILIES}))
    for name, ips in NODES.items():
        out.append((Node(name, ips), {f: (_ip(ips, f), name) for f in FAMILIES}))
    for ip in OUTSIDE:
        out.append((ip, {f: (_ip((ip,), f), None) for f in FAMILIES}))
    return out


def _ip(ips, family):
    return next((a for a in ips if (":" in a) == (family == 6)), None)


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(worlds())
def test_compiled_rules_agree_with_the_reference_evaluator(world):
    namespaces, pods, pols = world
    inv = load(namespaces, pods, pols)
    assert not inv.problems, inv.problems
    compiled = [compile_inventory(n, inv) for n in NODES]
    assert not any(c.problems for c in compiled)
    evaluator, interpreter = Evaluator(inv), Interpreter(compiled)
    ends = endpoints(inv.pods)
    for src, s_ends in ends:
        for dst, d_ends in ends:
            for family in FAMILIES:
                (s_ip, s_host), (d_ip, d_host) = s_ends[family], d_ends[family]
                if s_ip is None or d_ip is None:
                    continue
                for protocol in PROTOCOLS:
                    for port in PORTS:
                        want = evaluator.allowed(src, dst, protocol, port, family)
                        got = interpreter.allowed(
                            s_ip, d_ip, protocol, port, src_host=s_host, dst_host=d_host
                        )
                        assert got == want, (src, dst, protocol, port, family, pols)


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(worlds(), st.data())
def test_shape_does_not_depend_on_pod_labels(world, data):
    namespaces, pods, pols = world
    relabelled = [
        Pod(p.namespace, p.name, data.draw(labels), p.node, p.ips, p.ports, p.host_network)
        for p in pods
    ]
    for node in NODES:
        before = compile_inventory(node, load(namespaces, pods, pols))
        after = compile_inventory(node, load(namespaces, relabelled, pols))
        assert before.shape() == after.shape()
        # The per-pod isolation lists say what the target sets say.
        for pod in after.pods:
            for direction in ("ingress", "egress"):
                listed = {str(i) for i in getattr(pod, direction)}
                targeted = {
                    str(cp.id)
                    for cp in after.policies
                    if getattr(cp, direction) is not None
                    and any(
                        ip in after.elements(cp.targets.v4) + after.elements(cp.targets.v6)
                        for ip in pod.ips
                    )
                }
                assert listed == targeted
