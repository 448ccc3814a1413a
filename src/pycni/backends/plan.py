"""What the kernel should hold so this node reaches the other nodes' pods: pure, no netlink.

- host-gw: one route per remote pod subnet via the remote node's underlay address; needs the
  nodes on one L2 segment (the gateway must be on a network of the underlay interface).
- vxlan: flannel's scheme on one VTEP (inner IPv4 and IPv6 alike): a route to the remote subnet
  via its network address, onlink on the VTEP; a permanent neighbour entry mapping that address
  to the remote VTEP's MAC; an FDB entry sending frames for that MAC to the remote node.
  No ARP, no learning, no multicast: everything comes from the node list.
- auto: host-gw for each remote subnet whose gateway is on a network of the underlay
  interface, vxlan for the rest.

Every entry is a frozen dataclass, so a state is a set and diffing is set arithmetic.
"""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv6Interface

from ..cluster.model import Network, NodeRecord
from ..dataplane.names import local_unicast_mac

MODES = ("host-gw", "vxlan", "auto")
# Outer headers a VXLAN packet adds: Ethernet 14 + VXLAN 8 + UDP 8 + IPv4 20 (IPv6 40).
VXLAN_OVERHEAD = {4: 50, 6: 70}


@dataclass(frozen=True)
class Route:
    dst: Network
    gateway: str
    dev: int
    onlink: bool = False

    @property
    def key(self) -> tuple:
        # The kernel holds one main-table route per destination (at our metric): same dst
        # with another gateway/dev is a replacement, not a second route.
        return ("route", self.dst)

    def __str__(self) -> str:
        return f"route {self.dst} via {self.gateway} dev {self.dev}" + (
            " onlink" if self.onlink else ""
        )


@dataclass(frozen=True)
class Neighbour:
    ip: str
    lladdr: str
    dev: int

    @property
    def key(self) -> tuple:
        return ("neigh", self.ip, self.dev)

    def __str__(self) -> str:
        return f"neighbour {self.ip} lladdr {self.lladdr} dev {self.dev}"


@dataclass(frozen=True)
class Fdb:
    lladdr: str
    dst: str
    dev: int

    @property
    def key(self) -> tuple:
        # One remote per unicast MAC: a new node IP for the same MAC replaces the entry.
        return ("fdb", self.lladdr, self.dev)

    def __str__(self) -> str:
        return f"fdb {self.lladdr} dst {self.dst or '-'} dev {self.dev}"


Entry = Route | Neighbour | Fdb
# Adds go FDB, neighbour, route (a route is usable once it appears); removals the reverse.
_RANK = {Fdb: 0, Neighbour: 1, Route: 2}


@dataclass(frozen=True)
class Underlay:
    """The node's underlay interface: where host-gw routes go, what VXLAN rides on."""

    ifindex: int
    networks: tuple[Network, ...] = ()
    mtu: int = 1500

    def on_link(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip)
        return any(addr.version == n.version and addr in n for n in self.networks)


@dataclass(frozen=True)
class VtepInfo:
    ifindex: int
    mac: str


@dataclass(frozen=True)
class Skipped:
    node: str
    reason: str

    def __str__(self) -> str:
        return f"{self.node}: {self.reason}"


@dataclass(frozen=True)
class State:
    """Routes, neighbours and FDB entries; `skipped` says which peers the plan left out."""

    routes: frozenset[Route] = frozenset()
    neighbours: frozenset[Neighbour] = frozenset()
    fdb: frozenset[Fdb] = frozenset()
    skipped: tuple[Skipped, ...] = field(default=(), compare=False)

    def entries(self) -> frozenset[Entry]:
        return self.routes | self.neighbours | self.fdb


Desired = State
Actual = State


@dataclass(frozen=True)
class Diff:
    add: tuple[Entry, ...] = ()
    replace: tuple[Entry, ...] = ()
    remove: tuple[Entry, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.add or self.replace or self.remove)


