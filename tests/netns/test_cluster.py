"""The cluster network end to end: labs of node namespaces with a pycni agent each, leasing
subnets from sqlite or etcd, routing with host-gw, vxlan or auto; pods networked through each
node's installed plugin. Driven through the same lifecycle functions as `pycnictl lab`."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import pytest

from conftest import ask, server, sh, tear_down_labs, unique
from pycni.agent.client import agent_health
from pycni.agent.launch import agent_argv, wait_until_listening
from pycni.lab import build, lifecycle
from pycni.lab.model import Lab
from pycni.lab.probes import measure

pytestmark = pytest.mark.netns


@pytest.fixture
def make_lab():
    """make_lab(backend, datastore, nodes=3, pods=2, underlays=1, up=True) -> a Lab; every lab
    made is torn down whatever happens (state in a short /tmp dir: unix socket paths)."""
    made: list[tuple[str, str]] = []

    def make(
        backend="vxlan",
        datastore="sqlite",
        nodes=3,
        pods=2,
        underlays=1,
        up=True,
        network=None,
        ipv6=False,
    ) -> Lab:
        state = tempfile.mkdtemp(prefix="pycl", dir="/tmp")
        lab = Lab.plan(
            unique("c"),
            state,
            nodes,
            pods,
            backend=backend,
            datastore=datastore,
            underlays=underlays,
            ipv6=ipv6,
        )
        if network:
            lab.network = network
        made.append((lab.prefix, state))
        if up:
            lifecycle.bring_up(lab)
        return lab

    yield make
    tear_down_labs(made)


def failures(lab: Lab) -> list[str]:
    return [
        f"{p.kind} {p.src_label}->{p.dst_label} {p.dst_ip}: icmp={p.icmp_ok} tcp={p.tcp_ok} "
        f"seen={p.peer or '-'} want={'/'.join(p.expect)} {p.error}"
        for p in measure(lab)
        if not p.ok
    ]


def pycni_routes(node) -> list[str]:
    return sh("ip", "-n", node.netns, "route", "show", "proto", "120").stdout.splitlines()


def agent_log_line(node, text: str) -> str:
    """The last line of the node agent's log holding `text` ("" when none does)."""
    with open(node.agent_log, errors="replace") as f:
        return next((line for line in reversed(f.readlines()) if text in line), "")


def health(node) -> dict:
    return agent_health(node.agent_socket)["health"]["cluster"]


MATRIX = [(b, d) for d in ("sqlite", "etcd") for b in ("host-gw", "vxlan", "auto")]


@pytest.mark.parametrize(("backend", "datastore"), MATRIX, ids=[f"{b}-{d}" for b, d in MATRIX])
def test_full_connectivity_matrix(make_lab, backend, datastore):
    """Every pod reaches every pod (same node and across nodes) keeping its address, every node
    reaches every pod, every pod reaches the outside masqueraded behind its node's address."""
    lab = make_lab(backend, datastore, underlays=2 if backend == "auto" else 1)
    subnets = [n.subnet for n in lab.nodes]
    assert len(set(subnets)) == 3
    assert all(
        ipaddress.ip_network(s).subnet_of(ipaddress.ip_network(lab.network)) for s in subnets
    )
    assert failures(lab) == []
    # The kinds of route each backend makes.
    routes = pycni_routes(lab.nodes[0])
    assert len(routes) == 2, routes
    vxlan = [r for r in routes if "dev pycni.1" in r and "onlink" in r]
    direct = [r for r in routes if "dev eth0" in r]
    expected_vxlan = {"host-gw": 0, "vxlan": 2, "auto": 1}[backend]
    assert (len(vxlan), len(direct)) == (expected_vxlan, 2 - expected_vxlan), routes


