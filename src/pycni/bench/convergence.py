"""`pycnictl bench convergence`: how long a real agent's reconcile loop takes to put routes to
N remote nodes into the kernel when they all appear at once, and to take them out when they all
leave at once; and what one no-op pass costs with N nodes present.

Per backend (host-gw, vxlan), register mode and repetition, a fresh world: a node namespace
whose eth0 (10.99.0.1/16) is a veth to an underlay peer namespace (10.99.0.254, the default
route), and a `pycnictl agent` in it (sqlite datastore in a temporary directory, --resync 30
so that convergence comes from the datastore event, not the periodic pass). Once the agent
has leased its subnet, the benchmark itself plays the N other nodes in the same sqlite file,
with on-link underlay addresses 10.99.1.x (routes only: no packet is ever sent to them):

- add: at t0 the N nodes register; the kernel of the node namespace is watched until it holds
  N routes (proto 120), and for vxlan N permanent neighbours and N FDB entries on pycni.1;
- noop: with N nodes present, one lease is rewritten unchanged (an agent restart does that),
  which wakes the agent for a pass that changes nothing; its duration is the agent's own
  `cluster.lastReconcileSeconds`, its wake the time from the write to that pass's end
  (`cluster.lastReconcileAt`). The agent is asked only once the pass is surely over (NOOP_SETTLE
  after the write): its health answer lists every node, and polling it while the pass ran
  would take the pass's CPU and GIL, measuring the polls rather than the pass;
- remove: at t0 the N nodes release their subnets; watched until all their entries are gone.

Register modes: `clients` is N LeaseDatastore clients (one SqliteKV connection and lease
each, opened before t0) calling register() / release() one after another, as N agents would;
the agent may see them in several passes. `batch` writes (deletes) all N leases in one sqlite
transaction, so the agent sees them in one pass: the loop's own latency, without the writers'.

The kernel is watched through rtnetlink multicast (RTNLGRP_IPV4_ROUTE, RTNLGRP_NEIGH) in a
thread of this process, not by polling dumps, which would compete with the agent for the two
CPUs; every phase ends with a dump that must match the datastore exactly. Times are
milliseconds after t0 (the first datastore write). Everything made (agent, namespaces,
temporary directory) is removed whatever happens. Needs root.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import json
import os
import re
import secrets
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from ..agent.launch import agent_argv, wait_until_listening
from ..cluster.leases import (
    DEFAULT_PREFIX,
    LeaseDatastore,
    _value,
    free_subnets,
    key_subnet,
    subnet_key,
)
from ..cluster.model import ClusterSettings, NodeRecord
from ..cluster.sqlite import _POLL as SQLITE_POLL
from ..cluster.sqlite import SqliteKV
from .common import run_and_print

BACKENDS = ("host-gw", "vxlan")
REGISTER_MODES = ("clients", "batch")
CLUSTER_BASE = ipaddress.ip_network("10.128.0.0/9")  # clear of the underlay, 10.99.0.0/16
UNDERLAY = ipaddress.ip_network("10.99.0.0/16")
NODE_IP = UNDERLAY[1]
PEER_IP = UNDERLAY[254]
NODE_NAME = "bench-node"
VTEP = "pycni.1"
RESYNC = 30.0
LEASE_TTL = 3600.0
MAX_NODES = 5000  # a /11 of /24 subnets holds them and the agent's, with room to spare
SPARE_SUBNETS = 5  # beyond the N nodes and the agent: never a full cluster CIDR
NETNS_DIR = "/run/netns"
AGENT_START_TIMEOUT = 30.0
STOP_GRACE = 2.0
HEALTH_POLL = 0.005
NOOP_SETTLE = 0.5  # seconds after the write before asking for the no-op pass's times
NAME_PREFIX = "pycnicv"  # of its namespaces and temporary directories, before the pid


def cluster_cidr(nodes: int) -> ipaddress.IPv4Network:
    """The smallest cluster CIDR (a /16 at least) whose /24 node subnets hold the N remote
    nodes, the agent's own node and a few spare."""
    want = nodes + 1 + SPARE_SUBNETS
    prefix = min(16, 24 - (want - 1).bit_length())
    return ipaddress.ip_network(f"{CLUSTER_BASE.network_address}/{prefix}")


