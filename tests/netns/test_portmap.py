"""hostPorts (capability portMappings) against the real kernel, through the installed plugin,
with both rules backends:

    client (192.0.2.2, 2001:db8:2::2)
      -- veth --
    node (ext0: 192.0.2.1 + 192.0.2.3, 2001:db8:2::1; cni0 10.244.1.1, fd00:10:244:1::1)
      -- bridge --
    pods (10.244.1.x, fd00:10:244:1::x), each running a small echo server

The client has no route to the pods: only the node's DNAT (and its undoing on the way back)
lets it in.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import subprocess
import sys

import pytest
from test_cluster import POD_TCP, SVC_TCP, VIP4, kube_proxy_rules

from conftest import TEST_FAULTS, Node, ask, pod_name, server, unique

pytestmark = pytest.mark.netns

NODE4, NODE4_OTHER, CLIENT4 = "192.0.2.1", "192.0.2.3", "192.0.2.2"
NODE6, CLIENT6 = "2001:db8:2::1", "2001:db8:2::2"
GATEWAY4 = "10.244.1.1"
DUAL = {
    "subnet": None,
    "ranges": [[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:10:244:1::/64"}]],
}


def _iptables_usable() -> bool:
    return all(shutil.which(t) for t in ("iptables", "ip6tables", "iptables-restore"))


@pytest.fixture(params=["nft", "iptables"])
def backend(request) -> str:
    if request.param == "nft" and shutil.which("nft") is None:
        pytest.skip("nft not installed")
    if request.param == "iptables" and not _iptables_usable():
        pytest.skip("iptables not installed")
    return request.param


@pytest.fixture
def client(node: Node) -> str:
    """A netns on the node's external link, with no route to the pods."""
    ns = node.spaces.make("cli")
    node.exec("ip", "link", "add", "ext0", "type", "veth", "peer", "name", "eth0", "netns", ns)
    for addr in (f"{NODE4}/24", f"{NODE4_OTHER}/24", f"{NODE6}/64"):
        node.exec("ip", "addr", "add", addr, "dev", "ext0", *(("nodad",) if ":" in addr else ()))
    node.exec("ip", "link", "set", "ext0", "up")
    for addr in (f"{CLIENT4}/24", f"{CLIENT6}/64"):
        node.spaces.exec(
            ns, "ip", "addr", "add", addr, "dev", "eth0", *(("nodad",) if ":" in addr else ())
        )
    node.spaces.exec(ns, "ip", "link", "set", "eth0", "up")
    node.spaces.exec(ns, "ip", "link", "set", "lo", "up")
    return ns


def mappings(*items: dict) -> dict:
    return {"portMappings": list(items)}


def add(node: Node, pod: str, cid: str, backend: str, rc: dict, **conf) -> dict:
    return node.add(pod, cid, node.conf(runtimeConfig=rc, **conf), env=_env(backend))


def delete(node: Node, pod: str, cid: str, backend: str) -> None:
    assert node.run("DEL", container_id=cid, netns=pod, env=_env(backend)).rc == 0


def _env(backend: str) -> dict:
    return {"PYCNI_RULES_BACKEND": backend}


def rules_text(node: Node, backend: str) -> str:
    if backend == "nft":
        return node.exec("nft", "list", "ruleset").stdout
    return "".join(
        node.exec(tool, "-w", "-t", table, "-S").stdout
        for tool in ("iptables", "ip6tables")
        for table in ("nat", "filter")
    )


def installed_hostports(node: Node, backend: str) -> list[str]:
    """pycni's own read-back of its rules in the node, as `proto host_ip:port -> pod:port`."""
    code = (
        "import json, sys\n"
        "from pycni.rules import sync\n"
        "got = sync.installed(sys.argv[1])\n"
        'print(json.dumps([] if got is None else [f\'{h.protocol} {h.host_ip or "*"}:'
        "{h.host_port} -> {h.pod_ip}:{h.pod_port}' for h in got.hostports]))\n"
    )
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    out = subprocess.run(
        ["ip", "netns", "exec", node.ns, sys.executable, "-c", code, backend],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={**os.environ, "PYTHONPATH": src},
    ).stdout
    return json.loads(out)


