"""`pycnictl bench policy`: what NetworkPolicy enforcement costs, measured in one run.

1. Write to enforcement (a lab of ``--nodes`` nodes, host-gw, its own prefix and state
   directory, sqlite datastore): with N policies of the workload (bench/policy_workload.py;
   N = 1, 10, 100) stored and enforced, one more policy is written into the datastore, then
   deleted, ``--repeat`` times. The time is taken from just before the write to the moment
   every node's kernel holds (or no longer holds) the policy: an ``nft monitor`` runs in each
   node's network namespace and reports every committed transaction of ``table inet pycni``;
   the agent installs a policy's rules, sets and counters in one transaction, so the
   transaction that creates the policy's counter is the one that enforces it. Besides the
   lab's own two pods a node, each node runs ``--fake-pods`` Pod objects (addresses at the top
   of its subnet, no network namespace) so that the policies select something.
2. Scale (one throwaway network namespace, no lab): the agent's own ``PolicyController`` over
   a fixed object source of ``--scale-pods`` pods of this node (Pod objects with addresses in
   a /20, no network namespaces: set elements and rules are what is measured, not packets)
   and ``--scale-policies`` policies. The ruleset's size as ``nft list table inet pycni``
   shows it (lines, bytes, rules, sets, set elements), the first reconcile, one that changes
   nothing, and the time to apply one changed pod: a pod relabelled out of (then back into)
   its app, so it leaves (joins) the target and peer sets of the policies selecting it;
   each one a whole ``reconcile()``: snapshot, load, compile, render, record, ``nft -f``. The
   same at smaller sizes shows how it scales.
3. Data path (the lab of part 1): pod-to-pod TCP throughput (iperf3, as `bench throughput`
   runs it) and TCP connect latency (a loop of connect/close, median and p99), same node
   (n1pod1 -> n1pod2) and across nodes (n1pod1 -> n2pod1), with 100 ingress policies that
   select both servers, the last in chain order allowing the client, against no policy at
   all (br_netfilter on in both, as on Kubernetes nodes); the two states alternate round by
   round. With the policies on, a pod they do not allow must fail to connect: the rules
   measured are the rules enforced.

Targets (reported, they do not change the exit status): a policy change enforced on all nodes
within 1 s (median) at every N; throughput with the policies at least 0.95x without; one pod
change in the kernel in under 50 ms (median, from the snapshot of the objects through the
install step; the whole pass, which then cuts denied connections, is shown too). Everything
made (labs, namespaces, monitors, servers, the temporary directory) is removed at the end,
also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..agent.policy import BRIDGE_NF
from . import policy_workload as work
from .common import nearest_rank, ratio, run_and_print, show_ratio
from .latency import BenchError, Spaces

COUNTS = (1, 10, 100)
DEFAULT_NODES = 3
DEFAULT_REPEAT = 10
DEFAULT_FAKE_PODS = 20
DEFAULT_SCALE_PODS = 1000
DEFAULT_SCALE_POLICIES = 100
DEFAULT_SCALE_REPEAT = 10
DEFAULT_SECONDS = 3
DEFAULT_ROUNDS = 5
DEFAULT_CONNECTS = 500
DEFAULT_DATAPATH_POLICIES = 100
ENFORCE_TIMEOUT = 30.0
CONNECT_PORT = 5202
SCALE_NODE = "bench-node"
SCALE_SUBNET = "10.244.16.0/20"

# (what, limit): judged on the unrounded values.
TARGET_ENFORCE_S = 1.0
TARGET_THROUGHPUT = 0.95
TARGET_POD_CHANGE_MS = 50.0

Progress = Callable[[str], None] | None


def _say(progress: Progress, msg: str) -> None:
    if progress:
        progress(msg)


@dataclass
class Settings:
    nodes: int = DEFAULT_NODES
    counts: tuple[int, ...] = COUNTS
    repeat: int = DEFAULT_REPEAT
    fake_pods: int = DEFAULT_FAKE_PODS
    scale_pods: int = DEFAULT_SCALE_PODS
    scale_policies: int = DEFAULT_SCALE_POLICIES
    scale_repeat: int = DEFAULT_SCALE_REPEAT
    seconds: int = DEFAULT_SECONDS
    rounds: int = DEFAULT_ROUNDS
    connects: int = DEFAULT_CONNECTS
    datapath_policies: int = DEFAULT_DATAPATH_POLICIES
    parts: tuple[str, ...] = ("enforce", "scale", "datapath")


# --- watching each node's table ----------------------------------------------------------------


@dataclass
class Generation:
    """One committed transaction that (re)made pycni's table: when it was seen, and the
    counters the table holds after it."""

    at: float
    counters: frozenset[str]


class TableWatch:
    """``nft monitor`` in one network namespace, read by a thread: the generations of
    ``table inet pycni``. nft prints (and flushes) each event as the kernel commits it."""

    def __init__(self, netns: str) -> None:
        self.netns = netns
        self.generations: list[Generation] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, "nft", "monitor"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        self._thread = threading.Thread(target=self._read, name=f"watch {netns}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        counters: set[str] = set()
        touched = False
        for line in self.proc.stdout:
            words = line.split()
            if words[:4] in (
                ["add", "table", "inet", "pycni"],
                ["delete", "table", "inet", "pycni"],
            ):
                counters, touched = set(), True
            elif words[:4] == ["add", "counter", "inet", "pycni"] and len(words) > 4:
                counters.add(words[4])
            elif line.startswith("# new generation"):
                if touched:
                    with self._cond:
                        self.generations.append(Generation(time.monotonic(), frozenset(counters)))
                        self._cond.notify_all()
                counters, touched = set(), False
        with self._cond:
            self._cond.notify_all()

    def current(self) -> frozenset[str]:
        with self._cond:
            return self.generations[-1].counters if self.generations else frozenset()

    def wait(
        self, pred: Callable[[frozenset[str]], bool], since: float, timeout: float
    ) -> float | None:
        """The time of the first generation seen at or after ``since`` whose counters satisfy
        ``pred``; the state before ``since`` counts too (at ``since``) when it already does."""
        deadline = time.monotonic() + timeout
        with self._cond:
            before = [g for g in self.generations if g.at < since]
            if pred(before[-1].counters if before else frozenset()):
                return since  # already so (the monitor started before any policy existed)
            while True:
                for g in self.generations:
                    if g.at >= since and pred(g.counters):
                        return g.at
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None:
                    return None
                self._cond.wait(min(left, 0.5))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _key(obj: dict) -> tuple[str, str]:
    meta = obj["metadata"]
    return meta.get("namespace") or "default", meta["name"]


def counter_of(obj: dict) -> str:
    """The name of the allow counter the agent makes for a NetworkPolicy object."""
    from ..policy.engine import PolicyId

    meta = obj["metadata"]
    return f"policy_{PolicyId(meta.get('namespace') or 'default', meta['name']).key}_allow"


def wait_enforced(
    watches: list[TableWatch], want: set[str], gone: set[str], since: float, timeout: float
) -> list[float]:
    """Seconds after ``since`` at which each node's table first held every counter of ``want``
    and none of ``gone``; BenchError when one did not within ``timeout``."""

    def pred(counters: frozenset[str]) -> bool:
        return want <= counters and not (gone & counters)

    out = []
    for w in watches:
        at = w.wait(pred, since, timeout)
        if at is None:
            raise BenchError(
                f"{w.netns}: not enforced after {timeout:.0f} s "
                f"({len(want - w.current())} counters missing, {len(gone & w.current())} extra)"
            )
        out.append(at - since)
    return out


# --- the lab -----------------------------------------------------------------------------------


class PolicyLab:
    """A lab (host-gw) with each node's table watched, and the benchmark's objects."""

    def __init__(self, prefix: str, state_dir: str, nodes: int, fake_pods: int) -> None:
        from ..lab.lifecycle import bring_up
        from ..lab.model import PREFIX_RE, Lab, LabError

        if not PREFIX_RE.fullmatch(prefix):
            raise BenchError(f"lab prefix {prefix!r} is not valid")
        self.lab = Lab.plan(prefix, state_dir, nodes=nodes, pods=2, backend="host-gw")
        self.watches: list[TableWatch] = []
        self.servers: list[subprocess.Popen] = []
        try:
            bring_up(self.lab)  # on failure lab.json is saved: the caller's teardown finds it
        except LabError as exc:
            raise BenchError(f"the lab did not come up: {exc}") from None
        from ..lab.store import LabObjects

        self.store = LabObjects(self.lab)
        self.watches = [TableWatch(n.netns) for n in self.lab.nodes]
        for obj in work.namespace_objects():
            self.store.apply(obj)
        for i, node in enumerate(self.lab.nodes):
            # Above the lab's own pods (IPAM allocates from the bottom of each subnet).
            ips = work.addresses(node.subnet, fake_pods)
            for obj in work.pod_objects(fake_pods, node.name, ips, start=i * fake_pods):
                self.store.apply(obj)
        self.policies: dict[tuple[str, str], dict] = {}  # stored by the benchmark

    def put(self, objs: list[dict]) -> None:
        for obj in objs:
            self.store.apply(obj)
            self.policies[_key(obj)] = obj

    def remove(self, objs: list[dict]) -> None:
        for obj in objs:
            self.store.delete("NetworkPolicy", *_key(obj))
            self.policies.pop(_key(obj), None)

    def serve(self, argv: list[str]) -> None:
        """A long-running helper (in a pod's namespace), stopped by close()."""
        self.servers.append(
            subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )

    def set_policies(self, objs: list[dict], watches: list[TableWatch] | None = None) -> float:
        """Make the stored policies exactly ``objs``; seconds until every node enforces that."""
        keep = {_key(o) for o in objs}
        stale = [o for k, o in self.policies.items() if k not in keep]
        t0 = time.monotonic()
        self.remove(stale)
        self.put([o for o in objs if self.policies.get(_key(o)) != o])
        want = {counter_of(o) for o in objs}
        gone = {counter_of(o) for o in stale}
        return max(
            wait_enforced(watches or self.watches, want, gone, t0, ENFORCE_TIMEOUT), default=0.0
        )

    def close(self) -> None:
        for w in self.watches:
            w.stop()
        self.watches = []
        for proc in getattr(self, "servers", []):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        store = getattr(self, "store", None)
        if store is not None:
            store.close()


def measure_enforcement(plab: PolicyLab, counts: tuple[int, ...], repeat: int, progress) -> list:
    rows = []
    for n in counts:
        base = work.policy_objects(n)
        settle = plab.set_policies(base)
        _say(progress, f"enforce: {n} policies stored and enforced on every node ({settle:.2f} s)")
        time.sleep(0.5)  # let the agents finish their passes
        adds: list[list[float]] = []
        deletes: list[list[float]] = []
        for r in range(repeat):
            extra = work.policy_object(n + r, name=f"bench-change-{r:03d}")
            counter = counter_of(extra)
            t0 = time.monotonic()
            plab.put([extra])
            adds.append(wait_enforced(plab.watches, {counter}, set(), t0, ENFORCE_TIMEOUT))
            time.sleep(0.2)
            t0 = time.monotonic()
            plab.remove([extra])
            deletes.append(wait_enforced(plab.watches, set(), {counter}, t0, ENFORCE_TIMEOUT))
            time.sleep(0.2)
            _say(
                progress,
                f"enforce: N={n} [{r + 1}/{repeat}] add {max(adds[-1]) * 1000:.0f} ms, "
                f"delete {max(deletes[-1]) * 1000:.0f} ms (slowest node)",
            )
        rows.append(
            {
                "policies": n,
                "add": _spread([max(x) for x in adds]),
                "delete": _spread([max(x) for x in deletes]),
                "per_node_add_median_ms": [
                    round(1000 * statistics.median(x[i] for x in adds), 1)
                    for i in range(len(plab.watches))
                ],
                "add_samples_ms": [round(1000 * max(x), 1) for x in adds],
                "delete_samples_ms": [round(1000 * max(x), 1) for x in deletes],
            }
        )
    plab.set_policies([])
    return rows


def _spread(seconds: list[float]) -> dict:
    ms = sorted(1000 * s for s in seconds)
    return {
        "median_ms": round(statistics.median(ms), 1),
        "max_ms": round(ms[-1], 1),
        "n": len(ms),
    }


# --- the data path -----------------------------------------------------------------------------

_CONNECT_SERVER = r"""
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(128)
s.settimeout(1.0)
deadline = time.monotonic() + float(sys.argv[2])
while time.monotonic() < deadline:
    try:
        c, _ = s.accept()
    except OSError:
        continue
    c.close()
"""

_CONNECT_CLIENT = r"""
import json, socket, sys, time
host, port, n, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
out, failed = [], 0
for _ in range(n):
    s = socket.socket()
    s.settimeout(timeout)
    t0 = time.perf_counter_ns()
    try:
        s.connect((host, port))
        out.append((time.perf_counter_ns() - t0) / 1000)
    except OSError:
        failed += 1
    s.close()
print(json.dumps({"us": out, "failed": failed}))
"""


@dataclass
class DataPath:
    name: str
    client: str  # network namespaces
    server: str
    address: str
    gbps: dict[str, list[float]] = field(default_factory=dict)  # state -> samples
    connect_us: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def connect_loop(client: str, address: str, count: int, timeout: float = 2.0) -> dict:
    proc = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            client,
            sys.executable,
            "-c",
            _CONNECT_CLIENT,
            address,
            str(CONNECT_PORT),
            str(count),
            str(timeout),
        ],
        capture_output=True,
        text=True,
        timeout=60 + count * timeout,
    )
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise BenchError(f"connect loop in {client} failed: {proc.stderr.strip()[-300:]}") from None


