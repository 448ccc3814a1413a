"""`lab up --kubernetes` and its teardown: every step in order, each timed."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ...harness.kube import ImageArchive, images
from ..build import build_node_network, build_router_and_outside
from ..model import Lab, LabError, Node
from . import addons, procs, reference
from . import controlplane as cp
from . import node as kn

NODES_TIMEOUT = 180.0
PROXY_MODE = "nftables"


def _sysctl_file(lab: Lab) -> str:
    return os.path.join(cp.kube_dir(lab), "sysctls.json")


def bring_up(lab: Lab, say: Callable[[str], None] = print) -> dict[str, float]:
    """Build the cluster `lab` plans; on failure the caller tears down (lab.json says what).
    Returns the seconds each milestone took from the start."""
    started = time.monotonic()
    marks: dict[str, float] = {}

    def mark(what: str) -> None:
        marks[what] = time.monotonic() - started
        say(f"  {marks[what]:6.1f} s  {what}")

    lab.kubernetes = True
    os.makedirs(os.path.join(cp.kube_dir(lab), "logs"), exist_ok=True)
    lab.save()  # first, so that `lab down` can undo whatever follows
    build_router_and_outside(lab)
    cp.build_cp_netns(lab)
    for node in lab.nodes:
        build_node_network(lab, node, default_route=False,
                           extra_routes=tuple(cp.service_cidrs(lab)))  # fmt: skip
    cp.make_pki(lab, [n.name for n in lab.nodes])
    mark("namespaces and certificates made")
    cp.start_etcd(lab)
    cp.start_apiserver(lab)
    cp.wait_apiserver(lab)
    mark("kube-apiserver ready")
    cp.start_controllers(lab)
    # What the kubelets change on the machine, put back by `lab down`. With another
    # Kubernetes lab up, the machine's own values are what that lab saved (its kubelets have
    # changed them), and so are the host paths it made: the last lab down puts them back.
    others = kn.other_kube_labs(lab.state_dir)
    if not os.path.exists(_sysctl_file(lab)):
        _write_json(_sysctl_file(lab), _inherit(others, "sysctls.json", kn.read_sysctls))
    made_file = os.path.join(cp.kube_dir(lab), "host-paths.json")
    if not os.path.exists(made_file):
        made = kn.host_paths_made()
        _write_json(made_file, _inherit(others, "host-paths.json", lambda: made))
    archives = images()  # pycni's own is (re)built here when the checkout changed
    mark(f"{len(archives)} image archives ready")
    # The nodes side by side: importing the images is most of a node's start.
    with ThreadPoolExecutor(len(lab.nodes)) as pool:
        list(pool.map(lambda n: start_node(lab, n, archives), lab.nodes))
    mark(f"{len(lab.nodes)} node(s) started (containerd, images, kubelet, kube-proxy)")
    wait_nodes(lab, ready=False)
    mark("nodes registered (NotReady: no pod network yet)")
    if lab.cni == "pycni":
        addons.apply_pycni(lab)
        writer = "pycni's agent"
    else:
        reference.install(lab, lab.cni, pod_cidrs(lab))
        writer = f"the lab, for {lab.cni},"
    wait_nodes(lab, ready=True)
    mark(f"nodes Ready ({writer} wrote the config list)")
    subnets = pod_cidrs(lab)
    cp.route_pod_subnets(lab, subnets)
    for node in lab.nodes:
        for cidr in subnets.get(node.name, []):
            if ":" in cidr:
                node.subnet6 = cidr
            else:
                node.subnet = cidr
    lab.save()
    if addons.apply_coredns(lab, archives):
        wait_rollout(lab, "deployment/coredns")
        mark("CoreDNS ready behind 10.96.0.10")
    else:
        say("  (no CoreDNS image built: cluster DNS is absent)")
    if lab.cni == "pycni":
        wait_rollout(lab, "daemonset/pycni")
        mark("pycni DaemonSet rolled out")
    return marks


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f)


def _inherit(others: list[str], name: str, default: Callable[[], object]) -> object:
    """What another running lab recorded under kube/NAME, else default()."""
    for other in others:
        try:
            with open(os.path.join(other, "kube", name)) as f:
                return json.load(f)
        except (OSError, ValueError):
            continue
    return default()


def start_node(lab: Lab, node: Node, archives: list[ImageArchive]) -> None:
    kn.prepare_node_fs(node)
    kn.make_cgroups(lab, node)
    ctd = kn.NodeContainerd(node)
    pid = ctd.start_detached(lab)
    for archive in archives:  # under their exact names: the kubelet never pulls
        ctd.import_archive(archive.path)
    kn.start_kubelet(lab, node, pid)
    kn.start_kube_proxy(lab, node, pid, PROXY_MODE)


def _nodes(lab: Lab) -> list[dict]:
    out = cp.kubectl(lab, "get", "nodes", "-o", "json", timeout=30).stdout
    return json.loads(out)["items"]


def pod_cidrs(lab: Lab) -> dict[str, list[str]]:
    """Each Node's podCIDRs as the controller manager allocated them (IPv4 first)."""
    out = {}
    for n in _nodes(lab):
        spec = n["spec"]
        out[n["metadata"]["name"]] = spec.get("podCIDRs") or [c for c in [spec.get("podCIDR")] if c]
    return out


