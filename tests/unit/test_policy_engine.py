"""The policy engine's compiled form (pycni.policy.engine): targets, rules, named sets, ports,
named ports, dual stack, shape stability, hostNetwork and address-less pods, sizes."""

from __future__ import annotations

import ipaddress

from pycni.policy.engine import (
    CidrPeer,
    NodePolicy,
    PolicyId,
    PortRange,
    Rule,
    SetPeer,
    compile_node,
)
from pycni.policy.objects import ContainerPort, Namespace, Pod

NAMESPACES = [Namespace("x", {"team": "blue"}), Namespace("y", {"team": "red"})]


def pods() -> list[Pod]:
    web = ContainerPort("web", "TCP", 8080)
    return [
        Pod("x", "a", {"app": "a"}, "n1", ("10.0.1.1", "fd00::1:1"), (web,)),
        Pod("x", "b", {"app": "b"}, "n1", ("10.0.1.2",), (ContainerPort("web", "TCP", 9090),)),
        Pod("x", "c", {"app": "c"}, "n2", ("10.0.2.1", "fd00::2:1"), (web,)),
        Pod("y", "a", {"app": "a"}, "n1", ("10.0.1.3",)),
        Pod("y", "b", {"app": "b"}, "n2", ("10.0.2.2",), (ContainerPort("web", "UDP", 53),)),
    ]


def pol(name: str, spec: dict, namespace: str = "x") -> dict:
    return {"metadata": {"name": name, "namespace": namespace}, "spec": spec}


def compile1(policies, node="n1", the_pods=None) -> NodePolicy:
    out = compile_node(node, NAMESPACES, pods() if the_pods is None else the_pods, policies)
    assert not out.problems, out.problems
    return out


def members(out: NodePolicy, ref) -> set[str]:
    return set(out.elements(ref.v4)) | set(out.elements(ref.v6))


def test_empty_pod_selector_targets_local_pods_of_its_namespace():
    out = compile1([pol("deny", {"podSelector": {}})])
    (cp,) = out.policies
    assert cp.id == PolicyId("x", "deny")
    assert members(out, cp.targets) == {"10.0.1.1", "fd00::1:1", "10.0.1.2"}  # not n2's x/c
    assert cp.ingress == () and cp.egress is None
    by_name = {p.name if p.namespace == "x" else "y/" + p.name: p for p in out.pods}
    assert by_name["a"].ingress == (cp.id,) and by_name["a"].egress == ()
    assert by_name["y/a"].ingress == ()  # other namespace: not isolated
    assert [p.namespace + "/" + p.name for p in out.pods] == ["x/a", "x/b", "y/a"]


def test_policy_types_defaults_in_compiled_form():
    only_egress_rules = compile1([pol("p", {"podSelector": {}, "egress": [{}]})]).policies[0]
    assert only_egress_rules.ingress == ()  # isolated for ingress, nothing allowed
    assert only_egress_rules.egress == (Rule(0, None, None),)
    egress_type = compile1(
        [pol("p", {"podSelector": {}, "policyTypes": ["Egress"], "ingress": [{}]})]
    ).policies[0]
    assert egress_type.ingress is None and egress_type.egress == ()


def test_empty_rule_missing_from_and_empty_from_allow_every_source():
    out = compile1(
        [
            pol(
                "p",
                {
                    "podSelector": {},
                    "ingress": [{}, {"from": []}, {"from": [], "ports": []}],
                },
            )
        ]
    )
    assert out.policies[0].ingress == (
        Rule(0, None, None),
        Rule(1, None, None),
        Rule(2, None, None),
    )


