"""`pycnictl uninstall`: remove everything pycni put on this node.

This module is the inventory of what pycni creates, taken apart in this order:
  1. the node's lease in the cluster datastore (only when --datastore is given, as for
     `pycnictl leave`): the other nodes drop their routes to this node
  2. pod attachments: host veths with the alias "pycni <network> <container> <ifname>" (the
     pod end goes with its host end) and ifb devices with the alias "pycni-ifb ..."
  3. the eBPF fast path: pycni's tc filters (pycni_fp_*) on any interface, with clsact when
     nothing else is on it (its programs and maps go with their last filter); routes with
     pycni's protocol (120) and the VTEPs `pycni.<vni>`
  4. the pod bridges pycni's configs or store name (default cni0), only those carrying pycni's
     signature (the 0a:58 MAC of their gateway address, or recorded in the store) and no
     ports pycni did not make
  5. the packet rules: nftables `table inet pycni`, or the PYCNI-* iptables chains and jumps
  6. files: the executable in the bin dir and a native one's fallback launcher (only files with
     a marker of pycnictl install's: a launcher's, or the native executable's), the config
     list in the conf dir (only one of type pycni), subnet.env and the agent socket in the run
     dir, the IPAM store, lock, sqlite datastore and the compiled fast path (bpf/) in the data
     dir; a directory goes when
     nothing but pycni's files was in it.
Kernel objects are those of the network namespace it runs in. It refuses while an agent
answers on its socket (it would put everything back), and is idempotent: a second run finds
nothing. Kept: sysctls pycni turned on (ip_forward, nf_conntrack_tcp_be_liberal) and the log
files.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import stat
import sys
from dataclasses import dataclass, field

from ..agent.options import cluster_node
from ..cni.netconf import DEFAULT_BRIDGE
from ..native import FALLBACK_NAME
from ..node_config import CONFLIST_NAME, read_subnet_env
from .cleanup import remove_packet_rules
from .launchers import PLUGIN_NAME, is_pycni_conflist, is_pycni_launcher

TMP_PREFIX = ".pycni-"  # node_config.atomic_write's temporary files
VTEP_NAME = re.compile(r"pycni\.\d+")  # ClusterNode.vxlan(): pycni.<vni>
SQLITE_SUFFIXES = ("", "-wal", "-shm", "-journal")
DATA_FILES = (
    *(f"pycni.db{s}" for s in SQLITE_SUFFIXES),
    "gc.lock",
    *(f"cluster.db{s}" for s in SQLITE_SUFFIXES),
)


@dataclass
class Report:
    removed: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def did(self, what: str) -> None:
        self.removed.append(what)
        print(f"removed {what}", flush=True)

    def kept(self, what: str) -> None:
        print(f"kept {what}", flush=True)

    def failed(self, what: str) -> None:
        self.errors.append(what)
        print(f"pycnictl uninstall: {what}", file=sys.stderr, flush=True)


@dataclass
class Known:
    """What pycni's own records say it made: read before any of them is removed."""

    conflists: list[str]
    data_dirs: list[str]
    sockets: list[str]
    bridges: dict[str, set[str]]  # name -> subnets the store recorded ({} for config-only)
    subnet_file: str
    subnet_env: dict[str, str]


def run_uninstall(args) -> int:
    known = survey(args)
    running = [path for path in known.sockets if agent_answers(path)]
    if running:
        raise SystemExit(
            f"pycnictl uninstall: the pycni agent answers at {running[0]}: stop "
            "it first (kubectl delete -f pycni.yaml, or stop `pycnictl agent`), "
            "or it would put back what this removes"
        )
    report = Report()
    if args.datastore:
        release_lease(args, known, report)
    elif known.subnet_env.get("SUBNET") or known.subnet_env.get("IPV6_SUBNET"):
        print(
            f"note: node {known.subnet_env.get('NODE', '?')} keeps its subnet lease in the "
            "cluster datastore: give --datastore and the agent's cluster options to release "
            "it (a sqlite or etcd lease otherwise expires after its TTL)",
            file=sys.stderr,
        )
    remove_kernel_objects(known, report)
    try:
        if remove_packet_rules(known.data_dirs[0]):
            report.did("pycni's packet rules (nftables table inet pycni / PYCNI-* chains)")
    except Exception as exc:  # CniError(RULES_FAILURE) from nft / iptables
        report.failed(f"packet rules: {exc}")
    remove_files(args, known, report)
    if not report.removed and not report.errors:
        print("nothing of pycni's to remove")
    return 1 if report.errors else 0


