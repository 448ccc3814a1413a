"""Parsing, validation and defaulting of policy inputs (pycni.policy.objects): every invalid
object becomes a problem naming the object and the field, and nothing raises out of ``load``
or ``compile_node``."""

from __future__ import annotations

import copy
import ipaddress

import pytest

from pycni.policy.engine import compile_node
from pycni.policy.objects import (
    EGRESS,
    INGRESS,
    NAMESPACE_NAME_LABEL,
    ContainerPort,
    IPBlock,
    Namespace,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyError,
    PolicyPort,
    PolicyRule,
    load,
    parse_namespace,
    parse_pod,
    parse_policy,
)
from pycni.policy.selectors import LabelSelector

KUBECTL_POLICY = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "test-network-policy", "namespace": "default", "uid": "u-1"},
    "spec": {
        "podSelector": {"matchLabels": {"role": "db"}},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [
            {
                "from": [
                    {"ipBlock": {"cidr": "172.17.0.0/16", "except": ["172.17.1.0/24"]}},
                    {"namespaceSelector": {"matchLabels": {"project": "myproject"}}},
                    {"podSelector": {"matchLabels": {"role": "frontend"}}},
                ],
                "ports": [{"protocol": "TCP", "port": 6379}],
            }
        ],
        "egress": [
            {
                "to": [{"ipBlock": {"cidr": "10.0.0.0/24"}}],
                "ports": [{"protocol": "TCP", "port": 32000, "endPort": 32768}],
            }
        ],
    },
}

KUBECTL_POD = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "web-1", "namespace": "shop", "labels": {"app": "web"}},
    "spec": {
        "nodeName": "node1",
        "containers": [
            {
                "name": "web",
                "ports": [
                    {"name": "http", "containerPort": 8080, "protocol": "TCP"},
                    {"containerPort": 9090},
                ],
            },
            {"name": "dns", "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"}]},
        ],
    },
    "status": {
        "phase": "Running",
        "podIP": "10.244.1.5",
        "podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00:10:244:1::0005"}],
    },
}


def test_parse_kubectl_policy():
    pol = parse_policy(KUBECTL_POLICY)
    assert (pol.namespace, pol.name) == ("default", "test-network-policy")
    assert pol.pod_selector == LabelSelector((("role", "db"),))
    assert pol.policy_types == (INGRESS, EGRESS)
    (rule,) = pol.ingress
    block = IPBlock(ipaddress.ip_network("172.17.0.0/16"), (ipaddress.ip_network("172.17.1.0/24"),))
    assert rule.peers == (
        Peer(ip_block=block),
        Peer(namespace_selector=LabelSelector((("project", "myproject"),))),
        Peer(pod_selector=LabelSelector((("role", "frontend"),))),
    )
    assert rule.ports == (PolicyPort("TCP", 6379),)
    assert pol.egress[0].ports == (PolicyPort("TCP", 32000, 32768),)


def test_parse_kubectl_pod():
    pod = parse_pod(KUBECTL_POD)
    assert pod.key == "shop/web-1" and pod.node == "node1" and pod.labels == {"app": "web"}
    assert pod.ips == ("10.244.1.5", "fd00:10:244:1::5")  # normalised
    assert pod.ports == (
        ContainerPort("http", "TCP", 8080),
        ContainerPort("", "TCP", 9090),
        ContainerPort("dns", "UDP", 53),
    )
    assert not pod.host_network


def test_finished_pods_hold_no_addresses():
    for phase in ("Succeeded", "Failed"):
        data = copy.deepcopy(KUBECTL_POD)
        data["status"]["phase"] = phase
        assert parse_pod(data).ips == ()


def test_pod_ip_fallback_and_host_network():
    data = copy.deepcopy(KUBECTL_POD)
    del data["status"]["podIPs"]
    data["spec"]["hostNetwork"] = True
    pod = parse_pod(data)
    assert pod.ips == ("10.244.1.5",) and pod.host_network


