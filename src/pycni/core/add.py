"""ADD: allocate, build the bridge and veth pair, configure the pod, install masquerade and
hostPorts.

Order matters for crash safety: the allocation is recorded first, keyed by (network, container ID,
ifname), with its port mappings, so a DEL or GC after any crash finds it; kernel objects are named
deterministically so the same DEL finds them too. A failure at any step unwinds everything done
so far.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import os

from pyroute2.netlink.exceptions import NetlinkError

from ..cni.env import Request
from ..cni.errors import UNKNOWN_CONTAINER, CniError
from ..cni.netconf import NetConf
from ..cni.result import Interface, IPConfig, Result, Route
from ..dataplane import bandwidth, names, sysctl, veth
from ..dataplane.netns import netns_fd
from ..dataplane.rtnl import Rtnl
from ..ipam.records import Allocation, Attachment
from ..ipam.store import Store
from . import masquerade, resources
from .faults import checkpoint
from .locks import node_lock
from .undo import UndoStack

log = logging.getLogger("pycni")


def cmd_add(request: Request, conf: NetConf) -> dict:
    with node_lock(conf.data_dir, exclusive=False), resources.store(conf.data_dir) as store:
        return _add(request, conf, store).to_json(conf.cni_version)


def _add(request: Request, conf: NetConf, store: Store) -> Result:
    host_name = names.host_veth_name(conf.name, request.container_id, request.ifname)
    undo = UndoStack()
    try:
        with (
            netns_fd(request.netns) as nsfd,
            resources.host_netlink() as ipr,
            resources.host_rtnl() as nl,
        ):
            allocations = store.add_attachment(
                conf.name,
                request.container_id,
                request.ifname,
                host_name,
                request.netns,
                conf.range_sets,
                conf.requested_ips,
                conf.port_mappings,
                request.pod,
            )
            undo.push(
                "allocation",
                lambda: store.remove_attachment(conf.name, request.container_id, request.ifname),
            )
            log.info(
                "ADD %s/%s: allocated %s",
                request.container_id,
                request.ifname,
                ", ".join(str(a.ip) for a in allocations),
            )
            checkpoint(request, "ipam")

            gateways = _gateways(allocations)
            moved: list[Attachment] = []  # other pods put back on a bridge made again
            on_made = functools.partial(_reattach, ipr, store, conf, request, moved)
            br = resources.bridge(ipr, conf.bridge, gateways, conf.mtu, on_made=on_made)
            checkpoint(request, "bridge")

            # Registered before creating: a failure after the kernel made the pair (setting
            # its alias, say) must still remove it. The name is this attachment's alone.
            # Undo runs after the `with` has released ipr: it takes the handle again.
            undo.push(f"veth {host_name}", lambda: _delete_host_veth(host_name))
            br, pair = _make_pair(ipr, nl, conf, request, host_name, nsfd, br, gateways, on_made)
            checkpoint(request, "veth")

            host_index = pair.host_index
            ifb = _shape(ipr, conf, request, host_index, host_name, undo)
            checkpoint(request, "bandwidth")

            addresses = [ipaddress.ip_interface(f"{a.ip}/{a.prefixlen}") for a in allocations]
            routes = pod_routes(conf, allocations)
            with Rtnl.inside(nsfd) as pod_nl:
                veth.configure_pod(pod_nl, request.ifname, pair.pod_index, addresses, routes)
            checkpoint(request, "pod")
            checkpoint(request, "host")

            sysctl.enable_forwarding({a.ip.version for a in allocations})
            masquerade.record_network(store, conf)
            # A bridge made again lost its route_localnet: apply everything again.
            masquerade.sync(store, force=any(a.port_mappings for a in moved))
            checkpoint(request, "masquerade")
            _require_same_netns(request.netns, nsfd)
    except BaseException:
        undo.unwind()
        if conf.ip_masq or conf.port_mappings:
            _resync_quietly(store)
        raise
    result = _result(conf, request, br, host_name, pair.host_mac, pair.pod_mac, allocations, routes)
    if ifb is not None:
        result.interfaces.append(ifb)  # as the bandwidth plugin does: every interface ADD made
    return result


def _make_pair(
    ipr, nl, conf: NetConf, request: Request, host_name: str, nsfd: int, br, gateways, on_made
):
    """Create the veth pair. If that fails, cure the two causes a retry can cure, then try
    once more: a host veth of this name left by a crashed ADD whose DEL never came (the store
    had no attachment, so it holds nothing), and a bridge this agent thread remembered that is
    gone. Trying first keeps the common case to one round trip."""
    alias = names.host_veth_alias(conf.name, request.container_id, request.ifname)
    # A pod reaching itself through a Service (kube-proxy's DNAT) or its own hostPort: under
    # br_netfilter the DNATed frame goes back out of the port it came in by.
    hairpin = conf.hairpin_mode or bool(conf.port_mappings)

    def create(bridge):
        return veth.create_pair(
            nl,
            host_name,
            alias,
            request.ifname,
            nsfd,
            conf.mtu,
            conf.mac,
            bridge["index"],
            hairpin,
        )

    try:
        return br, create(br)
    except CniError:
        stale = veth.delete_host_veth(nl, host_name)
        if stale:
            log.warning("removed stale %s left by an earlier ADD", host_name)
        forgot = resources.forget_bridge(conf.bridge)
        if not (stale or forgot):
            raise
    if forgot:
        br = resources.bridge(ipr, conf.bridge, gateways, conf.mtu, fresh=True, on_made=on_made)
    return br, create(br)


def _reattach(ipr, store: Store, conf: NetConf, request: Request, moved: list, link) -> None:
    """The bridge was down, so made just now. If someone had deleted it, the kernel took every
    port off it: put this network's other pods' host veths back on it (with their hairpin
    mode), so they are reachable again without being recreated."""
    others = [
        a
        for a in store.list_attachments(conf.name)
        if (a.container_id, a.ifname) != (request.container_id, request.ifname)
    ]
    if not others:
        return  # the node's first pod: nothing was cut off
    links = {m.get("IFLA_IFNAME"): m for m in ipr.link("dump")}
    for att in others:
        name = att.host_veth or names.host_veth_name(conf.name, att.container_id, att.ifname)
        port = links.get(name)
        if port is None or port.get("IFLA_MASTER") == link["index"]:
            continue
        try:
            ipr.link("set", index=port["index"], master=link["index"])
            if conf.hairpin_mode or att.port_mappings:
                with resources.host_rtnl() as nl:
                    veth.set_hairpin(nl, name)
        except NetlinkError as exc:  # e.g. deleted meanwhile by its DEL
            log.warning("could not put %s back on bridge %s: %s", name, conf.bridge, exc)
            continue
        moved.append(att)
        log.warning(
            "bridge %s was made again: put %s (%s/%s) back on it",
            conf.bridge,
            name,
            att.container_id,
            att.ifname,
        )


def _require_same_netns(path: str, nsfd: int) -> None:
    """The pod's netns must still be the one at CNI_NETNS. Deleted during ADD (the pod died,
    someone ran `ip netns del`), it lives on only through our descriptor, and closing that
    would take the new interface with it: fail now, and the undo removes the rest."""
    held = os.fstat(nsfd)
    try:
        now = os.stat(path)
    except OSError:
        now = None
    if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
        raise CniError(UNKNOWN_CONTAINER, f"network namespace {path} disappeared during ADD")


def _shape(
    ipr, conf: NetConf, request: Request, host_index: int, host_name: str, undo: UndoStack
) -> Interface | None:
    """Traffic shaping (capability `bandwidth`), before the pod has an address: no traffic
    passes unshaped. Return the ifb when egress shaping made one."""
    if conf.bandwidth is None:
        return None
    ifb = names.ifb_name(conf.name, request.container_id, request.ifname)
    if conf.bandwidth.egress is not None:
        # Registered before creating, as the veth: a half-made ifb must go too.
        undo.push(f"ifb {ifb}", lambda: _delete_ifb(ifb))
    alias = names.ifb_alias(conf.name, request.container_id, request.ifname)
    made = bandwidth.shape(ipr, host_index, host_name, conf.bandwidth, ifb, alias, conf.mtu)
    return Interface(name=ifb, mac=made[1]) if made else None


def _delete_ifb(name: str) -> None:
    with resources.host_netlink() as ipr:
        bandwidth.delete_ifb(ipr, name)


def _delete_host_veth(name: str) -> None:
    with resources.host_rtnl() as nl:
        veth.delete_host_veth(nl, name)


def _resync_quietly(store: Store) -> None:
    try:
        masquerade.sync(store)
    except Exception:
        log.exception("packet rules resync after a failed ADD")


def _gateways(allocations: list[Allocation]) -> list:
    return [
        ipaddress.ip_interface(f"{a.gateway}/{a.prefixlen}")
        for a in allocations
        if a.gateway is not None
    ]


def pod_routes(conf: NetConf, allocations: list[Allocation]) -> list[Route]:
    """Default routes via the gateways (isDefaultGateway), then the configured routes; a route
    without gw goes via its family's gateway."""
    gw_by_family = {a.ip.version: a.gateway for a in allocations if a.gateway is not None}
    out: list[Route] = []
    if conf.is_default_gateway:
        for family, gw in gw_by_family.items():
            dst = ipaddress.ip_network("0.0.0.0/0" if family == 4 else "::/0")
            out.append(Route(dst, gw, {}))
    for r in conf.routes:
        if r.dst.version not in gw_by_family and r.gw is None:
            continue  # no address of that family: the route could not work
        route = Route(r.dst, r.gw or gw_by_family.get(r.dst.version), dict(r.extras))
        if not any(
            o.dst == route.dst and o.extras.get("table") == route.extras.get("table") for o in out
        ):
            out.append(route)
    return out


def _result(conf, request, br, host_name, host_mac, pod_mac, allocations, routes) -> Result:
    prev = conf.prev_result or Result()
    base = len(prev.interfaces)
    res = Result(
        interfaces=list(prev.interfaces)
        + [
            Interface(name=conf.bridge, mac=br.get("IFLA_ADDRESS") or ""),
            Interface(name=host_name, mac=host_mac or ""),
            Interface(name=request.ifname, mac=pod_mac or "", sandbox=request.netns, mtu=conf.mtu),
        ],
        ips=list(prev.ips)
        + [
            IPConfig(ipaddress.ip_interface(f"{a.ip}/{a.prefixlen}"), a.gateway, base + 2)
            for a in allocations
        ],
        routes=list(prev.routes) + routes,
        dns={**prev.dns, **conf.dns},
    )
    return res