def diff(want: State, have: State) -> Diff:
    """Entries to add (key absent), replace (key present, value differs) and remove (key no
    longer wanted). An old value whose key is replaced goes with the replacement."""
    w, h = want.entries(), have.entries()
    new, old = w - h, h - w
    if not new and not old:
        return Diff()  # the no-op pass: nothing keyed at all (thousands of peers)
    # A key held with another value is in `old`, a key wanted with another value in `new`:
    # only those can turn an add into a replace or spare a removal.
    have_keys = {e.key for e in old}
    want_keys = {e.key for e in new}
    return Diff(
        add=_ordered(e for e in new if e.key not in have_keys),
        replace=_ordered(e for e in new if e.key in have_keys),
        remove=_ordered((e for e in old if e.key not in want_keys), reverse=True),
    )


def _ordered(entries, reverse: bool = False) -> tuple[Entry, ...]:
    return tuple(sorted(entries, key=lambda e: (_RANK[type(e)], str(e)), reverse=reverse))


def desired(
    local: NodeRecord, nodes: list[NodeRecord], mode: str, underlay: Underlay, vtep: VtepInfo | None
) -> State:
    """The state this node should hold for `nodes` (the local node among them is ignored).

    VXLAN frames go to the remote node's address of the family of this node's first address
    (the VTEP's local address). Peers that cannot be served are listed in `skipped`."""
    if mode not in MODES:
        raise ValueError(f"unknown backend mode {mode!r} (want one of {', '.join(MODES)})")
    local_ip = local.node_ip()
    outer = ipaddress.ip_address(local_ip).version if local_ip else None
    routes: set[Route] = set()
    neighbours: set[Neighbour] = set()
    fdb: set[Fdb] = set()
    skipped: list[Skipped] = []
    owner: dict[Network, str] = {s: local.name for s in local.subnets}
    mac_owner: dict[str, str] = {vtep.mac.lower(): local.name} if vtep else {}

    for node in sorted(nodes, key=lambda n: n.name):
        if node.name == local.name:
            continue
        if not node.subnets:
            skipped.append(Skipped(node.name, "no pod subnet yet"))
            continue
        tunnelled: list[Network] = []
        for subnet in node.subnets:
            clash = owner.get(subnet) or next(
                (
                    local.name
                    for s in local.subnets
                    if s.version == subnet.version and s.overlaps(subnet)
                ),
                None,
            )
            if clash:
                skipped.append(Skipped(node.name, f"subnet {subnet} is also {clash}'s"))
                continue
            owner[subnet] = node.name
            gw = node.node_ip(subnet.version)
            direct = gw is not None and underlay.on_link(gw)
            if mode == "vxlan" or (mode == "auto" and not direct):
                tunnelled.append(subnet)
            elif gw is None:
                skipped.append(
                    Skipped(node.name, f"no IPv{subnet.version} node address to route {subnet} via")
                )
            elif not direct:
                skipped.append(
                    Skipped(
                        node.name,
                        f"{gw} is on no network of the underlay "
                        "interface (host-gw needs one L2 segment)",
                    )
                )
            else:
                routes.add(Route(subnet, gw, underlay.ifindex))
        if not tunnelled:
            continue
        mac = node.vtep_mac.lower()
        remote = node.node_ip(outer) if outer else None
        reason = (
            "no local VTEP"
            if vtep is None
            else "publishes no VTEP MAC"
            if not mac
            else f"no IPv{outer} node address to send VXLAN to"
            if remote is None
            else f"VTEP MAC {mac} is also {mac_owner[mac]}'s"
            if mac in mac_owner
            else ""
        )
        if reason:
            skipped.append(Skipped(node.name, reason))
            continue
        assert vtep is not None and remote is not None
        mac_owner[mac] = node.name
        fdb.add(Fdb(mac, remote, vtep.ifindex))
        for subnet in tunnelled:
            gw = str(subnet.network_address)
            routes.add(Route(subnet, gw, vtep.ifindex, onlink=True))
            neighbours.add(Neighbour(gw, mac, vtep.ifindex))
    return State(frozenset(routes), frozenset(neighbours), frozenset(fdb), tuple(skipped))


def vtep_mtu(underlay_mtu: int, family: int) -> int:
    """The VTEP's MTU: the underlay's less the outer headers of `family`."""
    return underlay_mtu - VXLAN_OVERHEAD[family]


