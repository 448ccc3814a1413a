"""NetworkPolicy measured in a real lab, for the end-to-end truth tables
(tests/netns/test_netpol_truth.py): a lab brought up with `pycnictl lab up`, pods and policies
applied and deleted with `pycnictl lab apply`/`lab delete` (so pods go through the nodes'
installed plugins and every object is stored where the agents read it), and a prober that
measures the whole reachability matrix at once.

The prober: one helper process per pod (started with `ip netns exec`), serving TCP and UDP
ports 80 and 81 on every address family the pod has (TCP accepts and echoes, UDP echoes, so a
client can tell an answer from silence), and probing on request every (destination, protocol,
port) from its pod concurrently with non-blocking sockets and one short timeout. pycni drops
what a policy denies, so a denial is a timeout: a probe is "ok" (answered), "timeout", or the
errno a socket reported (ECONNREFUSED: reached, but nothing listening).

Enforcement timing: after a change, `wait_enforced` computes, for every node, the digest of
the NetworkPolicy rules the stored objects compile to there, and polls until the node's kernel
holds that digest in its `table inet pycni` (the `policy_digest` chain the agent writes with
the rules, in the same nft transaction) and the node's agent reports it for its last finished
pass (which it reports only after cutting the connections the rules deny). It does not depend
on when an agent happened to reconcile, and a change the agents never apply fails it within
the bound.

The expected matrix comes from the reference evaluator (pycni.policy.evaluate.Evaluator) over
the objects read back from the lab's datastore.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from conftest import sh
from pycni.agent.client import agent_health
from pycni.agent.policy import with_local_addresses
from pycni.cluster.objects import Objects
from pycni.ctl.main import main
from pycni.lab.model import Lab
from pycni.lab.store import lab_objects
from pycni.policy import compile_inventory
from pycni.policy.evaluate import Evaluator
from pycni.policy.objects import load
from pycni.rules import policy as policy_rules
from pycni.rules.model import PolicyFragment

PORTS = (80, 81)
PROTOCOLS = ("tcp", "udp")
NAMED_PORTS = [
    {"name": f"serve-{port}-{proto}", "containerPort": port, "protocol": proto.upper()}
    for port in PORTS
    for proto in PROTOCOLS
]
# A denied probe is dropped: it times out. Answers inside a lab take a millisecond or so; the
# timeout only has to outlast a busy machine's scheduling. Probes that should have been
# answered and were not are probed again (RETRY_TIMEOUT), twice at most, as upstream's e2e
# tests do; probes that got through where the policies deny them are never tried again.
PROBE_TIMEOUT = float(os.environ.get("PYCNI_NETPOL_PROBE_TIMEOUT", "0.5"))
RETRY_TIMEOUT = 2.0
RETRIES = 2
ENFORCE_BOUND = 10.0  # seconds for every node's agent to install a change

# Runs in a pod (python -I -S: the standard library only). Serves TCP and UDP on PORTS; reads
# one JSON request per line on stdin, answers one JSON line on stdout.
HELPER = r"""
import errno, json, os, selectors, socket, struct, sys, threading, time

PORTS = (80, 81)
RESEND = 0.2  # a UDP probe resends its datagram this often until answered or timed out
LINGER_RESET = struct.pack("ii", 1, 0)


def listening():
    out = []
    for kind, role in ((socket.SOCK_STREAM, "listen"), (socket.SOCK_DGRAM, "udp")):
        for port in PORTS:
            try:  # both families on one socket (IPv4 peers appear as ::ffff:a.b.c.d)
                s = socket.socket(socket.AF_INET6, kind)
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("::", port))
            except OSError:
                s = socket.socket(socket.AF_INET, kind)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("0.0.0.0", port))
            if role == "listen":
                s.listen(512)
            s.setblocking(False)
            out.append((s, role))
    return out


accepted = {}  # (peer address, peer port) -> the server's end of a TCP connection


def serve(sockets):
    sel = selectors.DefaultSelector()
    for s, role in sockets:
        sel.register(s, selectors.EVENT_READ, role)
    while True:
        for key, _ in sel.select():
            s, role = key.fileobj, key.data
            try:
                if role == "listen":
                    c, peer = s.accept()
                    c.setblocking(False)
                    sel.register(c, selectors.EVENT_READ, "conn")
                    accepted[(peer[0].removeprefix("::ffff:"), peer[1])] = c
                elif role == "udp":
                    data, addr = s.recvfrom(4096)
                    s.sendto(data, addr)
                else:
                    data = s.recv(4096)
                    if not data:
                        raise OSError(0, "closed")
                    s.send(data)
            except BlockingIOError:
                pass
            except OSError:
                if role == "conn":
                    sel.unregister(s)
                    s.close()


