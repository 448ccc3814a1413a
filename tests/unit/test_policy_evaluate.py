"""The reference evaluator's edges (pycni.policy.evaluate) and the interpreter over compiled
rules (pycni.policy.interpret) agreeing with it: the node itself, hostNetwork pods, outside
addresses, pods without addresses, dual stack, named ports on egress."""

from __future__ import annotations

from policy_world import NODE_IPS, World, policy, world_pods
from pycni.policy.evaluate import allowed
from pycni.policy.objects import ContainerPort, Node, Pod

DENY_ALL_X = policy("deny", "x", {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]})


def both(world: World, src, dst, protocol="TCP", port=80, family=4) -> bool:
    """The evaluator's answer, after checking the interpreter gives the same."""
    want = world.evaluator.allowed(src, dst, protocol, port, family)

    def end(e):
        if isinstance(e, Node):
            return next(a for a in e.ips if (":" in a) == (family == 6)), e.name
        if isinstance(e, Pod):
            if e.host_network:
                return next(a for a in e.ips if (":" in a) == (family == 6)), e.node
            return next(a for a in e.ips if (":" in a) == (family == 6)), None
        return str(e), None

    (s_ip, s_host), (d_ip, d_host) = end(src), end(dst)
    got = world.interpreter.allowed(s_ip, d_ip, protocol, port, src_host=s_host, dst_host=d_host)
    assert got == want, (src, dst, protocol, port, family)
    return want


def test_node_to_its_own_pods_always_allowed():
    w = World([DENY_ALL_X])
    xa = w.pods["x/a"]
    own, other = w.node(xa.node), w.node("node2" if xa.node == "node1" else "node1")
    assert both(w, own, xa) and both(w, xa, own)  # kubelet probes, and back
    assert not both(w, other, xa) and not both(w, xa, other)
    assert both(w, own, xa, "UDP", 53, 6)


def test_other_nodes_are_plain_addresses_to_ip_blocks():
    node2 = NODE_IPS["node2"][0]
    p = policy(
        "from-node2",
        "x",
        {"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": f"{node2}/32"}}]}]},
    )
    w = World([p])
    on_node1 = [k for k, v in w.pods.items() if v.namespace == "x" and v.node == "node1"]
    assert on_node1
    assert both(w, w.node("node2"), w.pods[on_node1[0]])


def test_host_network_pods_are_their_node():
    host = Pod("x", "h", {"pod": "a"}, "node1", NODE_IPS["node1"], (), True)
    w = World([DENY_ALL_X], pods=world_pods() + [host])
    xa, xb, ya = w.pods["x/a"], w.pods["x/b"], w.pods["y/a"]
    assert (xa.node, xb.node, ya.node) == ("node1", "node2", "node2")
    # The policy's podSelector {} does not select it: its egress is not isolated...
    assert both(w, host, ya)
    # ...to a pod of its own node it is the node; to one of another node, the node's address.
    assert both(w, host, xa)
    assert not both(w, host, xb)
    from_everywhere = policy(
        "from-all-pods",
        "y",
        {"podSelector": {}, "ingress": [{"from": [{"podSelector": {}, "namespaceSelector": {}}]}]},
    )
    w2 = World([from_everywhere], pods=world_pods() + [host])
    # A selector peer never names a hostNetwork pod: it is not in any pod set.
    assert not both(w2, host, w2.pods["y/a"])
    assert both(w2, w2.pods["x/a"], w2.pods["y/a"])


def test_outside_addresses():
    p = policy(
        "egress",
        "x",
        {
            "podSelector": {},
            "policyTypes": ["Egress"],
            "egress": [
                {"to": [{"ipBlock": {"cidr": "203.0.113.0/24", "except": ["203.0.113.128/25"]}}]}
            ],
        },
    )
    w = World([p])
    xa, ya = w.pods["x/a"], w.pods["y/a"]
    assert both(w, xa, "203.0.113.5")
    assert not both(w, xa, "203.0.113.200")
    assert not both(w, xa, "198.51.100.1")
    assert both(w, ya, "198.51.100.1")  # y is not isolated
    assert both(w, "198.51.100.1", xa)  # x is not isolated for ingress
    assert both(w, "198.51.100.1", "203.0.113.1")  # no pod at either end


