"""`pycnictl bench`: ADD/DEL latency of pycni against the Go reference bridge + host-local.

One invocation measures both plugins with equivalent configs, ipMasq off and on, each in a
freshly made node network namespace of its own (never the host's), with one pod namespace per
pod made beforehand. Per row: N sequential ADDs, then N sequential DELs, each exec timed alone.
The four rows advance in lock-step (pod i of every row, then pod i+1), so a noisy moment on the
machine hits all rows alike and their ratios stay comparable.

How the plugin is put into the node namespace matters at these latencies: `ip netns exec` adds
an exec of `ip`, a mount namespace and a /sys remount; `nsenter` an exec. The default `setns`
moves the benchmark's own (single) thread into the node namespace for the duration of the
spawn, so the plugin is exec'd directly, exactly as a runtime on the node would; the floor of
each method (the same exec of /bin/true) is measured and reported.

Everything made (namespaces, temporary directory) is removed at the end, also on failure,
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
NAME = "benchnet"
LAUNCH_METHODS = ("setns", "nsenter", "ip-netns-exec")
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


class BenchError(Exception):
    pass


# --- entering the node namespace ---------------------------------------------------------------

class Launcher:
    """Runs a command in a named network namespace, by one of LAUNCH_METHODS."""

    def __init__(self, method: str):
        if method not in LAUNCH_METHODS:
            raise ValueError(method)
        self.method = method
        self._libc = None
        self._home: int | None = None
        self._fds: dict[str, int] = {}
        if method == "setns":
            self._libc = ctypes.CDLL(None, use_errno=True)
            self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def _setns(self, fd: int) -> None:
        if self._libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns: {os.strerror(err)}")

    @contextmanager
    def _inside(self, ns: str):
        if self.method != "setns":
            yield
            return
        fd = self._fds.get(ns)
        if fd is None:
            fd = self._fds[ns] = os.open(os.path.join(NETNS_DIR, ns), os.O_RDONLY | os.O_CLOEXEC)
        self._setns(fd)
        try:
            yield
        finally:
            self._setns(self._home)

    def argv(self, ns: str, argv: list[str]) -> list[str]:
        if self.method == "nsenter":
            return ["nsenter", f"--net={os.path.join(NETNS_DIR, ns)}", *argv]
        if self.method == "ip-netns-exec":
            return ["ip", "netns", "exec", ns, *argv]
        return list(argv)

    def run(self, ns: str, argv: list[str], stdin: bytes = b"",
            env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
        """Run once; return (milliseconds, process). Only the spawn-to-exit is timed."""
        full = self.argv(ns, argv)
        with self._inside(ns):
            t0 = time.perf_counter()
            proc = subprocess.run(full, input=stdin, env=env, capture_output=True, timeout=120)
            elapsed = (time.perf_counter() - t0) * 1000
        return elapsed, proc

    def close(self) -> None:
        if self._home is not None:
            try:
                self._setns(self._home)  # never leave this thread outside its namespace
            finally:
                os.close(self._home)
                self._home = None
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


# --- namespaces --------------------------------------------------------------------------------

class Spaces:
    """Network namespaces made by this run, all removed by cleanup()."""

    def __init__(self) -> None:
        self.prefix = f"pycnib{os.getpid()}{secrets.token_hex(2)}"
        self.names: list[str] = []

    def make(self, tag: str) -> str:
        name = f"{self.prefix}-{tag}"
        self.names.append(name)  # before creating: a half-made one is still removed
        _sh("ip", "netns", "add", name)
        return name

    def exec(self, ns: str, *argv: str) -> str:
        return _sh("ip", "netns", "exec", ns, *argv)

    def cleanup(self) -> list[str]:
        failed = []
        for name in reversed(self.names):
            if not os.path.exists(os.path.join(NETNS_DIR, name)):
                continue
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                                  text=True).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            if subprocess.run(["ip", "netns", "del", name], capture_output=True).returncode:
                failed.append(name)
        self.names.clear()
        return failed


def _sh(*argv: str) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    return proc.stdout


# --- the rows ----------------------------------------------------------------------------------

@dataclass
class Row:
    plugin: str           # "pycni" or "reference"
    masq: bool
    exe: str
    cni_path: str
    conf: dict
    root: str
    node: str = ""
    pods: list[str] = field(default_factory=list)
    add_ms: list[float] = field(default_factory=list)
    del_ms: list[float] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.plugin} ipMasq={'on' if self.masq else 'off'}"

    def env(self, command: str, cid: str, netns: str) -> dict:
        return {"PATH": PATH, "CNI_COMMAND": command, "CNI_CONTAINERID": cid,
                "CNI_NETNS": netns, "CNI_IFNAME": "eth0", "CNI_PATH": self.cni_path}


def pycni_conf(root: str, version: str, subnet: str, masq: bool) -> dict:
    return {"cniVersion": version, "name": NAME, "type": "pycni", "bridge": "cni0",
            "subnet": subnet, "ipMasq": masq, "dataDir": os.path.join(root, "data"),
            "logFile": os.path.join(root, "pycni.log")}


def reference_conf(root: str, version: str, subnet: str, masq: bool) -> dict:
    return {"cniVersion": version, "name": NAME, "type": "bridge", "bridge": "cni0",
            "isGateway": True, "isDefaultGateway": True, "ipMasq": masq,
            "ipam": {"type": "host-local", "subnet": subnet,
                     "dataDir": os.path.join(root, "ipam")}}


def _cid(i: int) -> str:
    return f"bench{i:04d}"


def _stats(samples: list[float]) -> dict:
    if not samples:
        return {"median": None, "p95": None, "min": None, "max": None, "n": 0}
    ordered = sorted(samples)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]  # nearest rank
    return {"median": round(statistics.median(ordered), 2), "p95": round(p95, 2),
            "min": round(ordered[0], 2), "max": round(ordered[-1], 2), "n": len(ordered)}


def _veths(spaces: Spaces, ns: str) -> int:
    return len(spaces.exec(ns, "ip", "-o", "link", "show", "type", "veth").splitlines())


def _masq_rules(spaces: Spaces, ns: str) -> int:
    out = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "ruleset"],
                         capture_output=True, text=True).stdout
    return sum("masquerade" in line for line in out.splitlines())


def _held_addresses(row: Row) -> list[str]:
    """Addresses the plugin's IPAM still holds after the DELs (should be none)."""
    if row.plugin == "reference":
        d = os.path.join(row.root, "ipam", NAME)
        if not os.path.isdir(d):
            return []
        return sorted(f for f in os.listdir(d)
                      if f not in ("lock",) and not f.startswith("last_reserved_ip"))
    from ..ipam.store import Store

    store = Store(os.path.join(row.root, "data"))
    try:
        return sorted(str(a.ip) for att in store.list_attachments(NAME) for a in att.allocations)
    finally:
        store.close()


