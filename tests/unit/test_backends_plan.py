"""The backends' pure planning: which routes, neighbours and FDB entries each mode wants, and
the diff that turns what the kernel holds into that."""

from __future__ import annotations

from ipaddress import ip_interface, ip_network

import pytest

from pycni.backends.plan import (
    Diff,
    Fdb,
    Neighbour,
    Route,
    Skipped,
    State,
    Underlay,
    VtepInfo,
    desired,
    diff,
    route_reason,
    vtep_addresses,
    vtep_mac,
    vtep_mtu,
)
from pycni.cluster.model import NodeRecord

UL = 2  # underlay ifindex
VT = 9  # VTEP ifindex
UNDERLAY = Underlay(UL, (ip_network("192.168.1.0/24"), ip_network("fd00:1::/64")), 1500)
VTEP = VtepInfo(VT, vtep_mac("n1"))
LOCAL = NodeRecord(
    "n1", ("192.168.1.1", "fd00:1::1"), ("10.244.1.0/24", "fd00:244:1::/64"), VTEP.mac
)
MAC2, MAC3 = "0a:00:00:00:00:02", "0a:00:00:00:00:03"
N2 = NodeRecord("n2", ("192.168.1.2",), ("10.244.2.0/24",), MAC2)
N3 = NodeRecord("n3", ("192.168.2.3",), ("10.244.3.0/24",), MAC3)  # off the underlay's nets


def net(s: str):
    return ip_network(s)


def hostgw(subnet: str, gw: str) -> Route:
    return Route(net(subnet), gw, UL)


def tunnel(subnet: str, mac: str, remote: str) -> set:
    gw = str(net(subnet).network_address)
    return {Route(net(subnet), gw, VT, onlink=True), Neighbour(gw, mac, VT), Fdb(mac, remote, VT)}


# ---- modes -----------------------------------------------------------------------------------


def test_host_gw_routes_via_node_ips():
    n4 = NodeRecord("n4", ("192.168.1.4",), ("10.244.4.0/24",))
    want = desired(LOCAL, [LOCAL, N2, n4], "host-gw", UNDERLAY, None)
    assert want.routes == {
        hostgw("10.244.2.0/24", "192.168.1.2"),
        hostgw("10.244.4.0/24", "192.168.1.4"),
    }
    assert not want.neighbours and not want.fdb and not want.skipped


def test_host_gw_skips_off_link_peer():
    want = desired(LOCAL, [N2, N3], "host-gw", UNDERLAY, None)
    assert want.routes == {hostgw("10.244.2.0/24", "192.168.1.2")}
    assert [s.node for s in want.skipped] == ["n3"]
    assert "192.168.2.3" in want.skipped[0].reason


def test_vxlan_flannel_scheme():
    want = desired(LOCAL, [LOCAL, N2, N3], "vxlan", UNDERLAY, VTEP)
    assert want.entries() == tunnel("10.244.2.0/24", MAC2, "192.168.1.2") | tunnel(
        "10.244.3.0/24", MAC3, "192.168.2.3"
    )
    assert not want.skipped


def test_vxlan_without_local_vtep_skips_everyone():
    want = desired(LOCAL, [N2, N3], "vxlan", UNDERLAY, None)
    assert not want.entries()
    assert {s.node for s in want.skipped} == {"n2", "n3"}
    assert all(s.reason == "no local VTEP" for s in want.skipped)


def test_vxlan_peer_without_mac_is_skipped_with_reason():
    bare = NodeRecord("n5", ("192.168.1.5",), ("10.244.5.0/24",))
    want = desired(LOCAL, [N2, bare], "vxlan", UNDERLAY, VTEP)
    assert want.entries() == tunnel("10.244.2.0/24", MAC2, "192.168.1.2")
    assert want.skipped == (Skipped("n5", "publishes no VTEP MAC"),)


def test_mac_is_normalised_to_lower_case():
    upper = NodeRecord("n2", ("192.168.1.2",), ("10.244.2.0/24",), MAC2.upper())
    assert desired(LOCAL, [upper], "vxlan", UNDERLAY, VTEP).entries() == tunnel(
        "10.244.2.0/24", MAC2, "192.168.1.2"
    )


def test_auto_mixes_host_gw_on_link_and_vxlan_off_link():
    want = desired(LOCAL, [N2, N3], "auto", UNDERLAY, VTEP)
    assert want.entries() == {hostgw("10.244.2.0/24", "192.168.1.2")} | tunnel(
        "10.244.3.0/24", MAC3, "192.168.2.3"
    )
    # On-link peers need no MAC in auto mode.
    no_mac = NodeRecord("n2", ("192.168.1.2",), ("10.244.2.0/24",))
    assert desired(LOCAL, [no_mac], "auto", UNDERLAY, VTEP).routes == {
        hostgw("10.244.2.0/24", "192.168.1.2")
    }