def name(err):
    return errno.errorcode.get(err, str(err))


def probe(targets, timeout):
    # Every target at once: connect (TCP) or send (UDP) without blocking, then wait for each
    # answer until the one deadline.
    sel = selectors.DefaultSelector()
    results, pending = {}, {}
    start = time.monotonic()
    for tid, ip, proto, port in targets:
        family = socket.AF_INET6 if ":" in ip else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
        s.setblocking(False)
        try:
            if proto == "tcp":
                err = s.connect_ex((ip, port))
                if err not in (0, errno.EINPROGRESS):
                    raise OSError(err, os.strerror(err))
                sel.register(s, selectors.EVENT_WRITE, (tid, proto))
            else:
                s.connect((ip, port))
                s.send(tid.encode())
                sel.register(s, selectors.EVENT_READ, (tid, proto))
            pending[tid] = (s, proto)
        except OSError as exc:
            results[tid] = name(exc.errno)
            s.close()
    deadline, resend = start + timeout, start + RESEND
    while pending:
        now = time.monotonic()
        if now >= deadline:
            break
        if now >= resend:
            for tid, (s, proto) in pending.items():
                if proto == "udp":
                    try:
                        s.send(tid.encode())
                    except OSError:
                        pass  # an ICMP error: the next recv reports it
            resend = now + RESEND
        for key, _ in sel.select(max(0.0, min(deadline, resend) - now)):
            tid, proto = key.data
            s = key.fileobj
            if proto == "tcp":
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                out = "ok" if err == 0 else name(err)
                # Close with a reset: the nodes' conntrack entries of a probe then live 10 s
                # (CLOSE) instead of 120 s (TIME_WAIT), and every policy pass, which reads
                # the whole table to cut what it denies, has less to read.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            else:
                try:
                    out = "ok" if s.recv(4096) else "empty"
                except BlockingIOError:
                    continue
                except OSError as exc:
                    out = name(exc.errno)
            sel.unregister(s)
            s.close()
            del pending[tid]
            results[tid] = out
    for tid, (s, _) in pending.items():
        results[tid] = "timeout"
        s.close()
    return results


conns = {}


def drain(s):
    s.setblocking(False)
    try:
        while s.recv(4096):
            pass
    except OSError:
        pass


def exchange(s, proto, timeout):
    # Send on an established connection or flow; "ok" when the echo comes back in time.
    drain(s)
    deadline = time.monotonic() + timeout
    try:
        s.send(b"ping\n")
    except OSError as exc:
        return name(exc.errno)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout"
        s.settimeout(min(left, 0.2) if proto == "udp" else left)
        try:
            data = s.recv(4096)
            return "ok" if data else "closed"
        except TimeoutError:
            if proto == "udp" and deadline - time.monotonic() > 0:
                try:
                    s.send(b"ping\n")  # the same flow: same addresses and ports
                except OSError:
                    pass
        except OSError as exc:
            return name(exc.errno)


def handle(req):
    op = req["op"]
    if op == "probe":
        return {"results": probe(req["targets"], req["timeout"])}
    if op == "open":
        family = socket.AF_INET6 if ":" in req["ip"] else socket.AF_INET
        kind = socket.SOCK_STREAM if req["proto"] == "tcp" else socket.SOCK_DGRAM
        s = socket.socket(family, kind)
        s.settimeout(req["timeout"])
        try:
            s.connect((req["ip"], req["port"]))
        except OSError as exc:
            s.close()
            return {"result": "timeout" if isinstance(exc, TimeoutError) else name(exc.errno)}
        conns[req["id"]] = (s, req["proto"])
        out = exchange(s, req["proto"], req["timeout"])
        return {"result": out, "local": list(s.getsockname()[:2])}
    if op == "send":  # on several connections at once: {"ids": [...]}
        results = {}

        def one(cid):
            s, proto = conns[cid]
            results[cid] = exchange(s, proto, req["timeout"])

        threads = [threading.Thread(target=one, args=(cid,)) for cid in req["ids"]]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"results": results}
    if op == "recv":  # wait for data on a connection without sending any
        s, proto = conns[req["id"]]
        s.settimeout(req["timeout"])
        try:
            return {"result": "ok" if s.recv(4096) else "closed"}
        except TimeoutError:
            return {"result": "timeout"}
        except OSError as exc:
            return {"result": name(exc.errno)}
    if op == "push":  # the server speaks first, on the connection from peer (address, port)
        try:
            accepted[tuple(req["peer"])].send(b"push\n")
            return {"result": "pushed"}
        except OSError as exc:
            return {"result": name(exc.errno)}
    if op == "close":
        s, _ = conns.pop(req["id"])
        s.close()
        return {"result": "closed"}
    return {"error": f"unknown op {op}"}


