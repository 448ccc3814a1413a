"""The node agent with ``--datastore kubernetes``, end to end: a real `pycnictl agent` in a node
namespace, talking through the official client to the fake API server (harness/k8s_fake_api.py)
running as a process on that namespace's loopback. The test plays kube-controller-manager and
the other nodes' kubelets by adding, patching and deleting Node objects; the agent must follow
through the watch, and the kernel, the CNI config and the agent's health must show it."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import sh
from pycni.agent.client import agent_health
from pycni.agent.launch import agent_argv, wait_until_listening
from pycni.backends.plan import vtep_mac
from pycni.cluster.kubernetes import ANN_NODE_IPS, ANN_VTEP_MAC
from pycni.harness import k8s_fake_api
from pycni.harness.k8s_fake_api import make_node
from pycni.node_config import read_subnet_env

pytestmark = pytest.mark.netns

FAKE_API = k8s_fake_api.__file__  # run as a script: it needs nothing but the standard library
NODE_IP, PEER_IP, GATEWAY = "192.0.2.1", "192.0.2.2", "192.0.2.254"
CLUSTER_CIDR = "10.244.0.0/16"
SUBNET_A, SUBNET_B, SUBNET_C = "10.244.5.0/24", "10.244.6.0/24", "10.244.7.0/24"
MAC_B = "8e:3a:0c:51:7f:02"
DEADLINE = 15.0  # seconds any awaited change may take; far less than --resync
RESYNC = 30.0  # the periodic pass never comes within DEADLINE: what happens is the watch


# -- the fake API server, as a process in the node's namespace ---------------------------------


class FakeAPIProcess:
    """harness/k8s_fake_api.py under ``ip netns exec``: one JSON command a line on its stdin,
    one JSON answer a line on its stdout."""

    def __init__(self, ns: str, stderr_path: str) -> None:
        self.stderr = open(stderr_path, "w")  # closed in close()
        # `ip netns exec` execs python: the Popen pid is the server itself.
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, str(FAKE_API)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        try:
            self.url = json.loads(self._readline())["url"]
        except BaseException:
            self.close()
            raise

    def _readline(self, timeout: float = 10.0) -> str:
        # One answer per command, so nothing is ever left in the pipe's text buffer.
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(
                f"the fake API server did not answer (exit status "
                f"{self.proc.poll()}): {Path(self.stderr.name).read_text()}"
            )
        return line

    def call(self, **command) -> dict | None:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self._readline())
        assert reply["ok"], reply["error"]
        return reply["node"]

    def load(self, *nodes: dict) -> None:
        self.call(op="load", items=list(nodes))

    def put(self, node: dict) -> None:
        self.call(op="put", node=node)

    def modify(self, name: str, patch: dict) -> None:
        self.call(op="modify", name=name, patch=patch)

    def delete(self, name: str) -> None:
        self.call(op="delete", name=name)

    def annotations(self, name: str) -> dict[str, str]:
        node = self.call(op="get", name=name)
        assert node is not None, f"node {name} is gone"
        return node["metadata"].get("annotations", {})

    def close(self) -> None:
        try:
            try:
                self.proc.stdin.close()  # it stops serving and exits
            except OSError:
                pass  # it is gone already
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        finally:
            self.proc.stdout.close()
            self.stderr.close()


# -- the node -----------------------------------------------------------------------------------


class K8sNode:
    """Node namespace `ns` (eth0 = NODE_IP/24 on a veth to a peer namespace holding the default
    gateway) with the fake API server and `pycnictl agent --datastore kubernetes` inside."""

    def __init__(self, ns: str, root: Path) -> None:
        self.ns = ns
        self.root = root
        self.socket = str(root / "agent.sock")
        self.data_dir = str(root / "data")
        self.log_file = str(root / "agent.log")
        self.conflist = str(root / "net.d" / "10-pycni.conflist")
        self.subnet_file = str(root / "run" / "subnet.env")
        self.kubeconfig = str(root / "kubeconfig")
        self.api: FakeAPIProcess | None = None
        self.agent: subprocess.Popen | None = None

    def start_api(self, *nodes: dict) -> FakeAPIProcess:
        self.api = FakeAPIProcess(self.ns, str(self.root / "fake-api.stderr"))
        self.api.load(*nodes)
        Path(self.kubeconfig).write_text(f"""\
apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {self.api.url}
users:
- name: pycni
  user:
    token: test-token
contexts:
- name: pycni@fake
  context:
    cluster: fake
    user: pycni
