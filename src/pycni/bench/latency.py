"""`pycnictl bench`: ADD/DEL latency of pycni (agent and standalone) against the Go reference.

One invocation measures four plugins with identical configs, ipMasq off and on (eight rows),
each row in a freshly made node network namespace of its own (never the host's), with its pod
namespaces made beforehand:

- pycni-agent: a `pycnictl agent` the bench starts inside that row's node namespace, on a
  private socket; the row's config names it in `agentSocket`, so the thin executable forwards;
- pycni-native: as pycni-agent, through the native executable (`pycnictl install --native`,
  pycni/native/shim.c) instead of the Python launcher; only where a C compiler (cc) is found;
- pycni-standalone: `agentSocket` names a path where nothing listens, so the thin executable
  falls back to running the plugin in-process (what a node without an agent does);
- reference: the Go bridge + host-local from containernetworking-plugins.

Per row, two phases:
1. N sequential ADDs, then N sequential DELs, each exec timed alone. The rows advance in
   lock-step (pod i of every row, the starting row rotating, then pod i+1), so a noisy moment
   on the machine hits all rows alike and their ratios stay comparable.
2. A storm: S ADDs launched at once (all spawned, then all waited for), then S DELs at once,
   the wall time of each measured; a storm cannot be interleaved, so the rows take turns
   (agent, reference, standalone at each ipMasq; a 0.5 s pause between storms).
   Checks: every call succeeded (failures are counted, never hidden), all addresses distinct,
   then everything freed (IPAM store / host-local files empty, no veths, no masquerade rules).
The agent's resident memory (VmRSS, /proc/<pid>/status) is read before, between and after.

How the plugin is put into the node namespace matters at these latencies: `ip netns exec` adds
an exec of `ip`, a mount namespace and a /sys remount; `nsenter` an exec. The default `setns`
moves the benchmark's own (single) thread into the node namespace for the duration of the
spawn, so the plugin is exec'd directly, exactly as a runtime on the node would; the floor of
each method (the same exec of /bin/true) is measured and reported.

Everything made (agents, namespaces, temporary directory) is removed at the end, also on
failure, Ctrl-C or SIGTERM. Exit status 1 when a correctness check fails; the performance
targets are reported beside the results, pass or fail, and do not change the exit status.
"""

from __future__ import annotations

import ctypes
import json
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

from ..agent.launch import agent_argv, wait_until_listening
from .common import nearest_rank, ratio, run_and_print, show_ratio

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
NAME = "benchnet"
LAUNCH_METHODS = ("setns", "nsenter", "ip-netns-exec")
PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
PLUGINS = ("pycni-agent", "pycni-native", "pycni-standalone", "reference")
STORM_ORDER = ("pycni-agent", "reference", "pycni-native", "pycni-standalone")
AGENT_ROWS = ("pycni-agent", "pycni-native")  # the rows that run an agent
DEFAULT_PODS = 50
DEFAULT_STORM = 110  # kubelet's default maxPods
STORM_TIMEOUT = 300.0
AGENT_START_TIMEOUT = 30.0

# (what, ipMasq, metric, limit): metric is a ratio to the reference, or megabytes. They hold
# for the executable `pycnictl install` writes by default: the native one where a C compiler
# is found (the pycni-native row), else the Python launcher (pycni-agent).
TARGETS = (
    ("ADD median / reference", True, "add", 0.5),
    ("DEL median / reference", True, "del", 0.3),
    ("storm ADD wall / reference", True, "storm_add", 0.5),
    ("storm DEL wall / reference", True, "storm_del", 0.5),
    ("agent RSS after the storm (MB)", True, "rss", 60.0),
)


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
    def inside(self, ns: str):
        """With setns, this thread is in `ns` for the block; otherwise argv() enters it."""
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

    def run(
        self, ns: str, argv: list[str], stdin: bytes = b"", env: dict | None = None
    ) -> tuple[float, subprocess.CompletedProcess]:
        """Run once; return (milliseconds, process). Only the spawn-to-exit is timed."""
        full = self.argv(ns, argv)
        with self.inside(ns):
            t0 = time.perf_counter()
            proc = subprocess.run(full, input=stdin, env=env, capture_output=True, timeout=120)
            elapsed = (time.perf_counter() - t0) * 1000
        return elapsed, proc

    def popen(self, ns: str, argv: list[str], **kw) -> subprocess.Popen:
        """Start a process in `ns`. Every method execs (no fork), so its pid is the command's."""
        with self.inside(ns):
            return subprocess.Popen(self.argv(ns, argv), **kw)

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
            pids = subprocess.run(
                ["ip", "netns", "pids", name], capture_output=True, text=True
            ).stdout.split()
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


