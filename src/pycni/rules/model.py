"""The packet rules pycni wants on a node, as data: what to masquerade, which forwarded
traffic to accept, which hostPorts to DNAT. No backend and no command here: nft.py and
iptables.py render a RuleSet for their backend and read it back, sync.py installs it.

pycni keeps ONE rule set per node, in objects it owns, and replaces it atomically. A new kind
of rule is a new dataclass here and a new RuleSet field, which each backend then renders and
reads back.

Never per-pod chains: a node masquerades its pod subnet(s) for every destination except the
excluded ones (the subnet itself, the cluster CIDR, multicast, configured extras).

HostPorts reaching 127.0.0.1 need ``route_localnet`` on the bridge (set by the core), which
would also let pods send to the node's 127.0.0.0/8: the input guard drops such new connections
arriving on any interface but ``lo`` (the fix kube-proxy made for CVE-2020-8558).
"""

from __future__ import annotations

import hashlib
import ipaddress
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Interface,
    IPv6Network,
)

Network = IPv4Network | IPv6Network
Address = IPv4Address | IPv6Address
Interface = IPv4Interface | IPv6Interface


PROTOCOLS = ("tcp", "udp")
# The packet mark bit pycni's hostPort DNATs set, so that the hairpin masquerade applies to
# traffic pycni itself DNATed to a hostPort and to nothing else DNATed (kube-proxy's Service
# traffic between pods of one node must keep the client's address). Not kube-proxy's
# 0x4000/0x8000 nor portmap's 0x2000 (which masquerades whatever carries it).
HAIRPIN_MARK = 0x1000
LOCALNET = IPv4Network("127.0.0.0/8")
# IPv6 has no route_localnet: traffic to ::1 DNATed to a pod could never leave, so it is left
# alone (to the node's own listeners).
IPV6_LOOPBACK = IPv6Address("::1")

MULTICAST: dict[int, Network] = {
    4: IPv4Network("224.0.0.0/4"),
    6: IPv6Network("ff00::/8"),
}


def _net(value: object) -> Network:
    if isinstance(value, IPv4Network | IPv6Network):
        return value
    try:
        return ipaddress.ip_network(value)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"packet rules: invalid network {value!r}: {exc}") from None


@dataclass(frozen=True)
class MasqRule:
    """Masquerade traffic from ``source`` unless its destination is in ``exclude``.

    Strings are accepted and converted; ``exclude`` may be any iterable. Every exclusion must
    be of the source's address family. Multicast is always excluded at render time.
    Rules are ordered (IPv4 before IPv6, then by source and exclusions), so a dual-stack list
    sorts; dataclass's order=True would raise TypeError comparing IPv4 with IPv6 networks.
    """

    source: Network
    exclude: tuple[Network, ...] = ()

    def __post_init__(self) -> None:
        source = _net(self.source)
        exclude = tuple(_net(e) for e in self.exclude)
        for e in exclude:
            if e.version != source.version:
                raise ValueError(
                    f"masquerade rule for {source}: exclusion {e} is not IPv{source.version}"
                )
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "exclude", exclude)

    def _key(self) -> tuple:
        return (self.version, self.source, tuple((e.version, e) for e in self.exclude))

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, MasqRule):
            return NotImplemented
        return self._key() < other._key()

    def __le__(self, other: object) -> bool:
        if not isinstance(other, MasqRule):
            return NotImplemented
        return self._key() <= other._key()

    def __gt__(self, other: object) -> bool:
        if not isinstance(other, MasqRule):
            return NotImplemented
        return self._key() > other._key()

    def __ge__(self, other: object) -> bool:
        if not isinstance(other, MasqRule):
            return NotImplemented
        return self._key() >= other._key()

    @property
    def version(self) -> int:
        return self.source.version

    def canonical(self) -> MasqRule:
        """The same rule with exclusions collapsed, sorted and multicast included."""
        nets = set(self.exclude)
        nets.add(MULTICAST[self.version])
        return MasqRule(self.source, tuple(ipaddress.collapse_addresses(nets)))


