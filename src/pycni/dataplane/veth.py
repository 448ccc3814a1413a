"""The pod's veth pair: the host end on the bridge, the pod end configured inside the netns."""

from __future__ import annotations

import ipaddress
import os
from typing import NamedTuple

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..cni.result import Route
from .bridge import IFA_F_NODAD
from .errors import dataplane_error, is_exists, is_missing, tolerating_exists
from .names import local_unicast_mac


def lookup(ipr: IPRoute, name: str) -> int | None:
    found = ipr.link_lookup(ifname=name)
    return found[0] if found else None


def delete_host_veth(ipr: IPRoute, name: str) -> bool:
    """Delete a host veth (its peer in the pod goes with it). False if it was already gone."""
    try:
        ipr.link("del", ifname=name)  # the kernel resolves the name: one round trip
    except NetlinkError as exc:
        if is_missing(exc):
            return False
        raise dataplane_error(f"deleting {name}", exc) from None
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
    ipr: IPRoute,
    host_name: str,
    alias: str,
    ifname: str,
    netns_fd: int,
    mtu: int | None,
    mac: str | None,
    bridge_index: int,
) -> Pair:
    """Create the pair with the pod end born inside the netns under its final name (nothing to
    rename, no temporary name to collide with) and the host end already on the bridge and up,
    in one request. The pod end's MAC is chosen here and its index read from the host end's
    IFLA_LINK, so the pod's side needs no lookup of its own (a link dump parsed in Python
    costs about 1 ms, a tenth of an ADD, all of it under the agent's GIL in a storm)."""
    peer: dict = {"ifname": ifname, "net_ns_fd": netns_fd, "address": (mac or random_mac()).lower()}
    host: dict = {
        "ifname": host_name,
        "kind": "veth",
        "peer": peer,
        "master": bridge_index,
        "state": "up",
    }
    if mtu:
        host["mtu"] = peer["mtu"] = mtu
    try:
        ipr.link("add", **host)
        link = ipr.link("get", ifname=host_name)[0]
    except NetlinkError as exc:
        if is_exists(exc):
            raise dataplane_error(
                f"creating veth {host_name} / {ifname}",
                Exception(
                    f"{ifname} already exists in the pod's namespace, or {host_name} on the node"
                ),
            ) from None
        raise dataplane_error(f"creating veth {host_name} / {ifname}", exc) from None
    # The kernel ignores an alias in the create request: set it after.
    ipr.link("set", index=link["index"], ifalias=alias)
    return Pair(link["index"], link.get("IFLA_ADDRESS"), link.get("IFLA_LINK"), peer["address"])


LOOPBACK_INDEX = 1  # lo is the first device of every network namespace


def configure_pod(
    nsipr: IPRoute,
    ifname: str,
    index: int,
    addresses: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface],
    routes: list[Route],
) -> None:
    """Bring up lo and the pod interface (`index` in the pod), add addresses and routes."""
    nsipr.link("set", index=LOOPBACK_INDEX, state="up")
    try:
        nsipr.link("set", index=index, state="up")
    except NetlinkError as exc:
        raise dataplane_error(f"configuring {ifname} in the pod", exc) from None
    for addr in addresses:
        nsipr.addr(
            "add",
            index=index,
            address=str(addr.ip),
            prefixlen=addr.network.prefixlen,
            # Pod addresses are unique by allocation: skip DAD so v6 works at once.
            flags=IFA_F_NODAD if addr.version == 6 else 0,
        )
    for route in routes:
        spec: dict = {"dst": str(route.dst), "oif": index}
        if route.gw is not None:
            spec["gateway"] = str(route.gw)
        for key in ("priority", "table", "scope"):
            if key in route.extras:
                spec[key] = route.extras[key]
        metrics = {k: route.extras[k] for k in ("mtu", "advmss") if k in route.extras}
        if metrics:
            spec["metrics"] = metrics
        with tolerating_exists(f"adding route {route.dst} in the pod"):
            nsipr.route("add", **spec)


def set_hairpin(ipr: IPRoute, index: int) -> None:
    """Let a pod reach itself through the bridge (e.g. via its own service address).
    IFLA_BRPORT_MODE is the hairpin flag; pyroute2 silently drops unknown keys such as
    "hairpin_mode". Idempotent: setting it on a port that has it changes nothing.

    Why: kube-proxy DNATs a pod's packet to a Service back to the pod itself; with
    br_netfilter the bridge then forwards the frame at layer 2 to the port it came in by,
    which it refuses unless that port is in hairpin mode. A fast path that redirects pod
    traffic around the bridge must keep this: a frame may leave by the port it came in by."""
    ipr.brport("set", index=index, mode=1)


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
