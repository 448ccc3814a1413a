"""The network config: decoded, validated and given defaults in one place.

The seed system's keys (`network`, `subnet`) keep working as written; the keys of the reference
bridge + host-local pair are accepted at the top level or, for the IPAM ones, under `ipam`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..ipam.ranges import RangeSet, parse_range, parse_ranges
from . import MAX_CONFIG_BYTES, versions
from . import result as cniresult
from .env import Request, validate_ifname
from .errors import DECODING_FAILURE, INVALID_NETWORK_CONFIG, CniError, config_error
from .result import Route

DEFAULT_BRIDGE = "cni0"
DEFAULT_DATA_DIR = "/var/lib/pycni"
DEFAULT_LOG_FILE = "/var/log/pycni.log"
LOG_LEVELS = ("debug", "info", "warning", "error")
_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.\-]*")
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
# Keys that may sit under "ipam" for operators coming from bridge + host-local.
_IPAM_KEYS = ("subnet", "ranges", "rangeStart", "rangeEnd", "gateway", "routes", "dataDir")
VALID_ATTACHMENTS = "cni.dev/valid-attachments"
# Traffic shaping limits: tc's tbf takes the rate as 32-bit bytes per second (pyroute2 sends no
# 64-bit rate) and the burst as 32-bit bytes; below one byte (per second) there is nothing left.
MIN_BANDWIDTH_BITS = 8
MAX_RATE_BITS = (2**32 - 1) * 8  # about 34.4 Gbit/s
MAX_BURST_BITS = (2**32 - 1) * 8  # 4 GiB
# A rate given without its burst gets what the rate carries in 100 ms, at least 64 KiB: a few
# full-size packets (GSO ones too) pass at once even at low rates, and TCP still sees the rate.
DEFAULT_BURST_SECONDS = 0.1
MIN_DEFAULT_BURST_BITS = 64 * 1024 * 8


@dataclass(frozen=True)
class Shaping:
    """One direction's token bucket: rate in bits per second, burst in bits."""

    rate: int
    burst: int


@dataclass(frozen=True)
class Bandwidth:
    """Capability `bandwidth`: ingress is traffic to the pod, egress traffic from it."""

    ingress: Shaping | None = None
    egress: Shaping | None = None


PORT_PROTOCOLS = ("tcp", "udp")


@dataclass(frozen=True)
class PortMapping:
    """Capability `portMappings`: `host_port` on the node forwarded to `container_port` in the
    pod. `host_ip` None: every local address of every family the pod has; an unspecified
    address (0.0.0.0, ::) every local address of that family only; else that address only."""

    host_port: int
    container_port: int
    protocol: str = "tcp"
    host_ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None

    def claims(self, families: set[int]) -> set[tuple[int, str]]:
        """The (family, host address) pairs this mapping takes on a node for a pod with
        addresses of `families`; "" stands for every address of the family."""
        if self.host_ip is None:
            return {(f, "") for f in families}
        if self.host_ip.version not in families:
            return set()
        return {(self.host_ip.version, "" if self.host_ip.is_unspecified else str(self.host_ip))}


def port_mappings_conflict(a: set[tuple[int, str]], b: set[tuple[int, str]]) -> bool:
    """Whether two claims (PortMapping.claims, same protocol and port) overlap."""
    return any(fa == fb and (ha == "" or hb == "" or ha == hb) for fa, ha in a for fb, hb in b)


@dataclass
class NetConf:
    cni_version: str
    name: str
    type: str
    bridge: str = DEFAULT_BRIDGE
    range_sets: list[RangeSet] = field(default_factory=list)
    cluster_cidrs: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    mtu: int | None = None
    is_default_gateway: bool = True
    ip_masq: bool = False
    hairpin_mode: bool = True
    data_dir: str = DEFAULT_DATA_DIR
    dns: dict[str, Any] = field(default_factory=dict)
    log_file: str = DEFAULT_LOG_FILE
    log_level: str = "info"
    agent_socket: str = ""
    requested_ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = field(default_factory=list)
    mac: str | None = None
    bandwidth: Bandwidth | None = None
    port_mappings: list[PortMapping] = field(default_factory=list)
    prev_result: cniresult.Result | None = None
    valid_attachments: set[tuple[str, str]] | None = None
    disable_check: bool = False
    disable_gc: bool = False
    # Set when DEL proceeds on a config that failed validation: what was wrong with it.
    config_problem: str = ""
    raw: dict[str, Any] = field(default_factory=dict)


