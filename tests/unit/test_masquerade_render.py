"""Pure rendering of the node's masquerade rules (no root needed); forward accepts and whole
rule sets are in test_rules_table.py."""

from __future__ import annotations

from ipaddress import ip_network

import pytest

from pycni.cni.errors import INVALID_ENVIRONMENT, RULES_FAILURE, CniError
from pycni.rules import sync
from pycni.rules.iptables import render_iptables
from pycni.rules.model import MasqRule, RuleSet, normalize
from pycni.rules.nft import _nft_net, render_nft

V4 = MasqRule(ip_network("10.244.1.0/24"), (ip_network("10.244.0.0/16"),))
V6 = MasqRule(ip_network("fd00:10:244:1::/64"), (ip_network("fd00:10:244::/56"),))


def test_v4_nft():
    script = render_nft(RuleSet([V4]))
    assert script == (
        "table inet pycni {}\n"
        "delete table inet pycni\n"
        "table inet pycni {\n"
        "\tchain postrouting {\n"
        "\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
        "\t\tip saddr 10.244.1.0/24 ip daddr != { 10.244.0.0/16, 224.0.0.0/4 }"
        " masquerade fully-random\n"
        "\t}\n"
        "}\n"
    )


def test_v6_nft():
    script = render_nft(RuleSet([V6]))
    assert (
        "ip6 saddr fd00:10:244:1::/64 ip6 daddr != { fd00:10:244::/56, ff00::/8 }"
        " masquerade fully-random" in script
    )
    assert " ip saddr" not in script


def test_dual_stack_nft_orders_v4_first():
    script = render_nft(RuleSet([V6, V4]))
    assert script == render_nft(RuleSet([V4, V6]))
    lines = script.splitlines()
    v4 = next(i for i, x in enumerate(lines) if "ip saddr" in x)
    v6 = next(i for i, x in enumerate(lines) if "ip6 saddr" in x)
    assert v4 < v6
    assert script.count("masquerade fully-random") == 2


def test_empty_nft_removes_table_only():
    script = render_nft(RuleSet([]))
    assert script == "table inet pycni {}\ndelete table inet pycni\n"


def test_script_starts_with_replace_preamble():
    lines = render_nft(RuleSet([V4])).splitlines()
    assert lines[:2] == ["table inet pycni {}", "delete table inet pycni"]
    assert "chain postrouting" in lines[3]


def test_deterministic_regardless_of_input_order():
    a = MasqRule(ip_network("10.1.0.0/24"), (ip_network("10.9.0.0/16"), ip_network("10.1.0.0/24")))
    b = MasqRule(ip_network("10.1.0.0/24"), (ip_network("10.1.0.0/24"), ip_network("10.9.0.0/16")))
    c = MasqRule(ip_network("10.0.0.0/24"), ())
    assert render_nft(RuleSet([a, c])) == render_nft(RuleSet([c, b]))
    assert sync.digest(RuleSet([a, c])) == sync.digest(RuleSet([c, b]))
    assert render_iptables(RuleSet([a, c]), 4) == render_iptables(RuleSet([c, b]), 4)


def test_digest_changes_with_content():
    other = MasqRule(ip_network("10.244.2.0/24"), (ip_network("10.244.0.0/16"),))
    assert sync.digest(RuleSet([V4])) != sync.digest(RuleSet([other]))
    assert sync.digest(RuleSet([])) != sync.digest(RuleSet([V4]))
    assert len(sync.digest(RuleSet([V4]))) == 64


def test_exclusions_collapsed_and_multicast_added():
    rule = MasqRule(
        ip_network("10.244.1.0/24"),
        (ip_network("10.244.1.0/24"), ip_network("10.244.0.0/16"), ip_network("224.0.0.0/8")),
    )
    (canon,) = normalize([rule])
    assert canon.exclude == (ip_network("10.244.0.0/16"), ip_network("224.0.0.0/4"))
    assert "{ 10.244.0.0/16, 224.0.0.0/4 }" in render_nft(RuleSet([rule]))


def test_multicast_excluded_with_no_exclusions():
    rule = MasqRule(ip_network("10.244.1.0/24"))
    assert "ip daddr != { 224.0.0.0/4 }" in render_nft(RuleSet([rule]))
    assert "-d 224.0.0.0/4 -j RETURN" in render_iptables(RuleSet([rule]), 4)
    rule6 = MasqRule(ip_network("fd00::/64"))
    assert "ip6 daddr != { ff00::/8 }" in render_nft(RuleSet([rule6]))
    assert "-d ff00::/8 -j RETURN" in render_iptables(RuleSet([rule6]), 6)


def test_duplicates_deduplicated():
    assert render_nft(RuleSet([V4, V4])) == render_nft(RuleSet([V4]))


