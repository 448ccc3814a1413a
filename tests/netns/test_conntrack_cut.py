"""The conntrack table read by hand (dataplane/conntrack.py) against `conntrack -L`, and the
policy controller cutting exactly the tracked connections the new rules deny, in a throwaway
network namespace whose entries `conntrack -I` made (no traffic needed)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("conntrack") is None, reason="needs conntrack-tools"),
]

# (source, destination, protocol, source port, destination port)
ENTRIES = [
    ("10.0.1.2", "10.0.1.1", "tcp", 40001, 80),  # client -> web:80, allowed
    ("10.0.1.2", "10.0.1.1", "tcp", 40002, 22),  # client -> web:22, denied: cut
    ("10.0.1.9", "10.0.1.1", "tcp", 40003, 80),  # stranger -> web:80, denied: cut
    ("10.0.1.9", "10.0.1.2", "udp", 5353, 53),  # to a pod no policy isolates: kept
    ("fd00::2", "fd00::1", "udp", 5353, 53),  # IPv6, no isolated pod: kept
]

_SCENARIO = r"""
import json
from pycni.agent.policy import cut_denied_connections
from pycni.dataplane.conntrack import Conntrack
from pycni.policy import compile_node

namespaces = [{"kind": "Namespace", "metadata": {"name": "x"}}]
pods = [
    {"kind": "Pod", "metadata": {"name": n, "namespace": "x", "labels": {"app": n}},
     "spec": {"nodeName": "n1"}, "status": {"podIP": ip, "podIPs": [{"ip": ip}]}}
    for n, ip in (("web", "10.0.1.1"), ("client", "10.0.1.2"), ("stranger", "10.0.1.9"))
]
policy = {
    "kind": "NetworkPolicy",
    "metadata": {"name": "web", "namespace": "x"},
    "spec": {
        "podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}],
                     "ports": [{"port": 80}]}],
    },
}
with Conntrack() as ct:
    before = [[f.orig.src, f.orig.dst, f.orig.proto, f.orig.sport, f.orig.dport, f.reply.src,
               f.reply.sport] for f in ct.entries()]
cut = cut_denied_connections(compile_node("n1", namespaces, pods, [policy]))
with Conntrack() as ct:
    after = [[f.orig.src, f.orig.dport] for f in ct.entries()]
print(json.dumps({"before": before, "cut": cut, "after": after}))
"""


def test_the_dump_reads_what_conntrack_lists_and_denied_ones_are_cut(netns):
    ns = netns.make("ct")
    for src, dst, proto, sport, dport in ENTRIES:
        netns.exec(
            ns,
            *("conntrack", "-I", "-s", src, "-d", dst, "-p", proto),
            *("--sport", str(sport), "--dport", str(dport), "-t", "120"),
            *(("--state", "ESTABLISHED") if proto == "tcp" else ()),
        )
    proc = netns.exec(ns, sys.executable, "-c", _SCENARIO, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    protocols = {"tcp": 6, "udp": 17}
    assert sorted(map(tuple, out["before"])) == sorted(
        (s, d, protocols[p], sp, dp, d, dp) for s, d, p, sp, dp in ENTRIES
    )
    assert out["cut"] == 2
    assert sorted(map(tuple, out["after"])) == sorted(
        [("10.0.1.2", 80), ("10.0.1.9", 53), ("fd00::2", 53)]
    )