def normalize(rules: Iterable[MasqRule]) -> list[MasqRule]:
    """Canonical, deduplicated, sorted form of masquerade ``rules``.

    Two rules for the same source with different exclusions are ambiguous: ValueError.
    """
    by_source: dict[Network, MasqRule] = {}
    for rule in rules:
        canon = rule.canonical()
        prev = by_source.get(canon.source)
        if prev is not None and prev != canon:
            raise ValueError(f"conflicting masquerade rules for source {canon.source}")
        by_source[canon.source] = canon
    return sorted(by_source.values())


def collapse(nets: Iterable[object]) -> tuple[Network, ...]:
    """Networks deduplicated and collapsed, IPv4 first then IPv6, each sorted.

    Per family because ipaddress.collapse_addresses refuses a mix.
    """
    parsed = [_net(n) for n in nets]
    out: list[Network] = []
    for version in (4, 6):
        out.extend(ipaddress.collapse_addresses(n for n in parsed if n.version == version))
    return tuple(out)


def _addr(value: object, what: str) -> Address:
    if isinstance(value, IPv4Address | IPv6Address):
        return value
    try:
        return ipaddress.ip_address(value)  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(f"packet rules: {what} {value!r} is not an IP address") from None


def _port(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
        raise ValueError(f"packet rules: {what} {value!r} is not a port 1..65535")
    return value


@dataclass(frozen=True)
class HostPort:
    """DNAT ``protocol`` traffic for ``host_port`` on a local address of the node to
    ``pod_ip``:``pod_port``.

    ``host_ip`` None: any local address of the pod address's family (an unspecified address,
    0.0.0.0 or ::, is stored as None); else only that address, which must be of that family.
    Strings are accepted for addresses.
    """

    protocol: str
    host_port: int
    pod_ip: Address
    pod_port: int
    host_ip: Address | None = None

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"packet rules: protocol {self.protocol!r} is not one of {PROTOCOLS}")
        _port(self.host_port, "host port")
        _port(self.pod_port, "pod port")
        pod_ip = _addr(self.pod_ip, "pod address")
        host_ip = None if self.host_ip is None else _addr(self.host_ip, "host address")
        if host_ip is not None and host_ip.version != pod_ip.version:
            raise ValueError(
                f"packet rules: host address {host_ip} is not IPv{pod_ip.version} "
                f"like the pod address {pod_ip}"
            )
        if host_ip is not None and host_ip.is_unspecified:
            host_ip = None
        object.__setattr__(self, "pod_ip", pod_ip)
        object.__setattr__(self, "host_ip", host_ip)

    @property
    def version(self) -> int:
        return self.pod_ip.version

    def sort_key(self) -> tuple:
        # Specific host addresses before "any": should both exist, the narrower one wins.
        return (
            self.version,
            self.protocol,
            self.host_port,
            self.host_ip is None,
            int(self.host_ip or 0),
            int(self.pod_ip),
            self.pod_port,
        )


def _interface(value: object) -> Interface:
    if isinstance(value, IPv4Interface | IPv6Interface):
        return value
    try:
        return ipaddress.ip_interface(value)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"packet rules: invalid pod address {value!r}: {exc}") from None


def _interface_key(iface: Interface) -> tuple:
    return (
        iface.version,
        int(iface.network.network_address),
        iface.network.prefixlen,
        int(iface.ip),
    )


@dataclass(frozen=True, eq=False)
class PolicyFragment:
    """NetworkPolicy's part of the table: nft statements (rules/policy.py renders them) and
    their digest. Fragments compare by digest, so one read back from the kernel (which keeps
    only the digest, in a comment) equals the one that was installed."""

    statements: tuple[str, ...] = ()
    digest: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "statements", tuple(self.statements))
        if self.statements and not self.digest:
            text = "\n".join(self.statements).encode()
            object.__setattr__(self, "digest", hashlib.sha256(text).hexdigest()[:32])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PolicyFragment) and other.digest == self.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def __bool__(self) -> bool:
        return bool(self.digest)


