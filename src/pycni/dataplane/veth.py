"""The pod's veth pair: the host end on the bridge, the pod end configured inside the netns."""

from __future__ import annotations

import ipaddress
import os
from typing import NamedTuple

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..cni.result import Route
from . import rtnl
from .bridge import IFA_F_NODAD
from .errors import dataplane_error, is_exists, is_missing
from .names import local_unicast_mac
from .rtnl import Rtnl


def lookup(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def delete_host_veth(nl: Rtnl, name: str) -> bool:
    """Delete a host veth (its peer in the pod goes with it). False if it was already gone."""
    [answer] = nl.transact([(rtnl.RTM_DELLINK, 0, _by_name(name))])
    if is_missing(answer):
        return False
    if answer.code:
        raise dataplane_error(f"deleting {name}", _failure(answer)) from None
    return True


class Pair(NamedTuple):
    host_index: int
    host_mac: str
    pod_index: int  # in the pod's namespace
    pod_mac: str


def random_mac() -> str:
    """What the kernel would pick for a veth end: random, unicast, locally administered."""
    return local_unicast_mac(os.urandom(6))


def create_pair(
    nl: Rtnl,
    host_name: str,
    alias: str,
    ifname: str,
    netns_fd: int,
    mtu: int | None,
    mac: str | None,
    bridge_index: int,
    hairpin: bool,
) -> Pair:
    """Create the pair with the pod end born inside the netns under its final name (nothing to
    rename, no temporary name to collide with) and the host end already on the bridge and up,
    then give the host end its alias (the kernel ignores one in a create request) and hairpin
    mode: two requests in one send(2). The kernel echoes the new link (NLM_F_ECHO), so the
    host end's index and MAC and the pod end's index (IFLA_LINK) need no lookup; the pod end's
    MAC is chosen here."""
    pod_mac = (mac or random_mac()).lower()
    mtu_attr = rtnl.u32(rtnl.IFLA_MTU, mtu) if mtu else b""
    peer = rtnl.link_change(
        0,
        0,
        0,
        rtnl.text(rtnl.IFLA_IFNAME, ifname),
        rtnl.u32(rtnl.IFLA_NET_NS_FD, netns_fd),
        rtnl.attr(rtnl.IFLA_ADDRESS, rtnl.mac(pod_mac)),
        mtu_attr,
    )
    create = rtnl.link_change(
        0,
        rtnl.IFF_UP,
        rtnl.IFF_UP,
        rtnl.text(rtnl.IFLA_IFNAME, host_name),
        rtnl.u32(rtnl.IFLA_MASTER, bridge_index),
        mtu_attr,
        rtnl.nested(
            rtnl.IFLA_LINKINFO,
            rtnl.text(rtnl.IFLA_INFO_KIND, "veth"),
            rtnl.nested(rtnl.IFLA_INFO_DATA, rtnl.nested(rtnl.VETH_INFO_PEER, peer)),
        ),
    )
    flags = rtnl.NLM_F_CREATE | rtnl.NLM_F_EXCL | rtnl.NLM_F_ECHO
    made, named = nl.transact(
        [(rtnl.RTM_NEWLINK, flags, create), port_settings(host_name, alias, hairpin)]
    )
    step = f"creating veth {host_name} / {ifname}"
    if is_exists(made):
        taken = f"{ifname} already exists in the pod's namespace, or {host_name} on the node"
        raise dataplane_error(step, Exception(taken)) from None
    if made.code:
        raise dataplane_error(step, _failure(made)) from None
    if named.code:
        raise dataplane_error(f"setting up {host_name}", _failure(named)) from None
    index, host_mac, pod_index = _echoed_link(made) or _link_by_name(nl, host_name)
    if pod_index is None:
        raise dataplane_error(step, Exception(f"{host_name} has no peer")) from None
    return Pair(index, host_mac, pod_index, pod_mac)


def port_settings(name: str, alias: str | None, hairpin: bool) -> tuple[int, int, bytes]:
    """A request that gives a bridge port, found by its name, its alias and, if asked, hairpin
    mode (IFLA_BRPORT_MODE as the port's slave data: no index needed, so it can follow the
    port's creation in the same send)."""
    attributes = [rtnl.text(rtnl.IFLA_IFNAME, name)]
    if alias is not None:
        attributes.append(rtnl.text(rtnl.IFLA_IFALIAS, alias))
    if hairpin:
        mode = rtnl.attr(rtnl.IFLA_BRPORT_MODE, b"\x01")
        attributes.append(
            rtnl.nested(rtnl.IFLA_LINKINFO, rtnl.nested(rtnl.IFLA_INFO_SLAVE_DATA, mode))
        )
    return rtnl.RTM_NEWLINK, 0, rtnl.link_change(0, 0, 0, *attributes)


def set_hairpin(nl: Rtnl, name: str) -> None:
    """Let a pod reach itself through the bridge (e.g. via its own service address).
    Idempotent: setting it on a port that has it changes nothing.

    Why: kube-proxy DNATs a pod's packet to a Service back to the pod itself; with
    br_netfilter the bridge then forwards the frame at layer 2 to the port it came in by,
    which it refuses unless that port is in hairpin mode. A fast path that redirects pod
    traffic around the bridge must keep this: a frame may leave by the port it came in by."""
    nl.run(f"hairpin mode on {name}", [port_settings(name, None, True)])


def _echoed_link(answer: rtnl.Answer) -> tuple[int, str, int | None] | None:
    """(index, MAC, IFLA_LINK) of the link message the kernel echoed, if it did."""
    for message in answer.echoed:
        if rtnl.NLMSG.unpack_from(message)[1] != rtnl.RTM_NEWLINK:
            continue
        start = rtnl.NLMSG.size
        index = rtnl.IFINFOMSG.unpack_from(message, start)[2]
        found = rtnl.attrs(message, start + rtnl.IFINFOMSG.size, len(message))
        peer = found.get(rtnl.IFLA_LINK)
        return (
            index,
            rtnl.mac_text(found.get(rtnl.IFLA_ADDRESS, b"")),
            rtnl.U32.unpack(peer)[0] if peer else None,
        )
    return None


def _link_by_name(nl: Rtnl, name: str) -> tuple[int, str, int | None]:
    """For a kernel that does not echo a created link (before Linux 6.2)."""
    [answer] = nl.run(f"reading {name}", [(rtnl.RTM_GETLINK, 0, _by_name(name))])
    link = _echoed_link(answer)
    if link is None:
        raise dataplane_error(f"reading {name}", Exception("the kernel did not answer")) from None
    return link


def _by_name(name: str) -> bytes:
    return rtnl.link_change(0, 0, 0, rtnl.text(rtnl.IFLA_IFNAME, name))


def _failure(answer: rtnl.Answer) -> NetlinkError:
    return NetlinkError(answer.code, os.strerror(answer.code))


LOOPBACK_INDEX = 1  # lo is the first device of every network namespace


def configure_pod(
    nl: Rtnl,
    ifname: str,
    index: int,
    addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
    routes: list[Route],
) -> None:
    """Bring up lo and the pod interface (`index` in the pod), add addresses and routes: one
    send(2) through `nl`, a socket in the pod's namespace. The kernel handles the requests in
    order, so a route finds its address in place."""
    up = (rtnl.IFF_UP, rtnl.IFF_UP)
    # (what it does, the request, whether EEXIST is success)
    steps = [
        (
            "bringing up lo in the pod",
            (rtnl.RTM_NEWLINK, 0, rtnl.link_change(LOOPBACK_INDEX, *up)),
            False,
        ),
        (
            f"configuring {ifname} in the pod",
            (rtnl.RTM_NEWLINK, 0, rtnl.link_change(index, *up)),
            False,
        ),
    ]
    for addr in addresses:
        # Pod addresses are unique by allocation: skip DAD so v6 works at once.
        flags = IFA_F_NODAD if addr.version == 6 else 0
        request = rtnl.address_add(index, str(addr.ip), addr.network.prefixlen, flags)
        steps.append((f"adding {addr} to {ifname} in the pod", request, False))
    for route in routes:
        extras = route.extras
        metrics = {
            key: extras[name]
            for name, key in (("mtu", rtnl.RTAX_MTU), ("advmss", rtnl.RTAX_ADVMSS))
            if name in extras
        }
        request = rtnl.route_add(
            index,
            str(route.dst.network_address),
            route.dst.prefixlen,
            str(route.gw) if route.gw is not None else None,
            priority=extras.get("priority"),
            table=extras.get("table", rtnl.RT_TABLE_MAIN),
            scope=extras.get("scope", rtnl.RT_SCOPE_UNIVERSE),
            metrics=metrics,
        )
        # EEXIST is success: another ADD (or a rerun) made the same route.
        steps.append((f"adding route {route.dst} in the pod", request, True))
    answers = nl.transact([request for _, request, _ in steps])
    for (step, _, exists_ok), answer in zip(steps, answers, strict=True):
        if answer.code and not (exists_ok and is_exists(answer)):
            raise dataplane_error(step, _failure(answer)) from None


def hairpin_of(link) -> bool | None:
    """A bridge port's hairpin mode from its link message (IFLA_BRPORT_MODE in the slave
    data a link get or dump carries); None when the link is on no bridge."""
    info = link.get("IFLA_LINKINFO")
    data = info.get("IFLA_INFO_SLAVE_DATA") if info else None
    if info is None or info.get("IFLA_INFO_SLAVE_KIND") != "bridge" or data is None:
        return None
    return bool(data.get("IFLA_BRPORT_MODE"))


def host_veths_with_alias(ipr: IPRoute, prefix: str) -> dict[str, str]:
    """Host veths whose alias starts with `prefix`: {name: alias}. Used by GC."""
    out = {}
    for link in ipr.link("dump"):
        alias = link.get("IFLA_IFALIAS")
        if alias and alias.startswith(prefix):
            out[link.get("IFLA_IFNAME")] = alias
    return out