threading.Thread(target=serve, args=(listening(),), daemon=True).start()
print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    try:
        out = handle(json.loads(line))
    except Exception as exc:
        out = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(out), flush=True)
"""


def pycnictl(*args: str, stdin: str | None = None, timeout: float = 180):
    """`pycnictl ARGS` as a process of its own."""
    return subprocess.run(
        [sys.executable, "-c", "from pycni.ctl.main import main; main()", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
    )


def pycnictl_here(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """`pycnictl ARGS` through its entry point (pycni.ctl.main.main: the same parsing and
    code) in this process, with stdin, stdout and stderr of its own: a change costs no
    interpreter start (a quarter of a second here, a hundred times per lab)."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.stdin
    sys.stdin = io.StringIO(stdin or "")
    code: int | str | None = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
            except SystemExit as exc:
                code = exc.code
    finally:
        sys.stdin = saved
    returncode = code if isinstance(code, int) else (0 if code is None else 1)
    return subprocess.CompletedProcess(
        ["pycnictl", *args], returncode, out.getvalue(), err.getvalue()
    )


class Helper:
    """The server-and-prober process of one pod."""

    def __init__(self, key: str, netns: str) -> None:
        self.key, self.netns = key, netns
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", netns, sys.executable, "-I", "-S", "-c", HELPER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self._buf = b""
        ready = self.receive(15.0)
        if "ready" not in ready:
            raise RuntimeError(f"the helper in {key} ({netns}) did not start: {ready}")

    def send(self, request: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(request) + "\n").encode())
        self.proc.stdin.flush()

    def receive(self, timeout: float) -> dict:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([fd], [], [], max(0.0, left))
            if not ready:
                raise RuntimeError(f"the helper in {self.key} did not answer in {timeout} s")
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"the helper in {self.key} died: {err[-500:]}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def call(self, request: dict, timeout: float = 30.0) -> dict:
        self.send(request)
        return self.receive(timeout)

    def close(self) -> None:
        """Kill it; never raises (a dead helper's stdin may hold a request it never read,
        and closing it would fail on the broken pipe)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass


# A probe: (source pod, destination pod, protocol, port, family).
Key = tuple[str, str, str, int, int]


@dataclass
class Outcome:
    """One measured matrix against the evaluator's."""

    expected: dict[Key, bool]
    measured: dict[Key, str]
    retried: int = 0

    @property
    def mismatched(self) -> list[Key]:
        return [k for k, want in self.expected.items() if not _agrees(want, self.measured[k])]

    @property
    def probes(self) -> int:
        return len(self.expected)

    @property
    def matched(self) -> int:
        return self.probes - len(self.mismatched)


def _agrees(allowed: bool, outcome: str) -> bool:
    """An allowed probe must be answered; a denied one must meet silence (pycni drops)."""
    return outcome == "ok" if allowed else outcome == "timeout"


@dataclass
class Stats:
    cases: int = 0
    steps: int = 0
    probes: int = 0
    allowed: int = 0  # of the probes, those the evaluator allows
    matched: int = 0
    retried: int = 0
    seconds: float = 0.0
    waits: list[float] = field(default_factory=list)

    def add(self, outcome: Outcome) -> None:
        self.steps += 1
        self.probes += outcome.probes
        self.allowed += sum(outcome.expected.values())
        self.matched += outcome.matched
        self.retried += outcome.retried