# --- the agent ---------------------------------------------------------------------------------


class AgentRunner:
    """A `pycnictl agent` in a row's node namespace, with private socket, log and data dir."""

    def __init__(self, root: str, data_dir: str):
        self.root = root
        self.socket = os.path.join(root, "agent", "agent.sock")
        self.log_file = os.path.join(root, "agent.log")
        self.stderr_file = os.path.join(root, "agent.stderr")
        self.data_dir = data_dir
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self, launcher: Launcher, ns: str) -> None:
        argv = agent_argv(self.socket, self.data_dir, self.log_file)
        with open(self.stderr_file, "wb") as err:
            self.proc = launcher.popen(
                ns,
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                env={"PATH": PATH},
                start_new_session=True,
            )
        try:
            wait_until_listening(self.proc, self.socket, AGENT_START_TIMEOUT)
        except RuntimeError as exc:
            raise BenchError(f"{exc}: {self.stderr()}") from None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def memory_kb(self) -> dict[str, int] | None:
        """VmRSS and VmHWM (peak) of the agent, in kB."""
        if not self.alive():
            return None
        found = {}
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    if key in ("VmRSS", "VmHWM"):
                        found[key] = int(value.split()[0])
        except OSError:
            return None
        return found

    def cpu_ms(self) -> float | None:
        """The agent's CPU time so far (user + system), in ms: what a storm costs it, which
        the machine's load changes far less than the storm's wall."""
        if not self.alive():
            return None
        try:
            with open(f"/proc/{self.proc.pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            return None
        # utime and stime are fields 14 and 15 of stat(5); [0] here is field 3.
        return (int(fields[11]) + int(fields[12])) * 1000 / os.sysconf("SC_CLK_TCK")

    def stderr(self) -> str:
        try:
            with open(self.stderr_file, errors="replace") as f:
                return f.read()[-2000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (in-flight calls complete), then SIGKILL if it lingers."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGTERM)
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


# --- the rows ----------------------------------------------------------------------------------


@dataclass
class Row:
    plugin: str  # one of PLUGINS
    masq: bool
    exe: str
    cni_path: str
    conf: dict
    root: str
    agent: AgentRunner | None = None
    node: str = ""
    pods: list[str] = field(default_factory=list)
    add_ms: list[float] = field(default_factory=list)
    del_ms: list[float] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    storm: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)  # moment -> {"VmRSS": kB, "VmHWM": kB}
    problems: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.plugin} ipMasq={'on' if self.masq else 'off'}"

    @property
    def stdin(self) -> bytes:
        return json.dumps(self.conf).encode()

    def env(self, command: str, cid: str, netns: str) -> dict:
        return {
            "PATH": PATH,
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": cid,
            "CNI_NETNS": netns,
            "CNI_IFNAME": "eth0",
            "CNI_PATH": self.cni_path,
        }


def pycni_conf(root: str, version: str, subnet: str, masq: bool, agent_socket: str) -> dict:
    return {
        "cniVersion": version,
        "name": NAME,
        "type": "pycni",
        "bridge": "cni0",
        "isGateway": True,
        "isDefaultGateway": True,
        "subnet": subnet,
        "ipMasq": masq,
        "dataDir": os.path.join(root, "data"),
        "logFile": os.path.join(root, "pycni.log"),
        "agentSocket": agent_socket,
    }