# rtnetlink, as <linux/rtnetlink.h> and <linux/neighbour.h> define it.
RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWNEIGH, RTM_DELNEIGH = 24, 25, 28, 29
RTMGRP_NEIGH, RTMGRP_IPV4_ROUTE = 0x4, 0x40
RTA_DST, RTA_TABLE = 1, 15
NDA_DST, NDA_LLADDR = 1, 2
NUD_PERMANENT = 0x80
AF_BRIDGE = 7
MAIN_TABLE = 254
CLONE_NEWNET = 0x40000000
SO_RCVBUFFORCE = 33
NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, ...
NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
RTATTR = struct.Struct("=HH")  # len, type


class BenchError(Exception):
    pass


# --- watching the node's kernel ----------------------------------------------------------------


@dataclass
class Phase:
    """Kernel events of one measured phase, timestamped on arrival (monotonic seconds)."""

    t0: float
    want: dict[str, int]  # kind -> count at which the phase is done
    first: float | None = None
    done: float | None = None
    events: int = 0


class KernelWatch:
    """pycni's entries in the node namespace as the kernel announces them: routes of proto
    120 in the main table, permanent neighbours and FDB entries on the VTEP."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.vtep_index: int | None = None
        self.present: set[tuple[str, str]] = set()
        self._counts: Counter = Counter()  # kind -> how many of `present`
        self.phase: Phase | None = None
        self.overrun = False  # the socket dropped events: the timings cannot be trusted
        self.cond = threading.Condition()
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kernel-watch", daemon=True)

    def start(self, vtep_index: int | None, seed: set[tuple[str, str]]) -> None:
        self.vtep_index = vtep_index
        self._thread.start()
        if not self._bound.wait(10) or self._error is not None:
            raise BenchError(f"cannot watch the kernel of {self.netns}: {self._error}")
        with self.cond:  # the agent is idle now: a dump after binding is the whole truth
            self.present = set(seed)
            self._counts = Counter(kind for kind, _ in self.present)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def counts(self) -> Counter:
        with self.cond:
            return Counter(kind for kind, _ in self.present)

    def begin(self, want: dict[str, int]) -> Phase:
        with self.cond:
            self.phase = Phase(time.monotonic(), want)
            return self.phase

    def wait_done(self, phase: Phase, timeout: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: phase.done is not None, timeout)

    def end(self) -> None:
        with self.cond:
            self.phase = None

    def _run(self) -> None:
        # This thread moves into the node namespace for good: the socket must be born there,
        # and nothing else runs on this thread.
        try:
            fd = os.open(os.path.join(NETNS_DIR, self.netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
            sock.bind((0, RTMGRP_IPV4_ROUTE | RTMGRP_NEIGH))
        except OSError as exc:
            self._error = exc
            self._bound.set()
            return
        self._bound.set()
        with sock:
            while not self._stop.is_set():
                if not select.select([sock], [], [], 0.2)[0]:
                    continue
                try:
                    data = sock.recv(1 << 20)
                except OSError as exc:
                    # ENOBUFS: events were dropped; anything else ends the watch. Either way
                    # the phase's final dump check reports it.
                    self.overrun = True
                    if exc.errno == errno.ENOBUFS:
                        continue
                    self._error = exc
                    return
                now = time.monotonic()
                changes = list(self._parse(data))
                if changes:
                    self._apply(changes, now)

    def _apply(self, changes: list[tuple[bool, tuple[str, str]]], now: float) -> None:
        with self.cond:
            # Counted as they change: recounting the whole set per event made 15,000 events
            # (5,000 VXLAN peers) take a minute to watch.
            counts = self._counts
            for present, key in changes:
                before = len(self.present)
                (self.present.add if present else self.present.discard)(key)
                phase = self.phase
                if len(self.present) == before:
                    continue  # a replace of what was there, or a removal of what was not
                counts[key[0]] += 1 if present else -1
                if phase is None:
                    continue  # no phase running
                phase.events += 1
                phase.first = phase.first if phase.first is not None else now
                if phase.done is None and all(counts[k] == n for k, n in phase.want.items()):
                    phase.done = now
            self.cond.notify_all()

    def _parse(self, data: bytes):
        """(present, key) for every message about one of pycni's entries."""
        offset = 0
        while offset + NLMSG.size <= len(data):
            length, kind = NLMSG.unpack_from(data, offset)[:2]
            if length < NLMSG.size:
                break
            body = data[offset + NLMSG.size : offset + length]
            offset += (length + 3) & ~3
            if kind in (RTM_NEWROUTE, RTM_DELROUTE) and len(body) >= RTMSG.size:
                family, dst_len, _, _, table, proto = RTMSG.unpack_from(body)[:6]
                attrs = _attrs(body[RTMSG.size :])
                if RTA_TABLE in attrs:
                    table = struct.unpack("=I", attrs[RTA_TABLE][:4])[0]
                if proto == 120 and table == MAIN_TABLE and family in (2, 10):
                    dst = _addr(attrs.get(RTA_DST), family)
                    yield kind == RTM_NEWROUTE, ("route", f"{dst}/{dst_len}")
            elif kind in (RTM_NEWNEIGH, RTM_DELNEIGH) and len(body) >= NDMSG.size:
                family, ifindex, state = NDMSG.unpack_from(body)[:3]
                if ifindex != self.vtep_index or self.vtep_index is None:
                    continue
                attrs = _attrs(body[NDMSG.size :])
                if family == AF_BRIDGE and NDA_LLADDR in attrs:
                    mac = ":".join(f"{b:02x}" for b in attrs[NDA_LLADDR])
                    yield kind == RTM_NEWNEIGH, ("fdb", mac)
                elif family in (2, 10) and NDA_DST in attrs:
                    ip = _addr(attrs[NDA_DST], family)
                    yield kind == RTM_NEWNEIGH and bool(state & NUD_PERMANENT), ("neigh", ip)


