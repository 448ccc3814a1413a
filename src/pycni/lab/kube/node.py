"""A Kubernetes node of the lab: containerd, kubelet and kube-proxy in the node's namespace.

Each node also gets a mount namespace of its own (pycni.harness.nodefs), shared by its
containerd, kubelet and kube-proxy (all three must see the same mounts: the kubelet mounts
volumes that runc then binds into containers, so never `ip netns exec`, which gives each
process a private one). In it the node's own directories replace the machine's (NODE_DIRS):
/etc/cni/net.d, /opt/cni/bin, /var/lib/{kubelet,cni,pycni}, /var/log/pods, /run/netns,
/run/containerd and /run/pycni are <state>/nodes/NAME/fs/..., so pycni's manifest applies
unchanged (its hostPaths are per node) and the machine's /etc/cni is never touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from ...harness.containerd import Containerd, ContainerdError
from ...harness.kube import binary
from ...harness.nodefs import mount_namespace
from ...harness.peers import pinned_containerd
from ..model import Lab, LabError, Node
from . import controlplane as cp
from . import procs

NODE_DIRS = (
    "/etc/cni",
    "/opt",
    "/var/lib",
    "/var/log",
    "/run/netns",
    "/run/containerd",
    "/run/pycni",
)
# Mount points the machine may lack (the others exist on any Debian with iproute2 and
# containerd installed), made empty when missing.
MOUNT_POINTS = ("/run/pycni",)
# Host files the pods create when missing: pycni's DaemonSet mounts /run/xtables.lock
# (FileOrCreate) from the machine, shared by every node (it only serialises iptables).
HOST_FILES = ("/run/xtables.lock",)
CGROUP_ROOT = "/sys/fs/cgroup"
LOOPBACK = "/usr/lib/cni/loopback"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10.2"
SYSCTLS = ("vm.overcommit_memory", "kernel.panic", "kernel.panic_on_oops")
KUBELET_ROOT = "/var/lib/kubelet"  # inside the node's mount namespace


def fs_root(node: Node) -> str:
    return os.path.join(node.root, "fs")


def node_path(node: Node, path: str) -> str:
    """A path of the node's mount namespace, as the host sees it."""
    return os.path.join(fs_root(node), path.lstrip("/"))


def cgroup_root(lab: Lab, node: Node) -> str:
    """The node's kubelet cgroupRoot: one per node (shared, the kubelets kill each other's
    pods as orphans)."""
    return f"/pycni-{lab.prefix}-{node.name}"


CONTAINERD_METRICS_PORT = 1338  # = bench.cri.METRICS_PORT: one reader for both


