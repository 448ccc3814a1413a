"""Certificates for a cluster of our own (the lab's, harness.apiserver's), made with openssl.

One CA signs everything: the apiserver's serving certificate (the service IP 10.96.0.1, the
control plane's address, the in-cluster names), a client certificate per identity (admin in
system:masters; each node's kubelet as system:node:NAME in system:nodes, which the Node
authorizer and NodeRestriction require; the controller manager, the scheduler, kube-proxy),
and a key pair that signs and checks service-account tokens.
"""

from __future__ import annotations

import os
import subprocess

DAYS = "3650"
# P-256 keys: each is made in milliseconds (2048-bit RSA took 0.5 s apiece here), and every
# component (and the service-account signer, ES256) takes them.
GENKEY = ("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")


class PkiError(Exception):
    pass


def _openssl(*args: str, cwd: str) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PkiError(f"openssl {args[0]} failed: {proc.stderr.strip()}")


class Pki:
    def __init__(self, directory: str) -> None:
        self.dir = directory

    def path(self, name: str) -> str:
        return os.path.join(self.dir, name)

    @property
    def ca(self) -> str:
        return self.path("ca.crt")

    def make_ca(self) -> None:
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        _openssl(*GENKEY, "-out", "ca.key", cwd=self.dir)
        _openssl(
            "req", "-x509", "-new", "-nodes", "-key", "ca.key", "-subj", "/CN=pycni-lab-ca",
            "-days", DAYS, "-out", "ca.crt", cwd=self.dir,
        )  # fmt: skip
        # Service-account tokens: signed with sa.key, checked with sa.pub.
        _openssl(*GENKEY, "-out", "sa.key", cwd=self.dir)
        _openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=self.dir)

    def issue(
        self,
        name: str,
        cn: str,
        org: str = "",
        *,
        ips: tuple[str, ...] = (),
        dns: tuple[str, ...] = (),
        server: bool = False,
    ) -> tuple[str, str]:
        """name.crt and name.key signed by the CA; a client certificate unless server."""
        subj = f"/CN={cn}" + (f"/O={org}" if org else "")
        _openssl(*GENKEY, "-out", f"{name}.key", cwd=self.dir)
        _openssl("req", "-new", "-key", f"{name}.key", "-subj", subj, "-out", f"{name}.csr",
                 cwd=self.dir)  # fmt: skip
        usage = "serverAuth" if server else "clientAuth"
        ext = [
            "basicConstraints=CA:FALSE",
            "keyUsage=critical,digitalSignature",
            f"extendedKeyUsage={usage}",
        ]
        alt = [f"IP:{ip}" for ip in ips] + [f"DNS:{d}" for d in dns]
        if alt:
            ext.append("subjectAltName=" + ",".join(alt))
        with open(self.path(f"{name}.ext"), "w") as f:
            f.write("\n".join(ext) + "\n")
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", DAYS, "-extfile", f"{name}.ext", "-out", f"{name}.crt",
            cwd=self.dir,
        )  # fmt: skip
        for leftover in (f"{name}.csr", f"{name}.ext"):
            os.unlink(self.path(leftover))
        return self.path(f"{name}.crt"), self.path(f"{name}.key")

    def kubeconfig(self, path: str, server: str, name: str, user: str) -> str:
        """A kubeconfig for `user` (name.crt/.key) towards `server`, embedding file paths."""
        text = f"""\
apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster:
    certificate-authority: {self.ca}
    server: {server}
users:
- name: {user}
  user:
    client-certificate: {self.path(name + ".crt")}
    client-key: {self.path(name + ".key")}
contexts:
- name: lab
  context:
    cluster: lab
    user: {user}
current-context: lab
"""
        with open(path, "w") as f:
            f.write(text)
        os.chmod(path, 0o600)
        return path