current-context: pycni@fake
""")
        return self.api

    def start_agent(self, backend: str, iface: str | None = "eth0") -> None:
        """The agent; `iface` None: no --iface (it finds the underlay by itself)."""
        argv = [
            *agent_argv(self.socket, self.data_dir, self.log_file, 0),
            "--datastore",
            "kubernetes",
            "--kubeconfig",
            self.kubeconfig,
            "--node-name",
            "node-a",
            "--cluster-cidr",
            CLUSTER_CIDR,
            "--backend",
            backend,
            *(("--iface", iface) if iface else ()),
            "--conf-dir",
            os.path.dirname(self.conflist),
            "--subnet-file",
            self.subnet_file,
            "--resync",
            str(RESYNC),
        ]
        with open(self.root / "agent.stderr", "w") as stderr:
            self.agent = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *argv], stdout=subprocess.DEVNULL, stderr=stderr
            )
        try:
            wait_until_listening(self.agent, self.socket)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}: {self.diagnostics()}") from None

    def stop(self) -> None:
        try:
            if self.agent is not None and self.agent.poll() is None:
                self.agent.send_signal(signal.SIGTERM)
                try:
                    self.agent.wait(15)
                except subprocess.TimeoutExpired:
                    self.agent.kill()
                    self.agent.wait()
        finally:
            if self.api is not None:
                self.api.close()

    # -- what the node shows --------------------------------------------------------------

    def cluster(self) -> dict:
        """The cluster part of the agent's health ({} while it does not answer)."""
        health = agent_health(self.socket)["health"] or {}
        return health.get("cluster") or {}

    def routes(self) -> list[str]:
        """Every pycni route (proto 120), as `ip route` prints it."""
        out = sh("ip", "-n", self.ns, "route", "show", "table", "main").stdout
        return [line.strip() for line in out.splitlines() if "proto 120" in line]

    def route_to(self, subnet: str) -> str | None:
        return next((r for r in self.routes() if r.startswith(subnet + " ")), None)

    def diagnostics(self) -> str:
        def read(name: str) -> str:
            path = self.root / name
            return path.read_text()[-4000:] if path.exists() else "-"

        return (
            f"\nroutes: {self.routes()}\ncluster: {self.cluster()}\n"
            f"agent log:\n{read('agent.log')}\nagent stderr:\n{read('agent.stderr')}\n"
            f"fake API stderr:\n{read('fake-api.stderr')}"
        )

    def wait_for(self, what: str, check: Callable[[], object], timeout: float = DEADLINE):
        """check()'s first truthy value within `timeout` seconds; a failure that shows the
        node's state otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            value = check()
            if value:
                return value
            if self.agent is not None and self.agent.poll() is not None:
                pytest.fail(
                    f"the agent exited ({self.agent.returncode}) while waiting for "
                    f"{what}{self.diagnostics()}"
                )
            if time.monotonic() > deadline:
                pytest.fail(f"no {what} within {timeout:.0f} s{self.diagnostics()}")
            time.sleep(0.05)


@pytest.fixture
def k8s_node(netns, tmp_path):
    """The node namespace and its peer; whatever the test started is stopped afterwards (and
    the netns fixture kills anything left in the namespaces, then removes them)."""
    node_ns, peer_ns = netns.make("k8node"), netns.make("k8peer")
    for ns in (node_ns, peer_ns):
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    sh(
        "ip",
        "-n",
        node_ns,
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        peer_ns,
    )
    sh("ip", "-n", node_ns, "addr", "add", f"{NODE_IP}/24", "dev", "eth0")
    sh("ip", "-n", peer_ns, "addr", "add", f"{GATEWAY}/24", "dev", "eth0")
    for ns in (node_ns, peer_ns):
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
    sh("ip", "-n", node_ns, "route", "add", "default", "via", GATEWAY)
    node = K8sNode(node_ns, tmp_path)
    try:
        yield node
    finally:
        node.stop()


def node_a(with_pod_cidr: bool = True) -> dict:
    return make_node("node-a", [SUBNET_A] if with_pod_cidr else None, [NODE_IP])


def node_b(annotations: dict[str, str] | None = None) -> dict:
    return make_node("node-b", [SUBNET_B], [PEER_IP], annotations)


def wait_ready(node: K8sNode) -> dict:
    """The agent's cluster health once it is ready, has cleared its reason and written the CNI
    config. (All three: it says ready a moment before it has written the files.)"""

    def check():
        cluster = node.cluster()
        done = cluster.get("ready") and cluster.get("reason") == "" and conf_subnet(node)
        return cluster if done else None

    return node.wait_for("a ready agent with its CNI config written", check)


def conf_subnet(node: K8sNode) -> str | None:
    try:
        with open(node.conflist) as f:
            return json.load(f)["plugins"][0].get("subnet")
    except (OSError, ValueError, KeyError, IndexError):
        return None


def plugin_status(node: K8sNode, plugin: str) -> subprocess.CompletedProcess:
    """CNI STATUS through the node's plugin, forwarded to the agent, as a runtime asks it."""
    conf = {
        "cniVersion": "1.1.0",
        "name": "pycni",
        "type": "pycni",
        "subnet": SUBNET_A,
        "agentSocket": node.socket,
        "dataDir": node.data_dir,
    }
    return subprocess.run(
        ["ip", "netns", "exec", node.ns, plugin],
        input=json.dumps(conf),
        env={"CNI_COMMAND": "STATUS", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
    )


# -- tests ----------------------------------------------------------------------------------------


def test_host_gw_follows_the_node_objects(k8s_node):
    node = k8s_node
    api = node.start_api(node_a(), node_b())
    node.start_agent("host-gw")

    # This node's subnet is its podCIDR: health, the CNI config and subnet.env say so.
    cluster = wait_ready(node)
    assert cluster["subnets"] == [SUBNET_A] and cluster["datastore"] == "kubernetes", cluster
    assert cluster["nodeIPs"] == [NODE_IP] and cluster["vtepMAC"] == ""
    assert conf_subnet(node) == SUBNET_A
    env = read_subnet_env(node.subnet_file)
    assert (env["SUBNET"], env["NETWORK"], env["NODE"], env["NODE_IPS"], env["BACKEND"]) == (
        SUBNET_A,
        CLUSTER_CIDR,
        "node-a",
        NODE_IP,
        "host-gw",
    ), env

    # node-b's podCIDR is routed via its InternalIP.
    route = node.wait_for(f"route to {SUBNET_B}", lambda: node.route_to(SUBNET_B))
    assert route == f"{SUBNET_B} via {PEER_IP} dev eth0 proto 120", node.routes()

    # What the other nodes need to reach our pods is published on our Node; no VTEP here.
    ann = node.wait_for(
        "published node-ips", lambda: (a := api.annotations("node-a")).get(ANN_NODE_IPS) and a
    )
    assert ann[ANN_NODE_IPS] == NODE_IP
    assert ANN_VTEP_MAC not in ann
    assert ann["node.alpha.kubernetes.io/ttl"] == "0"  # a merge patch: the rest is kept

    # A node joins (ADDED): routed at once, by the watch (the next periodic pass is RESYNC s
    # away, well beyond the deadline).
    api.put(make_node("node-c", [SUBNET_C], ["192.0.2.3"]))
    route = node.wait_for(f"route to {SUBNET_C}", lambda: node.route_to(SUBNET_C))
    assert route == f"{SUBNET_C} via 192.0.2.3 dev eth0 proto 120", node.routes()
    node.wait_for(
        "node-c in health",
        lambda: "node-c" in {n["name"] for n in node.cluster().get("remoteNodes", [])},
    )

    # ... and leaves (DELETED): its route goes, node-b's stays.
    api.delete("node-c")
    node.wait_for(f"removal of the route to {SUBNET_C}", lambda: node.route_to(SUBNET_C) is None)
    assert node.routes() == [f"{SUBNET_B} via {PEER_IP} dev eth0 proto 120"]
    assert node.cluster()["lastChanges"]["errors"] == []


def test_vxlan_routes_through_the_vtep_and_publishes_its_mac(k8s_node):
    node = k8s_node
    api = node.start_api(node_a(), node_b({ANN_VTEP_MAC: MAC_B}))
    node.start_agent("vxlan")

    cluster = wait_ready(node)
    mac_a = vtep_mac("node-a")
    assert cluster["subnets"] == [SUBNET_A] and cluster["vtepMAC"] == mac_a, cluster
    with open(node.conflist) as f:
        plugin = json.load(f)["plugins"][0]
    assert plugin["subnet"] == SUBNET_A and plugin["mtu"] == 1450  # 1500 less VXLAN's 50

    gateway = SUBNET_B.split("/")[0]  # flannel's scheme: the remote subnet's network address
    route = node.wait_for(f"route to {SUBNET_B}", lambda: node.route_to(SUBNET_B))
    assert route == f"{SUBNET_B} via {gateway} dev pycni.1 proto 120 onlink", node.routes()
    fdb = sh("bridge", "-n", node.ns, "fdb", "show", "dev", "pycni.1").stdout
    assert f"{MAC_B} dst {PEER_IP}" in fdb, fdb
    neigh = sh("ip", "-n", node.ns, "neigh", "show", "dev", "pycni.1").stdout
    assert f"{gateway} lladdr {MAC_B} PERMANENT" in neigh, neigh
    link = sh("ip", "-n", node.ns, "-d", "link", "show", "pycni.1").stdout
    assert f"link/ether {mac_a}" in link and f"local {NODE_IP}" in link, link

    ann = node.wait_for(
        "published vtep-mac", lambda: (a := api.annotations("node-a")).get(ANN_VTEP_MAC) and a
    )
    assert ann[ANN_VTEP_MAC] == mac_a and ann[ANN_NODE_IPS] == NODE_IP


def test_node_without_podcidr_is_not_ready_until_it_gets_one(k8s_node, plugin_bin):
    node = k8s_node
    api = node.start_api(node_a(with_pod_cidr=False), node_b())
    node.start_agent("host-gw")

    reason = node.wait_for(
        "a podCIDR complaint", lambda: "podCIDR" in (r := node.cluster().get("reason", "")) and r
    )
    assert "node node-a has no podCIDR" in reason and "--allocate-node-cidrs" in reason, reason
    assert node.cluster()["ready"] is False
    assert not os.path.exists(node.conflist)  # the runtime keeps the node NotReady
    assert not os.path.exists(node.subnet_file)
    # STATUS through the plugin, as the runtime asks it, says why.
    proc = plugin_status(node, plugin_bin)
    assert proc.returncode != 0, proc
    err = json.loads(proc.stdout)
    assert err["code"] == 50 and "has no podCIDR" in err["msg"], err

    # kube-controller-manager allocates the podCIDR (MODIFIED): the node becomes ready. (Not
    # by the watch: an agent that is not registered yet retries with a backoff of up to 10 s.)
    api.modify("node-a", {"spec": {"podCIDR": SUBNET_A, "podCIDRs": [SUBNET_A]}})
    cluster = wait_ready(node)
    assert cluster["subnets"] == [SUBNET_A], cluster
    assert conf_subnet(node) == SUBNET_A
    route = node.wait_for(f"route to {SUBNET_B}", lambda: node.route_to(SUBNET_B))
    assert route == f"{SUBNET_B} via {PEER_IP} dev eth0 proto 120", node.routes()
    proc = plugin_status(node, plugin_bin)
    assert proc.returncode == 0, proc
    assert api.annotations("node-a")[ANN_NODE_IPS] == NODE_IP


def test_without_default_route_the_underlay_is_the_internal_ip_interface(k8s_node):
    """No --iface, no --node-ip and no default route: the agent reads its Node's InternalIP
    and takes the interface holding it (eth0), and turns ready."""
    node = k8s_node
    sh("ip", "-n", node.ns, "route", "del", "default")
    api = node.start_api(node_a(), node_b())
    node.start_agent("host-gw", iface=None)
    cluster = wait_ready(node)
    assert (cluster["iface"], cluster["nodeIPs"], cluster["subnets"]) == (
        "eth0",
        [NODE_IP],
        [SUBNET_A],
    ), cluster
    route = node.wait_for(f"route to {SUBNET_B}", lambda: node.route_to(SUBNET_B))
    assert route == f"{SUBNET_B} via {PEER_IP} dev eth0 proto 120", node.routes()
    log = Path(node.log_file).read_text()
    assert f"underlay interface eth0: it holds the node's address {NODE_IP}" in log, log
    assert api.annotations("node-a")[ANN_NODE_IPS] == NODE_IP


# -- status and doctor tell the truth (the node's view of itself) ---------------------------

PYCNICTL = [sys.executable, "-c", "from pycni.ctl.main import main; main()"]


def pycnictl(node: K8sNode, *args: str) -> subprocess.CompletedProcess:
    """`pycnictl ARGS --conf-dir <the node's>` in the node, with no --socket: it must find the
    agent from the config list the agent wrote."""
    argv = [*PYCNICTL, *args, "--conf-dir", os.path.dirname(node.conflist)]
    proc = sh("ip", "netns", "exec", node.ns, *argv, check=False, timeout=60)
    print(f"$ pycnictl {' '.join(args)}  (exit {proc.returncode})\n{proc.stdout}{proc.stderr}")
    return proc


def add_pod(node: K8sNode, netns, plugin: str, cid: str) -> str:
    """ADD through the node's plugin with the config list the agent wrote; the pod's IPv4."""
    with open(node.conflist) as f:
        conflist = json.load(f)
    conf = {
        "cniVersion": conflist["cniVersion"],
        "name": conflist["name"],
        **conflist["plugins"][0],
        "logFile": str(node.root / "plugin.log"),  # never the host's default
    }
    pod = netns.make("k8pod")
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": cid,
        "CNI_NETNS": f"/run/netns/{pod}",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": os.path.dirname(plugin),
        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
    }
    proc = subprocess.run(
        ["ip", "netns", "exec", node.ns, plugin],
        input=json.dumps(conf),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)["ips"][0]["address"].split("/")[0]