def measure_floor(launcher_methods, ns: str, runs: int) -> dict[str, float]:
    """Median ms of exec'ing /bin/true in `ns` by each method: the cost no plugin can avoid."""
    floors = {}
    for method in launcher_methods:
        launcher = Launcher(method)
        try:
            samples = []
            for _ in range(runs):
                ms, proc = launcher.run(ns, ["/bin/true"], env={"PATH": PATH})
                if proc.returncode != 0:
                    raise BenchError(f"{method}: /bin/true failed: {proc.stderr!r}")
                samples.append(ms)
            floors[method] = round(statistics.median(samples), 2)
        finally:
            launcher.close()
    return floors


def _do(launcher: Launcher, row: Row, command: str, i: int) -> subprocess.CompletedProcess:
    ms, proc = launcher.run(row.node, [row.exe], json.dumps(row.conf).encode(),
                            row.env(command, _cid(i), os.path.join(NETNS_DIR, row.pods[i])))
    (row.add_ms if command == "ADD" else row.del_ms).append(ms)
    return proc


def bench(pods: int, launch: str, reference_dir: str, version: str, subnet: str,
          progress=None) -> dict:
    from .install import write_launcher

    ref_bridge = os.path.join(reference_dir, "bridge")
    if not os.access(ref_bridge, os.X_OK) or not os.access(
            os.path.join(reference_dir, "host-local"), os.X_OK):
        raise BenchError(f"the reference bridge and host-local are not in {reference_dir}")
    import ipaddress

    usable = ipaddress.ip_network(subnet).num_addresses - 3  # network, gateway, broadcast
    if pods > usable:
        raise BenchError(f"{pods} pods do not fit in {subnet} ({usable} addresses)")

    spaces = Spaces()
    tmp = tempfile.mkdtemp(prefix="pycni-bench-")
    launcher: Launcher | None = None
    try:
        import compileall

        import pycni

        # Bytecode ahead of time, as pip leaves it: otherwise the first execs compile.
        compileall.compile_dir(os.path.dirname(pycni.__file__), quiet=1)
        plugin = write_launcher(os.path.join(tmp, "bin", "pycni"))

        rows: list[Row] = []
        for masq in (False, True):
            for name in ("pycni", "reference"):
                root = os.path.join(tmp, f"{name}-{'masq' if masq else 'nomasq'}")
                os.makedirs(root)
                if name == "pycni":
                    rows.append(Row(name, masq, plugin, os.path.dirname(plugin),
                                    pycni_conf(root, version, subnet, masq), root))
                else:
                    rows.append(Row(name, masq, ref_bridge, reference_dir,
                                    reference_conf(root, version, subnet, masq), root))

        _say(progress, f"making {len(rows)} node and {len(rows) * pods} pod namespaces")
        for n, row in enumerate(rows):
            row.node = spaces.make(f"node{n}")
            spaces.exec(row.node, "ip", "link", "set", "lo", "up")
            row.pods = [spaces.make(f"n{n}p{i}") for i in range(pods)]

        floors = measure_floor(LAUNCH_METHODS, rows[0].node, runs=max(10, min(pods, 30)))
        launcher = Launcher(launch)
        for row in rows:  # warm the page cache for both executables (not timed)
            launcher.run(row.node, [row.exe], b'{"cniVersion":"1.0.0"}',
                         {"PATH": PATH, "CNI_COMMAND": "VERSION"})

        _say(progress, f"{pods} ADDs per row")
        for i in range(pods):
            for row in rows:
                proc = _do(launcher, row, "ADD", i)
                try:
                    out = json.loads(proc.stdout or b"null")
                except ValueError:
                    out = None
                if proc.returncode != 0 or not isinstance(out, dict) or not out.get("ips"):
                    row.problems.append(f"ADD #{i} failed (rc {proc.returncode}): "
                                        f"{proc.stdout.decode()[:300]}{proc.stderr.decode()[:300]}")
                else:
                    row.addresses.append(out["ips"][0]["address"])
        for row in rows:
            if len(set(row.addresses)) != len(row.addresses):
                row.problems.append(f"addresses handed out twice: {sorted(row.addresses)}")
            # Proves the plugin really ran in this row's node namespace.
            if _veths(spaces, row.node) != pods:
                row.problems.append(f"{_veths(spaces, row.node)} veths in the node after "
                                    f"{pods} ADDs")
            if row.masq and not _masq_rules(spaces, row.node):
                row.problems.append("no masquerade rule after the ADDs")

        _say(progress, f"{pods} DELs per row")
        for i in range(pods):
            for row in rows:
                proc = _do(launcher, row, "DEL", i)
                if proc.returncode != 0:
                    row.problems.append(f"DEL #{i} failed (rc {proc.returncode}): "
                                        f"{proc.stdout.decode()[:300]}{proc.stderr.decode()[:300]}")
        for row in rows:
            if _veths(spaces, row.node):
                row.problems.append(f"{_veths(spaces, row.node)} veths left after the DELs")
            held = _held_addresses(row)
            if held:
                row.problems.append(f"addresses still held after the DELs: {held}")
            if _masq_rules(spaces, row.node):
                row.problems.append("masquerade rules left after the DELs")
        return _report(rows, pods, launch, floors, version, subnet)
    finally:
        # No second Ctrl-C may interrupt the cleanup.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if launcher is not None:
                launcher.close()
            left = spaces.cleanup()
            shutil.rmtree(tmp, ignore_errors=True)
            if left:
                print(f"pycnictl bench: could not remove namespaces {left}", file=sys.stderr)
        finally:
            signal.signal(signal.SIGINT, old)


