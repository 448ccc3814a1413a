"""`pycnictl install --native` / `--native-from`: the native executable in the bin dir,
compiled here by pycni.native.build or copied from a standalone build."""

from __future__ import annotations

import os
import tempfile

from ..native import FALLBACK_NAME
from ..native.build import BuildError, build, compiler, is_standalone, marker_of, wanted_marker
from .launchers import is_pycni_launcher, launcher_text, refuse, write_launcher, write_owned


def install_native(
    bin_dir: str, target: str, standalone: bool, native_from: str | None, force: bool
) -> None:
    """The native executable at `target`: copied from `native_from`, or compiled here (with,
    unless `standalone`, the Python launcher it falls back to, FALLBACK_NAME in `bin_dir`)."""
    if native_from is not None:
        _copy_prebuilt(native_from, target, force)
        return
    if compiler() is None:
        refuse("--native needs a C compiler (cc): install gcc or drop --native")
    fallback = None
    if not standalone:
        fallback = os.path.join(os.path.abspath(bin_dir), FALLBACK_NAME)
        # First: the executable must never name a launcher that is not there yet.
        write_owned(
            fallback, launcher_text(), 0o755, force, is_pycni_launcher, "in-process launcher"
        )
    try:
        want = wanted_marker(fallback)
        if marker_of(target) == want and _mode(target) == 0o755:
            print(f"{target} is up to date")
            return
        _check_ours(target, force)
        linkage = build(target, fallback)
    except BuildError as exc:
        refuse(str(exc))
    except OSError as exc:
        refuse(f"cannot write the executable {target}: {exc.strerror or exc}")
    print(
        f"installed {target} ({linkage} native executable"
        + (
            ", forwarding to the agent only)"
            if fallback is None
            else f"; without an agent it runs the Python launcher {fallback})"
        )
    )


def _copy_prebuilt(source: str, target: str, force: bool) -> None:
    marker = marker_of(source)
    if marker is None:
        refuse(
            f"{source} is not a pycni native executable (build one with "
            "`pycnictl install --native --standalone`)"
        )
    if not is_standalone(marker):
        refuse(
            f"{source} was built to fall back to a launcher at a path of its own build "
            "host; copy only a --standalone build"
        )
    with open(source, "rb") as f:
        data = f.read()
    try:
        with open(target, "rb") as f:
            if f.read() == data and _mode(target) == 0o755:
                print(f"{target} is up to date")
                return
    except OSError:
        pass
    _check_ours(target, force)
    directory = os.path.dirname(os.path.abspath(target))
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".pycni-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o755)
            os.replace(tmp, target)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    except OSError as exc:
        refuse(f"cannot write the executable {target}: {exc.strerror or exc}")
    print(f"installed {target} (native executable from {source})")


def _check_ours(target: str, force: bool) -> None:
    if os.path.lexists(target) and not force and not is_pycni_launcher(target):
        refuse(
            f"{target} exists and was not written by pycnictl install; remove it or give "
            "--force to replace it"
        )


def _mode(path: str) -> int | None:
    try:
        return os.stat(path).st_mode & 0o777
    except OSError:
        return None


def write_native(path: str) -> str:
    """What `pycnictl install --native` puts in a bin dir, written into a private one
    (benches): the Python launcher as FALLBACK_NAME, then the native executable at `path`
    falling back to it."""
    fallback = os.path.join(os.path.dirname(os.path.abspath(path)), FALLBACK_NAME)
    write_launcher(fallback)
    build(path, fallback)
    return path


def write_plugin(path: str, shared_dir: str | None = None) -> str:
    """What `pycnictl install` writes by default, into a private bin dir (the lab's nodes):
    the native executable where a C compiler is found, else the Python launcher. Returns
    "native" or "python". With `shared_dir`, the native build and its fallback are made there
    once and the executable is copied to `path` (many nodes, one compile)."""
    if compiler() is None:
        write_launcher(path)
        return "python"
    if shared_dir is None:
        write_native(path)
        return "native"
    built = os.path.join(shared_dir, "pycni")
    if marker_of(built) != wanted_marker(os.path.join(os.path.abspath(shared_dir), FALLBACK_NAME)):
        write_native(built)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".pycni-")
    try:
        with os.fdopen(fd, "wb") as out, open(built, "rb") as f:
            out.write(f.read())
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return "native"
