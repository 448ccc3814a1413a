"""Kubernetes built here (`./dev kube`), and the images a lab node's containerd must hold.

The versions are pinned in peers.txt (the `kubernetes`, `etcd`, `coredns` and `cri-tools`
lines); `./dev kube` builds the binaries into PEERS_DIR/NAME-VERSION/bin, then runs
`python -m pycni.harness.kube` to make the images. There is no registry and a lab must never
pull, so every image is written here as a docker-archive that `ctr -n k8s.io images import`
takes, under exactly the name the pinned version's manifests and e2e suite ask for
(test/utils/image/manifest.go, kubeadm's constants). Archives live in
<cache>/images/kube/NAME-KEY.tar, the key covering every input, so an unchanged input costs
nothing and a changed one makes a new archive.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from . import image, peers

VERSION: str = peers.pins()["kubernetes"].version
COREDNS_VERSION: str = peers.pins()["coredns"].version

# The names the pinned version asks for (checked against its manifest.go by the tests).
PAUSE_IMAGE = "registry.k8s.io/pause:3.10.2"  # kubeadm's PauseVersion, containerd's sandbox
AGNHOST_IMAGE = "registry.k8s.io/e2e-test-images/agnhost:2.66.1"
BUSYBOX_IMAGE = "registry.k8s.io/e2e-test-images/busybox:1.37.0-2"
GLIBC_DNS_IMAGE = "registry.k8s.io/e2e-test-images/glibc-dns-testing:2.1.1"
# Where kubeadm puts CoreDNS (<repository>/coredns/coredns), at the version built here.
COREDNS_IMAGE = f"registry.k8s.io/coredns/coredns:{COREDNS_VERSION}"

# Which pinned build each binary comes from.
_BINARIES = {
    "kube-apiserver": "kubernetes",
    "kube-controller-manager": "kubernetes",
    "kube-scheduler": "kubernetes",
    "kubelet": "kubernetes",
    "kube-proxy": "kubernetes",
    "kubectl": "kubernetes",
    "e2e.test": "kubernetes",
    "agnhost": "kubernetes",
    "crictl": "cri-tools",
    "etcd": "etcd",
    "etcdctl": "etcd",
    "coredns": "coredns",
}

# Packages of the Debian root filesystem under agnhost and glibc-dns-testing: what upstream's
# Alpine agnhost installs (bind-tools, curl, netcat-openbsd, iproute2, iperf, bash, util-linux,
# socat), with Debian's names. netcat-openbsd matters: specs pipe into `nc -u`. wget and
# conntrack stand in for Alpine's busybox applets: Service specs run `wget -T 1 -q -O -` and
# `conntrack -L` in agnhost pods.
E2E_PACKAGES = (
    "bash",
    "bind9-dnsutils",
    "conntrack",
    "curl",
    "iperf",
    "iproute2",
    "iputils-ping",
    "netcat-openbsd",
    "procps",
    "socat",
    "wget",
)
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
PAUSE_SOURCE = os.path.join(peers.REPO, "tools", "pause", "pause.c")
# Bump when what an archive holds changes without any input changing (this file's logic).
FORMAT = "2"
# The busybox image's users, and the user and group agnhost's SupplementalGroups specs expect.
BUSYBOX_PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n"
BUSYBOX_GROUP = b"root:x:0:\nnogroup:x:65534:\n"
AGNHOST_USER = b"user-defined-in-image:x:1000:1000::/home/user-defined-in-image:/bin/sh\n"
AGNHOST_GROUPS = (
    b"user-defined-in-image:x:1000:\ngroup-defined-in-image:x:50000:user-defined-in-image\n"
)
BUSYBOX_DIRS = ("bin", "etc", "home", "root", "sbin", "usr", "usr/bin", "usr/sbin", "var")


class KubeNotBuilt(Exception):
    """A binary or image archive `./dev kube` makes is missing."""


def cache_root() -> str:
    return os.environ.get("PYCNI_CACHE", image.CACHE)


def binary(name: str) -> str:
    """The absolute path of a built binary (kubectl, kubelet, etcd, ...), or KubeNotBuilt."""
    if name not in _BINARIES:
        raise KeyError(f"not a binary ./dev kube builds: {name}")
    try:
        return peers.binary(_BINARIES[name], name)
    except peers.MissingPeer as exc:
        raise KubeNotBuilt(f"{name} is not built: run ./dev kube ({exc})") from None


def built() -> bool:
    """Every binary is there (what the tests skip on)."""
    try:
        for name in _BINARIES:
            binary(name)
    except KubeNotBuilt:
        return False
    return True


@dataclass(frozen=True)
class ImageArchive:
    name: str  # exact reference, e.g. "registry.k8s.io/pause:3.10.2"
    path: str  # archive importable by `ctr -n k8s.io images import`


# ---- writing docker-archives without a registry or a container engine ------------------


@dataclass(frozen=True)
class _File:
    """One entry of a layer we write: a file (from `source` or `data`), dir or symlink."""

    path: str  # inside the image, without the leading /
    mode: int = 0o755
    source: str | None = None
    data: bytes | None = None
    kind: str = "file"  # file, dir, symlink
    target: str = ""  # symlink's


def _write_layer(entries: Iterable[_File], out: str) -> None:
    """A reproducible layer tar: owner root, time 0, entries in the order given."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            info = tarfile.TarInfo(e.path)
            info.mode, info.mtime = e.mode, 0
            if e.kind == "dir":
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif e.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, e.target
                tar.addfile(info)
            elif e.source is not None:
                info.size = os.path.getsize(e.source)
                with open(e.source, "rb") as f:
                    tar.addfile(info, f)
            else:
                data = e.data or b""
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _arch() -> str:
    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def write_archive(out: str, ref: str, layers: list[str], config: dict) -> None:
    """A docker-archive (what `docker save` writes: manifest.json, the config, each layer
    tar) of `layers` (uncompressed tars, bottom first) tagged `ref`; `config` is the image's
    runtime config (Entrypoint, Cmd, Env, User, WorkingDir)."""
    diff_ids = [_sha256(layer) for layer in layers]
    image_config = {
        "architecture": _arch(),
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{d}" for d in diff_ids]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "pycni.harness.kube"}]
        * len(layers),
    }
    config_bytes = json.dumps(image_config, sort_keys=True).encode()
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    manifest = [
        {
            "Config": config_name,
            "RepoTags": [ref],
            "Layers": [f"{d}/layer.tar" for d in diff_ids],
        }
    ]
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))

        add(config_name, config_bytes)
        for digest, layer in zip(diff_ids, layers, strict=True):
            tar.add(layer, f"{digest}/layer.tar", recursive=False, filter=_normalize)
        add("manifest.json", json.dumps(manifest).encode())