def decode(stdin: bytes) -> dict:
    """Bytes from stdin to a JSON object, or code 6."""
    if len(stdin) > MAX_CONFIG_BYTES:
        raise CniError(DECODING_FAILURE, f"network config is larger than {MAX_CONFIG_BYTES} bytes")
    try:
        conf = json.loads(stdin)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # or nested too deep
        raise CniError(
            DECODING_FAILURE, f"network config on stdin is not valid JSON: {exc}"
        ) from None
    if not isinstance(conf, dict):
        raise CniError(DECODING_FAILURE, "network config on stdin must be a JSON object")
    return conf


def parse(conf: dict, request: Request) -> NetConf:
    version = versions.from_config(conf)
    nc = NetConf(cni_version=version, name=_name(conf), type=_opt(conf, "type", str, "pycni"))
    nc.raw = conf
    ipam = _ipam_section(conf)

    def pick(key: str) -> Any:
        return conf[key] if key in conf else ipam.get(key)

    nc.bridge = _opt(conf, "bridge", str, DEFAULT_BRIDGE)
    try:
        validate_ifname(nc.bridge, "bridge")
    except CniError as exc:
        raise config_error("bridge", exc.msg.removeprefix("bridge ")) from None
    nc.range_sets = _range_sets(conf, pick)
    nc.cluster_cidrs = _cluster_cidrs(conf.get("network"))
    nc.routes = _routes(pick("routes"), "routes")
    nc.mtu = _mtu(conf.get("mtu"), nc.range_sets)
    nc.is_default_gateway = _opt(conf, "isDefaultGateway", bool, True)
    nc.ip_masq = _opt(conf, "ipMasq", bool, False)
    # On unless turned off: with kube-proxy and br_netfilter, a pod reaching a Service whose
    # endpoint is the pod itself gets its own frame back through the port it came in by, which
    # a bridge port without hairpin mode drops (kubelet's hairpin-veth mode expects it on).
    nc.hairpin_mode = _opt(conf, "hairpinMode", bool, True)
    nc.data_dir = _abs_path(pick("dataDir"), "dataDir", DEFAULT_DATA_DIR)
    nc.log_file = _abs_path(conf.get("logFile"), "logFile", DEFAULT_LOG_FILE, allow_empty=True)
    # Read by the thin executable before anything else; validated here for a clear error.
    nc.agent_socket = _abs_path(conf.get("agentSocket"), "agentSocket", "", allow_empty=True)
    nc.log_level = _opt(conf, "logLevel", str, "info").lower()
    if nc.log_level not in LOG_LEVELS:
        raise config_error("logLevel", f"must be one of {', '.join(LOG_LEVELS)}")
    nc.dns = _dns(conf.get("dns"))
    nc.disable_check = _opt(conf, "disableCheck", bool, False)
    nc.disable_gc = _opt(conf, "disableGC", bool, False)
    nc.requested_ips, nc.mac = _requests(conf, request)
    nc.bandwidth = _bandwidth(conf)
    nc.port_mappings = _port_mappings(conf, {rs.family for rs in nc.range_sets})
    if "prevResult" in conf and conf["prevResult"] is not None:
        try:
            nc.prev_result = cniresult.parse(conf["prevResult"], version)
        except CniError:
            # DEL never reads prevResult: a damaged one must not block the cleanup.
            if request.command != "DEL":
                raise
    if conf.get(VALID_ATTACHMENTS) is not None:
        nc.valid_attachments = _valid_attachments(conf[VALID_ATTACHMENTS])
    return nc


