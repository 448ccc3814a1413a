"""NetworkPolicy as nft (rules/policy.py) and the agent's glue around it (agent/policy.py):
what the rules look like, not yet whether packets obey them (tests/netns/test_policy_*.py)."""

from __future__ import annotations

import dataclasses

from policy_world import World, policy
from pycni.agent.policy import with_local_addresses
from pycni.rules.model import PolicyFragment, RuleSet
from pycni.rules.nft import parse_nft, render_nft
from pycni.rules.policy import render

DENY_A = policy("deny-a", "x", {"podSelector": {"matchLabels": {"pod": "a"}}})
ALLOW_Y = policy(
    "allow-y",
    "x",
    {
        "podSelector": {"matchLabels": {"pod": "a"}},
        "policyTypes": ["Ingress", "Egress"],
        "ingress": [
            {
                "from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                "ports": [{"port": 80}, {"port": "serve-81-udp", "protocol": "UDP"}],
            }
        ],
        "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/16", "except": ["10.0.2.0/24"]}}]}],
    },
)


def chain_body(statements, name: str) -> list[str]:
    lines = list(statements)
    start = lines.index(f"  chain {name} {{")
    end = lines.index("  }", start)
    return [line.strip() for line in lines[start + 1 : end]]


def test_no_policy_no_rules():
    assert not render(World([]).compiled["node1"])


def test_the_shape_depends_on_policies_not_on_pods():
    base = World([DENY_A, ALLOW_Y])
    # x/b gets the label of x/a: only set elements change
    pods = [p for p in base.inventory.pods]
    relabelled = [
        p if p.key != "x/b" else dataclasses.replace(p, labels={"pod": "a"}) for p in pods
    ]
    other = World([DENY_A, ALLOW_Y], pods=relabelled)
    for node in ("node1", "node2"):
        a, b = render(base.compiled[node]), render(other.compiled[node])

        def bare(rules):
            return [s.split(" elements")[0].rstrip(" };") for s in rules.statements]

        assert bare(a) == bare(b)
    assert render(base.compiled["node2"]) != render(other.compiled["node2"])  # x/b is there


def test_every_direction_ends_in_a_counted_drop_and_allows_return():
    rules = render(World([DENY_A, ALLOW_Y]).compiled["node1"])
    text = "\n".join(rules.statements)
    assert "ct state established,related accept" in text
    assert "ip saddr . ip daddr @policy_self_v4 accept" in text
    for chain in ("policy_egress_v4", "policy_ingress_v4", "policy_ingress_v6"):
        body = chain_body(rules.statements, chain)
        assert body[-1] == "drop"
        assert any(line.endswith("return") for line in body)  # some rule allows something
    # the v4 ipBlock has no v6 rule: egress over IPv6 allows nothing
    assert not any(
        line.endswith("return") for line in chain_body(rules.statements, "policy_egress_v6")
    )
    kinds = {(name, kind) for _, name, kind in rules.counters}
    assert kinds == {(n, k) for n in ("x/deny-a", "x/allow-y") for k in ("allow", "deny")}


def test_the_table_carries_the_fragment_and_reads_it_back_by_digest():
    rules = render(World([DENY_A]).compiled["node1"])
    fragment = PolicyFragment(rules.statements)
    script = render_nft(RuleSet(policy=fragment))
    assert "chain policy_forward {" in script and fragment.digest in script
    listing = {
        "nftables": [
            {
                "rule": {
                    "chain": "policy_digest",
                    "comment": fragment.digest,
                    "expr": [{"return": None}],
                }
            },
            {
                "rule": {
                    "chain": "policy_egress_v4",
                    "expr": [
                        {
                            "match": {
                                "op": "==",
                                "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                                "right": "@t4_x",
                            }
                        }
                    ],
                }
            },
        ]
    }
    import json

    back = parse_nft(json.dumps(listing))
    assert back == RuleSet(policy=fragment) and back.policy.statements == ()


def test_local_pods_take_their_addresses_from_the_store():
    pods = (
        {
            "kind": "Pod",
            "metadata": {"name": "a", "namespace": "x"},
            "status": {"podIP": "9.9.9.9"},
        },
        {"kind": "Pod", "metadata": {"name": "b"}, "spec": {"nodeName": "node2"}},
    )
    local = {("x", "a"): ["10.244.0.2", "fd00::2"], ("default", "b"): ["10.244.0.3"]}
    a, b = with_local_addresses(pods, local, "node1")
    assert a["spec"]["nodeName"] == "node1" and a["status"]["podIPs"] == [
        {"ip": "10.244.0.2"},
        {"ip": "fd00::2"},
    ]
    assert a["status"]["podIP"] == "10.244.0.2"
    assert b["spec"]["nodeName"] == "node1"  # the store knows better than a stale object
    assert pods[0]["status"] == {"podIP": "9.9.9.9"}  # the source's objects are not changed


