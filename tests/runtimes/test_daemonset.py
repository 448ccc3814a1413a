"""The operator's path below kubelet: the image built here, the DaemonSet's pod run from
deploy/kubernetes/pycni.yaml by containerd over CRI, workload pods networked by the
containerised agent, a rolling update, and pycni-uninstall.yaml's pod.

One node for the module (harness/daemonset.py): a network namespace with an uplink, its own
/etc/cni, /opt, /run and /var/lib under tmp (containerd and everything it starts see them at
their real paths), containerd 1.6, and the fake API server over TLS in the node's namespace
as the pods' in-cluster API server (harness/incluster.py), holding this node's Node with its
podCIDR as kube-controller-manager would allocate it. The test plays kubelet and the
DaemonSet controller; what runs is what the manifests say.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import json
import os
import re
import shutil
import sys
import tarfile
import time
import uuid

import pytest

from conftest import Namespaces, have, sh, unique
from pycni.harness import image as image_build
from pycni.harness import incluster, podspec
from pycni.harness.containerd import build_pause_image, cmdline, pids
from pycni.harness.cri import container_config, pod_sandbox_config
from pycni.harness.daemonset import CNI_CONF_DIR, Kubelet, Node, NodeContainerd
from pycni.harness.k8s_fake_api import make_node
from pycni.ipam.store import Store
from pycni.node_config import CONFLIST_NAME

pytestmark = [
    pytest.mark.netns,
    pytest.mark.runtimes,
    pytest.mark.skipif(
        not os.path.exists("/usr/bin/containerd") or not have("ctr") or not have("runc"),
        reason="containerd is not installed (Debian packages containerd, runc)",
    ),
    pytest.mark.skipif(
        not have("podman") or not have("debootstrap") or not os.path.exists("/bin/busybox"),
        reason="the images are built with podman and debootstrap (Debian packages podman, "
        "debootstrap, busybox-static)",
    ),
    pytest.mark.skipif(
        importlib.util.find_spec("grpc") is None, reason="grpcio is needed to speak CRI"
    ),
    pytest.mark.skipif(
        not os.path.exists("/usr/lib/cni/loopback"),
        reason="a node's loopback plugin (Debian package containernetworking-plugins)",
    ),
]

REPO = os.path.join(os.path.dirname(__file__), "..", "..")
DEPLOY = os.path.join(REPO, "deploy", "kubernetes")
BUSYBOX = "localhost/pycni-busybox:test"  # the pause image and the workload pods' image
SUBNET, GATEWAY = "10.244.37.0/24", "10.244.37.1"  # the Node's podCIDR (cluster 10.244/16)
NODE_IP, UPLINK_IP = "192.0.2.1", "192.0.2.254"
# What the rolling update is measured with: pings from one pod to the other and to the
# gateway every PING_INTERVAL seconds, over the whole replacement of the agent's pod.
PING_INTERVAL = 0.1
FIGURES: dict[str, float] = {}  # printed at the end of the module (pytest -s shows them)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The agent's image as deploy/IMAGE names it, a second version of it (another commit
    stamped: another image ID) for the rolling update, and busybox."""
    built = image_build.build(REPO)
    FIGURES["image build s"] = built.seconds
    FIGURES["image MB"] = built.size() / 1e6
    upgrade = image_build.build(
        REPO, built.ref + "-next", commit=image_build.git_commit(REPO) + "-next"
    )
    FIGURES["upgrade image build s"] = upgrade.seconds
    busybox = build_pause_image(str(tmp_path_factory.mktemp("busybox")), BUSYBOX)
    return built, upgrade, busybox


