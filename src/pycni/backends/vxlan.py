"""The node's VTEP: one VXLAN device, made and kept as configured, idempotently."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from ipaddress import IPv4Interface, IPv6Interface

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..dataplane.errors import is_exists, is_missing
from .plan import VtepInfo

DEFAULT_PORT = 8472  # the Linux (and flannel) default, not IANA's 4789
IFF_UP = 1


class BackendError(Exception):
    """The VTEP cannot be made: the round goes on without VXLAN and says why."""


def ensure_vtep(
    ipr: IPRoute,
    name: str,
    vni: int,
    local_ip: str,
    underlay_ifindex: int,
    mac: str,
    *,
    port: int = DEFAULT_PORT,
    mtu: int | None = None,
    addresses: Iterable[IPv4Interface | IPv6Interface] = (),
) -> VtepInfo:
    """Create or fix the VTEP `name`; return its index and MAC."""
    return ensure_vtep_action(
        ipr, name, vni, local_ip, underlay_ifindex, mac, port=port, mtu=mtu, addresses=addresses
    )[0]


def ensure_vtep_action(
    ipr: IPRoute,
    name: str,
    vni: int,
    local_ip: str,
    underlay_ifindex: int,
    mac: str,
    *,
    port: int = DEFAULT_PORT,
    mtu: int | None = None,
    addresses: Iterable[IPv4Interface | IPv6Interface] = (),
) -> tuple[VtepInfo, str]:
    """ensure_vtep, also saying what it did: "", "created", "recreated" or "updated".

    Learning off, no remote, no group: the FDB is written from the node list alone. The
    vni, port, local address and underlay link are fixed at creation, so a device that
    differs in any of them is recreated; MAC, MTU, addresses and state are fixed in place."""
    mac = mac.lower()
    link = _get(ipr, name)
    action = ""
    if link is not None:
        kind = _kind(link)
        if kind != "vxlan":
            raise BackendError(f"{name} exists and is a {kind or 'device'}, not a VXLAN device")
        if not _same_tunnel(link, vni, local_ip, underlay_ifindex, port):
            _delete(ipr, link["index"])
            link, action = None, "recreated"
    if link is None:
        spec: dict = {
            "ifname": name,
            "kind": "vxlan",
            "vxlan_id": vni,
            "vxlan_port": port,
            "vxlan_link": underlay_ifindex,
            "vxlan_learning": 0,
            "address": mac,
        }
        spec["vxlan_local" if ipaddress.ip_address(local_ip).version == 4 else "vxlan_local6"] = (
            local_ip
        )
        if mtu:
            spec["mtu"] = mtu
        try:
            ipr.link("add", **spec)
        except NetlinkError as exc:
            if not is_exists(exc):  # another agent thread won the race: fix that one below
                raise BackendError(f"creating VTEP {name}: {exc}") from None
        link = _get(ipr, name)
        if link is None:
            raise BackendError(f"VTEP {name} vanished right after its creation")
        action = action or "created"
    index = link["index"]
    fix: dict = {}
    if (link.get("IFLA_ADDRESS") or "").lower() != mac:
        fix["address"] = mac
    if mtu and link.get("IFLA_MTU") != mtu:
        fix["mtu"] = mtu
    if fix:
        ipr.link("set", index=index, **fix)
    if _sync_addresses(ipr, index, addresses) or fix:
        action = action or "updated"
    if not link["flags"] & IFF_UP:
        ipr.link("set", index=index, state="up")
        action = action or "updated"
    return VtepInfo(index, mac), action


def delete_vtep(ipr: IPRoute, name: str) -> bool:
    """Remove the VTEP (the kernel drops its routes, neighbours and FDB with it). False when
    there is none; a device of another kind with that name is not ours and stays."""
    link = _get(ipr, name)
    if link is None or _kind(link) != "vxlan":
        return False
    return _delete(ipr, link["index"])


def vtep_index(ipr: IPRoute, name: str) -> int | None:
    link = _get(ipr, name)
    return link["index"] if link is not None and _kind(link) == "vxlan" else None


def _delete(ipr: IPRoute, index: int) -> bool:
    try:
        ipr.link("del", index=index)
    except NetlinkError as exc:
        if is_missing(exc):
            return False
        raise
    return True


def _get(ipr: IPRoute, name: str):
    try:
        return ipr.link("get", ifname=name)[0]
    except NetlinkError as exc:
        if is_missing(exc):
            return None
        raise


def _kind(link) -> str | None:
    info = link.get("IFLA_LINKINFO")
    return info.get("IFLA_INFO_KIND") if info else None


def _same_tunnel(link, vni: int, local_ip: str, underlay_ifindex: int, port: int) -> bool:
    data = link.get("IFLA_LINKINFO").get("IFLA_INFO_DATA") or {}
    local = data.get("IFLA_VXLAN_LOCAL") or data.get("IFLA_VXLAN_LOCAL6")
    return (
        data.get("IFLA_VXLAN_ID") == vni
        and data.get("IFLA_VXLAN_PORT") == port
        and data.get("IFLA_VXLAN_LINK") == underlay_ifindex
        and not data.get("IFLA_VXLAN_LEARNING")
        and local is not None
        and ipaddress.ip_address(local) == ipaddress.ip_address(local_ip)
    )


def _sync_addresses(
    ipr: IPRoute, index: int, wanted: Iterable[IPv4Interface | IPv6Interface]
) -> bool:
    """Give the VTEP exactly `wanted` (the device is ours; link-local addresses are the
    kernel's and stay). True if anything changed."""
    want = {(str(a.ip), a.network.prefixlen) for a in wanted}
    have = set()
    for msg in ipr.addr("dump", index=index):
        addr = ipaddress.ip_address(msg.get("IFA_ADDRESS"))
        if not addr.is_link_local:
            have.add((str(addr), msg["prefixlen"]))
    for ip, plen in have - want:
        try:
            ipr.addr("del", index=index, address=ip, prefixlen=plen)
        except NetlinkError as exc:
            if not is_missing(exc):
                raise
    for ip, plen in want - have:
        try:
            # NODAD (0x02): the address is unique by allocation; usable at once.
            ipr.addr("add", index=index, address=ip, prefixlen=plen, flags=0x02 if ":" in ip else 0)
        except NetlinkError as exc:
            if not is_exists(exc):
                raise
    return want != have
