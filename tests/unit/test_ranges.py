from ipaddress import ip_address, ip_network
from itertools import islice

import pytest

from pycni.cni.errors import INVALID_NETWORK_CONFIG, CniError
from pycni.ipam.ranges import Range, RangeSet, parse_range, parse_range_set, parse_ranges


def rs(*subnets: str) -> RangeSet:
    return parse_range_set([{"subnet": s} for s in subnets], "r")


def addrs(rset: RangeSet, after=None, n=None) -> list[str]:
    it = rset.candidates(ip_address(after) if after else None)
    return [str(ip) for _r, ip in (islice(it, n) if n else it)]


def test_v4_defaults():
    r = parse_range({"subnet": "10.244.1.0/24"}, "r")
    assert r.subnet == ip_network("10.244.1.0/24")
    assert str(r.range_start) == "10.244.1.1"
    assert str(r.range_end) == "10.244.1.254"
    assert str(r.gateway) == "10.244.1.1"
    assert r.capacity() == 253
    all_ = addrs(RangeSet((r,)))
    assert all_[0] == "10.244.1.2" and all_[-1] == "10.244.1.254" and len(all_) == 253


def test_reserved_and_contains():
    r = parse_range({"subnet": "10.0.0.0/24"}, "r")
    for ip in ("10.0.0.0", "10.0.0.1", "10.0.0.255"):
        assert r.is_reserved(ip_address(ip))
    assert not r.is_reserved(ip_address("10.0.0.2"))
    assert r.contains(ip_address("10.0.0.1"))  # reserved but inside [start, end]
    assert not r.contains(ip_address("10.0.0.255"))
    assert not r.contains(ip_address("10.0.1.1"))
    assert not r.contains(ip_address("::1"))


def test_v6_defaults():
    r = parse_range({"subnet": "fd00:10:244:1::/64"}, "r")
    assert str(r.range_start) == "fd00:10:244:1::1"
    assert str(r.range_end) == "fd00:10:244:1:ffff:ffff:ffff:ffff"
    assert str(r.gateway) == "fd00:10:244:1::1"
    assert r.capacity() == 2**64 - 2
    rset = RangeSet((r,))
    # lazy: a /64 is never materialised
    assert addrs(rset, n=2) == ["fd00:10:244:1::2", "fd00:10:244:1::3"]
    last = "fd00:10:244:1:ffff:ffff:ffff:ffff"
    assert addrs(rset, after=last, n=1) == ["fd00:10:244:1::2"]
    assert rset.find(ip_address(last)) is r


def test_v6_120():
    r = parse_range({"subnet": "fd00::/120"}, "r")
    assert r.capacity() == 254  # ::1..::ff minus the gateway; no broadcast in v6
    all_ = addrs(RangeSet((r,)))
    assert all_[0] == "fd00::2" and all_[-1] == "fd00::ff"


def test_slash30_has_one_address():
    r = parse_range({"subnet": "10.0.0.0/30"}, "r")
    assert r.capacity() == 1
    assert addrs(RangeSet((r,))) == ["10.0.0.2"]
    assert parse_range({"subnet": "fd00::/126"}, "r").capacity() == 2


def test_explicit_range_and_gateway():
    r = parse_range(
        {
            "subnet": "10.0.0.0/24",
            "rangeStart": "10.0.0.100",
            "rangeEnd": "10.0.0.110",
            "gateway": "10.0.0.254",
        },
        "r",
    )
    assert r.capacity() == 11
    r2 = parse_range({"subnet": "10.0.0.0/24", "gateway": "10.0.0.5"}, "r")
    assert r2.capacity() == 253  # .1 .. .254 minus .5
    assert "10.0.0.5" not in addrs(RangeSet((r2,)))
    assert addrs(RangeSet((r2,)), n=1) == ["10.0.0.1"]


def test_round_robin_order_and_wrap():
    rset = rs("10.0.0.0/30", "10.0.1.0/29")
    assert rset.capacity() == 1 + 5
    order = ["10.0.0.2", "10.0.1.2", "10.0.1.3", "10.0.1.4", "10.0.1.5", "10.0.1.6"]
    assert addrs(rset) == order
    assert addrs(rset, after="10.0.1.3") == order[3:] + order[:3]
    # after the last address: wrap to the first range
    assert addrs(rset, after="10.0.1.6") == order
    # after a reserved address (the gateway) inside a range: continue from it
    assert addrs(rset, after="10.0.1.1") == order[1:] + order[:1]
    # not in the set: start at the very beginning
    assert addrs(rset, after="192.168.0.1") == order
    assert addrs(rset, after="::1") == order
    assert rset.key == "10.0.0.0/30:10.0.0.1-10.0.0.2,10.0.1.0/29:10.0.1.1-10.0.1.6"
    assert rset.family == 4


def test_parse_ranges_dual_stack():
    sets = parse_ranges([[{"subnet": "10.244.0.0/16"}], [{"subnet": "fd00::/64"}]])
    assert [s.family for s in sets] == [4, 6]