@pytest.mark.parametrize("backend", ["host-gw", "vxlan"])
def test_dual_stack_cluster(make_lab, backend):
    """With an IPv6 cluster CIDR too, every node leases a /64 beside its /24, pods get both
    addresses and every path of the matrix works over IPv6 as well (no first-packet loss)."""
    lab = make_lab(backend, nodes=2, pods=2, ipv6=True)
    for node in lab.nodes:
        assert ipaddress.ip_network(node.subnet6).subnet_of(ipaddress.ip_network(lab.network6))
        assert ipaddress.ip_network(node.subnet6).prefixlen == 64
        assert all(p.address6 for p in node.pods)
    probes = measure(lab)
    assert sum(1 for p in probes if p.kind.startswith("pod->pod6")) == 12
    assert [p for p in probes if not p.ok] == []
    assert [p for p in probes if p.retried] == []
    routes = sh("ip", "-n", lab.nodes[0].netns, "-6", "route", "show", "proto", "120").stdout
    assert lab.nodes[1].subnet6 in routes, routes


def test_vxlan_lowers_the_pod_mtu_and_publishes_the_vtep(make_lab):
    lab = make_lab("vxlan", nodes=2, pods=1)
    node = lab.nodes[0]
    with open(node.conflist_path) as f:
        conf = json.load(f)["plugins"][0]
    assert conf["mtu"] == 1450  # 1500 less 50 bytes of VXLAN over IPv4
    pod = node.pods[0]
    assert "mtu 1450" in sh("ip", "-n", pod.netns, "link", "show", "eth0").stdout
    peer = health(node)["remoteNodes"][0]
    fdb = sh("bridge", "-n", node.netns, "fdb", "show", "dev", "pycni.1").stdout
    assert f"{peer['vtepMAC']} dst {peer['nodeIPs'][0]}" in fdb
    neigh = sh("ip", "-n", node.netns, "neigh", "show", "dev", "pycni.1").stdout
    assert peer["vtepMAC"] in neigh and "PERMANENT" in neigh


@pytest.mark.parametrize("backend", ["host-gw", "vxlan"])
def test_a_node_joining_later_is_reachable_without_restarts(make_lab, backend):
    lab = make_lab(backend, nodes=2, pods=1)
    pids = {n.name: build.agent_pids(n) for n in lab.nodes}
    newcomer = lifecycle.join(lab)
    assert newcomer.subnet not in {n.subnet for n in lab.nodes[:2]}
    assert {n.name: build.agent_pids(n) for n in lab.nodes[:2]} == pids  # nobody restarted
    assert failures(lab) == []
    # Each agent says, at info, which route it added and why.
    for node in lab.nodes[:2]:
        line = agent_log_line(node, f"route {newcomer.subnet} via ")
        assert f"added: node {newcomer.name} appeared (subnets {newcomer.subnet}" in line, line