def reference_conf(root: str, version: str, subnet: str, masq: bool) -> dict:
    return {
        "cniVersion": version,
        "name": NAME,
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": True,
        "isDefaultGateway": True,
        "ipMasq": masq,
        "ipam": {"type": "host-local", "subnet": subnet, "dataDir": os.path.join(root, "ipam")},
    }


def _cid(i: int, storm: bool = False) -> str:
    return f"{'storm' if storm else 'bench'}{i:04d}"


def _stats(samples: list[float]) -> dict:
    if not samples:
        return {"median": None, "p95": None, "min": None, "max": None, "n": 0}
    ordered = sorted(samples)
    p95 = nearest_rank(ordered, 0.95)
    return {
        "median": round(statistics.median(ordered), 2),
        "p95": round(p95, 2),
        "min": round(ordered[0], 2),
        "max": round(ordered[-1], 2),
        "n": len(ordered),
    }


def _veths(spaces: Spaces, ns: str) -> int:
    return len(spaces.exec(ns, "ip", "-o", "link", "show", "type", "veth").splitlines())


def _masq_rules(spaces: Spaces, ns: str) -> int:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "list", "ruleset"], capture_output=True, text=True
    ).stdout
    return sum("masquerade" in line for line in out.splitlines())


def held_addresses(row) -> list[str]:
    """Addresses the plugin's IPAM still holds (after the DELs: should be none), for a bench
    row with `plugin` and `root` (this bench's and `bench cri`'s)."""
    if row.plugin == "reference":
        d = os.path.join(row.root, "ipam", NAME)
        if not os.path.isdir(d):
            return []
        return sorted(
            f for f in os.listdir(d) if f not in ("lock",) and not f.startswith("last_reserved_ip")
        )
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


def _describe(rc, stdout: bytes, stderr: bytes) -> str:
    return (
        f"rc {rc}: {stdout.decode(errors='replace')[:300]}{stderr.decode(errors='replace')[:300]}"
    ).strip()


def _address(rc: int, stdout: bytes) -> str | None:
    """The first address of a successful ADD's result, else None."""
    if rc != 0:
        return None
    try:
        out = json.loads(stdout or b"null")
    except ValueError:
        return None
    if not isinstance(out, dict) or not out.get("ips"):
        return None
    return out["ips"][0].get("address")


def _do(launcher: Launcher, row: Row, command: str, i: int) -> subprocess.CompletedProcess:
    ms, proc = launcher.run(
        row.node,
        [row.exe],
        row.stdin,
        row.env(command, _cid(i), os.path.join(NETNS_DIR, row.pods[i])),
    )
    (row.add_ms if command == "ADD" else row.del_ms).append(ms)
    return proc


# --- the storm ---------------------------------------------------------------------------------


