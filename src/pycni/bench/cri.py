"""`pycnictl bench cri`: pod start and stop through containerd's CRI, as kubelet drives it.

Two rows per containerd (Debian's 1.6 and the pinned 2.x, both by default: --containerd), all
measured in one run, each a node network namespace of its own with a private containerd started
inside it (harness/containerd.py) and the same pause image:

- pycni-agent: the executable `pycnictl install` writes (native where a C compiler is found,
  else the Python launcher; --launcher picks one), its config list (node_conflist: ipMasq on)
  and a `pycnictl agent` in the node the config points at;
- reference: the Go bridge + host-local from containernetworking-plugins, ipMasq on.

Both config lists say cniVersion 1.0.0, the highest containerd 1.6's libcni speaks; pycni's also
says "cniVersions": ["1.0.0", "1.1.0"] as it is written on a node, so libcni 1.3 in containerd
2.x takes 1.1.0 (the reference 1.1.1 speaks 1.0.0 at most).

Where the time goes: each containerd serves its Prometheus metrics on the node's loopback;
network_plugin_operations_duration_seconds (set_up_pod, tear_down_pod), read before and after
the sequential pods, gives the mean time containerd spent in the CNI chain per pod (loopback and
the plugin, as libcni execs them); the rest of RunPodSandbox is containerd's and runc's own.

1. Sequential: N pods per row, each RunPodSandbox (timed), PodSandboxStatus (checked, not
   timed), StopPodSandbox and RemovePodSandbox (timed apart); the rows take turns pod by pod,
   the first row alternating, so a noisy moment hits both alike.
2. Bursts: B RunPodSandbox calls at once (threads released together), then B
   StopPodSandbox + RemovePodSandbox at once; the wall time of each; the rows take turns,
   R times (the median is reported: one burst alone is at the mercy of the machine's noise).
Each row first starts a resident pod that stays until the end, as a node always runs some
(a node's first pod makes the bridge and installs pycni's rule table; with one pod at a time
every ADD and DEL would pay that install, which no node with pods does; the reference's per-pod
iptables chains cost the same either way). It is stopped and removed last, and then the row
must be empty.
Checks: every call succeeded, every pod had an address in the subnet, addresses distinct,
everything freed afterwards (no veth in the node, no address held by the IPAM).
Everything made (containerds, shims, pods, agents, namespaces, the image, temporary files) is
removed at the end, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field

from .common import nearest_rank, ratio, run_and_print, show_ratio
from .latency import NAME, AgentRunner, BenchError, Launcher, Spaces, held_addresses

IMAGE = "localhost/pycni-bench-pause:latest"
ROWS = ("pycni-agent", "reference")
CONTAINERDS = ("1.6", "2", "both")
METRICS_PORT = 1338  # on each node's own loopback
RUN_TARGET = 0.9  # RunPodSandbox median, pycni / reference, under each containerd
DEFAULT_PODS = 20
DEFAULT_BURST = 10
LIBCNI_VERSION = "1.0.0"  # containerd 1.6 vendors libcni 1.1: no 1.1.0 results
BURST_TIMEOUT = 300.0


@dataclass
class Row:
    plugin: str
    root: str
    peer: object = None  # harness.peers.ContainerdPeer: which containerd this row runs
    ns: str = ""
    containerd: object = None  # runtimes.containerd.Containerd
    agent: AgentRunner | None = None
    run_ms: list[float] = field(default_factory=list)
    stop_ms: list[float] = field(default_factory=list)
    remove_ms: list[float] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    burst_run_ms: list[float] = field(default_factory=list)
    burst_teardown_ms: list[float] = field(default_factory=list)
    burst: dict = field(default_factory=dict)  # failures, addresses_distinct, freed
    problems: list[str] = field(default_factory=list)
    cni_ms: dict = field(default_factory=dict)  # containerd's mean per pod: set_up_pod, ...
    resident: str = ""  # the sandbox that stays while the others come and go
    resident_ip: str = ""

    @property
    def label(self) -> str:
        return f"{self.plugin} @{self.peer.label}" if self.peer else self.plugin

    @property
    def teardown_ms(self) -> list[float]:
        return [s + r for s, r in zip(self.stop_ms, self.remove_ms, strict=True)]


def pycni_conflist(root: str, subnet: str, agent_socket: str) -> dict:
    """As a node has it: cniVersion 1.0.0 for libcni 1.1, cniVersions up to 1.1.0 for 1.3."""
    from ..node_config import node_conflist

    conf = node_conflist(
        NAME,
        subnet,
        None,
        bridge="cni0",
        dataDir=os.path.join(root, "data"),
        logFile=os.path.join(root, "pycni.log"),
        agentSocket=agent_socket,
    )
    conf["cniVersion"] = LIBCNI_VERSION
    return conf


def reference_conflist(root: str, subnet: str) -> dict:
    return {
        "cniVersion": LIBCNI_VERSION,
        "name": NAME,
        "plugins": [
            {
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": True,
                "ipMasq": True,
                "ipam": {
                    "type": "host-local",
                    "subnet": subnet,
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": os.path.join(root, "ipam"),
                },
            }
        ],
    }


def _stats(samples: list[float]) -> dict:
    if not samples:
        return {"median": None, "p90": None, "n": 0}
    ordered = sorted(samples)
    p90 = nearest_rank(ordered, 0.9)
    return {"median": round(statistics.median(ordered), 1), "p90": round(p90, 1), "n": len(ordered)}


# --- one pod -----------------------------------------------------------------------------------


def _sandbox_config(row: Row, name: str) -> dict:
    from ..harness.cri import pod_sandbox_config

    uid = str(uuid.uuid4())
    return pod_sandbox_config(
        name,
        "bench",
        uid,
        os.path.join(row.root, "pods", f"bench_{name}_{uid}"),
        row.containerd.cgroup_parent,
    )


def _address(row: Row, sandbox_id: str, subnet: str) -> str:
    ip = row.containerd.cri().pod_sandbox_status(sandbox_id).status.network.ip
    if not ip or ipaddress.ip_address(ip) not in ipaddress.ip_network(subnet):
        raise BenchError(
            f"{row.plugin}: sandbox {sandbox_id[:12]} has address {ip!r}, not one in {subnet}"
        )
    return ip


def _pod_lifecycle(row: Row, name: str, subnet: str, timed: bool = True) -> None:
    from ..harness.cri import CriError

    cri = row.containerd.cri()
    try:
        t0 = time.perf_counter()
        sid = cri.run_pod_sandbox(_sandbox_config(row, name))
        t1 = time.perf_counter()
        row.addresses.append(_address(row, sid, subnet))
        t2 = time.perf_counter()
        cri.stop_pod_sandbox(sid)
        t3 = time.perf_counter()
        cri.remove_pod_sandbox(sid)
        t4 = time.perf_counter()
    except (CriError, BenchError) as exc:
        row.problems.append(f"pod {name}: {exc}")
        return
    if timed:
        row.run_ms.append((t1 - t0) * 1000)
        row.stop_ms.append((t3 - t2) * 1000)
        row.remove_ms.append((t4 - t3) * 1000)


# --- the burst ---------------------------------------------------------------------------------


def _all_at_once(n: int, work) -> tuple[float, list]:
    """work(i) in n threads released together; (wall ms from release to the last return,
    results or exceptions)."""
    results: list = [None] * n
    barrier = threading.Barrier(n + 1)

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as exc:  # counted by the caller
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    deadline = time.monotonic() + BURST_TIMEOUT
    for t in threads:
        t.join(max(0.1, deadline - time.monotonic()))
        if t.is_alive():
            raise BenchError(f"a burst of {n} CRI calls took longer than {BURST_TIMEOUT:.0f} s")
    return (time.perf_counter() - t0) * 1000, results


def _burst(row: Row, n: int, subnet: str, k: int) -> None:
    """Burst number k of this row: n RunPodSandbox at once, then n Stop+Remove at once."""
    cri = row.containerd.cri()
    configs = [_sandbox_config(row, f"burst{k}-{i}") for i in range(n)]
    wall, made = _all_at_once(n, lambda i: cri.run_pod_sandbox(configs[i]))
    row.burst_run_ms.append(wall)
    sandboxes = [s for s in made if isinstance(s, str)]
    failed = [s for s in made if not isinstance(s, str)]
    row.burst["failures"] = row.burst.get("failures", 0) + len(failed)
    if failed:
        row.problems.append(
            f"burst {k}: {len(failed)} of {n} RunPodSandbox failed; first: {failed[0]}"
        )
    addresses = []
    for sid in sandboxes:
        try:
            addresses.append(_address(row, sid, subnet))
        except Exception as exc:
            row.problems.append(f"burst {k}: {exc}")
    distinct = len(set(addresses)) == len(addresses) == n
    row.burst["addresses_distinct"] = row.burst.get("addresses_distinct", True) and distinct
    if len(set(addresses)) != len(addresses):
        row.problems.append(f"burst {k}: addresses handed out twice: {sorted(addresses)}")

    def teardown(i: int) -> None:
        cri.stop_pod_sandbox(sandboxes[i])
        cri.remove_pod_sandbox(sandboxes[i])

    wall, done = _all_at_once(len(sandboxes), teardown)
    row.burst_teardown_ms.append(wall)
    failed = [d for d in done if d is not None]
    row.burst["failures"] += len(failed)
    if failed:
        row.problems.append(
            f"burst {k}: {len(failed)} of {len(sandboxes)} "
            f"Stop+RemovePodSandbox failed; first: {failed[0]}"
        )
    freed = _check_freed(row, f"burst {k}")
    row.burst["freed"] = row.burst.get("freed", True) and freed


# --- checks ------------------------------------------------------------------------------------


def _veths(ns: str) -> int:
    return len(Spaces().exec(ns, "ip", "-o", "link", "show", "type", "veth").splitlines())


def _check_freed(row: Row, phase: str) -> bool:
    """Nothing left but the resident pod (none once it is gone too)."""
    problems = []
    left = [s for s in row.containerd.cri().list_pod_sandbox() if s.id != row.resident]
    if left:
        problems.append(f"{len(left)} sandboxes left")
    veths = _veths(row.ns) - (1 if row.resident else 0)
    if veths:
        problems.append(f"{veths} veths left in the node")
    held = [a for a in held_addresses(row) if a != row.resident_ip]
    if held:
        problems.append(f"addresses still held: {held}")
    row.problems += [f"{phase}: {p}" for p in problems]
    return not problems


# --- the run -----------------------------------------------------------------------------------


def _make_row(
    row: Row,
    spaces: Spaces,
    launcher: Launcher,
    archive: str,
    subnet: str,
    reference_dir: str,
    plugin_launcher: str = "python",
) -> None:
    from ..harness.containerd import Containerd
    from ..install.launchers import write_launcher
    from ..node_config import CONFLIST_NAME, write_conflist

    row.ns = spaces.make(f"{row.plugin}{row.peer.major}")
    spaces.exec(row.ns, "ip", "link", "set", "lo", "up")
    spaces.exec(row.ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
    bin_dir, conf_dir = os.path.join(row.root, "bin"), os.path.join(row.root, "net.d")
    os.makedirs(bin_dir)
    os.symlink(os.path.join(reference_dir, "loopback"), os.path.join(bin_dir, "loopback"))
    if row.plugin == "reference":
        for plugin in ("bridge", "host-local"):
            os.symlink(os.path.join(reference_dir, plugin), os.path.join(bin_dir, plugin))
        conf = reference_conflist(row.root, subnet)
    else:
        if plugin_launcher == "native":
            from ..install.native import BuildError, write_native

            try:
                write_native(os.path.join(bin_dir, "pycni"))
            except BuildError as exc:
                raise BenchError(f"--launcher native: {exc}") from None
        else:
            write_launcher(os.path.join(bin_dir, "pycni"))
        row.agent = AgentRunner(row.root, os.path.join(row.root, "data"))
        row.agent.start(launcher, row.ns)
        conf = pycni_conflist(row.root, subnet, row.agent.socket)
    write_conflist(os.path.join(conf_dir, CONFLIST_NAME), conf)
    row.containerd = Containerd.for_peer(
        row.peer,
        os.path.join(row.root, "containerd"),
        row.ns,
        bin_dir,
        conf_dir,
        sandbox_image=IMAGE,
        metrics_port=METRICS_PORT,
    )
    row.containerd.start()
    row.containerd.import_image(archive)


def containerd_peers(which: str) -> list:
    """The containerds --containerd names: Debian's 1.6, the pinned 2.x, or both."""
    from ..harness import peers

    out = []
    if which in ("1.6", "both"):
        debian = peers.debian_containerd()
        if debian is None:
            raise BenchError("containerd 1.6 is not installed (Debian packages containerd, runc)")
        out.append(debian)
    if which in ("2", "both"):
        try:
            out.append(peers.pinned_containerd())
        except peers.MissingPeer as exc:
            raise BenchError(f"{exc}; or --containerd 1.6") from None
    return out


