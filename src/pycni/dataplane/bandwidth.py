"""Traffic shaping of a pod (capability `bandwidth`) with tc token bucket filters.

Ingress, traffic to the pod, leaves the node through the host veth: a tbf as the veth's root
qdisc shapes it. Egress, traffic from the pod, arrives on the host veth, where nothing can be
queued: an ingress qdisc with a match-all u32 filter redirects it to the attachment's ifb
device, whose root tbf shapes it on its way out. The veth's qdiscs go with the veth; the ifb is
named after the attachment (names.ifb_name) and carries an alias, so DEL and GC find it without
the pod's netns or the store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..cni.netconf import Bandwidth, Shaping
from .errors import dataplane_error, is_exists, is_missing

log = logging.getLogger("pycni")

ROOT_HANDLE = 0x10000  # 1:
INGRESS_HANDLE = 0xFFFF0000  # ffff:, the only handle an ingress qdisc may have
TC_H_ROOT = 0xFFFFFFFF
ETH_P_ALL = 3
U32_MATCH_ALL = "0x0/0x0+0"
# How long a full queue holds a packet at the rate, as the Go bandwidth plugin and tc default.
LATENCY_SECONDS = 0.025
# The kernel keeps a tbf's bucket as nanoseconds in 32 bits (about 4.295 s) and quietly cuts a
# larger one; cutting it here first also keeps the 32-bit tick field pyroute2 sends from
# overflowing. containerd asks for 2^32-1 bits when a pod names no burst: this is what it gets.
MAX_BURST_SECONDS = 4.29
# The queue holds one burst up to this (a GSO packet), not a whole burst of megabytes:
# waiting time stays near LATENCY_SECONDS instead of seconds.
MAX_QUEUED_BURST = 64 * 1024
U32_MAX = 2**32 - 1


@dataclass(frozen=True)
class Tbf:
    """What the kernel's tbf is given, in bytes: rate per second, bucket, queue limit."""

    rate: int
    burst: int
    limit: int


def tbf_for(shaping: Shaping) -> Tbf:
    rate = shaping.rate // 8
    burst = max(1, min(shaping.burst // 8, int(rate * MAX_BURST_SECONDS)))
    limit = min(int(rate * LATENCY_SECONDS) + min(burst, MAX_QUEUED_BURST), U32_MAX)
    return Tbf(rate=rate, burst=burst, limit=limit)


def shape(
    ipr: IPRoute,
    host_index: int,
    host_name: str,
    bandwidth: Bandwidth,
    ifb: str,
    ifb_alias: str,
    mtu: int | None,
) -> tuple[int, str] | None:
    """Shape the attachment both ways; return the ifb's (index, MAC) when egress made one.
    The caller registers the ifb's removal before calling: a failure may leave it half made."""
    if bandwidth.ingress is not None:
        _add_tbf(ipr, host_index, tbf_for(bandwidth.ingress), f"shaping ingress on {host_name}")
    if bandwidth.egress is None:
        return None
    ifb_index, ifb_mac = _create_ifb(ipr, ifb, ifb_alias, mtu)
    # The ifb shapes before anything is sent to it.
    _add_tbf(ipr, ifb_index, tbf_for(bandwidth.egress), f"shaping egress on {ifb}")
    step = f"redirecting {host_name}'s ingress to {ifb}"
    try:
        ipr.tc("add", "ingress", host_index, INGRESS_HANDLE)
        ipr.tc(
            "add-filter",
            "u32",
            host_index,
            parent=INGRESS_HANDLE,
            prio=1,
            protocol=ETH_P_ALL,
            keys=[U32_MATCH_ALL],
            target=ROOT_HANDLE | 1,
            action={
                "kind": "mirred",
                "direction": "egress",
                "action": "redirect",
                "ifindex": ifb_index,
            },
        )
    except NetlinkError as exc:
        raise dataplane_error(step, exc) from None
    return ifb_index, ifb_mac


def _add_tbf(ipr: IPRoute, index: int, tbf: Tbf, step: str) -> None:
    try:
        ipr.tc("add", "tbf", index, ROOT_HANDLE, rate=tbf.rate, burst=tbf.burst, limit=tbf.limit)
    except NetlinkError as exc:
        raise dataplane_error(step, exc) from None


def _create_ifb(ipr: IPRoute, name: str, alias: str, mtu: int | None) -> tuple[int, str]:
    spec: dict = {"ifname": name, "kind": "ifb", "state": "up"}
    if mtu:
        spec["mtu"] = mtu
    try:
        try:
            ipr.link("add", **spec)
        except NetlinkError as exc:
            if not is_exists(exc):
                raise
            # The name is this attachment's alone, and the store held no attachment (ADD
            # checked): an ADD that crashed before its DEL left it.
            log.warning("removing stale %s left by an earlier ADD", name)
            delete_ifb(ipr, name)
            ipr.link("add", **spec)
        link = ipr.link("get", ifname=name)[0]
        # The kernel ignores an alias in the create request: set it after.
        ipr.link("set", index=link["index"], ifalias=alias)
    except NetlinkError as exc:
        raise dataplane_error(f"creating ifb {name}", exc) from None
    return link["index"], link.get("IFLA_ADDRESS") or ""


def delete_ifb(ipr: IPRoute, name: str) -> bool:
    """Delete an attachment's ifb; False if there was none (no egress shaping, or gone)."""
    try:
        ipr.link("del", ifname=name)
    except NetlinkError as exc:
        if is_missing(exc):
            return False
        raise dataplane_error(f"deleting {name}", exc) from None
    return True


def ifbs_with_alias(ipr: IPRoute, prefix: str) -> list[str]:
    """Names of the ifb devices whose alias starts with `prefix` (GC's sweep)."""
    out = []
    for link in ipr.link("dump"):
        alias = link.get("IFLA_IFALIAS")
        info = link.get("IFLA_LINKINFO")
        if alias and alias.startswith(prefix) and info and info.get("IFLA_INFO_KIND") == "ifb":
            out.append(link.get("IFLA_IFNAME"))
    return out


def drift(
    ipr: IPRoute, host_index: int, host_name: str, bandwidth: Bandwidth, ifb: str
) -> str | None:
    """What differs from the shaping ADD set up, or None (CHECK)."""
    host = _qdiscs(ipr, host_index)
    if bandwidth.ingress is not None:
        problem = _tbf_drift(host, tbf_for(bandwidth.ingress), host_name)
        if problem:
            return problem
    if bandwidth.egress is None:
        return None
    if not any(q.get_attr("TCA_KIND") == "ingress" for q in host):
        return f"{host_name} has no ingress qdisc redirecting to {ifb}"
    found = ipr.link_lookup(ifname=ifb)
    if not found:
        return f"ifb {ifb} is missing"
    return _tbf_drift(_qdiscs(ipr, found[0]), tbf_for(bandwidth.egress), ifb)


def _qdiscs(ipr: IPRoute, index: int) -> list:
    return [q for q in ipr.tc("dump", index=index) if q["index"] == index]


def _tbf_drift(qdiscs: list, want: Tbf, dev: str) -> str | None:
    root = next((q for q in qdiscs if q["parent"] == TC_H_ROOT), None)
    if root is None or root.get_attr("TCA_KIND") != "tbf":
        return f"{dev} has no tbf root qdisc"
    parms = root.get_attr("TCA_OPTIONS").get_attr("TCA_TBF_PARMS")
    if parms["rate"] != want.rate:
        return f"{dev} shapes at {parms['rate'] * 8} bits/s, not {want.rate * 8}"
    return None