def storm(launcher: Launcher, row: Row, command: str, n: int) -> dict:
    """Launch `n` execs of `command` at once (spawn all, then wait for all).

    Returns the wall time from the first spawn to the last exit, the spawning time alone, and
    every call's (rc, stdout, stderr). Output goes to unnamed files, so no plugin ever blocks
    on a full pipe while the bench waits for another."""
    stdin = row.stdin
    procs: list[tuple[subprocess.Popen, object, object]] = []
    try:
        t0 = time.perf_counter()
        with launcher.inside(row.node):
            for i in range(n):
                rfd, wfd = os.pipe()
                try:
                    os.write(wfd, stdin)  # fits the pipe buffer: never blocks
                finally:
                    os.close(wfd)
                out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
                try:
                    proc = subprocess.Popen(
                        launcher.argv(row.node, [row.exe]),
                        stdin=rfd,
                        stdout=out,
                        stderr=err,
                        env=row.env(
                            command, _cid(i, storm=True), os.path.join(NETNS_DIR, row.pods[i])
                        ),
                    )
                except BaseException:
                    out.close()
                    err.close()
                    raise
                finally:
                    os.close(rfd)
                procs.append((proc, out, err))
        spawned = time.perf_counter()
        deadline = time.monotonic() + STORM_TIMEOUT
        for proc, _, _ in procs:
            proc.wait(max(0.1, deadline - time.monotonic()))
        wall = time.perf_counter() - t0
        results = []
        for proc, out, err in procs:
            out.seek(0)
            err.seek(0)
            results.append((proc.returncode, out.read(), err.read()))
        return {"wall_ms": wall * 1000, "spawn_ms": (spawned - t0) * 1000, "results": results}
    except subprocess.TimeoutExpired as exc:
        raise BenchError(
            f"{row.label}: a storm {command} took longer than {STORM_TIMEOUT:.0f} s"
        ) from exc
    finally:
        for proc, out, err in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            out.close()
            err.close()


def _check_storm_add(spaces: Spaces, row: Row, n: int, result: dict) -> None:
    addresses, failures = [], []
    for i, (rc, stdout, stderr) in enumerate(result["results"]):
        address = _address(rc, stdout)
        if address is None:
            failures.append(f"#{i} {_describe(rc, stdout, stderr)}")
        else:
            addresses.append(address)
    row.storm["add_failures"] = len(failures)
    row.storm["addresses_distinct"] = len(set(addresses)) == len(addresses)
    if failures:
        row.problems.append(
            f"storm: {len(failures)} of {n} concurrent ADDs failed; first: {failures[0]}"
        )
    if not row.storm["addresses_distinct"]:
        dups = sorted({a for a in addresses if addresses.count(a) > 1})
        row.problems.append(f"storm: addresses handed out twice: {dups}")
    veths = _veths(spaces, row.node)
    if veths != n - len(failures):
        row.problems.append(
            f"storm: {veths} veths in the node after {n - len(failures)} successful concurrent ADDs"
        )
    if row.masq and not failures and not _masq_rules(spaces, row.node):
        row.problems.append("storm: no masquerade rule after the ADDs")


def _check_storm_del(row: Row, n: int, result: dict) -> None:
    failures = [
        f"#{i} {_describe(rc, out, err)}"
        for i, (rc, out, err) in enumerate(result["results"])
        if rc != 0
    ]
    row.storm["del_failures"] = len(failures)
    if failures:
        row.problems.append(
            f"storm: {len(failures)} of {n} concurrent DELs failed; first: {failures[0]}"
        )


def _check_freed(spaces: Spaces, row: Row, phase: str) -> bool:
    freed = True
    veths = _veths(spaces, row.node)
    if veths:
        row.problems.append(f"{phase}: {veths} veths left after the DELs")
        freed = False
    held = held_addresses(row)
    if held:
        row.problems.append(f"{phase}: addresses still held after the DELs: {held}")
        freed = False
    if _masq_rules(spaces, row.node):
        row.problems.append(f"{phase}: masquerade rules left after the DELs")
        freed = False
    return freed


def _check_agent(row: Row, moment: str) -> None:
    if row.agent is None:
        return
    mem = row.agent.memory_kb()
    if mem is None:
        row.problems.append(f"the agent died before {moment}: {row.agent.stderr()}")
    else:
        row.memory[moment] = mem


# --- the run -----------------------------------------------------------------------------------


