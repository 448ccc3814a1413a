"""Reading and writing the planned state through one netlink socket (pyroute2).

Ownership: every route pycni makes carries its own route protocol, RTPROT_PYCNI, so "ours" is
"proto 120 in the main table" and routes anybody else made are never read, replaced or deleted
(`ip route show proto 120` lists them). The VTEP is pycni's device, so every permanent
neighbour and every FDB entry on it is ours too.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from socket import AF_INET, AF_INET6

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..dataplane.errors import is_exists, is_missing
from ..dataplane.rtnl import (
    NDA_DST,
    NDA_LLADDR,
    NDMSG,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    RT_SCOPE_NOWHERE,
    RT_SCOPE_UNIVERSE,
    RTA_DST,
    RTA_GATEWAY,
    RTA_OIF,
    RTA_TABLE,
    RTM_DELNEIGH,
    RTM_DELROUTE,
    RTM_GETNEIGH,
    RTM_GETROUTE,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    RTMSG,
    RTN_UNICAST,
    U32,
    Rtnl,
    address,
    attr,
    attrs,
    network,
    packed,
)
from .plan import Diff, Entry, Fdb, Neighbour, Route, Skipped, State, VtepInfo, diff

# Route protocol of pycni's routes. 0-4 belong to the kernel; iproute2's rt_protos names
# 8-18, 42, 99 and 186-192 (zebra, bird, babel, bgp, ospf...); 120 is not among them and
# iproute2 prints it as plain "proto 120". Anything else's routes carry another number.
RTPROT_PYCNI = 120
MAIN_TABLE = 254
RTNH_F_ONLINK = 4
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
AF_BRIDGE = 7


@dataclass
class Changes:
    """What one round did. `errors`: entries that failed (the round went on without them);
    `skipped`: peers the plan left out. The caller logs both and retries next round. `done`:
    each entry the kernel changed, with its operation ("add", "replace" or "del"), so the
    caller can say why."""

    added: int = 0
    replaced: int = 0
    removed: int = 0
    errors: list[str] = field(default_factory=list)
    skipped: tuple[Skipped, ...] = ()
    vtep: VtepInfo | None = None
    done: list[tuple[str, Entry]] = field(default_factory=list)
    # The pass read nothing back: the kernel announced no change since it last held the plan.
    trusted: bool = False

    @property
    def changed(self) -> bool:
        return bool(self.added or self.replaced or self.removed)


def read_state(ipr: IPRoute, vtep_ifindex: int | None) -> State:
    """pycni's routes (both families), and the permanent neighbours and FDB entries on the
    VTEP when there is one. Through a lean raw socket (rtnl.py) where one can be opened in
    `ipr`'s namespace, else through `ipr` itself."""
    rt = Rtnl.open(ipr)
    if rt is None:
        return _read_state_pyroute2(ipr, vtep_ifindex)
    with rt:
        return _read_state_raw(rt, vtep_ifindex)


