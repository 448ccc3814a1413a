"""The whole rule set pycni owns (forward accepts beside masquerade) and the desired state the
core computes from the store, including the cluster settings (no root needed)."""

from __future__ import annotations

from ipaddress import ip_network

import pytest

from pycni.core import masquerade as core
from pycni.ipam.ranges import parse_range_set
from pycni.ipam.store import Store
from pycni.rules import sync
from pycni.rules.iptables import render_iptables
from pycni.rules.model import MasqRule, RuleSet, merge, quote_store, unquote_store
from pycni.rules.nft import render_nft

V4 = MasqRule("10.244.1.0/24", ("10.244.0.0/16",))
V6 = MasqRule("fd00:10:244:1::/64", ("fd00:10:244::/56",))
PREAMBLE = "table inet pycni {}\ndelete table inet pycni\n"


def test_forward_only_nft():
    assert render_nft(RuleSet(forward=["10.244.0.0/16"])) == PREAMBLE + (
        "table inet pycni {\n"
        "\tchain forward {\n"
        "\t\ttype filter hook forward priority filter; policy accept;\n"
        "\t\tip saddr 10.244.0.0/16 counter accept\n"
        "\t\tip daddr 10.244.0.0/16 counter accept\n"
        "\t}\n"
        "}\n"
    )


def test_masquerade_only_has_no_forward_chain():
    script = render_nft(RuleSet([V4]))
    assert "chain postrouting" in script
    assert "forward" not in script


def test_both_in_one_table_one_transaction():
    script = render_nft(RuleSet([V4], ["10.244.0.0/16"]))
    assert script.startswith(PREAMBLE)
    assert script.count("table inet pycni {\n") == 1
    body = script[len(PREAMBLE) :]
    assert body.index("chain forward") < body.index("chain postrouting")
    assert "ip saddr 10.244.0.0/16 counter accept" in body
    assert "masquerade fully-random" in body


def test_dual_stack_forward():
    rules = RuleSet(forward=["fd00:10:244::/56", "10.244.0.0/16"])
    assert rules.forward == (ip_network("10.244.0.0/16"), ip_network("fd00:10:244::/56"))
    lines = render_nft(rules).splitlines()
    accepts = [x.strip() for x in lines if "accept" in x and "policy" not in x]
    assert accepts == [
        "ip saddr 10.244.0.0/16 counter accept",
        "ip daddr 10.244.0.0/16 counter accept",
        "ip6 saddr fd00:10:244::/56 counter accept",
        "ip6 daddr fd00:10:244::/56 counter accept",
    ]


def test_forward_normalized():
    a = RuleSet(forward=["10.244.0.0/17", "10.244.128.0/17", "10.244.0.0/16", "fd00::/8"])
    b = RuleSet(forward=[ip_network("fd00::/8"), "10.244.0.0/16"])
    assert a == b and sync.digest(a) == sync.digest(b)
    assert a.forward == (ip_network("10.244.0.0/16"), ip_network("fd00::/8"))
    with pytest.raises(ValueError, match="invalid network"):
        RuleSet(forward=["10.244.0.1/16"])


def test_empty_removes_table():
    assert not RuleSet()
    assert RuleSet(forward=["10.0.0.0/8"]) and RuleSet([V4])
    assert render_nft(RuleSet()) == PREAMBLE
    assert render_iptables(RuleSet(), 4) == render_iptables(RuleSet(), 6) == ""


def test_digest_changes_when_forward_changes():
    base = RuleSet([V4])
    fwd = RuleSet([V4], ["10.244.0.0/16"])
    other = RuleSet([V4], ["10.245.0.0/16"])
    assert (
        len({sync.digest(base), sync.digest(fwd), sync.digest(other), sync.digest(RuleSet())}) == 4
    )


def test_masquerade_only_rendering_unchanged_by_forward_support():
    # Digests recorded before forward accepts existed stay valid: no needless re-apply.
    assert render_nft(RuleSet([V4])) == PREAMBLE + (
        "table inet pycni {\n"
        "\tchain postrouting {\n"
        "\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
        "\t\tip saddr 10.244.1.0/24 ip daddr != { 10.244.0.0/16, 224.0.0.0/4 }"
        " masquerade fully-random\n"
        "\t}\n"
        "}\n"
    )


