"""The Go peers pycni is tested and measured against, and where `./dev peers` put them.

The pins live in peers.txt beside this module (one line per peer: name, version, build tags,
packages); `./dev peers` builds each once into PEERS_DIR/NAME-VERSION/bin, and `./dev kube` the
lines whose packages start with a module of ours under tools/ (Kubernetes, etcd, CoreDNS: see
pycni.harness.kube). Debian's containerd 1.6 and reference plugins 1.1.1 are peers too, found
where the packages install them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

PINS = Path(__file__).with_name("peers.txt")
REPO = Path(__file__).resolve().parents[3]  # local modules (tools/...) are relative to it
DEBIAN_CONTAINERD = "/usr/bin/containerd"
DEBIAN_PLUGINS = "/usr/lib/cni"
REQUIRE_ENV = "PYCNI_REQUIRE_PEERS"  # ./dev test sets it: a missing peer fails, not skips


def peers_dir() -> str:
    return os.path.join(os.environ.get("PYCNI_CACHE", "/var/cache/pycni"), "peers")


@dataclass(frozen=True)
class Pin:
    name: str
    version: str
    tags: str
    packages: tuple[str, ...]

    @property
    def key(self) -> str:
        """The cache directory's version part: the pin, or for a module of ours the hash of
        its files (as ./dev computes it), so an edit means a rebuild."""
        if self.version != "local":
            return self.version
        return "local-" + _local_key(REPO / self.packages[0].removeprefix("./"))

    @property
    def bin_dir(self) -> str:
        return os.path.join(peers_dir(), f"{self.name}-{self.key}", "bin")

    def built(self) -> bool:
        return os.path.exists(os.path.join(os.path.dirname(self.bin_dir), "built"))


def _local_key(directory: Path) -> str:
    digest = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        path = directory / name
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def pins() -> dict[str, Pin]:
    out = {}
    for line in PINS.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, version, tags, *packages = line.split()
        out[name] = Pin(name, version, "" if tags == "-" else tags, tuple(packages))
    return out


class MissingPeer(Exception):
    """A pinned peer is not built (run ./dev peers) or a Debian one is not installed."""


def binary(peer: str, executable: str) -> str:
    """The path of `executable` from the pinned `peer`, or MissingPeer."""
    pin = pins()[peer]
    path = os.path.join(pin.bin_dir, executable)
    if not pin.built() or not os.access(path, os.X_OK):
        raise MissingPeer(f"{peer} {pin.version} is not built: run ./dev peers ({path})")
    return path


@dataclass(frozen=True)
class ContainerdPeer:
    """One containerd to run pods under: its label, binary, ctr and shim directory."""

    label: str  # "1.6" or "2.4": what test ids and bench rows say
    binary: str
    ctr: str
    shim_dir: str | None  # put first on its PATH: its own containerd-shim-runc-v2

    @property
    def major(self) -> int:
        return int(self.label.split(".")[0])


def debian_containerd() -> ContainerdPeer | None:
    """Debian's containerd 1.6 (packages containerd, runc), or None."""
    ctr = shutil.which("ctr")
    if not os.access(DEBIAN_CONTAINERD, os.X_OK) or ctr is None:
        return None
    return ContainerdPeer("1.6", DEBIAN_CONTAINERD, ctr, None)


def pinned_containerd() -> ContainerdPeer:
    """The pinned containerd 2.x with its own ctr and shim, or MissingPeer."""
    pin = pins()["containerd"]
    exe = binary("containerd", "containerd")
    label = ".".join(pin.version.removeprefix("v").split(".")[:2])
    return ContainerdPeer(label, exe, os.path.join(pin.bin_dir, "ctr"), pin.bin_dir)


def plugin_dirs() -> dict[str, str]:
    """The reference plugins by version: Debian's 1.1.1 and the pinned newest."""
    out = {}
    if os.access(os.path.join(DEBIAN_PLUGINS, "bridge"), os.X_OK):
        out["1.1.1"] = DEBIAN_PLUGINS
    pin = pins()["cni-plugins"]
    if pin.built():
        out[pin.version.removeprefix("v")] = pin.bin_dir
    return out


def required() -> bool:
    return os.environ.get(REQUIRE_ENV) == "1"