class NetpolLab:
    """A lab of `nodes` nodes without pods of its own, driven through pycnictl."""

    def __init__(self, prefix: str, state: str, backend: str = "vxlan", ipv6: bool = False):
        self.prefix, self.state = prefix, state
        self.backend, self.ipv6 = backend, ipv6
        # Where the objects live: the lab's sqlite file, or its etcd (PYCNI_NETPOL_DATASTORE).
        self.datastore = os.environ.get("PYCNI_NETPOL_DATASTORE", "sqlite")
        self.opts = ("--prefix", prefix, "--state-dir", state)
        self.helpers: dict[str, Helper] = {}
        self.stats = Stats()

    @property
    def families(self) -> tuple[int, ...]:
        return (4, 6) if self.ipv6 else (4,)

    # --- life cycle -------------------------------------------------------------------------

    def up(self, nodes: int = 2) -> None:
        args = ["lab", "up", "--nodes", str(nodes), "--pods", "0", "--backend", self.backend]
        args += ["--datastore", self.datastore]
        # PYCNI_NETPOL_FAST_PATH=off: the same tables with the nodes' eBPF fast path off.
        if os.environ.get("PYCNI_NETPOL_FAST_PATH", "on") == "off":
            args.append("--no-fast-path")
        got = pycnictl(*args, *(["--ipv6"] if self.ipv6 else []), *self.opts)
        assert got.returncode == 0, got.stdout + got.stderr

    def down(self) -> list[str]:
        """Helpers killed, the lab taken down; what was left behind (and is now removed)."""
        try:
            for helper in self.helpers.values():
                helper.close()
        finally:  # the lab goes down whatever happened to the helpers
            self.helpers.clear()
            got = pycnictl("lab", "down", *self.opts)
        left = [] if got.returncode == 0 else [f"lab down: {got.stdout}{got.stderr}"]
        for ns in self.namespaces():  # only if down itself is broken
            left.append(ns)
            sh("ip", "netns", "del", ns, check=False)
        if os.path.exists(self.state):
            left.append(self.state)
        return left

    def namespaces(self) -> list[str]:
        out = sh("ip", "netns", "list").stdout
        return [ln.split()[0] for ln in out.splitlines() if ln.startswith(self.prefix + "-")]

    def lab(self) -> Lab:
        lab = Lab.load(self.state)
        assert lab is not None, f"no lab in {self.state}"
        return lab

    # --- objects ----------------------------------------------------------------------------

    def apply(self, objects: Iterable[dict]) -> list[str]:
        """`pycnictl lab apply -f -` of the objects; kubectl's lines."""
        items = list(objects)
        if not items:
            return []
        doc = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        got = pycnictl_here("lab", "apply", "-f", "-", *self.opts, stdin=doc)
        assert got.returncode == 0, got.stdout + got.stderr
        return got.stdout.splitlines()

    def delete(self, objects: Iterable[dict]) -> list[str]:
        items = list(objects)
        if not items:
            return []
        doc = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        got = pycnictl_here("lab", "delete", "-f", "-", *self.opts, stdin=doc)
        assert got.returncode == 0, got.stdout + got.stderr
        return got.stdout.splitlines()

    def snapshot(self) -> Objects:
        with lab_objects(self.lab()) as store:
            return store.snapshot()

    def get_pods(self) -> dict[str, dict]:
        """`pycnictl lab get pods --json`, by namespace/name."""
        got = pycnictl_here("lab", "get", "pods", "--json", *self.opts)
        assert got.returncode == 0, got.stderr
        return {f"{p['namespace']}/{p['name']}": p for p in json.loads(got.stdout)}

    # --- enforcement ------------------------------------------------------------------------

    def wanted_digests(self, snap: Objects | None = None) -> dict[str, str]:
        """Per node, the digest of the NetworkPolicy rules the stored objects compile to there
        (as the agent compiles them: its own pods with their IPAM addresses, which the lab
        stores as their podIPs); "" where no policy exists."""
        snap = snap or self.snapshot()
        lab = self.lab()
        out = {}
        for node in lab.nodes:
            local = {(p.namespace, p.k8s_name): p.ips for p in node.pods}
            pods = with_local_addresses(snap.pods, local, node.name)
            inventory = load(snap.namespaces, pods, snap.policies)
            rendered = policy_rules.render(compile_inventory(node.name, inventory))
            out[node.name] = PolicyFragment(rendered.statements).digest
        return out

    def installed_digests(self) -> dict[str, str]:
        """Per node, the digest in its kernel's `policy_digest` chain ("" when none)."""
        out = {}
        for node in self.lab().nodes:
            got = sh(
                "ip",
                "netns",
                "exec",
                node.netns,
                "nft",
                "-j",
                "list",
                "chain",
                "inet",
                "pycni",
                "policy_digest",
                check=False,
            )
            digest = ""
            if got.returncode == 0:
                for item in json.loads(got.stdout)["nftables"]:
                    digest = item.get("rule", {}).get("comment", digest)
            out[node.name] = digest
        return out

    def agent_digests(self) -> dict[str, str]:
        """Per node, the digest its agent reports for its last finished pass: the agent
        reports a pass once it has installed the rules and cut the connections they deny."""
        out = {}
        for node in self.lab().nodes:
            health = agent_health(node.agent_socket).get("health") or {}
            out[node.name] = (health.get("policy") or {}).get("digest", "?")
        return out

    def wait_enforced(self, bound: float = ENFORCE_BOUND) -> float:
        """Until every node's kernel holds the rules the stored objects compile to and its
        agent has finished the pass that installed them (conntrack cut included); seconds
        waited. Fails after `bound` seconds, saying which node lags and what its agent says."""
        started = time.monotonic()
        want = self.wanted_digests()
        while True:
            kernel = self.installed_digests()
            agents = self.agent_digests() if kernel == want else {}
            if agents == want:
                waited = time.monotonic() - started
                self.stats.waits.append(waited)
                return waited
            if time.monotonic() - started > bound:
                agents = self.agent_digests()
                lines = [f"the agents did not enforce the objects within {bound:.0f} s:"]
                for node in self.lab().nodes:
                    name = node.name
                    if kernel[name] == agents[name] == want[name]:
                        continue
                    health = agent_health(node.agent_socket).get("health") or {}
                    lines.append(
                        f"  {name}: wanted {want[name] or '(none)'}, kernel "
                        f"{kernel[name] or '(none)'}, agent {agents[name] or '(none)'}: "
                        f"{health.get('policy')}"
                    )
                    with open(node.agent_log, errors="replace") as f:
                        lines += ["    " + ln.rstrip() for ln in f.readlines()[-10:]]
                raise AssertionError("\n".join(lines))
            time.sleep(0.02)

    # --- measuring --------------------------------------------------------------------------

    def sync_helpers(self, pods: dict[str, dict]) -> None:
        """A helper in every pod (the new ones too); none for pods that are gone."""
        for key in list(self.helpers):
            helper = self.helpers[key]
            # A pod deleted and made anew may get the same netns name; its helper died with
            # the old namespace (the lab kills what runs in a namespace it removes).
            gone = key not in pods or pods[key]["netns"] != helper.netns
            if gone or helper.proc.poll() is not None:
                self.helpers.pop(key).close()
        for key, pod in sorted(pods.items()):
            if key not in self.helpers:
                self.helpers[key] = Helper(key, pod["netns"])

    def forget_neighbours(self, pods: dict[str, dict]) -> None:
        """Every pod's neighbour cache flushed: each measurement resolves its neighbours anew
        (ARP, IPv6 neighbour discovery) under the policies, as a new pod would, instead of
        riding on what an earlier case resolved."""
        for pod in pods.values():
            sh("ip", "-n", pod["netns"], "neigh", "flush", "all")

    def measure(
        self, pods: dict[str, dict], keys: Iterable[Key], timeout: float = PROBE_TIMEOUT
    ) -> dict[Key, str]:
        """Probe `keys`, every source's at once, all sources at once."""
        by_source: dict[str, list[Key]] = {}
        for k in keys:
            by_source.setdefault(k[0], []).append(k)
        ids: dict[str, dict[str, Key]] = {}
        for src, mine in by_source.items():
            ids[src] = {f"{i}": k for i, k in enumerate(mine)}
            targets = [[tid, address(pods[k[1]], k[4]), k[2], k[3]] for tid, k in ids[src].items()]
            self.helpers[src].send({"op": "probe", "timeout": timeout, "targets": targets})
        out: dict[Key, str] = {}
        for src in by_source:
            answer = self.helpers[src].receive(timeout + 30)
            assert "results" in answer, answer
            for tid, result in answer["results"].items():
                out[ids[src][tid]] = result
        return out

    def expected(self, snap: Objects, pods: dict[str, dict]) -> dict[Key, bool]:
        """The evaluator's matrix over the stored objects, for every pod the lab has."""
        inventory = load(snap.namespaces, snap.pods, snap.policies)
        assert not inventory.problems, [str(p) for p in inventory.problems]
        evaluator = Evaluator(inventory)
        stored = {p.key: p for p in inventory.pods}
        assert sorted(stored) == sorted(pods), (sorted(stored), sorted(pods))
        for key, pod in pods.items():  # what the lab reports is what is stored
            assert sorted(stored[key].ips) == sorted(pod["ips"]), (key, stored[key], pod)
        return {
            (s, d, proto, port, family): evaluator.allowed(
                stored[s], stored[d], proto.upper(), port, family
            )
            for s in sorted(pods)
            for d in sorted(pods)
            for proto in PROTOCOLS
            for port in PORTS
            for family in self.families
        }

    def check(self) -> Outcome:
        """Wait for enforcement, then measure the full matrix and hold it against the
        evaluator's; probes that should have been answered and were not are tried again."""
        self.wait_enforced()
        snap = self.snapshot()
        pods = self.get_pods()
        self.sync_helpers(pods)
        self.forget_neighbours(pods)
        expected = self.expected(snap, pods)
        measured = self.measure(pods, expected)
        retried = 0
        for _ in range(RETRIES):
            again = [k for k, ok in expected.items() if ok and measured[k] != "ok"]
            if not again:
                break
            retried += len(again)
            measured.update(self.measure(pods, again, RETRY_TIMEOUT))
        outcome = Outcome(expected, measured, retried)
        self.stats.add(outcome)
        return outcome