_FETCH = (
    "import sys, urllib.request\n"
    "sys.stdout.write(urllib.request.urlopen("
    "'http://127.0.0.1:%d/v1/metrics', timeout=10).read().decode())\n"
)
_CNI_METRIC = re.compile(
    r"network_plugin_operations_duration_seconds(?:_seconds)?_(sum|count)"
    r'\{[^}]*operation_type="(\w+)"[^}]*\}\s+(\S+)'
)


def cni_metrics(row: Row) -> dict[str, tuple[float, float]]:
    return cni_metrics_in(row.ns)


def cni_metrics_in(ns: str) -> dict[str, tuple[float, float]]:
    """containerd's own account of its CNI calls, from its metrics on METRICS_PORT of `ns`'s
    loopback: operation -> (seconds in all, calls)."""
    text = Spaces().exec(ns, sys.executable, "-I", "-c", _FETCH % METRICS_PORT)
    found: dict[str, list[float]] = {}
    for kind, op, value in _CNI_METRIC.findall(text):
        found.setdefault(op, [0.0, 0.0])[0 if kind == "sum" else 1] += float(value)
    return {op: (v[0], v[1]) for op, v in found.items()}


def _mean_ms(before: dict, after: dict) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for op in after:
        total = after[op][0] - before.get(op, (0.0, 0.0))[0]
        calls = after[op][1] - before.get(op, (0.0, 0.0))[1]
        out[op] = round(total / calls * 1000, 1) if calls else None
    return out


