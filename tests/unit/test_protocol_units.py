"""The CNI protocol layer without the kernel: results in every version, config parsing, the
CNI_* environment rules, version selection and the plugin's early error paths."""

from __future__ import annotations

import copy
import ipaddress
import json
import logging

import pytest

from pycni import plugin
from pycni.cni import env as cnienv
from pycni.cni import netconf, result, versions
from pycni.cni.errors import (
    DECODING_FAILURE,
    INCOMPATIBLE_VERSION,
    INVALID_ENVIRONMENT,
    INVALID_NETWORK_CONFIG,
    CniError,
)

ALL = ["0.1.0", "0.2.0", "0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]
LEGACY = ALL[:2]
V03 = ["0.3.0", "0.3.1", "0.4.0"]
V1 = ["1.0.0", "1.1.0"]

ip_if = ipaddress.ip_interface
ip_addr = ipaddress.ip_address
ip_net = ipaddress.ip_network


def code_of(fn, *args, **kw) -> CniError:
    with pytest.raises(CniError) as info:
        fn(*args, **kw)
    return info.value


# --- versions -------------------------------------------------------------------------------


def test_supported_versions_exact():
    assert list(versions.SUPPORTED) == ALL
    assert versions.LATEST == "1.1.0"
    assert versions.IMPLICIT == "0.2.0"


@pytest.mark.parametrize(
    "conf, want",
    [
        ({"cniVersion": "0.3.1"}, "0.3.1"),
        ({"cniVersion": "1.1.0", "cniVersions": ["0.1.0"]}, "1.1.0"),  # cniVersion wins
        ({"cniVersions": ["0.3.1", "1.0.0", "0.4.0"]}, "1.0.0"),
        ({"cniVersions": ["0.4.0", "1.0.0", "1.1.0", "2.0.0", "1.10.0"]}, "1.1.0"),
        ({"cniVersions": ["0.10.0", "0.3.0"]}, "0.3.0"),  # compared numerically, not as text
        ({}, "0.2.0"),
    ],
)
def test_from_config(conf, want):
    assert versions.from_config(conf) == want


@pytest.mark.parametrize(
    "conf, code",
    [
        ({"cniVersion": "0.5.0"}, INCOMPATIBLE_VERSION),
        ({"cniVersion": "1.1"}, INCOMPATIBLE_VERSION),
        ({"cniVersion": ""}, INCOMPATIBLE_VERSION),
        ({"cniVersions": ["3.0.0"]}, INCOMPATIBLE_VERSION),
        ({"cniVersions": []}, INCOMPATIBLE_VERSION),
        ({"cniVersion": 1.0}, INVALID_NETWORK_CONFIG),
        ({"cniVersions": "1.0.0"}, INVALID_NETWORK_CONFIG),
        ({"cniVersions": [1]}, INVALID_NETWORK_CONFIG),
    ],
)
def test_from_config_errors(conf, code):
    err = code_of(versions.from_config, conf)
    assert err.code == code
    if code == INCOMPATIBLE_VERSION:
        assert "1.1.0" in err.details


def test_at_least_and_parse():
    assert versions.at_least("1.0.0", "0.4.0")
    assert versions.at_least("0.4.0", "0.4.0")
    assert not versions.at_least("0.3.1", "0.4.0")
    assert versions.at_least("0.10.0", "0.4.0")
    assert versions.parse("1.1.0") == (1, 1, 0)
    for bad in ("1.0", "1.0.0.0", "a.b.c", "", "1.-1.0"):
        with pytest.raises(ValueError):
            versions.parse(bad)


@pytest.mark.parametrize("version", ALL)
def test_require(version):
    for minimum, command in (("0.4.0", "CHECK"), ("1.1.0", "GC"), ("1.1.0", "STATUS")):
        if versions.at_least(version, minimum):
            versions.require(version, minimum, command)
        else:
            err = code_of(versions.require, version, minimum, command)
            assert err.code == INCOMPATIBLE_VERSION
            assert command in err.msg and version in err.msg and minimum in err.msg


# --- env ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cid", ["abc", "A1", "a.b-c_d", "0" * 64, "x" * 1024, "k8s_POD_web-0_default_5f1e.1"]
)
def test_container_id_valid(cid):
    cnienv.validate_container_id(cid)


