"""The built Kubernetes binaries and images (`./dev kube`), through pycni.harness.kube.

A temporary shim stands in for harness/kube.py until that lands on this branch.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass

try:  # pragma: no cover - whichever is present
    from ...harness.kube import VERSION, ImageArchive, KubeNotBuilt, binary, images
except ImportError:  # SHIM: removed once harness/kube.py is on this branch
    VERSION = "v1.37.2"
    PEERS = "/var/cache/pycni/peers"

    class KubeNotBuilt(Exception):  # type: ignore[no-redef]
        pass

    @dataclass(frozen=True)
    class ImageArchive:  # type: ignore[no-redef]
        name: str
        path: str

    _DIRS = {
        "etcd": "etcd-*",
        "crictl": "cri-tools-*",
        "coredns": "coredns-*",
    }

    def binary(name: str) -> str:
        pattern = _DIRS.get(name, f"kubernetes-{VERSION}")
        for d in sorted(glob.glob(os.path.join(PEERS, pattern))):
            path = os.path.join(d, "bin", name)
            if os.path.exists(os.path.join(d, "built")) and os.access(path, os.X_OK):
                return path
        raise KubeNotBuilt(f"{name} is not built: run ./dev kube")

    def images() -> list[ImageArchive]:
        found = os.environ.get("PYCNI_KUBE_IMAGES", "")
        out = []
        for item in filter(None, found.split(",")):
            name, path = item.split("=", 1)
            out.append(ImageArchive(name, path))
        return out


__all__ = ["VERSION", "ImageArchive", "KubeNotBuilt", "binary", "images"]