def bench(
    pods: int,
    burst: int,
    reference_dir: str,
    subnet: str,
    repeat: int = 3,
    progress=None,
    plugin_launcher: str = "python",
    containerd: str = "both",
) -> dict:
    for plugin in ("bridge", "host-local", "loopback"):
        if not os.access(os.path.join(reference_dir, plugin), os.X_OK):
            raise BenchError(f"the reference {plugin} plugin is not in {reference_dir}")
    for tool in ("runc", "podman"):
        if shutil.which(tool) is None:
            raise BenchError(
                f"{tool} is not installed (Debian packages containerd, runc, "
                "podman, busybox-static)"
            )
    if burst > ipaddress.ip_network(subnet).num_addresses - 3:
        raise BenchError(f"a burst of {burst} does not fit in {subnet}")
    peers = containerd_peers(containerd)
    import compileall

    import pycni

    from ..harness.containerd import build_pause_image

    say = progress or (lambda msg: None)
    spaces = Spaces()
    tmp = tempfile.mkdtemp(prefix=f"pycni-bench-cri-{os.getpid()}-")
    launcher = Launcher("nsenter")  # never a private mount namespace (CRI's netns files)
    rows = [
        Row(plugin, os.path.join(tmp, f"{plugin}-{peer.label}"), peer)
        for peer in peers
        for plugin in ROWS
    ]
    try:
        compileall.compile_dir(os.path.dirname(pycni.__file__), quiet=1)
        say("building the pause image with podman")
        archive = build_pause_image(tmp, IMAGE)
        for row in rows:
            say(f"starting containerd {row.peer.label} for {row.plugin}")
            _make_row(row, spaces, launcher, archive, subnet, reference_dir, plugin_launcher)
        versions = {row.peer.label: row.containerd.cri().version().runtime_version for row in rows}
        for row in rows:  # the node's resident pod: it makes the bridge and the rules
            row.resident = row.containerd.cri().run_pod_sandbox(_sandbox_config(row, "resident"))
            row.resident_ip = _address(row, row.resident, subnet)
            _pod_lifecycle(row, "warm-up", subnet, timed=False)

        say(f"{pods} sequential pods per row (RunPodSandbox, Stop, Remove); rows take turns")
        before = {row.label: cni_metrics(row) for row in rows}
        for i in range(pods):
            order = rows if i % 2 == 0 else rows[::-1]
            for row in order:
                _pod_lifecycle(row, f"seq-{i}", subnet)
        for row in rows:
            row.cni_ms = _mean_ms(before[row.label], cni_metrics(row))
            if len(set(row.addresses)) != len(row.addresses):
                row.problems.append("sequential: an address was handed out twice at once")
            _check_freed(row, "sequential")

        if burst:
            say(
                f"{repeat} bursts per row: {burst} RunPodSandbox at once, then Stop+Remove at "
                "once; the rows take turns"
            )
            for k in range(repeat):
                for row in rows if k % 2 == 0 else rows[::-1]:
                    _burst(row, burst, subnet, k)
                    time.sleep(0.5)  # let the machine settle before the next burst
        for row in rows:
            cri = row.containerd.cri()
            cri.stop_pod_sandbox(row.resident)
            cri.remove_pod_sandbox(row.resident)
            row.resident = row.resident_ip = ""
            _check_freed(row, "the end")
            if row.agent is not None and not row.agent.alive():
                row.problems.append(f"the agent died: {row.agent.stderr()}")
        report = _report(rows, pods, burst, repeat, subnet, versions)
        return {**report, "launcher": plugin_launcher}
    finally:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # no second Ctrl-C mid-cleanup
        try:
            leftovers = []
            for row in rows:
                if row.containerd is not None:
                    leftovers += row.containerd.cleanup()
                if row.agent is not None:
                    row.agent.stop(timeout=5.0)
            launcher.close()
            failed = spaces.cleanup()
            shutil.rmtree(tmp, ignore_errors=True)
            if leftovers or failed:
                print(f"pycnictl bench cri: cleanup: {leftovers} {failed}", file=sys.stderr)
        finally:
            signal.signal(signal.SIGINT, old)


