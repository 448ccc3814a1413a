"""hostPorts without root: parsing runtimeConfig.portMappings (both spellings), the store's
record of them and its refusal of a port taken twice, the desired rules computed from the
store, their nft and iptables rendering, reading installed rules back, and the conflist
capability."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from ipaddress import ip_address, ip_interface

import pytest

from pycni.cni import env as cnienv
from pycni.cni import netconf
from pycni.cni.errors import ADDRESS_UNAVAILABLE, INVALID_NETWORK_CONFIG, CniError
from pycni.cni.netconf import PortMapping
from pycni.core import masquerade as core
from pycni.ipam import schema
from pycni.ipam.ranges import parse_range_set
from pycni.ipam.store import Store
from pycni.node_config import node_conflist
from pycni.rules import sync
from pycni.rules.iptables import HOOKS, INPUT_HOOK, IPT_HOSTPORT_CHAIN, render_iptables
from pycni.rules.model import HAIRPIN_MARK, HostPort, MasqRule, RuleSet
from pycni.rules.nft import render_nft

REQ = cnienv.Request("ADD", "c1", "/run/netns/p", "eth0")
BASE = {"cniVersion": "1.1.0", "name": "net", "type": "pycni", "subnet": "10.244.1.0/24"}
DUAL = {
    "subnet": None,
    "ranges": [[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:10:244:1::/64"}]],
}
PREAMBLE = "table inet pycni {}\ndelete table inet pycni\n"


def parse(*items, **top) -> list[PortMapping]:
    conf = {**BASE, "runtimeConfig": {"portMappings": list(items)}, **top}
    conf = {k: v for k, v in conf.items() if v is not None}
    return netconf.parse(conf, REQ).port_mappings


def refused(*items, **top) -> str:
    with pytest.raises(CniError) as info:
        parse(*items, **top)
    assert info.value.code == INVALID_NETWORK_CONFIG
    return info.value.msg


# --------------------------------------------------------------------------- parsing


def test_absent_means_none():
    assert netconf.parse(BASE, REQ).port_mappings == []
    assert netconf.parse({**BASE, "runtimeConfig": {}}, REQ).port_mappings == []
    assert parse() == []


def test_podman_spelling_and_defaults():
    assert parse({"hostPort": 8080, "containerPort": 80}) == [PortMapping(8080, 80, "tcp", None)]
    assert parse(
        {"hostPort": 53, "containerPort": 5353, "protocol": "udp", "hostIP": "10.0.0.5"}
    ) == [PortMapping(53, 5353, "udp", ip_address("10.0.0.5"))]


def test_containerd_spelling():
    got = parse(
        {"HostPort": 8080, "ContainerPort": 80, "Protocol": "TCP", "HostIP": ""},
        {"HostPort": 8080, "ContainerPort": 80, "Protocol": "Udp"},
    )
    assert got == [PortMapping(8080, 80, "tcp", None), PortMapping(8080, 80, "udp", None)]


def test_unknown_keys_and_nulls_are_ignored():
    assert parse(
        {"hostPort": 8080, "containerPort": 80, "hostIP": None, "range": 1, "protocol": None}
    ) == [PortMapping(8080, 80, "tcp", None)]


def test_unspecified_host_ip_is_kept_per_family():
    got = parse(
        {"hostPort": 1, "containerPort": 1, "hostIP": "0.0.0.0"},
        {"hostPort": 2, "containerPort": 2, "hostIP": "::"},
        **DUAL,
    )
    assert [m.host_ip for m in got] == [ip_address("0.0.0.0"), ip_address("::")]


def test_exact_repeats_are_dropped():
    item = {"hostPort": 8080, "containerPort": 80}
    assert parse(item, dict(item), {"HostPort": 8080, "ContainerPort": 80}) == [
        PortMapping(8080, 80)
    ]


@pytest.mark.parametrize(
    "item, words",
    [
        ({"containerPort": 80}, "hostPort: is required"),
        ({"hostPort": 8080}, "containerPort: is required"),
        ({"hostPort": 0, "containerPort": 80}, "hostPort: 0 is not a port"),
        ({"hostPort": 65536, "containerPort": 80}, "65536 is not a port"),
        ({"hostPort": 8080, "containerPort": -1}, "containerPort: -1 is not a port"),
        ({"hostPort": True, "containerPort": 80}, "True is not a port"),
        ({"hostPort": "8080", "containerPort": 80}, "'8080' is not a port"),
        ({"HostPort": 1.5, "containerPort": 80}, "HostPort: 1.5 is not a port"),
        ({"hostPort": 8080, "containerPort": 80, "protocol": "sctp"}, "'sctp' is not supported"),
        ({"hostPort": 8080, "containerPort": 80, "Protocol": 6}, "Protocol: 6 is not supported"),
        ({"hostPort": 8080, "containerPort": 80, "hostIP": "nonsense"}, "is not an IP address"),
        ({"hostPort": 8080, "containerPort": 80, "hostIP": 5}, "not an IP address string"),
        ({"hostPort": 8080, "containerPort": 80, "hostIP": "224.0.0.1"}, "multicast"),
        ({"hostPort": 8080, "containerPort": 80, "hostIP": "::1"}, "route_localnet"),
        ({"hostPort": 8080, "containerPort": 80, "hostIP": "fd00::1"}, "gets no IPv6 address"),
        ({"hostPort": 8080, "containerPort": 80, "hostIP": "::"}, "gets no IPv6 address"),
        ({"hostPort": 8080, "HostPort": 8081, "containerPort": 80}, "given twice"),
        ("8080:80", "must be an object"),
    ],
)
def test_refusals_name_the_entry(item, words):
    msg = refused({"hostPort": 1, "containerPort": 1}, item)
    assert "runtimeConfig.portMappings[1]" in msg and words in msg, msg


def test_not_a_list():
    with pytest.raises(CniError) as info:
        netconf.parse({**BASE, "runtimeConfig": {"portMappings": {"hostPort": 1}}}, REQ)
    assert info.value.code == INVALID_NETWORK_CONFIG and "must be a list" in info.value.msg


@pytest.mark.parametrize(
    "a, b, clash",
    [
        ({"hostIP": ""}, {"hostIP": "10.0.0.5"}, True),
        ({"hostIP": "0.0.0.0"}, {"hostIP": "10.0.0.5"}, True),
        ({"hostIP": "10.0.0.5"}, {"hostIP": "10.0.0.5", "containerPort": 81}, True),
        ({"hostIP": "10.0.0.5"}, {"hostIP": "10.0.0.6"}, False),
        ({"hostIP": "0.0.0.0"}, {"hostIP": "::"}, False),
        ({"hostIP": ""}, {"hostIP": "::"}, True),
        ({"protocol": "tcp"}, {"protocol": "udp"}, False),
        ({"hostPort": 8080}, {"hostPort": 8081}, False),
    ],
)
def test_one_pod_taking_a_port_twice(a, b, clash):
    items = [{"hostPort": 8080, "containerPort": 80, **x} for x in (a, b)]
    if clash:
        assert "already mapped by entry 0" in refused(*items, **DUAL)
    else:
        assert len(parse(*items, **DUAL)) == 2


def test_delete_with_bad_mappings_still_proceeds():
    conf = {**BASE, "runtimeConfig": {"portMappings": [{"hostPort": 0}]}}
    nc = netconf.parse_for_delete(conf, cnienv.Request("DEL", "c1", "", "eth0"))
    assert nc.port_mappings == [] and "hostPort" in nc.config_problem


def test_claims():
    m = PortMapping(80, 80)
    assert m.claims({4, 6}) == {(4, ""), (6, "")}
    assert PortMapping(80, 80, host_ip=ip_address("::")).claims({4, 6}) == {(6, "")}
    assert PortMapping(80, 80, host_ip=ip_address("10.0.0.5")).claims({6}) == set()
    assert not netconf.port_mappings_conflict({(4, "")}, {(6, "")})
    assert netconf.port_mappings_conflict({(4, "")}, {(4, "10.0.0.5")})
    assert not netconf.port_mappings_conflict({(4, "10.0.0.6")}, {(4, "10.0.0.5")})


def test_conflist_capabilities_keep_bandwidth():
    plugin = node_conflist("pycni", "10.244.1.0/24", "10.244.0.0/16")["plugins"][0]
    assert plugin["capabilities"]["portMappings"] is True
    assert plugin["capabilities"]["bandwidth"] is True


# --------------------------------------------------------------------------- HostPort, RuleSet


def test_hostport_normalizes_and_validates():
    hp = HostPort("tcp", 8080, "10.244.1.2", 80, "0.0.0.0")
    assert hp.host_ip is None and hp.pod_ip == ip_address("10.244.1.2") and hp.version == 4
    assert hp == HostPort("tcp", 8080, ip_address("10.244.1.2"), 80)
    with pytest.raises(ValueError, match="not IPv4"):
        HostPort("tcp", 8080, "10.244.1.2", 80, "fd00::1")
    with pytest.raises(ValueError, match="protocol"):
        HostPort("sctp", 8080, "10.244.1.2", 80)
    with pytest.raises(ValueError, match="port"):
        HostPort("tcp", 0, "10.244.1.2", 80)
    with pytest.raises(ValueError, match="not an IP address"):
        HostPort("tcp", 1, "pod", 80)


def test_ruleset_sorts_dedups_and_digests():
    a = HostPort("tcp", 8080, "fd00::2", 80)
    b = HostPort("tcp", 8080, "10.244.1.2", 80)
    c = HostPort("tcp", 8080, "10.244.1.3", 80, "192.0.2.1")
    one = RuleSet(hostports=[a, b, c, b], hairpin=["fd00::2/64", "10.244.1.2/24"])
    two = RuleSet(hostports=(c, b, a), hairpin=[ip_interface("10.244.1.2/24"), "fd00::2/64"])
    assert one == two and sync.digest(one) == sync.digest(two)
    # IPv4 first; a specific host address before "any" of the same port.
    assert one.hostports == (c, b, a)
    assert one and RuleSet(hairpin=["10.244.1.2/24"])
    assert len({sync.digest(one), sync.digest(RuleSet(hostports=[a])), sync.digest(RuleSet())}) == 3


HP = RuleSet(
    hostports=[
        HostPort("tcp", 8080, "10.244.1.2", 80),
        HostPort("udp", 53, "10.244.1.2", 5353, "192.0.2.1"),
        HostPort("tcp", 8080, "fd00::2", 80),
    ],
    hairpin=["10.244.1.2/24", "fd00::2/64"],
)


def test_nft_hostports():
    assert render_nft(HP) == PREAMBLE + (
        "table inet pycni {\n"
        "\tchain forward {\n"
        "\t\ttype filter hook forward priority filter; policy accept;\n"
        "\t\tct status dnat counter accept\n"
        "\t}\n"
        "\tchain input {\n"
        "\t\ttype filter hook input priority filter; policy accept;\n"
        '\t\tiifname != "lo" ip daddr 127.0.0.0/8 ct state != { established, related }'
        " counter drop\n"
        "\t}\n"
        "\tchain hostports {\n"
        "\t\tip6 daddr ::1 return\n"
        "\t\tmeta nfproto ipv4 tcp dport 8080 meta mark set meta mark | 0x00001000"
        " dnat ip to 10.244.1.2:80\n"
        "\t\tip daddr 192.0.2.1 udp dport 53 meta mark set meta mark | 0x00001000"
        " dnat ip to 10.244.1.2:5353\n"
        "\t\tmeta nfproto ipv6 tcp dport 8080 meta mark set meta mark | 0x00001000"
        " dnat ip6 to [fd00::2]:80\n"
        "\t}\n"
        "\tchain prerouting {\n"
        "\t\ttype nat hook prerouting priority dstnat; policy accept;\n"
        "\t\tfib daddr type local jump hostports\n"
        "\t}\n"
        "\tchain output {\n"
        "\t\ttype nat hook output priority -100; policy accept;\n"
        "\t\tfib daddr type local jump hostports\n"
        "\t}\n"
        "\tchain postrouting {\n"
        "\t\ttype nat hook postrouting priority srcnat; policy accept;\n"
        "\t\tct status dnat ip saddr 127.0.0.0/8 masquerade\n"
        "\t\tct status dnat meta mark & 0x00001000 == 0x00001000"
        " ip saddr 10.244.1.0/24 ip daddr 10.244.1.2 masquerade\n"
        "\t\tct status dnat meta mark & 0x00001000 == 0x00001000"
        " ip6 saddr fd00::/64 ip6 daddr fd00::2 masquerade\n"
        "\t}\n"
        "}\n"
    )


def test_nft_hostports_beside_forward_and_masquerade():
    rules = RuleSet(
        [MasqRule("10.244.1.0/24", ("10.244.0.0/16",))],
        ["10.244.0.0/16"],
        HP.hostports,
        HP.hairpin,
    )
    lines = [x.strip() for x in render_nft(rules).splitlines()]
    fwd = lines.index("chain forward {")
    assert lines[fwd + 2] == "ct status dnat counter accept"  # before the cluster accepts
    assert lines[fwd + 3] == "ip saddr 10.244.0.0/16 counter accept"
    post = lines.index("chain postrouting {")
    # Hairpin masquerades come before the subnet's rule, which excludes the subnet itself.
    assert lines[post + 4].endswith("ip6 daddr fd00::2 masquerade")
    assert lines[post + 5].endswith("masquerade fully-random")


def test_v6_only_hostports_have_no_localnet_pieces():
    script = render_nft(RuleSet(hostports=[HostPort("tcp", 80, "fd00::2", 80)]))
    assert "127.0.0.0/8" not in script and "chain input" not in script
    assert "ip6 daddr ::1 return" in script
    v4 = render_nft(RuleSet(hostports=[HostPort("tcp", 80, "10.244.1.2", 80)]))
    assert "::1" not in v4


def test_iptables_hostports():
    assert render_iptables(HP, 4) == (
        "*filter\n"
        ":PYCNI-FWD - [0:0]\n"
        ":PYCNI-INPUT - [0:0]\n"
        "-A PYCNI-FWD -m conntrack --ctstate DNAT -j ACCEPT\n"
        "-A PYCNI-INPUT -d 127.0.0.0/8 ! -i lo -m conntrack ! --ctstate RELATED,ESTABLISHED"
        " -j DROP\n"
        "COMMIT\n"
        "*nat\n"
        ":PYCNI-HOSTPORTS - [0:0]\n"
        ":PYCNI-MASQ - [0:0]\n"
        "-A PYCNI-HOSTPORTS -p tcp -m tcp --dport 8080 -j MARK --set-xmark 0x1000/0x1000\n"
        "-A PYCNI-HOSTPORTS -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.244.1.2:80\n"
        "-A PYCNI-HOSTPORTS -d 192.0.2.1 -p udp -m udp --dport 53 -j MARK"
        " --set-xmark 0x1000/0x1000\n"
        "-A PYCNI-HOSTPORTS -d 192.0.2.1 -p udp -m udp --dport 53 -j DNAT"
        " --to-destination 10.244.1.2:5353\n"
        "-A PYCNI-MASQ -s 127.0.0.0/8 -m conntrack --ctstate DNAT -j MASQUERADE\n"
        "-A PYCNI-MASQ -s 10.244.1.0/24 -d 10.244.1.2 -m conntrack --ctstate DNAT"
        " -m mark --mark 0x1000/0x1000 -j MASQUERADE\n"
        "COMMIT\n"
    )
    assert render_iptables(HP, 6) == (
        "*filter\n"
        ":PYCNI-FWD - [0:0]\n"
        "-A PYCNI-FWD -m conntrack --ctstate DNAT -j ACCEPT\n"
        "COMMIT\n"
        "*nat\n"
        ":PYCNI-HOSTPORTS - [0:0]\n"
        ":PYCNI-MASQ - [0:0]\n"
        "-A PYCNI-HOSTPORTS -d ::1 -j RETURN\n"
        "-A PYCNI-HOSTPORTS -p tcp -m tcp --dport 8080 -j MARK --set-xmark 0x1000/0x1000\n"
        "-A PYCNI-HOSTPORTS -p tcp -m tcp --dport 8080 -j DNAT --to-destination [fd00::2]:80\n"
        "-A PYCNI-MASQ -s fd00::/64 -d fd00::2 -m conntrack --ctstate DNAT"
        " -m mark --mark 0x1000/0x1000 -j MASQUERADE\n"
        "COMMIT\n"
    )


def test_iptables_hooks():
    dnat = [h for h in HOOKS if h.chain == IPT_HOSTPORT_CHAIN]
    assert [(h.table, h.parent) for h in dnat] == [("nat", "PREROUTING"), ("nat", "OUTPUT")]
    assert dnat[0].jump == [
        "-m",
        "addrtype",
        "--dst-type",
        "LOCAL",
        "-m",
        "comment",
        "--comment",
        "pycni",
        "-j",
        "PYCNI-HOSTPORTS",
    ]
    assert INPUT_HOOK.parent == "INPUT" and INPUT_HOOK.first


# --------------------------------------------------------------------------- read back

# `nft -j list table inet pycni` as nft 1.0.6 prints the rules of HP (chains left out).
_NFT_JSON = {
    "nftables": [
        {"rule": {"chain": c, "expr": e}}
        for c, e in [
            (
                "forward",
                [
                    {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}},
                    {
                        "match": {
                            "op": "==",
                            "left": {"&": [{"meta": {"key": "mark"}}, HAIRPIN_MARK]},
                            "right": HAIRPIN_MARK,
                        }
                    },
                    {"counter": {"packets": 0, "bytes": 0}},
                    {"accept": None},
                ],
            ),
            (
                "hostports",
                [
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": "ip6", "field": "daddr"}},
                            "right": "::1",
                        }
                    },
                    {"return": None},
                ],
            ),
            (
                "hostports",
                [
                    {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv4"}},
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                            "right": 8080,
                        }
                    },
                    {
                        "mangle": {
                            "key": {"meta": {"key": "mark"}},
                            "value": {"|": [{"meta": {"key": "mark"}}, HAIRPIN_MARK]},
                        }
                    },
                    {"dnat": {"family": "ip", "addr": "10.244.1.2", "port": 80}},
                ],
            ),
            (
                "hostports",
                [
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                            "right": "192.0.2.1",
                        }
                    },
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": "udp", "field": "dport"}},
                            "right": 53,
                        }
                    },
                    {
                        "mangle": {
                            "key": {"meta": {"key": "mark"}},
                            "value": {"|": [{"meta": {"key": "mark"}}, HAIRPIN_MARK]},
                        }
                    },
                    {"dnat": {"family": "ip", "addr": "10.244.1.2", "port": 5353}},
                ],
            ),
            (
                "hostports",
                [
                    {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv6"}},
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                            "right": 8080,
                        }
                    },
                    {
                        "mangle": {
                            "key": {"meta": {"key": "mark"}},
                            "value": {"|": [{"meta": {"key": "mark"}}, HAIRPIN_MARK]},
                        }
                    },
                    {"dnat": {"family": "ip6", "addr": "fd00::2", "port": 80}},
                ],
            ),
            (
                "prerouting",
                [
                    {
                        "match": {
                            "op": "==",
                            "left": {"fib": {"result": "type", "flags": ["daddr"]}},
                            "right": "local",
                        }
                    },
                    {"jump": {"target": "hostports"}},
                ],
            ),
            (
                "postrouting",
                [
                    {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}},
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                            "right": {"prefix": {"addr": "127.0.0.0", "len": 8}},
                        }
                    },
                    {"masquerade": None},
                ],
            ),
            (
                "postrouting",
                [
                    {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}},
                    {
                        "match": {
                            "op": "==",
                            "left": {"&": [{"meta": {"key": "mark"}}, HAIRPIN_MARK]},
                            "right": HAIRPIN_MARK,
                        }
                    },
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                            "right": {"prefix": {"addr": "10.244.1.0", "len": 24}},
                        }
                    },
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                            "right": "10.244.1.2",
                        }
                    },
                    {"masquerade": None},
                ],
            ),
            (
                "postrouting",
                [
                    {"match": {"op": "in", "left": {"ct": {"key": "status"}}, "right": "dnat"}},
                    {
                        "match": {
                            "op": "==",
                            "left": {"&": [{"meta": {"key": "mark"}}, HAIRPIN_MARK]},
                            "right": HAIRPIN_MARK,
                        }
                    },
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": "ip6", "field": "saddr"}},
                            "right": {"prefix": {"addr": "fd00::", "len": 64}},
                        }
                    },
                    {
                        "match": {
                            "op": "==",
                            "left": {"payload": {"protocol": "ip6", "field": "daddr"}},
                            "right": "fd00::2",
                        }
                    },
                    {"masquerade": None},
                ],
            ),
        ]
    ]
}

# `iptables -S <chain>` / `ip6tables -S <chain>` for HP, as iptables 1.8.9 prints them.
_IPT_S = {
    (4, "PYCNI-FWD"): "-N PYCNI-FWD\n-A PYCNI-FWD -m conntrack --ctstate DNAT -j ACCEPT\n",
    (4, "PYCNI-INPUT"): "-N PYCNI-INPUT\n-A PYCNI-INPUT -d 127.0.0.0/8 ! -i lo -m conntrack"
    " ! --ctstate RELATED,ESTABLISHED -j DROP\n",
    (4, "PYCNI-HOSTPORTS"): (
        "-N PYCNI-HOSTPORTS\n"
        "-A PYCNI-HOSTPORTS -p tcp -m tcp --dport 8080 -j MARK --set-xmark 0x1000/0x1000\n"
        "-A PYCNI-HOSTPORTS -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.244.1.2:80\n"
        "-A PYCNI-HOSTPORTS -d 192.0.2.1/32 -p udp -m udp --dport 53 -j MARK"
        " --set-xmark 0x1000/0x1000\n"
        "-A PYCNI-HOSTPORTS -d 192.0.2.1/32 -p udp -m udp --dport 53 -j DNAT"
        " --to-destination 10.244.1.2:5353\n"
    ),
    (4, "PYCNI-MASQ"): (
        "-N PYCNI-MASQ\n"
        "-A PYCNI-MASQ -s 127.0.0.0/8 -m conntrack --ctstate DNAT -j MASQUERADE\n"
        "-A PYCNI-MASQ -s 10.244.1.0/24 -d 10.244.1.2/32 -m conntrack --ctstate DNAT"
        " -m mark --mark 0x1000/0x1000 -j MASQUERADE\n"
    ),
    (6, "PYCNI-FWD"): "-N PYCNI-FWD\n-A PYCNI-FWD -m conntrack --ctstate DNAT -j ACCEPT\n",
    (6, "PYCNI-HOSTPORTS"): (
        "-N PYCNI-HOSTPORTS\n-A PYCNI-HOSTPORTS -d ::1/128 -j RETURN\n"
        "-A PYCNI-HOSTPORTS -p tcp -m tcp --dport 8080 -j MARK --set-xmark 0x1000/0x1000\n"
        "-A PYCNI-HOSTPORTS -p tcp -m tcp --dport 8080 -j DNAT --to-destination [fd00::2]:80\n"
    ),
    (6, "PYCNI-MASQ"): (
        "-N PYCNI-MASQ\n"
        "-A PYCNI-MASQ -s fd00::/64 -d fd00::2/128 -m conntrack --ctstate DNAT"
        " -m mark --mark 0x1000/0x1000 -j MASQUERADE\n"
    ),
}


def _fake_run(argv, stdin=None):
    if argv[0] == "nft":
        return subprocess.CompletedProcess(argv, 0, json.dumps(_NFT_JSON), "")
    out = _IPT_S.get((4 if argv[0] == "iptables" else 6, argv[-1]))
    return subprocess.CompletedProcess(argv, 0 if out else 1, out or "", "" if out else "no")


@pytest.mark.parametrize("backend", ["nft", "iptables"])
def test_installed_reads_hostports_back(monkeypatch, backend):
    monkeypatch.setattr(sync, "_run", _fake_run)
    monkeypatch.setattr(sync.shutil, "which", lambda tool: f"/usr/sbin/{tool}")
    assert sync.installed(backend) == HP


# --------------------------------------------------------------------------- store


NET = "pods"
SET4 = parse_range_set([{"subnet": "10.244.1.0/24"}], "r4")
SET6 = parse_range_set([{"subnet": "fd00:10:244:1::/64"}], "r6")
SET4B = parse_range_set([{"subnet": "10.244.2.0/24"}], "r4b")


@pytest.fixture
def store(tmp_path):
    s = Store(str(tmp_path / "data"))
    yield s
    s.close()


def _attach(store, cid, mappings, sets=(SET4, SET6), network=NET):
    return store.add_attachment(
        network, cid, "eth0", f"veth{cid}", f"/proc/1/ns/{cid}", list(sets), [], mappings
    )


def test_store_keeps_mappings_with_the_attachment(store):
    want = [
        PortMapping(8080, 80),
        PortMapping(53, 5353, "udp", ip_address("10.0.0.5")),
        PortMapping(9, 9, "tcp", ip_address("::")),
    ]
    _attach(store, "c1", want)
    _attach(store, "c2", [])
    assert store.get_attachment(NET, "c1", "eth0").port_mappings == want
    assert store.get_attachment(NET, "c2", "eth0").port_mappings == []
    assert [a.container_id for a in store.attachments_with_port_mappings()] == ["c1"]
    store.remove_attachment(NET, "c1", "eth0")
    assert store.attachments_with_port_mappings() == []
    assert store.conn.execute("SELECT COUNT(*) FROM port_mappings").fetchone()[0] == 0


@pytest.mark.parametrize(
    "first, second, sets2, clash",
    [
        (PortMapping(8080, 80), PortMapping(8080, 81), (SET4,), True),
        (PortMapping(8080, 80), PortMapping(8080, 80, "udp"), (SET4,), False),
        (
            PortMapping(8080, 80),
            PortMapping(8080, 80, host_ip=ip_address("10.0.0.5")),
            (SET4,),
            True,
        ),
        (
            PortMapping(8080, 80, host_ip=ip_address("10.0.0.6")),
            PortMapping(8080, 80, host_ip=ip_address("10.0.0.5")),
            (SET4,),
            False,
        ),
        (
            PortMapping(8080, 80, host_ip=ip_address("0.0.0.0")),
            PortMapping(8080, 80, host_ip=ip_address("::")),
            (SET6,),
            False,
        ),
        # A pod with only IPv6 addresses does not take the IPv4 port.
        (
            PortMapping(8080, 80, host_ip=ip_address("0.0.0.0")),
            PortMapping(8080, 80),
            (SET6,),
            False,
        ),
    ],
)
def test_store_refuses_a_port_taken_twice(store, first, second, sets2, clash):
    _attach(store, "c1", [first])
    if not clash:
        _attach(store, "c2", [second], sets=sets2, network="other")
        return
    with pytest.raises(CniError) as info:
        _attach(store, "c2", [PortMapping(9000, 90), second], sets=sets2, network="other")
    assert info.value.code == ADDRESS_UNAVAILABLE
    assert "host port 8080/tcp" in info.value.msg and "c1" in info.value.msg
    # Nothing of the refused attachment was recorded.
    assert [a.container_id for a in store.list_attachments()] == ["c1"]
    assert store.conn.execute("SELECT COUNT(*) FROM port_mappings").fetchone()[0] == 1


def test_store_made_before_port_mappings_gains_them(tmp_path):
    """A database written by the previous release (no port_mappings table) opens, keeps its
    attachments and takes mappings from then on."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    conn = sqlite3.connect(data / "pycni.db")
    conn.executescript(schema._SCHEMA + "PRAGMA user_version=1;")
    conn.execute(
        "INSERT INTO attachments (network, container_id, ifname, host_veth, netns,"
        " created) VALUES ('pods', 'old', 'eth0', 'veth0', '/proc/1/ns/net', 1.0)"
    )
    conn.commit()
    conn.close()
    with Store(str(data)) as s:
        assert s.get_attachment(NET, "old", "eth0").port_mappings == []
        _attach(s, "c1", [PortMapping(8080, 80)])
        assert s.get_attachment(NET, "c1", "eth0").port_mappings == [PortMapping(8080, 80)]
        assert s.conn.execute("PRAGMA user_version").fetchone()[0] == schema.SCHEMA_VERSION
    with Store(str(data)) as s:  # opening again changes nothing
        assert len(s.attachments_with_port_mappings()) == 1