class NodeContainerd(Containerd):
    """containerd 2.x (config version 3) in the node's network and (new) mount namespace."""

    def __init__(self, node: Node) -> None:
        peer = pinned_containerd()
        super().__init__(
            os.path.join(node.root, "containerd"),
            node.netns,
            "/opt/cni/bin",
            "/etc/cni/net.d",
            sandbox_image=PAUSE_IMAGE,
            binary=peer.binary,
            ctr=peer.ctr,
            shim_dir=peer.shim_dir,
            # Its own account of CNI calls (bench kube reads it), on the node's loopback.
            metrics_port=CONTAINERD_METRICS_PORT,
        )
        self.node = node

    def config_text(self) -> str:
        text = super().config_text()
        # No AppArmor profile on this machine's containers (none is loaded here).
        runtime = '[plugins."io.containerd.cri.v1.runtime"]\n'
        return text.replace(runtime, runtime + "  disable_apparmor = true\n", 1)

    def command(self) -> list[str]:
        nodefs = [sys.executable, "-I", "-m", "pycni.harness.nodefs", str(mount_namespace())]
        return [
            "nsenter", f"--net=/run/netns/{self.netns}", "--",
            "unshare", "--mount", "--propagation", "slave", "--",
            *nodefs, fs_root(self.node), *NODE_DIRS, "--",
            self.binary, "--config", self.config,
        ]  # fmt: skip

    def start_detached(self, lab: Lab, timeout: float = 60.0) -> int:
        for directory in (self.workdir, self.root, self.state, self.runc_root):
            os.makedirs(directory, exist_ok=True)
        with open(self.config, "w") as f:
            f.write(self.config_text())
        env = dict(os.environ)
        env["PATH"] = f"{self.shim_dir}{os.pathsep}{env.get('PATH', '')}"
        pid = procs.start(
            lab.state_dir, f"containerd-{self.node.name}", self.binary, self.command(),
            self.log_file, env=env,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not os.path.exists(f"/proc/{pid}"):
                raise ContainerdError(f"containerd exited: {self.log_tail()}")
            if os.path.exists(self.socket):
                proc = subprocess.run(
                    [self.ctr_binary, "--address", self.socket, "version"],
                    capture_output=True, timeout=10,
                )  # fmt: skip
                if proc.returncode == 0:
                    return pid
            time.sleep(0.1)
        raise ContainerdError(f"containerd not answering within {timeout:.0f} s")

    def import_archive(self, archive: str) -> None:
        # --all-platforms: a multi-platform index imports whole; nothing is ever pulled later.
        self.ctr("images", "import", "--all-platforms", "--snapshotter", "overlayfs", archive,
                 timeout=600)  # fmt: skip


def prepare_node_fs(node: Node) -> None:
    """The node's directories, and what a kubeadm node has before any pod: the loopback
    plugin in /opt/cni/bin (the kubernetes-cni package)."""
    for d in NODE_DIRS:
        os.makedirs(node_path(node, d), exist_ok=True)
    for d in ("/opt/cni/bin", "/etc/cni/net.d", KUBELET_ROOT, "/var/log/pods"):
        os.makedirs(node_path(node, d), exist_ok=True)
    shutil.copy2(LOOPBACK, node_path(node, "/opt/cni/bin/loopback"))


def host_paths_made() -> list[str]:
    """Make the missing mount points; return those and the host files not there yet (the
    lab will have made them), for remove_host_paths()."""
    made = [p for p in (*MOUNT_POINTS, *HOST_FILES) if not os.path.lexists(p)]
    for point in MOUNT_POINTS:
        os.makedirs(point, exist_ok=True)
    return made


def make_cgroups(lab: Lab, node: Node) -> None:
    """cgroupRoot in every v1 hierarchy beforehand (else the kubelet: "has some missing
    paths"); cpuset's needs its parent's cpus and mems to take tasks."""
    for hierarchy in _hierarchies():
        path = os.path.join(CGROUP_ROOT, hierarchy, cgroup_root(lab, node).lstrip("/"))
        os.makedirs(path, exist_ok=True)
        if hierarchy == "cpuset":
            for key in ("cpuset.cpus", "cpuset.mems"):
                with open(os.path.join(CGROUP_ROOT, hierarchy, key)) as f:
                    value = f.read().strip()
                with open(os.path.join(path, key), "w") as f:
                    f.write(value)


def remove_cgroups(lab: Lab, node: Node) -> list[str]:
    left = []
    # The kubelet makes its cgroupRoot in the (empty) cgroup2 hierarchy too.
    for hierarchy in [*_hierarchies(), "unified"]:
        top = os.path.join(CGROUP_ROOT, hierarchy, cgroup_root(lab, node).lstrip("/"))
        if not os.path.isdir(top):
            continue
        for dirpath, _, _ in sorted(os.walk(top), key=lambda w: len(w[0]), reverse=True):
            try:
                os.rmdir(dirpath)
            except OSError:
                left.append(dirpath)
    return left


def _hierarchies() -> list[str]:
    if not os.path.isdir(CGROUP_ROOT):
        return []
    # The v1 hierarchies (cgroup2 at "unified" holds no controllers on this hybrid machine).
    return sorted(
        h
        for h in os.listdir(CGROUP_ROOT)
        if h != "unified" and os.path.isdir(os.path.join(CGROUP_ROOT, h))
    )


def kubelet_config(lab: Lab, node: Node) -> str:
    """KubeletConfiguration; every setting below answered an error seen on this machine."""
    d = os.path.join(node.root, "kubelet")
    os.makedirs(d, exist_ok=True)
    resolv = os.path.join(d, "resolv.conf")
    with open(resolv, "w") as f:
        # Pods with dnsPolicy Default get this; there is nothing beyond the lab to ask.
        f.write(f"nameserver {node.router_ip}\n")
    p = cp.pki(lab)
    text = f"""\
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine has cgroups v1 (hybrid), which kubelet 1.37 refuses unless told.
failCgroupV1: false
# containerd 1.6 lacks CRI RuntimeConfig; with 2.x this is also what it reports.
cgroupDriver: cgroupfs
cgroupRoot: {cgroup_root(lab, node)}
failSwapOn: false
containerRuntimeEndpoint: unix://{os.path.join(node.root, "containerd", "containerd.sock")}
address: {node.lan_ip}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
# false: the kubelet then sets vm.overcommit_memory, kernel.panic, kernel.panic_on_oops on
# the machine; `lab down` puts them back.
protectKernelDefaults: false
podLogsDir: /var/log/pods
volumePluginDir: {os.path.join(d, "volume-plugins")}
resolvConf: {resolv}
clusterDNS: [{cp.DNS_SERVICE_IP}]
clusterDomain: {cp.CLUSTER_DOMAIN}
authentication:
  anonymous: {{enabled: false}}
  webhook: {{enabled: true}}
  x509: {{clientCAFile: {p.ca}}}
authorization:
  mode: Webhook
# The images were imported and can never be pulled again: never collect them, and never
# evict for a machine's disk that is fuller than a real node's would be.
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: "50Mi"
  nodefs.available: "1%"
  imagefs.available: "1%"
  nodefs.inodesFree: "1%"
serializeImagePulls: false
"""
    path = os.path.join(d, "config.yaml")
    with open(path, "w") as f:
        f.write(text)
    return path


def _enter_node(node: Node, containerd_pid: int, exe: str) -> list[str]:
    """The node's network namespace and its mount namespace (containerd's)."""
    return [
        "nsenter",
        f"--net=/run/netns/{node.netns}",
        f"--mount=/proc/{containerd_pid}/ns/mnt",
        "--",
        exe,
    ]


def start_kubelet(lab: Lab, node: Node, containerd_pid: int) -> None:
    exe = binary("kubelet")
    config = kubelet_config(lab, node)
    kubeconfig = os.path.join(cp.kube_dir(lab), f"kubelet-{node.name}.kubeconfig")
    argv = _enter_node(node, containerd_pid, exe) + [
        f"--config={config}",
        f"--kubeconfig={kubeconfig}",
        f"--root-dir={KUBELET_ROOT}",
        f"--hostname-override={node.name}",
        f"--node-ip={','.join(ip for ip in (node.lan_ip, node.lan6_ip) if ip)}",
        "--v=1",
    ]
    procs.start(lab.state_dir, f"kubelet-{node.name}", exe, argv,
                os.path.join(node.root, "kubelet.log"))  # fmt: skip


def start_kube_proxy(lab: Lab, node: Node, containerd_pid: int, mode: str) -> None:
    exe = binary("kube-proxy")
    d = os.path.join(node.root, "kube-proxy")
    os.makedirs(d, exist_ok=True)
    config = os.path.join(d, "config.yaml")
    with open(config, "w") as f:
        f.write(f"""\
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {os.path.join(cp.kube_dir(lab), "kube-proxy.kubeconfig")}
mode: {mode}
clusterCIDR: {",".join(cp.cluster_cidrs(lab))}
hostnameOverride: {node.name}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
# The conntrack table size is the machine's, not a namespace's: leave it alone.
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
""")
    argv = _enter_node(node, containerd_pid, exe) + [f"--config={config}", "--v=1"]
    procs.start(lab.state_dir, f"kube-proxy-{node.name}", exe, argv,
                os.path.join(node.root, "kube-proxy.log"))  # fmt: skip


def remove_host_paths(made: list[str]) -> None:
    """What host_paths_made() listed, unless another lab's node still has the mount point
    mounted (that lab uses them all)."""
    if any(_mounted_in(pid, point) for pid in _pids() for point in MOUNT_POINTS):
        return
    for path in made:
        try:
            if os.path.isdir(path) and not os.path.islink(path):
                os.rmdir(path)  # only when empty
            else:
                os.unlink(path)
        except OSError:
            pass


def _pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def _mounted_in(pid: int, point: str) -> bool:
    try:
        with open(f"/proc/{pid}/mountinfo") as f:
            return any(line.split()[4] == point for line in f)
    except (OSError, IndexError):
        return False


def other_kube_labs(state_dir: str) -> list[str]:
    """State directories of the other Kubernetes labs running on the machine, from their
    kubelets' --config (<state>/nodes/NAME/kubelet/config.yaml)."""
    found = []
    for pid in _pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if not argv or os.path.basename(argv[0]) != "kubelet":
            continue
        for arg in argv:
            if arg.startswith("--config=") and arg.endswith("/kubelet/config.yaml"):
                other = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(arg[9:]))))
                if other != state_dir and other not in found:
                    found.append(other)
    return found


def read_sysctls() -> dict[str, str]:
    out = {}
    for key in SYSCTLS:
        with open("/proc/sys/" + key.replace(".", "/")) as f:
            out[key] = f.read().strip()
    return out


def restore_sysctls(saved: dict[str, str]) -> list[str]:
    problems = []
    for key, value in saved.items():
        try:
            with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
                f.write(value)
        except OSError as exc:
            problems.append(f"sysctl {key}={value}: {exc}")
    return problems


__all__ = ["LabError"]