def _normalize(info: tarfile.TarInfo) -> tarfile.TarInfo:
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info


# ---- the images --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """How one image is made: its inputs' key and a function writing the archive."""

    name: str
    key: str
    make: Callable[[str, str], None]  # (archive path, work dir)


def _file_id(path: str) -> str:
    """A cheap identity of a built input (a binary, a base tar): path, size, mtime."""
    st = os.stat(path)
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join((FORMAT, *parts)).encode()).hexdigest()[:16]


def _archive_path(cache: str, spec: _Spec) -> str:
    safe = spec.name.rsplit("/", 1)[-1].replace(":", "-")
    return os.path.join(cache, "images", "kube", f"{safe}-{spec.key}.tar")


def _e2e_rootfs(cache: str, build: bool) -> str:
    """The Debian root filesystem under agnhost and glibc-dns-testing (image.py's debootstrap
    base with E2E_PACKAGES), made when `build`; else the path it has or would have."""
    if build:
        tar, _key_, _spent = image.base_rootfs(
            cache, image.apt_mirror(), packages=E2E_PACKAGES, name=f"{image.SUITE}-e2e"
        )
        return tar
    return image.base_rootfs_path(
        cache, image.apt_mirror(), packages=E2E_PACKAGES, name=f"{image.SUITE}-e2e"
    )


def _base_file(base_tar: str, path: str) -> bytes:
    """A file of the base layer (to extend /etc/passwd rather than replace it)."""
    with tarfile.open(base_tar) as tar:
        member = tar.extractfile("./" + path)
        assert member is not None, path
        return member.read()


def _porter_files() -> tuple[str, str]:
    """agnhost's porter serves TLS with the key pair upstream's image ADDs, from the pinned
    Kubernetes source in the Go module cache (./dev kube downloaded it)."""
    proc = subprocess.run(
        ["go", "list", "-m", "-f", "{{.Dir}}", "k8s.io/kubernetes"],
        cwd=os.path.join(peers.REPO, "tools", "kubernetes"),
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": os.environ.get("PATH", "") + ":/usr/local/go/bin"},
    )
    porter = os.path.join(proc.stdout.strip(), "test", "images", "agnhost", "porter")
    if proc.returncode != 0 or not os.path.isdir(porter):
        raise KubeNotBuilt(f"k8s.io/kubernetes {VERSION} is not in the Go module cache: ./dev kube")
    return os.path.join(porter, "localhost.crt"), os.path.join(porter, "localhost.key")