# --- what pycni recorded -------------------------------------------------------------------


def survey(args) -> Known:
    conflist = os.path.join(args.conf_dir, CONFLIST_NAME)
    conflists = [conflist] if is_pycni_conflist(conflist) else []
    data_dirs = [args.data_dir]
    sockets = [os.path.join(args.run_dir, "agent.sock")]
    bridges: dict[str, set[str]] = {DEFAULT_BRIDGE: set(), args.bridge: set()}
    for entry in plugin_entries(conflists):
        bridges.setdefault(entry.get("bridge") or DEFAULT_BRIDGE, set())
        for key, into in (("dataDir", data_dirs), ("agentSocket", sockets)):
            value = entry.get(key)
            if isinstance(value, str) and os.path.isabs(value) and value not in into:
                into.append(value)
    for data_dir in data_dirs:
        for info in store_networks(data_dir).values():
            bridges.setdefault(info.get("bridge") or DEFAULT_BRIDGE, set()).update(
                info.get("subnets", [])
            )
    subnet_file = args.subnet_file or os.path.join(args.run_dir, "subnet.env")
    return Known(conflists, data_dirs, sockets, bridges, subnet_file, read_subnet_env(subnet_file))


def plugin_entries(conflists: list[str]) -> list[dict]:
    import json

    out: list[dict] = []
    for path in conflists:
        with open(path) as f:
            out.extend(
                p
                for p in json.load(f)["plugins"]
                if isinstance(p, dict) and p.get("type") == PLUGIN_NAME
            )
    return out


def store_networks(data_dir: str) -> dict[str, dict]:
    """The networks the IPAM store recorded ({} without a store; never creates one)."""
    from ..ipam.store import Store

    if not os.path.exists(os.path.join(data_dir, "pycni.db")):
        return {}
    try:
        with Store(data_dir) as store:
            return store.list_networks()
    except Exception as exc:
        print(
            f"note: cannot read the IPAM store in {data_dir} ({exc}): bridges are "
            "recognised by their MAC only",
            file=sys.stderr,
        )
        return {}


def agent_answers(path: str) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        return True
    except (OSError, ValueError):
        return False
    finally:
        sock.close()


# --- 1. the cluster lease --------------------------------------------------------------------


def release_lease(args, known: Known, report: Report) -> None:
    """Free this node's subnet in the datastore, as `pycnictl leave` does (best effort)."""
    from .. import log
    from ..cluster.model import ClusterSettings

    env = known.subnet_env
    if not args.cluster_cidr:
        args.cluster_cidr = [env[k] for k in ("NETWORK", "IPV6_NETWORK") if env.get(k)]
    args.node_name = args.node_name or env.get("NODE") or socket.gethostname()
    if not args.cluster_cidr and args.datastore == "kubernetes":
        # Subnets are the API server's podCIDRs there: any cluster CIDR opens the datastore.
        args.cluster_cidr = [str(c) for c in ClusterSettings().cluster_cidrs]
    if not args.cluster_cidr:
        print(
            "note: no lease to release is known (no subnet.env); give --cluster-cidr to "
            "release one anyway",
            file=sys.stderr,
        )
        return
    if args.datastore == "sqlite" and not os.path.exists(args.datastore_path):
        return  # opening it would create it: no database, no lease
    log.setup("", "warning")
    try:
        node = cluster_node(args, known.data_dirs[0], "")
        held = [n for n in node.store.nodes() if n.name == args.node_name]
        node.store.release()
        node.store.close()
    except (Exception, SystemExit) as exc:
        report.failed(
            f"could not release node {args.node_name}'s lease in the "
            f"{args.datastore} datastore: {exc} (the other nodes keep their routes "
            "to it until it expires, or run `pycnictl leave` later)"
        )
        return
    for record in held:
        subnets = ", ".join(map(str, record.subnets))
        if args.datastore == "kubernetes":
            report.did(
                f"pycni's annotations from node {record.name} (its podCIDR {subnets} "
                "is Kubernetes's)"
            )
        else:
            report.did(f"node {record.name}'s lease of {subnets} in the {args.datastore} datastore")


# --- 2-4. kernel objects ---------------------------------------------------------------------


def remove_kernel_objects(known: Known, report: Report) -> None:
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        remove_fast_path(ipr, report)
        remove_attachments(ipr, report)
        remove_routes(ipr, report)
        remove_vteps(ipr, report)
        remove_bridges(ipr, known.bridges, report)