def test_peers_become_shared_sets():
    peer_b = {"podSelector": {"matchLabels": {"app": "b"}}}
    out = compile1(
        [
            pol(
                "one",
                {"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{"from": [peer_b]}]},
            ),
            pol("two", {"podSelector": {}, "ingress": [{"from": [peer_b]}]}),
            pol("other-ns", {"podSelector": {}, "ingress": [{"from": [peer_b]}]}, "y"),
        ]
    )
    one, two, other = out.policies
    assert one.ingress[0].peers == two.ingress[0].peers  # equal peers share a set
    (sp,) = one.ingress[0].peers
    assert isinstance(sp, SetPeer) and members(out, sp.sets) == {"10.0.1.2"}
    (sp_y,) = other.ingress[0].peers
    assert sp_y != sp and members(out, sp_y.sets) == {"10.0.2.2"}  # relative to namespace y
    assert sp.sets.v4.startswith("p4_") and sp.sets.v6.startswith("p6_")
    assert len(sp.sets.v4) == 13
    assert one.targets != two.targets


def test_namespace_selector_sets_are_independent_of_the_policy_namespace():
    peer = {"namespaceSelector": {"matchLabels": {"team": "red"}}}
    out = compile1(
        [
            pol("p", {"podSelector": {}, "ingress": [{"from": [peer]}]}, "x"),
            pol("p", {"podSelector": {}, "ingress": [{"from": [peer]}]}, "y"),
        ]
    )
    px, py = (p.ingress[0].peers[0] for p in out.policies)
    assert px == py and members(out, px.sets) == {"10.0.1.3", "10.0.2.2"}


def test_namespace_selector_empty_vs_absent_and_and_vs_or():
    app_a = {"matchLabels": {"app": "a"}}
    out = compile1(
        [
            pol(
                "p",
                {
                    "podSelector": {},
                    "ingress": [
                        {"from": [{"podSelector": app_a}]},
                        {"from": [{"podSelector": app_a, "namespaceSelector": {}}]},
                        {"from": [{"namespaceSelector": {}}]},
                        {
                            "from": [
                                {
                                    "podSelector": app_a,
                                    "namespaceSelector": {"matchLabels": {"team": "red"}},
                                }
                            ]
                        },
                        {
                            "from": [
                                {"podSelector": app_a},
                                {"namespaceSelector": {"matchLabels": {"team": "red"}}},
                            ]
                        },
                    ],
                },
            )
        ]
    )
    r = out.policies[0].ingress
    assert members(out, r[0].peers[0].sets) == {"10.0.1.1", "fd00::1:1"}  # x/a only
    assert members(out, r[1].peers[0].sets) == {"10.0.1.1", "fd00::1:1", "10.0.1.3"}  # any ns
    assert len(members(out, r[2].peers[0].sets)) == 7  # every pod address
    assert members(out, r[3].peers[0].sets) == {"10.0.1.3"}  # AND: app=a in red
    assert len(r[4].peers) == 2  # OR: two sets
    assert members(out, r[4].peers[1].sets) == {"10.0.1.3", "10.0.2.2"}


def test_ip_blocks_with_excepts_in_both_families():
    out = compile1(
        [
            pol(
                "p",
                {
                    "podSelector": {},
                    "policyTypes": ["Egress"],
                    "egress": [
                        {
                            "to": [
                                {
                                    "ipBlock": {
                                        "cidr": "10.0.0.0/8",
                                        "except": ["10.0.1.0/24", "10.0.0.0/16"],
                                    }
                                },
                                {"ipBlock": {"cidr": "fd00::/64", "except": ["fd00::1:0/112"]}},
                            ]
                        }
                    ],
                },
            )
        ]
    )
    v4, v6 = out.policies[0].egress[0].peers
    assert isinstance(v4, CidrPeer) and v4.family == 4 and v6.family == 6
    nets = v4.networks()  # the interval form: cidr minus excepts, disjoint

    def inside(ip: str) -> bool:
        return any(ipaddress.ip_address(ip) in n for n in nets)

    assert inside("10.1.0.1") and inside("10.255.255.255")
    assert not inside("10.0.1.5") and not inside("10.0.200.5") and not inside("11.0.0.1")
    assert sum(n.num_addresses for n in nets) == 2**24 - 2**16
    assert sum(n.num_addresses for n in v6.networks()) == 2**64 - 2**16
    # ipBlocks need no address sets: only the policy's targets are sets.
    assert all(s.name.startswith("t") for s in out.address_sets)


def test_ports_protocols_ranges_and_merging():
    out = compile1(
        [
            pol(
                "p",
                {
                    "podSelector": {},
                    "ingress": [
                        {
                            "ports": [
                                {"port": 80},
                                {"port": 81, "endPort": 90},
                                {"protocol": "UDP", "port": 53},
                                {"protocol": "SCTP"},
                                {"port": 85, "endPort": 100},
                                {"protocol": "UDP", "port": 53},
                            ]
                        }
                    ],
                },
            )
        ]
    )
    (rule,) = out.policies[0].ingress
    assert rule.peers is None and rule.named_ports == ()
    assert rule.ports == (
        PortRange("SCTP", 0, 65535),
        PortRange("TCP", 80, 100),
        PortRange("UDP", 53, 53),
    )


def test_named_ports_resolve_on_the_destination():
    spec = {
        "podSelector": {},
        "ingress": [{"ports": [{"port": "web"}, {"port": 22}]}],
        "egress": [{"ports": [{"port": "web"}]}],
    }
    out = compile1([pol("p", spec)])
    cp = out.policies[0]
    (ing,) = cp.ingress
    assert ing.ports == (PortRange("TCP", 22, 22),)
    (named,) = ing.named_ports
    assert named.protocol == "TCP" and named.name == "web"
    # Ingress: the destination is the local target, so only this node's pods.
    assert set(out.elements(named.sets.v4)) == {("10.0.1.1", 8080), ("10.0.1.2", 9090)}
    assert set(out.elements(named.sets.v6)) == {("fd00::1:1", 8080)}
    # Egress: the destination is any pod; each maps the name to its own number, and a port
    # named "web" over UDP (y/b) is not the TCP one.
    (eg,) = cp.egress
    (enamed,) = eg.named_ports
    assert enamed.sets != named.sets and eg.ports == ()
    assert set(out.elements(enamed.sets.v4)) == {
        ("10.0.1.1", 8080),
        ("10.0.1.2", 9090),
        ("10.0.2.1", 8080),
    }
    assert out.port_set(enamed.sets.v6).protocol == "TCP"


def test_several_policies_on_one_pod_are_listed():
    out = compile1(
        [
            pol("a-in", {"podSelector": {"matchLabels": {"app": "a"}}, "ingress": [{}]}),
            pol("all-in-out", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}),
        ]
    )
    xa = out.pods[0]
    assert xa.ingress == (PolicyId("x", "a-in"), PolicyId("x", "all-in-out"))
    assert xa.egress == (PolicyId("x", "all-in-out"),)


