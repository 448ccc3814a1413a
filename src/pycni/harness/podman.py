"""podman 4.3 with its CNI backend, every path it uses kept under one private work directory.

podman is a real libcni client: it execs the plugins found in `cni_plugin_dirs` for the config
lists in `cni_config_dir`, exactly as on a machine set up by hand. `CONTAINERS_CONF` and
`CONTAINERS_STORAGE_CONF` point it at files written here, so its storage, run state, locks and
events never mix with the host's or another harness's. Commands run inside a network namespace
(the "node") by entering only that namespace: the namespaces podman bind-mounts under
/run/netns for its containers stay visible to the caller.
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Sequence

BUSYBOX = "/bin/busybox"
BUSYBOX_REF = "localhost/pycni-busybox:test"
CNI_CACHE_RESULTS = "/var/lib/cni/results"  # libcni's default cache; podman 4.3 keeps it
CLEANUP_TIMEOUT = 60.0
MAX_RUNROOT = 48  # bytes; see Podman._short_runroot


class PodmanError(subprocess.CalledProcessError):
    """A podman command failed; the message carries what podman said."""

    def __str__(self) -> str:
        said = (self.stderr or self.output or "").strip()
        return f"{super().__str__()}: {said}" if said else super().__str__()


def _toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(item) for item in items) + "]"


class Podman:
    """podman 4.3 with its CNI backend, all config/storage/run state under `workdir`.

    (The run root is `workdir/run`, a link to a short directory under /tmp when `workdir` is
    deep; see _short_runroot. cleanup() removes both.)
    """

    def __init__(
        self,
        workdir: str,
        *,
        netns: str | None = None,
        cni_plugin_dirs: Sequence[str] = (),
        cni_config_dir: str | None = None,
    ):
        self.workdir = os.path.abspath(workdir)
        self.netns = netns
        self.cni_plugin_dirs = list(cni_plugin_dirs) or ["/usr/lib/cni"]
        self.cni_config_dir = os.path.abspath(cni_config_dir or self._path("net.d"))
        self.containers_conf = self._path("containers.conf")
        self.storage_conf = self._path("storage.conf")
        self.runroot = self._short_runroot()
        self._write_configs()

    def _path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def _short_runroot(self) -> str:
        """`workdir/run`, or when that path is too long, a short directory it links to.

        Measured with podman 4.3.1 and conmon 2.1: with a runroot of 52 bytes or more (a
        pytest tmp_path is longer), an attached `podman run` waits out its 20 s conmon timeout
        before it sees the container exit; with 50 bytes or less it returns at once. (A unix
        socket address holds at most 108 bytes; some per-container path passes it.)
        """
        link = self._path("run")
        if len(link) <= MAX_RUNROOT:
            os.makedirs(link, exist_ok=True)
            return link
        if os.path.islink(link):
            return os.readlink(link)
        os.makedirs(self.workdir, exist_ok=True)
        short = tempfile.mkdtemp(prefix=f"pycni-podman-{os.getpid()}-", dir="/tmp")
        os.symlink(short, link)
        return short

    def _write_configs(self) -> None:
        for directory in ("tmp", "storage", "volumes", self.cni_config_dir):
            os.makedirs(self._path(directory), exist_ok=True)
        with open(self.containers_conf, "w") as f:
            f.write(f"""\
[containers]
# The host's hard nofile limit is below podman's default, and root may not raise it.
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = {json.dumps(self._path("events.log"))}
runtime = "runc"
# File locks under tmp_dir: the default shared-memory lock segment is shared by every podman
# on the machine, and lock numbers from two private databases would collide.
lock_type = "file"
tmp_dir = {json.dumps(self._path("tmp"))}
image_copy_tmp_dir = {json.dumps(self._path("tmp"))}
volume_path = {json.dumps(self._path("volumes"))}
static_dir = {json.dumps(self._path("storage", "libpod"))}

[network]
network_backend = "cni"
cni_plugin_dirs = {_toml_list(self.cni_plugin_dirs)}
network_config_dir = {json.dumps(self.cni_config_dir)}
""")
        with open(self.storage_conf, "w") as f:
            # vfs: plain directories, so no overlay mount outlives a container.
            f.write(f"""\
