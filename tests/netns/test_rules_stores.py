"""Two data dirs (IPAM stores) with packet rules on one node: the node's one table holds the
merge of both stores' wants, whichever store changed last, and lists the stores; a store that
wants nothing any more, or whose data dir is gone, drops out. Before, each store's sync
replaced the table with its own wants alone. Both rules backends, and ADDs of both stores at
once (the node's rule lock)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import TEST_FAULTS, Node, unique
from pycni.cni.env import KILL_AT_ENV

pytestmark = pytest.mark.netns

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")

# In the node: every given store's wants merged, against what the kernel holds.
_COMPARE = """
import json, sys
from pycni.core import masquerade
from pycni.ipam.store import Store
from pycni.rules import sync
from pycni.rules.model import RuleSet, merge
sets = []
for d in sys.argv[2:]:
    with Store(d) as s:
        sets.append(masquerade.desired_rules(s))
want, got = merge(sets), sync.installed(sys.argv[1]) or RuleSet()
print(json.dumps({
    "equal": got == want,
    "stores": list(got.stores),
    "masquerade": sorted(str(r.source) for r in got.masquerade),
    "hostports": sorted(h.host_port for h in got.hostports),
}))
"""


@pytest.fixture(params=["nft", "iptables"])
def backend(request) -> str:
    tools = ("nft",) if request.param == "nft" else ("iptables", "ip6tables", "iptables-restore")
    if not all(shutil.which(t) for t in tools):
        pytest.skip(f"{request.param} not installed")
    return request.param


class TwoStores:
    def __init__(self, node: Node, backend: str) -> None:
        self.node, self.backend = node, backend
        self.dirs = {n: os.path.join(node.root, f"data-{n}") for n in ("a", "b")}
        self.confs = {
            "a": node.conf(
                name="neta", subnet="10.244.1.0/24", dataDir=self.dirs["a"], ipMasq=True
            ),
            "b": node.conf(
                name="netb",
                bridge=unique("br"),
                network="10.245.0.0/16",
                subnet="10.245.1.0/24",
                dataDir=self.dirs["b"],
                ipMasq=True,
            ),
        }
        self.pods: dict[str, str] = {}

    def add(self, net: str, cid: str, host_port: int | None = None) -> None:
        conf = dict(self.confs[net])
        if host_port is not None:
            conf["runtimeConfig"] = {"portMappings": [{"hostPort": host_port, "containerPort": 80}]}
        self.pods[cid] = self.node.pod()
        env = {"PYCNI_RULES_BACKEND": self.backend}
        reply = self.node.run("ADD", conf, container_id=cid, netns=self.pods[cid], env=env)
        assert reply.rc == 0, reply

    def delete(self, net: str, cid: str) -> None:
        env = {"PYCNI_RULES_BACKEND": self.backend}
        reply = self.node.run(
            "DEL", self.confs[net], container_id=cid, netns=self.pods[cid], env=env
        )
        assert reply.rc == 0, reply

    def installed(self, *nets: str) -> dict:
        """What the kernel holds, and whether it is exactly the merge of `nets`' wants."""
        dirs = [self.dirs[n] for n in nets if os.path.exists(self.dirs[n])]
        return run_in_node(self.node, _COMPARE, self.backend, *dirs)