@pytest.mark.parametrize(
    "cid",
    ["", "-a", ".a", "_a", "a/b", "../x", "..", "a b", "a\n", "a;b", "café", "x" * 1025, "a\0b"],
)
def test_container_id_invalid(cid):
    err = code_of(cnienv.validate_container_id, cid)
    assert err.code == INVALID_ENVIRONMENT and "CNI_CONTAINERID" in err.msg


@pytest.mark.parametrize("name", ["eth0", "e" * 15, "net1.100", "a-b_c", "...", "é" * 7])
def test_ifname_valid(name):
    cnienv.validate_ifname(name)


@pytest.mark.parametrize(
    "name", ["", "e" * 16, "é" * 8, ".", "..", "a/b", "a:b", "a b", "a\tb", "a\nb", "a\0b", "\x7f"]
)
def test_ifname_invalid(name):
    err = code_of(cnienv.validate_ifname, name)
    assert err.code == INVALID_ENVIRONMENT and "CNI_IFNAME" in err.msg


@pytest.mark.parametrize(
    "raw, want",
    [
        ("", {}),
        ("IP=10.244.1.5", {"IP": "10.244.1.5"}),
        (
            "IgnoreUnknown=1;K8S_POD_NAME=web;;IP=",
            {"IgnoreUnknown": "1", "K8S_POD_NAME": "web", "IP": ""},
        ),
        ("A=b=c;", {"A": "b=c"}),
    ],
)
def test_cni_args(raw, want):
    assert cnienv.parse_cni_args(raw) == want


@pytest.mark.parametrize("raw", ["IP", "A=1;B", "=1", ";=;"])
def test_cni_args_malformed(raw):
    err = code_of(cnienv.parse_cni_args, raw)
    assert err.code == INVALID_ENVIRONMENT and "CNI_ARGS" in err.msg


BASE_ENV = {
    "CNI_CONTAINERID": "c1",
    "CNI_IFNAME": "eth0",
    "CNI_NETNS": "/run/netns/p",
    "CNI_PATH": "/opt/cni/bin:/usr/lib/cni",
}


def test_from_environ_add():
    req = cnienv.from_environ({**BASE_ENV, "CNI_COMMAND": "ADD", "CNI_ARGS": "IP=10.0.0.1"})
    assert req == cnienv.Request(
        "ADD", "c1", "/run/netns/p", "eth0", {"IP": "10.0.0.1"}, ("/opt/cni/bin", "/usr/lib/cni")
    )


@pytest.mark.parametrize("command", ["VERSION", "STATUS", "GC"])
def test_from_environ_commands_without_container(command):
    req = cnienv.from_environ({"CNI_COMMAND": command, "CNI_CONTAINERID": "../bad"})
    assert req.command == command and req.container_id == ""


def test_from_environ_del_may_lack_netns():
    req = cnienv.from_environ({**BASE_ENV, "CNI_COMMAND": "DEL", "CNI_NETNS": ""})
    assert req.netns == ""


@pytest.mark.parametrize("command", ["ADD", "CHECK"])
def test_from_environ_add_check_need_netns(command):
    env = {k: v for k, v in BASE_ENV.items() if k != "CNI_NETNS"}
    err = code_of(cnienv.from_environ, {**env, "CNI_COMMAND": command})
    assert err.code == INVALID_ENVIRONMENT and "CNI_NETNS" in err.msg


