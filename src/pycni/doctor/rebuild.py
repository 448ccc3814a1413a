"""Rebuild a lost IPAM store from the node: `pycnictl doctor --rebuild-store`.

After a damaged database was moved aside (docs/operations.md, "When the IPAM store cannot be
used"), the new one knows none of the node's pods, and would hand their addresses out again.
Everything it needs is still on the node, findable by name: each host veth's alias says whose it is
(network, container ID, ifname); its peer's network namespace (found among the bind-mounted
ones by its id) holds the pod's interface and addresses; the network's config gives the range
each address came from; pycni's packet rules hold the pods' hostPorts. Each pod found is
recorded as it is, then the packet rules are made what the new store wants.

Only into a new store: one that already holds attachments is never touched.
"""

from __future__ import annotations

import glob
import ipaddress
import os
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..cni.errors import CniError
from ..cni.netconf import NetConf, PortMapping
from ..dataplane import names
from ..dataplane.netns import netlink_in
from ..ipam.faults import file_damage
from ..ipam.records import Allocation
from ..ipam.store import Store

# Where runtimes bind-mount pods' network namespaces (containerd, CRI-O, podman, ip netns).
NETNS_DIRS = ("/run/netns", "/var/run/netns")


class RebuildError(Exception):
    pass


@dataclass
class Rebuilt:
    restored: list[str] = field(default_factory=list)  # one line per attachment recorded
    skipped: list[str] = field(default_factory=list)  # one line per veth left alone, and why


def rebuild_store(data_dir: str, confs: list[NetConf]) -> Rebuilt:
    """Record in a new store at `data_dir` every pod of the networks `confs` found in this
    network namespace; RebuildError when the store there is not new."""
    _require_new(data_dir)
    by_name = {conf.name: conf for conf in confs}
    out = Rebuilt()
    with Store(data_dir) as store, IPRoute() as ipr:
        paths = _netns_by_id(ipr)
        hostports = _installed_hostports()
        for link in ipr.link("dump"):
            owner = _owner(link)
            if owner is None:
                continue
            network, cid, ifname = owner
            veth = link.get("IFLA_IFNAME")
            conf = by_name.get(network)
            if conf is None:
                out.skipped.append(
                    f"{veth} ({network} {cid} {ifname}): no config of network "
                    f"{network} with dataDir {data_dir} given"
                )
                continue
            try:
                line = _restore(store, conf, link, cid, ifname, paths, hostports)
            except (RebuildError, CniError) as exc:
                out.skipped.append(f"{veth} ({network} {cid} {ifname}): {exc}")
                continue
            out.restored.append(line)
        from ..core import masquerade

        for conf in confs:
            masquerade.record_network(store, conf)
        masquerade.sync(store)  # a new store applies all it wants, stale rules go
    return out


def _require_new(data_dir: str) -> None:
    path = os.path.join(data_dir, "pycni.db")
    if not os.path.exists(path):
        return
    damage = file_damage(path)
    if damage:
        raise RebuildError(
            f"the IPAM database {path} {damage}: move it aside first, with "
            f"{path}-wal and {path}-shm"
        )
    try:
        with Store(data_dir) as store:
            held = len(store.list_attachments())
    except CniError as exc:
        raise RebuildError(f"{exc.msg}: move it aside first") from None
    if held:
        raise RebuildError(
            f"the IPAM database {path} holds {held} attachments: a rebuild only "
            "fills a new one (move this one aside first if it is wrong)"
        )


def _owner(link) -> tuple[str, str, str] | None:
    """(network, container ID, ifname) from a host veth's alias, or None if not pycni's."""
    info = link.get("IFLA_LINKINFO")
    alias = link.get("IFLA_IFALIAS") or ""
    if info is None or info.get("IFLA_INFO_KIND") != "veth":
        return None
    parts = alias.split(" ")
    if len(parts) != 4 or parts[0] != names.ALIAS_PREFIX:
        return None
    network, cid, ifname = parts[1:]
    if names.host_veth_name(network, cid, ifname) != link.get("IFLA_IFNAME"):
        return None  # an alias pycni did not write (or a truncated one)
    return network, cid, ifname