def run_in_node(node: Node, script: str, *args: str, timeout: float = 60) -> dict:
    """A Python script of pycni's in the node's namespace; what it printed, as JSON."""
    proc = subprocess.run(
        ["ip", "netns", "exec", node.ns, sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": SRC},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_two_stores_rules_are_merged_not_overwritten(node, backend):
    two = TwoStores(node, backend)
    a_dir, b_dir = (os.path.realpath(two.dirs[n]) for n in ("a", "b"))
    two.add("a", "a1", host_port=8080)
    two.add("b", "b1", host_port=9090)  # used to replace a's rules with b's alone
    got = two.installed("a", "b")
    assert got["equal"], got
    assert got["stores"] == sorted([a_dir, b_dir])
    assert got["masquerade"] == ["10.244.1.0/24", "10.245.1.0/24"]
    assert got["hostports"] == [8080, 9090]

    two.delete("a", "a1")  # a wants nothing now: it drops out, b's rules stay
    got = two.installed("b")
    assert got["equal"] and got["stores"] == [b_dir], got
    two.add("a", "a2")
    got = two.installed("a", "b")
    assert got["equal"] and got["masquerade"] == ["10.244.1.0/24", "10.245.1.0/24"], got

    # b's data dir goes away without its DEL (the node was reinstalled without it): the next
    # sync of a leaves b out rather than failing.
    shutil.rmtree(two.dirs["b"])
    two.add("a", "a3", host_port=8081)
    got = two.installed("a")
    assert got["equal"] and got["stores"] == [a_dir] and got["hostports"] == [8081], got
    for cid in ("a2", "a3"):
        two.delete("a", cid)
    assert two.installed()["stores"] == []  # no table (or chains) left


def test_adds_of_both_stores_at_once_leave_the_merge(node, backend):
    two = TwoStores(node, backend)
    jobs = [("a", f"a{i}", 8100 + i) for i in range(5)] + [
        ("b", f"b{i}", 8200 + i) for i in range(5)
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        for future in [pool.submit(two.add, *job) for job in jobs]:
            future.result()
    got = two.installed("a", "b")
    assert got["equal"], got
    assert got["hostports"] == sorted(port for _, _, port in jobs)
    with ThreadPoolExecutor(len(jobs)) as pool:
        for future in [pool.submit(two.delete, net, cid) for net, cid, _ in jobs]:
            future.result()
    assert two.installed() == {"equal": True, "stores": [], "masquerade": [], "hostports": []}


# In the node: a repair (as a restarted agent's) that re-installs a crashed ADD's rules, while
# the runtime's GC releases that pod during the install. The GC sees the digest of before,
# equal to what it now wants: it must wait for the repair (which holds the node lock) rather
# than return while the kernel still holds the released pod's rule.
_REPAIR_RACING_GC = """
import json, os, subprocess, sys, time
from pycni.core import masquerade
from pycni.ipam.store import Store
from pycni.rules import sync
from pycni.rules.model import RuleSet
plugin, data_dir, conf = sys.argv[1], sys.argv[2], sys.argv[3]
apply, calls, gc, seen = sync.apply, [], [], {}
def apply_then_gc(rules):
    apply(rules)
    if not calls:
        env = {**os.environ, "CNI_COMMAND": "GC", "CNI_PATH": os.path.dirname(plugin)}
        gc.append(subprocess.Popen([plugin], stdin=subprocess.PIPE, env=env, text=True,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        gc[0].stdin.write(conf)
        gc[0].stdin.close()
        with Store(data_dir) as other:  # until the GC has released the pod
            deadline = time.monotonic() + 20
            while other.attachments_with_port_mappings() and time.monotonic() < deadline:
                time.sleep(0.01)
        try:
            gc[0].wait(2)
            seen["gc_waited"] = False  # it returned with our install of the pod in place
        except subprocess.TimeoutExpired:
            seen["gc_waited"] = True
    calls.append(rules)
sync.apply = apply_then_gc
with Store(data_dir) as store:
    assert masquerade.repair(store)
    want = masquerade.desired_rules(store)
assert gc[0].wait(40) == 0, gc[0].stdout.read() + gc[0].stderr.read()
got = sync.installed() or RuleSet()
print(json.dumps({"installs": len(calls), "equal": got == want, "gc_waited": seen["gc_waited"],
                  "hostports": sorted(h.host_port for h in got.hostports)}))
"""


def test_a_gc_during_a_repair_is_not_undone(node):
    """A crashed ADD left a pod recorded but its hostPort not installed; a restarted agent's
    repair installs it while the runtime's GC releases the pod. The repair looks again after
    recording what it installed and takes the released pod's rule away, and the GC returns
    only after that (test_fault_kill's doctor found the rule still installed after the GC)."""
    conf = node.conf(
        ipMasq=True, runtimeConfig={"portMappings": [{"hostPort": 8300, "containerPort": 80}]}
    )
    killed = node.run(
        "ADD",
        conf,
        container_id="crashed",
        netns=node.pod(),
        env={**TEST_FAULTS, KILL_AT_ENV: "host"},
    )
    assert killed.rc == -signal.SIGKILL, killed
    gc_conf = node.conf(ipMasq=True, **{"cni.dev/valid-attachments": []})
    got = run_in_node(
        node, _REPAIR_RACING_GC, node.plugin, conf["dataDir"], json.dumps(gc_conf), timeout=120
    )
    assert got == {"installs": 2, "equal": True, "gc_waited": True, "hostports": []}, got