def bench(
    pods: int,
    launch: str,
    reference_dir: str,
    version: str,
    subnet: str,
    storm_size: int = DEFAULT_STORM,
    progress=None,
) -> dict:
    from ..install.launchers import write_launcher

    ref_bridge = os.path.join(reference_dir, "bridge")
    if not os.access(ref_bridge, os.X_OK) or not os.access(
        os.path.join(reference_dir, "host-local"), os.X_OK
    ):
        raise BenchError(f"the reference bridge and host-local are not in {reference_dir}")
    import ipaddress

    usable = ipaddress.ip_network(subnet).num_addresses - 3  # network, gateway, broadcast
    needed = max(pods, storm_size)
    if needed > usable:
        raise BenchError(f"{needed} pods do not fit in {subnet} ({usable} addresses)")

    spaces = Spaces()
    tmp = tempfile.mkdtemp(prefix="pycni-bench-")
    launcher: Launcher | None = None
    rows: list[Row] = []
    try:
        import compileall

        import pycni

        # Bytecode ahead of time, as pip leaves it: otherwise the first execs compile.
        compileall.compile_dir(os.path.dirname(pycni.__file__), quiet=1)
        plugin = write_launcher(os.path.join(tmp, "bin", "pycni"))
        native = _native_executable(os.path.join(tmp, "bin-native", "pycni"), plugin, progress)

        for masq in (False, True):
            for name in PLUGINS:
                if name == "pycni-native" and native is None:
                    continue
                root = os.path.join(tmp, f"{name}-{'masq' if masq else 'nomasq'}")
                os.makedirs(root)
                if name == "reference":
                    rows.append(
                        Row(
                            name,
                            masq,
                            ref_bridge,
                            reference_dir,
                            reference_conf(root, version, subnet, masq),
                            root,
                        )
                    )
                    continue
                agent = None
                if name in AGENT_ROWS:
                    agent = AgentRunner(root, os.path.join(root, "data"))
                    sock = agent.socket
                else:
                    sock = os.path.join(root, "no-agent", "agent.sock")  # nothing listens
                exe = native if name == "pycni-native" else plugin
                rows.append(
                    Row(
                        name,
                        masq,
                        exe,
                        os.path.dirname(exe),
                        pycni_conf(root, version, subnet, masq, sock),
                        root,
                        agent,
                    )
                )

        _say(progress, f"making {len(rows)} node and {len(rows) * needed} pod namespaces")
        for n, row in enumerate(rows):
            row.node = spaces.make(f"node{n}")
            spaces.exec(row.node, "ip", "link", "set", "lo", "up")
            row.pods = [spaces.make(f"n{n}p{i}") for i in range(needed)]

        floors = measure_floor(LAUNCH_METHODS, rows[0].node, runs=max(10, min(pods, 30)))
        launcher = Launcher(launch)
        for row in rows:
            if row.agent is not None:
                _say(progress, f"starting the agent for {row.label}")
                row.agent.start(launcher, row.node)
        for row in rows:  # warm the page cache and the agent's connection path (not timed)
            for _ in range(2):
                _, proc = launcher.run(
                    row.node,
                    [row.exe],
                    b'{"cniVersion":"1.0.0"}',
                    {"PATH": PATH, "CNI_COMMAND": "VERSION"},
                )
                if proc.returncode != 0:
                    raise BenchError(
                        f"{row.label}: VERSION failed: "
                        f"{_describe(proc.returncode, proc.stdout, proc.stderr)}"
                    )
            _check_agent(row, "start")

        _say(progress, f"{pods} sequential ADDs per row")
        for i in range(pods):
            k = i % len(rows)  # rotate who goes first, so no row always follows the same one
            for row in rows[k:] + rows[:k]:
                proc = _do(launcher, row, "ADD", i)
                address = _address(proc.returncode, proc.stdout)
                if address is None:
                    row.problems.append(
                        f"ADD #{i} failed: {_describe(proc.returncode, proc.stdout, proc.stderr)}"
                    )
                else:
                    row.addresses.append(address)
        for row in rows:
            if len(set(row.addresses)) != len(row.addresses):
                row.problems.append(f"addresses handed out twice: {sorted(row.addresses)}")
            # Proves the plugin really ran in this row's node namespace.
            veths = _veths(spaces, row.node)
            if veths != pods:
                row.problems.append(f"{veths} veths in the node after {pods} ADDs")
            if row.masq and not _masq_rules(spaces, row.node):
                row.problems.append("no masquerade rule after the ADDs")

        _say(progress, f"{pods} sequential DELs per row")
        for i in range(pods):
            k = i % len(rows)
            for row in rows[k:] + rows[:k]:
                proc = _do(launcher, row, "DEL", i)
                if proc.returncode != 0:
                    row.problems.append(
                        f"DEL #{i} failed: {_describe(proc.returncode, proc.stdout, proc.stderr)}"
                    )
        for row in rows:
            _check_freed(spaces, row, "sequential")
            _check_agent(row, "sequential")

        if storm_size:
            _say(progress, f"storm: {storm_size} concurrent ADDs, then DELs, row by row")
            # The pair the targets compare (agent, reference) goes first at each ipMasq, before
            # the standalone storm's CPU load (110 interpreters) can linger into theirs.
            turns = sorted(rows, key=lambda r: (r.masq, STORM_ORDER.index(r.plugin)))
            for row in turns:
                cpu = _agent_cpu(row)
                result = storm(launcher, row, "ADD", storm_size)
                row.storm.update(
                    n=storm_size,
                    add_wall_ms=round(result["wall_ms"], 2),
                    add_spawn_ms=round(result["spawn_ms"], 2),
                    add_agent_cpu_ms=_spent(row, cpu),
                )
                _check_storm_add(spaces, row, storm_size, result)
                time.sleep(0.5)  # let the kernel settle before the next row's storm
            for row in turns:
                cpu = _agent_cpu(row)
                result = storm(launcher, row, "DEL", storm_size)
                row.storm.update(
                    del_wall_ms=round(result["wall_ms"], 2),
                    del_spawn_ms=round(result["spawn_ms"], 2),
                    del_agent_cpu_ms=_spent(row, cpu),
                )
                _check_storm_del(row, storm_size, result)
                row.storm["freed"] = _check_freed(spaces, row, "storm")
                _check_agent(row, "storm")
                time.sleep(0.5)
        for row in rows:
            if row.agent is not None:
                _check_agent(row, "end")
                rc = row.agent.stop()
                if rc not in (0, None):
                    row.problems.append(f"the agent exited {rc} on SIGTERM: {row.agent.stderr()}")
        return _report(rows, pods, storm_size, launch, floors, version, subnet)
    finally:
        # No second Ctrl-C may interrupt the cleanup.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            if launcher is not None:
                launcher.close()
            for row in rows:
                if row.agent is not None:
                    row.agent.stop(timeout=5.0)
            left = spaces.cleanup()
            shutil.rmtree(tmp, ignore_errors=True)
            if left:
                print(f"pycnictl bench: could not remove namespaces {left}", file=sys.stderr)
        finally:
            signal.signal(signal.SIGINT, old)