@pytest.mark.parametrize(
    "override, word",
    [
        ({"CNI_COMMAND": ""}, "CNI_COMMAND"),
        ({"CNI_COMMAND": "ATTACH"}, "ATTACH"),
        ({"CNI_CONTAINERID": ""}, "CNI_CONTAINERID"),
        ({"CNI_IFNAME": ""}, "CNI_IFNAME"),
        ({"CNI_NETNS": "netns/p"}, "CNI_NETNS"),
        ({"CNI_NETNS": "/run/netns/a\0b"}, "CNI_NETNS"),
        ({"CNI_ARGS": "junk"}, "CNI_ARGS"),
    ],
)
def test_from_environ_errors(override, word):
    err = code_of(cnienv.from_environ, {**BASE_ENV, "CNI_COMMAND": "ADD", **override})
    assert err.code == INVALID_ENVIRONMENT and word in err.msg


# --- result ---------------------------------------------------------------------------------


def full_result() -> result.Result:
    """Dual stack, two v4 addresses, route extras, interface MTU: every feature at once."""
    return result.Result(
        interfaces=[
            result.Interface("cni0", "0a:58:0a:f4:01:01"),
            result.Interface("veth0123456789a", "ee:ee:ee:ee:ee:01"),
            result.Interface("eth0", "0a:58:0a:f4:01:02", "/run/netns/p", mtu=1400),
        ],
        ips=[
            result.IPConfig(ip_if("10.244.1.2/24"), ip_addr("10.244.1.1"), 2),
            result.IPConfig(ip_if("fd00:10:244:1::2/64"), ip_addr("fd00:10:244:1::1"), 2),
            result.IPConfig(ip_if("10.245.1.2/24"), ip_addr("10.245.1.1"), 2),
        ],
        routes=[
            result.Route(ip_net("0.0.0.0/0"), ip_addr("10.244.1.1"), {"mtu": 1400, "priority": 5}),
            result.Route(ip_net("::/0"), ip_addr("fd00:10:244:1::1")),
            result.Route(ip_net("10.96.0.0/12"), None, {"table": 100, "scope": 0}),
        ],
        dns={"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]},
    )


def test_to_json_110():
    assert full_result().to_json("1.1.0") == {
        "cniVersion": "1.1.0",
        "interfaces": [
            {"name": "cni0", "mac": "0a:58:0a:f4:01:01"},
            {"name": "veth0123456789a", "mac": "ee:ee:ee:ee:ee:01"},
            {"name": "eth0", "mac": "0a:58:0a:f4:01:02", "mtu": 1400, "sandbox": "/run/netns/p"},
        ],
        "ips": [
            {"address": "10.244.1.2/24", "gateway": "10.244.1.1", "interface": 2},
            {"address": "fd00:10:244:1::2/64", "gateway": "fd00:10:244:1::1", "interface": 2},
            {"address": "10.245.1.2/24", "gateway": "10.245.1.1", "interface": 2},
        ],
        "routes": [
            {"dst": "0.0.0.0/0", "gw": "10.244.1.1", "mtu": 1400, "priority": 5},
            {"dst": "::/0", "gw": "fd00:10:244:1::1"},
            {"dst": "10.96.0.0/12", "table": 100, "scope": 0},
        ],
        "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]},
    }


@pytest.mark.parametrize("version", V03 + ["1.0.0"])
def test_to_json_before_110_drops_110_extras(version):
    out = full_result().to_json(version)
    assert out["cniVersion"] == version
    assert all("mtu" not in i for i in out["interfaces"])
    assert out["routes"] == [
        {"dst": "0.0.0.0/0", "gw": "10.244.1.1"},
        {"dst": "::/0", "gw": "fd00:10:244:1::1"},
        {"dst": "10.96.0.0/12"},
    ]
    families = [ip.get("version") for ip in out["ips"]]
    if version in V03:
        assert families == ["4", "6", "4"]
    else:
        assert families == [None, None, None]
    assert [ip["address"] for ip in out["ips"]] == [
        "10.244.1.2/24",
        "fd00:10:244:1::2/64",
        "10.245.1.2/24",
    ]


@pytest.mark.parametrize("version", LEGACY)
def test_to_json_legacy_dual_stack_routes_split_by_family(version):
    out = full_result().to_json(version)
    assert out == {
        "cniVersion": version,
        "ip4": {
            "ip": "10.244.1.2/24",
            "gateway": "10.244.1.1",
            "routes": [{"dst": "0.0.0.0/0", "gw": "10.244.1.1"}, {"dst": "10.96.0.0/12"}],
        },
        "ip6": {
            "ip": "fd00:10:244:1::2/64",
            "gateway": "fd00:10:244:1::1",
            "routes": [{"dst": "::/0", "gw": "fd00:10:244:1::1"}],
        },
        "dns": {"nameservers": ["10.96.0.10"], "search": ["svc.cluster.local"]},
    }


def test_to_json_legacy_single_family_and_no_gateway():
    res = result.Result(ips=[result.IPConfig(ip_if("fd00::5/64"))])
    assert res.to_json("0.2.0") == {"cniVersion": "0.2.0", "ip6": {"ip": "fd00::5/64"}, "dns": {}}


@pytest.mark.parametrize("version", ALL)
def test_round_trip_is_stable(version):
    first = full_result().to_json(version)
    parsed = result.parse(copy.deepcopy(first), version)
    assert parsed.to_json(version) == first
    # Through JSON text too, as a prevResult arrives.
    assert result.parse(json.loads(json.dumps(first)), version).to_json(version) == first


def test_round_trip_110_is_lossless():
    res = full_result()
    assert result.parse(res.to_json("1.1.0"), "1.1.0") == res


@pytest.mark.parametrize("version", V03 + ["1.0.0"])
def test_round_trip_before_110_loses_only_110_extras(version):
    want = full_result()
    want.interfaces[2].mtu = None
    for r in want.routes:
        r.extras = {}
    assert result.parse(full_result().to_json(version), version) == want


@pytest.mark.parametrize("version", LEGACY)
def test_round_trip_legacy_keeps_first_ip_per_family(version):
    back = result.parse(full_result().to_json(version), version)
    assert [str(ip.address) for ip in back.ips] == ["10.244.1.2/24", "fd00:10:244:1::2/64"]
    assert [str(ip.gateway) for ip in back.ips] == ["10.244.1.1", "fd00:10:244:1::1"]
    assert [str(r.dst) for r in back.routes] == ["0.0.0.0/0", "10.96.0.0/12", "::/0"]
    assert back.interfaces == []
    # Up-converting a legacy result gives 1.x shape with no interface index.
    up = back.to_json("1.0.0")
    assert up["ips"][0] == {"address": "10.244.1.2/24", "gateway": "10.244.1.1"}
    assert "interfaces" not in up


def test_parse_ignores_version_field_and_unknown_keys():
    data = {
        "cniVersion": "0.3.1",
        "ips": [{"version": "4", "address": "10.0.0.2/8", "interface": 0}],
        "interfaces": [{"name": "eth0", "sandbox": "/x", "somethingNew": 1}],
        "extra": 1,
    }
    res = result.parse(data, "0.3.1")
    assert res.ips == [result.IPConfig(ip_if("10.0.0.2/8"), None, 0)]
    assert res.interfaces == [result.Interface("eth0", "", "/x")]


@pytest.mark.parametrize(
    "data, version",
    [
        ([], "1.1.0"),
        ("x", "1.1.0"),
        ({"ips": [{"address": "nope"}]}, "1.1.0"),
        ({"ips": [{}]}, "1.0.0"),
        ({"ips": "10.0.0.2/8"}, "1.0.0"),
        ({"interfaces": [{"mac": "x"}]}, "1.1.0"),
        ({"interfaces": [{"name": "e", "mtu": "big"}]}, "1.1.0"),
        ({"routes": [{"gw": "10.0.0.1"}]}, "0.4.0"),
        ({"routes": [{"dst": "10.0.0.0/40"}]}, "0.4.0"),
        ({"ip4": {"gateway": "10.0.0.1"}}, "0.2.0"),
        ({"ip4": {"ip": "10.0.0.2/8", "routes": [{"dst": "x"}]}}, "0.2.0"),
        ({"ip4": "10.0.0.2/8"}, "0.1.0"),
    ],
)
def test_parse_errors_are_code_6(data, version):
    err = code_of(result.parse, data, version)
    assert err.code == DECODING_FAILURE and "prevResult" in err.msg


# --- netconf --------------------------------------------------------------------------------

REQ = cnienv.Request("ADD", "c1", "/run/netns/p", "eth0")


def parse(conf: dict, request: cnienv.Request = REQ) -> netconf.NetConf:
    return netconf.parse(conf, request)


def test_seed_config_parses():
    seed = {
        "cniVersion": "0.3.1",
        "name": "my-cni-demo",
        "type": "bash-cni",
        "network": "10.244.0.0/16",
        "subnet": "10.244.1.0/24",
    }
    nc = parse(seed)
    assert nc.cni_version == "0.3.1" and nc.name == "my-cni-demo" and nc.type == "bash-cni"
    assert nc.cluster_cidrs == [ip_net("10.244.0.0/16")]
    (rs,) = nc.range_sets
    (r,) = rs.ranges
    assert r.subnet == ip_net("10.244.1.0/24") and str(r.gateway) == "10.244.1.1"
    assert (str(r.range_start), str(r.range_end)) == ("10.244.1.1", "10.244.1.254")


def test_hairpin_mode_can_be_turned_off():
    base = {"cniVersion": "1.1.0", "name": "n", "subnet": "10.244.1.0/24"}
    assert parse({**base, "hairpinMode": False}).hairpin_mode is False
    assert parse({**base, "hairpinMode": True}).hairpin_mode is True
    with pytest.raises(CniError) as err:
        parse({**base, "hairpinMode": "yes"})
    assert err.value.code == 7 and "hairpinMode" in err.value.msg


def test_defaults():
    nc = parse({"cniVersion": "1.1.0", "name": "n", "subnet": "10.244.1.0/24"})
    assert nc.type == "pycni"
    assert nc.bridge == "cni0"
    assert nc.mtu is None
    assert nc.is_default_gateway is True
    # Hairpin on by default: a pod reaches itself through a Service (kube-proxy's DNAT).
    assert nc.ip_masq is False and nc.hairpin_mode is True
    assert nc.data_dir == "/var/lib/pycni"
    assert nc.log_file == "/var/log/pycni.log" and nc.log_level == "info"
    assert nc.dns == {} and nc.routes == [] and nc.cluster_cidrs == []
    assert nc.requested_ips == [] and nc.mac is None
    assert nc.prev_result is None and nc.valid_attachments is None
    assert nc.disable_check is False and nc.disable_gc is False


def test_explicit_nulls_mean_defaults():
    nc = parse(
        {
            "cniVersion": "1.1.0",
            "name": "n",
            "subnet": "10.244.1.0/24",
            "mtu": None,
            "bridge": None,
            "ipMasq": None,
            "dataDir": None,
            "prevResult": None,
        }
    )
    assert nc.mtu is None and nc.bridge == "cni0" and nc.data_dir == "/var/lib/pycni"
    assert nc.prev_result is None


def test_ipam_section_host_local():
    conf = {
        "cniVersion": "1.0.0",
        "name": "n",
        "type": "bridge",
        "bridge": "br0",
        "isDefaultGateway": False,
        "ipMasq": True,
        "mtu": 1450,
        "ipam": {
            "type": "host-local",
            "subnet": "10.244.3.0/24",
            "rangeStart": "10.244.3.10",
            "rangeEnd": "10.244.3.20",
            "gateway": "10.244.3.254",
            "routes": [{"dst": "10.96.0.0/12"}],
            "dataDir": "/var/lib/cni/networks",
        },
    }
    nc = parse(conf)
    (r,) = nc.range_sets[0].ranges
    assert (str(r.range_start), str(r.range_end), str(r.gateway)) == (
        "10.244.3.10",
        "10.244.3.20",
        "10.244.3.254",
    )
    assert [(str(x.dst), x.gw) for x in nc.routes] == [("10.96.0.0/12", None)]
    assert nc.data_dir == "/var/lib/cni/networks"
    assert nc.bridge == "br0" and nc.mtu == 1450
    assert nc.is_default_gateway is False and nc.ip_masq is True


def test_ipam_section_ranges_dual_stack():
    conf = {
        "cniVersion": "1.0.0",
        "name": "n",
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:10:244:1::/64"}]],
        },
    }
    nc = parse(conf)
    assert [rs.family for rs in nc.range_sets] == [4, 6]


