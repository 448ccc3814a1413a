"""The data plane through the installed plugin, in a sandboxed node: connectivity, concurrency,
exhaustion, rollback after an injected failure, dual stack, config options and masquerade.

Everything runs inside namespaces made by the `netns` fixture (the node and its pods), so the
machine's own cni0, nftables and /etc/cni are never touched.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest

from conftest import TEST_FAULTS, Node, pod_name
from pycni.core.faults import ADD_STEPS
from pycni.dataplane.names import host_veth_name
from pycni.ipam.store import Store

pytestmark = pytest.mark.netns
# Every test here runs through the in-process plugin and through the node agent.
BOTH_MODES = True

PY = "/usr/bin/python3"

# Accepts connections until killed; answers each with "<peer address> <what it received>".
SERVER = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port))
s.listen(16)
print("ready", flush=True)
while True:
    c, peer = s.accept()
    with c:
        data = b""
        while True:
            chunk = c.recv(4096)
            if not chunk:
                break
            data += chunk
        c.sendall(peer[0].encode() + b" " + data)
"""

CLIENT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
s.sendall(sys.argv[4].encode())
s.shutdown(socket.SHUT_WR)
out = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    out += chunk
print(out.decode())
"""


# --------------------------------------------------------------------------- helpers


@contextmanager
def tcp_server(ns: str, host: str, port: int = 7777):
    """An echo server in netns `ns`, killed on the way out whatever happens."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns, PY, "-c", SERVER, host, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", f"server in {ns} did not start: {proc.stderr.read()}"
        yield
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def tcp(
    spaces, ns: str, host: str, port: int = 7777, timeout: float = 3, check: bool = True
) -> subprocess.CompletedProcess:
    """Connect from netns `ns`; stdout is "<source address seen by the server> ping"."""
    return spaces.exec(
        ns,
        PY,
        "-c",
        CLIENT,
        host,
        str(port),
        str(timeout),
        "ping",
        check=check,
        timeout=timeout + 10,
    )


def seen_source(spaces, ns: str, host: str, port: int = 7777) -> str:
    out = tcp(spaces, ns, host, port).stdout.strip()
    source, _, payload = out.partition(" ")
    assert payload == "ping", out
    return source


def ping(spaces, ns: str, target: str, *, v6: bool = False) -> None:
    args = ["ping", "-6"] if v6 else ["ping"]
    res = spaces.exec(ns, *args, "-c1", "-W2", target, check=False)
    assert res.returncode == 0, f"ping {target} from {ns} failed: {res.stdout}{res.stderr}"


def ip_json(spaces, ns: str, *args: str) -> list[dict]:
    return json.loads(spaces.exec(ns, "ip", "-j", *args).stdout or "[]")


def link(spaces, ns: str, dev: str) -> dict:
    return ip_json(spaces, ns, "-d", "link", "show", "dev", dev)[0]


def pod_links(spaces, ns: str) -> list[str]:
    return [entry["ifname"] for entry in ip_json(spaces, ns, "link", "show")]


def pod_addrs(spaces, ns: str, dev: str = "eth0") -> list[str]:
    out = []
    for entry in ip_json(spaces, ns, "addr", "show", "dev", dev):
        out += [
            f"{a['local']}/{a['prefixlen']}"
            for a in entry.get("addr_info", [])
            if a.get("scope") == "global"
        ]
    return out


def routes(spaces, ns: str, family: str = "-4") -> list[dict]:
    return ip_json(spaces, ns, family, "route", "show")


def host_veths(node: Node) -> list[str]:
    return [name for name in node.links() if name.startswith("veth")]


def ips_of(result: dict) -> list[str]:
    return [ip["address"] for ip in result["ips"]]


def v4(result: dict) -> str:
    return next(a.split("/")[0] for a in ips_of(result) if ":" not in a)


def nft_tables(node: Node) -> str:
    return node.exec("nft", "list", "tables").stdout


def attachments(node: Node) -> list:
    with Store(node.conf()["dataDir"]) as store:
        return store.list_attachments()


