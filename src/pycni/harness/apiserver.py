"""A real kube-apiserver on loopback, for pycni's Kubernetes-facing code to meet the API it
runs against: etcd and kube-apiserver (both built by `./dev kube`) on 127.0.0.1 ports of their
own, with the lab's certificates, Node,RBAC authorization and service-account tokens, as a
kubeadm control plane has them. No controllers, no kubelets: a test makes the Nodes it needs.

Everything stays on loopback and under one directory; stop() leaves nothing running.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

from . import kube
from .pki import Pki

READY_TIMEOUT = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child: SIGKILL when the process that started it dies, so a test run killed
    mid-way leaves no apiserver or etcd behind."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class ApiServerError(Exception):
    pass


class LocalApiServer:
    def __init__(self, directory: str, watch_cache: bool = True) -> None:
        self.dir = directory
        # Off: every watch reaches etcd, so a compacted resourceVersion is answered 410 at once
        # (with the cache, only once the cache's window has moved past it).
        self.watch_cache = watch_cache
        self.pki = Pki(os.path.join(directory, "pki"))
        self.etcd_url = f"http://127.0.0.1:{free_port()}"
        self.port = free_port()
        self.url = f"https://127.0.0.1:{self.port}"
        self.kubeconfig = os.path.join(directory, "admin.kubeconfig")
        self._procs: dict[str, subprocess.Popen] = {}

    # --- life ------------------------------------------------------------------------------

    def start(self) -> LocalApiServer:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        self.pki.make_ca()
        self.pki.issue("apiserver", "kube-apiserver", ips=("127.0.0.1",), dns=("localhost",),
                       server=True)  # fmt: skip
        self.pki.issue("admin", "kubernetes-admin", "system:masters")
        self.pki.kubeconfig(self.kubeconfig, self.url, "admin", "admin")
        try:
            self._start_etcd()
            self._start_apiserver()
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for name, proc in reversed(list(self._procs.items())):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
            del self._procs[name]

    def __enter__(self) -> LocalApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(os.path.join(self.dir, f"{name}.log"), "ab")  # noqa: SIM115 - the child's
        with log:
            self._procs[name] = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )

    def _start_etcd(self) -> None:
        peer = f"http://127.0.0.1:{free_port()}"
        self._spawn("etcd", [
            kube.binary("etcd"),
            "--name=api",
            f"--data-dir={os.path.join(self.dir, 'etcd')}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls={peer}",
            f"--initial-advertise-peer-urls={peer}",
            f"--initial-cluster=api={peer}",
            "--listen-metrics-urls=",
            "--log-level=warn",
        ])  # fmt: skip

    def _start_apiserver(self) -> None:
        p = self.pki
        self._spawn("kube-apiserver", [
            kube.binary("kube-apiserver"),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1",
            f"--secure-port={self.port}",
            # Nothing is advertised: no kubernetes Service endpoints on loopback (the API
            # rejects them), and no Service network is used here.
            "--endpoint-reconciler-type=none",
            "--service-cluster-ip-range=10.96.0.0/12",
            f"--client-ca-file={p.ca}",
            f"--tls-cert-file={p.path('apiserver.crt')}",
            f"--tls-private-key-file={p.path('apiserver.key')}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={p.path('sa.pub')}",
            f"--service-account-signing-key-file={p.path('sa.key')}",
            "--authorization-mode=Node,RBAC",
            "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true",  # as kubeadm: pycni's DaemonSet is privileged
            "--profiling=false",
            f"--watch-cache={str(self.watch_cache).lower()}",
        ])  # fmt: skip

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise ApiServerError(f"{name} exited ({proc.returncode}): {self.log(name)}")
            if self.kubectl("get", "--raw", "/readyz", check=False).returncode == 0:
                return
            time.sleep(0.5)
        raise ApiServerError(f"kube-apiserver not ready in {READY_TIMEOUT:.0f} s: "
                             f"{self.log('kube-apiserver')}")  # fmt: skip

    def log(self, name: str, tail: int = 2000) -> str:
        try:
            with open(os.path.join(self.dir, f"{name}.log"), "rb") as f:
                return f.read()[-tail:].decode(errors="replace")
        except OSError:
            return ""

    # --- use -------------------------------------------------------------------------------

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True):
        proc = subprocess.run(
            [kube.binary("kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise ApiServerError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc

    def token_kubeconfig(self, path: str, namespace: str, account: str) -> str:
        """A kubeconfig that authenticates as a ServiceAccount (a token the apiserver signs),
        as the agent's pod is: what RBAC grants that account is all it may do."""
        token = self.kubectl("create", "token", account, "-n", namespace).stdout.strip()
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "api", "cluster": {"server": self.url,
                                                     "certificate-authority": self.pki.ca}}],
            "users": [{"name": account, "user": {"token": token}}],
            "contexts": [{"name": "api", "context": {"cluster": "api", "user": account}}],
            "current-context": "api",
        }  # fmt: skip
        with open(path, "w") as f:
            json.dump(config, f)
        return path

    def compact(self) -> int:
        """Compact etcd up to its current revision, through its JSON gateway: a watch from
        any older resourceVersion that reaches etcd is then answered 410 Gone."""
        rev = int(self._etcd("/v3/kv/range", {"key": "AA=="})["header"]["revision"])
        self._etcd("/v3/kv/compaction", {"revision": str(rev), "physical": True})
        return rev

    def _etcd(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(
            self.etcd_url + path, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())