def test_top_level_keys_win_over_ipam():
    conf = {
        "cniVersion": "1.0.0",
        "name": "n",
        "subnet": "10.244.1.0/24",
        "dataDir": "/top",
        "ipam": {"type": "host-local", "dataDir": "/ipam"},
    }
    assert parse(conf).data_dir == "/top"


@pytest.mark.parametrize("kind", ["", "pycni", "host-local"])
def test_ipam_types_accepted(kind):
    parse({"cniVersion": "1.0.0", "name": "n", "ipam": {"type": kind, "subnet": "10.244.1.0/24"}})


@pytest.mark.parametrize(
    "conf, key",
    [
        ({"ipam": {"type": "dhcp"}}, "ipam.type"),
        ({"ipam": {"type": "static"}}, "ipam.type"),
        ({"mtu": "1500"}, "mtu"),
        ({"mtu": True}, "mtu"),
        ({"mtu": 1500.0}, "mtu"),
        ({"mtu": 575}, "mtu"),
        ({"mtu": 65536}, "mtu"),
        ({"ipMasq": "yes"}, "ipMasq"),
        ({"ipMasq": 1}, "ipMasq"),
        ({"isDefaultGateway": "true"}, "isDefaultGateway"),
        ({"bridge": 5}, "bridge"),
        ({"bridge": "a-very-long-bridge"}, "bridge"),
        ({"name": 7}, "name"),
        ({"name": "a" * 129}, "name"),
        ({"dataDir": "relative"}, "dataDir"),
        ({"dataDir": "/var/lib/../etc"}, "dataDir"),
        ({"logFile": "x.log"}, "logFile"),
        ({"dns": ["10.96.0.10"]}, "dns"),
        ({"dns": {"nameservers": ["ns.example"]}}, "dns.nameservers"),
        ({"dns": {"search": "a b"}}, "dns.search"),
        ({"dns": {"domain": 5}}, "dns.domain"),
        ({"routes": [{"dst": "10.0.0.0/8", "gw": "fd00::1"}]}, "routes[0].gw"),
        ({"network": 10}, "network"),
        ({"network": "10.244.0.0/33"}, "network"),
        ({"runtimeConfig": []}, "runtimeConfig"),
        ({"runtimeConfig": {"ips": [5]}}, "runtimeConfig.ips"),
        ({"runtimeConfig": {"ips": ["10.244.1.300"]}}, "runtimeConfig.ips"),
        ({"args": {"cni": {"ips": "10.244.1.5"}}}, "args.cni.ips"),
        ({"runtimeConfig": {"mac": "0a:58:0a:f4:01"}}, "runtimeConfig.mac"),
        ({"runtimeConfig": {"mac": "03:00:00:00:00:01"}}, "runtimeConfig.mac"),
        ({netconf.VALID_ATTACHMENTS: {}}, netconf.VALID_ATTACHMENTS),
        (
            {netconf.VALID_ATTACHMENTS: [{"containerID": "c1", "ifname": 0}]},
            netconf.VALID_ATTACHMENTS + "[0]",
        ),
    ],
)
def test_config_errors_name_the_key(conf, key):
    base = {"cniVersion": "1.1.0", "name": "n", "subnet": "10.244.1.0/24"}
    err = code_of(parse, {**base, **conf})
    assert err.code == INVALID_NETWORK_CONFIG
    assert err.msg.startswith(f"invalid network config: {key}: "), err.msg


