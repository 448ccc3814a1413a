"""A DaemonSet's pod run on a sandboxed node as kubelet runs it: by containerd, over CRI.

No control plane runs here; everything below kubelet does. The node is a network namespace
plus a root directory: containerd is started in the namespace and in a mount namespace of its
own where the node's directories (`NODE_DIRS`: /etc/cni, /opt, /run, /var/lib) are the
root's (see nodefs.py), so the manifest's hostPaths, containerd's CNI directories
(/opt/cni/bin, /etc/cni/net.d), the pods' network namespaces (/run/netns) and pycni's own
paths are the real paths inside, and the host's are never touched. From the host they are
under the root (`Node.path`).

`Kubelet.run_pod` takes a `podspec.PodSpec` (the manifest's pod template, resolved) and does
what kubelet's pod workers do: creates the hostPath directories and files the volume types
ask for, writes the service-account volume, RunPodSandbox (host network and PID namespaces
as the spec says, privileged when a container is), each init container to completion in
order, then the containers; and, while the pod lives, polls each container's probes at their
period and restarts a container whose liveness fails or that exits (restartPolicy Always).
`Kubelet.delete_pod` stops it as kubelet does: StopContainer with the grace period, then the
sandbox. What differs from kubelet is listed in docs/kubernetes.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import sys
import threading
import time
from dataclasses import dataclass, field

from .containerd import Containerd, ContainerdError
from .cri import CriClient, CriError
from .nodefs import mount_namespace
from .podspec import Container, PodSpec, Probe

NODE_DIRS = ("/etc/cni", "/opt", "/run", "/var/lib")
CNI_BIN_DIR = "/opt/cni/bin"
CNI_CONF_DIR = "/etc/cni/net.d"
LOOPBACK = "/usr/lib/cni/loopback"
CLONE_NEWNET = 0x40000000
INIT_TIMEOUT = 120.0
CRITICAL_PRIORITY_CLASSES = ("system-node-critical", "system-cluster-critical")
SYNC_EVERY = 1.0  # seconds between kubelet's looks at a pod's containers


class KubeletError(Exception):
    pass


# -- the node -----------------------------------------------------------------------------------


class NodeContainerd(Containerd):
    """containerd on a node whose NODE_DIRS are `root`'s, CNI at the kubelet defaults."""

    def __init__(self, workdir: str, netns: str, root: str, *, sandbox_image: str) -> None:
        super().__init__(workdir, netns, CNI_BIN_DIR, CNI_CONF_DIR, sandbox_image=sandbox_image)
        self.node_root = os.path.abspath(root)

    def command(self) -> list[str]:
        nodefs = [sys.executable, "-I", "-m", "pycni.harness.nodefs", str(mount_namespace())]
        nodefs += [self.node_root, *NODE_DIRS]
        return [
            "nsenter",
            f"--net=/run/netns/{self.netns}",
            "--",
            "unshare",
            "--mount",
            "--propagation",
            "slave",
            "--",
            *nodefs,
            "--",
            self.binary,
            "--config",
            self.config,
        ]

    def _wait_ready(self, timeout: float) -> None:
        """Until CRI answers: a node has no network before its network's DaemonSet runs."""
        deadline = time.monotonic() + timeout
        last = "no socket yet"
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ContainerdError(
                    f"containerd exited with status {self.proc.returncode}: {self.log_tail()}"
                )
            if os.path.exists(self.socket):
                try:
                    self.cri().version(timeout=5)
                    return
                except CriError as exc:
                    last = str(exc)
            time.sleep(0.05)
        raise ContainerdError(f"containerd not answering within {timeout:.0f} s ({last})")

    def network_ready(self) -> tuple[bool, str]:
        """CRI's NetworkReady condition, what kubelet turns into the node's Ready."""
        conditions = {c.type: c for c in self.cri().runtime("Status", {}).status.conditions}
        network = conditions.get("NetworkReady")
        if network is None:
            return False, "no NetworkReady condition"
        return bool(network.status), f"{network.reason} {network.message}".strip()


