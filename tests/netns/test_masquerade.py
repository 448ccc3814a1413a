"""Node masquerade against the real kernel, entirely inside throwaway network namespaces.

Topology (names unique per run):

    pod (10.99.1.2/24, fd99:1::2/64)
      -- veth --
    node (10.99.1.1/24 + 192.0.2.1/24, fd99:1::1/64 + 2001:db8:2::1/64, forwarding on)
      -- veth --
    outside (192.0.2.2/24, 2001:db8:2::2/64; routes back to the pod subnets via node)

Rules are only ever applied inside "node", through ``ip netns exec``.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import source_seen
from pycni.rules import sync
from pycni.rules.model import MasqRule, RuleSet, normalize
from pycni.rules.nft import render_nft

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(
        not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root for netns"
    ),
    pytest.mark.skipif(shutil.which("ip") is None, reason="needs iproute2"),
]

SRC = str(Path(__file__).resolve().parents[2] / "src")
POD4, NODE4_IN, NODE4_OUT, OUT4 = "10.99.1.2", "10.99.1.1", "192.0.2.1", "192.0.2.2"
POD6, NODE6_IN, NODE6_OUT, OUT6 = "fd99:1::2", "fd99:1::1", "2001:db8:2::1", "2001:db8:2::2"
SUBNET4, SUBNET6 = "10.99.1.0/24", "fd99:1::/64"

_counter = itertools.count()


def sh(*argv: str, check: bool = True, stdin: str | None = None) -> str:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr}")
    return proc.stdout


class Topo:
    def __init__(self) -> None:
        base = f"pt{os.getpid()}m{next(_counter)}"
        self.pod, self.node, self.out = f"{base}p", f"{base}n", f"{base}o"
        self.created: list[str] = []

    def ns(self, ns: str, *argv: str, check: bool = True, stdin: str | None = None) -> str:
        return sh("ip", "netns", "exec", ns, *argv, check=check, stdin=stdin)

    def build(self) -> None:
        for ns in (self.pod, self.node, self.out):
            sh("ip", "netns", "add", ns)
            self.created.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        # Links are created inside the namespaces: nothing ever appears in the host's.
        sh(
            "ip",
            "-n",
            self.pod,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "vpod",
            "netns",
            self.node,
        )
        sh(
            "ip",
            "-n",
            self.out,
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "vout",
            "netns",
            self.node,
        )
        for ns, dev, addrs in (
            (self.pod, "eth0", (f"{POD4}/24", f"{POD6}/64")),
            (self.node, "vpod", (f"{NODE4_IN}/24", f"{NODE6_IN}/64")),
            (self.node, "vout", (f"{NODE4_OUT}/24", f"{NODE6_OUT}/64")),
            (self.out, "eth0", (f"{OUT4}/24", f"{OUT6}/64")),
        ):
            for addr in addrs:
                extra = ("nodad",) if ":" in addr else ()
                sh("ip", "-n", ns, "addr", "add", addr, "dev", dev, *extra)
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", self.pod, "route", "add", "default", "via", NODE4_IN)
        sh("ip", "-n", self.pod, "-6", "route", "add", "default", "via", NODE6_IN)
        sh("ip", "-n", self.out, "route", "add", SUBNET4, "via", NODE4_OUT)
        sh("ip", "-n", self.out, "-6", "route", "add", SUBNET6, "via", NODE6_OUT)
        self.ns(self.node, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        self.ns(self.node, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")

    def destroy(self) -> None:
        for ns in self.created:
            sh("ip", "netns", "del", ns, check=False)
        self.created.clear()

    # -- running pycni inside the node namespace

    def masq(self, op: str, rules=(), backend: str | None = None):
        payload = json.dumps([[str(r.source), [str(e) for e in r.exclude]] for r in rules])
        env = {k: v for k, v in os.environ.items() if k != sync.ENV_BACKEND}
        env["PYTHONPATH"] = SRC
        proc = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.node,
                sys.executable,
                "-c",
                _SNIPPET,
                op,
                payload,
                backend or "",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        if proc.returncode != 0:
            raise AssertionError(f"masq {op} failed: {proc.stderr}")
        return json.loads(proc.stdout)

    # -- observing traffic

    def peer_seen(self, dst: str) -> str:
        """Open a TCP connection pod -> dst (in outside); return the source outside saw."""
        peer = source_seen(self.out, self.pod, dst)
        assert peer, f"no connection to {dst}"
        return peer

    def nft_table(self) -> str:
        return self.ns(self.node, "nft", "list", "table", "inet", "pycni")

    def has_nft_table(self) -> bool:
        return "pycni" in self.ns(self.node, "nft", "list", "tables")

    def ipt_nat(self, family: int = 4) -> str:
        tool = "iptables" if family == 4 else "ip6tables"
        return self.ns(self.node, tool, "-w", "-t", "nat", "-S")


_SNIPPET = """
import json, sys
from pycni.rules import sync
from pycni.rules.model import MasqRule, RuleSet
op, payload, backend = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3] or None
rules = RuleSet(tuple(MasqRule(s, tuple(e)) for s, e in payload))
if op == "apply":
    out = sync.apply(rules, backend)
