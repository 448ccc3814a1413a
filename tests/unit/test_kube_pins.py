"""The Kubernetes pins (peers.txt) and the modules of ours under tools/ that build them agree:
./dev kube refuses to build when they do not, and this says so before anything is built."""

from __future__ import annotations

import re
from pathlib import Path

from pycni.harness import kube, peers

TOOLS = peers.REPO / "tools"


def requirements(go_mod: Path) -> dict[str, str]:
    """module -> version of every `require` line, in a block or alone."""
    out = {}
    for line in go_mod.read_text().splitlines():
        found = re.match(r"^\s*(?:require\s+)?([\w./-]+)\s+(v\S+)(\s*//.*)?$", line)
        if found and "=>" not in line:
            out[found.group(1)] = found.group(2)
    return out


def replaces(go_mod: Path) -> dict[str, str]:
    out = {}
    for line in go_mod.read_text().splitlines():
        found = re.match(r"^\s*(?:replace\s+)?(\S+)\s+=>\s+(\S+)\s+(v\S+)\s*$", line)
        if found:
            assert found.group(1) == found.group(2), line
            out[found.group(1)] = found.group(3)
    return out


def test_kube_lines_are_modules_of_ours_at_the_pinned_version():
    pins = peers.pins()
    assert kube.VERSION == pins["kubernetes"].version
    for name, module in {
        "kubernetes": ["k8s.io/kubernetes"],
        "etcd": ["go.etcd.io/etcd/server/v3", "go.etcd.io/etcd/etcdctl/v3"],
        "coredns": ["github.com/coredns/coredns"],
    }.items():
        pin = pins[name]
        assert pin.packages[0] == f"./tools/{name}"
        required = requirements(TOOLS / name / "go.mod")
        for m in module:
            assert required[m] == pin.version, (name, m)


def test_every_staging_module_is_replaced_by_the_same_release():
    major, minor, patch = kube.VERSION.removeprefix("v").split(".")
    staging = replaces(TOOLS / "kubernetes" / "go.mod")
    assert len(staging) >= 30  # the 33 of v1.37.2's go.mod
    assert set(staging.values()) == {f"v0.{minor}.{patch}"}
    assert all(m.startswith("k8s.io/") for m in staging)


def test_binaries_map_to_what_the_pins_build():
    pins = peers.pins()
    for name, peer in kube._BINARIES.items():
        built = {p.split("=", 1)[0] for p in pins[peer].packages if "=" in p}
        assert name in built or (peer == "cri-tools" and name == "crictl"), name


def test_coredns_image_is_tagged_with_the_built_version():
    assert kube.COREDNS_IMAGE.endswith(":" + peers.pins()["coredns"].version)
    assert kube.COREDNS_IMAGE.startswith("registry.k8s.io/coredns/coredns:")