def test_namespace_gets_its_name_label():
    ns = parse_namespace({"metadata": {"name": "x", "labels": {"team": "a"}}})
    assert ns.labels == {"team": "a", NAMESPACE_NAME_LABEL: "x"}
    assert Namespace("y").labels == {NAMESPACE_NAME_LABEL: "y"}
    inv = load([], [], [])
    assert inv.namespace_labels("unknown") == {NAMESPACE_NAME_LABEL: "unknown"}


@pytest.mark.parametrize(
    "spec,types",
    [
        ({}, (INGRESS,)),
        ({"ingress": [{}]}, (INGRESS,)),
        # Egress is defaulted in only when there are egress rules; Ingress always.
        ({"egress": [{}]}, (INGRESS, EGRESS)),
        ({"egress": []}, (INGRESS,)),
        ({"policyTypes": [], "egress": [{}]}, (INGRESS, EGRESS)),
        ({"policyTypes": ["Egress"]}, (EGRESS,)),
        ({"policyTypes": ["Egress"], "ingress": [{}]}, (EGRESS,)),
        ({"policyTypes": ["Ingress", "Ingress"]}, (INGRESS,)),
    ],
)
def test_policy_types_defaults(spec, types):
    pol = parse_policy({"metadata": {"name": "p", "namespace": "x"}, "spec": spec})
    assert pol.policy_types == types
    assert NetworkPolicy("x", "p", egress=pol.egress, policy_types=None).policy_types == (
        (INGRESS, EGRESS) if pol.egress else (INGRESS,)
    )


def test_from_missing_empty_and_rules():
    def spec(ingress):
        return parse_policy({"metadata": {"name": "p"}, "spec": {"ingress": ingress}})

    assert spec(None).ingress == ()  # no rules: allows nothing
    assert spec([]).ingress == ()
    assert spec([{}]).ingress == (PolicyRule(),)  # the empty rule: allows everything
    assert spec([{"from": []}]).ingress == (PolicyRule(),)  # from: [] is every source
    assert spec([{"from": None, "ports": None}]).ingress == (PolicyRule(),)
    assert spec(None).namespace == "default"


def bad(spec_or_policy: dict, *, whole: bool = False) -> dict:
    if whole:
        return spec_or_policy
    return {"metadata": {"name": "bad", "namespace": "x"}, "spec": spec_or_policy}


def ingress_from(peer: dict) -> dict:
    return {"ingress": [{"from": [peer]}]}


def ingress_port(port: dict) -> dict:
    return {"ingress": [{"ports": [port]}]}