class Cluster:
    """The node, its containerd and kubelet, the in-cluster API; the test drives them."""

    def __init__(self, base: str, images) -> None:
        self.built, self.upgrade, busybox = images
        self.spaces = Namespaces()
        self.api: incluster.InCluster | None = None
        self.runtime: NodeContainerd | None = None
        self.kubelet: Kubelet | None = None
        self.agent_pod = None
        self.docs = podspec.load(os.path.join(DEPLOY, "pycni.yaml"))
        self.uninstall_docs = podspec.load(os.path.join(DEPLOY, "pycni-uninstall.yaml"))
        ns = self.spaces.make("imnode")
        uplink = self.spaces.make("imup")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "up0")
        sh("ip", "-n", ns, "link", "set", "up0", "netns", uplink)
        sh("ip", "-n", ns, "addr", "add", f"{NODE_IP}/24", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", uplink, "addr", "add", f"{UPLINK_IP}/24", "dev", "up0")
        sh("ip", "-n", uplink, "link", "set", "up0", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", UPLINK_IP)
        self.node = Node(unique("imn"), ns, os.path.join(base, "root"), os.path.join(base, "k"))
        self.node.provision()
        self.api = incluster.serve(ns, os.path.join(base, "pki"))
        self.api.api.put(make_node(self.node.name, [SUBNET], [NODE_IP]))
        self.runtime = NodeContainerd(
            os.path.join(base, "ctd"), ns, self.node.root, sandbox_image=BUSYBOX
        )
        self.runtime.start()
        for archive in (self.built.archive, self.upgrade.archive, busybox):
            self.runtime.import_image(archive)
        self.kubelet = Kubelet(
            self.node,
            self.runtime,
            service_account=self.api.service_account("kube-system", "pycni-token"),
        )

    # -- the DaemonSets' pods --------------------------------------------------------------

    def pod_for(self, docs, image: str | None = None) -> podspec.PodSpec:
        assert self.api is not None
        return podspec.daemonset_pod(
            docs,
            self.node.name,
            uid=str(uuid.uuid4()),
            service_env=self.api.service_env(),
            image=image,
        )

    def install(self, image: str | None = None) -> dict[str, float]:
        """The DaemonSet's pod created; seconds to the node Ready (the config list written:
        containerd's NetworkReady) and to the pod Ready."""
        assert self.kubelet is not None and self.runtime is not None
        spec = self.pod_for(self.docs, image)
        self.agent_pod = pod = self.kubelet.run_pod(spec)
        node_ready = None
        deadline = time.monotonic() + 120
        while node_ready is None or not pod.ready():
            assert time.monotonic() < deadline, f"not Ready: {pod.events} {self.agent_log()}"
            if node_ready is None and self.runtime.network_ready()[0]:
                node_ready = time.monotonic() - pod.created_at
            time.sleep(0.02)
        return {"node Ready s": node_ready, "pod Ready s": self.kubelet.wait_ready(pod)}

    def remove_agent(self) -> None:
        assert self.kubelet is not None
        if self.agent_pod is not None:
            self.kubelet.delete_pod(self.agent_pod)
            self.agent_pod = None

    def agent_log(self) -> str:
        assert self.kubelet is not None
        if self.agent_pod is None:
            return ""
        return self.kubelet.container_log(self.agent_pod, "agent")[-3000:]

    # -- workload pods, as kubelet makes them --------------------------------------------

    def workload(self, name: str) -> tuple[str, str, str]:
        """(sandbox ID, address, busybox container ID) of a pod on the pod network."""
        assert self.runtime is not None
        cri = self.runtime.cri()
        uid = str(uuid.uuid4())
        logs = os.path.join(self.node.workdir, "pods", f"default_{name}_{uid}")
        config = pod_sandbox_config(name, "default", uid, logs, self.runtime.cgroup_parent)
        sid = cri.run_pod_sandbox(config)
        cid = cri.create_container(
            sid, container_config("app", BUSYBOX, ["/bin/sleep", "999999"]), config
        )
        cri.start_container(cid)
        return sid, cri.pod_sandbox_status(sid).status.network.ip, cid

    def remove_workload(self, sid: str) -> None:
        assert self.runtime is not None
        cri = self.runtime.cri()
        for c in cri.list_containers(sid):
            cri.stop_container(c.id)
            cri.remove_container(c.id)
        cri.stop_pod_sandbox(sid)
        cri.remove_pod_sandbox(sid)

    def ping(self, cid: str, target: str, count: int = 1) -> tuple[int, str]:
        assert self.runtime is not None
        rc, out, err = self.runtime.cri().exec_sync(cid, ["ping", "-c", str(count), "-W2", target])
        return rc, out + err

    def attachments(self) -> dict:
        data_dir = self.node.path("/var/lib/pycni")
        if not os.path.exists(os.path.join(data_dir, "pycni.db")):
            return {}
        with Store(data_dir) as store:
            return {a.container_id: a for a in store.list_attachments("pycni")}

    def close(self) -> list[str]:
        problems: list[str] = []
        if self.kubelet is not None:
            self.kubelet.close()
        if self.runtime is not None:
            problems += self.runtime.cleanup()
        if self.api is not None:
            self.api.stop()
        self.spaces.cleanup()
        return problems


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, images):
    base = str(tmp_path_factory.mktemp("imds"))
    made = None
    try:
        made = Cluster(base, images)
        yield made
    finally:
        problems = made.close() if made is not None else []
        shutil.rmtree(base, ignore_errors=True)
        print("\nDaemonSet figures (one run, a shared 2-core machine):")
        for name, value in FIGURES.items():
            print(f"  {name}: {value:.2f}")
    assert not problems, problems
    assert not [p for p in pids() if base.encode() in cmdline(p)], "processes left"
    assert not os.path.exists(base)


@pytest.fixture
def agent(cluster):
    """The agent's DaemonSet pod running and Ready on the node."""
    if cluster.agent_pod is None:
        cluster.install()
    return cluster


def test_the_image_is_the_containerfiles(images):
    built, upgrade, _ = images
    with open(os.path.join(REPO, "deploy", "IMAGE")) as f:
        assert built.ref == f.read().strip()
    config = image_build.image_config(built.archive)
    assert config["Entrypoint"] == ["pycnictl"] and config["Cmd"] == ["agent"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["PYCNI_COMMIT"] == image_build.git_commit(REPO) != ""
    assert image_build.image_config(upgrade.archive)["Env"] != config["Env"]
    # The native launcher the init container copies, and pycnictl in the agent's venv.
    names = set()
    with tarfile.open(built.archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))
        for layer in manifest[0]["Layers"]:
            with tarfile.open(fileobj=tar.extractfile(layer)) as inner:
                names.update(n.removeprefix("./") for n in inner.getnames())
    assert "opt/pycni/bin/pycni" in names
    assert "opt/pycni/venv/bin/pycnictl" in names
    assert any(re.search(r"site-packages/pycni/agent/server\.py$", n) for n in names)
    assert {"usr/sbin/nft", "usr/sbin/iptables"} <= names
    assert "bin/ip" in names or "usr/bin/ip" in names or "sbin/ip" in names
    # A second build of the same tree is the cached archive.
    again = image_build.build(REPO)
    assert again.cached and again.archive == built.archive


def test_daemonset_pod_networks_the_node(cluster):
    figures = cluster.install()
    FIGURES.update(figures)
    conflist = cluster.node.path(f"{CNI_CONF_DIR}/{CONFLIST_NAME}")
    assert os.path.exists(conflist), "the agent wrote the node's config list"
    with open(conflist) as f:
        assert json.load(f)["plugins"][0]["type"] == "pycni"
    plugin = cluster.node.path("/opt/cni/bin/pycni")
    with open(plugin, "rb") as f:
        assert b"pycni native shim " in f.read(), "the init container installed the launcher"
    assert cluster.agent_pod.restarts() == 0, cluster.agent_pod.events

    t = time.monotonic()
    (sid_a, ip_a, ctr_a) = cluster.workload("web-a")
    FIGURES["first workload pod networked s"] = time.monotonic() - cluster.agent_pod.created_at
    FIGURES["RunPodSandbox+container s"] = time.monotonic() - t
    (sid_b, ip_b, ctr_b) = cluster.workload("web-b")
    try:
        for ip in (ip_a, ip_b):
            assert ipaddress.ip_address(ip) in ipaddress.ip_network(SUBNET) and ip != GATEWAY
        stored = cluster.attachments()
        assert {str(stored[s].allocations[0].ip) for s in (sid_a, sid_b)} == {ip_a, ip_b}
        for cid, target in ((ctr_a, ip_b), (ctr_b, ip_a), (ctr_a, GATEWAY)):
            rc, out = cluster.ping(cid, target)
            assert rc == 0, f"ping {target}: {out}"
        # The Node's annotations: the agent published its address through the API.
        assert cluster.api.api.annotations(cluster.node.name).get("pycni.io/node-ips")
    finally:
        for sid in (sid_a, sid_b):
            cluster.remove_workload(sid)
    assert not set(cluster.attachments()) & {sid_a, sid_b}, "removal freed the addresses"
    veths = sh("ip", "-n", cluster.node.netns, "-o", "link", "show", "type", "veth").stdout
    assert "alias pycni" not in veths


class Pinger:
    """busybox ping from a pod's container to `target` every PING_INTERVAL seconds, from
    start() until stop() interrupts it (ping prints its statistics on SIGINT), so that the
    pings cover exactly what happens in between."""

    def __init__(self, cluster, cid: str, target: str) -> None:
        self.cri = cluster.runtime.cri()
        self.cid, self.target = cid, target
        self.log = f"/tmp/ping-{target}.log"
        self.missing: list[int] = []

    def _sh(self, script: str) -> str:
        rc, out, err = self.cri.exec_sync(self.cid, ["sh", "-c", script])
        assert rc == 0, out + err
        return out

    def start(self) -> Pinger:
        self._sh(
            f"ping -i {PING_INTERVAL} {self.target} > {self.log} 2>&1 & echo $! > {self.log}.pid"
        )
        return self

    def stop(self) -> tuple[int, int]:
        """(pings sent, replies missing), counting only the pings sent before the last one
        answered: the one in flight when ping is interrupted is not a loss."""
        self._sh(f"kill -INT $(cat {self.log}.pid)")
        for _ in range(50):
            text = self._sh(f"cat {self.log}")
            if "packets transmitted" in text:
                answered = {int(n) for n in re.findall(r"seq=(\d+)", text)}
                assert answered, text
                self.missing = sorted(set(range(max(answered))) - answered)
                return max(answered) + 1, len(self.missing)
            time.sleep(0.1)
        raise AssertionError(f"ping printed no statistics: {text}")


def test_rolling_update_keeps_pods_traffic_and_addresses(agent):
    cluster = agent
    (sid_a, ip_a, ctr_a) = cluster.workload("steady-a")
    (sid_b, ip_b, ctr_b) = cluster.workload("steady-b")
    try:
        pingers = [Pinger(cluster, ctr_a, ip_b).start(), Pinger(cluster, ctr_a, GATEWAY).start()]
        time.sleep(1.0)
        t = time.monotonic()
        # The DaemonSet controller's RollingUpdate (maxUnavailable 1) on this node: the old
        # pod deleted (its grace period), then the pod of the new template created.
        cluster.remove_agent()
        FIGURES["update: old pod stopped s"] = time.monotonic() - t
        figures = cluster.install(image=cluster.upgrade.ref)
        FIGURES["update: old pod deleted to new pod Ready s"] = time.monotonic() - t
        FIGURES["update: new pod created to node Ready s"] = figures["node Ready s"]
        time.sleep(1.0)
        lost = {}
        for pinger, what in zip(pingers, ("pod", "gateway"), strict=True):
            sent, missing = pinger.stop()
            assert sent >= 10, "the pings ran over the whole update"
            FIGURES[f"update: pings sent to {what}"] = sent
            lost[what] = FIGURES[f"update: pings lost to {what}"] = missing
        assert lost == {"pod": 0, "gateway": 0}, [p.missing for p in pingers]
        # Same pods, same addresses, and the new agent serves them and new ones.
        status = cluster.runtime.cri().pod_sandbox_status
        assert (status(sid_a).status.network.ip, status(sid_b).status.network.ip) == (ip_a, ip_b)
        assert {str(a.allocations[0].ip) for a in cluster.attachments().values()} >= {ip_a, ip_b}
        assert [c.image for c in cluster.agent_pod.spec.containers] == [cluster.upgrade.ref]
        (sid_c, ip_c, ctr_c) = cluster.workload("after-update")
        try:
            assert ip_c not in (ip_a, ip_b)
            assert cluster.ping(ctr_c, ip_a)[0] == 0
        finally:
            cluster.remove_workload(sid_c)
    finally:
        for sid in (sid_a, sid_b):
            with contextlib.suppress(Exception):
                cluster.remove_workload(sid)


def test_uninstall_manifest_leaves_nothing_of_pycni(agent):
    cluster = agent
    node = cluster.node
    # kubectl delete -f pycni.yaml (the node drained of pods first), then the uninstall
    # DaemonSet's pod, Ready once `pycnictl uninstall` succeeded.
    cluster.remove_agent()
    spec = cluster.pod_for(cluster.uninstall_docs)
    pod = cluster.kubelet.run_pod(spec)
    try:
        FIGURES["uninstall pod Ready s"] = cluster.kubelet.wait_ready(pod, timeout=120)
        log = cluster.kubelet.container_log(pod, "uninstall")
    finally:
        cluster.kubelet.delete_pod(pod)
    assert "removed" in log, log
    # The uninstall inventory, run again from the host on the node's paths and namespace,
    # finds nothing left to remove.
    again = sh(
        "ip",
        "netns",
        "exec",
        node.netns,
        sys.executable,
        "-c",
        "from pycni.ctl.main import main; main()",
        "uninstall",
        f"--bin-dir={node.path('/opt/cni/bin')}",
        f"--conf-dir={node.path(CNI_CONF_DIR)}",
        f"--data-dir={node.path('/var/lib/pycni')}",
        f"--run-dir={node.path('/run/pycni')}",
        check=False,
    )
    assert again.returncode == 0, again.stderr
    assert "removed" not in again.stdout, again.stdout
    assert not os.path.exists(node.path("/opt/cni/bin/pycni"))
    assert os.path.exists(node.path("/opt/cni/bin/loopback")), "not pycni's: kept"
    assert not os.path.exists(node.path(f"{CNI_CONF_DIR}/{CONFLIST_NAME}"))
    assert not os.path.exists(node.path("/var/lib/pycni"))
    assert not os.path.exists(node.path("/run/pycni"))
    links = sh("ip", "-n", node.netns, "-o", "link", "show").stdout
    assert "cni0" not in links and "pycni." not in links
    assert "proto 120" not in sh("ip", "-n", node.netns, "route", "show").stdout
    assert "pycni" not in sh("ip", "netns", "exec", node.netns, "nft", "list", "tables").stdout
    annotations = cluster.api.api.annotations(node.name)
    assert not [k for k in annotations if k.startswith("pycni.io/")], annotations
