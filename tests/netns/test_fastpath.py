"""The eBPF fast path in real labs: it carries pod traffic (its counters say so) on the same node,
host-gw and VXLAN, and everything that needs netfilter still works beside it: masquerade to the
outside, hostPorts (from another node, hairpin, 127.0.0.1), a kube-proxy-style Service DNAT
to a pod on the same and on another node (replies un-NATed), traffic shaping; a pod whose
program or interface is gone falls back to the normal path; --no-fast-path removes it all."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from conftest import lab_pycnictl, sh, source_seen, tear_down_labs, unique

pytestmark = pytest.mark.netns

ECHO_PORT = 8080
HOST_PORT = 30080
# A ping-pong over one TCP connection: every message echoed back, the connection kept; many
# round trips so the connection is ASSURED and the fast path is asked for most of them.
_PONG_SERVER = """
import socket, sys, threading
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(64)
print("ready", flush=True)
def serve(c):
    with c:
        while data := c.recv(65536):
            c.sendall(data)
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""
_PING_CLIENT = """
import socket, sys
host, port, rounds, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
c = socket.create_connection((host, port), timeout=5)
msg = b"x" * size
for _ in range(rounds):
    c.sendall(msg)
    got = b""
    while len(got) < size:
        chunk = c.recv(size - len(got))
        if not chunk:
            sys.exit("connection closed")
        got += chunk
c.close()
print("ok")
"""


def pong(ns: str, port: int = ECHO_PORT) -> subprocess.Popen:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-c", _PONG_SERVER, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    return proc