INVALID_POLICIES = [
    # selectors
    (
        {"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}},
        "spec.podSelector.matchExpressions[0].operator",
    ),
    (
        ingress_from({"podSelector": {"matchExpressions": [{"key": "a", "operator": "NotIn"}]}}),
        "spec.ingress[0].from[0].podSelector.matchExpressions[0].values",
    ),
    (
        ingress_from({"namespaceSelector": {"matchLabels": {"a": ["b"]}}}),
        "spec.ingress[0].from[0].namespaceSelector.matchLabels.a",
    ),
    # peers
    (ingress_from({}), "spec.ingress[0].from[0]"),
    (
        ingress_from({"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}),
        "spec.ingress[0].from[0]",
    ),
    (ingress_from({"ipBlock": {"cidr": "10.0.0.300/8"}}), "spec.ingress[0].from[0].ipBlock.cidr"),
    (ingress_from({"ipBlock": {"cidr": "10.0.0.0"}}), "spec.ingress[0].from[0].ipBlock.cidr"),
    (ingress_from({"ipBlock": {}}), "spec.ingress[0].from[0].ipBlock.cidr"),
    (
        ingress_from({"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.1.0.0/24"]}}),
        "spec.ingress[0].from[0].ipBlock.except[0]",
    ),
    (
        ingress_from({"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.0.0/16"]}}),
        "spec.ingress[0].from[0].ipBlock.except[0]",
    ),
    (
        ingress_from({"ipBlock": {"cidr": "10.0.0.0/16", "except": ["fd00::/64"]}}),
        "spec.ingress[0].from[0].ipBlock.except[0]",
    ),
    (
        ingress_from({"ipBlock": {"cidr": "fd00::/48", "except": ["fd00::/16"]}}),
        "spec.ingress[0].from[0].ipBlock.except[0]",
    ),
    (ingress_from({"pods": {}}), "spec.ingress[0].from[0].pods"),
    # ports
    (ingress_port({"endPort": 90}), "spec.ingress[0].ports[0].endPort"),
    (ingress_port({"port": 90, "endPort": 80}), "spec.ingress[0].ports[0].endPort"),
    (ingress_port({"port": "http", "endPort": 80}), "spec.ingress[0].ports[0].endPort"),
    (ingress_port({"port": 80, "endPort": 70000}), "spec.ingress[0].ports[0].endPort"),
    (ingress_port({"port": 0}), "spec.ingress[0].ports[0].port"),
    (ingress_port({"port": 65536}), "spec.ingress[0].ports[0].port"),
    (ingress_port({"port": True}), "spec.ingress[0].ports[0].port"),
    (ingress_port({"port": 80.5}), "spec.ingress[0].ports[0].port"),
    (ingress_port({"port": "80"}), "spec.ingress[0].ports[0].port"),  # names need a letter
    (ingress_port({"port": "Http"}), "spec.ingress[0].ports[0].port"),
    (ingress_port({"port": "a-very-long-port-name"}), "spec.ingress[0].ports[0].port"),
    (ingress_port({"protocol": "ICMP"}), "spec.ingress[0].ports[0].protocol"),
    (ingress_port({"protocol": "tcp", "port": 80}), "spec.ingress[0].ports[0].protocol"),
    ({"egress": [{"ports": [{"protocol": "GRE"}]}]}, "spec.egress[0].ports[0].protocol"),
    # policyTypes and structure
    ({"policyTypes": ["Inbound"]}, "spec.policyTypes[0]"),
    ({"policyTypes": ["Ingress", "Egress", "Ingress"]}, "spec.policyTypes"),
    ({"ingress": {"from": []}}, "spec.ingress"),
    ({"ingress": [{"from": {"podSelector": {}}}]}, "spec.ingress[0].from"),
    ({"ingress": [[]]}, "spec.ingress[0]"),
    ({"egress": [{"from": []}]}, "spec.egress[0].from"),  # egress peers are "to"
    ({"podSelector": "all"}, "spec.podSelector"),
    ({"priority": 1}, "spec.priority"),
]


@pytest.mark.parametrize("spec,field", INVALID_POLICIES, ids=[f for _, f in INVALID_POLICIES])
def test_invalid_policy_names_object_and_field(spec, field):
    with pytest.raises(PolicyError) as exc:
        parse_policy(bad(spec))
    p = exc.value.problem
    assert (p.kind, p.namespace, p.name, p.field) == ("NetworkPolicy", "x", "bad", field)
    assert "x/bad" in str(exc.value) and field in str(exc.value)
    # The same input through load / compile_node: reported, left out, no exception.
    good = {"metadata": {"name": "good", "namespace": "x"}, "spec": {}}
    inv = load([], [], [bad(spec), good])
    assert [pol.name for pol in inv.policies] == ["good"]
    assert [pr.field for pr in inv.problems] == [field]
    node = compile_node("n1", [], [], [bad(spec), good])
    assert [str(c.id) for c in node.policies] == ["x/good"]
    assert node.problems == inv.problems