def measure_datapath(plab: PolicyLab, s: Settings, progress) -> dict:
    from .throughput import Path, SampleError, iperf

    lab = plab.lab
    n1, n2 = lab.nodes[0], lab.nodes[1]
    client, same, cross = n1.pods[0], n1.pods[1], n2.pods[0]
    outsider = n2.pods[1]  # no policy allows it: with the policies on it must be denied
    paths = [
        DataPath("same-node", client.netns, same.netns, same.ip),
        DataPath("cross-node", client.netns, cross.netns, cross.ip),
    ]
    for p in (same, cross):
        argv = [sys.executable, "-c", _CONNECT_SERVER, str(CONNECT_PORT), "7200"]
        plab.serve(["ip", "netns", "exec", p.netns, *argv])
    from .throughput import PORT as IPERF_PORT

    policies = work.server_policies(
        s.datapath_policies,
        client.namespace,
        [same.k8s_name, cross.k8s_name],
        client.k8s_name,
        [IPERF_PORT, CONNECT_PORT],
    )
    watches = plab.watches[:2]
    # Bridged (same-node) frames reach netfilter only with br_netfilter on, which the agent
    # turns on with the first policy and Kubernetes nodes have on anyway (kube-proxy needs it):
    # on in both states, so the ratio is the policy rules' cost alone.
    for node in (n1, n2):
        for sysctl in BRIDGE_NF:
            subprocess.run(
                ["ip", "netns", "exec", node.netns, "sh", "-c", f"echo 1 > {sysctl}"], check=True
            )
    _wait_listening(paths)
    checks: dict[str, dict] = {}
    states = ("none", "policies")
    for r in range(s.rounds):
        order = states if r % 2 == 0 else states[::-1]
        for state in order:
            took = plab.set_policies(policies if state == "policies" else [], watches)
            _say(progress, f"datapath: round {r + 1}, {state}: enforced in {took:.2f} s")
            if state not in checks:
                checks[state] = {
                    "outsider": outsider.k8s_name,
                    "connected": [
                        connect_loop(outsider.netns, p.address, 1, timeout=1.0)["failed"] == 0
                        for p in paths
                    ],
                }
            for path in paths:
                try:
                    gbps = (
                        iperf(
                            Path(path.name, "", path.client, path.server, path.address),
                            1,
                            s.seconds,
                        )
                        / 1e9
                    )
                    path.gbps.setdefault(state, []).append(gbps)
                except SampleError as exc:
                    path.errors.append(f"{state}: {exc}")
                    gbps = float("nan")
                got = connect_loop(path.client, path.address, s.connects)
                if got["failed"]:
                    path.errors.append(f"{state}: {got['failed']} connects failed")
                path.connect_us.setdefault(state, []).extend(got["us"])
                _say(
                    progress,
                    f"datapath: {path.name}, {state}: {gbps:.2f} Gbit/s, connect median "
                    f"{statistics.median(got['us']) if got['us'] else float('nan'):.0f} us",
                )
    plab.set_policies([], watches)
    rows = []
    for path in paths:
        row: dict = {"path": path.name, "errors": path.errors}
        for state in states:
            g = path.gbps.get(state, [])
            us = sorted(path.connect_us.get(state, []))
            row[state] = {
                "gbps": round(statistics.median(g), 3) if g else None,
                "gbps_samples": [round(x, 3) for x in g],
                "connect_median_us": round(statistics.median(us), 1) if us else None,
                "connect_p99_us": round(nearest_rank(us, 0.99), 1) if us else None,
                "connects": len(us),
            }
        row["throughput_ratio"] = _raw_ratio(row["policies"]["gbps"], row["none"]["gbps"])
        row["connect_median_ratio"] = _raw_ratio(
            row["policies"]["connect_median_us"], row["none"]["connect_median_us"]
        )
        row["connect_p99_ratio"] = _raw_ratio(
            row["policies"]["connect_p99_us"], row["none"]["connect_p99_us"]
        )
        rows.append(row)
    return {
        "policies": s.datapath_policies,
        "bridge_nf_call_iptables": True,
        "rounds": s.rounds,
        "seconds": s.seconds,
        "connects": s.connects,
        "paths": rows,
        "outsider_check": checks,
        # Enforced: with the policies the outsider is cut off, without them it connects.
        "enforced": (
            not any(checks.get("policies", {}).get("connected", [True]))
            and all(checks.get("none", {}).get("connected", [False]))
        ),
    }