def _read_state_raw(rt: Rtnl, vtep_ifindex: int | None) -> State:
    routes = set()
    for family in (AF_INET, AF_INET6):
        empty = bytes(4 if family == AF_INET else 16)
        for data, start, end in rt.dump(RTM_GETROUTE, RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
            fam, dst_len, _, _, table, proto, _, _, flags = RTMSG.unpack_from(data, start)
            if proto != RTPROT_PYCNI:
                continue
            a = attrs(data, start + RTMSG.size, end)
            if (U32.unpack(a[RTA_TABLE])[0] if RTA_TABLE in a else table) != MAIN_TABLE:
                continue
            gateway = a.get(RTA_GATEWAY)
            routes.add(
                Route(
                    network(a.get(RTA_DST, empty), dst_len),
                    address(gateway) if gateway else "",
                    U32.unpack(a[RTA_OIF])[0] if RTA_OIF in a else 0,
                    bool(flags & RTNH_F_ONLINK),
                )
            )
    neighbours: set[Neighbour] = set()
    fdb: set[Fdb] = set()
    if vtep_ifindex is not None:
        for family in (AF_INET, AF_INET6):
            for data, start, end in rt.dump(RTM_GETNEIGH, NDMSG.pack(family, 0, 0, 0, 0)):
                fam, index, state, _, _ = NDMSG.unpack_from(data, start)
                if index != vtep_ifindex or fam != family or not state & NUD_PERMANENT:
                    continue
                a = attrs(data, start + NDMSG.size, end)
                if a.get(NDA_DST):
                    mac = _mac(a.get(NDA_LLADDR, b""))
                    neighbours.add(Neighbour(address(a[NDA_DST]), mac, vtep_ifindex))
        for data, start, end in rt.dump(RTM_GETNEIGH, NDMSG.pack(AF_BRIDGE, 0, 0, 0, 0)):
            _, index, _, _, _ = NDMSG.unpack_from(data, start)
            if index != vtep_ifindex:
                continue
            a = attrs(data, start + NDMSG.size, end)
            if a.get(NDA_LLADDR):
                dst = a.get(NDA_DST)
                fdb.add(Fdb(_mac(a[NDA_LLADDR]), address(dst) if dst else "", vtep_ifindex))
    return State(frozenset(routes), frozenset(neighbours), frozenset(fdb))


_macs: dict[bytes, str] = {}


def _mac(raw: bytes) -> str:
    text = _macs.get(raw)
    if text is None:
        if len(_macs) > 100_000:
            _macs.clear()
        text = _macs[raw] = ":".join(f"{b:02x}" for b in raw)
    return text


def _read_state_pyroute2(ipr: IPRoute, vtep_ifindex: int | None) -> State:
    routes = frozenset(
        _route(msg)
        for family in (AF_INET, AF_INET6)
        for msg in ipr.route("dump", family=family, table=MAIN_TABLE, proto=RTPROT_PYCNI)
        if msg["proto"] == RTPROT_PYCNI and _table(msg) == MAIN_TABLE
    )
    neighbours: set[Neighbour] = set()
    fdb: set[Fdb] = set()
    if vtep_ifindex is not None:
        for msg in ipr.neigh("dump", ifindex=vtep_ifindex):
            if (
                msg["ifindex"] == vtep_ifindex
                and msg["family"] in (AF_INET, AF_INET6)
                and msg["state"] & NUD_PERMANENT
                and msg.get("NDA_DST")
            ):
                neighbours.add(
                    Neighbour(
                        _ip(msg.get("NDA_DST")), (msg.get("NDA_LLADDR") or "").lower(), vtep_ifindex
                    )
                )
        for msg in ipr.fdb("dump", ifindex=vtep_ifindex):
            if msg["ifindex"] == vtep_ifindex and msg.get("NDA_LLADDR"):
                dst = msg.get("NDA_DST")
                fdb.add(Fdb(msg.get("NDA_LLADDR").lower(), _ip(dst) if dst else "", vtep_ifindex))
    return State(routes, frozenset(neighbours), frozenset(fdb))


def _table(msg) -> int:
    return msg.get("RTA_TABLE") or msg["table"]


def _ip(text: str) -> str:
    return str(ipaddress.ip_address(text))


def _route(msg) -> Route:
    family_any = "0.0.0.0" if msg["family"] == AF_INET else "::"
    dst = ipaddress.ip_network(f"{msg.get('RTA_DST') or family_any}/{msg['dst_len']}")
    gateway = msg.get("RTA_GATEWAY")
    return Route(
        dst,
        _ip(gateway) if gateway else "",
        msg.get("RTA_OIF") or 0,
        bool(msg["flags"] & RTNH_F_ONLINK),
    )


def apply(ipr: IPRoute, want: State, have: State) -> Changes:
    """Make the kernel hold `want` given that it holds `have`: add, replace, then remove.

    Each entry stands alone: a failure is recorded in `errors` and the rest goes on. Races
    are not failures: removing what is already gone is fine, and so is a neighbour or FDB
    entry that appeared meanwhile (both are written with replace semantics)."""
    changes = Changes(skipped=want.skipped)
    plan: Diff = diff(want, have)
    ops = [
        (op, entry)
        for op, entries in (("add", plan.add), ("replace", plan.replace), ("del", plan.remove))
        for entry in entries
    ]
    rt = Rtnl.open(ipr) if ops else None
    if rt is not None:
        # All requests pipelined, in this order; each answered on its own.
        with rt:
            codes = rt.requests([_request(op, entry) for op, entry in ops])
        for (op, entry), code in zip(ops, codes, strict=True):
            if not code:
                changes.done.append((op, entry))
            else:
                _failed(op, entry, NetlinkError(code, os.strerror(code)), changes.errors)
    else:
        for op, entry in ops:
            if _do(ipr, op, entry, changes.errors):
                changes.done.append((op, entry))
    changes.added = sum(1 for op, _ in changes.done if op == "add")
    changes.replaced = sum(1 for op, _ in changes.done if op == "replace")
    changes.removed = sum(1 for op, _ in changes.done if op == "del")
    return changes


def _do(ipr: IPRoute, op: str, entry: Entry, errors: list[str]) -> int:
    """Run one change; 1 if the kernel changed, 0 if not (recorded in `errors` if wrong)."""
    try:
        if isinstance(entry, Route):
            _write_route(ipr, op, entry)
        elif isinstance(entry, Neighbour):
            _write_neighbour(ipr, op, entry)
        else:
            _write_fdb(ipr, op, entry)
    except NetlinkError as exc:
        _failed(op, entry, exc, errors)
        return 0
    return 1


def _failed(op: str, entry: Entry, exc: NetlinkError, errors: list[str]) -> None:
    """Record a failed change in `errors`, unless it is no failure at all."""
    if op == "del" and is_missing(exc):
        return
    if op == "add" and is_exists(exc) and isinstance(entry, Route):
        # A route to the same destination that pycni did not make: somebody's; leave it.
        errors.append(
            f"{entry}: a route to {entry.dst} that pycni did not make is in the way; left alone"
        )
        return
    errors.append(f"{op} {entry}: {exc}")


def _request(op: str, entry: Entry) -> tuple[int, int, bytes]:
    """The raw request doing what _write_route, _write_neighbour or _write_fdb do."""
    write = NLM_F_CREATE | (NLM_F_EXCL if op == "add" else NLM_F_REPLACE)
    if isinstance(entry, Route):
        family = AF_INET if entry.dst.version == 4 else AF_INET6
        if op == "del":
            kind, flags, scope, rtype = RTM_DELROUTE, 0, RT_SCOPE_NOWHERE, 0
        else:
            kind, flags, scope, rtype = RTM_NEWROUTE, write, RT_SCOPE_UNIVERSE, RTN_UNICAST
        body = RTMSG.pack(
            family,
            entry.dst.prefixlen,
            0,
            0,
            MAIN_TABLE,
            RTPROT_PYCNI,
            scope,
            rtype,
            RTNH_F_ONLINK if entry.onlink else 0,
        ) + attr(RTA_DST, entry.dst.network_address.packed)
        if entry.gateway:
            body += attr(RTA_GATEWAY, packed(entry.gateway))
        if entry.dev:
            body += attr(RTA_OIF, U32.pack(entry.dev))
        return kind, flags, body
    if isinstance(entry, Neighbour):
        family = AF_INET if ":" not in entry.ip else AF_INET6
        body = NDMSG.pack(family, entry.dev, NUD_PERMANENT if op != "del" else 0, 0, 0)
        body += attr(NDA_DST, packed(entry.ip))
        if op == "del":
            return RTM_DELNEIGH, 0, body
        return (
            RTM_NEWNEIGH,
            NLM_F_CREATE | NLM_F_REPLACE,
            body + attr(NDA_LLADDR, _raw_mac(entry.lladdr)),
        )
    body = NDMSG.pack(AF_BRIDGE, entry.dev, NUD_PERMANENT | NUD_NOARP, NTF_SELF, 0)
    body += attr(NDA_LLADDR, _raw_mac(entry.lladdr))
    if entry.dst:
        body += attr(NDA_DST, packed(entry.dst))
    if op == "del":
        return RTM_DELNEIGH, 0, body
    return RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE, body


def _raw_mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _write_route(ipr: IPRoute, op: str, r: Route) -> None:
    # "add" is exclusive so a foreign route to the same dst is never overwritten; "replace"
    # is only used on a dst that holds our route; "del" names proto, gateway and dev so it
    # can only hit ours.
    spec: dict = {"dst": str(r.dst), "table": MAIN_TABLE, "proto": RTPROT_PYCNI}
    if r.gateway:
        spec["gateway"] = r.gateway
    if r.dev:
        spec["oif"] = r.dev
    if r.onlink:
        spec["flags"] = RTNH_F_ONLINK
    ipr.route(op, **spec)


def _write_neighbour(ipr: IPRoute, op: str, n: Neighbour) -> None:
    if op == "del":
        ipr.neigh("del", dst=n.ip, ifindex=n.dev)
    else:
        ipr.neigh("replace", dst=n.ip, lladdr=n.lladdr, ifindex=n.dev, state=NUD_PERMANENT)


def _write_fdb(ipr: IPRoute, op: str, f: Fdb) -> None:
    spec: dict = {
        "ifindex": f.dev,
        "lladdr": f.lladdr,
        "state": NUD_PERMANENT | NUD_NOARP,
        "flags": NTF_SELF,
    }
    if f.dst:
        spec["dst"] = f.dst
    ipr.fdb("del" if op == "del" else "replace", **spec)