def _netns_by_id(ipr: IPRoute) -> dict[int, str]:
    """The bind-mounted network namespaces, by the id this namespace knows them by."""
    found: dict[int, str] = {}
    seen: set[tuple[int, int]] = set()
    for directory in NETNS_DIRS:
        for path in sorted(glob.glob(os.path.join(directory, "*"))):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) in seen:
                    continue  # /var/run is /run
                seen.add((st.st_dev, st.st_ino))
                nsid = ipr.get_netnsid(fd=fd).get("nsid")
            except Exception:  # not a network namespace: the kernel refuses the query
                continue
            finally:
                os.close(fd)
            if nsid is not None and nsid >= 0:
                found.setdefault(nsid, path)
    return found


def _installed_hostports() -> list:
    from ..rules import sync

    try:
        installed = sync.installed()
    except CniError:
        return []
    return list(installed.hostports) if installed is not None else []


def _restore(
    store: Store, conf: NetConf, link, cid: str, ifname: str, paths: dict[int, str], hostports: list
) -> str:
    nsid = link.get("IFLA_LINK_NETNSID")
    path = paths.get(nsid) if nsid is not None else None
    if path is None:
        raise RebuildError(
            f"its peer's network namespace is not bind-mounted under {' or '.join(NETNS_DIRS)}"
        )
    addresses = _pod_addresses(path, ifname, link["index"])
    allocations = []
    for iface in addresses:
        rs = next((rs for rs in conf.range_sets if rs.find(iface.ip) is not None), None)
        if rs is None:
            raise RebuildError(
                f"{iface} on {ifname} in {path} is in no range of network {conf.name}"
            )
        r = rs.find(iface.ip)
        allocations.append(Allocation(iface.ip, r.subnet.prefixlen, r.gateway, rs.key))
    if not allocations:
        raise RebuildError(f"{ifname} in {path} has no address")
    ips = {a.ip for a in allocations}
    mappings = sorted(
        {
            PortMapping(hp.host_port, hp.pod_port, hp.protocol, hp.host_ip)
            for hp in hostports
            if hp.pod_ip in ips
        },
        key=repr,
    )
    veth = link.get("IFLA_IFNAME")
    store.restore_attachment(conf.name, cid, ifname, veth, path, allocations, mappings)
    shown = ", ".join(str(a.ip) for a in allocations)
    ports = f", hostPorts {', '.join(str(m.host_port) for m in mappings)}" if mappings else ""
    return f"{conf.name} {cid} {ifname}: {shown} ({veth}, {path}{ports})"


def _pod_addresses(path: str, ifname: str, host_index: int) -> list:
    """The addresses of `ifname` in the namespace at `path`, which must be the peer of the
    host veth `host_index`."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ipr = netlink_in(fd)
    finally:
        os.close(fd)
    try:
        try:
            link = ipr.link("get", ifname=ifname)[0]
        except NetlinkError:
            raise RebuildError(f"no {ifname} in {path}") from None
        if link.get("IFLA_LINK") != host_index:
            raise RebuildError(f"{ifname} in {path} is not the peer of this veth")
        out = []
        for msg in ipr.addr("dump", index=link["index"]):
            iface = ipaddress.ip_interface(f"{msg.get('IFA_ADDRESS')}/{msg['prefixlen']}")
            if not iface.ip.is_link_local:
                out.append(iface)
        return out
    finally:
        ipr.close()


def confs_from_files(paths: list[str], data_dir: str) -> list[NetConf]:
    """pycni's networks with dataDir `data_dir` in CNI config files (.conf, or .conflist
    whose plugins get the list's name and cniVersion, as runtimes pass them)."""
    import json

    from ..cni.env import Request
    from ..cni.netconf import parse

    out = []
    for path in paths:
        try:
            with open(path) as f:
                raw = json.load(f)
        except (OSError, ValueError) as exc:
            raise RebuildError(f"{path}: {exc}") from None
        if not isinstance(raw, dict):
            raise RebuildError(f"{path}: not a JSON object")
        plugins = raw.get("plugins") if isinstance(raw.get("plugins"), list) else [raw]
        for plugin in plugins:
            if not isinstance(plugin, dict) or plugin.get("type") != "pycni":
                continue
            merged = {**plugin, "name": raw.get("name", plugin.get("name"))}
            for key in ("cniVersion", "cniVersions"):
                if key in raw:
                    merged[key] = raw[key]
            try:
                conf = parse(merged, Request("GC"))
            except CniError as exc:
                raise RebuildError(f"{path}: {exc.msg}") from None
            if os.path.realpath(conf.data_dir) == os.path.realpath(data_dir):
                out.append(conf)
    return out