def test_mtu_floor_is_1280_with_ipv6():
    base = {"cniVersion": "1.1.0", "name": "n", "mtu": 1000}
    assert parse({**base, "subnet": "10.244.1.0/24"}).mtu == 1000
    err = code_of(parse, {**base, "subnet": "fd00::/64"})
    assert "1280" in err.msg


def test_requested_ips_from_every_source_deduplicated():
    req = cnienv.Request(
        "ADD",
        "c1",
        "/run/netns/p",
        "eth0",
        args={"IP": "10.244.1.7, fd00::7", "K8S_POD_NAME": "web"},
    )
    nc = parse(
        {
            "cniVersion": "1.1.0",
            "name": "n",
            "subnet": "10.244.1.0/24",
            "runtimeConfig": {"ips": ["10.244.1.5/24"], "mac": "0A:58:0A:F4:01:09"},
            "args": {"cni": {"ips": ["10.244.1.6", "10.244.1.5"]}},
        },
        req,
    )
    assert [str(ip) for ip in nc.requested_ips] == [
        "10.244.1.5",
        "10.244.1.6",
        "10.244.1.7",
        "fd00::7",
    ]
    assert nc.mac == "0a:58:0a:f4:01:09"


def test_args_cni_mac_used_when_runtime_config_has_none():
    nc = parse(
        {
            "cniVersion": "1.1.0",
            "name": "n",
            "subnet": "10.244.1.0/24",
            "args": {"cni": {"mac": "0a:00:00:00:00:01"}},
        }
    )
    assert nc.mac == "0a:00:00:00:00:01"


