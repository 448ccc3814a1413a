"""The agent's image (deploy/Containerfile) built here, with no container registry.

The Containerfile starts from a public Python image by default; here its BASE is a Debian
bookworm root filesystem made by debootstrap from the Debian mirror apt already uses and
imported with podman, and pip installs from wheels downloaded beforehand with the machine's
own pip (a build container has no PyPI: the machine's proxy and its CA are the host's). What
each step makes is kept in a cache outside the checkout, keyed by what determines it, so a
second build of the same tree costs almost nothing:

  <cache>/base/bookworm-<key>.tar     the debootstrap root filesystem (suite, variant, mirror,
                                      packages)
  <cache>/wheels/<key>/               pycni's dependencies and its build backend (pyproject)
  <cache>/podman/                     podman's storage: the imported base, the layer cache
  <cache>/images/<name>-<key>.tar     the image as a docker-archive (every input file, the
                                      base, the wheels, the commit), ready for
                                      `ctr -n k8s.io images import`

`./dev image` runs this module (`python -m pycni.harness.image`).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass

from .podman import Podman

CACHE = "/var/cache/pycni"
SUITE = "bookworm"
VARIANT = "minbase"
# What the Containerfile's final stage would otherwise fetch: the base then needs no mirror.
BASE_PACKAGES = ("python3", "python3-venv", "iproute2", "nftables", "iptables")
# Left out of the base (about 130 MB of its 285): apt's package lists and downloaded packages
# (a stage that installs runs apt-get update first), translations and manual pages, as the
# Debian and Python slim images leave them out.
BASE_EXCLUDES = (
    "./var/lib/apt/lists/*",
    "./var/cache/apt/*",
    "./usr/share/locale/*",
    "./usr/share/man/*",
)
DEFAULT_MIRROR = "http://deb.debian.org/debian"
APT_SOURCES = ("/etc/apt/sources.list.d", "/etc/apt/sources.list")
WHEELS_IN_BUILD = "/wheels"
# The build inputs besides src/ (the Containerfile copies only these).
INPUTS = (
    "deploy/Containerfile",
    "deploy/Containerfile.dockerignore",
    "deploy/IMAGE",
    "pyproject.toml",
    "README.md",
)
BUILD_TIMEOUT = 1800.0
# Archives of other inputs (earlier commits) unused this long are removed after a build: each
# is the whole image (about 0.5 GB), and another checkout may be importing a recent one.
PRUNE_AFTER = 3600.0


class ImageError(Exception):
    pass


class BuildPodman(Podman):
    """The harness's podman with overlay storage: a build's every step would be a full copy
    of the root filesystem with vfs (gigabytes, minutes)."""

    def _write_configs(self) -> None:
        super()._write_configs()
        with open(self.storage_conf, "w") as f:
            f.write(
                "[storage]\n"
                'driver = "overlay"\n'
                f"graphroot = {json.dumps(self._path('storage'))}\n"
                f"runroot = {json.dumps(self.runroot)}\n"
            )


@dataclass
class Built:
    ref: str
    archive: str  # docker-archive tar
    seconds: float  # wall time of this call
    cached: bool  # the archive was already there
    steps: dict[str, float]  # seconds per step that ran (base, wheels, build, save)

    def size(self) -> int:
        return os.path.getsize(self.archive)


def _key(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def apt_mirror(sources: tuple[str, ...] = APT_SOURCES) -> str:
    """The Debian mirror apt uses for bookworm's main suite (deb822 .sources or one-line
    .list files), else deb.debian.org."""
    files: list[str] = []
    for path in sources:
        if os.path.isdir(path):
            files += sorted(os.path.join(path, n) for n in os.listdir(path))
        elif os.path.exists(path):
            files.append(path)
    for path in files:
        if path.endswith(".sources"):
            found = _mirror_deb822(path)
        elif path.endswith(".list"):
            found = _mirror_one_line(path)
        else:
            continue
        if found:
            return found
    return DEFAULT_MIRROR


def _mirror_deb822(path: str) -> str | None:
    with open(path) as f:
        stanzas = f.read().split("\n\n")
    for stanza in stanzas:
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line:
                continue
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        if "deb" in fields.get("types", "").split() and SUITE in fields.get("suites", "").split():
            uris = fields.get("uris", "").split()
            if uris:
                return uris[0]
    return None


def _mirror_one_line(path: str) -> str | None:
    with open(path) as f:
        for line in f:
            words = [w for w in line.split() if not w.startswith("[")]
            if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                return words[1]
    return None


def base_rootfs_path(
    cache: str, mirror: str, packages: tuple[str, ...] = BASE_PACKAGES, name: str = SUITE
) -> str:
    """Where base_rootfs keeps the root filesystem of `packages` (made or not)."""
    key = _key(SUITE, VARIANT, mirror, *packages, *BASE_EXCLUDES)
    return os.path.join(cache, "base", f"{name}-{key}.tar")


def base_rootfs(
    cache: str, mirror: str, packages: tuple[str, ...] = BASE_PACKAGES, name: str = SUITE
) -> tuple[str, str, float]:
    """(tar of the debootstrap root filesystem with `packages`, its key, seconds spent making
    it: 0 when cached). Another `name` (pycni.harness.kube's e2e base) is kept and pruned apart
    from pycni's."""
    tar = base_rootfs_path(cache, mirror, packages, name)
    key = os.path.basename(tar).removeprefix(f"{name}-").removesuffix(".tar")
    if os.path.exists(tar):
        os.utime(tar)  # in use: not pruned
        return tar, key, 0.0
    if shutil.which("debootstrap") is None:
        raise ImageError("debootstrap is not installed (apt-get install debootstrap)")
    started = time.monotonic()
    work = os.path.join(cache, "base", f"tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    try:
        _run(
            [
                "debootstrap",
                f"--variant={VARIANT}",
                "--include=" + ",".join(packages),
                SUITE,
                os.path.join(work, "root"),
                mirror,
            ],
            "debootstrap",
        )
        excludes = [f"--exclude={pattern}" for pattern in BASE_EXCLUDES]
        _run(["tar", "-C", os.path.join(work, "root"), *excludes, "-cf", tar + ".part", "."], "tar")
        os.replace(tar + ".part", tar)
        prune(os.path.dirname(tar), f"{name}-", keep=tar)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if os.path.exists(tar + ".part"):
            os.unlink(tar + ".part")
    return tar, key, time.monotonic() - started


def requirements(repo: str) -> list[str]:
    """pycni's dependencies and its build backend, as pyproject.toml names them."""
    with open(os.path.join(repo, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    return list(project["build-system"]["requires"]) + list(project["project"]["dependencies"])


def wheelhouse(cache: str, repo: str) -> tuple[str, str, float]:
    """(directory of wheels for the build's pip, its key, seconds spent: 0 when cached),
    downloaded with this machine's pip and its settings."""
    wanted = requirements(repo)
    key = _key(sys.version.split()[0], *wanted)
    directory = os.path.join(cache, "wheels", key)
    if os.path.isdir(directory):
        return directory, key, 0.0
    started = time.monotonic()
    part = directory + f".part-{os.getpid()}"
    shutil.rmtree(part, ignore_errors=True)
    try:
        _run(
            [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", part]
            + wanted,
            "pip download",
        )
        os.replace(part, directory)
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return directory, key, time.monotonic() - started


def tree_digest(repo: str) -> str:
    """Every build input's path and content: the Containerfile's COPY sources and itself."""
    digest = hashlib.sha256()
    paths = [os.path.join(repo, p) for p in INPUTS]
    for top, dirs, files in os.walk(os.path.join(repo, "src")):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.endswith(".egg-info"))
        paths += [os.path.join(top, n) for n in sorted(files) if not n.endswith(".pyc")]
    for path in paths:
        digest.update(os.path.relpath(path, repo).encode() + b"\0")
        with open(path, "rb") as f:
            digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()[:16]


def git_commit(repo: str) -> str:
    """The checkout's commit, with "-dirty" when files differ from it; "" outside git."""
    try:
        head = subprocess.run(
            ["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30
        )
        if head.returncode != 0:
            return ""
        dirty = subprocess.run(
            ["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def image_name(repo: str) -> str:
    with open(os.path.join(repo, "deploy", "IMAGE")) as f:
        return f.read().strip()


def build(
    repo: str,
    ref: str | None = None,
    *,
    cache: str = CACHE,
    commit: str | None = None,
) -> Built:
    """Build deploy/Containerfile as `ref` (deploy/IMAGE by default) and save it as a
    docker-archive under the cache; reuse the archive when every input is the same. podman's
    output goes to a .log beside the archive. One build at a time per cache: two builds
    tagging the same name in one storage could each save the other's image."""
    started = time.monotonic()
    os.makedirs(cache, exist_ok=True)
    with open(os.path.join(cache, "build.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = _build(repo, ref, cache, commit)
    built.seconds = time.monotonic() - started
    return built


def _build(repo: str, ref: str | None, cache: str, commit: str | None) -> Built:
    started = time.monotonic()
    repo = os.path.abspath(repo)
    ref = ref or image_name(repo)
    commit = git_commit(repo) if commit is None else commit
    mirror = apt_mirror()
    steps: dict[str, float] = {}
    base_tar, base_key, spent = base_rootfs(cache, mirror)
    if spent:
        steps["base"] = spent
    wheels, wheels_key, spent = wheelhouse(cache, repo)
    if spent:
        steps["wheels"] = spent
    key = _key(ref, tree_digest(repo), base_key, wheels_key, commit)
    safe = ref.rsplit("/", 1)[-1].replace(":", "-")
    archive = os.path.join(cache, "images", f"{safe}-{key}.tar")
    if os.path.exists(archive):
        os.utime(archive)  # in use: not pruned
        return Built(ref, archive, time.monotonic() - started, True, steps)
    os.makedirs(os.path.dirname(archive), exist_ok=True)
    podman = BuildPodman(os.path.join(cache, "podman"))
    base_ref = f"localhost/pycni-base:{SUITE}-{base_key}"
    if podman.run("image", "exists", base_ref, check=False).returncode != 0:
        t = time.monotonic()
        podman.run_image_copy("import", "--quiet", base_tar, base_ref, timeout=600)
        steps["import"] = time.monotonic() - t
    t = time.monotonic()
    argv = [
        "build",
        "--network=host",  # the RUN steps reach the Debian mirror (only the native stage's)
        "--layers",
        "--file",
        os.path.join(repo, "deploy", "Containerfile"),
        "--ignorefile",
        os.path.join(repo, "deploy", "Containerfile.dockerignore"),
        "--build-arg",
        f"BASE={base_ref}",
        "--build-arg",
        f"PIP_OPTIONS=--no-index --find-links {WHEELS_IN_BUILD}",
        "--build-arg",
        f"PYCNI_COMMIT={commit}",
        "--volume",
        f"{wheels}:{WHEELS_IN_BUILD}:ro",
        "--tag",
        ref,
        repo,
    ]
    log_path = os.path.join(cache, "images", f"{safe}-{key}.log")
    with open(log_path, "w") as log_file:
        # As run_image_copy: an empty /var/lib, where containers/image would keep a cache.
        proc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c"]
            + ['mount -t tmpfs pycni-podman /var/lib && exec "$@"', "sh", "podman", *argv],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=podman.env(),
            timeout=BUILD_TIMEOUT,
        )
    if proc.returncode != 0:
        with open(log_path, errors="replace") as f:
            tail = f.read()[-3000:]
        raise ImageError(f"podman build failed ({proc.returncode}), {log_path}: {tail}")
    steps["build"] = time.monotonic() - t
    t = time.monotonic()
    podman.save_docker_archive(ref, archive + ".part")
    os.replace(archive + ".part", archive)
    steps["save"] = time.monotonic() - t
    prune(os.path.dirname(archive), f"{safe}-", keep=archive)
    return Built(ref, archive, time.monotonic() - started, False, steps)


def prune(directory: str, prefix: str, keep: str, older_than: float = PRUNE_AFTER) -> list[str]:
    """Remove the archives (and build logs) named `prefix`<key> unused for `older_than`
    seconds, except `keep`; returns what was removed."""
    removed = []
    now = time.time()
    for name in os.listdir(directory):
        path = os.path.join(directory, name)
        key = name.removeprefix(prefix).rsplit(".", 1)[0]
        if not name.startswith(prefix) or len(key) != 16 or path.startswith(keep[: -len(".tar")]):
            continue  # another name's (pycni-0.1.0-next-...), or this build's
        with contextlib.suppress(FileNotFoundError):
            if now - os.path.getmtime(path) > older_than:
                os.unlink(path)
                removed.append(path)
    return removed


def image_config(archive: str) -> dict:
    """The image's config (Env, Entrypoint, Cmd, Labels) read from a docker-archive."""
    import tarfile

    with tarfile.open(archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
        config = json.load(tar.extractfile(manifest[0]["Config"]))  # type: ignore[arg-type]
    return config.get("config", {})


def _run(argv: list[str], what: str) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    if proc.returncode != 0:
        raise ImageError(
            f"{what} failed ({proc.returncode}): {(proc.stderr or proc.stdout)[-3000:]}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pycni.harness.image",
        description="Build deploy/Containerfile offline as deploy/IMAGE's name.",
    )
    parser.add_argument("--repo", default=".", help="the checkout (default: .)")
    parser.add_argument("--cache", default=CACHE, help=f"cache directory (default: {CACHE})")
    parser.add_argument("--tag", help="image name (default: deploy/IMAGE)")
    parser.add_argument("--commit", help="PYCNI_COMMIT to stamp (default: git's)")
    args = parser.parse_args(argv)
    try:
        built = build(args.repo, args.tag, cache=args.cache, commit=args.commit)
    except (ImageError, subprocess.SubprocessError, OSError) as exc:
        print(f"image: {exc}", file=sys.stderr)
        return 1
    steps = ", ".join(f"{k} {v:.1f} s" for k, v in built.steps.items()) or "all cached"
    size = built.size() / 1e6
    print(f"{built.ref}: {built.archive} ({size:.0f} MB), {built.seconds:.1f} s ({steps})")
    print(f"load it on a node: ctr -n k8s.io images import {built.archive}")
    print(f"or into podman: podman load -i {built.archive}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