def remove_fast_path(ipr, report: Report) -> None:
    """pycni's tc filters wherever they are: the pods' host veths, the underlay, the VTEP."""
    from ..dataplane import fastpath as fp

    for link in ipr.link("dump"):
        try:
            if fp.detach(ipr, link["index"]):
                report.did(f"fast-path program on {link.get('IFLA_IFNAME')}")
        except fp.FastPathError as exc:
            report.failed(str(exc))


def attachment_prefixes() -> tuple[str, ...]:
    from ..dataplane import names

    return (f"{names.ALIAS_PREFIX} ", f"{names.IFB_ALIAS_PREFIX} ")


def remove_attachments(ipr, report: Report) -> None:
    """Every link whose alias says it is a pod attachment's: host veths and ifb devices."""
    prefixes = attachment_prefixes()
    for link in ipr.link("dump"):
        alias = link.get("IFLA_IFALIAS") or ""
        if alias.startswith(prefixes):
            _delete_link(ipr, link, f"({alias})", report)


def remove_routes(ipr, report: Report) -> None:
    """Every route with pycni's protocol, in any table and of any shape (the backends' own
    delete matches only the shapes they make: a route added by hand with proto 120 and no
    gateway would stay)."""
    from pyroute2.netlink.exceptions import NetlinkError

    from ..backends import RTPROT_PYCNI
    from ..dataplane.errors import is_missing

    for family in (socket.AF_INET, socket.AF_INET6):
        for msg in ipr.route("dump", family=family, proto=RTPROT_PYCNI):
            if msg["proto"] != RTPROT_PYCNI:
                continue
            dst = (
                f"{msg.get('RTA_DST') or ('0.0.0.0' if family == socket.AF_INET else '::')}"
                f"/{msg['dst_len']}"
            )
            spec = {
                "family": family,
                "dst": dst,
                "proto": RTPROT_PYCNI,
                "scope": msg["scope"],
                "table": msg.get("RTA_TABLE") or msg["table"],
            }
            for key, attr in (("oif", "RTA_OIF"), ("gateway", "RTA_GATEWAY")):
                if msg.get(attr):
                    spec[key] = msg.get(attr)
            via = f" via {spec['gateway']}" if "gateway" in spec else ""
            what = f"route {dst}{via}{_dev(ipr, spec.get('oif', 0))} proto {RTPROT_PYCNI}"
            try:
                ipr.route("del", **spec)
            except NetlinkError as exc:
                if not is_missing(exc):
                    report.failed(f"cannot delete {what}: {exc}")
                continue
            report.did(what)


def remove_vteps(ipr, report: Report) -> None:
    for link in ipr.link("dump"):
        if VTEP_NAME.fullmatch(link.get("IFLA_IFNAME") or "") and _kind(link) == "vxlan":
            _delete_link(ipr, link, "(VTEP)", report)


def remove_bridges(ipr, bridges: dict[str, set[str]], report: Report) -> None:
    for name in sorted(bridges):
        found = ipr.link_lookup(ifname=name)
        if not found:
            continue
        link = ipr.link("get", index=found[0])[0]
        if _kind(link) != "bridge":
            continue
        if not is_pycni_bridge(ipr, link, bridges[name]):
            report.kept(
                f"bridge {name}: not made by pycni (no 0a:58 MAC of its gateway "
                "address, not in pycni's store)"
            )
            continue
        ports = [
            p.get("IFLA_IFNAME") for p in ipr.link("dump") if p.get("IFLA_MASTER") == link["index"]
        ]
        if ports:
            report.kept(f"bridge {name}: it still has ports pycni did not make: {', '.join(ports)}")
            continue
        _delete_link(ipr, link, "(pod bridge)", report)


def is_pycni_bridge(ipr, link, recorded_subnets: set[str]) -> bool:
    """pycni's signature: its MAC is 0a:58 + one of its IPv4 addresses (names.bridge_mac), or
    it holds an address in a subnet the store recorded for a network on this bridge."""
    import ipaddress

    from ..dataplane.names import bridge_mac

    mac = (link.get("IFLA_ADDRESS") or "").lower()
    subnets = [ipaddress.ip_network(s) for s in recorded_subnets]
    for msg in ipr.addr("dump", index=link["index"]):
        addr = ipaddress.ip_address(msg.get("IFA_ADDRESS"))
        if addr.version == 4 and bridge_mac(addr.packed) == mac:
            return True
        if any(addr in subnet for subnet in subnets):
            return True
    return False


