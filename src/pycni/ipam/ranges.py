"""Address ranges of a network: parsing, validation and round-robin candidate order.

Pure arithmetic, no I/O. Conventions follow the reference host-local IPAM plugin:
rangeStart defaults to network+1, rangeEnd to the v4 broadcast-1 (v6: last address),
gateway to network+1, and the gateway is never handed out.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import Any

from pycni.cni.errors import config_error

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


@dataclass(frozen=True)
class Range:
    subnet: Network
    range_start: Address
    range_end: Address
    gateway: Address | None

    def _reserved(self) -> set[Address]:
        out: set[Address] = {self.subnet.network_address}
        if self.subnet.version == 4:
            out.add(self.subnet.broadcast_address)
        if self.gateway is not None:
            out.add(self.gateway)
        return out

    def is_reserved(self, ip: Address) -> bool:
        return ip in self._reserved()

    def contains(self, ip: Address) -> bool:
        return ip.version == self.subnet.version and self.range_start <= ip <= self.range_end

    def capacity(self) -> int:
        size = int(self.range_end) - int(self.range_start) + 1
        return size - sum(1 for ip in self._reserved() if self.contains(ip))

    def candidates_from(self, start: int, stop: int) -> Iterator[Address]:
        """Allocatable addresses with start <= int(ip) < stop, lazily (ranges can be 2**64 big)."""
        reserved = self._reserved()
        make = IPv4Address if self.subnet.version == 4 else IPv6Address
        for n in range(max(start, int(self.range_start)), min(stop, int(self.range_end) + 1)):
            ip = make(n)
            if ip not in reserved:
                yield ip


@dataclass(frozen=True)
class RangeSet:
    ranges: tuple[Range, ...]

    def __post_init__(self) -> None:
        if not self.ranges:
            raise ValueError("a RangeSet needs at least one range")
        if len({r.subnet.version for r in self.ranges}) != 1:
            raise ValueError("all ranges of a RangeSet must be of one address family")

    @property
    def family(self) -> int:
        return self.ranges[0].subnet.version

    @property
    def key(self) -> str:
        return ",".join(f"{r.subnet}:{r.range_start}-{r.range_end}" for r in self.ranges)

    def find(self, ip: Address) -> Range | None:
        return next((r for r in self.ranges if r.contains(ip)), None)

    def capacity(self) -> int:
        return sum(r.capacity() for r in self.ranges)

    def candidates(self, after: Address | None) -> Iterator[tuple[Range, Address]]:
        """Every allocatable address once, starting just after `after` and wrapping around.

        Starting after the last handed-out address (as host-local does) keeps a just-freed
        address out of circulation as long as possible, so a stale peer cache or conntrack
        entry for it is unlikely to hit a new pod.
        """
        n = len(self.ranges)
        first = self.find(after) if after is not None else None
        if first is None or after is None:
            for r in self.ranges:
                for ip in r.candidates_from(0, 1 << 128):
                    yield r, ip
            return
        i = self.ranges.index(first)
        pivot = int(after) + 1
        yield from ((first, ip) for ip in first.candidates_from(pivot, 1 << 128))
        for k in range(1, n):
            r = self.ranges[(i + k) % n]
            yield from ((r, ip) for ip in r.candidates_from(0, 1 << 128))
        yield from ((first, ip) for ip in first.candidates_from(0, pivot))


def _parse_ip(obj: dict, key: str, where: str, subnet: Network) -> Address | None:
    if key not in obj or obj[key] is None:
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise config_error(f"{where}.{key}", f"must be a string, not {type(value).__name__}")
    try:
        ip = ipaddress.ip_address(value.strip())
    except ValueError:
        raise config_error(f"{where}.{key}", f"{value!r} is not an IP address") from None
    if ip.version != subnet.version:
        raise config_error(
            f"{where}.{key}",
            f"{value} is IPv{ip.version} but subnet {subnet} is IPv{subnet.version}",
        )
    if ip not in subnet:
        raise config_error(f"{where}.{key}", f"{value} is outside subnet {subnet}")
    return ip


def _special(ip: Address, subnet: Network) -> str | None:
    """Why `ip` can never be a pod or gateway address in `subnet`, or None."""
    if ip == subnet.network_address:
        return "the network address"
    if subnet.version == 4 and ip == subnet.broadcast_address:
        return "the broadcast address"
    return None


def parse_range(obj: dict, where: str) -> Range:
    if not isinstance(obj, dict):
        raise config_error(where, f"must be an object, not {type(obj).__name__}")
    raw = obj.get("subnet")
    if raw is None:
        raise config_error(f"{where}.subnet", "is required")
    if not isinstance(raw, str):
        raise config_error(f"{where}.subnet", f"must be a string, not {type(raw).__name__}")
    try:
        subnet = ipaddress.ip_network(raw.strip(), strict=False)
    except ValueError:
        raise config_error(f"{where}.subnet", f"{raw!r} is not a CIDR subnet") from None
    if "/" not in raw:
        raise config_error(f"{where}.subnet", f"{raw!r} has no prefix length (e.g. {subnet})")
    if ipaddress.ip_interface(raw.strip()).ip != subnet.network_address:
        raise config_error(f"{where}.subnet", f"{raw} has host bits set; did you mean {subnet}?")
    if subnet.prefixlen > subnet.max_prefixlen - 2:
        raise config_error(
            f"{where}.subnet",
            f"{subnet} is too small: needs room for the network, gateway and at least one pod",
        )

    last = subnet.broadcast_address - 1 if subnet.version == 4 else subnet.broadcast_address
    start = _parse_ip(obj, "rangeStart", where, subnet)
    end = _parse_ip(obj, "rangeEnd", where, subnet)
    gateway = _parse_ip(obj, "gateway", where, subnet)
    start = subnet.network_address + 1 if start is None else start
    end = last if end is None else end
    gateway = subnet.network_address + 1 if gateway is None else gateway
    for key, ip in (("rangeStart", start), ("rangeEnd", end), ("gateway", gateway)):
        why = _special(ip, subnet)
        if why:
            raise config_error(f"{where}.{key}", f"{ip} is {why} of {subnet}")
    if start > end:
        raise config_error(f"{where}.rangeStart", f"{start} is after rangeEnd {end}")
    r = Range(subnet, start, end, gateway)
    if r.capacity() == 0:
        raise config_error(where, f"range {start}-{end} has no allocatable address")
    return r


def parse_range_set(obj: Any, where: str) -> RangeSet:
    if not isinstance(obj, list) or not obj:
        raise config_error(where, "must be a non-empty list of ranges")
    ranges = [parse_range(item, f"{where}[{i}]") for i, item in enumerate(obj)]
    if len({r.subnet.version for r in ranges}) > 1:
        raise config_error(where, "mixes IPv4 and IPv6 ranges; use one range set per family")
    _check_overlap(ranges, where)
    return RangeSet(tuple(ranges))


def parse_ranges(obj: Any, where: str = "ranges") -> list[RangeSet]:
    if not isinstance(obj, list) or not obj:
        raise config_error(where, "must be a non-empty list of range sets")
    sets = [parse_range_set(item, f"{where}[{i}]") for i, item in enumerate(obj)]
    _check_overlap([r for s in sets for r in s.ranges], where)
    for family in (4, 6):
        if sum(1 for s in sets if s.family == family) > 1:
            raise config_error(where, f"has more than one IPv{family} range set")
    return sets


def _check_overlap(ranges: list[Range], where: str) -> None:
    for i, a in enumerate(ranges):
        for b in ranges[i + 1 :]:
            if a.subnet.version == b.subnet.version and a.subnet.overlaps(b.subnet):
                raise config_error(where, f"subnets {a.subnet} and {b.subnet} overlap")