def _agent_cpu(row: Row) -> float | None:
    """The row's agent's CPU ms so far (None without an agent)."""
    return row.agent.cpu_ms() if row.agent is not None else None


def _spent(row: Row, before: float | None) -> float | None:
    """The agent's CPU ms since `before` (None without an agent)."""
    after = _agent_cpu(row)
    return None if before is None or after is None else round(after - before, 1)


def _say(progress, msg: str) -> None:
    if progress:
        progress(msg)


def _native_executable(path: str, fallback: str, progress) -> str | None:
    """The native executable as `pycnictl install --native` builds it (falling back to the
    Python launcher `fallback`), or None without a C compiler."""
    from ..native import build

    if build.compiler() is None:
        _say(progress, "no C compiler (cc): no pycni-native rows")
        return None
    try:
        build.build(path, os.path.abspath(fallback))
    except build.BuildError as exc:
        raise BenchError(f"cannot build the native executable: {exc}") from None
    return path


def _report(
    rows: list[Row],
    pods: int,
    storm_size: int,
    launch: str,
    floors: dict,
    version: str,
    subnet: str,
) -> dict:
    out_rows = []
    for row in rows:
        ref = next(r for r in rows if r.plugin == "reference" and r.masq == row.masq)
        add, dele = _stats(row.add_ms), _stats(row.del_ms)
        radd, rdel = _stats(ref.add_ms), _stats(ref.del_ms)
        storm_out = dict(row.storm)
        if storm_size:
            storm_out["ratio"] = {
                "add": ratio(row.storm.get("add_wall_ms"), ref.storm.get("add_wall_ms")),
                "del": ratio(row.storm.get("del_wall_ms"), ref.storm.get("del_wall_ms")),
            }
        agent = None
        if row.agent is not None:
            agent = {
                "pid": row.agent.pid,
                "memory_kb": row.memory,
                "rss_mb_after_storm": _mb(row.memory.get("storm" if storm_size else "sequential")),
            }
        out_rows.append(
            {
                "plugin": row.plugin,
                "ipMasq": row.masq,
                "add": add,
                "del": dele,
                "ratio": {
                    "add": ratio(add["median"], radd["median"]),
                    "del": ratio(dele["median"], rdel["median"]),
                },
                "storm": storm_out,
                "agent": agent,
                "ok": not row.problems,
                "problems": row.problems,
                "samples": {
                    "add": [round(x, 3) for x in row.add_ms],
                    "del": [round(x, 3) for x in row.del_ms],
                },
            }
        )
    order = {p: n for n, p in enumerate(PLUGINS)}
    out_rows.sort(key=lambda r: (r["ipMasq"], order[r["plugin"]]))
    return {
        "pods": pods,
        "storm": storm_size,
        "cniVersion": version,
        "subnet": subnet,
        "launch": launch,
        "exec_floor_ms": floors,
        "rows": out_rows,
        "targets": _targets(out_rows),
        "ok": all(r["ok"] for r in out_rows),
    }


