"""CNI results in one internal shape (1.1.0) and their conversion to and from every version.

0.1.0/0.2.0 carry one `ip4` and one `ip6` object; 0.3.x/0.4.0 carry `ips[]` with a `version`
field; 1.x drops `version`; 1.1.0 adds interface `mtu` and route attributes.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from . import versions
from .errors import DECODING_FAILURE, CniError

# Route attributes introduced in 1.1.0, carried through untouched.
ROUTE_EXTRAS = ("mtu", "advmss", "priority", "table", "scope")


@dataclass
class Interface:
    name: str
    mac: str = ""
    sandbox: str = ""
    mtu: int | None = None


@dataclass
class IPConfig:
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    gateway: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    interface: int | None = None

    @property
    def family(self) -> int:
        return self.address.version


@dataclass
class Route:
    dst: ipaddress.IPv4Network | ipaddress.IPv6Network
    gw: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result:
    interfaces: list[Interface] = field(default_factory=list)
    ips: list[IPConfig] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    dns: dict[str, Any] = field(default_factory=dict)

    def to_json(self, version: str) -> dict:
        if not versions.at_least(version, "0.3.0"):
            return self._to_legacy(version)
        out: dict[str, Any] = {"cniVersion": version}
        if self.interfaces:
            out["interfaces"] = [_interface_json(i, version) for i in self.interfaces]
        if self.ips:
            out["ips"] = [_ip_json(ip, version) for ip in self.ips]
        if self.routes:
            out["routes"] = [_route_json(r, version) for r in self.routes]
        if self.dns or not versions.at_least(version, "1.0.0"):
            # 1.0.0 results leave an empty dns out, as libcni's own types (and the reference
            # plugins since 1.1.1) write them; 0.x results always carried it.
            out["dns"] = dict(self.dns)
        return out

    def _to_legacy(self, version: str) -> dict:
        out: dict[str, Any] = {"cniVersion": version}
        for family, key in ((4, "ip4"), (6, "ip6")):
            ips = [ip for ip in self.ips if ip.family == family]
            if not ips:
                continue
            entry: dict[str, Any] = {"ip": str(ips[0].address)}
            if ips[0].gateway is not None:
                entry["gateway"] = str(ips[0].gateway)
            routes = [_route_json(r, version) for r in self.routes if r.dst.version == family]
            if routes:
                entry["routes"] = routes
            out[key] = entry
        out["dns"] = dict(self.dns)
        return out


def _interface_json(iface: Interface, version: str) -> dict:
    out: dict[str, Any] = {"name": iface.name}
    if iface.mac:
        out["mac"] = iface.mac
    if iface.mtu is not None and versions.at_least(version, "1.1.0"):
        out["mtu"] = iface.mtu
    if iface.sandbox:
        out["sandbox"] = iface.sandbox
    return out


def _ip_json(ip: IPConfig, version: str) -> dict:
    out: dict[str, Any] = {}
    if not versions.at_least(version, "1.0.0"):
        out["version"] = str(ip.family)
    out["address"] = str(ip.address)
    if ip.gateway is not None:
        out["gateway"] = str(ip.gateway)
    if ip.interface is not None:
        out["interface"] = ip.interface
    return out


def _route_json(route: Route, version: str) -> dict:
    out: dict[str, Any] = {"dst": str(route.dst)}
    if route.gw is not None:
        out["gw"] = str(route.gw)
    if versions.at_least(version, "1.1.0"):
        out.update(route.extras)
    return out


def parse(data: Any, version: str, where: str = "prevResult") -> Result:
    """Read a result written in `version` (e.g. a chained prevResult) into the internal shape."""
    if not isinstance(data, dict):
        raise _bad(where, "must be a JSON object")
    try:
        if not versions.at_least(version, "0.3.0"):
            return _parse_legacy(data)
        res = Result()
        for i, iface in enumerate(data.get("interfaces") or []):
            mtu = iface.get("mtu")
            res.interfaces.append(
                Interface(
                    name=_str(iface, "name", f"interfaces[{i}]"),
                    mac=iface.get("mac", "") or "",
                    sandbox=iface.get("sandbox", "") or "",
                    mtu=int(mtu) if mtu is not None else None,
                )
            )
        for ip in data.get("ips") or []:
            res.ips.append(
                IPConfig(
                    address=ipaddress.ip_interface(ip["address"]),
                    gateway=ipaddress.ip_address(ip["gateway"]) if ip.get("gateway") else None,
                    interface=ip.get("interface"),
                )
            )
        res.routes = [_parse_route(r) for r in data.get("routes") or []]
        res.dns = dict(data.get("dns") or {})
        return res
    except CniError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:  # inf mtu
        raise _bad(where, f"{type(exc).__name__}: {exc}") from None


def _parse_legacy(data: dict) -> Result:
    res = Result(dns=dict(data.get("dns") or {}))
    for key in ("ip4", "ip6"):
        entry = data.get(key)
        if not entry:
            continue
        res.ips.append(
            IPConfig(
                address=ipaddress.ip_interface(entry["ip"]),
                gateway=ipaddress.ip_address(entry["gateway"]) if entry.get("gateway") else None,
            )
        )
        res.routes.extend(_parse_route(r) for r in entry.get("routes") or [])
    return res


def _parse_route(r: dict) -> Route:
    return Route(
        dst=ipaddress.ip_network(r["dst"]),
        gw=ipaddress.ip_address(r["gw"]) if r.get("gw") else None,
        extras={k: r[k] for k in ROUTE_EXTRAS if k in r},
    )


def _str(obj: dict, key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise TypeError(f"{where}.{key} must be a string")
    return value


def _bad(where: str, problem: str) -> CniError:
    return CniError(DECODING_FAILURE, f"cannot decode {where}: {problem}")