def vtep_addresses(local: NodeRecord) -> tuple[IPv4Interface | IPv6Interface, ...]:
    """The VTEP's addresses: each local subnet's network address as a host address, the
    gateway the other nodes' routes name (and the source of node-to-remote-pod traffic)."""
    return tuple(
        ipaddress.ip_interface(f"{s.network_address}/{s.max_prefixlen}") for s in local.subnets
    )


def vtep_mac(node_name: str) -> str:
    """A stable MAC for the node's VTEP, derived from its name: an agent restart or a
    recreated device keeps the MAC the other nodes recorded. Locally administered, unicast."""
    return local_unicast_mac(hashlib.sha256(b"pycni-vtep\0" + node_name.encode()).digest())


def route_reason(
    op: str,
    route: Route,
    before: list[NodeRecord] | None,
    after: list[NodeRecord],
    skipped: tuple[Skipped, ...] = (),
) -> str:
    """Why a reconcile pass added ("add"), changed ("replace") or removed ("del") `route`,
    from the node list of the pass before (None: the agent's first pass) and of this one."""
    return Reasons(before, after, skipped).why(op, route)


class Reasons:
    """route_reason() for many routes of one pass: the node lists indexed once (a pass that
    adds 5,000 routes would otherwise scan them 5,000 times)."""

    def __init__(
        self,
        before: list[NodeRecord] | None,
        after: list[NodeRecord],
        skipped: tuple[Skipped, ...] = (),
    ) -> None:
        self.first_pass = before is None
        self.owner_after = _index(after, lambda n: n.subnets)
        self.owner_before = _index(before or (), lambda n: n.subnets)
        self.named_after = _index(after, lambda n: (n.name,))
        self.named_before = _index(before or (), lambda n: (n.name,))
        self.skipped: dict[str, str] = {}
        for s in skipped:
            self.skipped.setdefault(s.node, s.reason)

    def why(self, op: str, route: Route) -> str:
        new, old = self.owner_after.get(route.dst), self.owner_before.get(route.dst)
        if op == "del":
            if new is not None:
                why = self.skipped.get(new.name, "")
                return f"node {new.name} is left out" + (f": {why}" if why else "")
            if old is None:
                return f"no node in the node list has subnet {route.dst} (left over)"
            now = self.named_after.get(old.name)
            if now is None:
                return f"node {old.name} left the node list"
            return f"node {old.name}'s subnets changed from {_subnets(old)} to {_subnets(now)}"
        if new is None:  # not planned from the node list: nothing better to say
            return "planned"
        if self.first_pass:
            return f"node {new.name} is in the node list ({_describe(new)}; the agent's first pass)"
        if old is None:
            was = self.named_before.get(new.name)
            if was is None:
                return f"node {new.name} appeared ({_describe(new)})"
            return f"node {new.name}'s subnets changed from {_subnets(was)} to {_subnets(new)}"
        if old != new:
            what = []
            if old.node_ips != new.node_ips:
                what.append(f"addresses {', '.join(old.node_ips)} -> {', '.join(new.node_ips)}")
            if old.vtep_mac != new.vtep_mac:
                what.append(f"VTEP MAC {old.vtep_mac or 'none'} -> {new.vtep_mac or 'none'}")
            if old.name != new.name:
                what.append(f"subnet {route.dst} moved from node {old.name}")
            return f"node {new.name} changed ({'; '.join(what) or _describe(new)})"
        if op == "add":
            return f"it was missing from the kernel (repair; node {new.name})"
        return f"it differed from the plan in the kernel (repair; node {new.name})"


def _index(nodes, keys) -> dict:
    """The first node of `nodes` under each of its keys, as a scan of the list finds it."""
    out: dict = {}
    for n in nodes:
        for k in keys(n):
            out.setdefault(k, n)
    return out


def _subnets(n: NodeRecord) -> str:
    return ", ".join(map(str, n.subnets)) or "none"


def _describe(n: NodeRecord) -> str:
    return f"subnets {_subnets(n)}, addresses {', '.join(n.node_ips) or 'none'}"
