"""The eBPF fast path's kernel side: compiling bpf/fastpath.c, loading it, attaching its two
programs with tc (pyroute2), and keeping its maps equal to a desired state.

Why these tools: clang compiles at install time (the object is built for, and checked by the
verifier of, the kernel it runs on); `bpftool prog loadall` loads it, because it does the BTF
and kfunc relocations libbpf does and a hand-written loader would have to redo; the maps are
read and written with bpftool too (by map id, one `bpftool batch` per change), as they change
at reconcile rate, not per packet. Attaching goes through pyroute2 like every other netlink
call of pycni's; the only raw bpf(2) call is BPF_OBJ_GET, which turns the pinned programs into
the file descriptors a tc filter is made from.

Nothing is left pinned: bpftool pins into a private bpffs mounted for the load only (so
``ip netns exec``'s remounted /sys does not matter), and the programs then live as long as a
tc filter holds them, their maps as long as the programs. A fresh agent loads anew, fills the
new maps and replaces the filters in place (same priority and handle: no packet sees no
filter), so the old programs and maps go with their last filter.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import ipaddress
import json
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

SOURCE = os.path.join(os.path.dirname(__file__), "bpf", "fastpath.c")
# Where the image keeps the object it was built with (`pycnictl install --fast-path-dir`).
PREBUILT_DIR = "/opt/pycni/bpf"
PROGRAMS = ("from_pod", "from_underlay")
MAPS = ("pycni_fp_pods", "pycni_fp_remote", "pycni_fp_stats")
STATS = ("peer", "routed", "not_assured", "nat", "gone", "other")  # enum order in the C
# The tc filter: one priority and handle of pycni's on the ingress hook of clsact.
PRIORITY = 0xC0DE >> 4  # 3085: apart from the 1..n others' filters usually take
HANDLE = 1
FILTER_NAMES = {"from_pod": "pycni_fp_pod", "from_underlay": "pycni_fp_underlay"}
CLSACT_INGRESS = 0xFFFFFFF2
ETH_P_ALL = 0x0003
SHAPING_FREE = {"noqueue", "clsact"}  # qdiscs that say nobody shapes an interface's traffic
NUD_PERMANENT = 0x80
CLANG_FLAGS = ("-O2", "-g", "-target", "bpf", "-Wall", "-Werror")
TIMEOUT = 60


class FastPathError(Exception):
    """The fast path cannot be built, loaded or attached here: pods use the normal path."""


# --------------------------------------------------------------------------- building


def source_digest() -> str:
    with open(SOURCE, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def object_path(cache_dir: str) -> str:
    """Where the object compiled from this very source lives (a changed source is rebuilt)."""
    return os.path.join(cache_dir, f"fastpath-{source_digest()}.o")


def build(cache_dir: str, clang: str = "clang") -> str:
    """Compile bpf/fastpath.c into ``cache_dir`` unless it is there or in PREBUILT_DIR; the
    object's path."""
    for out in (object_path(PREBUILT_DIR), object_path(cache_dir)):
        if os.path.exists(out):
            return out
    exe = shutil.which(clang)
    if exe is None:
        raise FastPathError(f"{clang} is not installed (apt-get install clang llvm libbpf-dev)")
    os.makedirs(cache_dir, mode=0o755, exist_ok=True)
    argv = [exe, *CLANG_FLAGS, *_include_flags(), "-c", SOURCE, "-o", out + ".tmp"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode != 0:
        raise FastPathError(f"compiling {SOURCE} failed: {proc.stderr.strip()[-800:]}")
    os.replace(out + ".tmp", out)  # whole or not at all, for a concurrent reader
    return out


def _include_flags() -> list[str]:
    # Debian keeps asm/ under the multiarch directory, which -target bpf does not search.
    multiarch = f"/usr/include/{platform.machine()}-linux-gnu"
    return ["-I", multiarch] if os.path.isdir(multiarch) else []


def unavailable() -> str | None:
    """Why the fast path cannot run here, or None."""
    if shutil.which("bpftool") is None:
        return "bpftool is not installed"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "the kernel has no BTF (/sys/kernel/btf/vmlinux)"
    return None


# --------------------------------------------------------------------------- loading


@dataclass
class Loaded:
    """One load of the object: program fds (held by this process) and ids, map ids."""

    prog_fds: dict[str, int]
    prog_ids: dict[str, int]
    map_ids: dict[str, int]

    def close(self) -> None:
        for fd in self.prog_fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self.prog_fds = {}


def load(obj: str) -> Loaded:
    """Load ``obj`` (verifier and all) and return its programs' fds and its maps' ids."""
    tmp = tempfile.mkdtemp(prefix="pycni-bpf-")
    mounted = False
    try:
        _run("mount", "-t", "bpf", "bpf", tmp)
        mounted = True
        progs, maps = os.path.join(tmp, "progs"), os.path.join(tmp, "maps")
        _run("bpftool", "prog", "loadall", obj, progs, "type", "classifier", "pinmaps", maps)
        fds = {name: obj_get(os.path.join(progs, name)) for name in PROGRAMS}
        prog_ids = {name: _pinned_id("prog", os.path.join(progs, name)) for name in PROGRAMS}
        map_ids = {name: _pinned_id("map", os.path.join(maps, name)) for name in MAPS}
        return Loaded(fds, prog_ids, map_ids)
    finally:
        if mounted:
            subprocess.run(["umount", "-l", tmp], capture_output=True)
        os.rmdir(tmp)


def _pinned_id(kind: str, path: str) -> int:
    return int(json.loads(_run("bpftool", "-j", kind, "show", "pinned", path))["id"])


def _run(*argv: str, stdin: str | None = None) -> str:
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise FastPathError(f"{argv[0]}: {exc}") from None
    if proc.returncode != 0:
        raise FastPathError(f"{' '.join(argv[:4])}: {(proc.stderr or proc.stdout).strip()[-800:]}")
    return proc.stdout


_SYS_BPF = {"x86_64": 321, "aarch64": 280}
_BPF_OBJ_GET = 7


class _ObjGetAttr(ctypes.Structure):
    _fields_ = [
        ("pathname", ctypes.c_uint64),
        ("bpf_fd", ctypes.c_uint32),
        ("file_flags", ctypes.c_uint32),
        ("path_fd", ctypes.c_int32),
    ]


def obj_get(path: str) -> int:
    """bpf(BPF_OBJ_GET): a file descriptor of the pinned object at ``path``."""
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise FastPathError(f"no bpf(2) syscall number known for {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    name = ctypes.create_string_buffer(path.encode())
    attr = _ObjGetAttr(ctypes.cast(name, ctypes.c_void_p).value or 0, 0, 0, 0)
    fd = libc.syscall(nr, _BPF_OBJ_GET, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        raise FastPathError(f"BPF_OBJ_GET {path}: {os.strerror(err)}")
    return fd


# --------------------------------------------------------------------------- attaching


def attach(ipr, ifindex: int, program: str, fd: int) -> None:
    """Our filter on the ingress of ``ifindex``, replacing a previous one of ours in place;
    clsact is added if missing. FastPathError when the interface has another ingress qdisc
    (the bandwidth plugin's ``ingress``: its pod stays on the normal path)."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        kinds = {q.get("TCA_KIND") for q in ipr.get_qdiscs(ifindex)}
        if "ingress" in kinds:
            raise FastPathError(f"interface {ifindex} has an ingress qdisc (traffic shaping)")
        if "clsact" not in kinds:
            ipr.tc("add", "clsact", ifindex)
        ipr.tc(
            "replace-filter",
            "bpf",
            ifindex,
            HANDLE,
            fd=fd,
            name=FILTER_NAMES[program],
            parent=CLSACT_INGRESS,
            prio=PRIORITY,
            protocol=ETH_P_ALL,
            direct_action=True,
        )
    except NetlinkError as exc:
        raise FastPathError(f"attaching {program} to interface {ifindex}: {exc}") from None


def detach(ipr, ifindex: int) -> bool:
    """Remove our filter from ``ifindex`` (and clsact when nothing else is on it): True if
    there was one. An interface that is gone has nothing to remove."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        if not attached(ipr, ifindex):
            return False
        ipr.tc(
            "del-filter",
            "bpf",
            ifindex,
            HANDLE,
            parent=CLSACT_INGRESS,
            prio=PRIORITY,
            protocol=ETH_P_ALL,
        )
        if not list(ipr.get_filters(ifindex, parent=CLSACT_INGRESS)) and not list(
            ipr.get_filters(ifindex, parent=0xFFFFFFF3)
        ):
            ipr.tc("del", "clsact", ifindex)
        return True
    except NetlinkError as exc:
        if exc.code in (errno.ENODEV, errno.ENOENT, errno.EINVAL):
            return False
        raise FastPathError(f"detaching from interface {ifindex}: {exc}") from None


def attached(ipr, ifindex: int) -> str | None:
    """The name of our program on the ingress of ``ifindex`` (from_pod or from_underlay), if
    one is there."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        filters = ipr.get_filters(ifindex, parent=CLSACT_INGRESS)
    except NetlinkError:
        return None
    by_filter = {v: k for k, v in FILTER_NAMES.items()}
    for f in filters:
        if (f.get("info", 0) >> 16) != PRIORITY or f.get("TCA_KIND") != "bpf":
            continue
        opts = f.get("TCA_OPTIONS")
        name = opts.get("TCA_BPF_NAME") if opts is not None else None
        if name in by_filter:
            return by_filter[name]
    return None


def learned_macs(ipr, bridge: int) -> dict[int, str]:
    """Bridge port ifindex -> the unicast MAC the bridge learned behind it (the pod's eth0)."""
    out: dict[int, str] = {}
    for msg in ipr.fdb("dump"):
        mac = msg.get("NDA_LLADDR")
        if (
            mac
            and msg.get("NDA_MASTER") == bridge
            and not msg["state"] & NUD_PERMANENT
            and not int(mac[:2], 16) & 1
        ):
            out[msg["ifindex"]] = mac
    return out


def attachments() -> dict[str, list[dict]]:
    """What `bpftool net` shows of pycni's filters in this namespace: interface name -> the
    programs (name, id) on its tc ingress; read-only, for the doctor."""
    out = json.loads(_run("bpftool", "-j", "net", "show") or "[]")
    found: dict[str, list[dict]] = {}
    for section in out:
        for entry in section.get("tc", []):
            if entry.get("kind") == "clsact/ingress" and entry.get("name", "").startswith(
                tuple(FILTER_NAMES.values())
            ):
                found.setdefault(entry["devname"], []).append(
                    {"name": entry["name"], "id": entry.get("id")}
                )
    return found


def prog_maps(prog_id: int) -> dict[str, int]:
    """The maps (name -> id) the program ``prog_id`` uses."""
    info = json.loads(_run("bpftool", "-j", "prog", "show", "id", str(prog_id)))
    out = {}
    for map_id in info.get("map_ids", []):
        m = json.loads(_run("bpftool", "-j", "map", "show", "id", str(map_id)))
        out[m.get("name", "")] = map_id
    return out


# --------------------------------------------------------------------------- the maps


@dataclass(frozen=True)
class PodEntry:
    """A pod of this node the fast path may deliver to."""

    ip: IPv4Address
    ifindex: int  # its host veth
    mac: str  # its eth0
    gw_mac: str  # the bridge's

    def key(self) -> bytes:
        return self.ip.packed

    def value(self) -> bytes:
        return (
            self.ifindex.to_bytes(4, "little") + _mac(self.mac) + _mac(self.gw_mac)
        )  # struct pod: u32 ifindex, u8 mac[6], u8 gw_mac[6]


def remote_key(net: IPv4Network) -> bytes:
    """struct remote_key: u32 prefixlen (host order), u32 address (network order)."""
    return net.prefixlen.to_bytes(4, "little") + net.network_address.packed


REMOTE_VALUE = bytes(4)


def _mac(text: str) -> bytes:
    raw = bytes.fromhex(text.replace(":", ""))
    if len(raw) != 6:
        raise ValueError(f"not a MAC address: {text!r}")
    return raw


def pods_map(entries: Iterable[PodEntry]) -> dict[bytes, bytes]:
    return {e.key(): e.value() for e in entries}


def remote_map(nets: Iterable[IPv4Network]) -> dict[bytes, bytes]:
    return {remote_key(n): REMOTE_VALUE for n in nets}


def decode_pods(content: dict[bytes, bytes]) -> dict[IPv4Address, tuple[int, str, str]]:
    """A pods map's content as (ifindex, pod MAC, gateway MAC) by address, for people."""
    out = {}
    for key, value in content.items():
        out[IPv4Address(key)] = (
            int.from_bytes(value[:4], "little"),
            ":".join(f"{b:02x}" for b in value[4:10]),
            ":".join(f"{b:02x}" for b in value[10:16]),
        )
    return out


def decode_remote(content: dict[bytes, bytes]) -> set[IPv4Network]:
    return {
        ipaddress.ip_network((IPv4Address(k[4:8]), int.from_bytes(k[:4], "little")), strict=False)  # type: ignore[misc]
        for k in content
    }


def plan(have: dict[bytes, bytes], want: dict[bytes, bytes]) -> tuple[list, list]:
    """(keys to write with their values, keys to delete) turning ``have`` into ``want``."""
    put = [(k, v) for k, v in sorted(want.items()) if have.get(k) != v]
    delete = sorted(k for k in have if k not in want)
    return put, delete


def read_map(map_id: int) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for entry in json.loads(_run("bpftool", "-j", "map", "dump", "id", str(map_id)) or "[]"):
        out[_hex(entry["key"])] = _hex(entry["value"])
    return out


def read_stats(map_id: int) -> dict[str, int]:
    """The per-CPU counters summed: what the programs did since they were loaded."""
    totals = dict.fromkeys(STATS, 0)
    for entry in json.loads(_run("bpftool", "-j", "map", "dump", "id", str(map_id)) or "[]"):
        index = int.from_bytes(_hex(entry["key"]), "little")
        if index < len(STATS):
            totals[STATS[index]] = sum(
                int.from_bytes(_hex(v["value"]), "little") for v in entry.get("values", [])
            )
    return totals


def _hex(words: list) -> bytes:
    return bytes(int(w, 16) for w in words)


def write_map(map_id: int, have: dict[bytes, bytes], want: dict[bytes, bytes]) -> int:
    """Make map ``map_id`` hold ``want`` (``have``: what it holds); the number of changes."""
    put, delete = plan(have, want)
    lines = [
        f"map update id {map_id} key hex {_words(k)} value hex {_words(v)}" for k, v in put
    ] + [f"map delete id {map_id} key hex {_words(k)}" for k in delete]
    if lines:
        _run("bpftool", "batch", "file", "-", stdin="\n".join(lines) + "\n")
    return len(lines)


def _words(raw: bytes) -> str:
    return " ".join(f"{b:02x}" for b in raw)