@pytest.mark.parametrize("datastore", ["sqlite", "etcd"])
def test_a_node_leaving_has_its_routes_removed_everywhere(make_lab, datastore):
    lab = make_lab("vxlan", datastore, nodes=3, pods=1)
    leaving = lab.nodes[2]
    gone_subnet, gone_ip = leaving.subnet, leaving.lan_ip
    lifecycle.remove_node(lab, leaving)
    for node in lab.nodes:
        deadline = time.monotonic() + 15
        while any(gone_subnet in r for r in pycni_routes(node)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(gone_subnet in r for r in pycni_routes(node))
        fdb = sh("bridge", "-n", node.netns, "fdb", "show", "dev", "pycni.1").stdout
        assert gone_ip not in fdb
        neigh = sh("ip", "-n", node.netns, "neigh", "show", "dev", "pycni.1").stdout
        assert str(ipaddress.ip_network(gone_subnet).network_address) + " " not in neigh
        assert len(pycni_routes(node)) == 1
        line = agent_log_line(node, f"route {gone_subnet} via ")
        assert f"removed: node {leaving.name} left the node list" in line, line
    assert failures(lab) == []
    # Its subnet is free again: the next node to join gets it.
    assert lifecycle.join(lab).subnet == gone_subnet


def ping_during(src_netns: str, dst_ip: str, seconds: float, action) -> tuple[int, int]:
    """(sent, received) of a steady ping while `action()` runs."""
    count = int(seconds / 0.02)
    proc = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            src_netns,
            "ping",
            "-n",
            "-q",
            "-i",
            "0.02",
            "-W",
            "1",
            "-c",
            str(count),
            dst_ip,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(0.3)
        action()
        out, _ = proc.communicate(timeout=seconds + 30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    m = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert m, out
    return int(m.group(1)), int(m.group(2))


# Zero loss of a 50/s ping whose replies have 1 s: a measurement, which the other worker's load
# can spoil (one reply late under ./dev test -n 2 with the machine busy): serial.
@pytest.mark.serial
@pytest.mark.parametrize("sig", [15, 9], ids=["SIGTERM", "SIGKILL"])
def test_agent_restart_keeps_traffic_and_subnet(make_lab, sig):
    lab = make_lab("vxlan", nodes=2, pods=1)
    a, b = lab.nodes
    before = [(n.subnet, pycni_routes(n)) for n in lab.nodes]

    def restart_both():
        for node in lab.nodes:
            lifecycle.restart_agent(lab, node, sig)

    sent, received = ping_during(a.pods[0].netns, b.pods[0].ip, 3.0, restart_both)
    assert sent - received == 0, f"lost {sent - received} of {sent}"
    for node in lab.nodes:
        build.wait_ready(node)
    build.wait_converged(lab)
    assert [(n.subnet, pycni_routes(n)) for n in lab.nodes] == before
    assert all(health(n)["subnets"] == [n.subnet] for n in lab.nodes)
    assert failures(lab) == []


@pytest.mark.serial  # zero loss of a ping, as above
def test_etcd_restart_keeps_traffic_and_subnets(make_lab):
    lab = make_lab("host-gw", "etcd", nodes=2, pods=1)
    a, b = lab.nodes

    def crash_and_restart_etcd():
        build.kill_etcd(lab)
        time.sleep(1.0)  # the agents see the datastore gone meanwhile
        build.start_etcd(lab)

    sent, received = ping_during(a.pods[0].netns, b.pods[0].ip, 3.0, crash_and_restart_etcd)
    assert sent - received == 0, f"lost {sent - received} of {sent}"
    # The agents carry on against the restarted etcd: a new node is seen by both.
    newcomer = lifecycle.join(lab)
    assert [n.subnet for n in lab.nodes[:2]] == [a.subnet, b.subnet]
    assert newcomer.subnet not in (a.subnet, b.subnet)
    assert failures(lab) == []


def test_exhausted_cluster_cidr_is_a_clear_error_and_status_not_ready(make_lab):
    # A /23 holds two /24 node subnets: the third node gets none.
    lab = make_lab("host-gw", nodes=3, pods=1, up=False, network="10.244.0.0/23")
    lab.save()
    build.build_router_and_outside(lab)
    for node in lab.nodes:
        build.build_node(lab, node)
    for node in lab.nodes[:2]:
        build.wait_ready(node)
    third = lab.nodes[2]
    deadline = time.monotonic() + 15
    while "no free" not in health(third)["reason"] and time.monotonic() < deadline:
        time.sleep(0.05)
    reason = health(third)["reason"]
    assert "10.244.0.0/23 has no free /24 subnet" in reason, reason
    assert not health(third)["ready"]
    assert not os.path.exists(third.conflist_path)  # the runtime keeps the node NotReady
    # STATUS through the node's plugin, as a runtime asks it, says why.
    conf = {
        "cniVersion": "1.1.0",
        "name": "pycni",
        "type": "pycni",
        "subnet": "10.244.0.0/24",
        "agentSocket": third.agent_socket,
        "dataDir": third.data_dir,
    }
    proc = subprocess.run(
        ["ip", "netns", "exec", third.netns, third.plugin],
        input=json.dumps(conf),
        env={"CNI_COMMAND": "STATUS", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    err = json.loads(proc.stdout)
    assert err["code"] == 50 and "no free /24 subnet" in err["msg"], err


def test_periodic_reconcile_repairs_what_someone_removed(make_lab):
    """Kernel drift raises no datastore event: the periodic pass (lab agents: every 5 s)
    puts back a deleted route and FDB entry, and leaves routes it did not make alone."""
    lab = make_lab("vxlan", nodes=2, pods=1)
    a, b = lab.nodes
    sh("ip", "-n", a.netns, "route", "add", "10.99.0.0/24", "via", b.lan_ip, "proto", "static")
    sh("ip", "-n", a.netns, "route", "del", b.subnet, "proto", "120")
    sh(
        "bridge",
        "-n",
        a.netns,
        "fdb",
        "del",
        health(a)["remoteNodes"][0]["vtepMAC"],
        "dev",
        "pycni.1",
        "dst",
        b.lan_ip,
    )
    deadline = time.monotonic() + 15
    while not any(b.subnet in r for r in pycni_routes(a)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any(b.subnet in r for r in pycni_routes(a))
    assert b.lan_ip in sh("bridge", "-n", a.netns, "fdb", "show", "dev", "pycni.1").stdout
    assert "10.99.0.0/24 via" in sh("ip", "-n", a.netns, "route").stdout  # not ours: kept
    assert failures(lab) == []


def test_status_shows_the_cluster_side(make_lab):
    lab = make_lab("vxlan", nodes=2, pods=1)
    a, b = lab.nodes
    argv = [
        sys.executable,
        "-c",
        "from pycni.ctl.main import main; main()",
        "status",
        "--socket",
        a.agent_socket,
        "--data-dir",
        a.data_dir,
    ]
    proc = sh("ip", "netns", "exec", a.netns, *argv, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "cluster: node node1, ready, datastore sqlite, backend vxlan" in proc.stdout
    assert "routes   to 1 other node(s)" in proc.stdout
    assert re.search(rf"node2\s+{re.escape(b.subnet)}\s+via {b.lan_ip}", proc.stdout), proc.stdout
    report = json.loads(sh("ip", "netns", "exec", a.netns, *argv, "--json").stdout)
    cluster = report["agent"]["health"]["cluster"]
    assert cluster["subnets"] == [a.subnet] and cluster["lastChanges"]["errors"] == []
    assert (cluster["network"], cluster["lastError"]) == ("pycni", "")
    # Without --socket: the agent the node's config list names (the lab's agents serve on
    # sockets of their own, never the default one), its data dir with it.
    named = [*argv[:4], "--conf-dir", a.conf_dir]
    proc = sh("ip", "netns", "exec", a.netns, *named, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"on {a.agent_socket}" in proc.stdout and "cluster: node node1, ready" in proc.stdout
    assert f"network pycni (data dir {a.data_dir}" in proc.stdout
    # The config names an agent that is not running: that is a problem, and says who named it.
    build.stop_agent(a)
    proc = sh("ip", "netns", "exec", a.netns, *named, check=False)
    assert proc.returncode == 1, proc.stdout
    assert f"agent: NOT RUNNING ({a.agent_socket}, named by {a.conflist_path})" in proc.stdout
    assert f"  - agent at {a.agent_socket} (named by {a.conflist_path}): not running" in (
        proc.stdout
    )
    # ... and the data dir comes from the config list, not the default.
    assert f"network pycni (data dir {a.data_dir}" in proc.stdout


# --- Services through kube-proxy: a pod reaches itself (hairpin) --------------------------

VIP4, VIP6 = "10.96.0.10", "fd00:10:96::10"  # ClusterIP-like virtual addresses
SVC_TCP, SVC_UDP = 80, 53  # the Service's ports
POD_TCP, POD_UDP = 8080, 5353  # the endpoint's (the echo server's) ports
MASQ_MARK = "0x4000"  # kube-proxy's masquerade mark


def kube_proxy_rules(table: str, family: str, vip: str, endpoint: str, cluster_cidr: str) -> str:
    """kube-proxy's nftables shape (nftables mode, one table per family) for one Service with
    one endpoint: the virtual address DNATed to the endpoint in prerouting and output; the
    masquerade mark set on traffic from outside the cluster CIDR and when the source is the
    endpoint itself (a pod reaching itself through its Service); marked packets masqueraded in
    postrouting."""
    addr = "ip" if family == "ip" else "ip6"
    key = "ipv4_addr" if family == "ip" else "ipv6_addr"
    ep = endpoint if family == "ip" else f"[{endpoint}]"
    outside = f"{addr} saddr != {cluster_cidr}"
    return f"""
table {family} {table} {{
    map service-ips {{
        type {key} . inet_proto . inet_service : verdict
        elements = {{ {vip} . tcp . {SVC_TCP} : goto service-tcp,
                     {vip} . udp . {SVC_UDP} : goto service-udp }}
    }}
    chain mark-for-masquerade {{
        meta mark set meta mark | {MASQ_MARK}
    }}
    chain masquerading {{
        meta mark & {MASQ_MARK} == 0 return
        meta mark set meta mark ^ {MASQ_MARK}
        masquerade fully-random
    }}
    chain services {{
        {addr} daddr . meta l4proto . th dport vmap @service-ips
    }}
    chain service-tcp {{
        {addr} daddr {vip} tcp dport {SVC_TCP} {outside} jump mark-for-masquerade
        numgen random mod 1 vmap {{ 0 : goto endpoint-tcp }}
    }}
    chain service-udp {{
        {addr} daddr {vip} udp dport {SVC_UDP} {outside} jump mark-for-masquerade
        numgen random mod 1 vmap {{ 0 : goto endpoint-udp }}
    }}
    chain endpoint-tcp {{
        {addr} saddr {endpoint} jump mark-for-masquerade
        meta l4proto tcp dnat to {ep}:{POD_TCP}
    }}
    chain endpoint-udp {{
        {addr} saddr {endpoint} jump mark-for-masquerade
        meta l4proto udp dnat to {ep}:{POD_UDP}
    }}
    chain nat-prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        jump services
    }}
    chain nat-output {{
        type nat hook output priority -100; policy accept;
        jump services
    }}
    chain nat-postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        jump masquerading
    }}
}}
"""


def reach_service(lab: Lab, clients) -> dict[str, dict]:
    """{label: {"tcp4", "udp4", "tcp6", "udp6": answer or None}} from each (label, netns)."""
    out = {}
    for label, ns in clients:
        out[label] = {
            f"{proto}{v}": ask(ns, proto, vip, port)
            for v, vip in ((4, VIP4), (6, VIP6))
            for proto, port in (("tcp", SVC_TCP), ("udp", SVC_UDP))
        }
    return out


@pytest.mark.skipif(not shutil.which("nft"), reason="needs nft")
@pytest.mark.parametrize("backend", ["host-gw", "vxlan"])
def test_a_pod_reaches_itself_and_its_neighbour_through_a_service(make_lab, backend):
    """kube-proxy's rule shape in every node: a virtual address DNATed to pod A. Pod A
    (hairpin: its own frame goes back out of its bridge port, masqueraded behind the
    bridge's address), its neighbour B on the same bridge and pod C on the other node all
    reach it, over IPv4 and IPv6, TCP and UDP. With hairpin off on A's port only A fails."""
    lab = make_lab(backend, nodes=2, pods=2, ipv6=True)
    node, other = lab.nodes
    a, b = node.pods
    c = other.pods[0]
    for n in lab.nodes:
        # br_netfilter as on a kube-proxy node (a new namespace starts with it on, where the
        # module is loaded): bridged frames go through the DNAT, which is what needs hairpin.
        for fam in ("iptables", "ip6tables"):
            path = f"/proc/sys/net/bridge/bridge-nf-call-{fam}"
            if not os.path.exists(path):
                pytest.skip("no br_netfilter in this kernel")
            sh("ip", "netns", "exec", n.netns, "sh", "-c", f"echo 1 > {path}")
        for family, vip, endpoint, cidr in (
            ("ip", VIP4, a.ip, lab.network),
            ("ip6", VIP6, a.ip6, lab.network6),
        ):
            rules = kube_proxy_rules(unique("kp"), family, vip, endpoint, cidr)
            sh("ip", "netns", "exec", n.netns, "nft", "-f", "-", input=rules)
    # Every pod's bridge port is in hairpin mode, from the conflist the agent wrote.
    with open(node.conflist_path) as f:
        assert json.load(f)["plugins"][0]["hairpinMode"] is True
    for pod in node.pods:
        mode = sh(
            "ip",
            "netns",
            "exec",
            node.netns,
            "cat",
            f"/sys/class/net/{pod.host_veth}/brport/hairpin_mode",
        ).stdout.strip()
        assert mode == "1", pod.host_veth

    clients = [("self", a.netns), ("neighbour", b.netns), ("other node", c.netns)]
    expect = {
        # Marked by kube-proxy (source == endpoint): masqueraded behind the bridge's address.
        "self": (node.gateway, node.gateway6),
        "neighbour": (b.ip, b.ip6),
        "other node": (c.ip, c.ip6),
    }

    def want(label: str, up: bool = True) -> dict:
        v4, v6 = expect[label]
        return {
            f"{proto}{v}": f"podA {ip}" if up else None
            for v, ip in ((4, v4), (6, v6))
            for proto in ("tcp", "udp")
        }

    with server(a.netns, "podA", POD_TCP, POD_UDP):
        assert reach_service(lab, clients) == {label: want(label) for label, _ in clients}
        # The test can fail: with hairpin off on A's port, A no longer reaches itself (the
        # bridge will not send its frame back out of the port it came in by); the others do.
        sh(
            "ip",
            "-n",
            node.netns,
            "link",
            "set",
            a.host_veth,
            "type",
            "bridge_slave",
            "hairpin",
            "off",
        )
        assert reach_service(lab, clients) == {
            "self": want("self", up=False),
            "neighbour": want("neighbour"),
            "other node": want("other node"),
        }
        sh("bridge", "-n", node.netns, "link", "set", "dev", a.host_veth, "hairpin", "on")
        assert reach_service(lab, [("self", a.netns)]) == {"self": want("self")}


# --- the underlay interface without --iface -----------------------------------------------


def test_a_node_without_default_route_finds_its_underlay_by_its_address(netns, tmp_path):
    """No --iface and no default route (as kubernetes.md advises for a lab's node
    namespaces): with --node-ip the agent takes the interface holding that address and turns
    ready; without any address to go by it says what to give."""
    node, peer = netns.make("nodr"), netns.make("nodrpeer")
    sh(
        "ip",
        "-n",
        node,
        "link",
        "add",
        "eth1",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        peer,
    )
    sh("ip", "-n", node, "addr", "add", "192.0.2.1/24", "dev", "eth1")
    sh("ip", "-n", peer, "addr", "add", "192.0.2.2/24", "dev", "eth0")
    for ns, dev in ((node, "eth1"), (peer, "eth0")):
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    assert "default" not in sh("ip", "-n", node, "route").stdout

    def start(tag: str, *extra: str) -> tuple[subprocess.Popen, str, str]:
        root = tmp_path / tag
        socket, conf_dir = str(root / "agent.sock"), str(root / "net.d")
        argv = [
            *agent_argv(socket, str(root / "data"), str(root / "agent.log")),
            "--cluster-cidr", "10.244.0.0/16",
            "--datastore", "sqlite",
            "--datastore-path", str(tmp_path / "cluster.db"),
            "--node-name", "nodr",
            "--backend", "host-gw",
            "--conf-dir", conf_dir,
            "--subnet-file", str(root / "subnet.env"),
            *extra,
        ]  # fmt: skip
        proc = subprocess.Popen(["ip", "netns", "exec", node, *argv], stderr=subprocess.DEVNULL)
        wait_until_listening(proc, socket)
        return proc, socket, conf_dir

    def until(check, what: str):
        deadline = time.monotonic() + 15
        while not (value := check()):
            assert time.monotonic() < deadline, f"no {what}"
            time.sleep(0.05)
        return value

    def cluster(socket: str) -> dict:
        return (agent_health(socket)["health"] or {}).get("cluster") or {}

    proc, socket, conf_dir = start("blind")
    try:
        reason = until(
            lambda: "give --iface" in (r := cluster(socket).get("reason", "")) and r, "complaint"
        )
        assert "no default route" in reason and "--node-ip" in reason, reason
        assert not cluster(socket)["ready"]
        assert not os.path.exists(os.path.join(conf_dir, "10-pycni.conflist"))
    finally:
        proc.terminate()
        proc.wait(15)

    proc, socket, conf_dir = start("known", "--node-ip", "192.0.2.1")
    try:
        until(lambda: cluster(socket).get("ready"), "ready agent")
        until(lambda: os.path.exists(os.path.join(conf_dir, "10-pycni.conflist")), "conflist")
        c = cluster(socket)
        assert (c["iface"], c["nodeIPs"]) == ("eth1", ["192.0.2.1"]), c
        log = (tmp_path / "known" / "agent.log").read_text()
        assert "underlay interface eth1: it holds the node's address 192.0.2.1" in log, log
    finally:
        proc.terminate()
        proc.wait(15)