def add_fails(node: Node, pod: str, cid: str, conf: dict | None = None, **kw):
    reply = node.run("ADD", conf, container_id=cid, netns=pod, **kw)
    assert reply.rc != 0 and reply.code is not None, reply
    return reply


def assert_pod_untouched(node: Node, pod: str, cid: str) -> None:
    assert pod_links(node.spaces, pod_name(pod)) == ["lo"]
    assert host_veth_name(node.name, cid, "eth0") not in node.links()


# --------------------------------------------------------------------------- 1. connectivity


def test_connectivity_on_one_node(node):
    pods = [node.pod() for _ in range(3)]
    results = [node.add(p, f"c{i}") for i, p in enumerate(pods)]
    addrs = [v4(r) for r in results]
    assert addrs == ["10.244.1.2", "10.244.1.3", "10.244.1.4"]
    ns = [pod_name(p) for p in pods]
    spaces = node.spaces

    for i, src in enumerate(ns):
        for j, dst in enumerate(addrs):
            if i != j:
                ping(spaces, src, dst)
        ping(spaces, src, "10.244.1.1")
    for dst in addrs:
        ping(spaces, node.ns, dst)

    # Every host end is on the bridge and up; the pod end carries the allocated address.
    for i, r in enumerate(results):
        name = host_veth_name(node.name, f"c{i}", "eth0")
        assert [x["name"] for x in r["interfaces"]] == ["cni0", name, "eth0"]
        host = link(spaces, node.ns, name)
        assert host.get("master") == "cni0" and host["operstate"] == "UP"
        assert pod_addrs(spaces, ns[i]) == [f"{addrs[i]}/24"]

    with tcp_server(ns[1], "0.0.0.0"):
        assert seen_source(spaces, ns[0], addrs[1]) == addrs[0]
        assert seen_source(spaces, ns[2], addrs[1]) == addrs[2]
    with tcp_server(node.ns, "10.244.1.1", 7778):
        assert seen_source(spaces, ns[0], "10.244.1.1", 7778) == addrs[0]


# --------------------------------------------------------------------------- 2. concurrency


