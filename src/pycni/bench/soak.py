"""`pycnictl bench soak`: many random ADD / DEL / CHECK / GC calls against one node with an
agent that keeps being SIGKILLed, and pycni's invariant checked at quiet points.

A private node network namespace, one pod namespace per container slot and an agent on a
private socket and data dir. Worker threads exec the installed plugin exactly as a runtime
does (CNI environment, config on stdin, in the node's namespace), at most one call per
container at a time, and keep the runtime's model: a container is live after its ADD
succeeded and gone after its DEL did; a failed ADD is followed by DEL (as kubelet and
containerd do), a failed DEL is retried until it succeeds; GC runs alone (the CNI contract:
never beside ADD or DEL) with the live containers. Every ~--kill-every operations the
agent is SIGKILLed and started again at once: calls it had in flight fail with code 11, calls
made while it is down run in-process; both are counted. Every --check-every operations the
workers pause and pycni.doctor.check(dataDir, live=model) must find nothing; each finding is
printed as the doctor words it. Exit status 1 on any finding or unexpected error.

Everything made (agent, namespaces, temporary directory) is removed at the end, also on
failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .common import nearest_rank, run_and_print
from .latency import NETNS_DIR, PATH, AgentRunner, BenchError, Launcher, Spaces

if TYPE_CHECKING:
    from concurrent.futures import Future

NAME = "soaknet"
SUBNET = "10.244.8.0/24"
COMMANDS = ("ADD", "DEL", "CHECK", "GC")
TRY_AGAIN = 11
GC_SHARE = 0.02  # of the operations
CHECK_SHARE = 0.35  # of the operations on a live container (the rest are DELs)
MAX_RETRIES = 20  # a DEL failing this often is a problem, not bad luck
CALL_TIMEOUT = 120.0


@dataclass
class Slot:
    """One container slot: a pod namespace, and the runtime's view of its container."""

    index: int
    netns: str
    generation: int = 0
    cid: str = ""
    live: bool = False
    result: dict | None = None  # the ADD's result, CHECK's prevResult

    def next_cid(self) -> str:
        self.generation += 1
        self.cid = f"soak{self.index:03d}g{self.generation:05d}"
        return self.cid


@dataclass
class Stats:
    latency: dict[str, list[float]] = field(default_factory=lambda: {c: [] for c in COMMANDS})
    ops: int = 0
    calls: int = 0
    retried: dict[str, int] = field(
        default_factory=lambda: {"DEL after failed ADD": 0, "DEL again": 0}
    )
    try_again: dict[str, int] = field(default_factory=lambda: {c: 0 for c in COMMANDS})
    while_down: int = 0
    kills: int = 0
    checks: int = 0
    violations: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    check_seconds: float = 0.0


