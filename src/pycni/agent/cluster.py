"""The agent's cluster side: lease this node's subnet, publish it, keep the kernel's routes equal
to the datastore's node list, and write the node's CNI config once the subnet is known.

One thread, one netlink socket of its own (never the CNI workers' ones). The loop is event driven
(the datastore's watch wakes it when a node appears, changes or leaves) and periodic (every
``resync`` seconds it reconciles anyway, repairing routes somebody removed). Nothing is removed
when the agent stops: routes, the VTEP and the rules stay, so a restart does not interrupt
traffic, and the next agent finds them already right.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..cluster.datastore import Datastore
from ..cluster.kv import KVError
from ..cluster.model import ClusterError, ClusterSettings, NodeRecord
from ..node_config import node_conflist, read_subnet_env, write_conflist, write_subnet_env

log = logging.getLogger("pycni")

STOP_CHECK = 0.5  # seconds: the longest the loop waits without looking at stop()


@dataclass
class ClusterOptions:
    settings: ClusterSettings
    node_name: str
    backend: str = "vxlan"
    # Underlay interface; "" = the one holding the node's address (node_ips, else what the
    # datastore knows: the Node's InternalIP), else the one holding the default route.
    iface: str = ""
    node_ips: tuple[str, ...] = ()  # "" = the underlay interface's addresses
    conf_dir: str = "/etc/cni/net.d"
    conf_name: str = "10-pycni.conflist"
    subnet_file: str = "/run/pycni/subnet.env"
    network_name: str = "pycni"
    bridge: str = "cni0"
    ip_masq: bool = True
    masq_exclude: tuple[str, ...] = ()
    data_dir: str = "/var/lib/pycni"
    agent_socket: str = ""
    resync: float = 10.0
    vni: int = 1
    vxlan_port: int = 8472
    fast_path: bool = True  # the eBPF fast path where the kernel allows it
    conf_extra: dict = field(default_factory=dict)  # more plugin keys for the conflist

    @property
    def conflist_path(self) -> str:
        return os.path.join(self.conf_dir, self.conf_name)


class ClusterNode:
    def __init__(self, options: ClusterOptions, store: Datastore) -> None:
        self.options = options
        self.store = store
        self.record: NodeRecord | None = None
        self.nodes: list[NodeRecord] = []
        self.reason = "waiting for this node's subnet from the datastore"
        # Set while the datastore says this registered node is gone or has no subnet (the
        # Node was deleted, or registered again without a podCIDR yet): the node is not
        # ready until it has its subnet again.
        self.lost = ""
        # The last datastore or kernel error of the loop, "" once a pass went through.
        self.last_error = ""
        self.last_changes = None  # backends.Changes of the last pass
        self.reconciles = 0
        self.last_duration = 0.0
        self.last_done = 0.0  # wall clock at the end of the last pass
        self.observers: list = []  # callables(seconds, changes)
        self._remote_json: tuple = ([], None, [])  # (nodes, record, remoteNodes) of status()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ipr = None
        self._watch: Any = None  # backends.watch.KernelWatch, made with _ipr in its thread
        self.iface = options.iface
        from .fastpath import FastPathController

        self.fastpath = FastPathController(
            options.data_dir, options.network_name, options.bridge, options.fast_path
        )

    # --- life cycle ------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """The node has its subnet and its CNI config is written, and the datastore still
        knows it."""
        return self.record is not None and not self.lost

    def not_ready_reason(self) -> str | None:
        """For STATUS: None when ADDs can succeed, else why not."""
        return None if self.ready else self.reason

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reconcile", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                # Stuck in a datastore or kernel call: closing under it would only add errors;
                # the process is exiting anyway.
                log.warning("cluster loop did not stop within %.0f s", timeout)
                return
        self.store.close()
        if self._ipr is not None:
            self._ipr.close()
        if self._watch is not None:
            self._watch.close()

    def _wait(self, seconds: float) -> None:
        """Until the datastore reports a change, ``seconds`` pass or stop() is called: waits in
        short slices so that SIGTERM never waits for a whole resync period."""
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or self.store.wait(min(left, STOP_CHECK)):
                return

    def _run(self) -> None:
        from pyroute2 import IPRoute

        from ..backends.watch import KernelWatch

        self._ipr = IPRoute()
        self._watch = KernelWatch.open()  # None: every pass reads the kernel
        backoff = 0.5
        next_keepalive = 0.0
        renew = self.store.renew_every
        # Never back off for longer than a renewal period: once the datastore is back, this
        # node must renew its lease before it expires, or the others would drop a live node.
        most = min(10.0, max(0.5, renew))
        while not self._stop.is_set():
            try:
                if self.record is None:
                    self._register()
                    next_keepalive = time.monotonic() + renew
                elif time.monotonic() >= next_keepalive:
                    self._adopt(self.store.keepalive())
                    next_keepalive = time.monotonic() + renew
                self.reconcile()
                if self.last_error:
                    log.info("cluster: recovered (the last error was: %s)", self.last_error)
                # The node is in the datastore as registered (a node back as it was needs
                # nothing adopted anew): nothing stands in the way.
                self.lost = self.last_error = self.reason = ""
                backoff = 0.5
                self._wait(max(0.05, min(self.options.resync, next_keepalive - time.monotonic())))
            except ClusterError as exc:
                # No subnet to be had yet (no podCIDR, none free), or no more (this node was
                # deleted from the datastore): not ready until the datastore changes (a
                # podCIDR is allocated, a lease is released) or the backoff ends.
                self.reason = f"not ready: {exc}"
                self.last_error = str(exc)
                if self.record is not None:
                    self.lost = str(exc)
                log.error("cluster: %s (retrying on the next change or in %.1f s)", exc, backoff)
                self._wait(backoff)
                backoff = min(backoff * 2, most)
            except (KVError, OSError) as exc:
                # The datastore cannot be reached: a node that has its subnet stays ready
                # (its pods and routes are fine), and its status shows the error.
                if self.record is None:
                    self.reason = f"not ready: {exc}"
                self.last_error = str(exc)
                log.error("cluster: %s (retrying in %.1f s)", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, most)
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("cluster reconcile loop")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, most)

    # --- this node -------------------------------------------------------------------------

    def _register(self) -> None:
        from ..backends import vtep_mac
        from ..dataplane import sysctl

        opts = self.options
        # Pods' packets to other nodes and the outside are forwarded by this node.
        sysctl.enable_forwarding({c.version for c in opts.settings.cluster_cidrs})
        if opts.iface:
            self.iface = opts.iface
        else:
            known = opts.node_ips or self.store.node_addresses()
            self.iface, why = choose_underlay(
                known, address_holders(self._ipr), default_route_iface(self._ipr)
            )
            log.info("underlay interface %s: %s", self.iface, why)
        node_ips = opts.node_ips or iface_addresses(self._ipr, self.iface)
        if not node_ips:
            raise ClusterError(
                f"underlay interface {self.iface} has no address to publish; give --node-ip"
            )
        mac = vtep_mac(opts.node_name) if opts.backend != "host-gw" else ""
        local = NodeRecord(opts.node_name, tuple(node_ips), self._previous_subnets(), mac)
        self._adopt(self.store.register(local))

    def _previous_subnets(self) -> tuple:
        """The subnets this node had before a restart (subnet.env), so it asks for them again
        even when its lease expired meanwhile: pods keep addresses of their node's subnet."""
        env = read_subnet_env(self.options.subnet_file)
        out = []
        for key in ("SUBNET", "IPV6_SUBNET"):
            try:
                if env.get(key):
                    out.append(ipaddress.ip_network(env[key]))
            except ValueError:
                pass
        return tuple(out)

    def _adopt(self, record: NodeRecord) -> None:
        """Make ``record`` this node's identity: rules, subnet.env and the CNI config first, and
        only then ``self.record`` (which makes the node ready), so a failed write is retried on
        the next pass instead of leaving a "ready" node without a config."""
        if record == self.record:
            self.lost = self.reason = ""  # the datastore has it (again) as it was
            return
        if self.record is not None and record.subnets != self.record.subnets:
            log.warning(
                "node %s: subnets changed from %s to %s",
                record.name,
                ", ".join(map(str, self.record.subnets)),
                ", ".join(map(str, record.subnets)),
            )
        self._write_rules()
        self._write_files(record)
        self.record, self.reason, self.lost = record, "", ""
        log.info(
            "node %s: subnets %s, addresses %s, backend %s",
            record.name,
            ", ".join(map(str, record.subnets)),
            ", ".join(record.node_ips),
            self.options.backend,
        )

    def _write_rules(self) -> None:
        from ..core import masquerade
        from ..ipam.store import Store

        opts = self.options
        with Store(opts.data_dir) as store:
            masquerade.record_cluster(
                store, [str(c) for c in opts.settings.cluster_cidrs], list(opts.masq_exclude)
            )
            masquerade.sync(store)

    def mtu(self, record: NodeRecord) -> int:
        """The pods' MTU: the underlay's, less VXLAN's outer headers when pods may talk
        through the VTEP (vxlan, and auto where some peers are off-link)."""
        from ..backends import read_underlay, vtep_mtu

        underlay = read_underlay(self._ipr, self.iface)
        if self.options.backend == "host-gw":
            return underlay.mtu
        return vtep_mtu(underlay.mtu, ipaddress.ip_address(record.node_ips[0]).version)

    def _write_files(self, record: NodeRecord) -> None:
        opts = self.options
        subnets = [str(s) for s in sorted(record.subnets, key=lambda s: s.version)]
        cidrs = [str(c) for c in opts.settings.cluster_cidrs]
        mtu = self.mtu(record)
        v4, v6 = record.subnet(4), record.subnet(6)
        env = {
            "NETWORK": str(opts.settings.cidr(4) or ""),
            "SUBNET": str(v4 or ""),
            "NODE": record.name,
            "NODE_IPS": ",".join(record.node_ips),
            "BACKEND": opts.backend,
            "IPMASQ": str(opts.ip_masq).lower(),
            "MTU": str(mtu),
        }
        if v6 is not None:
            env["IPV6_NETWORK"] = str(opts.settings.cidr(6))
            env["IPV6_SUBNET"] = str(v6)
        write_subnet_env(opts.subnet_file, env)
        extra = {
            "bridge": opts.bridge,
            "ipMasq": opts.ip_masq,
            "dataDir": opts.data_dir,
            "mtu": mtu,
            **opts.conf_extra,
        }
        if opts.agent_socket:
            extra["agentSocket"] = opts.agent_socket
        write_conflist(
            opts.conflist_path, node_conflist(opts.network_name, subnets, cidrs, **extra)
        )

    # --- routes ----------------------------------------------------------------------------

    def reconcile(self):
        """One pass: read the node list, make the kernel match. Returns the backend's changes."""
        from ..backends import reconcile_once

        assert self.record is not None
        started = time.perf_counter()
        nodes = self.store.nodes()
        if not _same_node(
            self.record, next((n for n in nodes if n.name == self.record.name), None)
        ):
            # Someone changed this node's entry (a new podCIDR, annotations or a lease removed
            # by hand): claim and publish again now rather than at the next keepalive.
            self._adopt(self.store.keepalive())
            nodes = self.store.nodes()
        changes = reconcile_once(
            self._ipr,
            self.record,
            nodes,
            self.options.backend,
            self.iface,
            self.vxlan(),
            watch=self._watch,
        )
        self._log_routes(changes, None if self.reconciles == 0 else self.nodes, nodes)
        skipped = {s.node for s in changes.skipped}
        underlays = [self.iface] + (
            [self.vxlan().name] if self.options.backend != "host-gw" else []
        )
        self.fastpath.reconcile(
            self._ipr, self.record, [n for n in nodes if n.name not in skipped], underlays
        )
        self.nodes = nodes  # what the kernel now holds routes for (status shows it)
        for error in changes.errors:
            log.warning("reconcile: %s", error)
        for skipped in changes.skipped:
            log.warning("reconcile: skipped %s", skipped)
        self.last_duration = time.perf_counter() - started
        self.last_done = time.time()
        self.last_changes = changes
        self.reconciles += 1
        for observe in self.observers:
            observe(self.last_duration, changes)
        return changes

    def _log_routes(self, changes, before: list[NodeRecord] | None, after: list[NodeRecord]):
        """One info line per route to another node added, changed or removed, with why."""
        from ..backends.plan import Reasons, Route

        verbs = {"add": "added", "replace": "changed", "del": "removed"}
        routes = [(op, e) for op, e in changes.done if isinstance(e, Route)]
        if not routes:
            return
        reasons = Reasons(before, after, changes.skipped)
        devs: dict[int, str] = {}  # thousands of routes name the same one or two devices
        for op, entry in routes:
            if entry.dev not in devs:
                devs[entry.dev] = self._dev_name(entry.dev)
            log.info(
                "route %s via %s dev %s %s: %s",
                entry.dst,
                entry.gateway or "-",
                devs[entry.dev],
                verbs[op],
                reasons.why(op, entry),
            )

    def _dev_name(self, index: int) -> str:
        if self._ipr is None:
            return f"index {index}"
        try:
            return self._ipr.link("get", index=index)[0].get("IFLA_IFNAME")
        except Exception:  # gone meanwhile: the log line still says which
            return f"index {index}"

    def vxlan(self):
        from ..backends import VxlanSettings

        return VxlanSettings(
            name=f"pycni.{self.options.vni}", vni=self.options.vni, port=self.options.vxlan_port
        )

    def status(self) -> dict:
        record = self.record
        return {
            "ready": self.ready,
            "reason": self.reason,
            "lastError": self.last_error,
            "node": self.options.node_name,
            "network": self.options.network_name,
            "datastore": self.store.kind,
            "backend": self.options.backend,
            "subnets": [str(s) for s in record.subnets] if record else [],
            "nodeIPs": list(record.node_ips) if record else [],
            "vtepMAC": record.vtep_mac if record else "",
            # What `pycnictl doctor` needs to plan the routes as this agent does.
            "iface": self.iface,
            "vtep": self.vxlan().name,
            "remoteNodes": self._remote_nodes(record),
            "reconciles": self.reconciles,
            "lastReconcileSeconds": round(self.last_duration, 6),
            "lastReconcileAt": round(self.last_done, 6),  # Unix time the last pass ended
            "lastChanges": _changes(self.last_changes),
            "fastPath": self.fastpath.status(),
        }

    def _remote_nodes(self, record: NodeRecord | None) -> list[dict]:
        """status()'s remoteNodes, rendered again only when the nodes changed: with 5,000 of
        them rendering takes ~20 ms, and a status poll during a pass would hold the GIL
        for that long."""
        now = self.nodes  # once: the reconcile thread may replace it meanwhile
        nodes, mine, rendered = self._remote_json
        if mine != record or nodes != now:
            rendered = [n.to_json() for n in now if record and n.name != record.name]
            self._remote_json = (list(now), record, rendered)
        return rendered

    # --- clean removal ---------------------------------------------------------------------

    def leave(self) -> int:
        """`pycnictl leave` (with this node's agent stopped, or it would claim again): free the
        subnet so the other nodes drop their routes, then remove this node's own routes, VTEP
        and forward rules. Pods' addresses and the bridge stay until the pods are deleted."""
        from pyroute2 import IPRoute

        from ..backends import Desired, apply, delete_vtep, read_state
        from ..backends.vxlan import vtep_index
        from ..core import masquerade
        from ..ipam.store import Store

        self.store.release()
        self.store.close()
        with IPRoute() as ipr:
            name = self.vxlan().name
            changes = apply(ipr, Desired(), read_state(ipr, vtep_index(ipr, name)))
            delete_vtep(ipr, name)
        for error in changes.errors:
            log.warning("leave: %s", error)
        with Store(self.options.data_dir) as store:
            masquerade.forget_cluster(store)
            masquerade.sync(store)
        for path in (self.options.conflist_path, self.options.subnet_file):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        log.info("node %s left the cluster", self.options.node_name)
        return 0


