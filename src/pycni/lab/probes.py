"""Measuring the lab: every path of the connectivity matrix by ICMP and TCP, with the source
address each target saw (so masquerade, or its absence, is visible), each judged against what
the lab's NetworkPolicies allow (lab/verdicts.py): a path they deny that was indeed closed is an
expected denial, not a failure."""

from __future__ import annotations

import ipaddress
import json
import re
import subprocess
import sys
import threading
from dataclasses import dataclass

from .build import run as _run
from .model import PROBE_PORT, Lab, LabError
from .verdicts import Policies, Verdict

_PROBE_TIMEOUT = 1.5

# One TCP server per target namespace: answers each connection with the peer address it saw.
_SERVER = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET6)  # dual stack: IPv4 peers appear as ::ffff:a.b.c.d
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", int(sys.argv[2])))
s.listen(64)
print(s.getsockname()[1], flush=True)
deadline = time.monotonic() + float(sys.argv[1])
while time.monotonic() < deadline:
    s.settimeout(max(0.1, deadline - time.monotonic()))
    try:
        c, addr = s.accept()
    except OSError:
        continue
    try:
        peer = addr[0][7:] if addr[0].startswith("::ffff:") else addr[0]
        c.sendall((peer + "\n").encode())
    except OSError:
        pass
    c.close()
"""

# One client per source namespace: connect to each target, time the handshake, read the reply.
_CLIENT = r"""
import json, socket, sys, time
timeout = float(sys.argv[1])
for target in sys.argv[2:]:
    key, host, port = target.split(",")
    out = {"key": key, "ok": False, "rtt": None, "peer": "", "error": ""}
    try:
        t0 = time.perf_counter()
        c = socket.create_connection((host, int(port)), timeout=timeout)
        out["rtt"] = (time.perf_counter() - t0) * 1000
        c.settimeout(4 * timeout)  # the reply may wait for a busy server process
        data = b""
        while not data.endswith(b"\n"):
            chunk = c.recv(64)
            if not chunk:
                break
            data += chunk
        c.close()
        out["peer"] = data.decode().strip()
        out["ok"] = bool(out["peer"])
    except OSError as exc:
        out["error"] = str(exc) or type(exc).__name__
    print(json.dumps(out), flush=True)