def parse_for_delete(conf: dict, request: Request) -> NetConf:
    """DEL must clean up even when the config no longer validates (say an operator edited the
    subnet away): it needs only the network name and where the state lives."""
    try:
        return parse(conf, request)
    except CniError as exc:
        if exc.code != INVALID_NETWORK_CONFIG:
            raise
        nc = NetConf(cni_version=versions.from_config(conf), name=_name(conf), type="pycni")
        ipam = conf.get("ipam") if isinstance(conf.get("ipam"), dict) else {}
        try:
            nc.data_dir = _abs_path(
                conf.get("dataDir", ipam.get("dataDir")), "dataDir", DEFAULT_DATA_DIR
            )
            nc.log_file = _abs_path(
                conf.get("logFile"), "logFile", DEFAULT_LOG_FILE, allow_empty=True
            )
        except CniError:
            raise exc from None
        nc.raw = conf
        nc.config_problem = exc.msg
        return nc


def _name(conf: dict) -> str:
    name = conf.get("name")
    if not isinstance(name, str) or not name:
        raise config_error("name", "is required and must be a non-empty string")
    if len(name) > 128 or not _NAME.fullmatch(name):
        raise config_error(
            "name",
            f"{name[:80]!r} must start with a letter or digit and use only "
            "letters, digits, '_', '.' and '-' (at most 128)",
        )
    return name


def _opt(conf: dict, key: str, kind: type, default: Any) -> Any:
    if key not in conf or conf[key] is None:
        return default
    value = conf[key]
    # bool is an int in Python; a config saying "mtu": true is still wrong.
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise config_error(key, f"must be a {_kind_name(kind)}, not {type(value).__name__}")
    return value


def _kind_name(kind: type) -> str:
    return {
        str: "string",
        bool: "boolean (true or false)",
        int: "integer",
        list: "list",
        dict: "JSON object",
    }.get(kind, kind.__name__)


def _ipam_section(conf: dict) -> dict:
    ipam = _opt(conf, "ipam", dict, {})
    kind = ipam.get("type", "")
    if kind not in ("", "pycni", "host-local"):
        raise config_error(
            "ipam.type",
            f"{kind!r} is not supported: pycni has its own IPAM; put subnet or "
            "ranges at the top level (or under ipam with type host-local)",
        )
    return ipam


def _range_sets(conf: dict, pick) -> list[RangeSet]:
    subnet, ranges = pick("subnet"), pick("ranges")
    if subnet is not None and ranges is not None:
        raise config_error("subnet", "give either subnet or ranges, not both")
    if ranges is not None:
        sets = parse_ranges(ranges, "ranges")
        for key in ("rangeStart", "rangeEnd", "gateway"):
            if pick(key) is not None:
                raise config_error(key, "belongs inside a range when ranges is used")
        return sets
    if subnet is None:
        raise config_error(
            "subnet", "is required (this node's pod CIDR, e.g. 10.244.1.0/24), or give ranges"
        )
    obj = {"subnet": subnet}
    for key in ("rangeStart", "rangeEnd", "gateway"):
        if pick(key) is not None:
            obj[key] = pick(key)
    # Top-level keys are reported by their own names ("subnet", "gateway"): empty prefix.
    return [RangeSet((parse_range(obj, ""),))]


def _cluster_cidrs(value: Any) -> list:
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if not isinstance(item, str):
            raise config_error("network", "must be a CIDR string (the cluster CIDR) or a list")
        try:
            out.append(ipaddress.ip_network(item))
        except ValueError as exc:
            raise config_error("network", str(exc)) from None
    return out