def test_dual_stack_sets_are_family_specific():
    out = compile1(
        [pol("p", {"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {}}]}]})]
    )
    for s in out.address_sets:
        assert all(ipaddress.ip_address(e).version == s.family for e in s.elements)
        assert s.name[1] == str(s.family)


def test_label_changes_move_set_members_not_rules():
    policies = [
        pol(
            "p",
            {
                "podSelector": {"matchLabels": {"app": "a"}},
                "ingress": [
                    {
                        "from": [{"podSelector": {"matchLabels": {"app": "b"}}}],
                        "ports": [{"port": "web"}],
                    }
                ],
                "egress": [{"to": [{"namespaceSelector": {"matchLabels": {"team": "red"}}}]}],
            },
        )
    ]
    before = compile1(policies)
    relabelled = pods()
    relabelled[0] = Pod("x", "a", {"app": "b"}, "n1", relabelled[0].ips, relabelled[0].ports)
    relabelled[1] = Pod("x", "b", {"app": "a"}, "n1", relabelled[1].ips, relabelled[1].ports)
    relabelled.append(Pod("y", "new", {}, "n2", ("10.0.2.9",)))
    del relabelled[3]
    after = compile1(policies, the_pods=relabelled)
    assert after.shape() == before.shape()
    cp = after.policies[0]
    assert members(after, cp.targets) == {"10.0.1.2"}
    assert members(before, cp.targets) == {"10.0.1.1", "fd00::1:1"}
    assert members(after, cp.egress[0].peers[0].sets) == {"10.0.2.2", "10.0.2.9"}
    # Policies without local targets are compiled too, so a pod arriving changes no shape.
    other_node = compile1(policies, node="n2")
    assert other_node.shape()[0] == before.shape()[0]
    assert other_node.policy_sizes()["x/p"]["targets"] == 0


def test_host_network_and_addressless_pods():
    the_pods = pods() + [
        Pod(
            "x",
            "host",
            {"app": "a"},
            "n1",
            ("192.168.0.1",),
            (ContainerPort("web", "TCP", 1),),
            True,
        ),
        Pod("x", "pending", {"app": "a"}, "n1"),
        Pod("x", "elsewhere", {"app": "a"}, "n2"),
    ]
    out = compile1(
        [
            pol(
                "p",
                {
                    "podSelector": {},
                    "ingress": [{"from": [{"namespaceSelector": {}}], "ports": [{"port": "web"}]}],
                },
            )
        ],
        the_pods=the_pods,
    )
    everything = {e for s in out.address_sets for e in s.elements}
    assert "192.168.0.1" not in everything
    assert all(e[0] != "192.168.0.1" for s in out.port_sets for e in s.elements)
    assert [p.name for p in out.pods if p.namespace == "x"] == ["a", "b"]
    assert out.waiting == ("x/pending",)


def test_deterministic_output():
    policies = [
        pol("p", {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
        pol(
            "q",
            {
                "podSelector": {"matchLabels": {"app": "a"}},
                "egress": [{"ports": [{"port": "web"}]}],
            },
        ),
    ]
    a = compile_node("n1", NAMESPACES, pods(), policies)
    b = compile_node(
        "n1", list(reversed(NAMESPACES)), list(reversed(pods())), list(reversed(policies))
    )
    assert a == b


def test_sizes():
    out = compile1(
        [
            pol(
                "p",
                {
                    "podSelector": {"matchLabels": {"app": "a"}},
                    "ingress": [{"from": [{"podSelector": {}}]}],
                },
            ),
            pol("q", {"podSelector": {"matchLabels": {"app": "zzz"}}, "policyTypes": ["Egress"]}),
        ]
    )
    sizes = out.sizes()
    assert sizes["pods"] == 3 and sizes["isolated_ingress"] == 1 and sizes["isolated_egress"] == 0
    assert sizes["policies"] == 2 and sizes["active_policies"] == 1 and sizes["rules"] == 1
    assert sizes["address_sets"] == 6  # targets of p and q, one peer set: two families each
    assert sizes["address_elements"] == 2 + 5  # x/a (targets), all five addresses of x
    assert sizes["problems"] == 0
    assert out.policy_sizes() == {
        "x/p": {"targets": 2, "ingress_rules": 1, "egress_rules": 0},
        "x/q": {"targets": 0, "ingress_rules": 0, "egress_rules": 0},
    }
    assert len(PolicyId("x", "p").key) == 10


def test_replicas_sharing_labels_fill_sets_alike_in_numeric_order():
    """Pods with equal labels are matched as one group (each selector once per distinct
    namespace and labels): every replica lands in the sets, a same-labelled pod of another
    namespace only where its namespace is selected, and elements keep numeric order."""
    web = ContainerPort("web", "TCP", 8080)
    replicas = [
        Pod("x", f"r{ip}", {"app": "r"}, "n1", (f"10.0.1.{ip}",), (web,)) for ip in (100, 9, 10)
    ]
    twin = Pod("y", "r", {"app": "r"}, "n1", ("10.0.1.50",), (web,))
    out = compile1(
        [
            pol(
                "from-r",
                {
                    "podSelector": {"matchLabels": {"app": "r"}},
                    "ingress": [
                        {
                            "from": [{"podSelector": {"matchLabels": {"app": "r"}}}],
                            "ports": [{"port": "web"}],
                        }
                    ],
                },
            ),
            pol("same-peer", {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}}]}]}),
        ],
        the_pods=[*replicas, twin],
    )
    from_r, _ = out.policies
    assert out.elements(from_r.targets.v4) == ("10.0.1.9", "10.0.1.10", "10.0.1.100")
    (rule,) = from_r.ingress
    (peer,) = rule.peers
    assert out.elements(peer.sets.v4) == ("10.0.1.9", "10.0.1.10", "10.0.1.100")  # not y/r
    (named,) = rule.named_ports
    assert out.elements(named.sets.v4) == (
        ("10.0.1.9", 8080),
        ("10.0.1.10", 8080),
        ("10.0.1.50", 8080),
        ("10.0.1.100", 8080),
    )
    isolated = {p.namespace + "/" + p.name: p.ingress for p in out.pods}
    assert all(len(isolated[f"x/r{ip}"]) == 2 for ip in (100, 9, 10))
    assert isolated["y/r"] == ()