def test_iptables_forward_and_masquerade():
    rules = RuleSet([V4, V6], ["10.244.0.0/16", "fd00:10:244::/56"])
    assert render_iptables(rules, 4) == (
        "*filter\n"
        ":PYCNI-FWD - [0:0]\n"
        "-A PYCNI-FWD -s 10.244.0.0/16 -j ACCEPT\n"
        "-A PYCNI-FWD -d 10.244.0.0/16 -j ACCEPT\n"
        "COMMIT\n"
        "*nat\n"
        ":PYCNI-MASQ - [0:0]\n"
        "-A PYCNI-MASQ -s 10.244.1.0/24 -d 10.244.0.0/16 -j RETURN\n"
        "-A PYCNI-MASQ -s 10.244.1.0/24 -d 224.0.0.0/4 -j RETURN\n"
        "-A PYCNI-MASQ -s 10.244.1.0/24 -j MASQUERADE --random-fully\n"
        "COMMIT\n"
    )
    v6 = render_iptables(rules, 6)
    assert "-A PYCNI-FWD -d fd00:10:244::/56 -j ACCEPT\n" in v6
    assert "10.244" not in v6
    assert "FORWARD" not in v6 and "POSTROUTING" not in v6


def test_iptables_forward_only():
    assert render_iptables(RuleSet(forward=["10.244.0.0/16"]), 4) == (
        "*filter\n:PYCNI-FWD - [0:0]\n"
        "-A PYCNI-FWD -s 10.244.0.0/16 -j ACCEPT\n-A PYCNI-FWD -d 10.244.0.0/16 -j ACCEPT\n"
        "COMMIT\n"
    )
    assert render_iptables(RuleSet(forward=["10.244.0.0/16"]), 6) == ""


# --------------------------------------------------------------------------- desired state

NET = "pods"
SET4 = parse_range_set([{"subnet": "10.244.1.0/24"}], "r4")
SET6 = parse_range_set([{"subnet": "fd00:10:244:1::/64"}], "r6")


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "data"))
    yield s
    s.close()


def _network(store: Store, ip_masq: bool = True, pods: int = 1) -> None:
    store.set_network(
        NET,
        {
            "ipMasq": ip_masq,
            "subnets": ["10.244.1.0/24", "fd00:10:244:1::/64"],
            "clusterCidrs": ["10.244.0.0/16"],
        },
    )
    for i in range(pods):
        store.add_attachment(NET, f"c{i}", "eth0", f"veth{i}", f"/proc/1/ns/{i}", [SET4, SET6], [])


def test_no_cluster_no_forward(store):
    _network(store)
    rules = core.desired_rules(store)
    assert rules.forward == ()
    assert [str(r.source) for r in rules.masquerade] == ["10.244.1.0/24", "fd00:10:244:1::/64"]


def test_cluster_forward_present_without_pods(store):
    assert core.desired_rules(store) == RuleSet()
    core.record_cluster(store, ["10.244.0.0/16", "fd00:10:244::/56"], [])
    assert core.desired_rules(store) == RuleSet(
        forward=["10.244.0.0/16", "fd00:10:244::/56"], stores=[core.data_dir_of(store)]
    )
    _network(store, pods=0)
    assert core.desired_rules(store).masquerade == ()


def test_exclusions_merged_per_family(store):
    _network(store)
    core.record_cluster(
        store, ["10.244.0.0/16", "fd00:10:244::/56"], ["192.168.5.0/24", "fd05::/64"]
    )
    v4, v6 = core.desired_rules(store).masquerade
    # Pod-to-pod (the cluster CIDR) and the node network are never masqueraded.
    assert v4.exclude == tuple(map(ip_network, ("10.244.0.0/16", "192.168.5.0/24", "224.0.0.0/4")))
    assert v6.exclude == tuple(map(ip_network, ("fd00:10:244::/56", "fd05::/64", "ff00::/8")))


def test_pod_to_pod_never_masqueraded_without_cluster(store):
    _network(store)
    v4 = core.desired_rules(store).masquerade[0]
    assert ip_network("10.244.0.0/16") in v4.exclude


def test_no_ip_masq_only_forward(store):
    _network(store, ip_masq=False)
    core.record_cluster(store, ["10.244.0.0/16"], ["192.168.5.0/24"])
    assert core.desired_rules(store) == RuleSet(
        forward=["10.244.0.0/16"], stores=[core.data_dir_of(store)]
    )