@pytest.mark.parametrize(
    "obj,field",
    [
        ({"spec": {}}, "metadata"),
        ({"metadata": {"namespace": "x"}}, "metadata.name"),
        ({"metadata": {"name": "p", "namespace": 5}}, "metadata.namespace"),
        ({"metadata": {"name": "p", "labels": ["a"]}}, "metadata.labels"),
        ({"metadata": {"name": "p"}, "spec": []}, "spec"),
        ({"kind": "Service", "metadata": {"name": "p"}}, "kind"),
        ({"apiVersion": "extensions/v1beta1", "metadata": {"name": "p"}}, "apiVersion"),
    ],
)
def test_invalid_policy_objects(obj, field):
    with pytest.raises(PolicyError) as exc:
        parse_policy(obj)
    assert exc.value.problem.field == field and exc.value.problem.kind == "NetworkPolicy"


@pytest.mark.parametrize(
    "change,field",
    [
        (lambda d: d["status"].update(podIPs=[{"ip": "10.244.1.500"}]), "status.podIPs[0].ip"),
        (lambda d: d["status"].update(podIPs="10.0.0.1"), "status.podIPs"),
        (
            lambda d: d["spec"]["containers"][0]["ports"][0].update(containerPort=0),
            "spec.containers[0].ports[0].containerPort",
        ),
        (
            lambda d: d["spec"]["containers"][0]["ports"][0].update(protocol="ICMP"),
            "spec.containers[0].ports[0].protocol",
        ),
        (
            lambda d: d["spec"]["containers"][0]["ports"][0].update(name="HTTP"),
            "spec.containers[0].ports[0].name",
        ),
        (lambda d: d["spec"].update(hostNetwork="yes"), "spec.hostNetwork"),
        (lambda d: d["spec"].update(nodeName=3), "spec.nodeName"),
        (lambda d: d["spec"].update(containers={}), "spec.containers"),
        (lambda d: d["metadata"]["labels"].update(app=1), "metadata.labels"),
    ],
)
def test_invalid_pods(change, field):
    data = copy.deepcopy(KUBECTL_POD)
    change(data)
    with pytest.raises(PolicyError) as exc:
        parse_pod(data)
    p = exc.value.problem
    assert (p.kind, p.namespace, p.name, p.field) == ("Pod", "shop", "web-1", field)


@pytest.mark.parametrize("junk", [None, "policy", 3, [], ["a"], {"metadata": None}])
def test_junk_never_raises(junk):
    inv = load([junk], [junk], [junk])
    assert len(inv.problems) == 3
    assert {p.kind for p in inv.problems} == {"Namespace", "Pod", "NetworkPolicy"}
    node = compile_node("n1", [junk], [junk], [junk])
    assert node.policies == () and node.pods == () and len(node.problems) == 3


def test_duplicates_and_shared_addresses_are_reported():
    pods = [
        Pod("x", "a", node="n1", ips=("10.0.0.1",)),
        Pod("x", "a", node="n1", ips=("10.0.0.9",)),
        Pod("x", "b", node="n1", ips=("10.0.0.1", "fd00::1")),
    ]
    pols = [NetworkPolicy("x", "p"), {"metadata": {"name": "p", "namespace": "x"}}]
    inv = load([], pods, pols)
    assert [p.ips for p in inv.pods] == [("10.0.0.1",), ("fd00::1",)]
    assert len(inv.policies) == 1
    fields = sorted(p.field for p in inv.problems)
    assert fields == ["metadata.name", "metadata.name", "status.podIPs"]


def test_host_network_pods_claim_no_address():
    pods = [
        Pod("x", "host", node="n1", ips=("192.168.0.1",), host_network=True),
        Pod("y", "host", node="n1", ips=("192.168.0.1",), host_network=True),
    ]
    inv = load([], pods, [])
    assert not inv.problems and all(p.ips == ("192.168.0.1",) for p in inv.pods)


def test_objects_accept_ready_made_instances():
    rule = PolicyRule(ports=(PolicyPort("UDP", 53),))
    pol = NetworkPolicy("x", "dns", egress=(rule,))
    inv = load([Namespace("x")], [Pod("x", "a")], [pol])
    assert inv.policies == (pol,) and pol.policy_types == (INGRESS, EGRESS)
