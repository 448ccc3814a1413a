"""Build and install the native plugin executable (shim.c) with the system's C compiler.

Everything the C program shares with the Python side reaches it with -D from its one
definition in Python (MAX_CONFIG_BYTES, the socket, the wire format's magic, the timeout, the
CNI versions, the forwarded variables), and so do two limits of the interpreter the Python
launchers run on, measured here: how deep a config may nest and how many digits an integer
may have before shim.decode_object() gives up on it. With them the native executable picks the
same socket as shim.socket_path() for every input.

The executable carries a marker, "pycni native shim <digest> <standalone | fallback=PATH>",
where the digest covers the source and every flag: install compares it to skip an unchanged
build, uninstall finds it to know the file is pycni's.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

from . import MARKER_PREFIX

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "shim.c")
CFLAGS = ("-std=c99", "-O2", "-Wall", "-Wextra")
RELEASE_FLAGS = ("-s",)  # stripped: the marker is data, it stays
SANITIZE_FLAGS = (
    "-fsanitize=address,undefined",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
    "-g",
)
MARKER_SCAN_BYTES = 64 << 20  # a static executable is well under 1 MiB
PROBE_DEPTH_CAP = 1 << 16

# Runs as the launchers run (-IS) and at their depth of Python frames (module, main,
# socket_path, decode_object): the deepest nesting decode_object still decodes there.
LIMITS_PROBE = r"""
import sys
sys.path[:0] = [sys.argv[1]]
from pycni.shim import socket_path
def main():
    lo, hi = 1, int(sys.argv[2])
    while lo < hi:
        mid = (lo + hi + 1) // 2
        doc = '{"agentSocket": "/probe", "x": ' + "[" * (mid - 1) + "]" * (mid - 1) + "}"
        if socket_path(doc.encode()) == "/probe":
            lo = mid
        else:
            hi = mid - 1
    digits = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 0
    print(lo, digits)
main()
"""


class BuildError(Exception):
    pass


def compiler() -> list[str] | None:
    """$CC, else cc: None when there is none."""
    cc = shlex.split(os.environ.get("CC", "")) or ["cc"]
    return cc if shutil.which(cc[0]) else None


@functools.cache
def interpreter_limits(python: str = sys.executable) -> tuple[int, int]:
    """(deepest nesting, most integer digits) shim.decode_object accepts under `python`;
    measured once per process (a lab builds for every node)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [python, "-IS", "-c", LIMITS_PROBE, root, str(PROBE_DEPTH_CAP)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode != 0:
        raise BuildError(f"cannot measure {python}'s JSON limits: {proc.stderr.strip()}")
    depth, digits = proc.stdout.split()
    return int(depth), int(digits)


def c_string(text: str) -> str:
    """A C string literal of `text` (UTF-8, surrogateescape), every unusual byte escaped."""
    out = []
    for byte in text.encode("utf-8", "surrogateescape"):
        ch = chr(byte)
        if ch in '"\\' or not 0x20 <= byte < 0x7F or ch == "?":  # "?": no trigraphs
            out.append(f"\\{byte:03o}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def defines(fallback: str | None, limits: tuple[int, int] | None = None) -> dict[str, str]:
    from .. import shim
    from ..cni import MAX_CONFIG_BYTES, versions

    if versions.LATEST != versions.SUPPORTED[-1] or any("," in v for v in versions.SUPPORTED):
        raise BuildError("pycni.cni.versions: SUPPORTED must end with LATEST, without commas")
    depth, digits = limits or interpreter_limits()
    out = {
        "PYCNI_MAX_CONFIG_BYTES": str(int(MAX_CONFIG_BYTES)),
        "PYCNI_DEFAULT_SOCKET": c_string(shim.DEFAULT_SOCKET),
        "PYCNI_MAGIC": c_string(shim.MAGIC.decode("ascii")),
        "PYCNI_TIMEOUT_MS": str(round(shim.TIMEOUT * 1000)),
        "PYCNI_CONNECT_TIMEOUT_MS": str(round(shim.CONNECT_TIMEOUT * 1000)),
        "PYCNI_VERSIONS": c_string(",".join(versions.SUPPORTED)),
        "PYCNI_FORWARDED": c_string(",".join(p.decode("ascii") for p in shim.FORWARDED)),
        "PYCNI_JSON_MAX_DEPTH": str(depth),
        "PYCNI_INT_MAX_DIGITS": str(digits),
    }
    if fallback is not None:
        if not os.path.isabs(fallback):
            raise BuildError(f"the fallback launcher's path must be absolute: {fallback}")
        out["PYCNI_FALLBACK"] = c_string(fallback)
    return out


def wanted_marker(
    fallback: str | None, sanitize: bool = False, limits: tuple[int, int] | None = None
) -> str:
    """The marker a build with these settings carries (no compiler needed)."""
    return _plan(fallback, sanitize, limits, None)[1]


def _plan(
    fallback: str | None,
    sanitize: bool,
    limits: tuple[int, int] | None,
    overrides: dict[str, str] | None,
) -> tuple[list[str], str]:
    """(compiler flags with -D's, marker) for a build."""
    flags = [*CFLAGS, *(SANITIZE_FLAGS if sanitize else RELEASE_FLAGS)]
    values = {**defines(fallback, limits), **(overrides or {})}
    flags += [f"-D{k}={v}" for k, v in sorted(values.items())]
    with open(SOURCE, "rb") as f:
        source = f.read()
    digest = hashlib.sha256(source + b"\0" + "\0".join(flags).encode()).hexdigest()[:32]
    kind = f"fallback={fallback}" if fallback is not None else "standalone"
    return flags, f"{MARKER_PREFIX.decode()}{digest} {kind}"


def build(
    output: str,
    fallback: str | None = None,
    *,
    sanitize: bool = False,
    static: bool = True,
    limits: tuple[int, int] | None = None,
    overrides: dict[str, str] | None = None,
    extra_flags: tuple[str, ...] = (),
) -> str:
    """Compile shim.c into `output`, replacing it atomically. Static when the C library
    allows (sanitized builds never are). Returns "static" or "dynamic". `overrides` replaces
    -D values and `extra_flags` adds compiler flags: for tests (a private default socket, a
    short timeout, -Werror)."""
    cc = compiler()
    if cc is None:
        raise BuildError("no C compiler (cc): install gcc or drop --native")
    flags, marker = _plan(fallback, sanitize, limits, overrides)
    flags += extra_flags
    flags.append(f"-DPYCNI_MARKER={c_string(marker)}")
    directory = os.path.dirname(os.path.abspath(output))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".pycni-")
    os.close(fd)
    try:
        linkages = ["static", "dynamic"] if static and not sanitize else ["dynamic"]
        errors = []
        for linkage in linkages:
            argv = [*cc, *flags, *(["-static"] if linkage == "static" else []), "-o", tmp, SOURCE]
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
            if proc.returncode == 0:
                break
            errors.append(proc.stderr.strip())
        else:
            raise BuildError(f"{cc[0]} failed to build {SOURCE}: {errors[-1][-2000:]}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, output)
        return linkage
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def marker_of(path: str) -> str | None:
    """The marker in the executable at `path`, or None if it is not a pycni native one."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"\x7fELF":
                return None
            data = f.read(MARKER_SCAN_BYTES)
    except OSError:
        return None
    at = data.find(MARKER_PREFIX)
    if at < 0:
        return None
    end = data.find(b"\0", at)
    return data[at : end if end >= 0 else len(data)].decode("utf-8", "surrogateescape")


def is_standalone(marker: str) -> bool:
    return marker.endswith(" standalone")
