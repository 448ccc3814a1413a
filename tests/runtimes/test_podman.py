"""podman 4.3 (a real libcni client) networking containers through the installed pycni.

Each test gets a private "node": a network namespace with pycni's launcher in a private bin dir,
its config list in a private config dir, its data dir and (in agent mode) its agent under
tmp_path, and a podman whose storage, run state and configs live under tmp_path too. podman
runs inside the node namespace, so the bridge it gets from pycni is the node's own cni0.
"""

from __future__ import annotations

import contextlib
import glob
import ipaddress
import json
import os
import shutil
import subprocess

import pytest

from conftest import Node, agent_for, namespaces_named, run_bench, sh, unique
from pycni.bench.podman import fetch
from pycni.harness.podman import CNI_CACHE_RESULTS, Podman, mounts_below, process_alive
from pycni.ipam.store import Store
from pycni.node_config import CONFLIST_NAME, node_conflist, write_conflist

pytestmark = [
    pytest.mark.netns,
    pytest.mark.runtimes,
    pytest.mark.skipif(
        shutil.which("podman") is None,
        reason="podman is not installed (Debian packages podman, runc, busybox-static)",
    ),
    pytest.mark.skipif(
        not os.path.exists("/bin/busybox"),
        reason="/bin/busybox is not installed (Debian package busybox-static)",
    ),
]

SUBNET = "10.88.7.0/24"
GATEWAY = "10.88.7.1"
CLUSTER = "10.88.0.0/16"
HOST_PORT = 18080
# podman 4.3 vendors libcni 1.1, which cannot parse a 1.1.0 result ("unsupported CNI result
# version"): its configs must say 1.0.0.
LIBCNI_VERSION = "1.0.0"
NODE_ADDR, CLIENT_ADDR = "192.168.213.1", "192.168.213.2"


class PodmanNode:
    """A node netns, pycni's config list for it, and a private podman running inside it."""

    def __init__(self, node: Node, podman: Podman, network: str, mode: str):
        self.node = node
        self.podman = podman
        self.network = network
        self.mode = mode
        self.image = ""

    @property
    def data_dir(self) -> str:
        return self.node.conf()["dataDir"]

    def conflist(self) -> dict:
        with open(os.path.join(self.podman.cni_config_dir, CONFLIST_NAME)) as f:
            return json.load(f)

    def attachments(self) -> dict[str, list[str]]:
        """container ID -> addresses, as pycni's IPAM store records them."""
        if not os.path.exists(os.path.join(self.data_dir, "pycni.db")):
            return {}
        with Store(self.data_dir) as store:
            return {
                a.container_id: [str(x.ip) for x in a.allocations]
                for a in store.list_attachments(self.network)
            }

    def veths(self) -> list[str]:
        out = self.node.exec("ip", "-o", "link", "show", "type", "veth").stdout
        return [line.split(": ")[1].split("@")[0] for line in out.splitlines()]

    def start(self, *args: str, name: str | None = None) -> dict:
        """A detached container on pycni's network; its `podman inspect`."""
        name = name or unique("c")
        self.podman.run("run", "-d", "--name", name, "--network", self.network, *args)
        return self.podman.inspect(name)

    def address(self, inspected: dict) -> str:
        return inspected["NetworkSettings"]["Networks"][self.network]["IPAddress"]


@pytest.fixture(params=["agent", "standalone"])
def pnode(request, netns, plugin_bin, tmp_path):
    ns = netns.make("pmnode")
    netns.exec(ns, "ip", "link", "set", "lo", "up")
    node = Node(
        ns=ns,
        root=str(tmp_path / "node"),
        plugin=plugin_bin,
        spaces=netns,
        bridge="cni0",
        subnet=SUBNET,
        name=unique("pmnet"),
    )
    os.makedirs(node.root)
    conf_dir = str(tmp_path / "net.d")
    podman = Podman(
        str(tmp_path / "podman"),
        netns=ns,
        cni_plugin_dirs=[os.path.dirname(plugin_bin), "/usr/lib/cni"],
        cni_config_dir=conf_dir,
    )
    with contextlib.ExitStack() as stack:
        if request.param == "agent":
            stack.enter_context(agent_for(node))
        else:
            node.base["agentSocket"] = ""  # never an agent: the plugin works in-process
        # Registered after the agent: containers left over are removed while it still runs.
        stack.callback(podman.cleanup)
        yield _setup(node, podman, conf_dir, request.param)


