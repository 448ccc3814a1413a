"""One reconcile round: read the underlay, keep the VTEP, plan, diff, apply."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..cluster.model import NodeRecord
from .kernel import Changes, apply, read_state
from .plan import (
    MODES,
    State,
    Underlay,
    VtepInfo,
    desired,
    vtep_addresses,
    vtep_mac,
    vtep_mtu,
)
from .vxlan import DEFAULT_PORT, BackendError, delete_vtep, ensure_vtep_action, vtep_index
from .watch import KernelWatch


@dataclass(frozen=True)
class VxlanSettings:
    name: str = "pycni.1"  # flannel's "flannel.<vni>", ours
    vni: int = 1
    port: int = DEFAULT_PORT
    mtu: int | None = None  # None: the underlay's MTU less the outer headers


def read_underlay(ipr: IPRoute, ifname: str) -> Underlay:
    """The underlay interface's index, MTU and directly connected networks."""
    link = ipr.link("get", ifname=ifname)[0]
    networks = []
    for msg in ipr.addr("dump", index=link["index"]):
        iface = ipaddress.ip_interface(f"{msg.get('IFA_ADDRESS')}/{msg['prefixlen']}")
        if not iface.ip.is_link_local:  # node addresses are never link-local
            networks.append(iface.network)
    return Underlay(link["index"], tuple(networks), link.get("IFLA_MTU") or 1500)


def reconcile_once(
    ipr: IPRoute,
    local: NodeRecord,
    nodes: list[NodeRecord],
    mode: str,
    underlay_ifname: str,
    vxlan: VxlanSettings | None = None,
    watch: KernelWatch | None = None,
) -> Changes:
    """Make this node's routes, neighbours and FDB match `nodes` under `mode`.

    The VTEP exists in vxlan and auto mode whatever the peers (they need our MAC, published
    from `Changes.vtep`, before they can send to us) and is removed in host-gw mode. Never
    raises for kernel trouble: it lands in `Changes.errors` and the next round retries; an
    unknown mode is a ValueError. With a `watch` (the agent's, kept from pass to pass), a pass
    whose plan is the one the kernel was last found holding, and since which the kernel
    announced nothing that could touch it, reads nothing back (`Changes.trusted`)."""
    if mode not in MODES:
        raise ValueError(f"unknown backend mode {mode!r} (want one of {', '.join(MODES)})")
    vxlan = vxlan or VxlanSettings()
    try:
        underlay = read_underlay(ipr, underlay_ifname)
    except NetlinkError as exc:
        return Changes(errors=[f"underlay interface {underlay_ifname}: {exc}"])
    errors: list[str] = []
    vtep: VtepInfo | None = None
    action = ""
    stale: int | None = None
    try:
        if mode == "host-gw":
            stale = vtep_index(ipr, vxlan.name)
        else:
            vtep, action = _ensure(ipr, local, underlay, vxlan)
    except (NetlinkError, BackendError) as exc:
        errors.append(f"VTEP {vxlan.name}: {exc}")
    want = _desired(local, nodes, mode, underlay, vtep)
    settled = not errors and not action and stale is None
    if watch is not None:
        devices = {underlay.ifindex} | ({vtep.ifindex} if vtep else set())
        if watch.unchanged(want, devices) and settled:
            return Changes(skipped=want.skipped, vtep=vtep, trusted=True)
    try:
        have = read_state(ipr, vtep.ifindex if vtep else stale)
    except NetlinkError as exc:
        if watch is not None:
            watch.verified(None)
        return Changes(errors=[*errors, f"reading routes: {exc}"], skipped=want.skipped, vtep=vtep)
    # Stale entries go before a leftover VTEP does, so they are counted like any other.
    changes = apply(ipr, want, have)
    if watch is not None:
        # Only a pass that found the kernel as planned vouches for it; after changes, the next
        # pass reads the kernel again (their own announcements are queued meanwhile).
        watch.verified(want if settled and not changes.changed and not changes.errors else None)
    changes.errors[:0] = errors
    changes.vtep = vtep
    if action == "created":
        changes.added += 1
    elif action:
        changes.replaced += 1
    if stale is not None:
        try:
            changes.removed += delete_vtep(ipr, vxlan.name)
        except NetlinkError as exc:
            changes.errors.append(f"deleting VTEP {vxlan.name}: {exc}")
    return changes


_last_plan: tuple | None = None  # (inputs, node list, state) of the last pass


def _desired(
    local: NodeRecord,
    nodes: list[NodeRecord],
    mode: str,
    underlay: Underlay,
    vtep: VtepInfo | None,
) -> State:
    """desired(), again only when its inputs changed: most passes plan from the same node
    list (the datastore hands back the same records), and planning 5,000 peers costs ~50 ms."""
    global _last_plan
    inputs = (local, mode, underlay, vtep)
    last = _last_plan
    if last is not None and last[0] == inputs and last[1] == nodes:
        return last[2]
    want = desired(local, nodes, mode, underlay, vtep)
    _last_plan = (inputs, list(nodes), want)
    return want


def _ensure(
    ipr: IPRoute, local: NodeRecord, underlay: Underlay, vxlan: VxlanSettings
) -> tuple[VtepInfo, str]:
    local_ip = local.node_ip()
    if local_ip is None:
        raise BackendError(f"node {local.name} has no address to send VXLAN from")
    family = ipaddress.ip_address(local_ip).version
    return ensure_vtep_action(
        ipr,
        vxlan.name,
        vxlan.vni,
        local_ip,
        underlay.ifindex,
        vtep_mac(local.name),
        port=vxlan.port,
        mtu=vxlan.mtu or vtep_mtu(underlay.mtu, family),
        addresses=vtep_addresses(local),
    )