def ping(ns: str, host: str, port: int = ECHO_PORT, rounds: int = 200, size: int = 1000) -> bool:
    proc = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", _PING_CLIENT, host, str(port)]
        + [str(rounds), str(size)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.returncode == 0 and proc.stdout.strip() == "ok"


_STATS = """
import json
from pycni.dataplane import fastpath as fp
found = fp.attachments()
ids = sorted({p["id"] for progs in found.values() for p in progs})
stats, pods, maps = {}, {}, {}
for prog in ids:
    maps.update(fp.prog_maps(prog))
if maps:
    stats = fp.read_stats(maps["pycni_fp_stats"])
    pods = fp.decode_pods(fp.read_map(maps["pycni_fp_pods"]))
print(json.dumps({"attached": found, "programs": ids, "stats": stats,
                  "pods": {str(k): v for k, v in pods.items()}}))
"""


def kernel_view(node_ns: str) -> dict:
    """What the node's kernel holds of the fast path, read with bpftool (not the agent). A
    read racing an agent that replaces the programs finds an id gone: read again."""
    for _ in range(10):
        got = sh("ip", "netns", "exec", node_ns, sys.executable, "-c", _STATS, check=False)
        if got.returncode == 0:
            return json.loads(got.stdout)
        time.sleep(0.3)
    raise AssertionError(got.stderr)


def stats(node_ns: str) -> dict:
    return kernel_view(node_ns)["stats"]


def wait_for(what, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.2)


def gateway(node) -> str:
    import ipaddress

    return str(ipaddress.ip_network(node.subnet)[1])


def pods_in_map(node_ns: str, ips) -> bool:
    return set(ips) <= set(kernel_view(node_ns)["pods"])


class Lab:
    def __init__(self, backend: str, pods: int, tag: str, fast_path: bool = True):
        import tempfile

        from pycni.lab.lifecycle import bring_up
        from pycni.lab.model import Lab as Model

        self.prefix = unique(tag)
        # A short directory of its own: the agents' unix sockets live in it (a path limit).
        self.state = tempfile.mkdtemp(prefix="fp")
        self.made = [(self.prefix, self.state)]
        self.lab = Model.plan(
            self.prefix, self.state, nodes=2, pods=pods, backend=backend, fast_path=fast_path
        )
        try:
            bring_up(self.lab)
        except BaseException:
            tear_down_labs(self.made)
            raise
        self.n1, self.n2 = self.lab.nodes
        # Pods send once so the bridge learns their MACs, and the agent's next pass (every
        # 5 s in a lab) maps them.
        for node in self.lab.nodes:
            for pod in node.pods:
                sh("ip", "netns", "exec", pod.netns, "ping", "-c1", "-W1", gateway(node))
        if fast_path:
            for node in self.lab.nodes:
                ips = [p.ip for p in node.pods]
                assert wait_for(lambda n=node, i=ips: pods_in_map(n.netns, i)), node.name

    def down(self) -> None:
        tear_down_labs(self.made)


@pytest.fixture(scope="module")
def hostgw():
    lab = Lab("host-gw", 2, "fph")
    yield lab
    lab.down()


@pytest.fixture(scope="module")
def vxlan():
    lab = Lab("vxlan", 1, "fpv")
    yield lab
    lab.down()


def test_same_node_and_host_gw_ride_the_fast_path(hostgw):
    a, b = hostgw.n1.pods[:2]
    remote = hostgw.n2.pods[0]
    view = kernel_view(hostgw.n1.netns)
    names = {name for progs in view["attached"].values() for name in [p["name"] for p in progs]}
    assert names == {"pycni_fp_pod", "pycni_fp_underlay"}, view
    assert "eth0" in view["attached"]
    before1, before2 = stats(hostgw.n1.netns), stats(hostgw.n2.netns)
    servers = [pong(b.netns), pong(remote.netns)]
    try:
        assert ping(a.netns, b.ip)
        assert ping(a.netns, remote.ip)
    finally:
        for s in servers:
            s.kill()
            s.wait()
    after1, after2 = stats(hostgw.n1.netns), stats(hostgw.n2.netns)
    # Same node: both directions by redirect_peer; the remote pod: out by the FIB lookup,
    # in on node 2 from the underlay straight into the pod, and the replies the other way.
    assert after1["peer"] - before1["peer"] > 300, (before1, after1)
    assert after1["routed"] - before1["routed"] > 150, (before1, after1)
    assert after2["peer"] - before2["peer"] > 150, (before2, after2)
    assert after2["routed"] - before2["routed"] > 150, (before2, after2)


def test_vxlan_rides_the_fast_path_through_the_vtep(vxlan):
    src, dst = vxlan.n1.pods[0], vxlan.n2.pods[0]
    view = kernel_view(vxlan.n2.netns)
    assert any(dev.startswith("pycni.") for dev in view["attached"]), view
    before1, before2 = stats(vxlan.n1.netns), stats(vxlan.n2.netns)
    server = pong(dst.netns)
    try:
        assert ping(src.netns, dst.ip)
    finally:
        server.kill()
        server.wait()
    after1, after2 = stats(vxlan.n1.netns), stats(vxlan.n2.netns)
    assert after1["routed"] - before1["routed"] > 150, (before1, after1)
    assert after2["peer"] - before2["peer"] > 150, (before2, after2)


def test_masquerade_to_the_outside_still_applies(hostgw):
    from pycni.lab.model import WAN

    pod = hostgw.n1.pods[0]
    seen = source_seen(hostgw.lab.outside, pod.netns, str(WAN[254]))
    assert seen == hostgw.n1.lan_ip


SERVICE_NFT = """
table ip {table} {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr 10.96.0.10 tcp dport 80 dnat to {local}:{port}
        ip daddr 10.96.0.11 tcp dport 80 dnat to {remote}:{port}
    }}
}}
"""


def test_service_dnat_replies_are_un_natted_on_the_same_and_another_node(hostgw):
    """A ClusterIP-like address DNATed to a pod (as kube-proxy does): the replies are pod ->
    pod and the fast path must leave them to the stack, or the client would get them from the
    pod's address and drop them."""
    a, b = hostgw.n1.pods[:2]
    remote = hostgw.n2.pods[0]
    table = unique("fpsvc")
    sh(
        "ip", "netns", "exec", hostgw.n1.netns, "nft", "-f", "-",
        input=SERVICE_NFT.format(table=table, local=b.ip, remote=remote.ip, port=ECHO_PORT),
    )  # fmt: skip
    servers = [pong(b.netns), pong(remote.netns)]
    try:
        before1, before2 = stats(hostgw.n1.netns), stats(hostgw.n2.netns)
        assert ping(a.netns, "10.96.0.10", 80)
        assert ping(a.netns, "10.96.0.11", 80)
        after1, after2 = stats(hostgw.n1.netns), stats(hostgw.n2.netns)
    finally:
        for s in servers:
            s.kill()
            s.wait()
        sh("ip", "netns", "exec", hostgw.n1.netns, "nft", "delete", "table", "ip", table)
    # Node 1 saw the replies from both pods and left them to the stack: conntrack says NAT.
    assert after1["nat"] - before1["nat"] > 300, (before1, after1)
    # Node 2 holds no NAT for it: it carried the remote pod's replies out on the fast path.
    assert after2["routed"] - before2["routed"] > 150, (before2, after2)


def _add_pod(lab: Lab, node, runtime: dict):
    from pycni.lab import build

    pod = lab.lab.plan_pod(node)
    lab.lab.save()
    build.add_pod(node, pod, {"runtimeConfig": runtime})
    lab.lab.save()
    sh("ip", "netns", "exec", pod.netns, "ping", "-c1", "-W1", gateway(node))
    return pod


def test_host_ports_from_another_node_hairpin_and_localhost(hostgw):
    n1 = hostgw.n1
    mapping = {"hostPort": HOST_PORT, "containerPort": ECHO_PORT, "protocol": "tcp"}
    pod = _add_pod(hostgw, n1, {"portMappings": [mapping]})
    server = pong(pod.netns)
    try:
        assert ping(hostgw.n2.pods[0].netns, n1.lan_ip, HOST_PORT), "from another node's pod"
        assert ping(n1.pods[0].netns, n1.lan_ip, HOST_PORT), "hairpin from a pod of the node"
        assert ping(n1.netns, "127.0.0.1", HOST_PORT), "from the node at 127.0.0.1"
    finally:
        server.kill()
        server.wait()


def test_a_shaped_pod_stays_on_the_normal_path(hostgw):
    n1 = hostgw.n1
    shaping = {"ingressRate": 100_000_000, "ingressBurst": 1_000_000}
    shaping |= {"egressRate": 100_000_000, "egressBurst": 1_000_000}
    pod = _add_pod(hostgw, n1, {"bandwidth": shaping})
    time.sleep(6)  # one more agent pass (5 s in a lab)
    view = kernel_view(n1.netns)
    assert pod.ip not in view["pods"], view
    assert pod.host_veth not in view["attached"], view
    qdiscs = sh("ip", "netns", "exec", n1.netns, "tc", "qdisc", "show", "dev", pod.host_veth)
    assert "tbf" in qdiscs.stdout and "clsact" not in qdiscs.stdout
    server = pong(pod.netns)
    try:
        assert ping(n1.pods[0].netns, pod.ip)
        assert ping(hostgw.n2.pods[0].netns, pod.ip)
    finally:
        server.kill()
        server.wait()


def test_a_pod_whose_program_or_interface_is_gone_falls_back(hostgw):
    """The source's program detached: the normal path. The destination's interface replaced
    before the agent looked again (the map still names the old one): the program notices and
    leaves the packets to the normal path, which delivers them through the new interface."""
    from pycni.lab import build

    n1 = hostgw.n1
    a, b = n1.pods[:2]
    remote = hostgw.n2.pods[0]
    stale = kernel_view(n1.netns)["pods"][b.ip][0]
    build.stop_agent(n1)  # nobody repairs behind the test's back
    try:
        sh("ip", "netns", "exec", n1.netns, "tc", "filter", "del", "dev", a.host_veth, "ingress")
        server = pong(remote.netns)
        try:
            assert ping(a.netns, remote.ip)  # from a pod without its program
        finally:
            server.kill()
            server.wait()
        # b's interface is replaced by hand: the old index is gone, the address lives on.
        veth = unique("fpr")[-15:]
        sh("ip", "-n", n1.netns, "link", "del", b.host_veth)
        # The same MAC: the node's neighbour entry for b stays right, as for a pod restarted.
        sh("ip", "-n", n1.netns, "link", "add", veth, "type", "veth", "peer", "name", "eth0",
           "address", b.mac, "netns", b.netns)  # fmt: skip
        sh("ip", "-n", n1.netns, "link", "set", veth, "master", "cni0", "up")
        sh("ip", "-n", b.netns, "addr", "add", b.address, "dev", "eth0")
        sh("ip", "-n", b.netns, "link", "set", "eth0", "up")
        sh("ip", "-n", b.netns, "route", "add", "default", "via", gateway(n1))
        server = pong(b.netns)
        try:
            before = stats(n1.netns)
            assert ping(remote.netns, b.ip)  # in from the underlay, onto a stale entry
            after = stats(n1.netns)
        finally:
            server.kill()
            server.wait()
        assert kernel_view(n1.netns)["pods"][b.ip][0] == stale
        assert after["gone"] - before["gone"] > 100, (before, after)
    finally:
        build.start_agent(hostgw.lab, n1)
    # The agent puts the program back and drops the entry of an interface it cannot find.
    assert wait_for(
        lambda: (
            b.ip not in (view := kernel_view(n1.netns))["pods"] and a.host_veth in view["attached"]
        )
    )


def test_no_fast_path_leaves_nothing_and_an_agent_switched_off_removes_it():
    lab = Lab("host-gw", 1, "fpo", fast_path=False)
    try:
        for node in lab.lab.nodes:
            assert kernel_view(node.netns)["attached"] == {}
        src, dst = lab.n1.pods[0], lab.n2.pods[0]
        server = pong(dst.netns)
        try:
            assert ping(src.netns, dst.ip)
        finally:
            server.kill()
            server.wait()
        # Switched on, then off again: the filters come, then go.
        from pycni.lab import build

        node = lab.n1
        lab.lab.fast_path = True
        build.stop_agent(node)
        build.start_agent(lab.lab, node)
        assert wait_for(lambda: kernel_view(node.netns)["attached"] != {})
        lab.lab.fast_path = False
        build.stop_agent(node)
        build.start_agent(lab.lab, node)
        assert wait_for(lambda: kernel_view(node.netns)["attached"] == {} or None) is not None
        assert kernel_view(node.netns)["attached"] == {}
    finally:
        lab.down()


def test_lab_up_no_fast_path_option():
    """The lab's --no-fast-path reaches the agents' command line (lab.json keeps it)."""
    import tempfile

    prefix = unique("fpl")
    state = tempfile.mkdtemp(prefix="fp")
    opts = ("--prefix", prefix, "--state-dir", state)
    try:
        up = lab_pycnictl(
            "lab", "up", *opts, "--nodes", "1", "--pods", "1", "--backend", "host-gw",
            "--no-fast-path",
        )  # fmt: skip
        assert up.returncode == 0, up.stdout + up.stderr
        with open(f"{state}/lab.json") as f:
            assert json.load(f)["fast_path"] is False
        assert kernel_view(f"{prefix}-node1")["attached"] == {}
    finally:
        tear_down_labs([(prefix, state)])


def test_doctor_and_uninstall():
    """`pycnictl doctor` finds the fast path as the agent wants it, and a program taken away;
    `pycnictl uninstall` removes every filter (the underlay's too) and the compiled object."""
    import os

    from pycni.lab import build

    lab = Lab("host-gw", 1, "fpd")
    try:
        node, pod = lab.n1, lab.n1.pods[0]

        def doctor() -> subprocess.CompletedProcess:
            return sh(
                "ip", "netns", "exec", node.netns, sys.executable, "-c",
                "from pycni.ctl.main import main; main()", "doctor", "--data-dir",
                node.data_dir, "--socket", node.agent_socket, "--conf-dir", node.conf_dir,
                check=False,
            )  # fmt: skip

        ok = doctor()
        assert ok.returncode == 0, ok.stdout + ok.stderr
        # The filter removed: found (or already put back by the agent's pass, then found ok).
        sh(
            "ip",
            "netns",
            "exec",
            node.netns,
            "tc",
            "filter",
            "del",
            "dev",
            pod.host_veth,
            "ingress",
        )
        found = doctor()
        assert found.returncode == 0 or (
            found.returncode == 1 and f"fast-path-program-missing: {pod.host_veth}" in found.stdout
        ), found.stdout + found.stderr
        assert wait_for(lambda: doctor().returncode == 0)

        build.stop_agent(node)
        assert os.listdir(os.path.join(node.data_dir, "bpf"))
        out = sh(
            "ip", "netns", "exec", node.netns, sys.executable, "-c",
            "from pycni.ctl.main import main; main()", "uninstall", "--data-dir", node.data_dir,
            "--conf-dir", node.conf_dir, "--bin-dir", node.bin_dir, "--run-dir", node.root,
            "--subnet-file", node.subnet_file, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        assert "fast-path program on eth0" in out.stdout
        assert kernel_view(node.netns)["attached"] == {}
        assert not os.path.exists(os.path.join(node.data_dir, "bpf"))
        for p in node.pods:  # uninstall took them: nothing left for lab down to DEL
            p.address = ""
        lab.lab.save()
    finally:
        lab.down()