[storage]
driver = "vfs"
graphroot = {json.dumps(self._path("storage"))}
runroot = {json.dumps(self.runroot)}
""")

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            CONTAINERS_CONF=self.containers_conf,
            CONTAINERS_STORAGE_CONF=self.storage_conf,
            TMPDIR=self._path("tmp"),
        )
        return env

    def argv(self, *args: str) -> list[str]:
        podman = ["podman", *args]
        if self.netns is None:
            return podman
        # Only the network namespace: `ip netns exec` would also make a private mount
        # namespace, hiding the netns files podman bind-mounts under /run/netns.
        return ["nsenter", f"--net=/run/netns/{self.netns}", "--", *podman]

    def run(
        self, *args: str, check: bool = True, timeout: float = 120, input: bytes | None = None
    ) -> subprocess.CompletedProcess:
        """`podman ARGS` in the node; output decoded as text."""
        return self._run(self.argv(*args), check, timeout, input)

    def run_image_copy(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess:
        """`podman ARGS` for a command that copies images (import, save, load): in a private
        mount namespace with an empty /var/lib, because containers/image keeps a blob cache
        in /var/lib/containers/cache whatever the storage paths say."""
        script = 'mount -t tmpfs pycni-podman /var/lib && exec "$@"'
        argv = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            script,
            "sh",
            "podman",
            *args,
        ]
        return self._run(argv, check, timeout, None)

    def _run(
        self, argv: list[str], check: bool, timeout: float, input: bytes | None
    ) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            argv,
            input=input,
            capture_output=True,
            env=self.env(),
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
        out = subprocess.CompletedProcess(
            argv,
            proc.returncode,
            proc.stdout.decode(errors="replace"),
            proc.stderr.decode(errors="replace"),
        )
        if check and out.returncode != 0:
            raise PodmanError(out.returncode, argv, out.stdout, out.stderr)
        return out

    # --- images ---------------------------------------------------------------------------

    def import_busybox(self, ref: str = BUSYBOX_REF, cmd: Sequence[str] | None = None) -> str:
        """An image made of the static busybox and its applet links (sh, ip, ping, nc, sleep,
        wget, httpd, ...), imported without a registry, with `cmd` as its CMD; a no-op when
        `ref` already exists (whatever its CMD: give another ref for another CMD)."""
        if self.run("image", "exists", ref, check=False).returncode == 0:
            return ref
        tar = self._path("tmp", "busybox-rootfs.tar")
        write_busybox_rootfs(tar)
        args = ["import", "--quiet"]
        if cmd:
            args += ["--change", "CMD " + json.dumps(list(cmd))]
        try:
            self.run_image_copy(*args, tar, ref)
        finally:
            os.unlink(tar)
        return ref

    def save_docker_archive(self, ref: str, path: str) -> str:
        path = os.path.abspath(path)
        if path == "/var/lib" or path.startswith("/var/lib/"):
            raise ValueError(f"{path}: podman saves in a namespace where /var/lib is empty")
        self.run_image_copy("save", "--quiet", "--format", "docker-archive", "--output", path, ref)
        return path

    # --- containers -----------------------------------------------------------------------

    def container_ids(self) -> list[str]:
        out = self.run("ps", "--all", "--quiet", "--no-trunc", check=False, timeout=30)
        return out.stdout.split() if out.returncode == 0 else []

    def inspect(self, name: str) -> dict:
        return json.loads(self.run("inspect", "--type", "container", name).stdout)[0]

    def cleanup(self) -> None:
        """Remove every container and pod of this podman, then every mount, process, network
        namespace and cache file they may have left, then the work directory."""
        if not os.path.isdir(self.workdir) and not os.path.isdir(self.runroot):
            return
        ids: list[str] = []
        sandboxes: list[str] = []
        if os.path.exists(self.storage_conf) and shutil.which("podman"):
            ids = self.container_ids()
            sandboxes = self._sandbox_keys(ids)
            for args in (
                ("pod", "rm", "--all", "--force", "--time", "0"),
                ("rm", "--all", "--force", "--time", "0"),
            ):
                try:
                    self.run(*args, check=False, timeout=CLEANUP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    pass
        self._kill_processes()
        for path in sandboxes:  # podman unmounts them itself unless it failed half-way
            if os.path.exists(path):
                subprocess.run(["umount", "-l", path], capture_output=True)
                _remove(path)
        for cid in ids:
            for path in glob.glob(os.path.join(CNI_CACHE_RESULTS, f"*-{cid}-*")):
                _remove(path)
        for directory in (self.runroot, self.workdir):
            unmount_below(directory)
            shutil.rmtree(directory, ignore_errors=True)

    def _sandbox_keys(self, ids: list[str]) -> list[str]:
        if not ids:
            return []
        out = self.run(
            "inspect",
            "--type",
            "container",
            "--format",
            "{{.NetworkSettings.SandboxKey}}",
            *ids,
            check=False,
            timeout=30,
        )
        return [line for line in out.stdout.split() if line.startswith("/run/netns/")]

    def _kill_processes(self) -> None:
        """conmon and container processes whose command line names this work directory (only
        this harness starts those), in case `podman rm` could not stop them."""
        markers = [d.encode() + b"/" for d in (self.workdir, self.runroot)]
        victims = []
        for pid in _pids():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if any(m in cmdline for m in markers) and pid != os.getpid():
                victims.append(pid)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while victims and time.monotonic() < deadline:
            victims = [pid for pid in victims if process_alive(pid)]
            time.sleep(0.05)


def write_busybox_rootfs(path: str, busybox: str = BUSYBOX) -> str:
    """A root filesystem tar: /bin/busybox, a link per applet, /etc/passwd and /etc/group."""
    applets = subprocess.run(
        [busybox, "--list"], capture_output=True, text=True, check=True
    ).stdout.split()
    with tarfile.open(path, "w") as tar:
        for directory, mode in (
            ("bin", 0o755),
            ("etc", 0o755),
            ("root", 0o700),
            ("tmp", 0o1777),
            ("proc", 0o555),
            ("sys", 0o555),
            ("dev", 0o755),
            ("var", 0o755),
            ("var/www", 0o755),
        ):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)
        tar.add(busybox, arcname="bin/busybox")
        for applet in applets:
            if applet == "busybox":
                continue
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, "busybox", 0o777
            tar.addfile(info)
        for name, text in (
            ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
            ("etc/group", "root:x:0:\n"),
        ):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def mounts_below(directory: str) -> list[str]:
    """Mount points at or under `directory` in this mount namespace, deepest first."""
    prefix = os.path.abspath(directory)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = (
                line.split()[4]
                .replace("\\040", " ")
                .replace("\\011", "\t")
                .replace("\\012", "\n")
                .replace("\\134", "\\")
            )
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def unmount_below(directory: str) -> None:
    for _ in range(3):  # a mount can be stacked on another at the same point
        points = mounts_below(directory)
        if not points:
            return
        for point in points:
            subprocess.run(["umount", "-l", point], capture_output=True)


def process_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie (its parent, maybe a non-reaping init, has not waited
    for it yet) counts as gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except IsADirectoryError:
        shutil.rmtree(path, ignore_errors=True)