@dataclass(frozen=True)
class RuleSet:
    """Everything pycni wants in its table, normalized on construction (so two sets meaning
    the same compare, render and digest equal whatever order or form they were given in).

    ``masquerade``: per pod subnet, what to masquerade (MasqRule). ``forward``: networks (the
    cluster CIDRs) whose forwarded traffic is accepted, as source or as destination.
    ``hostports``: DNATs from the node's addresses to pods (HostPort); while there are any,
    forwarded DNATed traffic is accepted, and for IPv4 localhost traffic to them masqueraded and
    127.0.0.0/8 guarded. ``hairpin``: pod addresses with their prefix (e.g. 10.244.1.2/24)
    whose hostPort traffic from their own subnet is masqueraded, so a pod reaching itself or a
    neighbour through a hostPort gets the answer back through the node (needed without
    br_netfilter, where the neighbour would answer straight over the bridge). Only traffic a
    hostPort DNAT marked (HAIRPIN_MARK): other DNATed traffic to the pod, such as a Service's
    through kube-proxy, keeps its source. Any iterables
    are accepted (networks and addresses also as strings) and stored as sorted tuples.
    ``policy``: the node's NetworkPolicy rules (PolicyFragment). ``stores``: the data dirs
    (IPAM stores) whose wants these are: the node's one set is merged from every store that
    wants rules (see merge), and the kernel keeps their list beside the rules, so that a store
    syncing later finds the others. Bookkeeping, not rules: alone it is no table. An empty set
    means "no table at all".
    """

    masquerade: tuple[MasqRule, ...] = ()
    forward: tuple[Network, ...] = ()
    hostports: tuple[HostPort, ...] = ()
    hairpin: tuple[Interface, ...] = ()
    policy: PolicyFragment = PolicyFragment()
    stores: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stores", tuple(sorted(set(self.stores))))
        object.__setattr__(self, "masquerade", tuple(normalize(self.masquerade)))
        object.__setattr__(self, "forward", collapse(self.forward))
        object.__setattr__(
            self, "hostports", tuple(sorted(set(self.hostports), key=HostPort.sort_key))
        )
        object.__setattr__(
            self,
            "hairpin",
            tuple(sorted({_interface(i) for i in self.hairpin}, key=_interface_key)),
        )

    def __bool__(self) -> bool:
        return bool(
            self.masquerade or self.forward or self.hostports or self.hairpin or self.policy
        )

    def guards_localnet(self) -> bool:
        """Whether IPv4 hostPorts exist: they need route_localnet, hence the 127/8 guard."""
        return any(hp.version == 4 for hp in self.hostports)


def quote_store(data_dir: str) -> str:
    """A data dir as a rule comment: nothing nft or iptables would read as syntax (quotes,
    spaces, backslashes) survives unescaped."""
    return urllib.parse.quote(data_dir, safe="/-_.:@+,=~")


def unquote_store(comment: str) -> str:
    return urllib.parse.unquote(comment)


def merge(sets: Iterable[RuleSet]) -> RuleSet:
    """One RuleSet holding every entry of ``sets`` (one per store: a node has one table).
    NetworkPolicy comes from one store (the agent's): the first that has any. Two stores
    masquerading one subnet with different exclusions conflict: ValueError."""
    sets = list(sets)
    return RuleSet(
        tuple(r for s in sets for r in s.masquerade),
        tuple(n for s in sets for n in s.forward),
        tuple(h for s in sets for h in s.hostports),
        tuple(i for s in sets for i in s.hairpin),
        next((s.policy for s in sets if s.policy), PolicyFragment()),
        tuple(d for s in sets for d in s.stores),
    )


def hairpin_of(source: Network, dest: Network) -> Interface:
    """The pod address (with its subnet's prefix) of a hairpin masquerade from ``source`` to
    ``dest``, as rules read back from a backend give them."""
    return ipaddress.ip_interface((dest.network_address, source.prefixlen))