"""

_PING_RTT = re.compile(r"time[=<]([\d.]+) ms")


@dataclass
class Probe:
    kind: str
    src_label: str
    src_netns: str
    dst_label: str
    dst_netns: str
    dst_ip: str
    expect: tuple[str, ...]  # the source addresses the target may see
    dst_port: int = PROBE_PORT  # the TCP port probed (the target's probe server)
    allowed: bool = True  # the NetworkPolicies allow this path (the reference evaluator)
    icmp_judged: bool = True  # False where a policy governs the path: ICMP is shown only
    icmp_ok: bool = False
    icmp_rtt: float | None = None
    tcp_ok: bool = False
    tcp_rtt: float | None = None
    peer: str = ""
    error: str = ""
    retried: bool = False

    @property
    def verdict(self) -> str:
        """ "ok" (reachable, as allowed), "denied" (closed, as the policies say) or "failed"."""
        if not self.allowed:
            return "failed" if self.tcp_ok else "denied"
        icmp = self.icmp_ok or not self.icmp_judged
        return "ok" if icmp and self.tcp_ok and self.peer in self.expect else "failed"

    @property
    def ok(self) -> bool:
        return self.verdict == "ok"

    @property
    def failed(self) -> bool:
        return self.verdict == "failed"

    def judge(self, verdict: Verdict) -> Probe:
        self.allowed, self.icmp_judged = verdict.allowed, not verdict.governed
        return self


def plan_probes(lab: Lab, policies: Policies | None = None) -> list[Probe]:
    """The connectivity matrix: pod-pod on one node and across nodes, node-pod (every node to
    every pod), and pod-outside; over IPv6 too in a dual-stack lab. Pods keep their address
    towards pods; towards the outside they are masqueraded behind their node's address.
    Each probe knows its port and what `policies` (none: everything allowed) say of it."""
    policies = policies or Policies(lab)
    probes = _plan(lab, 4, policies)
    if lab.ipv6:
        probes += _plan(lab, 6, policies)
    return probes


def _plan(lab: Lab, family: int, policies: Policies) -> list[Probe]:
    v6 = family == 6
    tag = "6" if v6 else ""

    def ip(pod) -> str:
        return pod.ip6 if v6 else pod.ip

    probes: list[Probe] = []
    pods = [(node, pod) for node in lab.nodes for pod in node.pods]
    for na, a in pods:
        for nb, b in pods:
            if a is not b:
                kind = "pod->pod" + tag + ("" if na is nb else " x-node")
                probe = Probe(
                    kind,
                    a.label,
                    a.netns,
                    b.label,
                    b.netns,
                    ip(b),
                    expect=(ip(a),),
                    dst_port=policies.port(nb, b),
                )
                probes.append(probe.judge(policies.pod_to_pod(na, a, nb, b, family)))
    for node in lab.nodes:
        # A node reaches its own pods from the bridge's gateway address; other nodes' pods
        # from its underlay address (host-gw) or its VTEP's address (vxlan): never NATed.
        subnet = ipaddress.ip_network(node.subnet6 if v6 else node.subnet)
        gateway = node.gateway6 if v6 else node.gateway
        own = (gateway, node.lan6_ip if v6 else node.lan_ip, str(subnet.network_address))
        for nb, b in pods:
            probe = Probe(
                "node->pod" + tag,
                node.name,
                node.netns,
                b.label,
                b.netns,
                ip(b),
                expect=(gateway,) if nb is node else own,
                dst_port=policies.port(nb, b),
            )
            probes.append(probe.judge(policies.node_to_pod(node, nb, b, family)))
    for node, a in pods:
        outside = lab.outside_ip6 if v6 else lab.outside_ip
        probe = Probe(
            "pod->outside" + tag,
            a.label,
            a.netns,
            "outside",
            lab.outside,
            outside,
            expect=(node.lan6_ip if v6 else node.lan_ip,),
        )
        probes.append(probe.judge(policies.pod_to_address(node, a, outside, family)))
    return probes


def _ping(netns: str, ip: str) -> tuple[bool, float | None]:
    proc = _run("ip", "netns", "exec", netns, "ping", "-n", "-q", "-c1", "-W1", ip, check=False)
    if proc.returncode != 0:
        return False, None
    # -q prints "rtt min/avg/max/mdev = a/b/c/d ms"; without -q, "time=x ms".
    m = re.search(r"= ([\d.]+)/", proc.stdout) or _PING_RTT.search(proc.stdout)
    return True, float(m.group(1)) if m else None


def _tcp(src: str, probes: list[Probe]) -> None:
    """TCP probes from one source namespace, all through one client process."""
    if not probes:
        return
    targets = [f"{i},{p.dst_ip},{p.dst_port}" for i, p in enumerate(probes)]
    try:
        proc = _run(
            "ip",
            "netns",
            "exec",
            src,
            sys.executable,
            "-I",
            "-S",
            "-c",
            _CLIENT,
            str(_PROBE_TIMEOUT),
            *targets,
            check=False,
            timeout=_PROBE_TIMEOUT * 5 * len(probes) + 10,
        )
    except subprocess.TimeoutExpired:
        for p in probes:
            p.error = "client timed out"
        return
    for line in proc.stdout.splitlines():
        out = json.loads(line)
        p = probes[int(out["key"])]
        p.tcp_ok, p.tcp_rtt, p.peer, p.error = out["ok"], out["rtt"], out["peer"], out["error"]
    if not proc.stdout.strip():
        for p in probes:
            p.error = f"client failed: {proc.stderr.strip()[-200:]}"


class Servers:
    """TCP servers in the target namespaces, each on its port ({netns: port}), stopped (and
    waited for) on exit."""

    def __init__(self, ports: dict[str, int], lifetime: float = 60.0) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.ports: dict[str, int] = {}
        self.namespaces = ports
        self.lifetime = lifetime

    def __enter__(self) -> Servers:
        try:
            for ns, port in self.namespaces.items():
                self.procs[ns] = subprocess.Popen(
                    [
                        "ip",
                        "netns",
                        "exec",
                        ns,
                        sys.executable,
                        "-I",
                        "-S",
                        "-c",
                        _SERVER,
                        str(self.lifetime),
                        str(port),
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            for ns, proc in self.procs.items():
                line = proc.stdout.readline().strip()
                if not line.isdigit():
                    raise LabError(f"TCP server in {ns} did not start: {proc.stderr.read()}")
                self.ports[ns] = int(line)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            proc.wait(timeout=10)
            proc.stdout.close()
            proc.stderr.close()


def measure(lab: Lab, policies: Policies | None = None) -> list[Probe]:
    """Measure every path of plan_probes(lab, policies)."""
    probes = plan_probes(lab, policies)
    by_source: dict[str, list[Probe]] = {}
    for p in probes:
        by_source.setdefault(p.src_netns, []).append(p)
    ports: dict[str, int] = {}
    for p in probes:
        if ports.setdefault(p.dst_netns, p.dst_port) != p.dst_port:
            raise LabError(f"{p.dst_netns} probed on ports {ports[p.dst_netns]} and {p.dst_port}")
    with Servers(dict(sorted(ports.items()))):

        def run_source(src: str, mine: list[Probe]) -> None:
            # Pings one after the other from each source, so RTTs are not skewed by each other.
            # A failed probe is tried once more (and marked so): one lost packet on a loaded
            # machine is noise, a path that fails twice is broken. Only what is expected to
            # pass is tried again: a closed path the policies deny is the expected answer.
            for p in mine:
                p.icmp_ok, p.icmp_rtt = _ping(src, p.dst_ip)
                if not p.icmp_ok and p.allowed and p.icmp_judged:
                    p.retried = True
                    p.icmp_ok, p.icmp_rtt = _ping(src, p.dst_ip)
            _tcp(src, mine)
            again = [p for p in mine if not p.tcp_ok and p.allowed]
            for p in again:
                p.retried = True
            _tcp(src, again)

        threads = [
            threading.Thread(target=run_source, args=(src, mine)) for src, mine in by_source.items()
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return probes


def print_table(probes: list[Probe]) -> None:
    governed = any(not p.allowed or not p.icmp_judged for p in probes)
    print(
        "connectivity, measured (ICMP: ping -c1 -W1; TCP: connect time, and the source "
        f"address the server saw; TCP port {PROBE_PORT} unless shown)"
        + (", judged against the NetworkPolicies:" if governed else ":")
    )
    rows = [("PATH", "FROM", "TO", "ICMP", "ms", "TCP", "ms", "SEEN AS", "")]

    def ms(v: float | None) -> str:
        return f"{v:.3f}" if v is not None else "-"

    for p in probes:
        note = ""
        if not p.allowed:
            note = "got through, but the policies deny it" if p.tcp_ok else "denied by policy"
        elif p.tcp_ok and p.peer not in p.expect:
            note = f"WRONG (expected {' or '.join(p.expect)})"
        elif p.kind.startswith("pod->outside") and p.tcp_ok:
            note = "masqueraded"
        elif p.kind.startswith("pod->pod") and p.tcp_ok:
            note = "pod address kept"
        elif not p.tcp_ok and p.error:
            note = p.error
        if p.retried:
            note = f"{note}, on a 2nd try" if note else "on a 2nd try"
        if p.icmp_judged:
            icmp = "OK" if p.icmp_ok else "FAIL"
        else:
            icmp = "ok" if p.icmp_ok else "no"
        if p.allowed:
            tcp = "OK" if p.tcp_ok else "FAIL"
        else:
            tcp = "FAIL" if p.tcp_ok else "DENIED"
        port = "" if p.dst_port == PROBE_PORT else f":{p.dst_port}"
        rows.append(
            (
                p.kind,
                p.src_label,
                f"{p.dst_label} {p.dst_ip}{port}",
                icmp,
                ms(p.icmp_rtt),
                tcp,
                ms(p.tcp_rtt),
                p.peer or "-",
                note,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {4, 6}
    for r in rows:
        cells = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        print("  " + "  ".join(cells).rstrip())
    if any(not p.icmp_judged for p in probes):
        print(
            "  (ICMP in lower case, ok or no: a policy governs the path, and NetworkPolicy speaks "
            "of TCP, UDP and SCTP only; shown, not judged)"
        )


def summary(probes: list[Probe]) -> str:
    """One line: all OK, all as expected (with the denials), or how many failed."""
    if not probes:
        return "no paths measured: the lab has no pods"
    failed = sum(p.failed for p in probes)
    denied = sum(p.verdict == "denied" for p in probes)
    if failed:
        return f"{failed} of {len(probes)} paths FAILED"
    if denied:
        return (
            f"all {len(probes)} paths as expected: {len(probes) - denied} OK, "
            f"{denied} denied by policy"
        )
    return f"all {len(probes)} paths OK"


def as_json(probes: list[Probe]) -> list[dict]:
    """The matrix for programs (`lab probe --json`): one entry per path."""
    return [
        {
            "kind": p.kind,
            "from": p.src_label,
            "to": p.dst_label,
            "ip": p.dst_ip,
            "port": p.dst_port,
            "icmp": p.icmp_ok,
            "icmpJudged": p.icmp_judged,
            "tcp": p.tcp_ok,
            "seenAs": p.peer,
            "expected": "allow" if p.allowed else "deny",
            "verdict": p.verdict,
            "error": p.error,
        }
        for p in probes
    ]