def test_auto_without_vtep_keeps_host_gw_and_skips_off_link():
    want = desired(LOCAL, [N2, N3], "auto", UNDERLAY, None)
    assert want.entries() == {hostgw("10.244.2.0/24", "192.168.1.2")}
    assert want.skipped == (Skipped("n3", "no local VTEP"),)


def test_unknown_mode():
    with pytest.raises(ValueError, match="ipip"):
        desired(LOCAL, [N2], "ipip", UNDERLAY, VTEP)


# ---- skipping ------------------------------------------------------------------------------


def test_local_is_skipped_by_name_even_if_its_record_changed():
    other_me = NodeRecord("n1", ("192.168.1.99",), ("10.244.9.0/24",), MAC2)
    for mode in ("host-gw", "vxlan", "auto"):
        want = desired(LOCAL, [other_me], mode, UNDERLAY, VTEP)
        assert not want.entries() and not want.skipped


def test_node_without_subnet_is_skipped():
    fresh = NodeRecord("n6", ("192.168.1.6",), (), "0a:00:00:00:00:06")
    for mode in ("host-gw", "vxlan", "auto"):
        want = desired(LOCAL, [fresh], mode, UNDERLAY, VTEP)
        assert not want.entries()
        assert want.skipped == (Skipped("n6", "no pod subnet yet"),)


def test_duplicate_subnet_and_overlap_with_local_are_skipped():
    dup = NodeRecord("n7", ("192.168.1.7",), ("10.244.2.0/24",), "0a:00:00:00:00:07")
    mine = NodeRecord("n8", ("192.168.1.8",), ("10.244.1.0/25",), "0a:00:00:00:00:08")
    want = desired(LOCAL, [dup, N2, mine], "host-gw", UNDERLAY, VTEP)
    # Sorted by name: n2 claims 10.244.2.0/24 first, whatever the input order.
    assert want.routes == {hostgw("10.244.2.0/24", "192.168.1.2")}
    assert {s.node: s.reason for s in want.skipped} == {
        "n7": "subnet 10.244.2.0/24 is also n2's",
        "n8": "subnet 10.244.1.0/25 is also n1's",
    }


def test_duplicate_vtep_mac_is_skipped():
    twin = NodeRecord("n9", ("192.168.1.9",), ("10.244.9.0/24",), MAC2)
    mine = NodeRecord("n10", ("192.168.1.10",), ("10.244.10.0/24",), VTEP.mac)
    want = desired(LOCAL, [N2, twin, mine], "vxlan", UNDERLAY, VTEP)
    assert want.entries() == tunnel("10.244.2.0/24", MAC2, "192.168.1.2")
    assert {s.node for s in want.skipped} == {"n9", "n10"}


# ---- dual stack ----------------------------------------------------------------------------

DUAL = NodeRecord("n2", ("192.168.1.2", "fd00:1::2"), ("10.244.2.0/24", "fd00:244:2::/64"), MAC2)


def test_dual_stack_host_gw_uses_the_gateway_of_each_family():
    want = desired(LOCAL, [DUAL], "host-gw", UNDERLAY, None)
    assert want.routes == {
        hostgw("10.244.2.0/24", "192.168.1.2"),
        hostgw("fd00:244:2::/64", "fd00:1::2"),
    }


def test_host_gw_peer_without_address_of_the_family_skips_that_subnet_only():
    v4only = NodeRecord("n2", ("192.168.1.2",), ("10.244.2.0/24", "fd00:244:2::/64"))
    want = desired(LOCAL, [v4only], "host-gw", UNDERLAY, None)
    assert want.routes == {hostgw("10.244.2.0/24", "192.168.1.2")}
    assert len(want.skipped) == 1 and "IPv6" in want.skipped[0].reason


def test_dual_stack_vxlan_one_fdb_entry_to_the_outer_family():
    want = desired(LOCAL, [DUAL], "vxlan", UNDERLAY, VTEP)
    assert want.fdb == {Fdb(MAC2, "192.168.1.2", VT)}  # outer family = LOCAL's first address
    assert want.routes == {
        Route(net("10.244.2.0/24"), "10.244.2.0", VT, True),
        Route(net("fd00:244:2::/64"), "fd00:244:2::", VT, True),
    }
    assert want.neighbours == {
        Neighbour("10.244.2.0", MAC2, VT),
        Neighbour("fd00:244:2::", MAC2, VT),
    }