def _report(
    rows: list[Row], pods: int, burst: int, repeat: int, subnet: str, versions: dict
) -> dict:
    out = []
    for row in rows:
        ref = next(r for r in rows if r.plugin == "reference" and r.peer is row.peer)
        stats = {
            "run": _stats(row.run_ms),
            "stop": _stats(row.stop_ms),
            "remove": _stats(row.remove_ms),
            "teardown": _stats(row.teardown_ms),
        }
        ref_stats = {"run": _stats(ref.run_ms), "teardown": _stats(ref.teardown_ms)}
        b = dict(row.burst)
        if burst:
            for k in ("run", "teardown"):
                b[f"{k}_wall_ms"] = _stats(getattr(row, f"burst_{k}_ms"))["median"]
            b["ratio"] = {
                k: ratio(b[f"{k}_wall_ms"], _stats(getattr(ref, f"burst_{k}_ms"))["median"])
                for k in ("run", "teardown")
            }
        setup = row.cni_ms.get("set_up_pod")
        run_median = stats["run"]["median"]
        out.append(
            {
                "plugin": row.plugin,
                "containerd": row.peer.label,
                "containerd_version": versions[row.peer.label],
                **stats,
                "ratio": {
                    k: ratio(stats[k]["median"], ref_stats[k]["median"])
                    for k in ("run", "teardown")
                },
                # containerd's own measure of the CNI chain, mean per pod, and what is left
                # of RunPodSandbox for containerd, runc and the shim.
                "cni_ms": row.cni_ms,
                "run_outside_cni_ms": (
                    round(run_median - setup, 1)
                    if run_median is not None and setup is not None
                    else None
                ),
                "burst": b,
                "ok": not row.problems,
                "problems": row.problems,
                "samples": {
                    "run": [round(x, 2) for x in row.run_ms],
                    "stop": [round(x, 2) for x in row.stop_ms],
                    "remove": [round(x, 2) for x in row.remove_ms],
                    "burst_run": [round(x, 2) for x in row.burst_run_ms],
                    "burst_teardown": [round(x, 2) for x in row.burst_teardown_ms],
                },
            }
        )
    targets = {
        label: {
            "run_ratio": r["ratio"]["run"],
            "target": RUN_TARGET,
            "met": r["ratio"]["run"] is not None and r["ratio"]["run"] <= RUN_TARGET,
        }
        for label in versions
        for r in out
        if r["containerd"] == label and r["plugin"] != "reference"
    }
    return {
        "pods": pods,
        "burst": burst,
        "repeat": repeat,
        "subnet": subnet,
        "containerd": versions,
        "cniVersion": LIBCNI_VERSION,
        "rows": out,
        "targets": targets,
        "ok": all(r["ok"] for r in out),
    }