def test_doctor_reports_policy_rules_that_differ_and_bridge_netfilter_off():
    from pycni.doctor import model as m
    from pycni.doctor.compare import check_bridge_netfilter, check_rules

    wanted = RuleSet(policy=PolicyFragment(render(World([DENY_A]).compiled["node1"]).statements))
    other = RuleSet(policy=PolicyFragment(render(World([ALLOW_Y]).compiled["node1"]).statements))
    on = {"bridge-nf-call-iptables": "1", "bridge-nf-call-ip6tables": "1"}
    assert check_rules(m.RulesView("nft", wanted, wanted, on)) == []
    (differs,) = check_rules(m.RulesView("nft", wanted, other, on))
    assert differs.kind == m.RULE_DIFFERS and wanted.policy.digest in differs.expected
    (missing,) = check_rules(m.RulesView("nft", wanted, RuleSet(), on))
    assert missing.kind == m.RULE_MISSING and "NetworkPolicy rules" in missing.expected
    off = {**on, "bridge-nf-call-iptables": "0"}
    assert check_bridge_netfilter(m.RulesView("nft", wanted, wanted, on)) == []
    (finding,) = check_bridge_netfilter(m.RulesView("nft", wanted, wanted, off))
    assert finding.kind == m.BRIDGE_NETFILTER_OFF and finding.actual == "0"
    # no policy: nothing depends on br_netfilter
    assert check_bridge_netfilter(m.RulesView("nft", RuleSet(), RuleSet(), off)) == []


def test_ipv6_neighbour_discovery_passes_before_any_isolation():
    """IPv6's ARP: pods of one node resolve each other with neighbour solicitations and
    advertisements across the bridge, which conntrack leaves untracked. Were they judged like
    connections, an isolated pod could not resolve a neighbour it may reach, nor answer one
    that may reach it (found by tests/netns/test_netpol_truth.py: "no route to host" between
    pods of one node over IPv6 once a policy isolated one of them)."""
    rules = render(World([DENY_A, ALLOW_Y]).compiled["node1"])
    body = chain_body(rules.statements, "policy_forward")
    nd = "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept"
    assert nd in body
    first_jump = next(i for i, line in enumerate(body) if " jump " in line)
    assert body.index(nd) < first_jump


def test_only_a_syn_starts_a_tcp_connection_to_or_from_an_isolated_pod():
    """Past the established/related accept, a TCP packet that is not a SYN belongs to no
    connection conntrack knows: taken up mid-stream, it would start a 'connection' in its own
    direction, and one the agent cut because a policy denies it would come back with the
    peer's next segment (found by tests/netns/test_netpol_truth.py's connections test: x/a's
    egress denied, z/b's push revived x/a's cut connection to it)."""
    rules = render(World([DENY_A, ALLOW_Y]).compiled["node1"])
    body = chain_body(rules.statements, "policy_forward")
    first_jump = next(i for i, line in enumerate(body) if " jump " in line)
    for family, ip in ((4, "ip"), (6, "ip6")):
        for addr in ("saddr", "daddr"):
            rule = (
                f"tcp flags & (fin | syn | rst | ack) != syn {ip} {addr} "
                f"@policy_any_isolated_v{family} counter drop"
            )
            assert body.index("ct state established,related accept") < body.index(rule)
            assert body.index(rule) < first_jump
    # Either direction's isolated pods of the node: x/a (10.0.0.1) is isolated by both.
    sets = {s.split()[1]: s for s in rules.statements if s.strip().startswith("set ")}
    assert "10.0.0.1" in sets["policy_any_isolated_v4"]
    assert "fd00::1" in sets["policy_any_isolated_v6"]


def test_turning_networkpolicy_off_forgets_the_recorded_rules(tmp_path, monkeypatch):
    from pycni.agent import policy as agent_policy
    from pycni.core import masquerade
    from pycni.ipam.store import Store

    assert not agent_policy.forget(str(tmp_path))  # no store: nothing made
    assert not (tmp_path / "pycni.db").exists()
    synced = []
    monkeypatch.setattr(masquerade, "sync", lambda store: synced.append(store))
    with Store(str(tmp_path)) as store:
        masquerade.record_policy(store, {"statements": ["  chain policy_forward { }"]})
    assert agent_policy.forget(str(tmp_path)) and len(synced) == 1
    with Store(str(tmp_path)) as store:
        assert masquerade.recorded_policy(store) is None
    assert not agent_policy.forget(str(tmp_path))  # once is enough