def address(pod: dict, family: int) -> str:
    return next(ip for ip in pod["ips"] if (":" in ip) == (family == 6))


# --- upstream-style truth tables ----------------------------------------------------------


def truth_table(
    names: list[str], cell, title: str = "", width: int = 4
) -> str:  # cell(src, dst) -> str
    lines = [title] if title else []
    lines.append(" " * width + "".join(f"{n:>{width}}" for n in names))
    for s in names:
        lines.append(f"{s:>{width}}" + "".join(f"{cell(s, d):>{width}}" for d in names))
    return "\n".join(lines)


def report(outcome: Outcome, families: Iterable[int]) -> str:
    """For each (family, protocol, port) with a mismatch: the evaluator's table, the measured
    one, and the comparison ('.' agrees; '+' got through though denied; '-' denied though
    allowed; '?' any other outcome), with each mismatched probe's outcome."""
    names = sorted({k[0] for k in outcome.expected})
    out = []
    bad = set(outcome.mismatched)
    for family in families:
        for proto in PROTOCOLS:
            for port in PORTS:
                keys = {
                    (s, d): (s, d, proto, port, family)
                    for s in names
                    for d in names
                    if (s, d, proto, port, family) in outcome.expected
                }
                if not bad & set(keys.values()):
                    continue
                head = f"IPv{family} {proto.upper()} {port}"

                def exp(s, d, keys=keys):
                    return "." if outcome.expected[keys[s, d]] else "X"

                def got(s, d, keys=keys):
                    return {"ok": ".", "timeout": "X"}.get(outcome.measured[keys[s, d]], "?")

                def cmp(s, d, keys=keys):
                    k = keys[s, d]
                    if k not in bad:
                        return "."
                    m = outcome.measured[k]
                    if m == "ok":
                        return "+"
                    return "-" if m == "timeout" else "?"

                out.append(truth_table(names, exp, f"{head}: expected (the evaluator)"))
                out.append(truth_table(names, got, f"{head}: measured"))
                out.append(truth_table(names, cmp, f"{head}: comparison"))
    for k in sorted(bad):
        want = "allowed" if outcome.expected[k] else "denied"
        out.append(
            f"  {k[0]} -> {k[1]} {k[2].upper()}/{k[3]} IPv{k[4]}: {want}, measured "
            f"{outcome.measured[k]}"
        )
    return "\n".join(out)


def sub_matrix(outcome: Outcome, proto: str, port: int, family: int) -> dict[tuple, bool]:
    """The measured (source, destination) -> answered table of one protocol, port, family."""
    return {
        (k[0], k[1]): outcome.measured[k] == "ok"
        for k in outcome.measured
        if k[2:] == (proto, port, family)
    }
