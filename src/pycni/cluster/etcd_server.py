"""A single-member etcd server for tests and for `pycnictl lab up --datastore etcd`.

The server runs in its own session (so a Ctrl-C meant for us does not reach it, and it can be
killed as a group) and is killed at interpreter exit if nobody stopped it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import weakref

ETCD = "/usr/bin/etcd"

# Run inside the netns when one is given: the server's loopback is not ours.
_HEALTH_PROBE = """
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1] + "/health", timeout=1) as r:
    sys.exit(0 if b'"true"' in r.read() else 1)
"""


class EtcdServerError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the kernel's choice for port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _kill_group(proc: subprocess.Popen) -> None:
    """Last resort (finalizer): the server must never outlive us."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


class EtcdServer:
    """``etcd`` with one member named ``t``, data in ``data_dir``, listening on ``client_url``."""

    def __init__(
        self,
        data_dir: str,
        client_url: str | None = None,
        peer_url: str | None = None,
        netns: str | None = None,
        log_path: str | None = None,
        etcd: str = ETCD,
    ) -> None:
        self.data_dir = os.path.abspath(data_dir)
        self.client_url = client_url or f"http://127.0.0.1:{free_port()}"
        self.peer_url = peer_url or f"http://127.0.0.1:{free_port()}"
        self.netns = netns
        self.log_path = log_path or self.data_dir.rstrip("/") + ".log"
        self.etcd = etcd
        self._proc: subprocess.Popen | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def argv(self) -> list[str]:
        argv = [
            self.etcd,
            "--name",
            "t",
            "--data-dir",
            self.data_dir,
            "--listen-client-urls",
            self.client_url,
            "--advertise-client-urls",
            self.client_url,
            "--listen-peer-urls",
            self.peer_url,
            "--initial-advertise-peer-urls",
            self.peer_url,
            "--initial-cluster",
            f"t={self.peer_url}",
        ]
        # `ip netns exec` execs etcd, so our child's pid is the server's.
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else argv

    def start(self, timeout: float = 15) -> EtcdServer:
        if self.running():
            return self
        if not os.path.exists(self.etcd):
            raise EtcdServerError(f"{self.etcd} not found (Debian: apt-get install etcd-server)")
        os.makedirs(self.data_dir, mode=0o700, exist_ok=True)
        os.chmod(self.data_dir, 0o700)  # etcd insists on it
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._finalizer = weakref.finalize(self, _kill_group, self._proc)
        try:
            self._wait_healthy(timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def detach(self) -> None:
        """Let the server outlive this process (the lab's etcd runs until `lab down`, which
        kills it with the lab's router namespace)."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    def _healthy(self) -> bool:
        if self.netns:
            probe = subprocess.run(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.netns,
                    sys.executable,
                    "-c",
                    _HEALTH_PROBE,
                    self.client_url,
                ],
                capture_output=True,
            )
            return probe.returncode == 0
        try:
            with urllib.request.urlopen(self.client_url + "/health", timeout=1) as resp:
                return b'"true"' in resp.read()
        except (OSError, urllib.error.URLError):
            return False

    def _wait_healthy(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise EtcdServerError(
                    f"etcd exited with status {self._proc.returncode} "
                    f"while starting:\n{self.log_tail()}"
                )
            if self._healthy():
                return
            time.sleep(0.1)
        raise EtcdServerError(
            f"etcd at {self.client_url} not healthy after {timeout:g} s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def _signal(self, sig: int) -> None:
        assert self._proc is not None
        try:
            os.killpg(self._proc.pid, sig)  # its own session: the group is the server
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL if it does not exit in ``timeout`` seconds."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._signal(signal.SIGKILL)
                self._proc.wait()
        self._done()

    def kill(self) -> None:
        """SIGKILL: a crash, as restart tests want it."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._signal(signal.SIGKILL)
            self._proc.wait()
        self._done()

    def _done(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._proc = None

    def restart(self, timeout: float = 15) -> EtcdServer:
        """Same data dir and URLs: the keys (and leases) survive."""
        self.stop()
        return self.start(timeout)

    def remove_data(self) -> None:
        """Stop and delete the data dir (the log is kept)."""
        self.stop()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