def _say(progress, msg: str) -> None:
    if progress:
        progress(msg)


def _report(rows: list[Row], pods: int, launch: str, floors: dict, version: str,
            subnet: str) -> dict:
    out_rows = []
    for row in rows:
        ref = next(r for r in rows if r.plugin == "reference" and r.masq == row.masq)
        add, dele = _stats(row.add_ms), _stats(row.del_ms)
        radd, rdel = _stats(ref.add_ms), _stats(ref.del_ms)
        out_rows.append({
            "plugin": row.plugin, "ipMasq": row.masq, "add": add, "del": dele,
            "ratio": {"add": _ratio(add["median"], radd["median"]),
                      "del": _ratio(dele["median"], rdel["median"])},
            "ok": not row.problems, "problems": row.problems,
            "samples": {"add": [round(x, 3) for x in row.add_ms],
                        "del": [round(x, 3) for x in row.del_ms]},
        })
    order = {"pycni": 0, "reference": 1}
    out_rows.sort(key=lambda r: (r["ipMasq"], order[r["plugin"]]))
    return {"pods": pods, "cniVersion": version, "subnet": subnet, "launch": launch,
            "exec_floor_ms": floors, "rows": out_rows,
            "ok": all(r["ok"] for r in out_rows)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def format_table(report: dict) -> str:
    def f(x) -> str:
        return "-" if x is None else f"{x:.1f}"

    def r(x) -> str:
        return "-" if x is None else f"{x:.2f}x"

    floors = report["exec_floor_ms"]
    lines = [
        f"pycnictl bench: {report['pods']} sequential ADDs then DELs per row, cniVersion "
        f"{report['cniVersion']}, subnet {report['subnet']}, rows interleaved",
        f"launch: {report['launch']} (exec floor, median of /bin/true: "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in floors.items()) + "; included in the times)",
        "",
        f"{'plugin':<10} {'ipMasq':<6} {'ADD med':>8} {'ADD p95':>8} {'DEL med':>8} "
        f"{'DEL p95':>8} {'ADD ratio':>9} {'DEL ratio':>9}  ok",
    ]
    for row in report["rows"]:
        lines.append(
            f"{row['plugin']:<10} {'on' if row['ipMasq'] else 'off':<6} "
            f"{f(row['add']['median']):>8} {f(row['add']['p95']):>8} "
            f"{f(row['del']['median']):>8} {f(row['del']['p95']):>8} "
            f"{r(row['ratio']['add']):>9} {r(row['ratio']['del']):>9}  "
            f"{'yes' if row['ok'] else 'NO'}")
    lines.append("times in ms; ratio = pycni median / reference median at the same ipMasq")
    for row in report["rows"]:
        for problem in row["problems"][:10]:
            lines.append(f"PROBLEM {row['plugin']} ipMasq={row['ipMasq']}: {problem}")
    return "\n".join(lines)


