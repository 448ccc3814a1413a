"""What a pod's in-cluster configuration points at, with no real control plane: the fake API
server (k8s_fake_api.py) listening over TLS in the node's network namespace, a CA that
signs its certificate, and what kubelet gives every pod to reach it: the
KUBERNETES_SERVICE_* variables and the service-account files (token, ca.crt, namespace).

The official client's in-cluster loader accepts nothing else: it insists on https, on
verifying the server against ca.crt, and on a token file.
"""

from __future__ import annotations

import os
import ssl
import subprocess
from dataclasses import dataclass

from .daemonset import in_netns
from .k8s_fake_api import FakeAPIServer


@dataclass
class InCluster:
    api: FakeAPIServer
    host: str
    port: int
    ca: str  # PEM

    def service_env(self) -> dict[str, str]:
        """kubelet's variables for the `kubernetes` Service, as every pod gets them."""
        host, port = self.host, str(self.port)
        return {
            "KUBERNETES_SERVICE_HOST": host,
            "KUBERNETES_SERVICE_PORT": port,
            "KUBERNETES_SERVICE_PORT_HTTPS": port,
            "KUBERNETES_PORT": f"tcp://{host}:{port}",
            "KUBERNETES_PORT_443_TCP": f"tcp://{host}:{port}",
            "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
            "KUBERNETES_PORT_443_TCP_PORT": port,
            "KUBERNETES_PORT_443_TCP_ADDR": host,
        }

    def service_account(self, namespace: str, token: str) -> dict[str, str]:
        """The files of the projected volume kubelet mounts at
        /var/run/secrets/kubernetes.io/serviceaccount."""
        return {"token": token, "ca.crt": self.ca, "namespace": namespace}

    def stop(self) -> None:
        self.api.stop()


def certificates(directory: str, ip: str) -> tuple[str, str, str]:
    """(ca.crt, server.crt, server.key) under `directory`: a CA and a serving certificate for
    `ip` that it signs, made with openssl."""
    os.makedirs(directory, exist_ok=True)
    ca_key, ca_crt = os.path.join(directory, "ca.key"), os.path.join(directory, "ca.crt")
    key, csr, crt = (os.path.join(directory, f"server.{x}") for x in ("key", "csr", "crt"))
    ext = os.path.join(directory, "server.ext")
    with open(ext, "w") as f:
        f.write(f"subjectAltName=IP:{ip}\nextendedKeyUsage=serverAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for argv in (
        ["openssl", "req", "-x509", *ec, "-subj", "/CN=pycni-test-ca", "-days", "2"]
        + ["-keyout", ca_key, "-out", ca_crt],
        ["openssl", "req", *ec, "-subj", "/CN=kube-apiserver", "-keyout", key, "-out", csr],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key]
        + ["-CAcreateserial", "-days", "2", "-extfile", ext, "-out", crt],
    ):
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
    return ca_crt, crt, key


def serve(netns: str, certdir: str, host: str = "127.0.0.1") -> InCluster:
    """The fake API server on `host` in network namespace `netns`, over TLS."""
    ca_crt, crt, key = certificates(certdir, host)
    # Its listening socket is made in the node's namespace; serving happens from any thread.
    api = in_netns(netns, FakeAPIServer)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(crt, key)
    api.httpd.socket = context.wrap_socket(api.httpd.socket, server_side=True)
    port = api.httpd.server_address[1]
    api.url = f"https://{host}:{port}"
    with open(ca_crt) as f:
        ca = f.read()
    return InCluster(api.start(), host, port, ca)