def test_prev_result_parsed_in_config_version():
    legacy = {"cniVersion": "0.2.0", "ip4": {"ip": "10.1.0.5/16", "gateway": "10.1.0.1"}}
    nc = parse(
        {"cniVersion": "0.2.0", "name": "n", "subnet": "10.244.1.0/24", "prevResult": legacy}
    )
    assert nc.prev_result == result.Result(
        ips=[result.IPConfig(ip_if("10.1.0.5/16"), ip_addr("10.1.0.1"))]
    )


def test_damaged_prev_result_is_ignored_only_by_del():
    conf = {
        "cniVersion": "1.1.0",
        "name": "n",
        "subnet": "10.244.1.0/24",
        "prevResult": {"ips": [{"address": "nope"}]},
    }
    assert parse(conf, cnienv.Request("DEL", "c1", "", "eth0")).prev_result is None
    for command in ("ADD", "CHECK"):
        err = code_of(parse, conf, cnienv.Request(command, "c1", "/run/netns/p", "eth0"))
        assert err.code == DECODING_FAILURE and "prevResult" in err.msg


def test_valid_attachments():
    nc = parse(
        {
            "cniVersion": "1.1.0",
            "name": "n",
            "subnet": "10.244.1.0/24",
            netconf.VALID_ATTACHMENTS: [
                {"containerID": "a", "ifname": "eth0"},
                {"containerID": "b", "ifname": "net1"},
            ],
        }
    )
    assert nc.valid_attachments == {("a", "eth0"), ("b", "net1")}
    nc = parse(
        {
            "cniVersion": "1.1.0",
            "name": "n",
            "subnet": "10.244.1.0/24",
            netconf.VALID_ATTACHMENTS: [],
        }
    )
    assert nc.valid_attachments == set()