def choose_underlay(
    known: Sequence[str], holders: dict[str, str], default: str | None
) -> tuple[str, str]:
    """(underlay interface, why) when --iface is not given: the interface holding one of the
    node's `known` addresses (--node-ip, or the Node's InternalIP), else the one holding the
    default route (`default`), as flannel guesses. `holders`: every local address -> its
    interface. ClusterError when neither finds one."""
    for text in known:
        try:
            name = holders.get(str(ipaddress.ip_address(text)))
        except ValueError:
            continue
        if name:
            return name, f"it holds the node's address {text}"
    if default:
        if known:
            return default, (
                f"it holds the default route (no interface holds the node's address "
                f"{', '.join(known)})"
            )
        return default, "it holds the default route"
    if known:
        raise ClusterError(
            f"no interface holds the node's address {', '.join(known)} and there is no default "
            "route to find the underlay interface by; give --iface"
        )
    raise ClusterError(
        "no default route to find the underlay interface by, and no node address to find it "
        "by (--node-ip; with the kubernetes datastore, the Node's InternalIP); give --iface"
    )


def default_route_iface(ipr) -> str | None:
    """The interface holding the default route (IPv4 first), None when there is none."""
    for family in (2, 10):  # AF_INET, AF_INET6
        for route in ipr.route("dump", family=family, table=254):
            if route["dst_len"] == 0 and route.get("RTA_OIF"):
                return ipr.link("get", index=route.get("RTA_OIF"))[0].get("IFLA_IFNAME")
    return None


