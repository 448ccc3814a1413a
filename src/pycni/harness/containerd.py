"""containerd (Debian's 1.6, or the pinned 2.x) with its CRI plugin, started by hand inside a
"node" network namespace, with the config file version each speaks (2 for 1.x, 3 for 2.x).

Every path containerd and its shims write lives under one private work directory (root, state,
sockets, runc's state, the opt plugin's dir), so it never meets the host's containerd. It is
started by entering only the node's network namespace (`nsenter --net`), never a mount
namespace: the pod namespaces CRI bind-mounts under /var/run/netns stay visible to the caller,
which finds them in pycni's store. Pod cgroups go under a parent named after this instance.

What the CRI plugin leaves outside the work directory, and cleanup() removes: the shims'
sockets under /run/containerd/s, the pod netns files under /var/run/netns, libcni's result
cache under /var/lib/cni/results, and the pods' cgroup parent in every hierarchy.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable

from .cri import CONTAINERD, CriClient, CriError
from .podman import Podman, mounts_below, unmount_below

CTR = "ctr"
RUNC = "runc"
NAMESPACE = "k8s.io"  # the containerd namespace CRI keeps its images and containers in
CNI_CACHE_RESULTS = "/var/lib/cni/results"
SHIM_SOCKET_DIR = "/run/containerd/s"
CGROUP_ROOT = "/sys/fs/cgroup"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
CLEANUP_CALL_TIMEOUT = 60.0
# Plugins that only slow start-up (and log errors) on this machine.
DISABLED_PLUGINS = (
    "io.containerd.snapshotter.v1.aufs",
    "io.containerd.snapshotter.v1.btrfs",
    "io.containerd.snapshotter.v1.devmapper",
    "io.containerd.snapshotter.v1.zfs",
    "io.containerd.tracing.processor.v1.otlp",
    "io.containerd.internal.v1.tracing",
)


class ContainerdError(Exception):
    pass


def _q(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


class Containerd:
    """A private containerd in network namespace `netns` (a name under /run/netns)."""

    def __init__(
        self,
        workdir: str,
        netns: str,
        cni_bin_dir: str,
        cni_conf_dir: str,
        *,
        sandbox_image: str,
        binary: str = CONTAINERD,
        ctr: str = CTR,
        shim_dir: str | None = None,
        metrics_port: int | None = None,
    ) -> None:
        self.workdir = os.path.abspath(workdir)
        self.netns = netns
        self.cni_bin_dir = os.path.abspath(cni_bin_dir)
        self.cni_conf_dir = os.path.abspath(cni_conf_dir)
        self.sandbox_image = sandbox_image
        self.binary = binary
        self.ctr_binary = ctr
        self.shim_dir = shim_dir  # first on containerd's PATH: the shim of its own release
        self.major = containerd_major(binary)
        # containerd's Prometheus metrics on the node's own loopback (each node netns has one).
        self.metrics_port = metrics_port
        self.root = self._path("root")
        self.state = self._path("state")
        self.runc_root = self._path("runc")
        self.socket = self._path("containerd.sock")
        self.config = self._path("config.toml")
        self.log_file = self._path("containerd.log")
        # Pod cgroups (PodSandboxConfig linux.cgroup_parent): one parent per instance, so
        # cleanup can find and remove them.
        self.cgroup_parent = "/pycni-ctd-" + hashlib.sha256(self.workdir.encode()).hexdigest()[:12]
        self.proc: subprocess.Popen | None = None
        self._client: CriClient | None = None

    @classmethod
    def for_peer(cls, peer, workdir: str, netns: str, cni_bin_dir: str, cni_conf_dir: str, **kw):
        """The containerd of a harness.peers.ContainerdPeer (Debian's 1.6 or the pinned 2.x),
        with its own ctr and shim."""
        return cls(
            workdir,
            netns,
            cni_bin_dir,
            cni_conf_dir,
            binary=peer.binary,
            ctr=peer.ctr,
            shim_dir=peer.shim_dir,
            **kw,
        )

    def _path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    # --- start and stop -----------------------------------------------------------------------

    def config_text(self) -> str:
        text = self._config_v3() if self.major >= 2 else self._config_v2()
        if self.metrics_port:
            text += f'\n[metrics]\n  address = "127.0.0.1:{self.metrics_port}"\n'
        return text

    def _config_v2(self) -> str:
        cri = '[plugins."io.containerd.grpc.v1.cri"'
        return f"""\
version = 2
root = {_q(self.root)}
state = {_q(self.state)}
disabled_plugins = [{", ".join(_q(p) for p in DISABLED_PLUGINS)}]

[grpc]
  address = {_q(self.socket)}

[plugins."io.containerd.internal.v1.opt"]
  path = {_q(self._path("opt"))}

{cri}]
  sandbox_image = {_q(self.sandbox_image)}
  # Without it runc fails here: "can't get final child's PID" (root lacks CAP_SYS_RESOURCE).
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  {cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    {cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      {cri}.containerd.runtimes.runc.options]
        Root = {_q(self.runc_root)}
  {cri}.cni]
    bin_dir = {_q(self.cni_bin_dir)}
    conf_dir = {_q(self.cni_conf_dir)}
    max_conf_num = 1