def test_addresses_of_pods_stand_for_the_pods():
    w = World(
        [
            policy(
                "p",
                "x",
                {
                    "podSelector": {},
                    "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}]}],
                },
            )
        ]
    )
    ya_ip, xa_ip, za_ip = w.pods["y/a"].ips[0], w.pods["x/a"].ips[0], w.pods["z/a"].ips[0]
    assert both(w, ya_ip, xa_ip) and not both(w, za_ip, xa_ip)


def test_named_ports_on_egress_resolve_per_destination():
    pods = world_pods()
    # y/a calls its port "web" 8080, y/b calls it 9090.
    pods = [
        Pod(
            p.namespace,
            p.name,
            p.labels,
            p.node,
            p.ips,
            (ContainerPort("web", "TCP", 8080 if p.name == "a" else 9090),),
        )
        if p.namespace == "y"
        else p
        for p in pods
    ]
    p = policy(
        "web",
        "x",
        {"podSelector": {}, "policyTypes": ["Egress"], "egress": [{"ports": [{"port": "web"}]}]},
    )
    w = World([p], pods=pods)
    xa, ya, yb = w.pods["x/a"], w.pods["y/a"], w.pods["y/b"]
    assert both(w, xa, ya, port=8080) and not both(w, xa, ya, port=9090)
    assert both(w, xa, yb, port=9090, family=6) and not both(w, xa, yb, port=8080, family=6)
    assert not both(w, xa, yb, "UDP", 9090)
    assert not both(w, xa, "198.51.100.1", port=8080)  # an outside address has no port names


def test_pods_without_addresses_cannot_connect_but_self_can():
    pending = Pod("x", "pending", {}, "node1")
    w = World([], pods=world_pods() + [pending])
    assert not w.evaluator.allowed(pending, w.pods["x/a"], "TCP", 80)
    assert w.evaluator.allowed(pending, pending, "TCP", 80)


def test_family_choice():
    v4_only = Pod("x", "old", {}, "node1", ("10.0.0.99",))
    w = World([DENY_ALL_X], pods=world_pods() + [v4_only])
    ya = w.pods["y/a"]
    assert w.evaluator.allowed(ya, w.pods["y/b"], "TCP", 80, family=6)
    assert not w.evaluator.allowed(v4_only, ya, "TCP", 80, family=6)  # no IPv6 address
    v6_only = Pod("y", "new", {}, "node1", ("fd00::99",))
    w2 = World([], pods=world_pods() + [v4_only, v6_only])
    assert not w2.evaluator.allowed(v4_only, v6_only, "TCP", 80)  # no common family
    assert w2.evaluator.allowed(w2.pods["y/a"], v6_only, "TCP", 80)  # IPv6 chosen


def test_module_level_allowed_takes_dicts():
    ns = [{"metadata": {"name": "x"}}, {"metadata": {"name": "y"}}]
    pods = [
        {
            "metadata": {"name": "a", "namespace": "x"},
            "spec": {"nodeName": "n"},
            "status": {"podIP": "10.0.0.1"},
        },
        {
            "metadata": {"name": "b", "namespace": "y"},
            "spec": {"nodeName": "n"},
            "status": {"podIP": "10.0.0.2"},
        },
    ]
    pols = [DENY_ALL_X, "not a policy"]
    assert not allowed(ns, pods, pols, "10.0.0.2", "10.0.0.1", "TCP", 80)
    assert allowed(ns, pods, pols, "10.0.0.1", "10.0.0.1", "TCP", 80)
    assert allowed(ns, pods, pols, Node("n"), "10.0.0.1", "TCP", 80)