def _setup(node: Node, podman: Podman, conf_dir: str, mode: str) -> PodmanNode:
    conf = node.conf()
    extra = {k: conf[k] for k in ("bridge", "dataDir", "logFile", "agentSocket") if k in conf}
    conflist = node_conflist(node.name, SUBNET, CLUSTER, **extra)
    conflist["cniVersion"] = LIBCNI_VERSION
    write_conflist(os.path.join(conf_dir, CONFLIST_NAME), conflist)
    pn = PodmanNode(node, podman, node.name, mode)
    pn.image = podman.import_busybox()
    return pn


def _in_subnet(ip: str) -> bool:
    return ipaddress.ip_address(ip) in ipaddress.ip_network(SUBNET)


def test_containers_get_pycni_addresses_and_reach_each_other(pnode):
    podman = pnode.podman
    a = pnode.start(pnode.image, "sleep", "60")
    b = pnode.start(pnode.image, "sleep", "60")
    ip_a, ip_b = pnode.address(a), pnode.address(b)
    # What podman reports is what pycni allocated, for exactly these two containers.
    assert pnode.attachments() == {a["Id"]: [ip_a], b["Id"]: [ip_b]}
    assert _in_subnet(ip_a) and _in_subnet(ip_b) and ip_a != ip_b
    assert a["NetworkSettings"]["Networks"][pnode.network]["Gateway"] == GATEWAY

    shown = podman.run("exec", b["Id"], "ip", "-o", "-4", "addr", "show", "eth0").stdout
    assert f"inet {ip_b}/24 " in shown
    route = podman.run("exec", b["Id"], "ip", "route", "show", "default").stdout
    assert f"default via {GATEWAY} dev eth0" in route
    podman.run("exec", b["Id"], "ping", "-c1", "-W3", GATEWAY)
    podman.run("exec", b["Id"], "ping", "-c1", "-W3", ip_a)

    # A --rm container: its address comes from the store too, and is freed when it exits.
    out = podman.run(
        "run",
        "--rm",
        "--network",
        pnode.network,
        pnode.image,
        "sh",
        "-c",
        f"ip -o -4 addr show eth0 && ping -c1 -W3 {ip_a}",
    ).stdout
    ip_c = out.split("inet ")[1].split("/")[0]
    assert _in_subnet(ip_c) and ip_c not in (ip_a, ip_b, GATEWAY)
    assert pnode.attachments() == {a["Id"]: [ip_a], b["Id"]: [ip_b]}

    # The agent, when there is one, did the work: the in-process log stays empty.
    in_process_log = os.path.join(pnode.node.root, "pycni.log")
    if pnode.mode == "agent":
        assert not os.path.exists(in_process_log) or "ADD" not in open(in_process_log).read()
    assert "ADD" in pnode.node.log()


def test_removal_frees_everything(pnode):
    podman = pnode.podman
    started = [pnode.start(pnode.image, "sleep", "60") for _ in range(2)]
    ids = [c["Id"] for c in started]
    sandboxes = [c["NetworkSettings"]["SandboxKey"] for c in started]
    assert all(os.path.exists(path) for path in sandboxes)
    assert len(pnode.veths()) == 2
    assert sorted(pnode.attachments()) == sorted(ids)
    # libcni cached each ADD's result: what podman's DEL sends back as prevResult.
    for c in started:
        cached = glob.glob(f"{CNI_CACHE_RESULTS}/{pnode.network}-{c['Id']}-eth0")
        assert len(cached) == 1
        with open(cached[0]) as f:
            result = json.load(f)["result"]
        assert result["ips"][0]["address"] == f"{pnode.address(c)}/24"

    podman.run("rm", "--force", "--time", "0", *ids)
    assert pnode.attachments() == {}
    assert pnode.veths() == []
    assert not any(os.path.exists(path) for path in sandboxes)
    assert not [p for cid in ids for p in glob.glob(f"{CNI_CACHE_RESULTS}/*-{cid}-*")]
    assert all(f"DEL {cid}/eth0" in pnode.node.log() for cid in ids)