def format_table(report: dict) -> str:
    def f(x) -> str:
        return "-" if x is None else f"{x:.1f}"

    versions = ", ".join(f"{v}" for v in report["containerd"].values())
    lines = [
        f"pycnictl bench cri: containerd {versions} over CRI, {report['pods']} "
        f"sequential pods per row (rows alternating) beside a resident pod, burst of "
        f"{report['burst']}; ipMasq on, "
        f"subnet {report['subnet']}; pycni's executable: "
        f"the {report.get('launcher', 'python')} launcher, with its agent",
    ]
    for label, version in report["containerd"].items():
        rows = [r for r in report["rows"] if r["containerd"] == label]
        lines += [
            "",
            f"containerd {version}",
            f"{'plugin':<12} {'RunPodSandbox':>17} {'StopPodSandbox':>17} "
            f"{'RemovePodSandbox':>17} {'Stop+Remove':>17} {'Run ratio':>9} "
            f"{'Stop+Rm ratio':>13} {'CNI ADD':>8} {'CNI DEL':>8} {'Run-CNI':>8}  ok",
            f"{'':<12} {'med / p90':>17} {'med / p90':>17} {'med / p90':>17} "
            f"{'med / p90':>17} {'':>9} {'':>13} {'mean':>8} {'mean':>8} {'':>8}",
        ]
        for row in rows:
            cells = [
                f"{f(row[k]['median'])} / {f(row[k]['p90'])}"
                for k in ("run", "stop", "remove", "teardown")
            ]
            lines.append(
                f"{row['plugin']:<12} "
                + " ".join(f"{c:>17}" for c in cells)
                + f" {show_ratio(row['ratio']['run']):>9}"
                f" {show_ratio(row['ratio']['teardown']):>13}"
                f" {f(row['cni_ms'].get('set_up_pod')):>8}"
                f" {f(row['cni_ms'].get('tear_down_pod')):>8}"
                f" {f(row['run_outside_cni_ms']):>8}  "
                f"{'yes' if row['ok'] else 'NO'}"
            )
    lines.append(
        "times in ms of each CRI call as containerd answers it; ratio = pycni median / the "
        "reference median under the same containerd; CNI ADD / DEL = containerd's own "
        "network_plugin_operations_duration_seconds (set_up_pod / tear_down_pod: the whole "
        "chain, loopback included), mean per pod; Run-CNI = RunPodSandbox median minus CNI ADD "
        "(containerd, runc and the shim)"
    )
    for label, t in report.get("targets", {}).items():
        state = "MET" if t["met"] else "MISSED"
        lines.append(
            f"target under containerd {report['containerd'][label]}: RunPodSandbox <= "
            f"{t['target']} x the reference: {show_ratio(t['run_ratio'])} {state}"
        )
    if report["burst"]:
        lines += [
            "",
            f"{'burst of ' + str(report['burst']):<18} {'Run wall':>9} "
            f"{'Stop+Rm wall':>12} {'Run ratio':>9} {'Stop+Rm ratio':>13} {'failed':>6} "
            f"{'distinct':>8} {'freed':>5}",
        ]
        for row in report["rows"]:
            b = row["burst"]
            failed = b.get("failures") or 0
            name = f"{row['plugin']} @{row['containerd']}"
            lines.append(
                f"{name:<18} {f(b.get('run_wall_ms')):>9} "
                f"{f(b.get('teardown_wall_ms')):>12} "
                f"{show_ratio(b.get('ratio', {}).get('run')):>9} "
                f"{show_ratio(b.get('ratio', {}).get('teardown')):>13} {failed:>6} "
                f"{'yes' if b.get('addresses_distinct') else 'NO':>8} "
                f"{'yes' if b.get('freed') else 'NO':>5}"
            )
        lines.append(
            f"burst: wall ms from the release of all threads to the last answer, "
            f"median of {report['repeat']}; failed = calls that failed"
        )
    for row in report["rows"]:
        for problem in row["problems"][:10]:
            lines.append(f"PROBLEM {row['plugin']} @{row['containerd']}: {problem}")
    return "\n".join(lines)