def _ready(node: dict) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in node.get("status", {}).get("conditions", [])
    )


def wait_nodes(lab: Lab, ready: bool, timeout: float = NODES_TIMEOUT) -> None:
    want = {n.name for n in lab.nodes}
    deadline = time.monotonic() + timeout
    seen: dict[str, bool] = {}
    while time.monotonic() < deadline:
        for name, info in procs.recorded(lab.state_dir).items():
            if name.startswith(("kubelet-", "containerd-")) and not procs.running(info):
                raise LabError(f"{name} exited: see {info['log']}")
        seen = {n["metadata"]["name"]: _ready(n) for n in _nodes(lab)}
        if want <= set(seen) and (not ready or all(seen[n] for n in want)):
            return
        time.sleep(0.25)
    missing = sorted(n for n in want if n not in seen or (ready and not seen[n]))
    raise LabError(
        f"nodes {', '.join(missing)} not {'Ready' if ready else 'registered'} after "
        f"{timeout:.0f} s (see each node's kubelet.log under {lab.state_dir}/nodes)"
    )


def wait_rollout(lab: Lab, what: str, timeout: float = 180.0) -> None:
    cp.kubectl(lab, "-n", "kube-system", "rollout", "status", what, f"--timeout={timeout:.0f}s",
               timeout=timeout + 10)  # fmt: skip


def teardown(lab: Lab, say: Callable[[str], None] = lambda *a: None) -> list[str]:
    """Stop the cluster: kubelets first (they would restart what goes), then each node's
    containers killed outright (runc delete --force: the node and its pods' namespaces go
    with the lab, so no pod needs a graceful DEL), shims, containerd, the control plane, the
    cgroups; the machine's sysctls put back. The namespaces and files go in lab.lifecycle."""
    problems: list[str] = []
    state = lab.state_dir
    started = time.monotonic()

    def step(what: str) -> None:
        say(f"  {time.monotonic() - started:5.1f} s  {what}")

    names = list(procs.recorded(state))
    # Nothing is kept: no daemon needs a graceful stop (the apiserver's alone takes seconds).
    procs.stop(state, [n for n in names if n.startswith(("kubelet-", "kube-proxy-"))], grace=1)
    procs.stop(state, [n for n in names if n.startswith("containerd-")], grace=0.0)
    step("kubelets, kube-proxies and containerds stopped")

    def cleanup(node: Node) -> list[str]:
        if not os.path.isdir(os.path.join(node.root, "containerd")):
            return []
        try:
            return kn.NodeContainerd(node).cleanup()
        except Exception as exc:  # noqa: BLE001 - keep removing the rest
            return [f"{node.name}: containerd cleanup: {exc}"]

    # Side by side: most of it is removing each containerd's unpacked images (17,000 files).
    with ThreadPoolExecutor(max(1, len(lab.nodes))) as pool:
        for found in pool.map(cleanup, lab.nodes):
            problems += found
    step("containers and shims killed")
    procs.stop(state, ["kube-controller-manager", "kube-scheduler", "kube-apiserver", "etcd"],
               grace=1)  # fmt: skip
    step("control plane stopped")
    for node in lab.nodes:
        left = kn.remove_cgroups(lab, node)
        if left:
            problems.append(f"{node.name}: cgroups left: {left[:3]}")
    others = kn.other_kube_labs(state)
    if others:
        say(f"the sysctls and host paths stay for the other lab(s) up: {', '.join(others)}")
    else:
        try:
            with open(_sysctl_file(lab)) as f:
                problems += kn.restore_sysctls(json.load(f))
            say("put back the machine's sysctls the kubelets changed")
        except FileNotFoundError:
            pass
        try:
            with open(os.path.join(cp.kube_dir(lab), "host-paths.json")) as f:
                kn.remove_host_paths(json.load(f))
        except FileNotFoundError:
            pass
    say(f"cluster stopped in {time.monotonic() - started:.1f} s")
    return problems