def _mb(mem: dict | None) -> float | None:
    return round(mem["VmRSS"] / 1024, 1) if mem and "VmRSS" in mem else None


def target_row(rows: list[dict]) -> str:
    """The row the targets are for: what `pycnictl install` writes by default here."""
    return "pycni-native" if any(r["plugin"] == "pycni-native" for r in rows) else "pycni-agent"


def _targets(rows: list[dict]) -> list[dict]:
    out = []
    plugin = target_row(rows)
    for what, masq, metric, limit in TARGETS:
        row = next((r for r in rows if r["plugin"] == plugin and r["ipMasq"] == masq), None)
        value = None
        if row is not None:
            if metric == "rss":
                value = (row["agent"] or {}).get("rss_mb_after_storm")
            elif metric.startswith("storm_"):
                value = row["storm"].get("ratio", {}).get(metric.removeprefix("storm_"))
            else:
                value = row["ratio"][metric]
        out.append(
            {
                "target": what,
                "plugin": plugin,
                "ipMasq": masq,
                "metric": metric,
                "limit": limit,
                "value": value,
                "pass": value is not None and value <= limit
                if metric != "rss"
                else value is not None and value < limit,
            }
        )
    return out


def format_table(report: dict) -> str:
    def f(x) -> str:
        return "-" if x is None else f"{x:.1f}"

    floors = report["exec_floor_ms"]
    lines = [
        f"pycnictl bench: {report['pods']} sequential ADDs then DELs per row (rows interleaved)"
        f"; storm of {report['storm']} concurrent ADDs then DELs; cniVersion "
        f"{report['cniVersion']}, subnet {report['subnet']}",
        f"launch: {report['launch']} (exec floor, median of /bin/true: "
        + ", ".join(f"{k} {v:.1f} ms" for k, v in floors.items())
        + "; included in the times)",
        "",
        f"{'plugin':<16} {'ipMasq':<6} {'ADD med':>8} {'ADD p95':>8} {'DEL med':>8} "
        f"{'DEL p95':>8} {'ADD ratio':>9} {'DEL ratio':>9}  ok",
    ]
    for row in report["rows"]:
        lines.append(
            f"{row['plugin']:<16} {'on' if row['ipMasq'] else 'off':<6} "
            f"{f(row['add']['median']):>8} {f(row['add']['p95']):>8} "
            f"{f(row['del']['median']):>8} {f(row['del']['p95']):>8} "
            f"{show_ratio(row['ratio']['add']):>9} {show_ratio(row['ratio']['del']):>9}  "
            f"{'yes' if row['ok'] else 'NO'}"
        )
    lines.append("sequential times in ms; ratio = pycni median / reference median, same ipMasq")
    if report["storm"]:
        lines += [
            "",
            f"{'storm of ' + str(report['storm']):<16} {'ipMasq':<6} {'ADD wall':>9} "
            f"{'DEL wall':>9} {'ADD ratio':>9} {'DEL ratio':>9} {'failed':>7} {'distinct':>8} "
            f"{'freed':>5} {'agent RSS':>9} {'agent CPU':>13}",
        ]
        for row in report["rows"]:
            s = row["storm"]
            failed = (s.get("add_failures") or 0) + (s.get("del_failures") or 0)
            rss = (row["agent"] or {}).get("rss_mb_after_storm")
            cpu = (s.get("add_agent_cpu_ms"), s.get("del_agent_cpu_ms"))
            lines.append(
                f"{row['plugin']:<16} {'on' if row['ipMasq'] else 'off':<6} "
                f"{f(s.get('add_wall_ms')):>9} {f(s.get('del_wall_ms')):>9} "
                f"{show_ratio(s.get('ratio', {}).get('add')):>9} "
                f"{show_ratio(s.get('ratio', {}).get('del')):>9} "
                f"{failed:>7} {'yes' if s.get('addresses_distinct') else 'NO':>8} "
                f"{'yes' if s.get('freed') else 'NO':>5} "
                f"{'-' if rss is None else f'{rss:.1f} MB':>9} "
                f"{'-' if None in cpu else f'{cpu[0]:.0f} / {cpu[1]:.0f}':>13}"
            )
        lines.append(
            "storm: wall ms from the first spawn to the last exit; failed = ADDs + DELs "
            "that failed; agent RSS = VmRSS after the storm; agent CPU = the agent's user + "
            "system ms during the ADD / DEL storm"
        )
    plugin = report["targets"][0]["plugin"] if report["targets"] else "pycni-agent"
    lines += ["", f"targets ({plugin}, the executable `pycnictl install` writes here):"]
    for t in report["targets"]:
        value, limit = t["value"], t["limit"]
        if t["metric"] == "rss":
            shown, bound = f(value) + " MB", f"< {limit:.0f} MB"
        else:
            shown, bound = show_ratio(value), f"<= {limit:.1f}x"
        lines.append(
            f"  {t['target'] + ', ipMasq ' + ('on' if t['ipMasq'] else 'off'):<48} "
            f"{shown:>9} {bound:>9}  {'PASS' if t['pass'] else 'FAIL'}"
        )
    for row in report["rows"]:
        for problem in row["problems"][:10]:
            lines.append(f"PROBLEM {row['plugin']} ipMasq={row['ipMasq']}: {problem}")
    return "\n".join(lines)


def run(args) -> int:
    if os.geteuid() != 0:
        print("pycnictl bench: needs root (network namespaces)", file=sys.stderr)
        return 2
    if args.pods < 1 or args.storm < 0:
        print("pycnictl bench: --pods must be at least 1, --storm at least 0", file=sys.stderr)
        return 2
    return run_and_print(
        "pycnictl bench",
        lambda progress: bench(
            args.pods,
            args.launch,
            args.reference_dir,
            args.cni_version,
            args.subnet,
            args.storm,
            progress=progress,
        ),
        format_table,
        args,
        (BenchError,),
        "agents stopped, namespaces removed",
    )