def _routes(value: Any, where: str) -> list[Route]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise config_error(where, 'must be a list of {"dst": CIDR, "gw": address}')
    out = []
    for i, item in enumerate(value):
        key = f"{where}[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("dst"), str):
            raise config_error(key, 'must be an object with a "dst" CIDR string')
        try:
            dst = ipaddress.ip_network(item["dst"])
        except ValueError as exc:
            raise config_error(f"{key}.dst", str(exc)) from None
        gw = None
        if item.get("gw") is not None:
            try:
                # Only strings: ip_address() would read 5 or true as 0.0.0.5 or 0.0.0.1.
                if not isinstance(item["gw"], str):
                    raise TypeError
                gw = ipaddress.ip_address(item["gw"])
            except (ValueError, TypeError):
                raise config_error(f"{key}.gw", f"{item['gw']!r} is not an IP address") from None
            if gw.version != dst.version:
                raise config_error(f"{key}.gw", "is not of the same IP family as dst")
        extras = {k: item[k] for k in cniresult.ROUTE_EXTRAS if k in item}
        for k, v in extras.items():  # netlink takes them as integers
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**32:
                raise config_error(f"{key}.{k}", f"{v!r} is not an integer in 0..2^32-1")
        out.append(Route(dst, gw, extras))
    return out


def _mtu(value: Any, range_sets: list[RangeSet]) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise config_error("mtu", "must be an integer")
    low = 1280 if any(rs.family == 6 for rs in range_sets) else 576
    if not low <= value <= 65535:
        raise config_error("mtu", f"{value} is outside {low}..65535")
    return value


def _abs_path(value: Any, key: str, default: str, allow_empty: bool = False) -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise config_error(key, "must be a string path")
    if allow_empty and value == "":
        return ""
    if not os.path.isabs(value) or "\0" in value or ".." in value.split("/"):
        raise config_error(key, f"{value[:200]!r} must be an absolute path without '..'")
    try:
        os.fsencode(value)
    except UnicodeEncodeError:  # a lone surrogate escaped in the JSON ("\ud800")
        raise config_error(key, f"{value[:200]!r} is not valid UTF-8") from None
    return value


def _dns(value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise config_error("dns", "must be an object with nameservers, domain, search, options")
    out: dict[str, Any] = {}
    for key in ("nameservers", "search", "options"):
        if key in value:
            items = value[key]
            if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
                raise config_error(f"dns.{key}", "must be a list of strings")
            if key == "nameservers":
                for x in items:
                    try:
                        ipaddress.ip_address(x)
                    except ValueError:
                        raise config_error(
                            "dns.nameservers", f"{x!r} is not an IP address"
                        ) from None
            out[key] = list(items)
    if "domain" in value:
        if not isinstance(value["domain"], str):
            raise config_error("dns.domain", "must be a string")
        out["domain"] = value["domain"]
    return out


def _requests(conf: dict, request: Request) -> tuple[list, str | None]:
    """Addresses and MAC asked for through runtimeConfig, args.cni or CNI_ARGS."""
    rc = _opt(conf, "runtimeConfig", dict, {})
    args = _opt(conf, "args", dict, {})
    cni_args = args.get("cni") if isinstance(args.get("cni"), dict) else {}
    raw: list[tuple[str, Any]] = []
    sources = (("runtimeConfig.ips", rc.get("ips")), ("args.cni.ips", cni_args.get("ips")))
    for where, items in sources:
        if items is None:
            continue
        if not isinstance(items, list):
            raise config_error(where, "must be a list of IP addresses")
        raw.extend((where, x) for x in items)
    if request.args.get("IP"):
        raw.extend(("CNI_ARGS IP", x) for x in request.args["IP"].split(","))
    ips: list = []
    for where, item in raw:
        if not isinstance(item, str):
            raise config_error(where, f"{item!r} is not an IP address string")
        try:
            # runtimeConfig.ips may carry a prefix ("10.244.1.5/24"); only the address matters.
            ip = ipaddress.ip_interface(item.strip()).ip
        except ValueError:
            raise config_error(where, f"{item!r} is not an IP address") from None
        if ip not in ips:
            ips.append(ip)
    mac = rc.get("mac", cni_args.get("mac"))
    if mac is not None:
        if not isinstance(mac, str) or not _MAC.fullmatch(mac):
            raise config_error(
                "runtimeConfig.mac", f"{mac!r} is not a MAC address like 0a:58:0a:f4:01:02"
            )
        if int(mac[:2], 16) & 1:
            raise config_error("runtimeConfig.mac", f"{mac} is a multicast address")
        mac = mac.lower()
    return ips, mac


def _valid_attachments(value: Any) -> set[tuple[str, str]]:
    if not isinstance(value, list):
        raise config_error(VALID_ATTACHMENTS, "must be a list of {containerID, ifname}")
    out = set()
    for i, item in enumerate(value):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("containerID"), str)
            or not isinstance(item.get("ifname"), str)
        ):
            raise config_error(f"{VALID_ATTACHMENTS}[{i}]", "needs string containerID and ifname")
        out.add((item["containerID"], item["ifname"]))
    return out