# --------------------------------------------------------------------------- desired state


def test_desired_rules_from_the_store(store):
    store.set_network(
        NET,
        {"ipMasq": False, "subnets": ["10.244.1.0/24", "fd00:10:244:1::/64"], "bridge": "br-test"},
    )
    assert core.desired_rules(store) == RuleSet()
    _attach(
        store,
        "c1",
        [
            PortMapping(8080, 80),
            PortMapping(53, 53, "udp", ip_address("192.0.2.1")),
            PortMapping(443, 8443, "tcp", ip_address("::")),
        ],
    )
    _attach(store, "c2", [])
    _attach(
        store,
        "c3",
        [PortMapping(9090, 90, "tcp", ip_address("0.0.0.0"))],
        sets=(SET4B,),
        network="v4only",
    )
    rules = core.desired_rules(store)
    assert rules.hostports == tuple(
        sorted(
            [
                HostPort("tcp", 8080, "10.244.1.2", 80),
                HostPort("udp", 53, "10.244.1.2", 53, "192.0.2.1"),
                HostPort("tcp", 8080, "fd00:10:244:1::2", 80),
                HostPort("tcp", 443, "fd00:10:244:1::2", 8443),
                HostPort("tcp", 9090, "10.244.2.2", 90),
            ],
            key=HostPort.sort_key,
        )
    )
    assert rules.hairpin == (
        ip_interface("10.244.1.2/24"),
        ip_interface("10.244.2.2/24"),
        ip_interface("fd00:10:244:1::2/64"),
    )
    assert rules.masquerade == () and rules.forward == ()
    store.remove_attachment(NET, "c1", "eth0")
    store.remove_attachment("v4only", "c3", "eth0")
    assert core.desired_rules(store) == RuleSet()


