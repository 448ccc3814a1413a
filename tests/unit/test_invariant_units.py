"""The invariant as a pure comparison (pycni.doctor.compare): a consistent snapshot has no
finding, and each way of breaking it gives exactly one finding of its kind; plus the doctor's
read-only view of a real store and its input parsing. No root needed."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from ipaddress import ip_address, ip_network

import pytest

from pycni.backends.plan import Fdb, Neighbour, Route, State
from pycni.dataplane import names
from pycni.doctor import model as m
from pycni.doctor import parse_live
from pycni.doctor.compare import allocation_problem, compare, parse_range_set_key
from pycni.doctor.model import (
    ClusterView,
    Link,
    NetnsView,
    NodeSnapshot,
    RulesView,
    StoredAllocation,
    StoredAttachment,
    StoreSnapshot,
)
from pycni.rules.model import HostPort, MasqRule, RuleSet

DATA = "/var/lib/pycni-test"
NET = "net"
RS = "10.244.1.0/24:10.244.1.1-10.244.1.254"
BRIDGE = 2
VTEP = 7
UNDERLAY = 3
PODS = 3


def attachment(i: int, network: str = NET) -> StoredAttachment:
    return StoredAttachment(
        DATA,
        i + 1,
        network,
        f"cid{i}",
        "eth0",
        names.host_veth_name(network, f"cid{i}", "eth0"),
        f"/run/netns/p{i}",
    )


def allocation(
    i: int,
    ip: str | None = None,
    gateway: str | None = "10.244.1.1",
    attachment_id: int | None = None,
    range_set: str = RS,
) -> StoredAllocation:
    return StoredAllocation(
        DATA, attachment_id or i + 1, NET, ip or f"10.244.1.{i + 2}", 24, gateway, range_set
    )


def masq() -> MasqRule:
    return MasqRule(
        ip_network("10.244.1.0/24"), (ip_network("10.244.1.0/24"), ip_network("10.244.0.0/16"))
    )


def rules(**changes) -> RuleSet:
    fields = {"masquerade": (masq(),), "forward": (ip_network("10.244.0.0/16"),), **changes}
    return RuleSet(**fields)


PEER_ROUTE = Route(ip_network("10.244.2.0/24"), "10.244.2.0", VTEP, onlink=True)
PEER_NEIGH = Neighbour("10.244.2.0", "0a:00:00:00:00:02", VTEP)
PEER_FDB = Fdb("0a:00:00:00:00:02", "192.168.1.2", VTEP)
CLUSTER_STATE = State(frozenset({PEER_ROUTE}), frozenset({PEER_NEIGH}), frozenset({PEER_FDB}))
VTEP_MAC = "0a:00:00:00:00:01"


def healthy() -> NodeSnapshot:
    """A node with three pods, masquerade and forward rules, and a VXLAN peer: all as they
    should be."""
    atts = [attachment(i) for i in range(PODS)]
    links = {
        "lo": Link("lo", 1, "", True),
        "eth0": Link("eth0", UNDERLAY, "veth", True, addresses=frozenset({"192.168.1.1/24"})),
        "cni0": Link("cni0", BRIDGE, "bridge", True, addresses=frozenset({"10.244.1.1/24"})),
        "pycni.1": Link("pycni.1", VTEP, "vxlan", True, mac=VTEP_MAC),
    }
    netns = {}
    for i, att in enumerate(atts):
        links[att.veth] = Link(
            att.veth,
            10 + i,
            "veth",
            True,
            master=BRIDGE,
            alias=names.host_veth_alias(NET, att.container_id, "eth0"),
            peer=2,
            hairpin=True,
        )
        netns[att.netns] = NetnsView(
            att.netns,
            links={
                "lo": Link("lo", 1),
                "eth0": Link(
                    "eth0",
                    2,
                    "veth",
                    True,
                    peer=10 + i,
                    addresses=frozenset({f"10.244.1.{i + 2}/24"}),
                ),
            },
        )
    store = StoreSnapshot(
        DATA,
        atts,
        [allocation(i) for i in range(PODS)],
        {
            NET: {
                "bridge": "cni0",
                "ipMasq": True,
                "hairpinMode": True,
                "subnets": ["10.244.1.0/24"],
            }
        },
    )
    return NodeSnapshot(
        stores=[store],
        links=links,
        netns=netns,
        rules=RulesView("nft", rules(), rules()),
        cluster=ClusterView(
            "n1",
            "vxlan",
            True,
            "",
            CLUSTER_STATE,
            CLUSTER_STATE,
            "pycni.1",
            VTEP_MAC,
            network=NET,
            subnets=("10.244.1.0/24",),
        ),
    )


def kinds(snap: NodeSnapshot, live=None) -> list[str]:
    return [f.kind for f in compare(snap, live)]


def one(snap: NodeSnapshot, kind: str, live=None) -> m.Finding:
    found = compare(snap, live)
    assert [f.kind for f in found] == [kind], found
    return found[0]


def set_link(snap: NodeSnapshot, name: str, **changes) -> None:
    snap.links[name] = dataclasses.replace(snap.links[name], **changes)


def set_pod_link(snap: NodeSnapshot, i: int, **changes) -> None:
    view = snap.netns[f"/run/netns/p{i}"]
    view.links["eth0"] = dataclasses.replace(view.links["eth0"], **changes)


def veth(i: int) -> str:
    return attachment(i).veth


# --- the consistent node ----------------------------------------------------------------


def test_a_consistent_node_has_no_finding():
    assert compare(healthy()) == []
    live = {(f"cid{i}", "eth0") for i in range(PODS)}
    assert compare(healthy(), live) == []


def test_an_empty_node_has_no_finding():
    assert compare(NodeSnapshot()) == []
    assert compare(NodeSnapshot(rules=RulesView("nft", RuleSet(), None))) == []


def test_findings_render_on_one_line_and_as_json():
    snap = healthy()
    set_link(snap, veth(0), up=False)
    f = one(snap, m.HOST_VETH_DOWN)
    assert str(f) == (
        f"host-veth-down: network net, container cid0 eth0: expected {veth(0)} "
        f"up; found down; repair: ip link set {veth(0)} up"
    )
    assert f.to_json() == {
        "kind": "host-veth-down",
        "subject": f.subject,
        "expected": f.expected,
        "actual": "down",
        "hint": f.hint,
    }


# --- attachments --------------------------------------------------------------------------


def test_a_pod_gone_without_del_is_one_stale_attachment():
    snap = healthy()
    snap.netns["/run/netns/p1"] = NetnsView("/run/netns/p1", "does not exist")
    del snap.links[veth(1)]  # the pair went with the namespace
    f = one(snap, m.STALE_ATTACHMENT)
    assert f.actual == "netns /run/netns/p1 does not exist"
    assert "DEL for container cid1 with CNI_IFNAME=eth0 on network net" in f.hint
    # Unknown to the runtime as well: still reported once.
    live = {("cid0", "eth0"), ("cid2", "eth0")}
    assert kinds(snap, live) == [m.STALE_ATTACHMENT]


def test_stale_attachment_says_when_the_veth_is_left():
    snap = healthy()
    snap.netns["/run/netns/p0"] = NetnsView("/run/netns/p0", "is not a network namespace")
    f = one(snap, m.STALE_ATTACHMENT)
    assert f.actual.endswith(f"is not a network namespace; host veth {veth(0)} is still there")


def test_missing_host_veth():
    snap = healthy()
    del snap.links[veth(0)]
    del snap.netns["/run/netns/p0"].links["eth0"]
    f = one(snap, m.HOST_VETH_MISSING)
    assert f.expected == f"host veth {veth(0)} on bridge cni0"
    assert f.actual == f"no link {veth(0)} (and eth0 is gone from /run/netns/p0)"


def test_a_recorded_veth_name_is_the_one_expected():
    snap = healthy()
    att = snap.stores[0].attachments[0] = dataclasses.replace(
        snap.stores[0].attachments[0], host_veth="vethrenamed"
    )
    snap.links["vethrenamed"] = dataclasses.replace(snap.links.pop(veth(0)), name="vethrenamed")
    assert compare(snap) == []
    assert att.veth == "vethrenamed"


@pytest.mark.parametrize(
    ("changes", "kind", "actual"),
    [
        ({"kind": "dummy"}, m.HOST_VETH_NOT_VETH, "a dummy"),
        ({"alias": ""}, m.HOST_VETH_ALIAS, "no alias"),
        ({"master": None}, m.HOST_VETH_DETACHED, "on no bridge"),
        ({"master": UNDERLAY}, m.HOST_VETH_DETACHED, "attached to eth0"),
        ({"up": False}, m.HOST_VETH_DOWN, "down"),
    ],
)
def test_host_veth_wrong(changes, kind, actual):
    snap = healthy()
    set_link(snap, veth(2), **changes)
    assert one(snap, kind).actual == actual


def test_pod_interface_missing():
    snap = healthy()
    del snap.netns["/run/netns/p2"].links["eth0"]
    f = one(snap, m.POD_INTERFACE_MISSING)
    assert f.actual == "no eth0 in /run/netns/p2"


@pytest.mark.parametrize(
    ("changes", "kind"),
    [
        ({"peer": 99}, m.POD_INTERFACE_NOT_PEER),
        ({"up": False}, m.POD_INTERFACE_DOWN),
    ],
)
def test_pod_interface_wrong(changes, kind):
    snap = healthy()
    set_pod_link(snap, 1, **changes)
    one(snap, kind)


def test_pod_addresses_must_be_exactly_the_allocated_ones():
    snap = healthy()
    set_pod_link(snap, 0, addresses=frozenset({"10.244.1.2/24", "10.244.1.50/24"}))
    f = one(snap, m.POD_ADDRESSES)
    assert f.expected == "eth0 in /run/netns/p0 holding exactly 10.244.1.2/24"
    assert f.actual == "10.244.1.2/24, 10.244.1.50/24 (unexpected 10.244.1.50/24)"
    set_pod_link(snap, 0, addresses=frozenset())
    assert one(snap, m.POD_ADDRESSES).actual == "no address (missing 10.244.1.2/24)"


# --- orphans ------------------------------------------------------------------------------


def test_orphan_veth_by_alias():
    snap = healthy()
    snap.links["vethzz"] = Link("vethzz", 50, "veth", True, alias="pycni net ghost eth1")
    f = one(snap, m.ORPHAN_VETH)
    assert f.subject == "veth vethzz"
    assert "no attachment of container ghost eth1 on network net" in f.actual
    assert f.hint.startswith("run DEL for container ghost with CNI_IFNAME=eth1 on network net")


def test_orphan_veth_by_name_on_a_pycni_bridge():
    snap = healthy()
    name = names.host_veth_name(NET, "ghost", "eth0")
    snap.links[name] = Link(name, 51, "veth", True, master=BRIDGE)
    assert "no alias, on a pycni bridge" in one(snap, m.ORPHAN_VETH).actual
    # Not pycni's: a veth of another name on the bridge, or ours by name but elsewhere.
    snap.links[name] = Link(name, 51, "veth", True)
    snap.links["vethdebug"] = Link("vethdebug", 52, "veth", True, master=BRIDGE)
    assert compare(snap) == []


def test_orphan_ifb():
    snap = healthy()
    owned = names.ifb_name(NET, "cid0", "eth0")
    snap.links[owned] = Link(owned, 60, "ifb", True, alias=names.ifb_alias(NET, "cid0", "eth0"))
    assert compare(snap) == []
    snap.links["ifbghost"] = Link(
        "ifbghost", 61, "ifb", True, alias=names.ifb_alias(NET, "ghost", "eth0")
    )
    assert one(snap, m.ORPHAN_IFB).subject == "ifb ifbghost"


def test_no_orphans_when_a_store_could_not_be_read():
    snap = healthy()
    snap.links["vethzz"] = Link("vethzz", 50, "veth", True, alias="pycni other ghost eth0")
    snap.stores_complete = False
    assert (
        compare(snap, {("ghost", "eth0"), ("cid0", "eth0"), ("cid1", "eth0"), ("cid2", "eth0")})
        == []
    )


# --- allocations --------------------------------------------------------------------------


def test_attachment_without_address():
    snap = healthy()
    del snap.stores[0].allocations[1]
    set_pod_link(snap, 1, addresses=frozenset())
    one(snap, m.ATTACHMENT_WITHOUT_ADDRESS)


def test_orphan_allocation():
    snap = healthy()
    snap.stores[0].allocations.append(allocation(0, "10.244.1.77", attachment_id=99))
    f = one(snap, m.ORPHAN_ALLOCATION)
    assert f.subject == f"address 10.244.1.77/24 of network net in {DATA}"
    assert f.actual == "attachment row 99 does not exist"


def test_out_of_range_allocation_is_reported_once():
    snap = healthy()
    snap.stores[0].allocations.append(allocation(0, "10.99.0.1"))
    f = one(snap, m.ALLOCATION_OUT_OF_RANGE)
    assert f.actual == f"10.99.0.1 is outside its range set {RS}"


def test_gateway_allocation():
    snap = healthy()
    snap.stores[0].allocations.append(allocation(0, "10.244.1.1"))
    assert one(snap, m.ALLOCATION_RESERVED).actual == "10.244.1.1 is the gateway of 10.244.1.0/24"


@pytest.mark.parametrize(
    ("ip", "problem"),
    [
        (
            "10.244.1.0",
            (m.ALLOCATION_RESERVED, "10.244.1.0 is the network address of 10.244.1.0/24"),
        ),
        (
            "10.244.1.255",
            (m.ALLOCATION_RESERVED, "10.244.1.255 is the broadcast address of 10.244.1.0/24"),
        ),
        ("10.244.1.9", (m.ALLOCATION_RESERVED, "10.244.1.9 is the gateway of 10.244.1.0/24")),
        ("10.244.1.10", None),
        ("not-an-ip", (m.ALLOCATION_OUT_OF_RANGE, "'not-an-ip' is not an IP address")),
    ],
)
def test_allocation_problem(ip, problem):
    wide = "10.244.1.0/24:10.244.1.0-10.244.1.255"  # a range no config allows; a store may
    assert (
        allocation_problem(allocation(0, ip, range_set=wide), {ip_address("10.244.1.9")}) == problem
    )


def test_range_set_keys_with_ipv6_and_several_ranges():
    key = "fd00::/64:fd00::2-fd00::ff,fd01::/64:fd01::1-fd01::1"
    assert [(str(s), str(a), str(b)) for s, a, b in parse_range_set_key(key)] == [
        ("fd00::/64", "fd00::2", "fd00::ff"),
        ("fd01::/64", "fd01::1", "fd01::1"),
    ]
    with pytest.raises(ValueError):
        parse_range_set_key("10.244.1.0/24")
    ok = StoredAllocation(DATA, 1, NET, "fd01::1", 64, None, key)
    assert allocation_problem(ok, set()) is None


def test_one_address_held_twice():
    snap = healthy()
    snap.stores[0].allocations[1] = allocation(1, "10.244.1.2")
    set_pod_link(snap, 1, addresses=frozenset({"10.244.1.2/24"}))
    f = one(snap, m.DUPLICATE_ADDRESS)
    assert f.subject == "address 10.244.1.2"
    assert f.actual.startswith("2 holders: network net, container cid0 eth0")
    assert "container cid1 eth0" in f.actual


def test_one_address_held_in_two_data_dirs():
    snap = healthy()
    other = StoredAttachment("/other", 1, "other", "cidx", "eth0", "vethx", "/run/netns/px")
    snap.stores.append(
        StoreSnapshot(
            "/other",
            [other],
            [StoredAllocation("/other", 1, "other", "10.244.1.3", 24, "10.244.1.1", RS)],
            {"other": {"bridge": "cni0"}},
        )
    )
    snap.links["vethx"] = Link(
        "vethx",
        40,
        "veth",
        True,
        master=BRIDGE,
        alias=names.host_veth_alias("other", "cidx", "eth0"),
        peer=2,
    )
    snap.netns["/run/netns/px"] = NetnsView(
        "/run/netns/px",
        links={
            "eth0": Link("eth0", 2, "veth", True, peer=40, addresses=frozenset({"10.244.1.3/24"}))
        },
    )
    f = one(snap, m.DUPLICATE_ADDRESS)
    assert "(dataDir /other)" in f.actual and f"(dataDir {DATA})" in f.actual


# --- the runtime --------------------------------------------------------------------------


def test_the_runtimes_view():
    live = {("cid0", "eth0"), ("cid1", "eth0"), ("ghost", "eth0")}
    found = compare(healthy(), live)
    assert [(f.kind, f.subject) for f in found] == [
        (m.UNKNOWN_TO_RUNTIME, "network net, container cid2 eth0"),
        (m.MISSING_IN_STORE, "container ghost eth0"),
    ]


def test_parse_live():
    pairs = [{"containerID": "a", "ifname": "eth0"}, {"containerID": "b", "ifname": "net1"}]
    want = {("a", "eth0"), ("b", "net1")}
    assert parse_live(pairs) == want
    assert parse_live({"cni.dev/valid-attachments": pairs, "name": "x"}) == want
    assert parse_live([["a", "eth0"], ["b", "net1"]]) == want
    assert parse_live([]) == set()
    for bad in ({"x": 1}, "a", [{"containerID": "a"}], [["a"]], [["a", ""]]):
        with pytest.raises(ValueError):
            parse_live(bad)


# --- bridges ------------------------------------------------------------------------------


def test_a_missing_bridge_is_one_finding_not_one_per_pod():
    snap = healthy()
    del snap.links["cni0"]
    for i in range(PODS):
        set_link(snap, veth(i), master=None)
    f = one(snap, m.BRIDGE_MISSING)
    assert f.subject == "bridge cni0 (network net)"
    assert "its 3 pod(s)" in f.actual


@pytest.mark.parametrize(
    ("changes", "kind"),
    [
        ({"kind": "dummy"}, m.BRIDGE_NOT_BRIDGE),
        ({"up": False}, m.BRIDGE_DOWN),
        ({"addresses": frozenset()}, m.BRIDGE_GATEWAY_MISSING),
    ],
)
def test_bridge_wrong(changes, kind):
    snap = healthy()
    set_link(snap, "cni0", **changes)
    one(snap, kind)


def test_a_network_without_pods_needs_no_bridge():
    snap = NodeSnapshot(stores=[StoreSnapshot(DATA, [], [], {NET: {"bridge": "cni9"}})])
    assert compare(snap) == []


# --- packet rules -------------------------------------------------------------------------


def test_rules_table_missing():
    snap = healthy()
    snap.rules.installed = None
    f = one(snap, m.RULES_MISSING)
    assert f.subject == "nftables table inet pycni" and f.actual == "absent"
    assert "masquerade ip saddr 10.244.1.0/24" in f.expected
    assert "accept forwarded traffic from and to 10.244.0.0/16" in f.expected


def test_rule_missing_extra_and_differs():
    snap = healthy()
    snap.rules.installed = rules(forward=())
    f = one(snap, m.RULE_MISSING)
    assert f.subject == "forward rule in nftables table inet pycni"
    assert f.expected == "accept forwarded traffic from and to 10.244.0.0/16"
    snap.rules.installed = rules(forward=("10.244.0.0/16", "10.9.0.0/16"))
    assert one(snap, m.RULE_EXTRA).actual == "accept forwarded traffic from and to 10.9.0.0/16"
    snap.rules.installed = rules(masquerade=(MasqRule(ip_network("10.244.1.0/24"), ()),))
    f = one(snap, m.RULE_DIFFERS)
    assert "10.244.0.0/16" in f.expected and "10.244.0.0/16" not in f.actual


def test_hostport_rules_are_compared_too():
    hp = HostPort("tcp", 8080, "10.244.1.2", 80)
    snap = healthy()
    snap.rules.desired = rules(hostports=(hp,))
    f = one(snap, m.RULE_MISSING)
    assert f.subject == "hostports rule in nftables table inet pycni"
    assert f.expected == "hostPort tcp any address port 8080 -> 10.244.1.2 port 80"


def test_iptables_backend_is_named():
    snap = healthy()
    snap.rules = RulesView("iptables", rules(), None)
    assert one(snap, m.RULES_MISSING).subject == "pycni's iptables chains"


# --- hairpin --------------------------------------------------------------------------------


def test_a_bridge_port_without_hairpin():
    snap = healthy()
    set_link(snap, veth(1), hairpin=False)
    f = one(snap, m.HOST_VETH_NO_HAIRPIN)
    assert f.subject == attachment(1).label
    assert "the network's hairpinMode" in f.expected and "Service" in f.actual
    assert f.hint.startswith(f"bridge link set dev {veth(1)} hairpin on")


def test_hairpin_follows_the_network_and_hostports():
    snap = healthy()
    set_link(snap, veth(1), hairpin=False)
    snap.stores[0].networks[NET]["hairpinMode"] = False  # hairpinMode: false
    assert kinds(snap) == []
    del snap.stores[0].networks[NET]["hairpinMode"]  # a store from before it was recorded
    assert kinds(snap) == []
    # A pod with hostPorts needs it whatever the network says.
    snap.stores[0].attachments[1] = dataclasses.replace(attachment(1), hostports=True)
    assert "hostPorts" in one(snap, m.HOST_VETH_NO_HAIRPIN).expected


def test_a_detached_port_is_not_also_reported_without_hairpin():
    snap = healthy()
    set_link(snap, veth(1), master=None, hairpin=None)
    one(snap, m.HOST_VETH_DETACHED)


# --- the node's subnet now ------------------------------------------------------------------


def test_pods_outside_the_node_subnet_after_a_podcidr_change():
    snap = healthy()
    snap.cluster.subnets = ("10.244.7.0/24", "fd00:7::/64")
    found = compare(snap)
    assert [f.kind for f in found] == [m.POD_OUTSIDE_NODE_SUBNET] * PODS
    f = found[0]
    assert f.subject == attachment(0).label
    assert f.expected == "addresses in node n1's subnet 10.244.7.0/24, fd00:7::/64"
    assert f.actual.startswith("10.244.1.2: from an earlier subnet of this node")
    assert f.hint.startswith("recreate the pod") and "cid0" in f.hint
    # Only the cluster's network is the node's subnet; not checked while not ready.
    snap.cluster.network = "another"
    assert kinds(snap) == []
    snap.cluster.network = NET
    snap.cluster.ready = False
    assert kinds(snap) == [m.CLUSTER_NOT_READY]


# --- cluster routes -----------------------------------------------------------------------


def test_cluster_not_ready():
    snap = healthy()
    snap.cluster = ClusterView("n1", "vxlan", False, "not ready: no free /24")
    assert one(snap, m.CLUSTER_NOT_READY).actual == "not ready: no free /24"


@pytest.mark.parametrize(
    ("have", "kind"),
    [
        (State(frozenset(), frozenset({PEER_NEIGH}), frozenset({PEER_FDB})), "route-missing"),
        (
            State(
                frozenset(
                    {
                        dataclasses.replace(
                            PEER_ROUTE, gateway="192.168.1.2", dev=UNDERLAY, onlink=False
                        )
                    }
                ),
                frozenset({PEER_NEIGH}),
                frozenset({PEER_FDB}),
            ),
            "route-differs",
        ),
        (
            State(
                frozenset(
                    {PEER_ROUTE, Route(ip_network("10.244.9.0/24"), "10.244.9.0", VTEP, True)}
                ),
                frozenset({PEER_NEIGH}),
                frozenset({PEER_FDB}),
            ),
            "route-extra",
        ),
        (State(frozenset({PEER_ROUTE}), frozenset(), frozenset({PEER_FDB})), "neighbour-missing"),
        (
            State(
                frozenset({PEER_ROUTE}),
                frozenset({PEER_NEIGH}),
                frozenset({PEER_FDB, Fdb("0a:00:00:00:00:09", "192.168.1.9", VTEP)}),
            ),
            "fdb-extra",
        ),
    ],
)
def test_cluster_entries(have, kind):
    snap = healthy()
    snap.cluster.have = have
    f = one(snap, kind)
    assert f.subject == "node n1 (vxlan)"
    if kind == "route-differs":
        assert f.expected == "route 10.244.2.0/24 via 10.244.2.0 dev pycni.1 onlink proto 120"
        assert f.actual == "route 10.244.2.0/24 via 192.168.1.2 dev eth0 proto 120"


def test_vtep_missing_is_one_finding():
    snap = healthy()
    del snap.links["pycni.1"]
    snap.cluster.want = snap.cluster.have = State()  # no VTEP: the plan tunnels nothing
    f = one(snap, m.VTEP_MISSING)
    assert f.expected == f"VXLAN device pycni.1 with MAC {VTEP_MAC}"


def test_vtep_wrong_and_stale():
    snap = healthy()
    set_link(snap, "pycni.1", mac="0a:00:00:00:00:ff", up=False)
    assert one(snap, m.VTEP_WRONG).actual == "MAC 0a:00:00:00:00:ff, down"
    snap = healthy()
    snap.cluster.backend = "host-gw"
    snap.cluster.want = snap.cluster.have = State()
    one(snap, m.VTEP_STALE)


# --- reading a store ------------------------------------------------------------------------


def test_read_store_sees_every_row_and_writes_nothing(tmp_path):
    import sqlite3

    from pycni.doctor.read import ReadOnlyStore, read_store
    from pycni.ipam.ranges import parse_range_set
    from pycni.ipam.store import Store

    data = str(tmp_path / "data")
    rs = parse_range_set([{"subnet": "10.244.1.0/24"}], "ranges")
    with Store(data) as store:
        store.add_attachment(NET, "cid0", "eth0", "vethzero", "/run/netns/p0", [rs], [])
        store.set_network(NET, {"bridge": "br9", "ipMasq": True, "subnets": ["10.244.1.0/24"]})
    with sqlite3.connect(os.path.join(data, "pycni.db")) as conn:  # foreign keys are off here
        conn.execute(
            "INSERT INTO allocations VALUES (42, 0, ?, '10.244.1.50', 24, NULL, ?)", (NET, rs.key)
        )
    path = os.path.join(data, "pycni.db")
    before = hashlib.sha256(open(path, "rb").read()).hexdigest()

    snap, desired = read_store(data)
    assert snap.attachments == [
        StoredAttachment(data, 1, NET, "cid0", "eth0", "vethzero", "/run/netns/p0")
    ]
    assert [(a.attachment_id, a.ip) for a in snap.allocations] == [
        (1, "10.244.1.2"),
        (42, "10.244.1.50"),
    ]
    assert snap.networks[NET]["bridge"] == "br9"
    assert [str(r.source) for r in desired.masquerade] == ["10.244.1.0/24"]
    with ReadOnlyStore(data) as ro, pytest.raises(Exception, match="readonly"):
        ro.set_meta("x", "y")
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == before


def test_read_store_without_a_database(tmp_path):
    from pycni.doctor.read import read_store

    snap, desired = read_store(str(tmp_path / "never"))
    assert snap.attachments == [] and desired is None
    assert not (tmp_path / "never").exists()  # not even the directory is made


def test_read_store_refuses_a_broken_database(tmp_path):
    from pycni.doctor import DoctorError
    from pycni.doctor.read import read_store

    (tmp_path / "pycni.db").write_bytes(b"garbage" * 1000)
    with pytest.raises(DoctorError, match="cannot read the IPAM database"):
        read_store(str(tmp_path))


def test_a_pod_interface_that_is_no_veth_is_not_the_peer():
    snap = healthy()
    set_pod_link(snap, 0, kind="dummy", peer=None)
    assert one(snap, m.POD_INTERFACE_NOT_PEER).actual.endswith("(a dummy)")
