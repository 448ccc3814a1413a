"""containerd networking pods through pycni, driven over CRI exactly as kubelet drives it: every
test runs under Debian's containerd 1.6 (libcni 1.1) and the pinned 2.x (libcni 1.3).

One private "node" for the module: a network namespace with a `pycnictl agent` inside, pycni's
launcher and the reference loopback in a private bin dir, pycni's config list in a private
conf dir, and a containerd started inside that namespace with its root, state and sockets
under tmp. Pods are made with RunPodSandbox (metadata, log directory, DNS config, security
context, cgroup parent, port mappings), so every CNI call comes from containerd's libcni:
loopback then pycni on ADD, and DEL twice per pod (StopPodSandbox, then RemovePodSandbox with
no netns and no prevResult).

A recorder plugin chained after pycni writes down the environment and config libcni handed
it (pycni itself does not log CNI_ARGS), so the tests can check what containerd sent.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from conftest import (
    AgentProcess,
    Namespaces,
    Node,
    have,
    namespaces_named,
    peer_params,
    run_bench,
    sh,
    unique,
)
from pycni.harness.containerd import (
    CNI_CACHE_RESULTS,
    Containerd,
    build_pause_image,
    cmdline,
    pids,
)
from pycni.harness.cri import (
    CriClient,
    CriError,
    container_config,
    pod_sandbox_config,
    to_dict,
)
from pycni.harness.podman import mounts_below
from pycni.install.launchers import write_launcher
from pycni.ipam.store import Store
from pycni.node_config import CONFLIST_NAME, node_conflist, write_conflist

pytestmark = [
    pytest.mark.netns,
    pytest.mark.runtimes,
    pytest.mark.skipif(not have("runc"), reason="runc is not installed (Debian package runc)"),
    pytest.mark.skipif(
        not have("podman") or not os.path.exists("/bin/busybox"),
        reason="the pause image is built with podman from busybox (Debian "
        "packages podman, busybox-static)",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("grpc") is None,
        reason="grpcio is needed to speak CRI (pip install pycni[runtimes])",
    ),
    pytest.mark.skipif(
        not os.path.exists("/usr/lib/cni/loopback"),
        reason="containerd needs the loopback plugin (Debian package containernetworking-plugins)",
    ),
]

IMAGE = "localhost/pycni-busybox:test"  # the pause image, and the pods' busybox
SUBNET = "10.89.41.0/24"
GATEWAY = "10.89.41.1"
# containerd 1.6 vendors libcni 1.1, which refuses a 1.1.0 result ("unsupported CNI result
# version"): the configs it reads must say 1.0.0 (see test_node_conflist_as_written); libcni 1.3
# in containerd 2.x takes the highest of "cniVersions" (1.1.0).
LIBCNI_VERSION = "1.0.0"
CONTAINERDS = peer_params("containerd")
NODE_ADDR, CLIENT_ADDR = "192.168.214.1", "192.168.214.2"
HOST_PORT = 30080

RECORDER = """#!{python} -IS
# Chained after pycni: writes down what libcni handed it, passes the result through.
import json, os, sys
conf = json.loads(sys.stdin.buffer.read() or b"{{}}")
keys = ("CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME", "CNI_ARGS")
record = {{k: os.environ.get(k, "") for k in keys}}
record["prevResult"] = "prevResult" in conf
record["runtimeConfig"] = conf.get("runtimeConfig")
fd = os.open({log!r}, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
os.write(fd, (json.dumps(record) + "\\n").encode())
os.close(fd)
command = record["CNI_COMMAND"]
if command == "ADD":
    print(json.dumps(conf["prevResult"]))
elif command == "VERSION":
    print(json.dumps({{"cniVersion": conf.get("cniVersion", "1.0.0"),
                      "supportedVersions": ["0.3.1", "0.4.0", "1.0.0"]}}))
"""


@pytest.fixture(scope="module")
def image_archive(tmp_path_factory) -> str:
    return build_pause_image(str(tmp_path_factory.mktemp("image")), IMAGE)


@dataclass
class CriNode:
    ns: str
    root: str
    network: str
    bin_dir: str
    conf_dir: str
    containerd: Containerd
    spaces: Namespaces

    @property
    def cri(self) -> CriClient:
        return self.containerd.cri()

    @property
    def data_dir(self) -> str:
        return os.path.join(self.root, "data")

    def attachments(self) -> dict:
        """sandbox ID -> pycni's attachment (eth0), as its IPAM store records them."""
        with Store(self.data_dir) as store:
            return {a.container_id: a for a in store.list_attachments(self.network)}

    def records(self, sandbox_id: str | None = None) -> list[dict]:
        path = os.path.join(self.root, "recorded.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        return [r for r in rows if sandbox_id is None or r["CNI_CONTAINERID"] == sandbox_id]

    def veths(self) -> list[str]:
        out = sh("ip", "-n", self.ns, "-o", "link", "show", "type", "veth").stdout
        return [line.split(": ")[1].split("@")[0] for line in out.splitlines()]

    def exec(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.ns, *argv, check=check)

    def sandbox_config(self, name: str, port_mappings: list[dict] | None = None) -> dict:
        """A PodSandboxConfig as kubelet fills it in."""
        uid = str(uuid.uuid4())
        return pod_sandbox_config(
            name,
            "pycni-test",
            uid,
            os.path.join(self.root, "pods", f"pycni-test_{name}_{uid}"),
            self.containerd.cgroup_parent,
            port_mappings,
        )

    def run_pod(self, name: str, port_mappings: list[dict] | None = None) -> tuple[str, dict]:
        config = self.sandbox_config(name, port_mappings)
        return self.cri.run_pod_sandbox(config), config

    def pod_ip(self, sandbox_id: str) -> str:
        return self.cri.pod_sandbox_status(sandbox_id).status.network.ip

    def start_busybox(self, sandbox_id: str, config: dict, *command: str) -> str:
        return start_busybox(self.cri, sandbox_id, config, *command)

    def remove_pod(self, sandbox_id: str) -> None:
        for c in self.cri.list_containers(sandbox_id):
            self.cri.stop_container(c.id)
            self.cri.remove_container(c.id)
        self.cri.stop_pod_sandbox(sandbox_id)
        self.cri.remove_pod_sandbox(sandbox_id)


def start_busybox(cri: CriClient, sandbox_id: str, config: dict, *command: str) -> str:
    """A busybox container in the sandbox, running `command` (sleep by default)."""
    container = container_config("busybox", IMAGE, list(command) or ["/bin/sleep", "999999"])
    cid = cri.create_container(sandbox_id, container, config)
    cri.start_container(cid)
    return cid


def write_node_bin(bin_dir: str, record_log: str) -> None:
    """pycni's launcher as `pycnictl install` writes it, the reference loopback (containerd
    sets up lo with it), and the recorder."""
    os.makedirs(bin_dir, exist_ok=True)
    write_launcher(os.path.join(bin_dir, "pycni"))
    os.symlink("/usr/lib/cni/loopback", os.path.join(bin_dir, "loopback"))
    recorder = os.path.join(bin_dir, "record")
    with open(recorder, "w") as f:
        f.write(RECORDER.format(python=sys.executable, log=record_log))
    os.chmod(recorder, 0o755)


def node_conf(network: str, root: str, agent_socket: str) -> dict:
    conf = node_conflist(
        network,
        SUBNET,
        None,
        bridge="cni0",
        dataDir=os.path.join(root, "data"),
        logFile=os.path.join(root, "pycni.log"),
        agentSocket=agent_socket,
    )
    conf["cniVersion"] = LIBCNI_VERSION
    conf["plugins"].append({"type": "record", "capabilities": {"portMappings": True}})
    return conf


@contextlib.contextmanager
def private_node(root: str, archive: str, peer, conf_for=node_conf):
    """The node netns with its agent, bin and conf dirs, and its containerd; all removed
    afterwards whatever happened."""
    spaces = Namespaces()
    containerd = agent = None
    problems: list[str] = []
    try:
        ns = spaces.make("crinode")
        spaces.exec(ns, "ip", "link", "set", "lo", "up")
        spaces.exec(ns, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")  # as on any k8s node
        os.makedirs(root, exist_ok=True)
        bin_dir, conf_dir = os.path.join(root, "bin"), os.path.join(root, "net.d")
        write_node_bin(bin_dir, os.path.join(root, "recorded.jsonl"))
        agent = AgentProcess(
            Node(
                ns=ns,
                root=root,
                plugin=os.path.join(bin_dir, "pycni"),
                spaces=spaces,
                bridge="cni0",
            )
        ).start()
        network = unique("crinet")
        write_conflist(os.path.join(conf_dir, CONFLIST_NAME), conf_for(network, root, agent.socket))
        containerd = make_containerd(peer, os.path.join(root, "containerd"), ns, bin_dir, conf_dir)
        containerd.start()
        containerd.import_image(archive)
        yield CriNode(ns, root, network, bin_dir, conf_dir, containerd, spaces)
    finally:
        if containerd is not None:
            problems = containerd.cleanup()
        if agent is not None:
            agent.stop()
        spaces.cleanup()
    assert not problems, f"cleanup of the node's containerd: {problems}"


def make_containerd(peer, workdir: str, ns: str, bin_dir: str, conf_dir: str) -> Containerd:
    return Containerd.for_peer(peer, workdir, ns, bin_dir, conf_dir, sandbox_image=IMAGE)


@pytest.fixture(scope="module", params=CONTAINERDS)
def containerd_peer(request):
    return request.param


@pytest.fixture(scope="module")
def crinode(tmp_path_factory, image_archive, containerd_peer):
    root = str(tmp_path_factory.mktemp("crinode"))
    with private_node(root, image_archive, containerd_peer) as n:
        yield n


@pytest.fixture
def pods(crinode):
    """Sandbox IDs a test made; whatever the test left is stopped and removed."""
    made: list[str] = []
    yield made
    for sid in made:
        with contextlib.suppress(CriError):
            crinode.remove_pod(sid)


def _cni_args(record: dict) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in record["CNI_ARGS"].split(";") if pair)


def test_cri_schema_comes_from_the_binary(crinode):
    version = crinode.cri.version()
    assert version.runtime_name == "containerd" and version.runtime_api_version == "v1"
    with pytest.raises(CriError) as err:
        crinode.cri.pod_sandbox_status("0" * 64)
    assert err.value.code == "NOT_FOUND"


def test_run_pod_sandbox_gets_pycnis_address(crinode, pods):
    sid, config = crinode.run_pod("web")
    pods.append(sid)
    status = to_dict(crinode.cri.pod_sandbox_status(sid).status)
    assert status["state"] == "SANDBOX_READY"
    ip = status["network"]["ip"]
    assert ipaddress.ip_address(ip) in ipaddress.ip_network(SUBNET) and ip != GATEWAY

    attachment = crinode.attachments()[sid]
    assert [str(a.ip) for a in attachment.allocations] == [ip]
    assert attachment.ifname == "eth0"
    assert attachment.netns.startswith("/var/run/netns/cni-")
    assert attachment.host_veth in crinode.veths()
    shown = sh(
        "nsenter", f"--net={attachment.netns}", "ip", "-o", "-4", "addr", "show", "eth0"
    ).stdout
    assert f"inet {ip}/24 " in shown
    assert (
        f"default via {GATEWAY} dev eth0"
        in sh("nsenter", f"--net={attachment.netns}", "ip", "route", "show", "default").stdout
    )

    # What containerd handed the chain: the pod's identity in CNI_ARGS, its netns, eth0.
    (add,) = [r for r in crinode.records(sid) if r["CNI_COMMAND"] == "ADD"]
    assert add["CNI_NETNS"] == attachment.netns and add["CNI_IFNAME"] == "eth0"
    args = _cni_args(add)
    assert args == {
        "IgnoreUnknown": "1",
        "K8S_POD_NAMESPACE": "pycni-test",
        "K8S_POD_NAME": "web",
        "K8S_POD_INFRA_CONTAINER_ID": sid,
        "K8S_POD_UID": config["metadata"]["uid"],
    }
    assert add["prevResult"], "pycni's result reached the next plugin in the chain"


def test_pods_reach_each_other_and_the_gateway(crinode, pods):
    started = []
    for name in ("ping-a", "ping-b"):
        sid, config = crinode.run_pod(name)
        pods.append(sid)
        started.append((crinode.pod_ip(sid), crinode.start_busybox(sid, config)))
    (ip_a, ctr_a), (ip_b, ctr_b) = started
    for container, target in ((ctr_a, ip_b), (ctr_b, ip_a), (ctr_a, GATEWAY), (ctr_b, GATEWAY)):
        rc, out, err = crinode.cri.exec_sync(container, ["ping", "-c1", "-W2", target])
        assert rc == 0, f"ping {target}: {out}{err}"
    rc, out, _ = crinode.cri.exec_sync(ctr_a, ["ip", "-o", "-4", "addr", "show", "eth0"])
    assert rc == 0 and f"inet {ip_a}/24 " in out
    # The node reaches its pods from the bridge address.
    crinode.exec("ping", "-c1", "-W2", ip_a)


def test_stop_then_remove_sends_two_dels_and_frees_everything(crinode, pods):
    sid, _ = crinode.run_pod("short-lived")
    pods.append(sid)
    attachment = crinode.attachments()[sid]
    netns_path = attachment.netns
    assert os.path.exists(netns_path)
    cache = os.path.join(CNI_CACHE_RESULTS, f"{crinode.network}-{sid}-eth0")
    assert os.path.exists(cache), "libcni cached the result of ADD"

    crinode.cri.stop_pod_sandbox(sid)
    assert sid not in crinode.attachments()
    assert attachment.host_veth not in crinode.veths()
    assert not os.path.exists(netns_path)
    first = [r for r in crinode.records(sid) if r["CNI_COMMAND"] == "DEL"]
    assert len(first) == 1 and first[0]["CNI_NETNS"] == netns_path and first[0]["prevResult"]
    assert to_dict(crinode.cri.pod_sandbox_status(sid).status)["state"] == "SANDBOX_NOTREADY"

    crinode.cri.remove_pod_sandbox(sid)  # containerd fails it if the second DEL fails
    pods.remove(sid)
    dels = [r for r in crinode.records(sid) if r["CNI_COMMAND"] == "DEL"]
    assert len(dels) == 2
    assert dels[1]["CNI_NETNS"] == "" and not dels[1]["prevResult"]
    assert sid not in crinode.attachments()
    assert not os.path.exists(cache)
    assert sid not in [s.id for s in crinode.cri.list_pod_sandbox()]


def test_twenty_concurrent_sandboxes(crinode, pods):
    names = [f"burst-{i}" for i in range(20)]
    with ThreadPoolExecutor(len(names)) as pool:
        results = list(pool.map(lambda n: _try(crinode.run_pod, n), names))
    made = [r[0] for r in results if not isinstance(r, Exception)]
    pods.extend(made)
    failed = [r for r in results if isinstance(r, Exception)]
    assert not failed, failed

    ips = {sid: crinode.pod_ip(sid) for sid in made}
    assert len(set(ips.values())) == 20
    stored = crinode.attachments()
    assert {sid: [str(a.ip) for a in stored[sid].allocations] for sid in made} == {
        sid: [ip] for sid, ip in ips.items()
    }
    assert len(crinode.veths()) == 20
    netns_paths = [stored[sid].netns for sid in made]

    with ThreadPoolExecutor(len(made)) as pool:
        removed = list(pool.map(lambda sid: _try(crinode.remove_pod, sid), made))
    assert not [r for r in removed if isinstance(r, Exception)], removed
    pods.clear()
    assert not set(made) & set(crinode.attachments())
    assert crinode.veths() == []
    assert not [p for p in netns_paths if os.path.exists(p)]


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception as exc:  # reported by the caller, with every other failure
        return exc


def test_port_mapping_reaches_the_pod(crinode, pods, netns):
    plugin = json.load(open(os.path.join(crinode.conf_dir, CONFLIST_NAME)))["plugins"][0]
    assert plugin.get("capabilities", {}).get("portMappings") is True, (
        "node_conflist must advertise portMappings, else containerd never sends them"
    )
    client = netns.make("cricli")
    sh(
        "ip",
        "-n",
        crinode.ns,
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
    try:
        sh("ip", "-n", crinode.ns, "addr", "add", f"{NODE_ADDR}/24", "dev", "eth1")
        sh("ip", "-n", crinode.ns, "link", "set", "eth1", "up")
        sh("ip", "-n", client, "addr", "add", f"{CLIENT_ADDR}/24", "dev", "eth0")
        sh("ip", "-n", client, "link", "set", "eth0", "up")

        mapping = {"protocol": "TCP", "container_port": 8080, "host_port": HOST_PORT}
        sid, config = crinode.run_pod("hostport", port_mappings=[mapping])
        pods.append(sid)
        (add,) = [r for r in crinode.records(sid) if r["CNI_COMMAND"] == "ADD"]
        assert add["runtimeConfig"]["portMappings"] == [
            {"HostPort": HOST_PORT, "ContainerPort": 8080, "Protocol": "tcp", "HostIP": ""}
        ]
        crinode.start_busybox(
            sid,
            config,
            "sh",
            "-c",
            "echo hello-from-pod > /var/www/index.html && exec httpd -f -p 8080 -h /var/www",
        )
        assert _fetch(client, NODE_ADDR) == "hello-from-pod"  # from outside
        assert _fetch(crinode.ns, NODE_ADDR) == "hello-from-pod"  # from the node

        crinode.remove_pod(sid)
        pods.remove(sid)
        assert str(HOST_PORT) not in crinode.exec("nft", "list", "ruleset").stdout
        assert _fetch(client, NODE_ADDR, attempts=1) is None
    finally:
        sh("ip", "-n", crinode.ns, "link", "del", "eth1", check=False)


_GET = """
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
s.sendall(b"GET /index.html HTTP/1.0\\r\\n\\r\\n")
data = b""
while chunk := s.recv(4096):
    data += chunk
head, _, body = data.partition(b"\\r\\n\\r\\n")
if head.split()[1] != b"200":
    sys.exit(head.decode())
print(body.decode().strip())
"""


def _fetch(ns: str, host: str, attempts: int = 20) -> str | None:
    """The body of GET /index.html at host:HOST_PORT from inside `ns` (the server may still be
    starting). Not busybox wget: the static one segfaults outside a container here."""
    for _ in range(attempts):
        out = sh(
            "ip",
            "netns",
            "exec",
            ns,
            sys.executable,
            "-I",
            "-c",
            _GET,
            host,
            str(HOST_PORT),
            check=False,
        )
        if out.returncode == 0:
            return out.stdout.strip()
        time.sleep(0.2)
    return None


@pytest.mark.parametrize("how", ["running", "crashed"])
def test_cleanup_leaves_nothing_behind(crinode, containerd_peer, image_archive, tmp_path, how):
    """A second containerd on the same node, with a pod and a container running, removed by
    cleanup() while it answers or after a SIGKILL (nothing then stops the pod through CRI)."""
    ctd = make_containerd(
        containerd_peer, str(tmp_path / "ctd"), crinode.ns, crinode.bin_dir, crinode.conf_dir
    )
    try:
        ctd.start()
        ctd.import_image(image_archive)
        cri = ctd.cri()
        config = crinode.sandbox_config("doomed")
        config["linux"]["cgroup_parent"] = ctd.cgroup_parent
        sid = cri.run_pod_sandbox(config)
        start_busybox(cri, sid, config)
        attachment = crinode.attachments()[sid]
        pod_pids = _netns_pids(attachment.netns)
        assert len(pod_pids) == 2, "pause and busybox run in the pod's netns"
        shims = ctd.shim_pids()
        assert shims and mounts_below(ctd.workdir)
        if how == "crashed":
            ctd.proc.send_signal(signal.SIGKILL)
            ctd.proc.wait()
        assert ctd.cleanup() == []
    finally:
        ctd.cleanup()

    assert not os.path.exists(ctd.workdir) and mounts_below(ctd.workdir) == []
    _wait_for(
        lambda: not [p for p in shims + pod_pids if _alive(p)],
        "the shim, pause and busybox processes are gone",
        timeout=5,
    )
    assert not [p for p in pids() if ctd.socket.encode() in cmdline(p)]
    assert not os.path.exists(attachment.netns)
    assert not any(
        os.path.isdir(f"/sys/fs/cgroup/{h}{ctd.cgroup_parent}")
        for h in os.listdir("/sys/fs/cgroup")
    )
    assert (
        not [n for n in os.listdir(CNI_CACHE_RESULTS) if sid in n]
        if os.path.isdir(CNI_CACHE_RESULTS)
        else True
    )
    _wait_for(lambda: attachment.host_veth not in crinode.veths(), "the pod's host veth goes")
    if how == "running":
        assert sid not in crinode.attachments(), "cleanup stopped the pod through CRI"
    else:
        # Nothing ran DEL: what kubelet's runtime does after a restart, pycni accepts with the
        # netns long gone.
        assert sid in crinode.attachments()
        env = {
            "PATH": os.environ["PATH"],
            "CNI_COMMAND": "DEL",
            "CNI_CONTAINERID": sid,
            "CNI_IFNAME": "eth0",
            "CNI_NETNS": "",
            "CNI_PATH": crinode.bin_dir,
        }
        plugin = json.load(open(os.path.join(crinode.conf_dir, CONFLIST_NAME)))["plugins"][0]
        conf = dict(plugin, name=crinode.network, cniVersion=LIBCNI_VERSION)
        plugin_exe = os.path.join(crinode.bin_dir, "pycni")
        proc = subprocess.run(
            ["ip", "netns", "exec", crinode.ns, plugin_exe],
            input=json.dumps(conf).encode(),
            env=env,
            capture_output=True,
        )
        assert proc.returncode == 0, proc
        assert sid not in crinode.attachments()


def _netns_pids(path: str) -> list[int]:
    inode = os.stat(path).st_ino
    found = []
    for pid in pids():
        with contextlib.suppress(OSError):
            if os.stat(f"/proc/{pid}/ns/net").st_ino == inode:
                found.append(pid)
    return found


def _alive(pid: int) -> bool:
    """Running, or a zombie nobody reaped yet (pid 1 here may be slow to)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_for(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def test_node_conflist_as_written(image_archive, containerd_peer, tmp_path_factory):
    """The config list pycni writes for a node (node_conflist, what the agent and `pycnictl
    install` write), unmodified, is one containerd 1.6 and 2.x can use."""

    def as_written(network: str, root: str, agent_socket: str) -> dict:
        return node_conflist(
            network,
            SUBNET,
            None,
            dataDir=os.path.join(root, "data"),
            logFile=os.path.join(root, "pycni.log"),
            agentSocket=agent_socket,
        )

    # A short root, as crinode's: containerd's sockets live in it (a path limit of 104), and a
    # test's tmp_path is long (its name, and an xdist worker's `popen-gwN/`).
    root = str(tmp_path_factory.mktemp("ctdnode"))
    with private_node(root, image_archive, containerd_peer, as_written) as n:
        sid, _ = n.run_pod("as-written")
        try:
            assert n.pod_ip(sid) == str(n.attachments()[sid].allocations[0].ip)
        finally:
            n.remove_pod(sid)


@pytest.mark.serial  # a benchmark: its storms would load the other worker's tests
def test_bench_cri_smoke():
    pid, rc, out, err = run_bench(
        "cri", "--pods", "2", "--burst", "3", "--repeat", "1", timeout=600
    )
    assert rc == 0, out + err
    for row in ("pycni-agent", "reference", "RunPodSandbox", "burst"):
        assert row in out, out
    assert not namespaces_named(f"pycnib{pid}")
    assert not [p for p in pids() if f"pycni-bench-cri-{pid}-".encode() in cmdline(p)]
    assert not [d for d in os.listdir("/tmp") if d.startswith(f"pycni-bench-cri-{pid}-")]