def test_sync_sets_route_localnet_around_the_guard(store, monkeypatch):
    calls: list = []
    monkeypatch.setattr(
        sync,
        "apply",
        lambda rules, backend=None: calls.append(("apply", rules.guards_localnet())) or "nft",
    )
    monkeypatch.setattr(
        core.sysctl, "set_route_localnet", lambda bridge, on: calls.append((bridge, on))
    )
    monkeypatch.setattr(sync, "installed_stores", lambda backend=None: ())  # no kernel here
    store.set_network(NET, {"ipMasq": False, "subnets": ["10.244.1.0/24"], "bridge": "br-a"})
    store.set_network("six", {"ipMasq": False, "subnets": ["fd00:10:244:1::/64"], "bridge": "br-b"})
    _attach(store, "c1", [PortMapping(8080, 80)], sets=(SET4,))
    _attach(store, "c2", [PortMapping(8080, 80)], sets=(SET6,), network="six")
    core.sync(store)
    # On only where IPv4 hostPorts are, after the guard is in; off elsewhere, before.
    assert calls == [("br-b", False), ("apply", True), ("br-a", True)]
    calls.clear()
    core.sync(store)
    assert calls == []  # nothing changed: nothing done
    store.remove_attachment(NET, "c1", "eth0")
    core.sync(store)
    assert sorted(calls[:2]) == [("br-a", False), ("br-b", False)]
    assert calls[2:] == [("apply", False)]