@pytest.mark.parametrize(
    "data, word",
    [
        (b"", "JSON"),
        (b"{", "JSON"),
        (b"\xff", "JSON"),
        (b"null", "object"),
        (b"[{}]", "object"),
        (b"{}" + b" " * (4 << 20), "larger"),
    ],
)
def test_decode_errors(data, word):
    err = code_of(netconf.decode, data)
    assert err.code == DECODING_FAILURE and word in err.msg


def test_decode_accepts_exactly_the_limit():
    body = b'{"pad": "' + b"a" * ((4 << 20) - 11) + b'"}'
    assert len(body) == 4 << 20
    assert netconf.decode(body)["pad"].startswith("aaa")


# --- plugin.handle (paths that never reach the kernel) --------------------------------------


def test_handle_version():
    out, status = plugin.handle({"CNI_COMMAND": "VERSION"}, b'{"cniVersion": "0.3.1"}')
    assert status == 0 and out == {"cniVersion": "0.3.1", "supportedVersions": ALL}
    out, status = plugin.handle({"CNI_COMMAND": "VERSION"}, b"garbage")
    assert status == 0 and out == {"cniVersion": "1.1.0", "supportedVersions": ALL}


@pytest.mark.parametrize(
    "stdin, code, version",
    [
        (b"{", DECODING_FAILURE, "1.1.0"),
        (b'{"cniVersion": "0.3.1"}', INVALID_NETWORK_CONFIG, "0.3.1"),  # answers in its version
        (b'{"cniVersion": "7.0.0", "name": "n"}', INCOMPATIBLE_VERSION, "1.1.0"),
        (
            b'{"cniVersion": "0.3.1", "name": "n", "subnet": "10.244.1.0/24", "logFile": "LOG"}',
            INCOMPATIBLE_VERSION,
            "0.3.1",
        ),  # CHECK needs 0.4.0
    ],
)
def test_handle_errors(stdin, code, version, tmp_path):
    logger = logging.getLogger("pycni")
    handlers = list(logger.handlers)
    stdin = stdin.replace(b"LOG", str(tmp_path / "pycni.log").encode())
    try:
        out, status = plugin.handle({**BASE_ENV, "CNI_COMMAND": "CHECK"}, stdin)
    finally:
        for h in logger.handlers[len(handlers) :]:
            logger.removeHandler(h)
            h.close()
    assert status == 1
    assert out["code"] == code and out["cniVersion"] == version, out
    json.dumps(out)