def test_ipv6_underlay_sends_vxlan_to_the_ipv6_address():
    local6 = NodeRecord("n1", ("fd00:1::1", "192.168.1.1"), ("10.244.1.0/24",), VTEP.mac)
    want = desired(local6, [DUAL], "vxlan", UNDERLAY, VTEP)
    assert want.fdb == {Fdb(MAC2, "fd00:1::2", VT)}
    v4only = NodeRecord("n3", ("192.168.1.3",), ("10.244.3.0/24",), MAC3)
    skipped = desired(local6, [v4only], "vxlan", UNDERLAY, VTEP).skipped
    assert skipped == (Skipped("n3", "no IPv6 node address to send VXLAN to"),)


def test_auto_per_family():
    # v4 gateway on link, no v6 address: v4 direct, v6 through the tunnel.
    peer = NodeRecord("n2", ("192.168.1.2",), ("10.244.2.0/24", "fd00:244:2::/64"), MAC2)
    want = desired(LOCAL, [peer], "auto", UNDERLAY, VTEP)
    assert want.routes == {
        hostgw("10.244.2.0/24", "192.168.1.2"),
        Route(net("fd00:244:2::/64"), "fd00:244:2::", VT, True),
    }
    assert want.neighbours == {Neighbour("fd00:244:2::", MAC2, VT)}
    assert want.fdb == {Fdb(MAC2, "192.168.1.2", VT)}


# ---- helpers -------------------------------------------------------------------------------


def test_vtep_mtu():
    assert vtep_mtu(1500, 4) == 1450
    assert vtep_mtu(1500, 6) == 1430
    assert vtep_mtu(9000, 4) == 8950


def test_vtep_addresses_are_host_addresses_of_the_subnet_network_address():
    assert vtep_addresses(LOCAL) == (
        ip_interface("10.244.1.0/32"),
        ip_interface("fd00:244:1::/128"),
    )
    assert vtep_addresses(NodeRecord("x", ("10.0.0.1",))) == ()


def test_vtep_mac_is_stable_unicast_and_locally_administered():
    mac = vtep_mac("node-a")
    assert mac == vtep_mac("node-a") != vtep_mac("node-b")
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01
    assert len(mac.split(":")) == 6 and mac == mac.lower()


def test_state_is_hashable_and_skipped_does_not_count_in_equality():
    a = desired(LOCAL, [N2, N3, NodeRecord("z", ("1.2.3.4",))], "vxlan", UNDERLAY, VTEP)
    b = State(a.routes, a.neighbours, a.fdb)
    assert a == b and hash(a) == hash(b) and a.skipped and not b.skipped


# ---- diff ----------------------------------------------------------------------------------


def test_diff_from_empty_adds_everything_in_dependency_order():
    want = desired(LOCAL, [N2, N3], "vxlan", UNDERLAY, VTEP)
    d = diff(want, State())
    assert set(d.add) == want.entries() and not d.replace and not d.remove
    kinds = [type(e) for e in d.add]
    assert kinds == sorted(kinds, key=[Fdb, Neighbour, Route].index)


def test_diff_equal_is_empty():
    want = desired(LOCAL, [N2, N3], "auto", UNDERLAY, VTEP)
    assert diff(want, State(want.routes, want.neighbours, want.fdb)) == Diff()
    assert not diff(want, want)


def test_diff_removed_node_removes_route_neighbour_fdb_in_reverse_order():
    have = desired(LOCAL, [N2, N3], "vxlan", UNDERLAY, VTEP)
    want = desired(LOCAL, [N2], "vxlan", UNDERLAY, VTEP)
    d = diff(want, have)
    assert not d.add and not d.replace
    assert set(d.remove) == tunnel("10.244.3.0/24", MAC3, "192.168.2.3")
    assert [type(e) for e in d.remove] == [Route, Neighbour, Fdb]


def test_diff_changed_ip_replaces_fdb_only_in_vxlan_and_route_in_host_gw():
    moved = NodeRecord("n2", ("192.168.1.22",), ("10.244.2.0/24",), MAC2)
    d = diff(
        desired(LOCAL, [moved], "vxlan", UNDERLAY, VTEP),
        desired(LOCAL, [N2], "vxlan", UNDERLAY, VTEP),
    )
    assert d == Diff(replace=(Fdb(MAC2, "192.168.1.22", VT),))
    d = diff(
        desired(LOCAL, [moved], "host-gw", UNDERLAY, VTEP),
        desired(LOCAL, [N2], "host-gw", UNDERLAY, VTEP),
    )
    assert d == Diff(replace=(hostgw("10.244.2.0/24", "192.168.1.22"),))