def _unmarked(value):
    """The same listing as pycni wrote it before the hairpin mark."""
    if isinstance(value, dict):
        if "mangle" in value or value.get("match", {}).get("left", {}).get("&"):
            return None
        return {k: _unmarked(v) for k, v in value.items()}
    if isinstance(value, list):
        return [u for u in (_unmarked(v) for v in value) if u is not None]
    return value


@pytest.mark.parametrize("backend", ["nft", "iptables"])
def test_rules_from_before_the_hairpin_mark_read_back_as_different(monkeypatch, backend):
    """An upgraded node's table still masquerades every DNAT to a hostPort pod: it must not
    read back as the wanted set, so the agent's repair replaces it."""
    old_ipt = {
        k: "".join(
            line.replace(" -m mark --mark 0x1000/0x1000", "") + "\n"
            for line in v.splitlines()
            if "--set-xmark" not in line
        )
        for k, v in _IPT_S.items()
    }

    def old_run(argv, stdin=None):
        if argv[0] == "nft":
            return subprocess.CompletedProcess(argv, 0, json.dumps(_unmarked(_NFT_JSON)), "")
        out = old_ipt.get((4 if argv[0] == "iptables" else 6, argv[-1]))
        return subprocess.CompletedProcess(argv, 0 if out else 1, out or "", "" if out else "no")

    monkeypatch.setattr(sync, "_run", old_run)
    monkeypatch.setattr(sync.shutil, "which", lambda tool: f"/usr/sbin/{tool}")
    old = sync.installed(backend)
    assert old is not None and old != HP
    assert old.hairpin == () and old.hostports == ()