def _bandwidth(conf: dict) -> Bandwidth | None:
    """Shaping from runtimeConfig.bandwidth (kubelet / containerd fill it from the pod's
    kubernetes.io/ingress-bandwidth and egress-bandwidth annotations) and from the same keys at
    the top level (a static limit); per direction, the runtime's wins. None: no shaping."""
    rc = _opt(conf, "runtimeConfig", dict, {})
    runtime = rc.get("bandwidth")
    if runtime is not None and not isinstance(runtime, dict):
        raise config_error(
            "runtimeConfig.bandwidth",
            "must be a JSON object with ingressRate, ingressBurst, egressRate, egressBurst",
        )
    static = {d: _shaping(conf, "", d) for d in ("ingress", "egress")}
    given = {
        d: _shaping(runtime or {}, "runtimeConfig.bandwidth.", d) for d in ("ingress", "egress")
    }
    out = Bandwidth(
        ingress=given["ingress"] or static["ingress"], egress=given["egress"] or static["egress"]
    )
    return out if out.ingress or out.egress else None


def _shaping(obj: dict, where: str, direction: str) -> Shaping | None:
    """One direction; 0 or absent is "not limited" (containerd sends zeros for the direction
    without an annotation)."""
    for key in ("unshapedSubnets", "shapedSubnets"):
        if obj.get(key):
            raise config_error(
                f"{where}{key}", "is not supported: pycni shapes all of a pod's traffic"
            )
    rate_key, rate = _bandwidth_value(obj, where, f"{direction}Rate")
    burst_key, burst = _bandwidth_value(obj, where, f"{direction}Burst")
    if not rate:
        if burst:
            raise config_error(
                burst_key, f"is set but {direction}Rate is not: a burst needs a rate"
            )
        return None
    if not MIN_BANDWIDTH_BITS <= rate <= MAX_RATE_BITS:
        raise config_error(
            rate_key,
            f"{rate} bits/s is outside {MIN_BANDWIDTH_BITS}.."
            f"{MAX_RATE_BITS} (tc's tbf takes at most 2^32-1 bytes/s)",
        )
    if not burst:
        burst = max(int(rate * DEFAULT_BURST_SECONDS), MIN_DEFAULT_BURST_BITS)
    elif not MIN_BANDWIDTH_BITS <= burst <= MAX_BURST_BITS:
        raise config_error(
            burst_key,
            f"{burst} bits is outside {MIN_BANDWIDTH_BITS}.."
            f"{MAX_BURST_BITS} (tc's tbf takes at most 2^32-1 bytes)",
        )
    return Shaping(rate=rate, burst=burst)


def _bandwidth_value(obj: dict, where: str, key: str) -> tuple[str, int]:
    """A rate or burst under its spelling or containerd's capitalised one ("IngressRate"):
    (the key as given, for messages; the value, 0 if absent)."""
    found = [k for k in (key, key[0].upper() + key[1:]) if obj.get(k) is not None]
    if not found:
        return f"{where}{key}", 0
    if len(found) == 2 and obj[found[0]] != obj[found[1]]:
        raise config_error(
            f"{where}{key}", f"is given twice, as {found[0]} and {found[1]}, with different values"
        )
    name, value = f"{where}{found[0]}", obj[found[0]]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise config_error(
            name,
            f"{value!r} is not a non-negative integer "
            f"({'bits/s' if key.endswith('Rate') else 'bits'})",
        )
    return name, value