def test_fifty_concurrent_adds_and_dels(node):
    # 50 allocatable addresses exactly (.2-.51 of a /26, gateway .1): a leak shows as a refusal.
    node.base.update(subnet="10.244.1.0/26", rangeEnd="10.244.1.51")
    count = 50
    pods = [node.pod() for _ in range(count)]
    cids = [f"ctr{i:02d}" for i in range(count)]

    def add(i):
        return node.run("ADD", container_id=cids[i], netns=pods[i])

    def delete(i):
        return node.run("DEL", container_id=cids[i], netns=pods[i])

    with ThreadPoolExecutor(max_workers=count) as pool:
        replies = list(pool.map(add, range(count)))
    assert [r for r in replies if r.rc != 0] == []
    subnet = ipaddress.ip_network("10.244.1.0/26")
    got = [ipaddress.ip_interface(r.out["ips"][0]["address"]) for r in replies]
    assert len({g.ip for g in got}) == count
    for g in got:
        assert g.network == subnet
        assert g.ip not in (
            subnet.network_address,
            subnet.network_address + 1,
            subnet.broadcast_address,
        )
    bridged = [
        name
        for name in host_veths(node)
        if link(node.spaces, node.ns, name).get("master") == "cni0"
    ]
    assert sorted(bridged) == sorted(host_veth_name(node.name, c, "eth0") for c in cids)
    # Each pod holds the address its result reported.
    for i in (0, count // 2, count - 1):
        assert pod_addrs(node.spaces, pod_name(pods[i])) == [str(got[i])]

    extra = node.pod()
    assert add_fails(node, extra, "extra").code == 100
    assert node.run("STATUS").rc != 0

    with ThreadPoolExecutor(max_workers=count) as pool:
        replies = list(pool.map(delete, range(count)))
    assert [r for r in replies if r.rc != 0] == []
    assert host_veths(node) == []
    # Nothing held: no attachment and no address in the store, and the pool reports room.
    assert attachments(node) == []
    with Store(node.conf()["dataDir"]) as store:
        assert store.conn.execute("SELECT COUNT(*) FROM allocations").fetchone()[0] == 0
    assert node.run("STATUS").rc == 0
    assert v4(node.add(extra, "extra")) in {str(g.ip) for g in got}


# --------------------------------------------------------------------------- 3. exhaustion


def test_exhaustion_and_release(node):
    node.subnet = "10.244.1.0/29"  # .2-.6 usable
    pods = [node.pod() for _ in range(5)]
    got = [v4(node.add(p, f"c{i}")) for i, p in enumerate(pods)]
    assert sorted(got) == [f"10.244.1.{n}" for n in range(2, 7)]

    sixth = node.pod()
    reply = add_fails(node, sixth, "c6")
    assert reply.code == 100
    assert "no free address" in reply.out["msg"] or "exhausted" in reply.out["msg"]
    assert_pod_untouched(node, sixth, "c6")
    assert len(attachments(node)) == 5

    victim = got.index("10.244.1.4")
    assert node.run("DEL", container_id=f"c{victim}", netns=pods[victim]).rc == 0
    assert v4(node.add(sixth, "c6")) == "10.244.1.4"
    ping(node.spaces, pod_name(sixth), got[0])


def test_round_robin_skips_just_freed_address(node):
    pods = [node.pod() for _ in range(4)]
    got = [v4(node.add(p, f"c{i}")) for i, p in enumerate(pods[:3])]
    assert got == ["10.244.1.2", "10.244.1.3", "10.244.1.4"]
    assert node.run("DEL", container_id="c1", netns=pods[1]).rc == 0
    assert v4(node.add(pods[3], "c3")) == "10.244.1.5"


# --------------------------------------------------------------------------- 4. rollback


@pytest.mark.parametrize("step", ADD_STEPS)
def test_failure_after_each_step_leaves_nothing(node, step):
    node.base["ipMasq"] = True
    pod = node.pod()
    reply = add_fails(node, pod, "doomed", env={**TEST_FAULTS, "PYCNI_FAIL_AFTER": step})
    assert reply.code == 199 and step in reply.out["msg"], reply

    assert host_veths(node) == []
    assert pod_links(node.spaces, pod_name(pod)) == ["lo"]
    assert "pycni" not in nft_tables(node)
    assert attachments(node) == []
    assert set(node.links()) <= {"lo", "cni0"}  # the bridge may stay: shared and idempotent

    # The address is free again: another container can take exactly it.
    other = node.pod()
    conf = node.conf(runtimeConfig={"ips": ["10.244.1.2"]})
    assert ips_of(node.add(other, "next", conf)) == ["10.244.1.2/24"]
    ping(node.spaces, pod_name(other), "10.244.1.1")


# --------------------------------------------------------------------------- 5. dual stack


def test_dual_stack(node):
    # subnet=None sends "subnet": null, which netconf treats as absent (ranges replaces it).
    node.base.update(
        subnet=None, ranges=[[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:10:244:1::/64"}]]
    )
    pod1, pod2 = node.pod(), node.pod()
    r1, r2 = node.add(pod1, "c1"), node.add(pod2, "c2")
    assert ips_of(r1) == ["10.244.1.2/24", "fd00:10:244:1::2/64"]
    assert ips_of(r2) == ["10.244.1.3/24", "fd00:10:244:1::3/64"]
    assert [ip.get("gateway") for ip in r1["ips"]] == ["10.244.1.1", "fd00:10:244:1::1"]

    ns1, ns2 = pod_name(pod1), pod_name(pod2)
    spaces = node.spaces
    assert sorted(pod_addrs(spaces, ns1)) == ["10.244.1.2/24", "fd00:10:244:1::2/64"]
    v4_default = [r for r in routes(spaces, ns1, "-4") if r["dst"] == "default"]
    v6_default = [r for r in routes(spaces, ns1, "-6") if r["dst"] == "default"]
    assert [r["gateway"] for r in v4_default] == ["10.244.1.1"]
    assert [r["gateway"] for r in v6_default] == ["fd00:10:244:1::1"]

    ping(spaces, ns1, "fd00:10:244:1::3", v6=True)
    ping(spaces, ns2, "fd00:10:244:1::2", v6=True)
    ping(spaces, ns1, "fd00:10:244:1::1", v6=True)
    ping(spaces, ns1, "10.244.1.3")
    with tcp_server(ns2, "::"):
        assert seen_source(spaces, ns1, "fd00:10:244:1::3") == "fd00:10:244:1::2"

    for cid, pod in (("c1", pod1), ("c2", pod2)):
        assert node.run("DEL", container_id=cid, netns=pod).rc == 0
    assert attachments(node) == []
    assert host_veths(node) == []
    # Both families start over from the same (freed) pools: nothing is held.
    assert node.run("STATUS").rc == 0


# --------------------------------------------------------------------------- 6. options


def test_mtu(node):
    pod = node.pod()
    node.add(pod, "c1", node.conf(mtu=1400))
    assert link(node.spaces, pod_name(pod), "eth0")["mtu"] == 1400
    assert link(node.spaces, node.ns, host_veth_name(node.name, "c1", "eth0"))["mtu"] == 1400


def test_hairpin_mode(node):
    on, default, off = node.pod(), node.pod(), node.pod()
    on_out = node.add(on, "hp", node.conf(hairpinMode=True))
    default_out = node.add(default, "dflt")
    off_out = node.add(off, "nohp", node.conf(hairpinMode=False))

    def hairpin(cid):
        dev = host_veth_name(node.name, cid, "eth0")
        return node.exec("cat", f"/sys/class/net/{dev}/brport/hairpin_mode").stdout.strip()

    assert hairpin("hp") == "1"
    assert hairpin("dflt") == "1"  # on unless turned off: kubelet's hairpin-veth expects it
    assert hairpin("nohp") == "0"

    # CHECK verifies it: a port that lost hairpin mode is drift, with the repair.
    def check(pod, cid, out, **conf):
        return node.run("CHECK", node.conf(prevResult=out, **conf), container_id=cid, netns=pod)

    assert check(default, "dflt", default_out).rc == 0
    assert check(off, "nohp", off_out, hairpinMode=False).rc == 0
    dev = host_veth_name(node.name, "dflt", "eth0")
    node.exec("ip", "link", "set", dev, "type", "bridge_slave", "hairpin", "off")
    reply = check(default, "dflt", default_out)
    assert reply.rc != 0 and reply.code == 104, reply
    assert f"host veth {dev} is not in hairpin mode (hairpinMode)" in reply.out["msg"]
    assert f"bridge link set dev {dev} hairpin on" in reply.out["msg"]
    assert check(on, "hp", on_out, hairpinMode=True).rc == 0


def test_no_default_gateway_with_routes(node):
    pod = node.pod()
    res = node.add(pod, "c1", node.conf(isDefaultGateway=False, routes=[{"dst": "10.96.0.0/12"}]))
    table = routes(node.spaces, pod_name(pod))
    assert not [r for r in table if r["dst"] == "default"]
    svc = [r for r in table if r["dst"] == "10.96.0.0/12"]
    assert len(svc) == 1 and svc[0]["gateway"] == "10.244.1.1" and svc[0]["dev"] == "eth0"
    assert res["routes"] == [{"dst": "10.96.0.0/12", "gw": "10.244.1.1"}]


def test_custom_gateway(node):
    node.base["gateway"] = "10.244.1.254"
    pod1, pod2 = node.pod(), node.pod()
    r1 = node.add(pod1, "c1")
    # rangeStart defaults to network+1; only the network address and the gateway are held back.
    assert ips_of(r1) == ["10.244.1.1/24"]
    assert r1["ips"][0]["gateway"] == "10.244.1.254"
    assert v4(node.add(pod2, "c2")) == "10.244.1.2"
    assert pod_addrs(node.spaces, node.ns, "cni0") == ["10.244.1.254/24"]
    default = [r for r in routes(node.spaces, pod_name(pod1)) if r["dst"] == "default"]
    assert [r["gateway"] for r in default] == ["10.244.1.254"]
    ping(node.spaces, pod_name(pod1), "10.244.1.254")
    ping(node.spaces, pod_name(pod1), "10.244.1.2")


def test_range_start_and_end(node):
    node.base.update(rangeStart="10.244.1.10", rangeEnd="10.244.1.11")
    pods = [node.pod() for _ in range(3)]
    assert v4(node.add(pods[0], "c0")) == "10.244.1.10"
    assert v4(node.add(pods[1], "c1")) == "10.244.1.11"
    assert add_fails(node, pods[2], "c2").code == 100
    assert_pod_untouched(node, pods[2], "c2")


def test_custom_bridge_name_and_dns(node):
    node.bridge = "brpt0"
    dns = {
        "nameservers": ["10.96.0.10"],
        "domain": "cluster.local",
        "search": ["default.svc.cluster.local", "svc.cluster.local"],
        "options": ["ndots:5"],
    }
    pod = node.pod()
    res = node.add(pod, "c1", node.conf(dns=dns))
    assert res["dns"] == dns
    assert res["interfaces"][0]["name"] == "brpt0"
    assert "cni0" not in node.links()
    assert link(node.spaces, node.ns, host_veth_name(node.name, "c1", "eth0"))["master"] == "brpt0"
    assert pod_addrs(node.spaces, node.ns, "brpt0") == ["10.244.1.1/24"]
    ping(node.spaces, pod_name(pod), "10.244.1.1")


def test_two_networks_on_two_bridges(node):
    a = node.conf(name="neta", bridge="bra")
    b = node.conf(
        name="netb",
        bridge="brb",
        subnet="10.245.1.0/24",
        network="10.245.0.0/16",
        isDefaultGateway=False,
    )
    pod1, pod2 = node.pod(), node.pod()
    assert ips_of(node.add(pod1, "c1", a)) == ["10.244.1.2/24"]
    r1b = node.run("ADD", b, container_id="c1", netns=pod1, ifname="net1")
    assert r1b.rc == 0, r1b
    assert ips_of(r1b.out) == ["10.245.1.2/24"]
    assert ips_of(node.add(pod2, "c2", b)) == ["10.245.1.3/24"]

    spaces = node.spaces
    assert link(spaces, node.ns, host_veth_name("neta", "c1", "eth0"))["master"] == "bra"
    assert link(spaces, node.ns, host_veth_name("netb", "c1", "net1"))["master"] == "brb"
    assert link(spaces, node.ns, host_veth_name("netb", "c2", "eth0"))["master"] == "brb"
    assert pod_addrs(spaces, node.ns, "bra") == ["10.244.1.1/24"]
    assert pod_addrs(spaces, node.ns, "brb") == ["10.245.1.1/24"]
    assert pod_addrs(spaces, pod_name(pod1), "net1") == ["10.245.1.2/24"]
    ping(spaces, pod_name(pod2), "10.245.1.2")

    # Deleting one network's attachment leaves the other network's alone.
    assert node.run("DEL", a, container_id="c1", netns=pod1).rc == 0
    assert sorted(pod_links(spaces, pod_name(pod1))) == ["lo", "net1"]
    ping(spaces, pod_name(pod2), "10.245.1.2")
    assert [(x.network, x.container_id) for x in attachments(node)] == [
        ("netb", "c1"),
        ("netb", "c2"),
    ]


def test_existing_bridge_is_reused(node):
    node.exec("ip", "link", "add", "cni0", "type", "bridge")
    node.exec("ip", "addr", "add", "10.244.1.1/24", "dev", "cni0")
    before = link(node.spaces, node.ns, "cni0")["ifindex"]
    pod = node.pod()
    node.add(pod, "c1")
    after = link(node.spaces, node.ns, "cni0")
    assert after["ifindex"] == before
    assert "UP" in after["flags"]
    assert pod_addrs(node.spaces, node.ns, "cni0") == ["10.244.1.1/24"]
    ping(node.spaces, pod_name(pod), "10.244.1.1")


def test_bridge_deleted_by_someone_else_is_made_again(node):
    """The next ADD repairs it (an agent that remembered the old bridge checks again)."""
    node.add(node.pod(), "c1")
    node.exec("ip", "link", "del", "cni0")
    pod2 = node.pod()
    out = node.add(pod2, "c2")
    assert out["ips"][0]["address"] == "10.244.1.3/24"
    assert "10.244.1.1/24" in node.exec("ip", "-o", "addr", "show", "dev", "cni0").stdout
    node.spaces.exec(pod_name(pod2), "ping", "-c1", "-W2", "10.244.1.1")


def test_check_reports_a_bridge_without_its_gateway_address(node):
    pod = node.pod()
    out = node.add(pod, "c1")
    node.exec("ip", "addr", "del", "10.244.1.1/24", "dev", "cni0")
    reply = node.run("CHECK", node.conf(prevResult=out), container_id="c1", netns=pod)
    assert reply.rc != 0 and reply.code == 104, reply
    assert "gateway address 10.244.1.1/24" in reply.out["msg"]


def test_non_bridge_link_with_bridge_name(node):
    node.exec("ip", "link", "add", "cni0", "type", "veth", "peer", "name", "cni0peer")
    pod = node.pod()
    reply = add_fails(node, pod, "c1")
    assert reply.code == 7 and "cni0" in reply.out["msg"], reply
    assert_pod_untouched(node, pod, "c1")
    assert attachments(node) == []
    assert link(node.spaces, node.ns, "cni0")["linkinfo"]["info_kind"] == "veth"


# --------------------------------------------------------------------------- 7. ipMasq


@pytest.fixture
def outside(node):
    """A netns behind the node (192.0.2.2, node side 192.0.2.1) with no route to the pods."""
    out = node.spaces.make("out")
    node.exec("ip", "link", "add", "uplink", "type", "veth", "peer", "name", "eth0", "netns", out)
    node.exec("ip", "addr", "add", "192.0.2.1/24", "dev", "uplink")
    node.exec("ip", "link", "set", "uplink", "up")
    node.spaces.exec(out, "ip", "addr", "add", "192.0.2.2/24", "dev", "eth0")
    node.spaces.exec(out, "ip", "link", "set", "eth0", "up")
    node.spaces.exec(out, "ip", "link", "set", "lo", "up")
    return out


def test_ip_masq(node, outside):
    node.base["ipMasq"] = True
    spaces = node.spaces
    pod1, pod2 = node.pod(), node.pod()
    a1, a2 = v4(node.add(pod1, "c1")), v4(node.add(pod2, "c2"))
    assert "table inet pycni" in nft_tables(node)

    with tcp_server(outside, "0.0.0.0"):
        assert seen_source(spaces, pod_name(pod1), "192.0.2.2") == "192.0.2.1"
    with tcp_server(pod_name(pod2), "0.0.0.0"):
        assert seen_source(spaces, pod_name(pod1), a2) == a1

    assert node.run("DEL", container_id="c1", netns=pod1).rc == 0
    assert "table inet pycni" in nft_tables(node)
    assert node.run("DEL", container_id="c2", netns=pod2).rc == 0
    assert "pycni" not in nft_tables(node)


def test_no_ip_masq(node, outside):
    pod = node.pod()
    node.add(pod, "c1")
    assert "pycni" not in nft_tables(node)
    # Without masquerade the outside has no way back to the pod subnet.
    with tcp_server(outside, "0.0.0.0"):
        res = tcp(node.spaces, pod_name(pod), "192.0.2.2", timeout=1, check=False)
        assert res.returncode != 0, res.stdout


# --------------------------------------------------------------------------- 8. stale veth


def test_stale_host_veth_is_replaced(node):
    stale = host_veth_name(node.name, "c1", "eth0")
    node.exec("ip", "link", "add", stale, "type", "veth", "peer", "name", "stalepeer")
    pod = node.pod()
    res = node.add(pod, "c1")
    assert "stalepeer" not in node.links()
    assert link(node.spaces, node.ns, stale)["master"] == "cni0"
    assert res["interfaces"][1]["name"] == stale
    ping(node.spaces, pod_name(pod), "10.244.1.1")
    assert "stale" in node.log()