# --- fault injection: only under an explicit opt-in -----------------------------------------

FAULTS = {
    cnienv.FAIL_AFTER_ENV: "ipam",
    cnienv.KILL_AT_ENV: "veth",
    cnienv.PAUSE_AT_ENV: "host:/tmp/fifo",
}


@pytest.mark.parametrize("command", ["ADD", "DEL", "CHECK", "GC"])
def test_fault_variables_are_ignored_without_the_opt_in(command):
    env = {**BASE_ENV, **FAULTS, "CNI_COMMAND": command, cnienv.TEST_FAULTS_ENV: "1"}
    # The request's own PYCNI_TEST_FAULTS is no opt-in: the caller of from_environ decides.
    req = cnienv.from_environ(env)
    assert (req.fail_after, req.kill_at, req.pause_at) == ("", "", "")
    req = cnienv.from_environ(env, faults=True)
    assert (req.fail_after, req.kill_at, req.pause_at) == ("ipam", "veth", "host:/tmp/fifo")


@pytest.mark.parametrize("value, opted", [("1", True), ("", False), ("0", False), ("yes", False)])
def test_the_in_process_opt_in_is_exactly_one(value, opted):
    assert cnienv.faults_opted_in({cnienv.TEST_FAULTS_ENV: value}) is opted
    assert cnienv.faults_opted_in({}) is False