def test_rangeset_direct_construction_checks():
    with pytest.raises(ValueError):
        RangeSet(())
    a = Range(ip_network("10.0.0.0/24"), ip_address("10.0.0.1"), ip_address("10.0.0.9"), None)
    b = Range(ip_network("fd00::/64"), ip_address("fd00::1"), ip_address("fd00::9"), None)
    with pytest.raises(ValueError):
        RangeSet((a, b))


S = "10.0.0.0/24"


@pytest.mark.parametrize(
    "obj, key, text",
    [
        ({}, "r.subnet", "required"),
        ({"subnet": 10}, "r.subnet", "string"),
        ({"subnet": "banana"}, "r.subnet", "not a CIDR"),
        ({"subnet": "10.0.0.0"}, "r.subnet", "prefix"),
        ({"subnet": "10.0.0.5/24"}, "r.subnet", "host bits set; did you mean 10.0.0.0/24?"),
        ({"subnet": "10.0.0.0/31"}, "r.subnet", "too small: needs room for the network"),
        ({"subnet": "fd00::/127"}, "r.subnet", "too small"),
        ({"subnet": S, "rangeStart": 5}, "r.rangeStart", "string"),
        ({"subnet": S, "rangeEnd": ["x"]}, "r.rangeEnd", "string"),
        ({"subnet": S, "gateway": 1}, "r.gateway", "string"),
        ({"subnet": S, "rangeStart": "10.0.0.x"}, "r.rangeStart", "not an IP"),
        ({"subnet": S, "rangeEnd": "nope"}, "r.rangeEnd", "not an IP"),
        ({"subnet": S, "gateway": "nope"}, "r.gateway", "not an IP"),
        ({"subnet": S, "rangeStart": "fd00::1"}, "r.rangeStart", "IPv6"),
        ({"subnet": S, "gateway": "fd00::1"}, "r.gateway", "IPv6"),
        ({"subnet": S, "rangeEnd": "10.0.1.5"}, "r.rangeEnd", "outside"),
        ({"subnet": S, "gateway": "10.0.1.1"}, "r.gateway", "outside"),
        (
            {"subnet": S, "rangeStart": "10.0.0.50", "rangeEnd": "10.0.0.40"},
            "r.rangeStart",
            "after",
        ),
        ({"subnet": S, "gateway": "10.0.0.0"}, "r.gateway", "network address"),
        ({"subnet": S, "gateway": "10.0.0.255"}, "r.gateway", "broadcast"),
        ({"subnet": S, "rangeStart": "10.0.0.0"}, "r.rangeStart", "network address"),
        ({"subnet": S, "rangeEnd": "10.0.0.255"}, "r.rangeEnd", "broadcast"),
        ({"subnet": "fd00::/64", "rangeStart": "fd00::"}, "r.rangeStart", "network address"),
        (
            {"subnet": S, "rangeStart": "10.0.0.7", "rangeEnd": "10.0.0.7", "gateway": "10.0.0.7"},
            "r",
            "no allocatable",
        ),
        ("10.0.0.0/24", "r", "object"),
    ],
)
def test_parse_range_errors(obj, key, text):
    with pytest.raises(CniError) as ei:
        parse_range(obj, "r")
    assert ei.value.code == INVALID_NETWORK_CONFIG
    assert f": {key}: " in ei.value.msg
    assert text in ei.value.msg


@pytest.mark.parametrize(
    "obj, text",
    [
        ([], "non-empty"),
        ({"subnet": S}, "non-empty"),
        ([{"subnet": S}, {"subnet": "fd00::/64"}], "mixes"),
        ([{"subnet": S}, {"subnet": "10.0.0.128/25"}], "overlap"),
    ],
)
def test_parse_range_set_errors(obj, text):
    with pytest.raises(CniError) as ei:
        parse_range_set(obj, "ranges[0]")
    assert ei.value.code == INVALID_NETWORK_CONFIG
    assert ": ranges[0]: " in ei.value.msg and text in ei.value.msg


def test_parse_range_set_error_names_nested_key():
    with pytest.raises(CniError) as ei:
        parse_ranges([[{"subnet": S}], [{"subnet": "fd00::/64"}, {"subnet": "fd00::/1x"}]])
    assert ": ranges[1][1].subnet: " in ei.value.msg


@pytest.mark.parametrize(
    "obj, text",
    [
        ([], "non-empty"),
        ("x", "non-empty"),
        ([[{"subnet": S}], [{"subnet": "10.1.0.0/24"}]], "more than one IPv4"),
        ([[{"subnet": "fd00::/64"}], [{"subnet": "fd01::/64"}]], "more than one IPv6"),
        ([[{"subnet": S}], [{"subnet": "10.0.0.0/16"}]], "overlap"),
    ],
)
def test_parse_ranges_errors(obj, text):
    with pytest.raises(CniError) as ei:
        parse_ranges(obj)
    assert ei.value.code == INVALID_NETWORK_CONFIG
    assert ": ranges: " in ei.value.msg and text in ei.value.msg