def _attrs(data: bytes) -> dict[int, bytes]:
    out = {}
    offset = 0
    while offset + RTATTR.size <= len(data):
        length, kind = RTATTR.unpack_from(data, offset)
        if length < RTATTR.size:
            break
        out[kind & 0x3FFF] = data[offset + RTATTR.size : offset + length]
        offset += (length + 3) & ~3
    return out


def _addr(raw: bytes | None, family: int) -> str:
    if not raw:
        return "0.0.0.0" if family == 2 else "::"
    return str(ipaddress.ip_address(raw))


def kernel_entries(netns: str, vtep_index: int | None) -> set[tuple[str, str]]:
    """The same keys as KernelWatch, from a dump (pycni's own reader of its state)."""
    from ..backends import read_state
    from ..dataplane.netns import netlink_in, netns_fd

    with netns_fd(os.path.join(NETNS_DIR, netns)) as fd:
        ipr = netlink_in(fd)
    try:
        state = read_state(ipr, vtep_index)
    finally:
        ipr.close()
    return (
        {("route", str(r.dst)) for r in state.routes}
        | {("neigh", n.ip) for n in state.neighbours}
        | {("fdb", f.lladdr.lower()) for f in state.fdb}
    )


def link_index(netns: str, name: str) -> int | None:
    proc = subprocess.run(
        ["ip", "-n", netns, "-j", "link", "show", "dev", name], capture_output=True, text=True
    )
    if proc.returncode != 0:
        return None
    links = json.loads(proc.stdout or "[]")
    return int(links[0]["ifindex"]) if links else None


# --- the other nodes ---------------------------------------------------------------------------


