"""`pycnictl bench reconcile`: the backends alone, reconcile_once with many peers (no agent, no
datastore; `bench convergence` measures the whole loop).

Per mode (host-gw, vxlan) and repetition, a fresh pair of namespaces: a "node" whose eth0
(172.20.0.1/16) is a veth to a "wire" namespace. N fake peers with addresses on that prefix
(and random VTEP MACs) are handed to reconcile_once, which is timed three times: from empty to
converged (VTEP creation included), a second run that must change nothing, and the removal of
all N. Routes and FDB entries only: no packet is ever sent to the fake peers. Each phase is
checked (counts, no errors) and the namespaces are removed whatever happens. Needs root.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import statistics
import subprocess
import sys
import time

from ..cluster.model import NodeRecord
from .common import run_and_print

UNDERLAY = ipaddress.ip_network("172.20.0.0/16")
PODS = ipaddress.ip_network("10.244.0.0/16")
PHASES = ("converge", "noop", "remove")


def fake_nodes(count: int) -> tuple[NodeRecord, list[NodeRecord]]:
    """The local node and `count` peers on its underlay prefix, one /24 each, random MACs."""
    subnets = PODS.subnets(new_prefix=24)
    local = NodeRecord("bench-local", (str(UNDERLAY[1]),), (next(subnets),))
    peers = [
        NodeRecord(f"bench-{i}", (str(UNDERLAY[i + 2]),), (next(subnets),), _mac())
        for i in range(count)
    ]
    return local, peers


def _mac() -> str:
    b = bytearray(secrets.token_bytes(6))
    b[0] = (b[0] & 0xFC) | 0x02
    return ":".join(f"{x:02x}" for x in b)


def _ip(*argv: str, stdin: str | None = None) -> None:
    subprocess.run(["ip", *argv], input=stdin, text=True, check=True, capture_output=True)


def run_once(mode: str, count: int, tag: str) -> dict[str, float]:
    """One converge / noop / remove cycle in fresh namespaces; milliseconds per phase."""
    # Imported here: pyroute2 costs every other pycnictl command ~80 ms at start-up.
    from ..backends import reconcile_once
    from ..dataplane.netns import netlink_in, netns_fd

    node, wire = f"pycni-bbe-{tag}-n", f"pycni-bbe-{tag}-w"
    made: list[str] = []
    try:
        for ns in (node, wire):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip(
            "-n",
            node,
            "-batch",
            "-",
            stdin=(
                f"link set lo up\nlink add eth0 type veth peer name eth0 netns {wire}\n"
                f"link set eth0 up\naddr add {UNDERLAY[1]}/{UNDERLAY.prefixlen} dev eth0\n"
            ),
        )
        _ip("-n", wire, "link", "set", "eth0", "up")
        local, peers = fake_nodes(count)
        per_peer = 1 if mode == "host-gw" else 3  # route (+ neighbour + FDB entry)
        vtep = 0 if mode == "host-gw" else 1
        with netns_fd(f"/run/netns/{node}") as fd:
            ipr = netlink_in(fd)
        try:
            out = {}
            for phase, nodes, want in (
                ("converge", [local, *peers], (count * per_peer + vtep, 0, 0)),
                ("noop", [local, *peers], (0, 0, 0)),
                ("remove", [local], (0, 0, count * per_peer)),
            ):
                start = time.perf_counter()
                changes = reconcile_once(ipr, local, nodes, mode, "eth0")
                out[phase] = (time.perf_counter() - start) * 1000
                got = (changes.added, changes.replaced, changes.removed)
                if changes.errors or got != want:
                    raise RuntimeError(
                        f"{mode} {phase}: want {want} got {got}, errors {changes.errors[:3]}"
                    )
            return out
        finally:
            ipr.close()
    finally:
        for ns in reversed(made):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def bench(count: int = 100, repeat: int = 3, modes: tuple[str, ...] = ("host-gw", "vxlan")) -> dict:
    """{mode: {phase: median ms}} over `repeat` fresh runs, plus the run's parameters."""
    report: dict = {"nodes": count, "repeat": repeat}
    for mode in modes:
        runs = [run_once(mode, count, f"{os.getpid()}-{i}") for i in range(repeat)]
        report[mode] = {p: round(statistics.median(r[p] for r in runs), 2) for p in PHASES}
    return report


def format_report(report: dict) -> str:
    lines = [
        f"reconcile_once with {report['nodes']} peers (median of {report['repeat']}, ms)",
        f"{'mode':<10}" + "".join(f"{p:>10}" for p in PHASES),
    ]
    for mode in ("host-gw", "vxlan"):
        if mode in report:
            lines.append(f"{mode:<10}" + "".join(f"{report[mode][p]:>10.1f}" for p in PHASES))
    return "\n".join(lines)


def run(args) -> int:
    if os.geteuid() != 0:
        print("pycnictl bench reconcile: needs root (network namespaces)", file=sys.stderr)
        return 2
    if not 1 <= args.nodes <= 250 or args.repeat < 1:
        print("pycnictl bench reconcile: --nodes 1..250, --repeat at least 1", file=sys.stderr)
        return 2
    return run_and_print(
        "pycnictl bench reconcile",
        lambda progress: {**bench(args.nodes, args.repeat), "ok": True},
        format_report,
        args,
        (RuntimeError, subprocess.CalledProcessError),
        "namespaces removed",
    )