def run(args) -> int:
    if os.geteuid() != 0:
        print("pycnictl bench cri: needs root (network namespaces)", file=sys.stderr)
        return 2
    if args.pods < 1 or args.burst < 0 or args.repeat < 1:
        print(
            "pycnictl bench cri: --pods and --repeat must be at least 1, --burst at least 0",
            file=sys.stderr,
        )
        return 2
    if args.plugin_launcher is None:  # as `pycnictl install` chooses
        from ..native.build import compiler

        args.plugin_launcher = "native" if compiler() is not None else "python"
    try:
        import grpc  # noqa: F401
    except ImportError:
        print(
            "pycnictl bench cri: needs grpcio and protobuf (pip install pycni[runtimes])",
            file=sys.stderr,
        )
        return 2
    from ..harness.containerd import ContainerdError
    from ..harness.cri import CriError

    return run_and_print(
        "pycnictl bench cri",
        lambda progress: bench(
            args.pods,
            args.burst,
            args.reference_dir,
            args.subnet,
            args.repeat,
            progress=progress,
            plugin_launcher=args.plugin_launcher,
            containerd=args.containerd,
        ),
        format_table,
        args,
        (BenchError, ContainerdError, CriError, subprocess.CalledProcessError),
        "containerds, pods, agents and namespaces removed",
    )


__all__ = ["bench", "format_table", "run"]