def _raw_ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 4) if a is not None and b else None


def _wait_listening(paths: list[DataPath], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    for p in paths:
        while True:
            out = subprocess.run(
                ["ss", "-N", p.server, "-Hltn", f"sport = :{CONNECT_PORT}"],
                capture_output=True,
                text=True,
            ).stdout
            if out.strip():
                break
            if time.monotonic() > deadline:
                raise BenchError(f"the connect server in {p.server} is not listening")
            time.sleep(0.05)


# --- scale: one node, the controller alone -----------------------------------------------------


def scale_sizes(pods: int, policies: int) -> list[tuple[int, int]]:
    """The headline size, then smaller ones to see how the costs scale."""
    sizes = [(pods, policies)]
    for p, q in ((pods // 4, policies), (pods // 2, policies), (pods, policies // 10)):
        if p >= 1 and q >= 1 and (p, q) not in sizes:
            sizes.append((p, q))
    return sizes


def scale_worker(spec: dict) -> dict:
    """Run inside a throwaway network namespace (the controller installs into the table of
    the namespace it runs in): every size of ``spec``, measured as the module says."""
    from ..agent.policy import PolicyController
    from ..cluster.objects import Objects, ObjectSource

    class Fixed(ObjectSource):
        def __init__(self) -> None:
            self.objects = Objects()

        def snapshot(self) -> Objects:
            return self.objects

        def wait(self, timeout: float) -> bool:
            return False

    results = []
    namespaces = tuple(work.namespace_objects())
    for pods_n, policies_n in spec["sizes"]:
        source = Fixed()
        ips = work.addresses(SCALE_SUBNET, pods_n)
        pods = work.pod_objects(pods_n, SCALE_NODE, ips)
        policies = tuple(work.policy_objects(policies_n))
        source.objects = Objects(namespaces, tuple(pods), policies)
        data_dir = os.path.join(spec["dir"], f"data-{pods_n}-{policies_n}")
        controller = PolicyController(source, SCALE_NODE, data_dir)
        first = dict(controller.reconcile("bench: first"))
        table = table_size()
        noops = []
        for _ in range(3):
            noops.append(dict(controller.reconcile("bench: nothing changed")))
        # The pod that moves: app0's first pod, in and out of every set its labels put it in.
        moving = 0
        original = pods[moving]
        moved = json.loads(json.dumps(original))
        moved["metadata"]["labels"]["app"] = work.UNSELECTED_APP
        changes = []
        for r in range(spec["repeat"]):
            pods[moving] = moved if r % 2 == 0 else original
            source.objects = Objects(namespaces, tuple(pods), policies)
            last = dict(controller.reconcile("bench: one pod relabelled"))
            changes.append(last)
        pods[moving] = original
        results.append(
            {
                "pods": pods_n,
                "policies": policies_n,
                "sizes": first["sizes"],
                "table": table,
                "first_ms": round(1000 * first["seconds"], 1),
                "noop": _timings(noops),
                "pod_change": _timings(changes),
            }
        )
    return {"results": results}


def _timings(passes: list[dict]) -> dict:
    """Whole passes, and the part until the rules were in the kernel (every step up to and
    including install; what follows, cutting denied connections, comes after enforcement)."""
    total = sorted(1000 * p["seconds"] for p in passes)
    kernel = sorted(1000 * _until_installed(p["timings"]) for p in passes)
    steps: dict[str, float] = {}
    for name in passes[0].get("timings", {}):
        steps[name] = round(1000 * statistics.median(p["timings"][name] for p in passes), 2)
    return {
        "median_ms": round(statistics.median(total), 1),
        "max_ms": round(total[-1], 1),
        "kernel_median_ms": round(statistics.median(kernel), 1),
        "kernel_max_ms": round(kernel[-1], 1),
        "n": len(total),
        "steps_median_ms": steps,
        "install": sorted({str(p.get("install")) for p in passes}),
    }


def _until_installed(timings: dict[str, float]) -> float:
    spent = 0.0
    for name, seconds in timings.items():
        spent += seconds
        if name == "install":
            break
    return spent


def table_size() -> dict:
    """``table inet pycni`` of this namespace as nft lists it."""
    text = subprocess.run(
        ["nft", "list", "table", "inet", "pycni"], capture_output=True, text=True, check=True
    ).stdout
    listing = subprocess.run(
        ["nft", "-j", "list", "table", "inet", "pycni"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    objs = json.loads(listing).get("nftables", [])
    sets = [o["set"] for o in objs if "set" in o]
    return {
        "lines": text.count("\n"),
        "bytes": len(text.encode()),
        "rules": sum(1 for o in objs if "rule" in o),
        "chains": sum(1 for o in objs if "chain" in o),
        "sets": len(sets),
        "set_elements": sum(len(s.get("elem", [])) for s in sets),
        "counters": sum(1 for o in objs if "counter" in o),
    }


def scale_main() -> None:
    """The worker's entry point: the spec as JSON on stdin, the results as JSON on stdout."""
    import logging

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    print(json.dumps(scale_worker(json.load(sys.stdin))))


def measure_scale(spaces: Spaces, tmp: str, s: Settings, progress) -> dict:
    ns = spaces.make("scale")
    subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
    sizes = scale_sizes(s.scale_pods, s.scale_policies)
    _say(progress, f"scale: {', '.join(f'{p} pods x {q} policies' for p, q in sizes)} in {ns}")
    spec = {"sizes": sizes, "repeat": s.scale_repeat, "dir": os.path.join(tmp, "scale")}
    proc = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            "-c",
            "from pycni.bench.policy import scale_main; scale_main()",
        ],
        input=json.dumps(spec),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise BenchError(
            f"the scale worker failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}"
        ) from None


# --- the run -----------------------------------------------------------------------------------


def bench(s: Settings, progress: Progress = None) -> dict:
    if "datapath" in s.parts and shutil.which("iperf3") is None:
        raise BenchError("iperf3 is not installed (apt-get install iperf3)")
    if shutil.which("nft") is None:
        raise BenchError("nft is not installed (apt-get install nftables)")
    spaces = Spaces()
    tmp = tempfile.mkdtemp(prefix="pycni-bench-policy-")
    report: dict = {"settings": s.__dict__ | {"parts": list(s.parts), "counts": list(s.counts)}}
    prefix, state = f"{spaces.prefix}p", os.path.join(tmp, "lab")
    plab: PolicyLab | None = None
    lab_begun = False
    try:
        if "scale" in s.parts:
            report["scale"] = measure_scale(spaces, tmp, s, progress)
        if "enforce" in s.parts or "datapath" in s.parts:
            _say(progress, f"bringing up a {s.nodes}-node lab (host-gw), prefix {prefix}")
            lab_begun = True
            plab = PolicyLab(prefix, state, s.nodes, s.fake_pods)
            if "datapath" in s.parts:
                report["datapath"] = measure_datapath(plab, s, progress)
            if "enforce" in s.parts:
                report["enforce"] = {
                    "nodes": s.nodes,
                    "fake_pods_per_node": s.fake_pods,
                    "repeat": s.repeat,
                    "rows": measure_enforcement(plab, s.counts, s.repeat, progress),
                }
        report["targets"] = targets(report)
        report["ok"] = "datapath" not in report or (
            report["datapath"]["enforced"]
            and not any(p["errors"] for p in report["datapath"]["paths"])
        )
        return report
    finally:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # no second Ctrl-C mid-cleanup
        try:
            _cleanup(spaces, plab, (prefix, state) if lab_begun else None, tmp)
        finally:
            signal.signal(signal.SIGINT, old)


def _cleanup(spaces: Spaces, plab: PolicyLab | None, lab: tuple[str, str] | None, tmp: str) -> None:
    from ..lab.lifecycle import teardown

    problems = []
    if plab is not None:
        try:
            plab.close()
        except Exception as exc:  # noqa: BLE001 - go on removing the rest
            problems.append(f"closing the lab's store: {exc}")
    if lab is not None:
        try:
            problems += teardown(*lab)
        except Exception as exc:  # noqa: BLE001
            problems.append(f"lab {lab[0]}: {exc}")
    left = spaces.cleanup()
    if left:
        problems.append(f"could not remove namespaces {left}")
    shutil.rmtree(tmp, ignore_errors=True)
    for problem in problems:
        print(f"pycnictl bench policy: cleanup: {problem}", file=sys.stderr)


def targets(report: dict) -> list[dict]:
    out = []
    for row in report.get("enforce", {}).get("rows", []):
        value = row["add"]["median_ms"] / 1000
        out.append(
            {
                "what": f"policy write enforced on all nodes, median, {row['policies']} policies",
                "value": value,
                "unit": "s",
                "limit": f"<= {TARGET_ENFORCE_S:g} s",
                "pass": value <= TARGET_ENFORCE_S,
            }
        )
    for row in report.get("datapath", {}).get("paths", []):
        value = row["throughput_ratio"]
        out.append(
            {
                "what": f"throughput with {report['datapath']['policies']} policies / without, "
                f"{row['path']}",
                "value": value,
                "unit": "x",
                "limit": f">= {TARGET_THROUGHPUT:.2f}x",
                "pass": value is not None and value >= TARGET_THROUGHPUT,
            }
        )
    for row in report.get("scale", {}).get("results", [])[:1]:
        value = row["pod_change"]["kernel_median_ms"]
        out.append(
            {
                "what": f"one pod change in the kernel, median, {row['pods']} pods x "
                f"{row['policies']} policies",
                "value": value,
                "unit": "ms",
                "limit": f"< {TARGET_POD_CHANGE_MS:g} ms",
                "pass": value < TARGET_POD_CHANGE_MS,
            }
        )
    return out


# --- the table ---------------------------------------------------------------------------------


def format_table(report: dict) -> str:
    lines = ["pycnictl bench policy: NetworkPolicy enforcement, one run"]
    enforce = report.get("enforce")
    if enforce:
        lines += [
            "",
            f"write to enforcement on all {enforce['nodes']} nodes (lab, nft monitor in each "
            f"node; {enforce['repeat']} writes each; {enforce['fake_pods_per_node']} + 2 pods "
            "a node), ms:",
            f"{'policies':>8} {'add med':>8} {'add max':>8} {'del med':>8} {'del max':>8}"
            "  per-node add medians",
        ]
        for row in enforce["rows"]:
            lines.append(
                f"{row['policies']:>8} {row['add']['median_ms']:>8.0f} {row['add']['max_ms']:>8.0f}"
                f" {row['delete']['median_ms']:>8.0f} {row['delete']['max_ms']:>8.0f}  "
                + " ".join(f"{x:.0f}" for x in row["per_node_add_median_ms"])
            )
    scale = report.get("scale")
    if scale:
        lines += [
            "",
            "one node, the agent's controller alone (Pod objects with addresses, no pod "
            "namespaces):",
            f"{'pods':>5} {'pols':>5} {'lines':>6} {'KB':>6} {'rules':>5} {'sets':>4} "
            f"{'elems':>6} {'first':>6} {'noop':>5} {'change':>6} {'max':>5} {'whole':>5}",
        ]
        for row in scale["results"]:
            t = row["table"]
            change = row["pod_change"]
            lines.append(
                f"{row['pods']:>5} {row['policies']:>5} {t['lines']:>6} {t['bytes'] / 1024:>6.0f} "
                f"{t['rules']:>5} {t['sets']:>4} {t['set_elements']:>6} {row['first_ms']:>6.0f} "
                f"{row['noop']['median_ms']:>5.0f} {change['kernel_median_ms']:>6.0f} "
                f"{change['kernel_max_ms']:>5.0f} {change['median_ms']:>5.0f}"
            )
        lines += [
            "lines, KB: `nft list table inet pycni`; first, noop: ms of a whole reconcile (the",
            "first; one with nothing changed); change, max: ms from the snapshot to the rules in",
            "the kernel for one relabelled pod (median, max); whole: that pass to its end",
            "where one pod change's time goes (median ms per step):",
        ]
        for row in scale["results"]:
            steps = row["pod_change"]["steps_median_ms"]
            lines.append(
                f"{row['pods']:>5} {row['policies']:>5}  "
                + " ".join(f"{k} {v:.1f}" for k, v in steps.items())
                + f"  (install: {', '.join(row['pod_change']['install'])})"
            )
    data = report.get("datapath")
    if data:
        lines += [
            "",
            f"data path, {data['policies']} policies selecting the server vs none "
            f"({data['rounds']} rounds alternating; iperf3 1 stream {data['seconds']} s; "
            f"{data['connects']} connects a round):",
            f"{'path':<10} {'state':<8} {'Gbit/s':>7} {'conn med':>8} {'conn p99':>8}  (us)",
        ]
        for row in data["paths"]:
            for state in ("none", "policies"):
                v = row[state]
                lines.append(
                    f"{row['path']:<10} {state:<8} {_num(v['gbps'], 2):>7} "
                    f"{_num(v['connect_median_us'], 0):>8} {_num(v['connect_p99_us'], 0):>8}"
                )
            lines.append(
                f"{row['path']:<10} {'ratio':<8} {show_ratio(_r2(row['throughput_ratio'])):>7} "
                f"{show_ratio(_r2(row['connect_median_ratio'])):>8} "
                f"{show_ratio(_r2(row['connect_p99_ratio'])):>8}"
            )
        check = "yes" if data["enforced"] else "NO"
        lines.append(f"a pod the policies do not allow was cut off (and not without them): {check}")
    if report.get("targets"):
        lines += ["", "targets:"]
        for t in report["targets"]:
            value = "-" if t["value"] is None else f"{t['value']:.3f}{t['unit']}"
            lines.append(
                f"  {t['what']:<62} {value:>9} {t['limit']:>9}  {'PASS' if t['pass'] else 'FAIL'}"
            )
    for row in (data or {}).get("paths", []):
        for err in row["errors"][:3]:
            lines.append(f"PROBLEM {row['path']}: {err}")
    return "\n".join(lines)


def _num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _r2(x: float | None) -> float | None:
    return ratio(x, 1.0) if x is not None else None


# --- the command -------------------------------------------------------------------------------


def run(args) -> int:
    if os.geteuid() != 0:
        print("pycnictl bench policy: needs root (network namespaces)", file=sys.stderr)
        return 2
    s = Settings(
        nodes=args.nodes,
        counts=tuple(args.counts),
        repeat=args.repeat,
        fake_pods=args.fake_pods,
        scale_pods=args.scale_pods,
        scale_policies=args.scale_policies,
        scale_repeat=args.scale_repeat,
        seconds=args.seconds,
        rounds=args.rounds,
        connects=args.connects,
        datapath_policies=args.datapath_policies,
        parts=tuple(args.parts or ("enforce", "scale", "datapath")),
    )
    if s.nodes < 2 or min(s.repeat, s.scale_repeat, s.seconds, s.rounds, s.connects) < 1:
        print(
            "pycnictl bench policy: --nodes must be at least 2, the counts at least 1",
            file=sys.stderr,
        )
        return 2
    return run_and_print(
        "pycnictl bench policy",
        lambda progress: bench(s, progress=progress),
        format_table,
        args,
        (BenchError,),
        "everything made was removed",
    )
