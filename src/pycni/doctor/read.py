"""Taking the snapshots the doctor compares: the IPAM stores (read-only), the links of the
current network namespace, each pod's namespace, pycni's packet rules, and the cluster routes
the running agent's backend wants.

Nothing here changes anything: the store is opened read-only, netlink is only dumped, the
packet rules only listed. Pods' namespaces are entered the way the core enters them (a netlink
socket born inside, the thread back at once), opened without blocking, so a broken or bogus
netns path is a finding, never a hang.
"""

from __future__ import annotations

import dataclasses
import fcntl
import ipaddress
import os
import sqlite3
from collections import defaultdict
from contextlib import nullcontext
from urllib.parse import quote

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from ..cni.errors import CniError
from ..dataplane.netns import CLONE_NEWNET, NS_GET_NSTYPE, netlink_in
from ..dataplane.veth import hairpin_of
from ..ipam.faults import file_damage
from ..ipam.schema import BUSY_TIMEOUT_MS, SCHEMA_VERSION
from ..ipam.store import Store
from .model import (
    ClusterView,
    DoctorError,
    FastPathView,
    Link,
    NetnsView,
    NodeSnapshot,
    RulesView,
    StoredAllocation,
    StoredAttachment,
    StoreSnapshot,
)

IFF_UP = 1


class ReadOnlyStore(Store):
    """The store's own queries over a read-only SQLite connection. Store() itself would create
    a missing database, fix its file mode and set up its schema; the doctor changes nothing."""

    def __init__(self, data_dir: str) -> None:
        self.path = os.path.join(data_dir, "pycni.db")
        self._writer_lock = nullcontext()
        self._conn = None
        damage = file_damage(self.path)  # SQLite would read past a damaged log silently
        if damage:
            raise DoctorError(
                f"the IPAM database {self.path} {damage}: pycni will not use it "
                '(recovery: docs/operations.md, "When the IPAM store cannot be used")'
            )
        try:
            self._conn = sqlite3.connect(
                f"file:{quote(self.path)}?mode=ro",
                uri=True,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
            )
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        except sqlite3.Error as exc:
            self.close()
            raise DoctorError(f"cannot read the IPAM database {self.path}: {exc}") from None
        if version != SCHEMA_VERSION:
            self.close()
            raise DoctorError(
                f"the IPAM database {self.path} has schema version {version}, "
                f"this pycni understands {SCHEMA_VERSION}"
            )


def read_store(data_dir: str) -> tuple[StoreSnapshot, object | None]:
    """The store's attachments, every allocation row (also those no attachment owns) and
    networks, and the packet rules it wants (rules.model.RuleSet), all from one read
    transaction. No database: an empty store that wants nothing (None)."""
    if not os.path.exists(os.path.join(data_dir, "pycni.db")):
        return StoreSnapshot(data_dir), None
    from ..core import masquerade

    with ReadOnlyStore(data_dir) as store:
        conn = store.conn
        try:
            conn.execute("BEGIN")  # the store's own reads below join this snapshot
            try:
                attachments = [
                    StoredAttachment(data_dir, *row)
                    for row in conn.execute(
                        "SELECT id, network, container_id, ifname, host_veth, netns"
                        " FROM attachments ORDER BY network, created, id"
                    )
                ]
                allocations = [
                    StoredAllocation(data_dir, *row)
                    for row in conn.execute(
                        "SELECT attachment_id, network, ip, prefixlen, gateway, range_set"
                        " FROM allocations ORDER BY attachment_id, seq"
                    )
                ]
                networks = store.list_networks()
                mapped = {
                    (a.network, a.container_id, a.ifname)
                    for a in store.attachments_with_port_mappings()
                }
                attachments = [
                    dataclasses.replace(a, hostports=True)
                    if (a.network, a.container_id, a.ifname) in mapped
                    else a
                    for a in attachments
                ]
                desired = masquerade.desired_rules(store)
            finally:
                conn.execute("ROLLBACK")
        except (sqlite3.Error, CniError) as exc:
            raise DoctorError(f"cannot read the IPAM database {store.path}: {exc}") from None
    return StoreSnapshot(data_dir, attachments, allocations, networks), desired