def installed_is_desired(node: Node, backend: str) -> bool:
    """Whether the rules read back from the node's kernel equal what its store wants."""
    code = (
        "import sys\n"
        "from pycni.core import masquerade\n"
        "from pycni.ipam.store import Store\n"
        "from pycni.rules import sync\n"
        "with Store(sys.argv[2]) as store:\n"
        "    want = masquerade.desired_rules(store)\n"
        "got = sync.installed(sys.argv[1])\n"
        "print(got == want, want, got, sep='\\n')\n"
    )
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    out = subprocess.run(
        [
            "ip",
            "netns",
            "exec",
            node.ns,
            sys.executable,
            "-c",
            code,
            backend,
            os.path.join(node.root, "data"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={**os.environ, "PYTHONPATH": src},
    ).stdout
    assert out.startswith("True"), out
    return True


def no_pycni_rules(node: Node, backend: str) -> bool:
    text = rules_text(node, backend)
    return "pycni" not in text and "PYCNI" not in text


# --------------------------------------------------------------------------- tests


def test_tcp_and_udp_via_node_address(node, client, backend):
    pod = node.pod()
    # The second entry in containerd's spelling, protocol in capitals.
    rc = mappings(
        {"hostPort": 8080, "containerPort": 80, "protocol": "tcp"},
        {"HostPort": 8053, "ContainerPort": 5353, "Protocol": "UDP", "HostIP": ""},
    )
    add(node, pod, "c1", backend, rc)
    with server(pod_name(pod), "pod1"):
        assert ask(client, "tcp", NODE4, 8080) == f"pod1 {CLIENT4}"
        assert ask(client, "udp", NODE4, 8053) == f"pod1 {CLIENT4}"
        assert ask(client, "tcp", NODE4_OTHER, 8080) == f"pod1 {CLIENT4}"
        assert ask(client, "udp", NODE4, 8080) is None  # tcp only
        assert sorted(installed_hostports(node, backend)) == [
            "tcp *:8080 -> 10.244.1.2:80",
            "udp *:8053 -> 10.244.1.2:5353",
        ]

        delete(node, pod, "c1", backend)
        assert ask(client, "tcp", NODE4, 8080) is None
        assert ask(client, "udp", NODE4, 8053) is None
    assert no_pycni_rules(node, backend)
    assert "8080" not in rules_text(node, backend)


def test_host_ip_restricts_to_that_address(node, client, backend):
    pod = node.pod()
    add(
        node,
        pod,
        "c1",
        backend,
        mappings({"hostPort": 8080, "containerPort": 80, "hostIP": NODE4_OTHER}),
    )
    with server(pod_name(pod), "pod1"):
        assert ask(client, "tcp", NODE4_OTHER, 8080) == f"pod1 {CLIENT4}"
        assert ask(client, "tcp", NODE4, 8080) is None
        assert installed_hostports(node, backend) == [f"tcp {NODE4_OTHER}:8080 -> 10.244.1.2:80"]
    delete(node, pod, "c1", backend)
    assert no_pycni_rules(node, backend)


def test_two_pods_same_port_on_different_addresses(node, client, backend):
    pod1, pod2 = node.pod(), node.pod()
    add(
        node,
        pod1,
        "c1",
        backend,
        mappings({"hostPort": 8080, "containerPort": 80, "hostIP": NODE4}),
    )
    add(
        node,
        pod2,
        "c2",
        backend,
        mappings({"hostPort": 8080, "containerPort": 80, "hostIP": NODE4_OTHER}),
    )
    with server(pod_name(pod1), "pod1"), server(pod_name(pod2), "pod2"):
        assert ask(client, "tcp", NODE4, 8080) == f"pod1 {CLIENT4}"
        assert ask(client, "tcp", NODE4_OTHER, 8080) == f"pod2 {CLIENT4}"
        delete(node, pod1, "c1", backend)
        assert ask(client, "tcp", NODE4, 8080) is None
        assert ask(client, "tcp", NODE4_OTHER, 8080) == f"pod2 {CLIENT4}"
    delete(node, pod2, "c2", backend)
    assert no_pycni_rules(node, backend)


def test_localhost_on_the_node(node, backend):
    pod1, pod2 = node.pod(), node.pod()
    add(node, pod1, "c1", backend, mappings({"hostPort": 8080, "containerPort": 80}))
    add(
        node,
        pod2,
        "c2",
        backend,
        mappings({"hostPort": 9090, "containerPort": 80, "hostIP": "127.0.0.1"}),
    )
    route_localnet = "/proc/sys/net/ipv4/conf/cni0/route_localnet"
    assert node.exec("cat", route_localnet).stdout.strip() == "1"
    with server(pod_name(pod1), "pod1"), server(pod_name(pod2), "pod2"):
        # The pod sees the bridge's address: 127.0.0.1 is masqueraded.
        assert ask(node.ns, "tcp", "127.0.0.1", 8080) == f"pod1 {GATEWAY4}"
        assert ask(node.ns, "udp", "127.0.0.1", 8080) is None
        assert ask(node.ns, "tcp", "127.0.0.1", 9090) == f"pod2 {GATEWAY4}"
        assert ask(node.ns, "tcp", GATEWAY4, 9090) is None  # hostIP 127.0.0.1 only
        assert ask(node.ns, "tcp", GATEWAY4, 8080) == f"pod1 {GATEWAY4}"
    for cid, pod in (("c1", pod1), ("c2", pod2)):
        delete(node, pod, cid, backend)
    assert node.exec("cat", route_localnet).stdout.strip() == "0"
    assert no_pycni_rules(node, backend)


def test_pods_cannot_reach_node_localhost(node, backend):
    """route_localnet on the bridge must not open the node's 127.0.0.0/8 to pods."""
    pod = node.pod()
    add(node, pod, "c1", backend, mappings({"hostPort": 8080, "containerPort": 80}))
    assert node.exec("cat", "/proc/sys/net/ipv4/conf/cni0/route_localnet").stdout.strip() == "1"
    mac = json.loads(node.exec("ip", "-j", "link", "show", "cni0").stdout)[0]["address"]
    # Raw frames to the bridge's MAC: the gateway address (which must arrive: proof the
    # frames are good) and 127.0.0.1 (which must not).
    got = spoofed_udp(node, pod_name(pod), mac, [GATEWAY4, "127.0.0.1"])
    assert got == {GATEWAY4}
    delete(node, pod, "c1", backend)


def spoofed_udp(node: Node, pod_ns: str, mac: str, targets: list[str]) -> set[str]:
    """Which of `targets` a UDP sink on the node received datagrams for, sent from the pod as
    raw frames to `mac` (the pod's own routing would keep 127/8 local)."""
    sink = subprocess.Popen(
        ["ip", "netns", "exec", node.ns, sys.executable, "-u", "-c", _UDP_SINK],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert sink.stdout.readline().strip() == "ready", sink.stderr.read()
        sender = subprocess.run(
            ["ip", "netns", "exec", pod_ns, sys.executable, "-c", _RAW_UDP, mac, *targets],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert sender.returncode == 0, sender.stderr
        # Raw reads: a buffered readline() would hide lines from select().
        fd, data = sink.stdout.fileno(), b""
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while sel.select(timeout=2):
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                data += chunk
        return set(data.decode().split())
    finally:
        sink.kill()
        sink.wait(timeout=10)
        sink.stdout.close()
        sink.stderr.close()


_UDP_SINK = """
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 7071))
print("ready")
while True:
    print(s.recv(100).decode())
"""

# UDP datagrams (payload: their destination) from the pod's address, one frame per target,
# three times, straight to the given MAC. UDP checksum 0: none, allowed over IPv4.
_RAW_UDP = """
import socket, struct, sys, time
mac = bytes.fromhex(sys.argv[1].replace(":", ""))
def csum(data):
    s = sum(struct.unpack(f"!{len(data)//2}H", data))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.bind(("eth0", 0))
own = s.getsockname()[4]
for _ in range(3):
    for target in sys.argv[2:]:
        payload = target.encode()
        udp = struct.pack("!HHHH", 40000, 7071, 8 + len(payload), 0) + payload
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                         socket.inet_aton("10.244.1.2"), socket.inet_aton(target))
        ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:]
        s.send(mac + own + b"\\x08\\x00" + ip + udp)
    time.sleep(0.1)
"""


@pytest.mark.parametrize("br_netfilter", ["on", "off"])
def test_hairpin_pod_reaches_itself_and_neighbour(node, client, backend, br_netfilter):
    path = "/proc/sys/net/bridge/bridge-nf-call-iptables"
    if not os.path.exists(path):
        if br_netfilter == "on":
            pytest.skip("no br_netfilter in this kernel")
    else:
        # Per network namespace: only the node's changes.
        node.exec("sh", "-c", f"echo {1 if br_netfilter == 'on' else 0} > {path}")
    pod1, pod2 = node.pod(), node.pod()
    # hairpinMode off (it is on by default): a pod with hostPorts gets hairpin all the same.
    add(
        node,
        pod1,
        "c1",
        backend,
        mappings({"hostPort": 8080, "containerPort": 80}),
        hairpinMode=False,
    )
    add(node, pod2, "c2", backend, {}, hairpinMode=False)
    with server(pod_name(pod1), "pod1"):
        # The pod itself and its neighbour on the bridge, through the node's address: both
        # answered via the node (masqueraded), or the answer would bypass the DNAT's undoing.
        assert ask(pod_name(pod1), "tcp", NODE4, 8080) == f"pod1 {GATEWAY4}"
        assert ask(pod_name(pod1), "udp", NODE4, 5353) is None  # not mapped
        assert ask(pod_name(pod2), "tcp", NODE4, 8080) == f"pod1 {GATEWAY4}"
        # Outside clients keep their address.
        assert ask(client, "tcp", NODE4, 8080) == f"pod1 {CLIENT4}"
    link = json.loads(node.exec("ip", "-d", "-j", "link", "show", "master", "cni0").stdout)
    hairpin = {x["ifname"]: x["linkinfo"]["info_slave_data"]["hairpin"] for x in link}
    assert sorted(hairpin.values()) == [False, True]  # only the pod with a mapping
    delete(node, pod1, "c1", backend)
    delete(node, pod2, "c2", backend)
    assert no_pycni_rules(node, backend)


def test_dual_stack_maps_each_family(node, client, backend):
    pod = node.pod()
    add(
        node,
        pod,
        "c1",
        backend,
        mappings(
            {"hostPort": 8080, "containerPort": 80},
            {"hostPort": 8081, "containerPort": 80, "hostIP": "::"},
            {"hostPort": 8082, "containerPort": 80, "hostIP": "0.0.0.0"},
        ),
        **DUAL,
    )
    with server(pod_name(pod), "pod1"):
        assert ask(client, "tcp", NODE4, 8080) == f"pod1 {CLIENT4}"
        assert ask(client, "tcp", NODE6, 8080) == f"pod1 {CLIENT6}"
        assert ask(client, "tcp", NODE6, 8081) == f"pod1 {CLIENT6}"
        assert ask(client, "tcp", NODE4, 8081) is None
        assert ask(client, "tcp", NODE4, 8082) == f"pod1 {CLIENT4}"
        assert ask(client, "tcp", NODE6, 8082) is None
        # Hairpin over IPv6 as well.
        assert ask(pod_name(pod), "tcp", NODE6, 8080) == "pod1 fd00:10:244:1::1"
        # ::1 cannot be DNATed (no route_localnet in IPv6): it stays the node's own, while
        # 127.0.0.1 goes to the pod.
        with server(node.ns, "node", tport=8080, uport=8090):
            assert ask(node.ns, "tcp", "::1", 8080) == "node ::1"
            assert ask(node.ns, "tcp", "127.0.0.1", 8080) == f"pod1 {GATEWAY4}"
    assert sorted(installed_hostports(node, backend)) == [
        "tcp *:8080 -> 10.244.1.2:80",
        "tcp *:8080 -> fd00:10:244:1::2:80",
        "tcp *:8081 -> fd00:10:244:1::2:80",
        "tcp *:8082 -> 10.244.1.2:80",
    ]
    assert installed_is_desired(node, backend)
    delete(node, pod, "c1", backend)
    assert no_pycni_rules(node, backend)


def test_same_host_port_twice_fails_and_leaves_nothing(node, client, backend):
    pod1, pod2 = node.pod(), node.pod()
    add(node, pod1, "c1", backend, mappings({"hostPort": 8080, "containerPort": 80}))
    before = rules_text(node, backend)
    conf = node.conf(
        runtimeConfig=mappings(
            {"hostPort": 9000, "containerPort": 80},
            {"hostPort": 8080, "containerPort": 81, "hostIP": NODE4},
        )
    )
    reply = node.run("ADD", conf, container_id="c2", netns=pod2, env=_env(backend))
    assert reply.rc != 0 and reply.code == 101, reply
    assert "8080/tcp" in reply.out["msg"] and "c1" in reply.out["msg"], reply
    assert len(node.spaces.exec(pod_name(pod2), "ip", "-o", "link").stdout.splitlines()) == 1
    assert len([x for x in node.links() if x.startswith("veth")]) == 1
    assert rules_text(node, backend) == before
    # Another protocol on the same port is fine.
    add(
        node,
        pod2,
        "c2",
        backend,
        mappings({"hostPort": 8080, "containerPort": 80, "protocol": "udp"}),
        ipMasq=True,
    )
    assert installed_is_desired(node, backend)  # hostPorts beside masquerade
    with server(pod_name(pod1), "pod1"), server(pod_name(pod2), "pod2", uport=80):
        assert ask(client, "tcp", NODE4, 8080) == f"pod1 {CLIENT4}"
        assert ask(client, "udp", NODE4, 8080) == f"pod2 {CLIENT4}"
    delete(node, pod1, "c1", backend)
    delete(node, pod2, "c2", backend)
    assert no_pycni_rules(node, backend)


def test_bad_mapping_is_code_7_and_leaves_nothing(node, backend):
    pod = node.pod()
    for bad in (
        {"hostPort": 0, "containerPort": 80},
        {"hostPort": 8080, "containerPort": 80, "protocol": "sctp"},
        {"hostPort": 8080, "containerPort": 80, "hostIP": "fd00::1"},
    ):
        conf = node.conf(runtimeConfig=mappings(bad))
        reply = node.run("ADD", conf, container_id="c1", netns=pod, env=_env(backend))
        assert reply.code == 7 and "portMappings" in reply.out["msg"], reply
    assert [x for x in node.links() if x.startswith("veth")] == []
    assert no_pycni_rules(node, backend)


def test_check_sees_missing_rules(node, backend):
    pod = node.pod()
    conf = node.conf(
        cniVersion="1.0.0", runtimeConfig=mappings({"hostPort": 8080, "containerPort": 80})
    )
    result = node.add(pod, "c1", conf, env=_env(backend))
    check = dict(conf, prevResult=result)
    assert node.run("CHECK", check, container_id="c1", netns=pod, env=_env(backend)).rc == 0
    # Someone flushes the rules: CHECK says so.
    if backend == "nft":
        node.exec("nft", "delete", "table", "inet", "pycni")
    else:
        node.exec("iptables", "-w", "-t", "nat", "-F", "PYCNI-HOSTPORTS")
    reply = node.run("CHECK", check, container_id="c1", netns=pod, env=_env(backend))
    assert reply.code == 104 and "8080" in reply.out["msg"], reply
    delete(node, pod, "c1", backend)


@pytest.mark.parametrize("step", ["ipam", "host", "masquerade"])
def test_failed_add_leaves_nothing(node, client, backend, step):
    pod = node.pod()
    conf = node.conf(runtimeConfig=mappings({"hostPort": 8080, "containerPort": 80}))
    reply = node.run(
        "ADD",
        conf,
        container_id="c1",
        netns=pod,
        env={**_env(backend), **TEST_FAULTS, "PYCNI_FAIL_AFTER": step},
    )
    assert reply.code == 199 and step in reply.out["msg"], reply
    assert no_pycni_rules(node, backend)
    assert [x for x in node.links() if x.startswith("veth")] == []
    # The port is free again: another pod takes it and is reached.
    other = node.pod()
    add(node, other, "c2", backend, mappings({"hostPort": 8080, "containerPort": 80}))
    with server(pod_name(other), "pod2"):
        assert ask(client, "tcp", NODE4, 8080) == f"pod2 {CLIENT4}"
    delete(node, other, "c2", backend)


def test_gc_removes_the_mappings_of_gone_pods(node, client, backend):
    pod1, pod2 = node.pod(), node.pod()
    add(node, pod1, "c1", backend, mappings({"hostPort": 8080, "containerPort": 80}))
    add(node, pod2, "c2", backend, mappings({"hostPort": 8081, "containerPort": 80}))
    gc = node.conf(**{"cni.dev/valid-attachments": [{"containerID": "c2", "ifname": "eth0"}]})
    assert node.run("GC", gc, container_id=None, ifname=None, netns=None, env=_env(backend)).rc == 0
    assert installed_hostports(node, backend) == ["tcp *:8081 -> 10.244.1.3:80"]
    with server(pod_name(pod1), "pod1"), server(pod_name(pod2), "pod2"):
        assert ask(client, "tcp", NODE4, 8080) is None
        assert ask(client, "tcp", NODE4, 8081) == f"pod2 {CLIENT4}"
    delete(node, pod2, "c2", backend)
    assert no_pycni_rules(node, backend)


def test_through_the_agent(node, client, agent):
    """The same core in the node agent (its rules backend: nft when installed)."""
    pod = node.pod()
    node.add(
        pod,
        "c1",
        node.conf(
            runtimeConfig=mappings(
                {"HostPort": 8080, "ContainerPort": 80, "Protocol": "TCP", "HostIP": NODE4}
            )
        ),
    )
    with server(pod_name(pod), "pod1"):
        assert ask(client, "tcp", NODE4, 8080) == f"pod1 {CLIENT4}"
        assert ask(client, "tcp", NODE4_OTHER, 8080) is None
    assert node.run("DEL", container_id="c1", netns=pod).rc == 0
    assert no_pycni_rules(node, "nft" if shutil.which("nft") else "iptables")


def test_service_traffic_between_pods_keeps_the_clients_address(node, client, backend):
    """A Service through kube-proxy (its nftables shape: ClusterIP DNATed to a pod on this
    bridge, br_netfilter on as kube-proxy needs) from a neighbour pod: the server sees the
    client pod's own address, though the server has a hostPort, whose hairpin masquerade
    applies to hostPort traffic only. The pod reaching its own hostPort, and its neighbour
    reaching it there, still work (hairpin, masqueraded), and outside clients keep theirs."""
    path = "/proc/sys/net/bridge/bridge-nf-call-iptables"
    if not os.path.exists(path):
        pytest.skip("no br_netfilter in this kernel")
    node.exec("sh", "-c", f"echo 1 > {path}")
    server_pod, client_pod = node.pod(), node.pod()
    add(node, server_pod, "c1", backend, mappings({"hostPort": 9090, "containerPort": POD_TCP}))
    add(node, client_pod, "c2", backend, {})
    server_ip, client_ip = "10.244.1.2", "10.244.1.3"
    table = unique("kp")
    rules = kube_proxy_rules(table, "ip", VIP4, server_ip, "10.244.0.0/16")
    node.spaces.exec(node.ns, "nft", "-f", "-", input=rules)
    try:
        with server(pod_name(server_pod), "pod1", tport=POD_TCP):
            assert ask(pod_name(client_pod), "tcp", VIP4, SVC_TCP) == f"pod1 {client_ip}"
            assert ask(pod_name(server_pod), "tcp", NODE4, 9090) == f"pod1 {GATEWAY4}"
            assert ask(pod_name(client_pod), "tcp", NODE4, 9090) == f"pod1 {GATEWAY4}"
            assert ask(client, "tcp", NODE4, 9090) == f"pod1 {CLIENT4}"
            assert installed_is_desired(node, backend)
    finally:
        node.exec("nft", "delete", "table", "ip", table)
    delete(node, server_pod, "c1", backend)
    delete(node, client_pod, "c2", backend)
    assert no_pycni_rules(node, backend)