def fake_records(count: int, backend: str) -> list[NodeRecord]:
    """N nodes on the agent's underlay (on-link 10.99.1.x), as they would describe themselves;
    a host-gw agent publishes no VTEP MAC."""
    from ..backends import vtep_mac

    out = []
    for i in range(count):
        name = f"fake-{i:03d}"
        ip = UNDERLAY[256 * (1 + i // 250) + 1 + i % 250]
        out.append(NodeRecord(name, (str(ip),), (), vtep_mac(name) if backend != "host-gw" else ""))
    return out


class Fleet:
    """The N remote nodes, written into the agent's datastore."""

    mode = ""

    def add_all(self) -> None:
        raise NotImplementedError

    def release_all(self) -> None:
        raise NotImplementedError

    def poke(self) -> None:
        """Rewrite one lease unchanged: the datastore changes, the node list does not."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class ClientsFleet(Fleet):
    """One LeaseDatastore client per node, each with its own sqlite connection and lease."""

    mode = "clients"

    def __init__(self, path: str, records: list[NodeRecord], cidr) -> None:
        self.records = records
        self.stores: list[LeaseDatastore] = []
        settings = ClusterSettings((str(cidr),))
        for _ in records:  # opened before t0: a running agent is connected already
            self.stores.append(LeaseDatastore(SqliteKV(path, LEASE_TTL), settings, "sqlite"))

    def add_all(self) -> None:
        for store, record in zip(self.stores, self.records, strict=True):
            store.register(record)

    def release_all(self) -> None:
        for store in self.stores:
            store.release()

    def poke(self) -> None:
        me = self.stores[0].me
        assert me is not None
        self.stores[0].register(me)  # what the node's agent does when it restarts

    def close(self) -> None:
        for store in self.stores:
            store.close()


class BatchFleet(Fleet):
    """All N leases in one sqlite transaction (one revision). Uses SqliteKV's private write
    transaction: the KV contract has no multi-key write, and the point is one revision."""

    mode = "batch"

    def __init__(self, path: str, records: list[NodeRecord], cidr) -> None:
        self.kv = SqliteKV(path, LEASE_TTL)
        leases, _ = self.kv.list(DEFAULT_PREFIX + "subnets/")
        taken = {s for s in (key_subnet(DEFAULT_PREFIX, k) for k in leases) if s is not None}
        free = free_subnets(cidr, 24, taken)
        self.leases: dict[str, str] = {}
        for record in records:
            subnet = next(free)
            published = NodeRecord(record.name, record.node_ips, (subnet,), record.vtep_mac)
            self.leases[subnet_key(DEFAULT_PREFIX, subnet)] = _value(published)

    def add_all(self) -> None:
        with self.kv._write() as txn:
            lease = self.kv._ensure_lease(txn)
            for key, value in self.leases.items():
                txn.put(key, value, lease)

    def release_all(self) -> None:
        with self.kv._write() as txn:
            for key in self.leases:
                txn.tombstone("key = ?", (key,))

    def poke(self) -> None:
        key, value = next(iter(self.leases.items()))
        if not self.kv.replace(key, value, value):
            raise BenchError(f"poking lease {key} failed")

    def close(self) -> None:
        self.kv.close()


# --- one world: namespaces, agent, measurements -----------------------------------------------


def _sh(*argv: str, stdin: str | None = None) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class World:
    """A node namespace on an underlay, its agent, and the temporary directory of both."""

    tag: str
    backend: str
    cidr: ipaddress.IPv4Network  # the cluster CIDR, cluster_cidr(N)
    root: str = ""
    node_ns: str = ""
    peer_ns: str = ""
    namespaces: list[str] = field(default_factory=list)
    agent: subprocess.Popen | None = None

    @property
    def socket(self) -> str:
        return os.path.join(self.root, "agent.sock")

    @property
    def db(self) -> str:
        return os.path.join(self.root, "cluster.db")

    @property
    def log_file(self) -> str:
        return os.path.join(self.root, "agent.log")

    @property
    def conflist(self) -> str:
        return os.path.join(self.root, "net.d", "10-pycni.conflist")

    def build(self, timeout: float) -> None:
        self.root = tempfile.mkdtemp(prefix=f"pycni-conv-{self.tag}-")
        self.node_ns, self.peer_ns = f"{self.tag}n", f"{self.tag}u"
        for ns in (self.node_ns, self.peer_ns):
            self.namespaces.append(ns)  # before creating: a half-made one is still removed
            _sh("ip", "netns", "add", ns)
        _sh(
            "ip",
            "-n",
            self.node_ns,
            "-batch",
            "-",
            stdin=(
                f"link set lo up\nlink add eth0 type veth peer name eth0 netns {self.peer_ns}\n"
                f"addr add {NODE_IP}/{UNDERLAY.prefixlen} dev eth0\nlink set eth0 up\n"
                f"route add default via {PEER_IP}\n"
            ),
        )
        _sh(
            "ip",
            "-n",
            self.peer_ns,
            "-batch",
            "-",
            stdin=(
                f"link set lo up\naddr add {PEER_IP}/{UNDERLAY.prefixlen} dev eth0\n"
                "link set eth0 up\n"
            ),
        )
        self.start_agent(timeout)

    def start_agent(self, timeout: float) -> None:
        argv = agent_argv(self.socket, os.path.join(self.root, "data"), self.log_file) + [
            "--cluster-cidr",
            str(self.cidr),
            "--datastore",
            "sqlite",
            "--datastore-path",
            self.db,
            "--lease-ttl",
            str(LEASE_TTL),
            "--backend",
            self.backend,
            "--iface",
            "eth0",
            "--node-name",
            NODE_NAME,
            "--conf-dir",
            os.path.dirname(self.conflist),
            "--subnet-file",
            os.path.join(self.root, "subnet.env"),
            "--resync",
            str(RESYNC),
        ]
        with open(os.path.join(self.root, "agent.stderr"), "wb") as err:
            self.agent = subprocess.Popen(
                ["ip", "netns", "exec", self.node_ns, *argv],
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=err,
                start_new_session=True,
            )
        try:
            wait_until_listening(self.agent, self.socket, AGENT_START_TIMEOUT)
        except RuntimeError as exc:
            raise BenchError(f"{exc}: {self.agent_output()}") from None
        # The conflist is written once the subnet is leased; the first pass (which makes the
        # VTEP) follows it, and the watch needs the VTEP's index.
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.conflist) or self.cluster().get("reconciles", 0) < 1:
            if self.agent.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the agent leased no subnet: {self.agent_output()}")
            time.sleep(0.02)

    def cluster(self) -> dict:
        from ..agent.client import agent_health

        health = agent_health(self.socket).get("health") or {}
        return health.get("cluster") or {}

    def agent_output(self) -> str:
        out = []
        for name in ("agent.stderr", "agent.log"):
            try:
                with open(os.path.join(self.root, name), errors="replace") as f:
                    out.append(f.read()[-1500:])
            except OSError:
                pass
        return "\n".join(o for o in out if o.strip()) or "(no output)"

    def log_problems(self) -> list[str]:
        try:
            with open(self.log_file, errors="replace") as f:
                return [line.rstrip() for line in f if " WARNING " in line or " ERROR " in line]
        except OSError:
            return []

    def teardown(self) -> list[str]:
        failed = []
        if self.agent is not None and self.agent.poll() is None:
            # SIGTERM, but not the 10 s a clean stop takes here: the agent's stop() joins a
            # reconcile thread that sits in the datastore's wait for up to --resync seconds.
            self.agent.send_signal(signal.SIGTERM)
            try:
                self.agent.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.agent.kill()
                self.agent.wait()
        for ns in reversed(self.namespaces):
            for pid in subprocess.run(
                ["ip", "netns", "pids", ns], capture_output=True, text=True
            ).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            if subprocess.run(["ip", "netns", "del", ns], capture_output=True).returncode:
                failed.append(ns)
        self.namespaces.clear()
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)
        return failed


def expected_entries(db: str, backend: str, cidr) -> set[tuple[str, str]]:
    """What the node's kernel must hold for the datastore's other nodes, as the plan says."""
    store = LeaseDatastore(SqliteKV(db, LEASE_TTL), ClusterSettings((str(cidr),)), "sqlite")
    try:
        nodes = [n for n in store.nodes() if n.name != NODE_NAME]
    finally:
        store.close()
    out: set[tuple[str, str]] = set()
    for node in nodes:
        for subnet in node.subnets:
            out.add(("route", str(subnet)))
            if backend == "vxlan":
                out.add(("neigh", str(subnet.network_address)))
                out.add(("fdb", node.vtep_mac.lower()))
    return out


def _ms(t: float | None, t0: float) -> float | None:
    return None if t is None else round((t - t0) * 1000, 2)


def measure_phase(
    world: World, watch: KernelWatch, write: Callable[[], None], remote: int, timeout: float
) -> dict:
    """Time one datastore write (all nodes appear, or all leave) until the kernel agrees."""
    per_node = (
        {"route": remote}
        if world.backend == "host-gw"
        else {"route": remote, "neigh": remote, "fdb": remote}
    )
    # The agent polls the sqlite file every SQLITE_POLL seconds from the end of its last pass,
    # which the steps before this one follow at a nearly fixed distance: a random pause puts
    # t0 at a random point of that period, as a real node's arrival would be.
    time.sleep(SQLITE_POLL + secrets.randbelow(1000) / 1000 * SQLITE_POLL)
    before = world.cluster().get("reconciles", 0)
    phase = watch.begin(per_node)
    write()
    written = time.monotonic()
    converged = watch.wait_done(phase, timeout)
    watch.end()
    result = {
        "written_ms": _ms(written, phase.t0),
        "first_ms": _ms(phase.first, phase.t0),
        "all_ms": _ms(phase.done, phase.t0),
        "events": phase.events,
        "problems": [],
    }
    result["lag_ms"] = (
        None if phase.done is None else round(max(0.0, phase.done - written) * 1000, 2)
    )
    if not converged:
        result["problems"].append(
            f"not converged after {timeout:.0f} s: kernel holds "
            f"{dict(watch.counts())}, want {per_node}"
        )
    # The agent's view: its health lists the remote nodes once the pass that made the
    # entries has finished; a short settle lets it record that pass's duration.
    deadline = time.monotonic() + timeout
    cluster = world.cluster()
    while len(cluster.get("remoteNodes", [])) != remote and time.monotonic() < deadline:
        time.sleep(0.01)
        cluster = world.cluster()
    time.sleep(0.05)
    cluster = world.cluster()
    result["passes"] = cluster.get("reconciles", 0) - before
    result["last_pass_ms"] = round(cluster.get("lastReconcileSeconds", 0.0) * 1000, 2)
    if len(cluster.get("remoteNodes", [])) != remote:
        result["problems"].append(
            f"the agent reports {len(cluster.get('remoteNodes', []))} remote nodes, want {remote}"
        )
    have = kernel_entries(world.node_ns, watch.vtep_index)
    want = expected_entries(world.db, world.backend, world.cidr)
    if have != want or len(want) != sum(per_node.values()):
        result["problems"].append(
            f"kernel differs from the datastore: missing "
            f"{sorted(want - have)[:3]}, extra {sorted(have - want)[:3]}"
        )
    if watch.overrun:
        result["problems"].append("the kernel watch lost events (socket overrun)")
    result["converged"] = not result["problems"]
    return result


def measure_noop(
    world: World, watch: KernelWatch, fleet: Fleet, samples: int, timeout: float
) -> list[dict]:
    """No-op passes with the nodes present, each woken by an unchanged lease rewrite."""
    out = []
    for _ in range(samples):
        time.sleep(SQLITE_POLL + secrets.randbelow(1000) / 1000 * SQLITE_POLL)  # as above
        before = world.cluster().get("reconciles", 0)
        phase = watch.begin({})
        poked = time.time()  # the agent's lastReconcileAt is wall clock too
        fleet.poke()
        time.sleep(NOOP_SETTLE)
        deadline = time.monotonic() + timeout
        cluster = world.cluster()
        while cluster.get("reconciles", 0) <= before and time.monotonic() < deadline:
            time.sleep(HEALTH_POLL)
            cluster = world.cluster()
        time.sleep(0.02)  # lets the watch read what that pass may have written, if anything
        watch.end()
        done = cluster.get("lastReconcileAt")
        sample = {
            "pass_ms": round(cluster.get("lastReconcileSeconds", 0.0) * 1000, 2),
            "wake_ms": None if done is None else round(max(0.0, done - poked) * 1000, 2),
            "problems": [],
        }
        if cluster.get("reconciles", 0) <= before:
            sample["problems"].append(f"no reconcile pass within {timeout:.0f} s of the write")
        if phase.events:
            sample["problems"].append(f"the no-op pass changed {phase.events} kernel entries")
        out.append(sample)
    return out


def run_world(
    tag: str,
    backend: str,
    fleet_mode: str,
    nodes: int,
    noop_samples: int,
    timeout: float,
    progress: Callable[[str], None],
) -> dict:
    world = World(tag, backend, cluster_cidr(nodes))
    watch: KernelWatch | None = None
    fleet: Fleet | None = None
    try:
        world.build(timeout)
        vtep = link_index(world.node_ns, VTEP) if backend == "vxlan" else None
        if backend == "vxlan" and vtep is None:
            raise BenchError(f"the agent made no {VTEP}: {world.agent_output()}")
        watch = KernelWatch(world.node_ns)
        watch.start(vtep, kernel_entries(world.node_ns, vtep))
        records = fake_records(nodes, backend)
        fleet = (ClientsFleet if fleet_mode == "clients" else BatchFleet)(
            world.db, records, world.cidr
        )
        progress(f"  {backend} {fleet_mode} {tag}: {nodes} nodes appear")
        add = measure_phase(world, watch, fleet.add_all, nodes, timeout)
        noop = measure_noop(world, watch, fleet, noop_samples, timeout) if add["converged"] else []
        progress(f"  {backend} {fleet_mode} {tag}: {nodes} nodes leave")
        remove = measure_phase(world, watch, fleet.release_all, 0, timeout)
        if world.agent is None or world.agent.poll() is not None:
            remove["problems"].append("the agent exited")
            remove["converged"] = False
        return {
            "backend": backend,
            "register": fleet_mode,
            "add": add,
            "noop": noop,
            "remove": remove,
            "agent_log_problems": world.log_problems()[:10],
        }
    finally:
        if watch is not None:
            watch.stop()
        if fleet is not None:
            fleet.close()
        leftover = world.teardown()
        if leftover:
            progress(f"  could not remove namespaces {', '.join(leftover)}")


# --- the report --------------------------------------------------------------------------------

PHASE_METRICS = ("written_ms", "first_ms", "all_ms", "lag_ms", "passes", "last_pass_ms")
NOOP_METRICS = ("pass_ms", "wake_ms")


def _stat(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {
        "median": round(statistics.median(values), 2),
        "max": round(max(values), 2),
        "n": len(values),
    }


def summarize(runs: list[dict]) -> dict:
    """summary[backend][register][phase][metric] = {median, max, n}."""
    out: dict = {}
    for run in runs:
        out.setdefault(run["backend"], {}).setdefault(run["register"], [])
        out[run["backend"]][run["register"]].append(run)
    summary: dict = {}
    for backend, modes in out.items():
        for mode, group in modes.items():
            entry = summary.setdefault(backend, {})[mode] = {}
            for phase in ("add", "remove"):
                entry[phase] = {m: _stat([r[phase].get(m) for r in group]) for m in PHASE_METRICS}
            samples = [s for r in group for s in r["noop"]]
            entry["noop"] = {m: _stat([s[m] for s in samples]) for m in NOOP_METRICS}
    return summary


def bench(
    nodes: int,
    repeat: int,
    backends: tuple[str, ...],
    modes: tuple[str, ...],
    noop_samples: int,
    timeout: float,
    progress: Callable[[str], None],
    prefix: str = NAME_PREFIX,
) -> dict:
    runs = []
    tag = f"{prefix}{os.getpid()}"
    for backend in backends:
        for mode in modes:
            for i in range(repeat):
                runs.append(
                    run_world(
                        f"{tag}-{backend[0]}{mode[0]}{i}",
                        backend,
                        mode,
                        nodes,
                        noop_samples,
                        timeout,
                        progress,
                    )
                )
    problems = []
    for run in runs:
        where = f"{run['backend']} {run['register']}"
        for phase in ("add", "remove"):
            problems += [f"{where} {phase}: {p}" for p in run[phase]["problems"]]
        problems += [f"{where} noop: {p}" for s in run["noop"] for p in s["problems"]]
        problems += [f"{where} agent log: {line}" for line in run["agent_log_problems"]]
    return {
        "nodes": nodes,
        "cluster_cidr": str(cluster_cidr(nodes)),
        "repeat": repeat,
        "backends": list(backends),
        "register": list(modes),
        "resync_s": RESYNC,
        "datastore": "sqlite",
        "noop_samples": noop_samples,
        "ok": not problems,
        "problems": problems,
        "summary": summarize(runs),
        "runs": runs,
    }


def _cell(stat: dict | None, digits: int = 1) -> str:
    if stat is None:
        return "-"
    return f"{stat['median']:.{digits}f} / {stat['max']:.{digits}f}"


def format_table(report: dict) -> str:
    n = report["nodes"]
    lines = [
        f"agent convergence: {n} remote nodes appear at once, then leave at once "
        f"(sqlite datastore, cluster CIDR {report['cluster_cidr']} in /24s, agent --resync "
        f"{report['resync_s']:.0f} s)",
        f"median / max of {report['repeat']} repeats; ms after t0 = the first datastore write",
        "register: clients = one LeaseDatastore client per node, register()/release() in turn;"
        " batch = all leases in one transaction",
        "",
        f"{'backend':<8} {'register':<8} {'phase':<7}"
        + "".join(
            f"{h:>17}"
            for h in (
                "written",
                "first entry",
                "all entries",
                "all - written",
                "passes",
                "last pass",
            )
        ),
    ]
    for backend, modes in report["summary"].items():
        for mode, entry in modes.items():
            for phase in ("add", "remove"):
                stats = entry[phase]
                cells = [_cell(stats[m], 0 if m == "passes" else 1) for m in PHASE_METRICS]
                lines.append(
                    f"{backend:<8} {mode:<8} {phase:<7}" + "".join(f"{c:>17}" for c in cells)
                )
    lines += [
        "",
        f"steady state with {n} remote nodes: one no-op pass (the agent's "
        "lastReconcileSeconds), and an unchanged lease rewrite -> that pass done",
        f"{'backend':<8} {'register':<8} {'samples':>8}{'no-op pass':>17}{'write -> done':>17}",
    ]
    for backend, modes in report["summary"].items():
        for mode, entry in modes.items():
            noop = entry["noop"]
            count = noop["pass_ms"]["n"] if noop["pass_ms"] else 0
            lines.append(
                f"{backend:<8} {mode:<8} {count:>8}{_cell(noop['pass_ms'], 2):>17}"
                f"{_cell(noop['wake_ms']):>17}"
            )
    lines.append("")
    lines.append(
        "OK: every phase converged, the kernel matched the datastore"
        if report["ok"]
        else "PROBLEMS:"
    )
    lines += [f"  {p}" for p in report["problems"][:20]]
    return "\n".join(lines)


# --- command line ------------------------------------------------------------------------------


def run(args) -> int:
    if os.geteuid() != 0:
        print("pycnictl bench convergence: needs root (network namespaces)", file=sys.stderr)
        return 2
    prefix = getattr(args, "prefix", NAME_PREFIX)
    if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", prefix):
        # It names namespaces (PREFIX<pid>-hb0n) and temporary directories.
        print(
            "pycnictl bench convergence: --prefix: lowercase letters and digits, at most 8",
            file=sys.stderr,
        )
        return 2
    if not 1 <= args.nodes <= MAX_NODES or args.repeat < 1 or args.noop_samples < 0:
        print(
            f"pycnictl bench convergence: --nodes 1..{MAX_NODES}, --repeat at least 1, "
            "--noop-samples at least 0",
            file=sys.stderr,
        )
        return 2
    backends = tuple(dict.fromkeys(args.backends or BACKENDS))
    modes = REGISTER_MODES if args.register == "both" else (args.register,)
    # Event timestamps are taken by a thread of this process: switch threads often.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    try:
        return run_and_print(
            "pycnictl bench convergence",
            lambda progress: bench(
                args.nodes,
                args.repeat,
                backends,
                modes,
                args.noop_samples,
                args.timeout,
                progress=progress,
                prefix=prefix,
            ),
            format_table,
            args,
            (BenchError,),
            "agent stopped, namespaces removed",
        )
    finally:
        sys.setswitchinterval(interval)