def register(sub) -> None:
    p = sub.add_parser("bench", help="ADD/DEL latency of pycni against the reference bridge")
    p.add_argument("--pods", type=int, default=50, help="ADDs (then DELs) per row (default 50)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--launch", choices=LAUNCH_METHODS, default="setns",
                   help="how plugins are exec'd in the node namespace (default: setns, the "
                   "cheapest; all three floors are measured and reported)")
    p.add_argument("--reference-dir", default="/usr/lib/cni",
                   help="where the reference bridge and host-local are")
    p.add_argument("--cni-version", default="1.0.0", help="cniVersion of both configs")
    p.add_argument("--subnet", default="10.244.1.0/24", help="the node's pod subnet")
    p.set_defaults(func=_bench)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _bench(args) -> int:
    if os.geteuid() != 0:
        print("pycnictl bench: needs root (network namespaces)", file=sys.stderr)
        return 2
    if args.pods < 1:
        print("pycnictl bench: --pods must be at least 1", file=sys.stderr)
        return 2
    old = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        report = bench(args.pods, args.launch, args.reference_dir, args.cni_version,
                       args.subnet, progress=lambda m: print(m, file=sys.stderr, flush=True))
    except BenchError as exc:
        print(f"pycnictl bench: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pycnictl bench: interrupted; namespaces removed", file=sys.stderr)
        return 130
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    print(json.dumps(report, indent=2) if args.json else format_table(report))
    return 0 if report["ok"] else 1
