"""CHECK: the pod's networking still matches prevResult and the store; drift is an error."""

from __future__ import annotations

import ipaddress

from pyroute2 import IPRoute

from ..cni.env import Request
from ..cni.errors import CHECK_FAILED, INVALID_NETWORK_CONFIG, UNKNOWN_CONTAINER, CniError
from ..cni.netconf import NetConf
from ..dataplane import bandwidth, names, veth
from ..dataplane.netns import pod_netlink
from ..ipam.records import Attachment
from ..rules import sync as rules_sync
from ..rules.model import HostPort
from . import masquerade, resources
from .add import pod_routes


def _drift(what: str) -> CniError:
    return CniError(CHECK_FAILED, f"CHECK failed: {what}")


def cmd_check(request: Request, conf: NetConf) -> None:
    prev = conf.prev_result
    if prev is None:
        raise CniError(
            INVALID_NETWORK_CONFIG,
            "invalid network config: prevResult: CHECK needs the result of the ADD",
        )
    with resources.store(conf.data_dir) as store:
        att = store.get_attachment(conf.name, request.container_id, request.ifname)
    if att is None:
        raise CniError(
            UNKNOWN_CONTAINER,
            f"no attachment of container {request.container_id} "
            f"on {request.ifname} in network {conf.name}",
        )
    pod_index = next(
        (i for i, itf in enumerate(prev.interfaces) if itf.name == request.ifname and itf.sandbox),
        None,
    )
    pod_iface = prev.interfaces[pod_index] if pod_index is not None else None
    expected = {
        str(ip.address) for ip in prev.ips if pod_index is None or ip.interface in (None, pod_index)
    }
    stored = {f"{a.ip}/{a.prefixlen}" for a in att.allocations}
    if not stored <= expected:
        raise _drift(f"store holds {sorted(stored)} but prevResult says {sorted(expected)}")

    with resources.host_netlink() as ipr:
        _check_host_side(ipr, conf, request, att)
    with pod_netlink(request.netns) as nsipr:
        _check_pod_side(nsipr, conf, request, pod_iface, stored, att)
    if att.port_mappings:
        _check_hostports(att)


def _check_hostports(att: Attachment) -> None:
    """Every DNAT of the attachment's port mappings is in the node's rules (one `nft list`)."""
    wanted, _ = masquerade.hostport_rules([att])
    have = rules_sync.installed()
    missing = set(wanted) - set(have.hostports if have is not None else ())
    if missing:
        hp = min(missing, key=HostPort.sort_key)
        raise _drift(
            f"hostPort {hp.host_port}/{hp.protocol} to {hp.pod_ip}:{hp.pod_port} "
            "is missing from the node's packet rules"
        )


def _check_host_side(ipr: IPRoute, conf: NetConf, request: Request, att: Attachment) -> None:
    allocations = att.allocations
    host_name = att.host_veth or names.host_veth_name(
        conf.name, request.container_id, request.ifname
    )
    br = veth.lookup(ipr, conf.bridge)
    if br is None:
        raise _drift(f"bridge {conf.bridge} is missing")
    have = {(a.get("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.addr("dump", index=br)}
    for a in allocations:
        if a.gateway is not None and (str(a.gateway), a.prefixlen) not in have:
            raise _drift(
                f"bridge {conf.bridge} lacks the gateway address {a.gateway}/{a.prefixlen}"
            )
    index = veth.lookup(ipr, host_name)
    if index is None:
        raise _drift(f"host veth {host_name} is missing")
    link = ipr.link("get", index=index)[0]
    if link.get("IFLA_MASTER") != br:
        raise _drift(f"host veth {host_name} is not attached to bridge {conf.bridge}")
    if not link["flags"] & 1:
        raise _drift(f"host veth {host_name} is down")
    if (conf.hairpin_mode or att.port_mappings) and not veth.hairpin_of(link):
        why = "hairpinMode" if conf.hairpin_mode else "the pod has hostPorts"
        raise _drift(
            f"host veth {host_name} is not in hairpin mode ({why}): the pod cannot reach "
            f"itself through a Service or hostPort; `bridge link set dev {host_name} hairpin on` "
            "or delete and add the pod again"
        )
    if conf.bandwidth is not None:
        ifb = names.ifb_name(conf.name, request.container_id, request.ifname)
        problem = bandwidth.drift(ipr, index, host_name, conf.bandwidth, ifb)
        if problem:
            raise _drift(problem)


def _check_pod_side(nsipr, conf, request, pod_iface, stored, att) -> None:
    index = veth.lookup(nsipr, request.ifname)
    if index is None:
        raise _drift(f"{request.ifname} is missing in {request.netns}")
    link = nsipr.link("get", index=index)[0]
    if not link["flags"] & 1:
        raise _drift(f"{request.ifname} is down")
    mac = link.get("IFLA_ADDRESS")
    if pod_iface is not None and pod_iface.mac and mac != pod_iface.mac.lower():
        raise _drift(f"{request.ifname} has MAC {mac}, prevResult says {pod_iface.mac}")
    have = {f"{a.get('IFA_ADDRESS')}/{a['prefixlen']}" for a in nsipr.addr("dump", index=index)}
    missing = stored - have
    if missing:
        raise _drift(f"address {', '.join(sorted(missing))} is missing on {request.ifname}")
    routes = set()
    for family in (2, 10):  # AF_INET, AF_INET6
        for r in nsipr.route("dump", family=family):
            dst = r.get("RTA_DST")
            plen = r["dst_len"]
            if dst is None:
                dst = "0.0.0.0" if family == 2 else "::"
            routes.add((ipaddress.ip_network(f"{dst}/{plen}"), r.get("RTA_GATEWAY")))
    for want in pod_routes(conf, att.allocations):
        if "table" in want.extras:
            continue  # routes in other tables are not in the main dump
        gw = str(want.gw) if want.gw is not None else None
        if (want.dst, gw) not in routes:
            raise _drift(f"route {want.dst} via {gw or 'link'} is missing in {request.netns}")