@dataclass
class Node:
    """A node: network namespace `netns`, its own directories under `root`."""

    name: str
    netns: str
    root: str
    workdir: str  # containerd's and kubelet's own state (not the node's files)

    def path(self, node_path: str) -> str:
        """Where a path of the node is, seen from the host."""
        if not any(node_path == d or node_path.startswith(d + "/") for d in NODE_DIRS):
            raise KubeletError(f"{node_path} is not under the node's own directories {NODE_DIRS}")
        return os.path.join(self.root, node_path.lstrip("/"))

    def provision(self) -> None:
        """What a node has before any pod: its directories and the runtime's loopback plugin
        in /opt/cni/bin (a kubeadm node has it from the kubernetes-cni package)."""
        for d in NODE_DIRS:
            os.makedirs(self.path(d), exist_ok=True)
        os.makedirs(self.path(CNI_BIN_DIR), exist_ok=True)
        os.makedirs(self.path(CNI_CONF_DIR), exist_ok=True)
        shutil.copy2(LOOPBACK, self.path(CNI_BIN_DIR + "/loopback"))


# -- sockets in the node's network namespace (kubelet's probes run there) ---------------------


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def in_netns(netns: str, make):
    """make() called in a thread that entered /run/netns/`netns` (setns is per thread; the
    thread ends there, this one never moves): sockets it creates stay in that namespace."""
    result: dict = {}

    def run() -> None:
        try:
            _setns(f"/run/netns/{netns}")
            result["value"] = make()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, name=f"netns-{netns}")
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def http_get(netns: str, host: str, port: int, path: str, timeout: float) -> int:
    """The status code of GET path, from the node's network namespace (as kubelet's prober,
    whose namespace a hostNetwork pod shares)."""
    sock = in_netns(netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    with sock:
        sock.settimeout(timeout)
        sock.connect((host, port))
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.37\r\n"
            "Accept: */*\r\nConnection: close\r\n\r\n".encode()
        )
        head = b""
        while b"\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                break
            head += chunk
    try:
        return int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise OSError(f"not an HTTP answer: {head[:80]!r}") from None


# -- the kubelet --------------------------------------------------------------------------------


