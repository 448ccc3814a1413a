"""A node that vanishes without `pycnictl leave` is removed from the other nodes' routes within
the bound the operator sets (--node-timeout, here 3 s), on the sqlite and the etcd datastore;
and a datastore outage longer than that bound removes no live node's routes (etcd stopped for
five bounds, then started again: the agents retry at least once a renewal period, so each
renews its lease within the TTL etcd gives it back). Two agents in two node namespaces joined
by a veth, host-gw routes; the etcd runs in the first node's namespace."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from conftest import sh
from pycni.agent.client import agent_health
from pycni.agent.launch import agent_argv, wait_until_listening
from pycni.cluster.etcd_server import ETCD, EtcdServer

pytestmark = pytest.mark.netns

TIMEOUT = 3.0  # --node-timeout: the bound under test
ADDRESSES = {"a": "192.0.2.1", "b": "192.0.2.2"}


def until(check, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.1)
    return value


class TwoNodes:
    def __init__(self, netns, tmp_path, datastore: str) -> None:
        self.tmp = tmp_path
        self.ns = {name: netns.make(f"vn{name}") for name in ("a", "b")}
        sh("ip", "-n", self.ns["a"], "link", "add", "eth0", "type", "veth", "peer", "name",
           "eth0", "netns", self.ns["b"])  # fmt: skip
        for name, ns in self.ns.items():
            sh("ip", "-n", ns, "addr", "add", f"{ADDRESSES[name]}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        self.etcd: EtcdServer | None = None
        if datastore == "etcd":
            self.etcd = EtcdServer(
                str(tmp_path / "etcd"),
                client_url=f"http://{ADDRESSES['a']}:23791",
                peer_url="http://127.0.0.1:23801",
                netns=self.ns["a"],
            ).start()
            self.datastore = ["--datastore", "etcd", "--etcd-endpoints", self.etcd.client_url]
        else:
            self.datastore = ["--datastore", "sqlite", "--datastore-path", str(tmp_path / "c.db")]
        self.agents: dict[str, subprocess.Popen] = {}
        self.sockets: dict[str, str] = {}

    def start(self, name: str) -> None:
        root = self.tmp / name
        socket = str(root / "agent.sock")
        argv = [
            *agent_argv(socket, str(root / "data"), str(root / "agent.log")),
            "--cluster-cidr", "10.99.0.0/16",
            *self.datastore,
            "--node-name", f"node-{name}",
            "--node-ip", ADDRESSES[name],
            "--backend", "host-gw",
            "--node-timeout", str(TIMEOUT),
            "--resync", "1",
            "--no-network-policy",
            "--conf-dir", str(root / "net.d"),
            "--subnet-file", str(root / "subnet.env"),
        ]  # fmt: skip
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns[name], *argv])
        self.agents[name], self.sockets[name] = proc, socket
        wait_until_listening(proc, socket)

    def subnet(self, name: str) -> str:
        """The node's IPv4 subnet, once its agent has one."""
        cluster = (agent_health(self.sockets[name])["health"] or {}).get("cluster") or {}
        return next((s for s in cluster.get("subnets", []) if "." in s), "")

    def routes(self, name: str) -> set[str]:
        """pycni's routes (protocol 120) in the node's namespace."""
        out = sh("ip", "-n", self.ns[name], "-j", "route", "show", "proto", "120").stdout
        return {str(ipaddress.ip_network(r["dst"])) for r in json.loads(out or "[]")}

    def kill(self, name: str) -> None:
        proc = self.agents.pop(name)
        proc.send_signal(signal.SIGKILL)  # vanished: no leave, no release
        proc.wait(15)

    def close(self) -> None:
        for proc in self.agents.values():
            proc.kill()
            proc.wait(15)
        if self.etcd is not None:
            self.etcd.kill()


@pytest.fixture(params=["sqlite", "etcd"])
def nodes(request, netns, tmp_path):
    if request.param == "etcd" and not os.path.exists(ETCD):
        pytest.skip(f"{ETCD} is not installed (Debian package etcd-server)")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2")
    two = TwoNodes(netns, tmp_path, request.param)
    try:
        yield two
    finally:
        two.close()


def connected(nodes: TwoNodes) -> tuple[str, str]:
    nodes.start("a")
    nodes.start("b")
    sub_a = until(lambda: nodes.subnet("a"), "subnet for node a")
    sub_b = until(lambda: nodes.subnet("b"), "subnet for node b")
    until(lambda: sub_b in nodes.routes("a") and sub_a in nodes.routes("b"), "routes")
    return sub_a, sub_b


def test_a_vanished_node_leaves_the_routes_within_the_bound(nodes):
    _, sub_b = connected(nodes)
    nodes.kill("b")
    until(lambda: sub_b not in nodes.routes("a"), f"removal of {sub_b}", timeout=TIMEOUT + 20)
    with open(nodes.tmp / "a" / "agent.log") as f:
        assert f"route {sub_b} via {ADDRESSES['b']}" in f.read()


def test_a_datastore_outage_removes_no_live_node(nodes):
    if nodes.etcd is None:
        pytest.skip("the sqlite file's outage is tests/cluster/test_kv_contract.py's (a clock)")
    sub_a, sub_b = connected(nodes)
    nodes.etcd.kill()
    # Five bounds without the datastore (long enough for the agents' retries to back off past
    # the bound, were they allowed to): every node keeps every route all along.
    deadline = time.monotonic() + 5 * TIMEOUT
    while time.monotonic() < deadline:
        assert sub_b in nodes.routes("a") and sub_a in nodes.routes("b")
        time.sleep(0.2)
    nodes.etcd.start()  # the same data: etcd renews the leases it kept, for one TTL
    deadline = time.monotonic() + 3 * TIMEOUT
    while time.monotonic() < deadline:
        assert sub_b in nodes.routes("a") and sub_a in nodes.routes("b")
        time.sleep(0.2)
    assert nodes.subnet("a") == sub_a and nodes.subnet("b") == sub_b
    # And the bound still holds afterwards.
    nodes.kill("b")
    until(lambda: sub_b not in nodes.routes("a"), f"removal of {sub_b}", timeout=TIMEOUT + 20)
