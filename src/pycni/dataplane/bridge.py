"""The node bridge: created once, idempotently, holding the gateway addresses."""

from __future__ import annotations

import ipaddress

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..cni.errors import INVALID_NETWORK_CONFIG, CniError
from . import sysctl
from .errors import dataplane_error, is_missing, tolerating_exists
from .names import bridge_mac

IFA_F_NODAD = 0x02


def link_kind(link) -> str | None:
    info = link.get("IFLA_LINKINFO")
    return info.get("IFLA_INFO_KIND") if info else None


def ensure_bridge(
    ipr: IPRoute,
    name: str,
    gateways: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
    mtu: int | None,
):
    """Return the bridge's link message, creating and addressing it as needed.

    Safe when many ADDs race: whoever loses the create gets EEXIST and carries on.
    """
    links = _get(ipr, name)
    if not links:
        v4 = next((g for g in gateways if g.version == 4), None)
        spec = {"ifname": name, "kind": "bridge"}
        if v4 is not None:
            spec["address"] = bridge_mac(v4.ip.packed)
        if mtu:
            spec["mtu"] = mtu
        with tolerating_exists(f"creating bridge {name}"):
            ipr.link("add", **spec)
        links = ipr.link("get", ifname=name)
    link = links[0]
    if link_kind(link) != "bridge":
        raise CniError(
            INVALID_NETWORK_CONFIG,
            f"invalid network config: bridge: {name} exists but is a {link_kind(link) or 'device'}"
            ", not a bridge",
        )
    index = link["index"]
    have = {(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.addr("dump", index=index)}
    for gw in gateways:
        if (str(gw.ip), gw.network.prefixlen) in have:
            continue
        with tolerating_exists(f"adding {gw} to bridge {name}"):
            ipr.addr(
                "add",
                index=index,
                address=str(gw.ip),
                prefixlen=gw.network.prefixlen,
                flags=IFA_F_NODAD if gw.version == 6 else 0,
            )
    if not link["flags"] & 1:  # IFF_UP
        # Without DAD the bridge's link-local address is usable at once: the kernel sends the
        # neighbour solicitations for packets it forwards to pods from it, so while it is
        # tentative (1-2 s) a new node's first IPv6 pod traffic from other nodes is dropped.
        # Its MAC is derived from the gateway address: unique in the cluster by allocation.
        sysctl.disable_dad(name)
        ipr.link("set", index=index, state="up")
    return link


def _get(ipr: IPRoute, name: str):
    try:
        return ipr.link("get", ifname=name)
    except NetlinkError as exc:
        if is_missing(exc):
            return ()
        raise dataplane_error(f"looking up bridge {name}", exc) from None
