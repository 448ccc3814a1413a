"""The node's rules for a cluster (forward accepts, masquerade exceptions) against the real
kernel, driven through the core (record_cluster / sync / forget_cluster / remove) exactly as
the node agent drives it, inside namespaces made by the `netns` fixture:

    pod P (10.98.1.2/24, fd98:0:0:1::2/64)
      -- veth --
    router R (the node: 10.98.1.1 | fd98:0:0:1::1 towards P; towards O: 10.98.2.1 another pod
              subnet of the cluster, 192.168.77.1 the node network, 203.0.113.1 outside;
              fd98:0:0:2::1, fd77::1, 2001:db8:113::1; forwarding on)
      -- veth --
    O (10.98.2.2, 192.168.77.2, 203.0.113.2; fd98:0:0:2::2, fd77::2, 2001:db8:113::2;
       routes back to the pod subnet via R)

nft and iptables only ever run inside R.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import source_seen
from pycni.rules import sync

pytestmark = pytest.mark.netns

SRC = str(Path(__file__).resolve().parents[2] / "src")
POD4, POD6 = "10.98.1.2", "fd98:0:0:1::2"
PEER4, PEER6 = "10.98.2.2", "fd98:0:0:2::2"  # a pod on another node: in the cluster CIDR
NODENET4, NODENET6 = "192.168.77.2", "fd77::2"  # the node network: excluded
OUTSIDE4, OUTSIDE6 = "203.0.113.2", "2001:db8:113::2"  # anything else: masqueraded
ROUTER_OUT4, ROUTER_OUT6 = "203.0.113.1", "2001:db8:113::1"
CLUSTER = ["10.98.0.0/16", "fd98::/56"]
EXCLUDE = ["192.168.77.0/24", "fd77::/64"]

# Runs in R: the core against a store in a temp dir.
_CORE = """
import json, sys
from pycni.core import masquerade as core
from pycni.ipam.ranges import parse_range_set
from pycni.ipam.store import Store
from pycni.rules import sync
data_dir, op, arg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = None
with Store(data_dir) as store:
    if op == "pod":
        # The network's own clusterCidrs are left empty on purpose: the pod-to-pod exception
        # under test is the one record_cluster brings.
        store.set_network("pods", {"ipMasq": True, "clusterCidrs": [],
                                   "subnets": ["10.98.1.0/24", "fd98:0:0:1::/64"]})
        sets = [parse_range_set([{"subnet": s}], k)
                for s, k in (("10.98.1.0/24", "r4"), ("fd98:0:0:1::/64", "r6"))]
        store.add_attachment("pods", "c1", "eth0", "veth1", "/proc/1/ns/net", sets, [])
    elif op == "unpod":
        store.remove_attachment("pods", "c1", "eth0")
    elif op == "cluster":
        core.record_cluster(store, arg[0], arg[1])
    elif op == "forget":
        core.forget_cluster(store)
    elif op == "remove":
        core.remove(store)
    if op != "remove":
        core.sync(store)
    got = sync.installed()
    out = None if got is None else {
        "forward": [str(n) for n in got.forward],
        "masquerade": [[str(r.source), [str(e) for e in r.exclude]] for r in got.masquerade],
    }