def _specs(cache: str, build: bool) -> list[_Spec]:
    specs = []

    def pause(out: str, work: str) -> None:
        exe = os.path.join(work, "pause")
        subprocess.run(
            ["gcc", "-static", "-Os", "-s", "-Wall", "-o", exe, PAUSE_SOURCE],
            check=True,
            capture_output=True,
            timeout=300,
        )
        layer = os.path.join(work, "layer.tar")
        _write_layer([_File("pause", source=exe)], layer)
        # As upstream's: runs as nobody (65535), needs nothing but itself.
        write_archive(out, PAUSE_IMAGE, [layer], {"Entrypoint": ["/pause"], "User": "65535:65535"})

    with open(PAUSE_SOURCE, "rb") as f:
        source_id = hashlib.sha256(f.read()).hexdigest()
    specs.append(_Spec(PAUSE_IMAGE, _key(PAUSE_IMAGE, source_id), pause))

    busybox = shutil.which("busybox") or "/bin/busybox"

    def busybox_image(out: str, work: str) -> None:
        # Debian's busybox-static 1.35, every applet a symlink to it, as in the busybox image
        # (its `wget` crashes here, exit 139: specs should use nc). The upstream image's
        # busybox is 1.37; the e2e suite asks only for the name.
        applets = subprocess.run(
            [busybox, "--list-full"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.split()
        entries = [_File(d, 0o755, kind="dir") for d in BUSYBOX_DIRS]
        entries += [_File("tmp", 0o1777, kind="dir"), _File("bin/busybox", source=busybox)]
        entries += [
            _File(a, kind="symlink", target="/bin/busybox")
            for a in sorted(set(applets))
            if a != "bin/busybox"
        ]
        entries += [
            _File("etc/passwd", 0o644, data=BUSYBOX_PASSWD),
            _File("etc/group", 0o644, data=BUSYBOX_GROUP),
            _File("etc/nsswitch.conf", 0o644, data=b"hosts: files dns\n"),
        ]
        layer = os.path.join(work, "layer.tar")
        _write_layer(entries, layer)
        write_archive(out, BUSYBOX_IMAGE, [layer], {"Env": [f"PATH={PATH}"], "Cmd": ["sh"]})

    specs.append(_Spec(BUSYBOX_IMAGE, _key(BUSYBOX_IMAGE, _file_id(busybox)), busybox_image))

    def coredns_image(out: str, work: str) -> None:
        # Root, unlike upstream's nonroot + file capability: a Deployment dropping all
        # capabilities but NET_BIND_SERVICE (kubeadm's) still binds :53.
        layer = os.path.join(work, "layer.tar")
        _write_layer(
            [_File("coredns", source=binary("coredns")), _File("tmp", 0o1777, kind="dir")], layer
        )
        write_archive(out, COREDNS_IMAGE, [layer], {"Entrypoint": ["/coredns"]})

    try:
        coredns_id = _file_id(binary("coredns"))
        agnhost_id = _file_id(binary("agnhost"))
    except KubeNotBuilt:
        if build:
            raise
        coredns_id = agnhost_id = "missing"
    specs.append(_Spec(COREDNS_IMAGE, _key(COREDNS_IMAGE, coredns_id), coredns_image))

    base = _e2e_rootfs(cache, build)

    def agnhost_image(out: str, work: str) -> None:
        # Upstream's Dockerfile, on Debian: agnhost as entrypoint with `pause` by default,
        # the agnhost-2 link (entrypoint specs), /uploads (netexec), porter's key pair, the
        # user and group the SupplementalGroups specs expect, coredns (DNS specs run it), and
        # /bin/sh as bash (not dash or a busybox that runs its own applets).
        crt, key = _porter_files()
        passwd = _base_file(base, "etc/passwd") + AGNHOST_USER
        group = _base_file(base, "etc/group") + AGNHOST_GROUPS
        layer = os.path.join(work, "layer.tar")
        _write_layer(
            [
                _File("agnhost", source=binary("agnhost")),
                _File("agnhost-2", kind="symlink", target="agnhost"),
                _File("coredns", source=binary("coredns")),
                _File("uploads", kind="dir"),
                _File("localhost.crt", 0o644, source=crt),
                _File("localhost.key", 0o600, source=key),
                _File("etc/passwd", 0o644, data=passwd),
                _File("etc/group", 0o644, data=group),
                _File("home/user-defined-in-image", kind="dir"),
                # bookworm's /bin is a link to usr/bin: an entry under bin/ would hide it.
                _File("usr/bin/sh", kind="symlink", target="bash"),
            ],
            layer,
        )
        config = {
            "Env": [f"PATH={PATH}"],
            "Entrypoint": ["/agnhost"],
            "Cmd": ["pause"],
            "ExposedPorts": {f"{p}/tcp": {} for p in (80, 8080, 8081, 9376, 5000)},
        }
        write_archive(out, AGNHOST_IMAGE, [base, layer], config)

    base_id = os.path.basename(base)
    agnhost_key = _key(AGNHOST_IMAGE, base_id, agnhost_id, coredns_id)
    specs.append(_Spec(AGNHOST_IMAGE, agnhost_key, agnhost_image))

    def glibc_dns_image(out: str, work: str) -> None:
        # Upstream's is debian:bookworm-slim with dnsutils and a coredns at /coredns.
        layer = os.path.join(work, "layer.tar")
        _write_layer([_File("coredns", source=binary("coredns"))], layer)
        config = {"Env": [f"PATH={PATH}"], "Cmd": ["bash"]}
        write_archive(out, GLIBC_DNS_IMAGE, [base, layer], config)

    glibc_key = _key(GLIBC_DNS_IMAGE, base_id, coredns_id)
    specs.append(_Spec(GLIBC_DNS_IMAGE, glibc_key, glibc_dns_image))
    return specs


def build_images(
    cache: str | None = None,
    *,
    repo: str = str(peers.REPO),
    pycni: bool = True,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
) -> list[ImageArchive]:
    """Make every archive images() lists whose inputs changed (the binaries must be built),
    and pycni's own image through pycni.harness.image (its cache)."""
    cache = cache or cache_root()
    directory = os.path.join(cache, "images", "kube")
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build per cache: they share the .part names
        for spec in _specs(cache, build=True):
            out = _archive_path(cache, spec)
            if os.path.exists(out):
                continue
            started = time.monotonic()
            with tempfile.TemporaryDirectory(dir=directory) as work:
                spec.make(out + ".part", work)
            os.replace(out + ".part", out)
            size, spent = os.path.getsize(out) / 1e6, time.monotonic() - started
            log(f"{spec.name}: {out} ({size:.0f} MB, {spent:.1f} s)")
            _prune(directory, spec, keep=out)
    if pycni:
        built = image.build(repo, cache=cache)
        log(f"{built.ref}: {built.archive} ({built.size() / 1e6:.0f} MB, {built.seconds:.1f} s)")
    return images(cache, repo=repo, pycni=pycni)


def _prune(directory: str, spec: _Spec, keep: str) -> None:
    """Archives of the same name from older inputs: each is a whole image."""
    kept = os.path.basename(keep)
    prefix = kept[: -len(f"{spec.key}.tar")]
    for name in os.listdir(directory):
        rest = name.removeprefix(prefix)
        if name.startswith(prefix) and len(rest) == len(kept) - len(prefix) and name != kept:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))