def test_diff_changed_mac_replaces_neighbour_and_swaps_fdb():
    remac = NodeRecord("n2", ("192.168.1.2",), ("10.244.2.0/24",), "0a:00:00:00:00:22")
    d = diff(
        desired(LOCAL, [remac], "vxlan", UNDERLAY, VTEP),
        desired(LOCAL, [N2], "vxlan", UNDERLAY, VTEP),
    )
    assert d.replace == (Neighbour("10.244.2.0", "0a:00:00:00:00:22", VT),)
    assert d.add == (Fdb("0a:00:00:00:00:22", "192.168.1.2", VT),)
    assert d.remove == (Fdb(MAC2, "192.168.1.2", VT),)


def test_diff_mode_switch_replaces_routes_and_removes_tunnel_entries():
    have = desired(LOCAL, [N2], "vxlan", UNDERLAY, VTEP)
    want = desired(LOCAL, [N2], "host-gw", UNDERLAY, None)
    d = diff(want, have)
    assert d.replace == (hostgw("10.244.2.0/24", "192.168.1.2"),)
    assert set(d.remove) == {Neighbour("10.244.2.0", MAC2, VT), Fdb(MAC2, "192.168.1.2", VT)}
    assert not d.add


def test_diff_stale_extra_entries_are_removed():
    want = desired(LOCAL, [N2], "host-gw", UNDERLAY, None)
    junk = Route(net("10.99.0.0/16"), "192.168.1.50", UL)
    have = State(want.routes | {junk}, frozenset({Neighbour("10.9.9.9", MAC3, VT)}))
    d = diff(want, have)
    assert d.remove == (junk, Neighbour("10.9.9.9", MAC3, VT)) and not d.add


def test_str_of_entries_is_readable():
    assert str(Route(net("10.244.2.0/24"), "10.244.2.0", 9, True)) == (
        "route 10.244.2.0/24 via 10.244.2.0 dev 9 onlink"
    )
    assert str(Fdb(MAC2, "", 9)) == f"fdb {MAC2} dst - dev 9"


# --- why a route changed (the agent's info log) --------------------------------------------

R2 = Route(ip_network("10.244.2.0/24"), "192.168.1.2", UL)


def test_route_reasons_name_the_node_and_what_happened():
    moved = NodeRecord("n2", ("192.168.1.22",), ("10.244.2.0/24",), MAC2)
    renumbered = NodeRecord("n2", ("192.168.1.2",), ("10.244.9.0/24",), MAC2)
    assert route_reason("add", R2, None, [LOCAL, N2]) == (
        "node n2 is in the node list (subnets 10.244.2.0/24, addresses 192.168.1.2; "
        "the agent's first pass)"
    )
    assert route_reason("add", R2, [LOCAL], [LOCAL, N2]) == (
        "node n2 appeared (subnets 10.244.2.0/24, addresses 192.168.1.2)"
    )
    assert route_reason("del", R2, [LOCAL, N2], [LOCAL]) == "node n2 left the node list"
    assert route_reason("del", R2, [LOCAL, N2], [LOCAL, renumbered]) == (
        "node n2's subnets changed from 10.244.2.0/24 to 10.244.9.0/24"
    )
    r9 = Route(ip_network("10.244.9.0/24"), "192.168.1.2", UL)
    assert route_reason("add", r9, [LOCAL, N2], [LOCAL, renumbered]) == (
        "node n2's subnets changed from 10.244.2.0/24 to 10.244.9.0/24"
    )
    assert route_reason("replace", R2, [LOCAL, N2], [LOCAL, moved]) == (
        "node n2 changed (addresses 192.168.1.2 -> 192.168.1.22)"
    )
    # The same node list: somebody changed the kernel.
    assert route_reason("add", R2, [LOCAL, N2], [LOCAL, N2]) == (
        "it was missing from the kernel (repair; node n2)"
    )
    assert route_reason("replace", R2, [LOCAL, N2], [LOCAL, N2]) == (
        "it differed from the plan in the kernel (repair; node n2)"
    )
    # Left out by the plan, or nobody's.
    skipped = (Skipped("n2", "192.168.1.2 is on no network of the underlay interface"),)
    assert route_reason("del", R2, [LOCAL, N2], [LOCAL, N2], skipped) == (
        "node n2 is left out: 192.168.1.2 is on no network of the underlay interface"
    )
    stray = Route(ip_network("10.244.77.0/24"), "192.168.1.7", UL)
    assert route_reason("del", stray, [LOCAL], [LOCAL]) == (
        "no node in the node list has subnet 10.244.77.0/24 (left over)"
    )