"""

    def _config_v3(self) -> str:
        """containerd 2.x: CRI split into an images and a runtime plugin; NRI is off (its
        socket would be the machine's /var/run/nri)."""
        images = '[plugins."io.containerd.cri.v1.images"'
        runtime = '[plugins."io.containerd.cri.v1.runtime"'
        disabled = (*DISABLED_PLUGINS, "io.containerd.nri.v1.nri")
        return f"""\
version = 3
root = {_q(self.root)}
state = {_q(self.state)}
disabled_plugins = [{", ".join(_q(p) for p in disabled)}]

[grpc]
  address = {_q(self.socket)}

[plugins."io.containerd.internal.v1.opt"]
  path = {_q(self._path("opt"))}

[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"

{images}]
  snapshotter = "overlayfs"
  {images}.pinned_images]
    sandbox = {_q(self.sandbox_image)}

{runtime}]
  # Without it runc fails here: "can't get final child's PID" (root lacks CAP_SYS_RESOURCE).
  restrict_oom_score_adj = true
  {runtime}.containerd]
    default_runtime_name = "runc"
    {runtime}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      {runtime}.containerd.runtimes.runc.options]
        Root = {_q(self.runc_root)}
  {runtime}.cni]
    bin_dirs = [{_q(self.cni_bin_dir)}]
    conf_dir = {_q(self.cni_conf_dir)}
    max_conf_num = 1
"""

    def start(self, timeout: float = START_TIMEOUT) -> Containerd:
        """Start containerd in the node and wait until CRI answers and sees a CNI config."""
        for directory in (self.workdir, self.root, self.state, self.runc_root):
            os.makedirs(directory, exist_ok=True)
        with open(self.config, "w") as f:
            f.write(self.config_text())
        env = dict(os.environ)
        if self.shim_dir:
            env["PATH"] = self.shim_dir + os.pathsep + env.get("PATH", "")
        with open(self.log_file, "ab") as log:
            # nsenter execs containerd: the pid is containerd's own.
            self.proc = subprocess.Popen(
                self.command(),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def command(self) -> list[str]:
        """containerd inside the node's network namespace (a subclass may enter more; whatever
        it runs must exec containerd, so that the process started is containerd)."""
        return [
            "nsenter",
            f"--net=/run/netns/{self.netns}",
            "--",
            self.binary,
            "--config",
            self.config,
        ]

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = "no socket yet"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ContainerdError(
                    f"containerd exited with status {self.proc.returncode}: {self.log_tail()}"
                )
            if os.path.exists(self.socket):
                try:
                    conditions = {
                        c.type: c
                        for c in self.cri().runtime("Status", {}, timeout=5).status.conditions
                    }
                    network = conditions.get("NetworkReady")
                    if network is not None and network.status:
                        return
                    last = (
                        f"network not ready: {network.reason if network else '?'} "
                        f"{network.message if network else ''}"
                    )
                except CriError as exc:
                    last = str(exc)
            time.sleep(0.05)
        raise ContainerdError(
            f"containerd not ready within {timeout:.0f} s ({last}): {self.log_tail()}"
        )

    def cri(self) -> CriClient:
        if self._client is None:
            self._client = CriClient(self.socket, binary=self.binary)
        return self._client

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM, then SIGKILL if containerd lingers. Its shims keep running (as with any
        containerd restart); cleanup() removes them."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()

    def log_tail(self, size: int = 3000) -> str:
        try:
            with open(self.log_file, errors="replace") as f:
                return f.read()[-size:]
        except OSError:
            return ""

    # --- images -------------------------------------------------------------------------------

    def ctr(self, *args: str, timeout: float = 120) -> str:
        argv = [self.ctr_binary, "--address", self.socket, "--namespace", NAMESPACE, *args]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise ContainerdError(f"{' '.join(argv)}: {proc.stderr.strip()}")
        return proc.stdout

    def import_image(self, archive: str) -> None:
        """Import (and unpack for CRI's snapshotter) a docker-archive tar."""
        self.ctr("images", "import", "--snapshotter", "overlayfs", archive)

    # --- cleanup ------------------------------------------------------------------------------

    def remove_all_pods(self) -> list[str]:
        """Stop and remove every container and sandbox through CRI, as kubelet would when
        draining the node; returns what failed (best effort, never raises)."""
        problems: list[str] = []
        if not self.alive():
            return problems
        cri = self.cri()
        try:
            containers = cri.list_containers()
            sandboxes = cri.list_pod_sandbox()
        except CriError as exc:
            return [str(exc)]
        steps = [
            (step, c.id) for c in containers for step in (cri.stop_container, cri.remove_container)
        ]
        steps += [
            (step, s.id)
            for s in sandboxes
            for step in (cri.stop_pod_sandbox, cri.remove_pod_sandbox)
        ]
        for step, item in steps:
            try:
                step(item)
            except CriError as exc:
                problems.append(str(exc))
                if exc.code in ("DEADLINE_EXCEEDED", "UNAVAILABLE"):
                    break  # a hung containerd: the rest is removed without it
        return problems

    def sandbox_netns(self, sandbox_id: str) -> str | None:
        """The netns path of a sandbox, from CRI's verbose status (its runtime spec)."""
        try:
            info = self.cri().pod_sandbox_status(sandbox_id, verbose=True).info
        except CriError:
            return None
        try:
            spec = json.loads(info.get("info", "{}")).get("runtimeSpec", {})
        except ValueError:
            return None
        for ns in spec.get("linux", {}).get("namespaces", []):
            if ns.get("type") == "network" and ns.get("path"):
                return ns["path"]
        return None

    def cleanup(self) -> list[str]:
        """Remove everything this containerd made, whether it is healthy, hung or dead: pods
        (through CRI when it answers), containerd, shims, containers runc still knows, mounts,
        pod netns files, shim sockets, libcni cache entries, cgroups, the work directory.
        Returns the problems met (a test asserts there are none)."""
        problems: list[str] = []
        if self.alive():
            self.cri().timeout = CLEANUP_CALL_TIMEOUT  # a hung containerd must not hang us
        sandbox_ids = set(self._sandbox_dirs())
        # Pod netns files: running tasks' specs name them (also when containerd is dead);
        # CRI knows those of stopped sandboxes whose network teardown failed.
        netns_files = set(self._bundle_netns())
        if self.alive():
            try:
                for s in self.cri().list_pod_sandbox():
                    sandbox_ids.add(s.id)
                    path = self.sandbox_netns(s.id)
                    if path:
                        netns_files.add(path)
            except CriError as exc:
                problems.append(str(exc))
            problems += self.remove_all_pods()
        shim_sockets = self._shim_sockets()
        self.stop()
        self._delete_runc_containers()
        _kill(self.shim_pids())
        unmount_below(self.root)
        unmount_below(self.state)
        for path in netns_files:
            if os.path.exists(path):
                subprocess.run(["umount", "-l", path], capture_output=True)
                _unlink(path)
        for path in shim_sockets:
            _unlink(path)
        _rmdir_if_empty(SHIM_SOCKET_DIR)
        _rmdir_if_empty(os.path.dirname(SHIM_SOCKET_DIR))
        if os.path.isdir(CNI_CACHE_RESULTS):
            for name in os.listdir(CNI_CACHE_RESULTS):
                if any(f"-{sid}-" in name for sid in sandbox_ids):
                    _unlink(os.path.join(CNI_CACHE_RESULTS, name))
        self._remove_cgroups()
        left = mounts_below(self.workdir)
        if left:
            problems.append(f"mounts left under {self.workdir}: {left}")
        shutil.rmtree(self.workdir, ignore_errors=True)
        return problems

    def _sandbox_dirs(self) -> Iterable[str]:
        for base in (self.root, self.state):
            d = os.path.join(base, "io.containerd.grpc.v1.cri", "sandboxes")
            if os.path.isdir(d):
                yield from os.listdir(d)

    def _bundles(self) -> list[str]:
        """The bundle directory of every task (sandbox or container) still on disk."""
        tasks = os.path.join(self.state, "io.containerd.runtime.v2.task", NAMESPACE)
        if not os.path.isdir(tasks):
            return []
        return [os.path.join(tasks, task) for task in os.listdir(tasks)]

    def _bundle_netns(self) -> list[str]:
        """Netns paths the tasks' OCI specs join (CRI's /var/run/netns/cni-* files)."""
        found = []
        for bundle in self._bundles():
            try:
                with open(os.path.join(bundle, "config.json")) as f:
                    spec = json.load(f)
            except (OSError, ValueError):
                continue
            for ns in spec.get("linux", {}).get("namespaces", []):
                path = ns.get("path", "")
                if ns.get("type") == "network" and path.startswith(
                    ("/var/run/netns/", "/run/netns/")
                ):
                    found.append(path)
        return found

    def _shim_sockets(self) -> list[str]:
        """Each task bundle records its shim's socket address (under /run/containerd/s)."""
        found = []
        for bundle in self._bundles():
            try:
                with open(os.path.join(bundle, "address")) as f:
                    address = f.read().strip()
            except OSError:
                continue
            path = address.removeprefix("unix://")
            if path.startswith(SHIM_SOCKET_DIR + "/"):
                found.append(path)
        return found

    def shim_pids(self) -> list[int]:
        """containerd-shim-runc-v2 processes started by this containerd (they name its socket
        on their command line)."""
        marker = b"\0" + self.socket.encode() + b"\0"
        found = []
        for pid in pids():
            argv = cmdline(pid)
            if b"containerd-shim" in argv.split(b"\0", 1)[0] and marker in argv + b"\0":
                found.append(pid)
        return found

    def _delete_runc_containers(self) -> None:
        """Containers runc still has under this instance's root: kill and delete them (their
        processes, cgroups and state), as a shim would have."""
        d = os.path.join(self.runc_root, NAMESPACE)
        if not os.path.isdir(d):
            return
        for cid in os.listdir(d):
            subprocess.run(
                [RUNC, "--root", d, "delete", "--force", cid], capture_output=True, timeout=30
            )

    def _remove_cgroups(self) -> None:
        if not os.path.isdir(CGROUP_ROOT):
            return
        for hierarchy in os.listdir(CGROUP_ROOT):
            top = os.path.join(CGROUP_ROOT, hierarchy, self.cgroup_parent.lstrip("/"))
            if not os.path.isdir(top):
                continue
            for dirpath, _, _ in sorted(os.walk(top), key=lambda w: len(w[0]), reverse=True):
                _rmdir_if_empty(dirpath)


def containerd_major(binary: str) -> int:
    """1 or 2, from `containerd --version` ("containerd github.com/containerd/containerd/v2
    v2.4.2 ..." or "... containerd 1.6.20~ds1 ...")."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    for word in out.stdout.split()[2:3]:
        digits = word.removeprefix("v").split(".", 1)[0]
        if digits.isdigit():
            return int(digits)
    raise ContainerdError(f"cannot tell {binary}'s version from {out.stdout.strip()!r}")


def build_pause_image(workdir: str, ref: str) -> str:
    """A docker-archive of busybox whose command sleeps, as the pause image (and the pods'
    busybox), made with podman under `workdir`: no registry."""
    archive = os.path.join(workdir, "pause.tar")
    podman = Podman(os.path.join(workdir, "podman"))
    try:
        podman.import_busybox(ref, cmd=["/bin/sleep", "999999"])
        podman.save_docker_archive(ref, archive)
    finally:
        podman.cleanup()
    return archive


def pids() -> list[int]:
    """Every process on the machine (to find what an instance left running)."""
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _kill(pids: list[int], wait: float = 5.0) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + wait
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if os.path.exists(f"/proc/{p}")]
        time.sleep(0.02)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _rmdir_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass


__all__ = ["Containerd", "ContainerdError"]