def _quantity(text: str) -> float:
    """A Kubernetes quantity (50m, 64Mi, 1G, 2) as a number."""
    units = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
    for suffix in sorted(units, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * units[suffix]
    return float(text)


def oom_score_adj(pod: PodSpec, c: Container, memory_capacity: int) -> int:
    """kubelet's GetContainerOOMScoreAdjust: node-critical and Guaranteed pods -997,
    BestEffort 1000, Burstable by the share of the node's memory the container requests."""
    every = pod.init_containers + pod.containers
    if pod.priority_class in CRITICAL_PRIORITY_CLASSES:
        return -997
    if all(not x.resources.get("requests") and not x.resources.get("limits") for x in every):
        return 1000
    guaranteed = all(
        x.resources.get("limits", {}).get(r) is not None
        and x.resources.get("requests", {}).get(r, x.resources["limits"][r])
        == x.resources["limits"][r]
        for x in every
        for r in ("cpu", "memory")
    )
    if guaranteed:
        return -997
    request = int(_quantity(str(c.resources.get("requests", {}).get("memory", "0"))))
    return min(999, max(3, 1000 - (1000 * request) // memory_capacity))


def _memory_capacity() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 1 << 34


@dataclass
class ContainerState:
    spec: Container
    id: str
    attempt: int = 0
    restarts: int = 0
    ready: bool = False
    liveness_failures: int = 0
    readiness_failures: int = 0
    probed_at: dict[str, float] = field(default_factory=dict)
    started_at: float = 0.0
    ready_at: float | None = None


@dataclass
class RunningPod:
    spec: PodSpec
    sandbox_id: str
    sandbox_config: dict
    containers: dict[str, ContainerState]
    created_at: float  # monotonic: RunPodSandbox called
    initialized_at: float | None = None  # every init container done
    ready_at: float | None = None  # every container ready
    events: list[str] = field(default_factory=list)

    def ready(self) -> bool:
        return all(c.ready for c in self.containers.values())

    def restarts(self) -> int:
        return sum(c.restarts for c in self.containers.values())


class Kubelet:
    """Runs pods on `node` through `runtime`'s CRI, and keeps them running."""

    def __init__(
        self,
        node: Node,
        runtime: NodeContainerd,
        *,
        service_account: dict[str, str] | None = None,
        resolv_conf: str | None = None,
    ) -> None:
        self.node = node
        self.runtime = runtime
        # token, ca.crt, namespace: the files of the projected service-account volume
        self.service_account = service_account or {}
        self.pods_dir = os.path.join(node.workdir, "pods")
        self.pods: dict[str, RunningPod] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sync_loop, name="kubelet", daemon=True)
        self._thread.start()

    @property
    def cri(self) -> CriClient:
        return self.runtime.cri()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    # -- pods ---------------------------------------------------------------------------

    def run_pod(self, spec: PodSpec) -> RunningPod:
        """Sandbox, init containers to completion, containers started; returns at once after
        (readiness comes from the probes: wait_ready)."""
        created = time.monotonic()
        self._prepare_volumes(spec)
        config = self._sandbox_config(spec)
        sandbox = self.cri.run_pod_sandbox(config)
        pod = RunningPod(spec, sandbox, config, {}, created)
        pod.events.append(f"{time.monotonic() - created:.3f} sandbox {sandbox[:12]}")
        for c in spec.init_containers:
            cid = self._start_container(pod, c, 0)
            code = self._wait_exit(cid, INIT_TIMEOUT)
            if code != 0:
                raise KubeletError(
                    f"init container {c.name} exited with {code}: {self.container_log(pod, c.name)}"
                )
            pod.events.append(f"{time.monotonic() - created:.3f} init {c.name} done")
        pod.initialized_at = time.monotonic()
        for c in spec.containers:
            state = ContainerState(c, self._start_container(pod, c, 0))
            state.started_at = time.monotonic()
            state.ready = c.readiness is None
            pod.containers[c.name] = state
            pod.events.append(f"{time.monotonic() - created:.3f} started {c.name}")
        with self._lock:
            self.pods[spec.uid] = pod
        return pod

    def wait_ready(self, pod: RunningPod, timeout: float = 120.0) -> float:
        """Seconds from the pod's creation to every container ready, as the probes say."""
        deadline = time.monotonic() + timeout
        while not pod.ready():
            if time.monotonic() > deadline:
                raise KubeletError(
                    f"pod {pod.spec.name} not ready within {timeout:.0f} s: {pod.events[-10:]}; "
                    + "; ".join(
                        f"{n}: {self.container_log(pod, n)[-1500:]}" for n in pod.containers
                    )
                )
            time.sleep(0.05)
        assert pod.ready_at is not None
        return pod.ready_at - pod.created_at

    def delete_pod(self, pod: RunningPod) -> None:
        """As kubelet kills a pod: each container stopped with the grace period (SIGTERM, then
        SIGKILL), then the sandbox stopped and everything removed."""
        with self._lock:
            self.pods.pop(pod.spec.uid, None)
        grace = pod.spec.termination_grace
        for state in pod.containers.values():
            with contextlib.suppress(CriError):
                self.cri.stop_container(state.id, timeout=grace)
        self.cri.stop_pod_sandbox(pod.sandbox_id)
        for c in self.cri.list_containers(pod.sandbox_id):
            self.cri.remove_container(c.id)
        self.cri.remove_pod_sandbox(pod.sandbox_id)

    def container_log(self, pod: RunningPod, name: str) -> str:
        directory = pod.sandbox_config["log_directory"]
        out = []
        for attempt in range(10):
            path = os.path.join(directory, name, f"{attempt}.log")
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    out.append(f.read())
        return "".join(out)

    # -- what run_pod does --------------------------------------------------------------

    def _prepare_volumes(self, spec: PodSpec) -> None:
        for c in spec.init_containers + spec.containers:
            for m in c.mounts:
                if m.host_path is None:
                    continue
                path = self.node.path(m.host_path.path)
                kind = m.host_path.type
                if kind == "DirectoryOrCreate":
                    os.makedirs(path, mode=0o755, exist_ok=True)
                elif kind == "FileOrCreate" and not os.path.exists(path):
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    open(path, "a").close()
                elif kind == "Directory" and not os.path.isdir(path):
                    raise KubeletError(f"hostPath {m.host_path.path} is not a directory")
                elif kind == "File" and not os.path.isfile(path):
                    raise KubeletError(f"hostPath {m.host_path.path} is not a file")
        if self.service_account:
            directory = self._service_account_dir(spec)
            os.makedirs(directory, exist_ok=True)
            for name, text in self.service_account.items():
                with open(os.path.join(directory, name), "w") as f:
                    f.write(text)

    def _service_account_dir(self, spec: PodSpec) -> str:
        return os.path.join(self.pods_dir, spec.uid, "volumes", "kube-api-access")

    def _namespace_options(self, spec: PodSpec) -> dict:
        # CRI's NamespaceMode: POD 0, CONTAINER 1, NODE 2
        return {
            "network": "NODE" if spec.host_network else "POD",
            "pid": "NODE" if spec.host_pid else "CONTAINER",
            "ipc": "POD",
        }

    def _sandbox_config(self, spec: PodSpec) -> dict:
        log_directory = os.path.join(
            self.pods_dir, f"{spec.namespace}_{spec.name}_{spec.uid}", "logs"
        )
        os.makedirs(log_directory, exist_ok=True)
        privileged = any(c.privileged for c in spec.init_containers + spec.containers)
        config = {
            "metadata": {
                "name": spec.name,
                "uid": spec.uid,
                "namespace": spec.namespace,
                "attempt": 0,
            },
            "log_directory": log_directory,
            "labels": {
                **spec.labels,
                "io.kubernetes.pod.name": spec.name,
                "io.kubernetes.pod.namespace": spec.namespace,
                "io.kubernetes.pod.uid": spec.uid,
            },
            "linux": {
                "cgroup_parent": self.runtime.cgroup_parent,
                "security_context": {
                    "namespace_options": self._namespace_options(spec),
                    "privileged": privileged,
                },
            },
        }
        # As kubelet: a hostNetwork pod keeps the node's hostname (and, with no dns_config,
        # containerd gives it the node's resolv.conf).
        if not spec.host_network:
            config["hostname"] = spec.name
        return config

    def _container_config(self, pod: RunningPod, c: Container, attempt: int) -> dict:
        mounts = []
        for m in c.mounts:
            host = (
                self._service_account_dir(pod.spec)
                if m.host_path is None
                else m.host_path.path  # the node's path: containerd runs on the node
            )
            mounts.append(
                {
                    "container_path": m.container_path,
                    "host_path": host,
                    "readonly": m.read_only,
                    "propagation": m.propagation,
                }
            )
        return {
            "metadata": {"name": c.name, "attempt": attempt},
            "image": {"image": c.image},
            "command": c.command,
            "args": c.args,
            "envs": [{"key": k, "value": v} for k, v in c.env.items()],
            "mounts": mounts,
            "labels": {
                "io.kubernetes.container.name": c.name,
                "io.kubernetes.pod.name": pod.spec.name,
                "io.kubernetes.pod.namespace": pod.spec.namespace,
                "io.kubernetes.pod.uid": pod.spec.uid,
            },
            "log_path": f"{c.name}/{attempt}.log",
            "linux": {
                "resources": self._resources(pod.spec, c),
                "security_context": {
                    "privileged": c.privileged,
                    "namespace_options": self._namespace_options(pod.spec),
                },
            },
        }

    def _resources(self, pod: PodSpec, c: Container) -> dict:
        """Requests and limits as kubelet maps them on cgroup v1 (cpu.shares from the CPU
        request, the memory limit) and its OOM score adjustment."""
        requests = c.resources.get("requests", {})
        limits = c.resources.get("limits", {})
        out: dict = {"oom_score_adj": str(oom_score_adj(pod, c, _memory_capacity()))}
        if "cpu" in requests:
            out["cpu_shares"] = str(max(2, int(_quantity(str(requests["cpu"])) * 1024)))
        if "memory" in limits:
            out["memory_limit_in_bytes"] = str(int(_quantity(str(limits["memory"]))))
        return out

    def _start_container(self, pod: RunningPod, c: Container, attempt: int) -> str:
        if self.cri.image_status(c.image) is None:
            # No registry: a missing image is an error here, never a pull.
            raise KubeletError(f"image {c.image} is not on the node (ErrImageNeverPull)")
        config = self._container_config(pod, c, attempt)
        cid = self.cri.create_container(pod.sandbox_id, config, pod.sandbox_config)
        self.cri.start_container(cid)
        return cid

    def _wait_exit(self, cid: str, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.cri.runtime("ContainerStatus", {"container_id": cid}).status
            if status.state == 2:  # CONTAINER_EXITED
                return status.exit_code
            time.sleep(0.05)
        raise KubeletError(f"container {cid[:12]} still running after {timeout:.0f} s")

    # -- keeping pods running -----------------------------------------------------------

    def _sync_loop(self) -> None:
        while not self._stop.wait(0.05):
            with self._lock:
                pods = list(self.pods.values())
            for pod in pods:
                for state in list(pod.containers.values()):
                    try:
                        self._sync_container(pod, state)
                    except (CriError, KubeletError, OSError) as exc:
                        pod.events.append(f"{time.monotonic() - pod.created_at:.3f} {exc}")

    def _sync_container(self, pod: RunningPod, state: ContainerState) -> None:
        now = time.monotonic()
        if now - state.probed_at.get("status", 0.0) >= SYNC_EVERY:
            state.probed_at["status"] = now
            status = self.cri.runtime("ContainerStatus", {"container_id": state.id}).status
            if status.state == 2:  # exited: restartPolicy Always
                self._restart(pod, state, f"exited with {status.exit_code}")
                return
        spec = state.spec
        for kind, probe in (("liveness", spec.liveness), ("readiness", spec.readiness)):
            if probe is None or now - state.started_at < probe.initial_delay:
                continue
            if now - state.probed_at.get(kind, 0.0) < probe.period:
                continue
            state.probed_at[kind] = now
            ok = self._probe(pod, state, probe)
            if kind == "readiness":
                state.readiness_failures = 0 if ok else state.readiness_failures + 1
                if ok and not state.ready:
                    state.ready, state.ready_at = True, time.monotonic()
                    if pod.ready() and pod.ready_at is None:
                        pod.ready_at = state.ready_at
                elif not ok and state.readiness_failures >= probe.failure_threshold:
                    state.ready = False
            else:
                state.liveness_failures = 0 if ok else state.liveness_failures + 1
                if state.liveness_failures >= probe.failure_threshold:
                    self._restart(pod, state, "liveness probe failed")

    def _probe(self, pod: RunningPod, state: ContainerState, probe: Probe) -> bool:
        try:
            if probe.kind == "exec":
                code, _, _ = self.cri.exec_sync(
                    state.id, list(probe.command), timeout=max(1, int(probe.timeout))
                )
                return code == 0
            host = probe.host or self._pod_ip(pod)
            if probe.kind == "tcp":
                sock = in_netns(self.node.netns, lambda: socket.socket())
                with sock:
                    sock.settimeout(probe.timeout)
                    sock.connect((host, probe.port))
                return True
            if probe.scheme != "HTTP":
                raise KubeletError(f"probe scheme {probe.scheme} is not supported")
            code = http_get(self.node.netns, host, probe.port, probe.path, probe.timeout)
            return 200 <= code < 400
        except (OSError, CriError):
            return False

    def _pod_ip(self, pod: RunningPod) -> str:
        if pod.spec.host_network:
            return "127.0.0.1"
        return self.cri.pod_sandbox_status(pod.sandbox_id).status.network.ip

    def _restart(self, pod: RunningPod, state: ContainerState, why: str) -> None:
        pod.events.append(
            f"{time.monotonic() - pod.created_at:.3f} restart {state.spec.name}: {why}"
        )
        with contextlib.suppress(CriError):
            self.cri.stop_container(state.id, timeout=pod.spec.termination_grace)
        state.attempt += 1
        state.restarts += 1
        state.ready = state.spec.readiness is None
        state.liveness_failures = state.readiness_failures = 0
        state.probed_at.clear()
        state.id = self._start_container(pod, state.spec, state.attempt)
        state.started_at = time.monotonic()