print(json.dumps(out))
"""


class Cluster:
    def __init__(self, netns, data_dir: str) -> None:
        self.spaces = netns
        self.data_dir = data_dir
        self.backend = "nft"
        self.pod, self.router, self.out = netns.make("cp"), netns.make("cr"), netns.make("co")

    def build(self) -> None:
        sp = self.spaces
        for ns in (self.pod, self.router, self.out):
            sp.exec(ns, "ip", "link", "set", "lo", "up")
        # Links are created inside the namespaces: nothing ever appears in the host's.
        sp.exec(
            self.pod,
            "ip",
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "vpod",
            "netns",
            self.router,
        )
        sp.exec(
            self.out,
            "ip",
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "vout",
            "netns",
            self.router,
        )
        for ns, dev, addrs in (
            (self.pod, "eth0", ("10.98.1.2/24", "fd98:0:0:1::2/64")),
            (self.router, "vpod", ("10.98.1.1/24", "fd98:0:0:1::1/64")),
            (
                self.router,
                "vout",
                (
                    "10.98.2.1/24",
                    "192.168.77.1/24",
                    "203.0.113.1/24",
                    "fd98:0:0:2::1/64",
                    "fd77::1/64",
                    "2001:db8:113::1/64",
                ),
            ),
            (
                self.out,
                "eth0",
                (
                    "10.98.2.2/24",
                    "192.168.77.2/24",
                    "203.0.113.2/24",
                    "fd98:0:0:2::2/64",
                    "fd77::2/64",
                    "2001:db8:113::2/64",
                ),
            ),
        ):
            for addr in addrs:
                extra = ("nodad",) if ":" in addr else ()
                sp.exec(ns, "ip", "addr", "add", addr, "dev", dev, *extra)
            sp.exec(ns, "ip", "link", "set", dev, "up")
        sp.exec(self.pod, "ip", "route", "add", "default", "via", "10.98.1.1")
        sp.exec(self.pod, "ip", "-6", "route", "add", "default", "via", "fd98:0:0:1::1")
        sp.exec(self.out, "ip", "route", "add", "10.98.1.0/24", "via", "10.98.2.1")
        sp.exec(self.out, "ip", "-6", "route", "add", "fd98:0:0:1::/64", "via", "fd98:0:0:2::1")
        sp.exec(self.router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        sp.exec(self.router, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")

    def core(self, op: str, arg: object = None) -> dict | None:
        """Run one core operation in R with this backend; returns what is installed after."""
        env = {k: v for k, v in os.environ.items() if k != sync.ENV_BACKEND}
        env.update(PYTHONPATH=SRC, **{sync.ENV_BACKEND: self.backend})
        proc = self.spaces.exec(
            self.router,
            sys.executable,
            "-c",
            _CORE,
            self.data_dir,
            op,
            json.dumps(arg),
            check=False,
            env=env,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def r(self, *argv: str) -> str:
        return self.spaces.exec(self.router, *argv, timeout=30).stdout

    def seen(self, dst: str, timeout: float = 5.0) -> str | None:
        """Connect P -> dst (in O); the source O saw, or None if no connection was made."""
        return source_seen(self.out, self.pod, dst, timeout)

    def ipt_save(self) -> str:
        return self.r("iptables-save") + self.r("ip6tables-save")

    def forward_drop(self) -> None:
        """Default-drop forwarding in iptables' FORWARD, as Docker leaves a host."""
        self.r("iptables", "-w", "-P", "FORWARD", "DROP")
        self.r("ip6tables", "-w", "-P", "FORWARD", "DROP")

    def nft_counters(self) -> dict[str, int]:
        """Packets counted per accept rule of pycni's forward chain, keyed "saddr <net>"."""
        out = json.loads(self.r("nft", "-j", "list", "chain", "inet", "pycni", "forward"))
        counts = {}
        for obj in out["nftables"]:
            rule = obj.get("rule")
            if not rule:
                continue
            match = next(e["match"] for e in rule["expr"] if "match" in e)
            right = match["right"]["prefix"]
            key = f"{match['left']['payload']['field']} {right['addr']}/{right['len']}"
            counts[key] = next(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
        return counts

    def nothing_left(self) -> None:
        """No pycni table, chain or jump in R, in nft or in either iptables."""
        assert "pycni" not in self.r("nft", "list", "ruleset").lower()
        if shutil.which("iptables-save"):
            assert "pycni" not in self.ipt_save().lower()


def _iptables_usable(c: Cluster) -> bool:
    if shutil.which("iptables-restore") is None or shutil.which("ip6tables-restore") is None:
        return False
    return c.spaces.exec(c.router, "iptables", "-w", "-S", check=False).returncode == 0


@pytest.fixture
def cluster(netns, tmp_path):
    if shutil.which("nft") is None:
        pytest.skip("nft not installed")
    c = Cluster(netns, str(tmp_path / "data"))
    c.build()
    return c


@pytest.fixture(params=["nft", "iptables"])
def backend(request, cluster):
    if request.param == "iptables" and not _iptables_usable(cluster):
        pytest.skip("iptables not usable in a netns here")
    cluster.backend = request.param
    return request.param


def test_nft_forward_chain_counts_cluster_traffic(cluster):
    got = cluster.core("cluster", [CLUSTER, EXCLUDE])
    assert got == {"forward": CLUSTER, "masquerade": []}
    listing = cluster.r("nft", "list", "table", "inet", "pycni")
    assert "chain forward" in listing
    assert "type filter hook forward priority filter; policy accept;" in listing
    assert "postrouting" not in listing  # no pods, nothing to masquerade
    assert set(cluster.nft_counters().values()) == {0}

    # Pod to pod: both directions come from the cluster CIDR, so the saddr accepts count them.
    assert cluster.seen(PEER4) == POD4
    assert cluster.seen(PEER6) == POD6
    counts = cluster.nft_counters()
    assert counts["saddr 10.98.0.0/16"] > 0 and counts["saddr fd98::/56"] > 0, counts
    assert counts["daddr 10.98.0.0/16"] == counts["daddr fd98::/56"] == 0, counts
    # Pod to outside (nothing to masquerade: no pods in the store): the replies come from
    # outside the cluster, to it, so the daddr accepts count them.
    assert cluster.seen(OUTSIDE4) == POD4
    assert cluster.seen(OUTSIDE6) == POD6
    counts = cluster.nft_counters()
    assert counts["daddr 10.98.0.0/16"] > 0 and counts["daddr fd98::/56"] > 0, counts


def test_nft_accept_cannot_override_iptables_forward_drop(cluster):
    """The known limit (README): an accept in pycni's own table does not stop iptables'
    FORWARD chain, a base chain of its own, from dropping the same packet."""
    if not _iptables_usable(cluster):
        pytest.skip("iptables not usable in a netns here")
    cluster.core("cluster", [CLUSTER, EXCLUDE])
    cluster.forward_drop()
    # Whichever of the two base chains (same priority) runs first, the drop wins.
    assert cluster.seen(PEER4, timeout=1) is None
    assert "chain forward" in cluster.r("nft", "list", "table", "inet", "pycni")


def test_iptables_forward_accept_under_forward_drop(cluster):
    if not _iptables_usable(cluster):
        pytest.skip("iptables not usable in a netns here")
    cluster.backend = "iptables"
    cluster.forward_drop()
    assert cluster.seen(PEER4, timeout=1) is None

    got = cluster.core("cluster", [CLUSTER, EXCLUDE])
    assert got == {"forward": CLUSTER, "masquerade": []}
    assert cluster.seen(PEER4) == POD4
    assert cluster.seen(PEER6) == POD6
    for tool in ("iptables", "ip6tables"):
        rules = cluster.r(tool, "-w", "-S", "FORWARD").splitlines()
        jumps = [x for x in rules if "PYCNI-FWD" in x]
        assert jumps == ["-A FORWARD -m comment --comment pycni -j PYCNI-FWD"]
        assert rules[1] == jumps[0]  # first after the policy line: before the host's rules
    # Applying again (a changed exclusion) keeps exactly one jump.
    cluster.core("cluster", [CLUSTER, ["192.168.78.0/24"]])
    assert cluster.r("iptables", "-w", "-S", "FORWARD").count("PYCNI-FWD") == 1

    cluster.core("forget")
    assert cluster.seen(PEER4, timeout=1) is None
    cluster.nothing_left()


def test_masquerade_exceptions(cluster, backend):
    cluster.core("pod")
    # Before the cluster is recorded, only the pod subnet itself is excepted.
    assert cluster.seen(NODENET4) == "192.168.77.1"

    got = cluster.core("cluster", [CLUSTER, EXCLUDE])
    assert got == {
        "forward": CLUSTER,
        "masquerade": [
            ["10.98.1.0/24", ["10.98.0.0/16", "192.168.77.0/24", "224.0.0.0/4"]],
            ["fd98:0:0:1::/64", ["fd77::/64", "fd98::/56", "ff00::/8"]],
        ],
    }
    # Pod to pod (the cluster CIDR): never masqueraded.
    assert cluster.seen(PEER4) == POD4
    assert cluster.seen(PEER6) == POD6
    # The excluded node network: not masqueraded.
    assert cluster.seen(NODENET4) == POD4
    assert cluster.seen(NODENET6) == POD6
    # Anywhere else: masqueraded to the router's address.
    assert cluster.seen(OUTSIDE4) == ROUTER_OUT4
    assert cluster.seen(OUTSIDE6) == ROUTER_OUT6


def test_forget_cluster_keeps_masquerade_and_then_nothing_is_left(cluster, backend):
    cluster.core("pod")
    cluster.core("cluster", [CLUSTER, EXCLUDE])
    got = cluster.core("forget")
    assert got is not None and got["forward"] == [] and len(got["masquerade"]) == 2
    if backend == "nft":
        assert "chain forward" not in cluster.r("nft", "list", "table", "inet", "pycni")
    else:
        assert "PYCNI-FWD" not in cluster.ipt_save()
        assert "PYCNI-MASQ" in cluster.ipt_save()
    assert cluster.seen(OUTSIDE4) == ROUTER_OUT4

    assert cluster.core("unpod") is None
    cluster.nothing_left()


def test_remove_leaves_nothing(cluster, backend):
    cluster.core("pod")
    cluster.core("cluster", [CLUSTER, EXCLUDE])
    assert cluster.core("remove") is None
    cluster.nothing_left()
    assert cluster.seen(OUTSIDE4) == POD4  # no masquerade any more
    # The digest was forgotten: the next sync puts everything back.
    got = cluster.core("sync")
    assert got is not None and got["forward"] == CLUSTER and got["masquerade"]


def test_forward_only_then_remove(cluster, backend):
    """A cluster without pods: only the forward part exists, and remove takes it away."""
    assert cluster.core("cluster", [CLUSTER, []]) == {"forward": CLUSTER, "masquerade": []}
    if backend == "nft":
        assert "postrouting" not in cluster.r("nft", "list", "table", "inet", "pycni")
    else:
        saved = cluster.ipt_save()
        assert "PYCNI-FWD" in saved and "PYCNI-MASQ" not in saved
    assert cluster.core("remove") is None
    cluster.nothing_left()