elif op == "remove":
    out = sync.remove_all(backend)
elif op == "installed":
    got = sync.installed(backend)
    out = None if got is None else [
        [str(r.source), [str(e) for e in r.exclude]] for r in got.masquerade
    ]
print(json.dumps(out))
"""


@pytest.fixture
def topo():
    t = Topo()
    try:
        t.build()
        yield t
    finally:
        t.destroy()


def _iptables_usable(t: Topo) -> bool:
    if shutil.which("iptables") is None or shutil.which("iptables-restore") is None:
        return False
    proc = subprocess.run(
        ["ip", "netns", "exec", t.node, "iptables", "-w", "-t", "nat", "-S"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc.returncode == 0


@pytest.fixture(params=["nft", "iptables"])
def backend(request, topo):
    if request.param == "nft" and shutil.which("nft") is None:
        pytest.skip("nft not installed")
    if request.param == "iptables" and not _iptables_usable(topo):
        pytest.skip("iptables not usable in a netns here")
    return request.param


RULE4 = MasqRule(SUBNET4, (SUBNET4,))
RULE6 = MasqRule(SUBNET6, (SUBNET6,))


def _state(t: Topo, backend: str) -> str:
    if backend == "nft":
        return t.nft_table()
    return t.ipt_nat(4) + t.ipt_nat(6)


def _jumps(t: Topo, family: int = 4) -> int:
    return t.ipt_nat(family).count("-A POSTROUTING -m comment --comment pycni -j PYCNI-MASQ")


def _clean(t: Topo, backend: str) -> bool:
    if backend == "nft":
        return not t.has_nft_table()
    return all("PYCNI-MASQ" not in t.ipt_nat(f) for f in (4, 6))


def test_baseline_without_rules_keeps_pod_source(topo):
    assert topo.peer_seen(OUT4) == POD4


def test_masquerades_v4_leaving_cluster(topo, backend):
    assert topo.masq("apply", [RULE4], backend) == backend
    assert topo.peer_seen(OUT4) == NODE4_OUT


def test_masquerades_v6_leaving_cluster(topo, backend):
    topo.masq("apply", [RULE4, RULE6], backend)
    assert topo.peer_seen(OUT6) == NODE6_OUT
    assert topo.peer_seen(OUT4) == NODE4_OUT


def test_excluded_destination_keeps_pod_source(topo, backend):
    rule = MasqRule(SUBNET4, (SUBNET4, "192.0.2.0/24"))
    rule6 = MasqRule(SUBNET6, (SUBNET6, "2001:db8:2::2/128"))
    topo.masq("apply", [rule, rule6], backend)
    assert topo.peer_seen(OUT4) == POD4
    assert topo.peer_seen(OUT6) == POD6


def test_apply_twice_is_idempotent(topo, backend):
    topo.masq("apply", [RULE4, RULE6], backend)
    first = _state(topo, backend)
    topo.masq("apply", [RULE6, RULE4], backend)
    assert _state(topo, backend) == first
    if backend == "iptables":
        assert _jumps(topo, 4) == 1
        assert _jumps(topo, 6) == 1
    assert topo.peer_seen(OUT4) == NODE4_OUT


def test_replace_with_different_rules(topo, backend):
    topo.masq("apply", [RULE4], backend)
    other = MasqRule(SUBNET4, (SUBNET4, "192.0.2.0/24"))
    topo.masq("apply", [other], backend)
    if backend == "nft":
        assert topo.ns(topo.node, "nft", "list", "tables").count("inet pycni") == 1
        table = topo.nft_table()
        assert table.count("masquerade") == 1
        assert "192.0.2.0/24" in table
    else:
        nat = topo.ipt_nat(4)
        assert nat.count("MASQUERADE") == 1
        assert "-d 192.0.2.0/24 -j RETURN" in nat
        assert _jumps(topo, 4) == 1
    assert topo.masq("installed", backend=backend) == [
        [SUBNET4, ["10.99.1.0/24", "192.0.2.0/24", "224.0.0.0/4"]]
    ]
    assert topo.peer_seen(OUT4) == POD4


def test_failed_nft_transaction_leaves_old_table(topo):
    if shutil.which("nft") is None:
        pytest.skip("nft not installed")
    topo.masq("apply", [RULE4], "nft")
    before = topo.nft_table()
    other = MasqRule(SUBNET4, (SUBNET4, "192.0.2.0/24"))
    broken = render_nft(RuleSet([other])) + "add rule inet pycni nosuchchain counter\n"
    proc = subprocess.run(
        ["ip", "netns", "exec", topo.node, "nft", "-f", "-"],
        input=broken,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert topo.nft_table() == before


def test_installed_round_trip(topo, backend):
    assert topo.masq("installed", backend=backend) is None
    rules = [RULE4, RULE6, MasqRule("10.99.2.0/24", ("10.99.0.0/16", "10.99.2.0/24"))]
    topo.masq("apply", rules, backend)
    want = [[str(r.source), [str(e) for e in r.exclude]] for r in normalize(rules)]
    assert topo.masq("installed", backend=backend) == want


def test_empty_rules_remove_everything(topo, backend):
    topo.masq("apply", [RULE4, RULE6], backend)
    assert not _clean(topo, backend)
    topo.masq("apply", [], backend)
    assert _clean(topo, backend)
    topo.masq("apply", [], backend)  # idempotent when nothing is installed
    assert _clean(topo, backend)
    assert topo.peer_seen(OUT4) == POD4


def test_remove_all_is_idempotent(topo, backend):
    topo.masq("remove", backend=backend)  # nothing installed yet
    topo.masq("apply", [RULE4, RULE6], backend)
    topo.masq("remove", backend=backend)
    assert _clean(topo, backend)
    topo.masq("remove", backend=backend)
    assert _clean(topo, backend)
    if backend == "iptables":
        assert _jumps(topo, 4) == 0 and _jumps(topo, 6) == 0


def test_remove_all_without_backend_cleans_both(topo):
    if shutil.which("nft") is None or not _iptables_usable(topo):
        pytest.skip("needs nft and iptables")
    topo.masq("apply", [RULE4], "nft")
    topo.masq("apply", [RULE4], "iptables")
    topo.masq("remove")
    assert _clean(topo, "nft") and _clean(topo, "iptables")


def test_auto_backend_prefers_nft(topo):
    if shutil.which("nft") is None:
        pytest.skip("nft not installed")
    assert topo.masq("apply", [RULE4]) == "nft"
    assert topo.has_nft_table()