def test_conflicting_rules_for_same_source_rejected():
    other = MasqRule(V4.source, (ip_network("192.168.0.0/16"),))
    with pytest.raises(ValueError, match="conflicting"):
        render_nft(RuleSet([V4, other]))


def test_strings_accepted():
    assert MasqRule("10.244.1.0/24", ["10.244.0.0/16"]) == V4


def test_mixed_family_exclusion_rejected():
    with pytest.raises(ValueError, match="not IPv4"):
        MasqRule(ip_network("10.0.0.0/24"), (ip_network("fd00::/64"),))


def test_non_network_source_rejected():
    with pytest.raises(ValueError):
        MasqRule("10.0.0.1/24", ())


def test_iptables_v4():
    assert render_iptables(RuleSet([V4, V6]), 4) == (
        "*nat\n"
        ":PYCNI-MASQ - [0:0]\n"
        "-A PYCNI-MASQ -s 10.244.1.0/24 -d 10.244.0.0/16 -j RETURN\n"
        "-A PYCNI-MASQ -s 10.244.1.0/24 -d 224.0.0.0/4 -j RETURN\n"
        "-A PYCNI-MASQ -s 10.244.1.0/24 -j MASQUERADE --random-fully\n"
        "COMMIT\n"
    )


def test_iptables_v6():
    out = render_iptables(RuleSet([V4, V6]), 6)
    assert "10.244" not in out
    assert "-A PYCNI-MASQ -s fd00:10:244:1::/64 -d fd00:10:244::/56 -j RETURN\n" in out
    assert out.endswith(
        "-A PYCNI-MASQ -s fd00:10:244:1::/64 -j MASQUERADE --random-fully\nCOMMIT\n"
    )


def test_iptables_nothing_for_a_family_renders_nothing():
    # apply removes a chain without rules (and its jump) instead of leaving it empty.
    assert render_iptables(RuleSet([]), 4) == ""
    assert render_iptables(RuleSet([V4]), 6) == ""


def test_iptables_no_postrouting_jump():
    assert "POSTROUTING" not in render_iptables(RuleSet([V4]), 4)


def test_iptables_bad_family():
    with pytest.raises(ValueError):
        render_iptables(RuleSet([V4]), 5)


def test_resolve_backend(monkeypatch):
    monkeypatch.delenv(sync.ENV_BACKEND, raising=False)
    assert sync.resolve_backend("iptables") == "iptables"
    with pytest.raises(ValueError):
        sync.resolve_backend("pf")
    monkeypatch.setenv(sync.ENV_BACKEND, "iptables")
    assert sync.resolve_backend() == "iptables"
    monkeypatch.setenv(sync.ENV_BACKEND, "bogus")
    with pytest.raises(CniError) as err:
        sync.resolve_backend()
    assert err.value.code == INVALID_ENVIRONMENT
    monkeypatch.delenv(sync.ENV_BACKEND)
    monkeypatch.setattr(sync.shutil, "which", lambda name: None)
    assert sync.resolve_backend() == "iptables"
    monkeypatch.setattr(sync.shutil, "which", lambda name: f"/usr/sbin/{name}")
    assert sync.resolve_backend() == "nft"


def test_nft_json_value_parsing():
    assert _nft_net("10.0.0.1") == [ip_network("10.0.0.1/32")]
    assert _nft_net({"prefix": {"addr": "10.0.0.0", "len": 8}}) == [ip_network("10.0.0.0/8")]
    assert _nft_net({"range": ["10.0.1.0", "10.0.2.255"]}) == [
        ip_network("10.0.1.0/24"),
        ip_network("10.0.2.0/24"),
    ]
    assert _nft_net({"set": ["10.0.0.1", {"prefix": {"addr": "fd00::", "len": 8}}]}) == [
        ip_network("10.0.0.1/32"),
        ip_network("fd00::/8"),
    ]


def test_command_failure_is_rules_failure():
    with pytest.raises(CniError) as err:
        sync._must(["sh", "-c", "echo boom >&2; exit 3"])
    assert err.value.code == RULES_FAILURE
    assert "boom" in err.value.msg and "exit 3" in err.value.msg


def test_missing_binary_is_rules_failure():
    with pytest.raises(CniError) as err:
        sync._must(["/nonexistent/pycni-no-such-tool"])
    assert err.value.code == RULES_FAILURE


def test_rules_sort_across_families():
    assert sorted([V6, V4]) == [V4, V6]
    assert sorted({V6, V4, MasqRule("10.0.0.0/24")}) == [MasqRule("10.0.0.0/24"), V4, V6]
    assert V4 < V6 and V6 > V4 and V4 <= V4 and V6 >= V6