def test_port_mapping(pnode, netns):
    plugin = pnode.conflist()["plugins"][0]
    assert plugin.get("capabilities", {}).get("portMappings") is True, (
        "node_conflist must advertise portMappings, else podman never sends them"
    )
    client = netns.make("pmcli")
    node_ns = pnode.node.ns
    sh(
        "ip",
        "-n",
        node_ns,
        "link",
        "add",
        "eth1",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        client,
    )
    sh("ip", "-n", node_ns, "addr", "add", f"{NODE_ADDR}/24", "dev", "eth1")
    sh("ip", "-n", node_ns, "link", "set", "eth1", "up")
    sh("ip", "-n", client, "addr", "add", f"{CLIENT_ADDR}/24", "dev", "eth0")
    sh("ip", "-n", client, "link", "set", "eth0", "up")
    sh("ip", "-n", client, "link", "set", "lo", "up")

    server = pnode.start(
        "-p",
        f"{HOST_PORT}:8080",
        pnode.image,
        "sh",
        "-c",
        "echo hello-from-pod > /var/www/index.html && exec httpd -f -p 8080 -h /var/www",
    )
    # pycni's own rules forward the port (podman only holds the host port open, unanswered).
    assert str(HOST_PORT) in netns.exec(node_ns, "nft", "list", "ruleset").stdout
    url = f"http://{{}}:{HOST_PORT}/index.html"
    assert fetch(client, url.format(NODE_ADDR)) == "hello-from-pod"
    assert fetch(node_ns, url.format("127.0.0.1")) == "hello-from-pod"

    pnode.podman.run("rm", "--force", "--time", "0", server["Id"])
    assert pnode.attachments() == {}
    rules = netns.exec(node_ns, "nft", "list", "ruleset").stdout
    assert str(HOST_PORT) not in rules
    assert fetch(client, url.format(NODE_ADDR), wait=0) is None


def test_cleanup_removes_containers_processes_mounts_and_namespaces(pnode):
    podman = pnode.podman
    running = pnode.start(pnode.image, "sleep", "60")
    sandbox = running["NetworkSettings"]["SandboxKey"]
    conmon = running["State"]["ConmonPid"]
    assert process_alive(conmon) and os.path.exists(sandbox)
    assert mounts_below(podman.workdir), "a running container has its shm mounted"

    podman.cleanup()
    podman.cleanup()  # idempotent
    assert not os.path.exists(podman.workdir) and not os.path.exists(podman.runroot)
    assert mounts_below(podman.workdir) == [] and mounts_below(podman.runroot) == []
    assert not process_alive(conmon)
    assert not os.path.exists(sandbox)
    assert pnode.attachments() == {}
    assert pnode.veths() == []
    leftover = sh("pgrep", "-f", podman.workdir, check=False).stdout.split()
    assert [pid for pid in leftover if process_alive(int(pid))] == []


@pytest.mark.parametrize("pnode", ["agent"], indirect=True)
def test_image_archive(pnode, tmp_path):
    path = pnode.podman.save_docker_archive(pnode.image, str(tmp_path / "bb.tar"))
    listed = subprocess.run(
        ["tar", "-tf", path], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "manifest.json" in listed
    assert pnode.podman.import_busybox() == pnode.image  # already there: a no-op


@pytest.mark.serial  # a benchmark: its storms would load the other worker's tests
def test_bench_podman_smoke():
    pid, rc, out, err = run_bench("podman", "--runs", "2", timeout=600)
    assert rc == 0, out + err
    for row in ("none", "pycni-agent", "pycni-standalone", "reference"):
        assert row in out
    assert not glob.glob(f"/tmp/pycni-bench-podman-{pid}-*")
    assert namespaces_named(f"pycnib{pid}") == []
    assert not glob.glob(f"/tmp/pycni-podman-{pid}-*")  # podman's short run roots
    with open("/proc/self/mountinfo") as f:
        mounts = f.read()
    assert f"pycni-bench-podman-{pid}-" not in mounts and f"pycni-podman-{pid}-" not in mounts
    assert sh("pgrep", "-f", f"pycni-bench-podman-{pid}-", check=False).stdout == ""