def read_links(ipr: IPRoute) -> dict[str, Link]:
    """Every link of the namespace `ipr` is bound to, with its addresses (link-local left
    out: the kernel adds those by itself)."""
    addresses: dict[int, set[str]] = defaultdict(set)
    for msg in ipr.addr("dump"):
        ip = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        if not ip:
            continue
        iface = ipaddress.ip_interface(f"{ip}/{msg['prefixlen']}")
        if not iface.ip.is_link_local:
            addresses[msg["index"]].add(str(iface))
    links = {}
    for msg in ipr.link("dump"):
        info = msg.get("IFLA_LINKINFO")
        name = msg.get("IFLA_IFNAME")
        links[name] = Link(
            name=name,
            index=msg["index"],
            kind=(info.get("IFLA_INFO_KIND") if info else None) or "",
            up=bool(msg["flags"] & IFF_UP),
            master=msg.get("IFLA_MASTER"),
            alias=msg.get("IFLA_IFALIAS") or "",
            peer=msg.get("IFLA_LINK"),
            mac=(msg.get("IFLA_ADDRESS") or "").lower(),
            addresses=frozenset(addresses.get(msg["index"], ())),
            hairpin=hairpin_of(msg),
        )
    return links


def read_netns(path: str) -> NetnsView:
    """A pod's namespace and its links. Gone or not a network namespace: a view saying so.
    Opened non-blocking, so a FIFO or other oddity at the path never hangs the doctor."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except (FileNotFoundError, NotADirectoryError):
        return NetnsView(path, "does not exist")
    except OSError as exc:
        raise DoctorError(f"cannot open netns {path}: {exc.strerror}") from None
    try:
        try:
            kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError:
            kind = None
        if kind != CLONE_NEWNET:
            return NetnsView(path, "is not a network namespace")
        try:
            ipr = netlink_in(fd)
        except OSError as exc:  # setns needs CAP_SYS_ADMIN
            raise DoctorError(f"cannot enter netns {path}: {exc.strerror}") from None
        try:
            return NetnsView(path, links=read_links(ipr))
        finally:
            ipr.close()
    finally:
        os.close(fd)


def merge_rules(sets: list) -> object:
    """One RuleSet holding every entry of `sets` (several data dirs share one table)."""
    from ..rules.model import merge

    return merge(sets)


def read_rules(desired_sets: list) -> RulesView:
    from ..rules import sync

    try:
        backend = sync.resolve_backend()
    except (CniError, ValueError) as exc:
        raise DoctorError(f"packet rules: {exc}") from None
    try:
        desired = merge_rules(desired_sets)
    except ValueError as exc:
        raise DoctorError(f"packet rules: the data dirs want conflicting rules: {exc}") from None
    try:
        installed = sync.installed(backend)
    except CniError as exc:
        if not desired and "not found" in str(exc):
            return RulesView(backend, desired, None)  # no tool, and nothing wanted from it
        raise DoctorError(str(exc)) from None
    return RulesView(backend, desired, installed, read_bridge_netfilter())


def read_bridge_netfilter() -> dict[str, str]:
    from ..agent.policy import BRIDGE_NF

    out = {}
    for path in BRIDGE_NF:
        try:
            with open(path) as f:
                out[os.path.basename(path)] = f.read().strip()
        except OSError:
            out[os.path.basename(path)] = ""
    return out


def read_cluster(
    ipr: IPRoute, status: dict, links: dict[str, Link]
) -> tuple[ClusterView, list[str]]:
    """The agent's node list planned by its backend, and the kernel's routes, neighbours and
    FDB entries; with notes on the peers the plan leaves out."""
    from ..backends import read_state, read_underlay
    from ..backends.plan import VtepInfo, desired
    from ..cluster.model import NodeRecord

    node, backend = str(status.get("node", "")), str(status.get("backend", ""))
    if not status.get("ready"):
        return ClusterView(node, backend, False, str(status.get("reason") or "")), []
    iface, vtep_name = status.get("iface"), str(status.get("vtep") or "")
    if not iface:
        raise DoctorError(
            "the agent does not report its underlay interface (an older "
            "agent?): cluster routes not checked"
        )
    local = NodeRecord(
        node,
        tuple(status.get("nodeIPs") or ()),
        tuple(status.get("subnets") or ()),
        str(status.get("vtepMAC") or ""),
    )
    nodes = [NodeRecord.from_json(n) for n in status.get("remoteNodes") or ()]
    try:
        underlay = read_underlay(ipr, iface)
    except NetlinkError as exc:
        raise DoctorError(f"underlay interface {iface}: {exc}") from None
    vtep_link = links.get(vtep_name)
    vtep = None
    if backend != "host-gw" and vtep_link is not None and vtep_link.kind == "vxlan":
        vtep = VtepInfo(vtep_link.index, local.vtep_mac)
    want = desired(local, nodes, backend, underlay, vtep)
    have = read_state(ipr, vtep.ifindex if vtep else None)
    notes = [f"cluster: the {backend} plan leaves out {s}" for s in want.skipped]
    view = ClusterView(
        node,
        backend,
        True,
        "",
        want,
        have,
        vtep_name,
        local.vtep_mac,
        network=str(status.get("network") or ""),
        subnets=tuple(str(s) for s in local.subnets),
    )
    return view, notes


def snapshot(
    data_dirs: list[str], agent_socket: str | None
) -> tuple[NodeSnapshot, list[str], list[str]]:
    """(snapshot, errors, notes) of this network namespace and `data_dirs`."""
    errors: list[str] = []
    notes: list[str] = []
    snap = NodeSnapshot()
    desired_sets = []
    for data_dir in data_dirs:
        try:
            store, desired = read_store(data_dir)
        except DoctorError as exc:
            errors.append(str(exc))
            snap.stores_complete = False
            continue
        snap.stores.append(store)
        if desired is None:
            notes.append(f"{data_dir}: no IPAM database (no pod was ever added with it)")
        else:
            desired_sets.append(desired)
    with IPRoute() as ipr:
        snap.links = read_links(ipr)
        for path in sorted({a.netns for a in snap.attachments()}):
            try:
                snap.netns[path] = read_netns(path)
            except DoctorError as exc:
                errors.append(str(exc))
        if snap.stores_complete:  # what an unreadable store wants is unknown
            try:
                snap.rules = read_rules(desired_sets)
            except DoctorError as exc:
                errors.append(str(exc))
        try:
            snap.cluster, more = _cluster(ipr, agent_socket, snap.links)
            notes += more
        except DoctorError as exc:
            errors.append(f"cluster: {exc}")
        if snap.cluster is not None:
            try:
                snap.fast_path = read_fast_path(ipr, _fast_path_status(agent_socket))
            except DoctorError as exc:
                errors.append(f"fast path: {exc}")
    return snap, errors, notes


def _fast_path_status(agent_socket: str | None) -> dict:
    from ..agent.client import agent_health

    if agent_socket is None:
        return {}
    health = agent_health(agent_socket).get("health") or {}
    return (health.get("cluster") or {}).get("fastPath") or {}


def read_fast_path(ipr: IPRoute, status: dict) -> FastPathView | None:
    """The agent's fast-path state beside the kernel's; None when the agent reports none (an
    agent from before the fast path)."""
    from ..dataplane import fastpath as fp

    if "enabled" not in status:
        return None
    try:
        attached = fp.attachments()
    except fp.FastPathError as exc:
        if not status["enabled"]:
            return FastPathView(False)  # no bpftool: nothing can have been attached either
        raise DoctorError(str(exc)) from None
    pairs = tuple(sorted((dev, p["name"]) for dev, progs in attached.items() for p in progs))
    shaped = set()
    for dev in attached:
        links = ipr.link_lookup(ifname=dev)
        if links and {q.get("TCA_KIND") for q in ipr.get_qdiscs(links[0])} - fp.SHAPING_FREE:
            shaped.add(dev)
    pods = remote = None
    # The agent names its maps; from_underlay alone (before the pass that saw the first pod)
    # would not lead to the remote map.
    maps: dict[str, int] = dict(status.get("maps") or {})
    if not maps:
        for prog in sorted({p["id"] for progs in attached.values() for p in progs if p.get("id")}):
            maps.update(fp.prog_maps(prog))
    if maps:
        try:
            pods = frozenset(str(ip) for ip in fp.decode_pods(fp.read_map(maps[fp.MAPS[0]])))
            remote = frozenset(str(n) for n in fp.decode_remote(fp.read_map(maps[fp.MAPS[1]])))
        except (fp.FastPathError, KeyError) as exc:
            raise DoctorError(f"reading the maps {maps}: {exc}") from None
    return FastPathView(
        bool(status["enabled"]),
        frozenset(status.get("interfaces") or ()),
        frozenset(status.get("pods") or ()),
        frozenset(status.get("remoteSubnets") or ()),
        pairs,
        frozenset(shaped),
        pods,
        remote,
    )


def _cluster(
    ipr: IPRoute, agent_socket: str | None, links: dict[str, Link]
) -> tuple[ClusterView | None, list[str]]:
    if agent_socket is None:
        return None, ["cluster routes not checked: no agent socket given"]
    from ..agent.client import agent_health

    answer = agent_health(agent_socket)
    if not answer["running"] or answer["health"] is None:
        return None, [
            f"cluster routes not checked: no agent answers at {agent_socket} ({answer['error']})"
        ]
    status = answer["health"].get("cluster")
    if status is None:
        return None, [
            f"no cluster routes to check: the agent at {agent_socket} runs no cluster side"
        ]
    return read_cluster(ipr, status, links)