_PORT_MAPPING_KEYS = {
    "hostport": "hostPort",
    "containerport": "containerPort",
    "protocol": "protocol",
    "hostip": "hostIP",
}


def _port_mappings(conf: dict, families: set[int]) -> list[PortMapping]:
    """runtimeConfig.portMappings; keys as podman spells them (hostPort) or containerd
    (HostPort). Exact repeats are dropped; mappings taking the same port twice are refused."""
    where = "runtimeConfig.portMappings"
    items = _opt(conf, "runtimeConfig", dict, {}).get("portMappings")
    if items is None:
        return []
    if not isinstance(items, list):
        raise config_error(where, "must be a list of {hostPort, containerPort, protocol, hostIP}")
    out: list[PortMapping] = []
    for i, item in enumerate(items):
        mapping = _port_mapping(item, f"{where}[{i}]", families)
        if mapping in out:
            continue
        for j, other in enumerate(out):
            if (other.protocol, other.host_port) == (
                mapping.protocol,
                mapping.host_port,
            ) and port_mappings_conflict(other.claims(families), mapping.claims(families)):
                raise config_error(
                    f"{where}[{i}]",
                    f"{mapping.protocol} port {mapping.host_port} is already mapped by entry {j}",
                )
        out.append(mapping)
    return out


def _port_mapping(item: Any, where: str, families: set[int]) -> PortMapping:
    if not isinstance(item, dict):
        raise config_error(where, "must be an object with hostPort and containerPort")
    given: dict[str, tuple[str, Any]] = {}
    for key, value in item.items():
        name = _PORT_MAPPING_KEYS.get(key.lower())
        if name is None or value is None:
            continue  # containerd and podman may add keys of their own
        if name in given and given[name][1] != value:
            raise config_error(
                f"{where}.{name}",
                f"is given twice, as {given[name][0]} and {key}, with different values",
            )
        given[name] = (key, value)
    ports = {}
    for name in ("hostPort", "containerPort"):
        key, value = given.get(name, (name, None))
        if value is None:
            raise config_error(f"{where}.{name}", "is required")
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
            raise config_error(f"{where}.{key}", f"{value!r} is not a port number 1..65535")
        ports[name] = value
    key, protocol = given.get("protocol", ("protocol", "tcp"))
    if not isinstance(protocol, str) or protocol.lower() not in PORT_PROTOCOLS:
        raise config_error(
            f"{where}.{key}", f"{protocol!r} is not supported: use {' or '.join(PORT_PROTOCOLS)}"
        )
    key, host = given.get("hostIP", ("hostIP", ""))
    host_ip = _host_ip(host, f"{where}.{key}", families)
    return PortMapping(ports["hostPort"], ports["containerPort"], protocol.lower(), host_ip)


def _host_ip(value: Any, where: str, families: set[int]):
    if not isinstance(value, str):
        raise config_error(where, f"{value!r} is not an IP address string")
    if value.strip() == "":
        return None
    try:
        ip = ipaddress.ip_address(value.strip())
    except ValueError:
        raise config_error(where, f"{value!r} is not an IP address") from None
    if ip.is_multicast:
        raise config_error(where, f"{ip} is a multicast address")
    if ip.version == 6 and ip.is_loopback:
        # IPv6 has no route_localnet: the kernel never routes ::1 to another host.
        raise config_error(
            where,
            "::1 cannot be forwarded to a pod (IPv6 has no "
            "route_localnet); use 127.0.0.1 or leave hostIP empty",
        )
    if ip.version not in families:
        raise config_error(
            where,
            f"{ip} is IPv{ip.version} but the pod gets no IPv{ip.version} address in this network",
        )
    return ip