def address_holders(ipr) -> dict[str, str]:
    """Every address of this namespace -> the name of the interface holding it."""
    names = {link["index"]: link.get("IFLA_IFNAME") for link in ipr.link("dump")}
    out: dict[str, str] = {}
    for msg in ipr.addr("dump"):
        text = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        if text and msg["index"] in names:
            out.setdefault(str(ipaddress.ip_address(text)), names[msg["index"]])
    return out


def iface_addresses(ipr, ifname: str) -> list[str]:
    """The interface's first global address of each family (IPv4 first)."""
    links = ipr.link_lookup(ifname=ifname)
    if not links:
        raise ClusterError(f"underlay interface {ifname} does not exist")
    found: dict[int, str] = {}
    for msg in ipr.addr("dump", index=links[0]):
        addr = ipaddress.ip_address(msg.get("IFA_ADDRESS"))
        if not addr.is_link_local and addr.version not in found:
            found[addr.version] = str(addr)
    return [found[v] for v in sorted(found)]


def _changes(changes) -> dict:
    if changes is None:
        return {}
    return {
        "added": changes.added,
        "replaced": changes.replaced,
        "removed": changes.removed,
        "errors": list(changes.errors),
        "skipped": [str(s) for s in changes.skipped],
        # The pass trusted the kernel's change notifications and read nothing back.
        "trusted": changes.trusted,
    }


def _same_node(mine: NodeRecord, seen: NodeRecord | None) -> bool:
    """Whether the datastore shows this node as it was registered (subnet order aside)."""
    return (
        seen is not None
        and set(seen.subnets) == set(mine.subnets)
        and seen.node_ips == mine.node_ips
        and seen.vtep_mac == mine.vtep_mac
    )