def _delete_link(ipr, link, what: str, report: Report) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    from ..dataplane.errors import is_missing

    name = link.get("IFLA_IFNAME")
    try:
        ipr.link("del", index=link["index"])
    except NetlinkError as exc:
        if not is_missing(exc):  # gone meanwhile (a veth's peer, say) is fine
            report.failed(f"cannot delete {name}: {exc}")
        return
    report.did(f"{_kind(link) or 'link'} {name} {what}")


def _kind(link) -> str | None:
    info = link.get("IFLA_LINKINFO")
    return info.get("IFLA_INFO_KIND") if info else None


def _dev(ipr, index: int) -> str:
    names = [link.get("IFLA_IFNAME") for link in ipr.link("dump") if link["index"] == index]
    return f" dev {names[0] if names else index}" if index else ""


# --- 6. files --------------------------------------------------------------------------------


def remove_files(args, known: Known, report: Report) -> None:
    import glob

    for name in (PLUGIN_NAME, FALLBACK_NAME):  # the executable, a native one's fallback
        launcher = os.path.join(args.bin_dir, name)
        if os.path.lexists(launcher):
            if is_pycni_launcher(launcher):
                _unlink(launcher, report)
            else:
                report.kept(f"{launcher}: not written by pycnictl install")
    _unlink_all(glob.glob(os.path.join(glob.escape(args.bin_dir), TMP_PREFIX + "*")), report)
    for path in known.conflists:
        _unlink(path, report)
    conflist = os.path.join(args.conf_dir, CONFLIST_NAME)
    if os.path.lexists(conflist) and conflist not in known.conflists:
        report.kept(f"{conflist}: not a pycni config")
    _unlink_all(glob.glob(os.path.join(glob.escape(args.conf_dir), TMP_PREFIX + "*")), report)
    if known.subnet_env:  # written by the agent: PYCNI_ lines
        _unlink(known.subnet_file, report)
    elif os.path.lexists(known.subnet_file):
        report.kept(f"{known.subnet_file}: not a pycni subnet.env")
    # The agent's socket(s), with the temporary names they are bound under; the run dir
    # itself once empty (a socket elsewhere leaves its directory alone).
    socket_dirs: dict[str, set[str]] = {os.path.normpath(args.run_dir): set()}
    for sock in known.sockets:
        socket_dirs.setdefault(os.path.normpath(os.path.dirname(sock)), set()).add(
            os.path.basename(sock)
        )
    for directory, socks in socket_dirs.items():
        if directory == os.path.normpath(args.run_dir):
            remove_own_dir(directory, tuple(socks), report, tmp=tuple(f"{s}." for s in socks))
        else:
            for name in sorted(socks):
                if _is_socket(os.path.join(directory, name)):
                    _unlink(os.path.join(directory, name), report)
    for data_dir in known.data_dirs:
        bpf = os.path.join(data_dir, "bpf")  # the agent's compiled fast path
        objects = glob.glob(os.path.join(glob.escape(bpf), "fastpath-*.o*"))
        remove_own_dir(bpf, tuple(os.path.basename(o) for o in objects), report)
        remove_own_dir(data_dir, DATA_FILES, report)


def remove_own_dir(
    directory: str, names: tuple[str, ...], report: Report, tmp: tuple[str, ...] = ()
) -> None:
    """Remove pycni's files in `directory`, and the directory if nothing else is in it."""
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return
    except OSError as exc:
        report.failed(f"cannot read {directory}: {exc.strerror}")
        return
    others = []
    for entry in sorted(entries):
        path = os.path.join(directory, entry)
        if entry in names or entry.startswith((TMP_PREFIX, *tmp)):
            if entry.endswith(".sock") and not _is_socket(path):
                others.append(entry)
                continue
            _unlink(path, report)
        else:
            others.append(entry)
    if others:
        report.kept(f"{directory}: it holds files pycni did not make: {', '.join(others)}")
        return
    try:
        os.rmdir(directory)
        report.did(f"{directory}/")
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno == errno.EBUSY:  # a mount point (a hostPath in a pod): empty is enough
            report.kept(f"{directory}/: a mount point, emptied")
        else:
            report.failed(f"cannot remove {directory}: {exc.strerror}")


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def _unlink_all(paths: list[str], report: Report) -> None:
    for path in sorted(paths):
        _unlink(path, report)


def _unlink(path: str, report: Report) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        report.failed(f"cannot remove {path}: {exc.strerror}")
        return
    report.did(path)