class Soak:
    def __init__(
        self,
        ops: int,
        containers: int,
        in_flight: int,
        kill_every: int,
        check_every: int,
        seed: int,
        progress=None,
    ):
        self.ops, self.containers, self.in_flight = ops, containers, in_flight
        self.kill_every, self.check_every, self.seed = kill_every, check_every, seed
        self.progress = progress or (lambda msg: None)
        self.rng = random.Random(seed)
        self.stats = Stats()
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        self.busy: set[int] = set()  # slots with a call in flight
        self.inflight = 0
        self.agent_down = threading.Event()
        self.spaces = Spaces()
        self.launchers = threading.local()
        self.all_launchers: list[Launcher] = []
        self.tmp = ""
        self.node = ""
        self.slots: list[Slot] = []
        self.agent: AgentRunner | None = None
        self.plugin = ""
        self.restarts: list[threading.Thread] = []

    # --- set-up and clean-up -----------------------------------------------------------

    def setup(self) -> None:
        from ..install.launchers import write_launcher

        self.tmp = tempfile.mkdtemp(prefix=f"pycni-soak-{os.getpid()}-")
        self.plugin = write_launcher(os.path.join(self.tmp, "bin", "pycni"))
        self.node = self.spaces.make("node")
        self.spaces.exec(self.node, "ip", "link", "set", "lo", "up")
        self.progress(f"making {self.containers} pod namespaces")
        self.slots = [
            Slot(i, os.path.join(NETNS_DIR, self.spaces.make(f"p{i}")))
            for i in range(self.containers)
        ]
        self.agent = AgentRunner(self.tmp, self.data_dir)
        self.agent.start(self._launcher(), self.node)

    @property
    def data_dir(self) -> str:
        return os.path.join(self.tmp, "data")

    def cleanup(self) -> None:
        # No second Ctrl-C may interrupt the cleanup.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for t in self.restarts:
                t.join(60)
            if self.agent is not None:
                self.agent.stop(timeout=5.0)
            for launcher in self.all_launchers:
                launcher.close()
            left = self.spaces.cleanup()
            if self.tmp:
                self._keep_logs()
                shutil.rmtree(self.tmp, ignore_errors=True)
            if left:
                print(f"pycnictl bench soak: could not remove namespaces {left}", file=sys.stderr)
        finally:
            signal.signal(signal.SIGINT, old)

    def _keep_logs(self) -> None:
        """After violations or errors, the logs that tell why outlive the run."""
        if not (self.stats.violations or self.stats.errors):
            return
        kept = tempfile.mkdtemp(prefix=f"pycni-soak-logs-{os.getpid()}-")
        for name in ("agent.log", "agent.stderr", "pycni.log"):
            if os.path.exists(os.path.join(self.tmp, name)):
                shutil.copy(os.path.join(self.tmp, name), kept)
        print(f"pycnictl bench soak: logs kept in {kept}", file=sys.stderr)

    def _launcher(self) -> Launcher:
        """This thread's way into the node namespace (setns moves only the calling thread)."""
        launcher = getattr(self.launchers, "it", None)
        if launcher is None:
            launcher = self.launchers.it = Launcher("setns")
            with self.lock:
                self.all_launchers.append(launcher)
        return launcher

    # --- one call, as a runtime makes it ----------------------------------------------

    def conf(self, slot: Slot, prev: dict | None = None, valid: list | None = None) -> dict:
        conf = {
            "cniVersion": "1.1.0",
            "name": NAME,
            "type": "pycni",
            "bridge": "cni0",
            "isGateway": True,
            "isDefaultGateway": True,
            "subnet": SUBNET,
            "ipMasq": True,
            "dataDir": self.data_dir,
            "logFile": os.path.join(self.tmp, "pycni.log"),
            "agentSocket": self.agent.socket,
        }
        if valid is not None:
            conf["cni.dev/valid-attachments"] = valid
            return conf
        # Some pods carry a hostPort (their own: the node's ports are shared), some shaping:
        # every kind of state pycni keeps is exercised.
        runtime: dict = {}
        if slot.index % 4 == 0:
            runtime["portMappings"] = [
                {"hostPort": 30000 + slot.index, "containerPort": 80, "protocol": "tcp"}
            ]
        if slot.index % 8 == 1:
            runtime["bandwidth"] = {
                "ingressRate": 10**8,
                "ingressBurst": 10**6,
                "egressRate": 10**8,
                "egressBurst": 10**6,
            }
        if runtime:
            conf["runtimeConfig"] = runtime
        if prev is not None:
            conf["prevResult"] = prev
        return conf

    def call(self, command: str, slot: Slot | None, conf: dict) -> tuple[int, dict | None, str]:
        """Exec the plugin; (exit status, JSON output or None, raw output), timed."""
        env = {"PATH": PATH, "CNI_COMMAND": command, "CNI_PATH": os.path.dirname(self.plugin)}
        if slot is not None:
            env.update(CNI_CONTAINERID=slot.cid, CNI_IFNAME="eth0", CNI_NETNS=slot.netns)
        if self.agent_down.is_set():
            with self.lock:
                self.stats.while_down += 1
        ms, proc = self._launcher().run(self.node, [self.plugin], json.dumps(conf).encode(), env)
        raw = (proc.stdout + proc.stderr).decode(errors="replace").strip()
        try:
            out = json.loads(proc.stdout) if proc.stdout.strip() else None
        except ValueError:
            out = None
        with self.lock:
            self.stats.latency[command].append(ms)
            self.stats.calls += 1
            if proc.returncode and isinstance(out, dict) and out.get("code") == TRY_AGAIN:
                self.stats.try_again[command] += 1
        return proc.returncode, out if isinstance(out, dict) else None, raw

    def _problem(self, what: str, rc: int, raw: str) -> None:
        with self.lock:
            self.stats.errors.append(f"{what}: exit {rc}: {raw[:400]}")

    def _retryable(self, rc: int, out: dict | None) -> bool:
        return rc != 0 and out is not None and out.get("code") == TRY_AGAIN

    # --- the operations -----------------------------------------------------------------

    def add(self, slot: Slot) -> None:
        cid = slot.cid
        rc, out, raw = self.call("ADD", slot, self.conf(slot))
        if rc == 0 and out is not None and out.get("ips"):
            with self.lock:
                slot.live, slot.result = True, out
            return
        if not self._retryable(rc, out):
            self._problem(f"ADD {cid}", rc, raw)
        with self.lock:
            self.stats.retried["DEL after failed ADD"] += 1
        self.delete(slot)  # what the runtime does with a sandbox it could not set up

    def delete(self, slot: Slot) -> None:
        for attempt in range(MAX_RETRIES):
            rc, out, raw = self.call("DEL", slot, self.conf(slot))
            if rc == 0:
                with self.lock:
                    slot.live, slot.result = False, None
                return
            if not self._retryable(rc, out):
                self._problem(f"DEL {slot.cid}", rc, raw)
            with self.lock:
                self.stats.retried["DEL again"] += 1
            time.sleep(min(0.05 * 2**attempt, 1.0))
        with self.lock:
            self.stats.errors.append(f"DEL {slot.cid} failed {MAX_RETRIES} times")
            slot.live = False  # the runtime gave up on it: the invariant check will tell

    def check(self, slot: Slot) -> None:
        rc, out, raw = self.call("CHECK", slot, self.conf(slot, prev=slot.result))
        if rc and not self._retryable(rc, out):
            self._problem(f"CHECK {slot.cid}", rc, raw)

    def gc(self, valid: list[dict]) -> None:
        rc, out, raw = self.call("GC", None, self.conf(self.slots[0], valid=valid))
        if rc and not self._retryable(rc, out):
            self._problem("GC", rc, raw)

    # --- scheduling ---------------------------------------------------------------------

    def _pick(self) -> tuple:
        """The next operation on a container: (function, slot, its index). Called with the
        lock held; marks the slot busy."""
        idle = [s for s in self.slots if s.index not in self.busy]
        slot = self.rng.choice(idle)
        self.busy.add(slot.index)
        if not slot.live:
            slot.next_cid()
            return self.add, slot, slot.index
        if self.rng.random() < CHECK_SHARE:
            return self.check, slot, slot.index
        return self.delete, slot, slot.index

    def _done(self, index: int | None, future: Future) -> None:
        with self.lock:
            if index is not None:
                self.busy.discard(index)
            self.inflight -= 1
            self.idle.notify_all()
        exc = future.exception()
        if exc is not None:
            with self.lock:
                self.stats.errors.append(f"the bench itself: {type(exc).__name__}: {exc}")

    def _quiesce(self) -> None:
        with self.lock:
            while self.inflight:
                self.idle.wait()

    def kill_schedule(self) -> set[int]:
        """Operation indices before which the agent is killed: one per --kill-every, at a
        random point of its stretch."""
        if not self.kill_every:
            return set()
        return {
            k * self.kill_every - 1 - self.rng.randrange(max(1, self.kill_every // 2))
            for k in range(1, self.ops // self.kill_every + 1)
        }

    def kill_agent(self) -> None:
        """SIGKILL the agent; a supervisor starts it again at once (in the background: the
        calls go on meanwhile, in-process)."""
        assert self.agent is not None
        for t in self.restarts:
            t.join()  # the previous restart is done
        self.agent_down.set()
        self.agent.proc.kill()
        self.agent.proc.wait()
        self.stats.kills += 1
        if os.path.lexists(self.agent.socket):
            os.unlink(self.agent.socket)  # the dead agent's: wait for the new one's

        def restart() -> None:
            try:
                self.agent.start(self._launcher(), self.node)
            except BenchError as exc:
                with self.lock:
                    self.stats.errors.append(f"the agent did not start again: {exc}")
            finally:
                self.agent_down.clear()

        t = threading.Thread(target=restart, name="agent-restart")
        self.restarts.append(t)
        t.start()

    def invariant(self, at: int) -> None:
        """pycni.doctor.check in the node namespace, with the runtime's live set."""
        from ..doctor import DoctorError, check

        for t in self.restarts:
            t.join()  # a quiet point has the agent back
        live = {(s.cid, "eth0") for s in self.slots if s.live}
        started = time.perf_counter()
        try:
            with self._launcher().inside(self.node):
                findings = [str(f) for f in check(self.data_dir, live)]
        except DoctorError as exc:
            findings = [f"cannot check: {exc}"]
        self.stats.check_seconds += time.perf_counter() - started
        self.stats.checks += 1
        self.stats.violations += [f"after op {at}: {f}" for f in findings]
        self.progress(
            f"op {at}/{self.ops}: {len(live)} live, invariant "
            f"{'holds' if not findings else f'VIOLATED ({len(findings)} findings)'}"
        )

    def run(self) -> dict:
        from concurrent.futures import ThreadPoolExecutor

        kills = self.kill_schedule()
        started = time.perf_counter()
        with ThreadPoolExecutor(max_workers=self.in_flight, thread_name_prefix="soak") as pool:
            try:
                for i in range(self.ops):
                    if i and self.check_every and i % self.check_every == 0:
                        self._quiesce()
                        self.invariant(i)
                    if i in kills:
                        self.kill_agent()
                    if self.rng.random() < GC_SHARE:
                        # Never beside another call (the CNI contract), with the runtime's
                        # list of live containers.
                        self._quiesce()
                        self.stats.ops += 1
                        self.gc(
                            [{"containerID": s.cid, "ifname": "eth0"} for s in self.slots if s.live]
                        )
                        continue
                    with self.lock:
                        while self.inflight >= self.in_flight:
                            self.idle.wait()
                        fn, arg, index = self._pick()
                        self.inflight += 1
                        self.stats.ops += 1
                    future = pool.submit(fn, arg)
                    future.add_done_callback(lambda f, index=index: self._done(index, f))
                self._quiesce()
            except BaseException:
                pool.shutdown(wait=True, cancel_futures=True)
                raise
        elapsed = time.perf_counter() - started
        self.invariant(self.ops)
        return self.report(elapsed)

    def report(self, elapsed: float) -> dict:
        s = self.stats
        working = max(elapsed - s.check_seconds, 1e-9)
        return {
            "ops": s.ops,
            "calls": s.calls,
            "containers": self.containers,
            "in_flight": self.in_flight,
            "kill_every": self.kill_every,
            "check_every": self.check_every,
            "seed": self.seed,
            "seconds": round(elapsed, 1),
            "check_seconds": round(s.check_seconds, 1),
            "ops_per_second": round(s.ops / working, 1),
            "latency_ms": {c: _percentiles(v) for c, v in s.latency.items()},
            "kills": s.kills,
            "try_again": s.try_again,
            "ran_while_agent_down": s.while_down,
            "retried": s.retried,
            "checks": s.checks,
            "violations": s.violations,
            "errors": s.errors,
            "live_at_end": sum(1 for slot in self.slots if slot.live),
            "ok": not s.violations and not s.errors,
        }


def _percentiles(samples: list[float]) -> dict:
    if not samples:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None}
    ordered = sorted(samples)

    def rank(p: float) -> float:
        return round(nearest_rank(ordered, p), 1)

    return {
        "n": len(ordered),
        "p50": rank(0.5),
        "p90": rank(0.9),
        "p99": rank(0.99),
        "max": round(ordered[-1], 1),
    }


def soak(
    ops: int,
    containers: int,
    in_flight: int,
    kill_every: int,
    check_every: int,
    seed: int,
    progress=None,
) -> dict:
    run = Soak(ops, containers, in_flight, kill_every, check_every, seed, progress)
    try:
        run.setup()
        return run.run()
    finally:
        run.cleanup()


def format_report(r: dict) -> str:
    def f(x) -> str:
        return "-" if x is None else f"{x:.1f}"

    lines = [
        f"pycnictl bench soak: {r['ops']} operations over {r['containers']} containers, "
        f"{r['in_flight']} in flight, seed {r['seed']}; agent SIGKILLed every ~"
        f"{r['kill_every']} ops, invariant checked every {r['check_every']}",
        f"{r['ops_per_second']:.1f} ops/s ({r['seconds']:.1f} s, of which invariant checks "
        f"{r['check_seconds']:.1f} s; {r['calls']} plugin calls)",
        "",
        f"{'command':<8} {'calls':>6} {'p50':>8} {'p90':>8} {'p99':>8} {'max':>8}  (ms)",
    ]
    for command, p in r["latency_ms"].items():
        lines.append(
            f"{command:<8} {p['n']:>6} {f(p['p50']):>8} {f(p['p90']):>8} "
            f"{f(p['p99']):>8} {f(p['max']):>8}"
        )
    retried = r["retried"]
    lines += [
        "",
        f"agent kills: {r['kills']}; calls answered 'try again' (code 11): "
        + ", ".join(f"{c} {n}" for c, n in r["try_again"].items())
        + f"; calls made while the agent was down (in-process): {r['ran_while_agent_down']}",
        f"retried operations: {sum(retried.values())} ("
        + ", ".join(f"{k}: {v}" for k, v in retried.items())
        + ")",
        f"invariant checks: {r['checks']}; violations: {len(r['violations'])}; "
        f"unexpected errors: {len(r['errors'])}; live at the end: {r['live_at_end']}",
    ]
    lines += [f"VIOLATION {v}" for v in r["violations"]]
    lines += [f"ERROR {e}" for e in r["errors"][:50]]
    if len(r["errors"]) > 50:
        lines.append(f"... and {len(r['errors']) - 50} more errors")
    return "\n".join(lines)


def run(args) -> int:
    if os.geteuid() != 0:
        print("pycnictl bench soak: needs root (network namespaces)", file=sys.stderr)
        return 2
    if (
        args.ops < 1
        or not 1 <= args.containers <= 250
        or args.in_flight < 1
        or args.in_flight > args.containers
        or args.kill_every < 0
        or args.check_every < 0
    ):
        print(
            "pycnictl bench soak: --ops at least 1, --containers 1..250, --in-flight "
            "1..containers, --kill-every and --check-every at least 0",
            file=sys.stderr,
        )
        return 2
    return run_and_print(
        "pycnictl bench soak",
        lambda progress: soak(
            args.ops,
            args.containers,
            args.in_flight,
            args.kill_every,
            args.check_every,
            args.seed,
            progress,
        ),
        format_report,
        args,
        (BenchError, subprocess.CalledProcessError),
        "agent stopped, namespaces removed",
    )