def images(
    cache: str | None = None, *, repo: str = str(peers.REPO), pycni: bool = True
) -> list[ImageArchive]:
    """Every image a lab node's containerd must hold so that nothing is ever pulled, as
    archives; KubeNotBuilt when `./dev kube` has not made one for the current inputs.
    pycni's own (deploy/IMAGE) comes from pycni.harness.image.build: reused when the checkout
    is unchanged, rebuilt (minutes) when it changed, so a lab runs the code it was started
    from."""
    cache = cache or cache_root()
    out = []
    for spec in _specs(cache, build=False):
        path = _archive_path(cache, spec)
        if not os.path.exists(path):
            raise KubeNotBuilt(f"image {spec.name} is not built: run ./dev kube ({path})")
        out.append(ImageArchive(spec.name, path))
    if pycni:
        built = image.build(repo, cache=cache)
        out.append(ImageArchive(built.ref, built.archive))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pycni.harness.kube",
        description="Make the image archives a Kubernetes lab node imports (./dev kube).",
    )
    parser.add_argument("--cache", help="default: $PYCNI_CACHE or /var/cache/pycni")
    parser.add_argument("--no-pycni", action="store_true", help="leave out pycni's own image")
    args = parser.parse_args(argv)
    try:
        archives = build_images(args.cache, pycni=not args.no_pycni)
    except (KubeNotBuilt, image.ImageError, subprocess.SubprocessError, OSError) as exc:
        print(f"kube: {exc}", file=sys.stderr)
        return 1
    for archive in archives:
        print(f"{archive.name}  {archive.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