def test_status_and_doctor_follow_the_node_in_the_api(k8s_node, netns, plugin_bin):
    """The issue's three situations: status without --socket finds the agent the config list
    names; with the Node deleted from the API the node is not ready (status, doctor, CNI
    STATUS); registered again with another podCIDR, the pod that kept its old address is
    reported with the repair."""
    node = k8s_node
    api = node.start_api(node_a(), node_b())
    node.start_agent("host-gw")
    wait_ready(node)
    cid = "c0" + "0" * 30
    ip = add_pod(node, netns, plugin_bin, cid)
    assert ip == "10.244.5.2"

    # 1. The agent serves on the socket its own config list names: found, ready, healthy.
    status = pycnictl(node, "status")
    assert status.returncode == 0, status.stdout
    assert f"agent: ok (pid {node.agent.pid}" in status.stdout and node.socket in status.stdout
    assert "cluster: node node-a, ready, datastore kubernetes" in status.stdout
    assert "status: healthy" in status.stdout
    doctor = pycnictl(node, "doctor")
    assert doctor.returncode == 0 and doctor.stdout.startswith("ok: 1 attachment"), doctor

    # 2. The Node is deleted from the API: not ready, and everyone says why.
    api.delete("node-a")
    reason = node.wait_for(
        "not ready", lambda: not (c := node.cluster()).get("ready") and c.get("reason")
    )
    assert "node node-a is not registered in the API server" in reason, reason
    status = pycnictl(node, "status")
    assert status.returncode == 1
    assert "cluster: node node-a, NOT READY (not ready: node node-a is not registered" in (
        status.stdout
    )
    assert "  - cluster: not ready: node node-a is not registered" in status.stdout
    doctor = pycnictl(node, "doctor", "--json")
    assert doctor.returncode == 1
    [finding] = json.loads(doctor.stdout)["findings"]
    assert finding["kind"] == "cluster-not-ready" and "not registered" in finding["actual"]
    proc = plugin_status(node, plugin_bin)
    assert proc.returncode != 0 and "not registered" in json.loads(proc.stdout)["msg"], proc

    # 3. Registered again with a new podCIDR: ready on it; the pod kept its old address.
    api.put(make_node("node-a", [SUBNET_C], [NODE_IP]))
    node.wait_for("the new subnet", lambda: conf_subnet(node) == SUBNET_C)
    cluster = wait_ready(node)
    assert cluster["subnets"] == [SUBNET_C], cluster
    doctor = pycnictl(node, "doctor")
    assert doctor.returncode == 1
    assert doctor.stdout.startswith(
        f"pod-outside-node-subnet: network pycni, container {cid} eth0: expected addresses in "
        f"node node-a's subnet {SUBNET_C}; found {ip}: from an earlier subnet of this node"
    ), doctor.stdout
    assert "repair: recreate the pod" in doctor.stdout
    status = pycnictl(node, "status")
    assert status.returncode == 1
    assert f"address {ip} is outside the node's subnet {SUBNET_C}" in status.stdout
    # The agent said what happened to the node and its routes.
    log = Path(node.log_file).read_text()
    assert "subnets changed from 10.244.5.0/24 to 10.244.7.0/24" in log, log


def test_a_node_deleted_and_registered_again_as_it_was_is_ready_again(k8s_node):
    """Back with the same podCIDR and address: nothing to adopt anew, and still the node must
    say ready with no reason left over."""
    node = k8s_node
    api = node.start_api(node_a(), node_b())
    node.start_agent("host-gw")
    wait_ready(node)
    api.delete("node-a")
    node.wait_for("not ready", lambda: node.cluster().get("ready") is False)
    api.put(node_a())
    cluster = wait_ready(node)
    assert (cluster["subnets"], cluster["lastError"]) == ([SUBNET_A], ""), cluster