def test_record_and_forget_cluster(store):
    core.record_cluster(store, [ip_network("10.244.0.0/16")], ["192.168.5.0/24"])
    first = store.get_meta(core.CLUSTER_KEY)
    core.record_cluster(store, ["10.244.0.0/16"], [ip_network("192.168.5.0/24")])
    assert store.get_meta(core.CLUSTER_KEY) == first
    core.forget_cluster(store)
    assert store.get_meta(core.CLUSTER_KEY) is None
    assert core.desired_rules(store) == RuleSet()
    core.forget_cluster(store)  # idempotent


def test_record_cluster_rejects_bad_networks(store):
    with pytest.raises(ValueError, match="cluster CIDR"):
        core.record_cluster(store, ["10.244.0.1/16"], [])
    with pytest.raises(ValueError, match="masquerade exclusion"):
        core.record_cluster(store, ["10.244.0.0/16"], ["nonsense"])
    assert store.get_meta(core.CLUSTER_KEY) is None


def test_sync_applies_only_on_change(store, monkeypatch):
    applied: list[RuleSet] = []
    monkeypatch.setattr(sync, "apply", lambda rules, backend=None: applied.append(rules) or "nft")
    monkeypatch.setattr(
        sync, "installed_stores", lambda backend=None: applied[-1].stores if applied else ()
    )
    core.sync(store)
    assert applied == []  # nothing wanted, nothing recorded: no nft run at all
    core.record_cluster(store, ["10.244.0.0/16"], [])
    core.sync(store)
    core.sync(store)
    assert applied == [RuleSet(forward=["10.244.0.0/16"], stores=[core.data_dir_of(store)])]
    core.forget_cluster(store)
    core.sync(store)
    assert applied[-1] == RuleSet()


# --- several stores, one table --------------------------------------------------------------


def test_the_table_lists_its_stores_quoted():
    rules = RuleSet(forward=["10.244.0.0/16"], stores=["/var/lib/b", '/srv/a "b"', "/var/lib/b"])
    assert rules.stores == ('/srv/a "b"', "/var/lib/b")
    script = render_nft(rules)
    assert "\tchain stores {\n" in script
    assert '\t\treturn comment "/srv/a%20%22b%22"\n' in script
    assert "-A PYCNI-STORES -m comment --comment /srv/a%20%22b%22 -j RETURN" in render_iptables(
        rules, 4
    )
    assert unquote_store(quote_store('/srv/a "b"')) == '/srv/a "b"'
    # The list alone is bookkeeping: no rules, no table.
    assert not RuleSet(stores=["/var/lib/b"])
    assert "chain stores" not in render_nft(RuleSet(stores=["/var/lib/b"]))


def test_merge_unions_every_store_and_refuses_a_conflict():
    a = RuleSet([MasqRule("10.244.1.0/24", ("10.244.0.0/16",))], ["10.244.0.0/16"], stores=["/a"])
    b = RuleSet([MasqRule("10.245.1.0/24", ("10.245.0.0/16",))], ["10.245.0.0/16"], stores=["/b"])
    merged = merge([a, b])
    assert [str(r.source) for r in merged.masquerade] == ["10.244.1.0/24", "10.245.1.0/24"]
    assert merged.stores == ("/a", "/b") and merge([b, a]) == merged
    clash = RuleSet([MasqRule("10.244.1.0/24", ())], stores=["/c"])
    with pytest.raises(ValueError, match="conflicting"):
        merge([a, clash])


def test_node_rules_take_the_other_stores_wants_from_their_stores(store, tmp_path):
    _network(store)
    other = Store(str(tmp_path / "other"))
    try:
        core.record_cluster(other, ["10.245.0.0/16"], [])
    finally:
        other.close()
    others = core.data_dir_of(other)
    listed = [others, str(tmp_path / "gone")]  # as the kernel lists them
    merged = core.node_rules(store, listed)
    assert merged.stores == tuple(sorted([core.data_dir_of(store), others]))
    assert [str(n) for n in merged.forward] == ["10.245.0.0/16"]
    assert merged.masquerade == core.desired_rules(store).masquerade
    # Nothing installed yet: this store's wants alone.
    assert core.node_rules(store, ()) == core.desired_rules(store)
