"""The one packet-rule table pycni owns on a node: masquerade, forward accepts and hostPorts.

pycni keeps ONE rule set per node, in objects it owns, and replaces it atomically:

* nft backend: ``table inet pycni`` with a filter chain ``forward`` (accept traffic from and
  to the cluster CIDRs, and DNATed traffic), a nat chain ``postrouting`` (masquerade pod
  subnets; hostPort hairpin and localhost traffic), and for hostPorts a regular chain
  ``hostports`` (the DNATs) reached from nat ``prerouting`` and ``output`` for local
  destinations, plus a filter chain ``input`` guarding 127.0.0.0/8; the whole table is replaced
  in a single ``nft -f -`` transaction and exists only while it has rules.
* iptables backend: chain ``PYCNI-FWD`` in table ``filter``, reached from ``FORWARD``, chain
  ``PYCNI-MASQ`` in table ``nat``, reached from ``POSTROUTING``, and for hostPorts chain
  ``PYCNI-HOSTPORTS`` in ``nat``, reached from ``PREROUTING`` and ``OUTPUT`` for local
  destinations (``-m addrtype --dst-type LOCAL``), and ``PYCNI-INPUT`` in ``filter`` from
  ``INPUT``; each by exactly one jump per parent carrying the comment ``pycni`` and refilled
  atomically by ``iptables-restore --noflush``.

Never per-pod chains: a node masquerades its pod subnet(s) for every destination except the
excluded ones (the subnet itself, the cluster CIDR, multicast, configured extras).

HostPorts reaching 127.0.0.1 need ``route_localnet`` on the bridge (set by the core), which
would also let pods send to the node's 127.0.0.0/8: the input guard drops such new connections
arriving on any interface but ``lo`` (the fix kube-proxy made for CVE-2020-8558).

Limit of the nft backend: an ``accept`` ends the packet's walk through pycni's base chain
only; another table's forward hook (e.g. iptables' FORWARD with policy DROP, as Docker sets
it) still sees the packet and may drop it. The iptables backend jumps from that very FORWARD
chain, so its accepts do hold there.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
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

from pycni.cni.errors import INVALID_ENVIRONMENT, RULES_FAILURE, CniError

Network = IPv4Network | IPv6Network
Address = IPv4Address | IPv6Address
Interface = IPv4Interface | IPv6Interface

TABLE = "pycni"
NAT_CHAIN = "postrouting"
FWD_CHAIN = "forward"
INPUT_CHAIN = "input"
HOSTPORT_CHAIN = "hostports"
PREROUTING_CHAIN = "prerouting"
OUTPUT_CHAIN = "output"
IPT_MASQ_CHAIN = "PYCNI-MASQ"
IPT_FWD_CHAIN = "PYCNI-FWD"
IPT_INPUT_CHAIN = "PYCNI-INPUT"
IPT_HOSTPORT_CHAIN = "PYCNI-HOSTPORTS"
IPT_COMMENT = "pycni"
BACKENDS = ("nft", "iptables")
ENV_BACKEND = "PYCNI_RULES_BACKEND"

PROTOCOLS = ("tcp", "udp")
LOCALNET = IPv4Network("127.0.0.0/8")
# IPv6 has no route_localnet: traffic to ::1 DNATed to a pod could never leave, so it is left
# alone (to the node's own listeners).
IPV6_LOOPBACK = IPv6Address("::1")

MULTICAST: dict[int, Network] = {
    4: IPv4Network("224.0.0.0/4"),
    6: IPv6Network("ff00::/8"),
}

_TIMEOUT = 30.0


def _net(value: object) -> Network:
    if isinstance(value, IPv4Network | IPv6Network):
        return value
    try:
        return ipaddress.ip_network(value)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"packet rules: invalid network {value!r}: {exc}") from None


def _proto(version: int) -> str:
    return "ip" if version == 4 else "ip6"


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


@dataclass(frozen=True)
class RuleSet:
    """Everything pycni wants in its table, normalized on construction (so two sets meaning
    the same compare, render and digest equal whatever order or form they were given in).

    ``masquerade``: per pod subnet, what to masquerade (MasqRule). ``forward``: networks (the
    cluster CIDRs) whose forwarded traffic is accepted, as source or as destination.
    ``hostports``: DNATs from the node's addresses to pods (HostPort); while there are any,
    forwarded DNATed traffic is accepted, and for IPv4 localhost traffic to them masqueraded and
    127.0.0.0/8 guarded. ``hairpin``: pod addresses with their prefix (e.g. 10.244.1.2/24)
    whose DNATed traffic from their own subnet is masqueraded, so a pod reaching itself or a
    neighbour through a hostPort gets the answer back through the node (needed without
    br_netfilter, where the neighbour would answer straight over the bridge). Any iterables
    are accepted (networks and addresses also as strings) and stored as sorted tuples. An
    empty set means "no table at all".
    """

    masquerade: tuple[MasqRule, ...] = ()
    forward: tuple[Network, ...] = ()
    hostports: tuple[HostPort, ...] = ()
    hairpin: tuple[Interface, ...] = ()

    def __post_init__(self) -> None:
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
        return bool(self.masquerade or self.forward or self.hostports or self.hairpin)

    def guards_localnet(self) -> bool:
        """Whether IPv4 hostPorts exist: they need route_localnet, hence the 127/8 guard."""
        return any(hp.version == 4 for hp in self.hostports)


# --------------------------------------------------------------------------- rendering


def render_nft(rules: RuleSet) -> str:
    """An nft script atomically replacing ``table inet pycni`` (removing it when empty).

    Declaring the table empty first makes the ``delete`` valid whether or not it exists; the
    whole script is one transaction. Chains without rules are left out.
    """
    lines = [f"table inet {TABLE} {{}}", f"delete table inet {TABLE}"]
    if not rules:
        return "\n".join(lines) + "\n"
    lines.append(f"table inet {TABLE} {{")
    if rules.forward or rules.hostports:
        lines.append(f"\tchain {FWD_CHAIN} {{")
        lines.append("\t\ttype filter hook forward priority filter; policy accept;")
        if rules.hostports:
            lines.append("\t\tct status dnat counter accept")
        for net in rules.forward:
            p = _proto(net.version)
            # Counters are cheap and show (nft list table) that cluster traffic goes this way.
            lines.append(f"\t\t{p} saddr {net} counter accept")
            lines.append(f"\t\t{p} daddr {net} counter accept")
        lines.append("\t}")
    if rules.guards_localnet():
        lines.append(f"\tchain {INPUT_CHAIN} {{")
        lines.append("\t\ttype filter hook input priority filter; policy accept;")
        lines.append(
            f'\t\tiifname != "lo" ip daddr {LOCALNET}'
            " ct state != { established, related } counter drop"
        )
        lines.append("\t}")
    if rules.hostports:
        lines.append(f"\tchain {HOSTPORT_CHAIN} {{")
        if any(hp.version == 6 for hp in rules.hostports):
            lines.append(f"\t\tip6 daddr {IPV6_LOOPBACK} return")
        lines += [f"\t\t{_nft_dnat(hp)}" for hp in rules.hostports]
        lines.append("\t}")
        # The output hook has no symbolic dstnat priority; -100 is its value.
        for chain, hook, prio in (
            (PREROUTING_CHAIN, "prerouting", "dstnat"),
            (OUTPUT_CHAIN, "output", "-100"),
        ):
            lines.append(f"\tchain {chain} {{")
            lines.append(f"\t\ttype nat hook {hook} priority {prio}; policy accept;")
            lines.append(f"\t\tfib daddr type local jump {HOSTPORT_CHAIN}")
            lines.append("\t}")
    if rules.masquerade or rules.hairpin or rules.guards_localnet():
        lines.append(f"\tchain {NAT_CHAIN} {{")
        lines.append("\t\ttype nat hook postrouting priority srcnat; policy accept;")
        if rules.guards_localnet():
            # Node-local clients of 127.0.0.1 keep that source past routing (route_localnet);
            # the pod could not answer it.
            lines.append(f"\t\tct status dnat ip saddr {LOCALNET} masquerade")
        for iface in rules.hairpin:
            p = _proto(iface.version)
            lines.append(
                f"\t\tct status dnat {p} saddr {iface.network} {p} daddr {iface.ip} masquerade"
            )
        for rule in rules.masquerade:
            p = _proto(rule.version)
            excl = ", ".join(str(e) for e in rule.exclude)
            lines.append(
                f"\t\t{p} saddr {rule.source} {p} daddr != {{ {excl} }} masquerade fully-random"
            )
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _nft_dnat(hp: HostPort) -> str:
    p = _proto(hp.version)
    # "any local address" still needs the family: `dnat ip` on an IPv6 packet cannot work.
    match = f"{p} daddr {hp.host_ip}" if hp.host_ip else f"meta nfproto ipv{hp.version}"
    to = f"{hp.pod_ip}:{hp.pod_port}" if hp.version == 4 else f"[{hp.pod_ip}]:{hp.pod_port}"
    return f"{match} {hp.protocol} dport {hp.host_port} dnat {p} to {to}"


@dataclass(frozen=True)
class _Hook:
    """A jump from a built-in chain to one of pycni's iptables chains."""

    table: str
    parent: str
    chain: str
    # FORWARD, INPUT, PREROUTING, OUTPUT: first, so pycni's accepts, guard and DNATs win over
    # the host's own rules later in the chain (Docker's isolation chains, a firewall's final
    # reject). POSTROUTING: appended, after the host's.
    first: bool
    match: tuple[str, ...] = ()

    @property
    def jump(self) -> list[str]:
        return [*self.match, "-m", "comment", "--comment", IPT_COMMENT, "-j", self.chain]


_LOCAL_DST = ("-m", "addrtype", "--dst-type", "LOCAL")
FWD_HOOK = _Hook("filter", "FORWARD", IPT_FWD_CHAIN, first=True)
MASQ_HOOK = _Hook("nat", "POSTROUTING", IPT_MASQ_CHAIN, first=False)
INPUT_HOOK = _Hook("filter", "INPUT", IPT_INPUT_CHAIN, first=True)
DNAT_HOOKS = (
    _Hook("nat", "PREROUTING", IPT_HOSTPORT_CHAIN, first=True, match=_LOCAL_DST),
    _Hook("nat", "OUTPUT", IPT_HOSTPORT_CHAIN, first=True, match=_LOCAL_DST),
)
HOOKS = (FWD_HOOK, MASQ_HOOK, INPUT_HOOK, *DNAT_HOOKS)
# pycni's iptables chains as (table, chain), in the order they are rendered.
IPT_CHAINS = (
    ("filter", IPT_FWD_CHAIN),
    ("filter", IPT_INPUT_CHAIN),
    ("nat", IPT_HOSTPORT_CHAIN),
    ("nat", IPT_MASQ_CHAIN),
)
_DNATED = "-m conntrack --ctstate DNAT"


def _ipt_dnat(hp: HostPort) -> str:
    dst = f" -d {hp.host_ip}" if hp.host_ip else ""
    to = f"{hp.pod_ip}:{hp.pod_port}" if hp.version == 4 else f"[{hp.pod_ip}]:{hp.pod_port}"
    return (
        f"-A {IPT_HOSTPORT_CHAIN}{dst} -p {hp.protocol} -m {hp.protocol}"
        f" --dport {hp.host_port} -j DNAT --to-destination {to}"
    )


def _ipt_bodies(rules: RuleSet, family: int) -> dict[str, list[str]]:
    """Per pycni chain, its rules for ``family``; empty means the chain should not exist."""
    hostports = [hp for hp in rules.hostports if hp.version == family]
    fwd = [f"-A {IPT_FWD_CHAIN} {_DNATED} -j ACCEPT"] if hostports else []
    fwd += [
        f"-A {IPT_FWD_CHAIN} {flag} {net} -j ACCEPT"
        for net in rules.forward
        if net.version == family
        for flag in ("-s", "-d")
    ]
    guard = family == 4 and bool(hostports)
    guard_input = (
        [
            f"-A {IPT_INPUT_CHAIN} -d {LOCALNET} ! -i lo"
            " -m conntrack ! --ctstate RELATED,ESTABLISHED -j DROP"
        ]
        if guard
        else []
    )
    masq = [f"-A {IPT_MASQ_CHAIN} -s {LOCALNET} {_DNATED} -j MASQUERADE"] if guard else []
    masq += [
        f"-A {IPT_MASQ_CHAIN} -s {iface.network} -d {iface.ip} {_DNATED} -j MASQUERADE"
        for iface in rules.hairpin
        if iface.version == family
    ]
    for rule in rules.masquerade:
        if rule.version != family:
            continue
        for e in rule.exclude:
            masq.append(f"-A {IPT_MASQ_CHAIN} -s {rule.source} -d {e} -j RETURN")
        masq.append(f"-A {IPT_MASQ_CHAIN} -s {rule.source} -j MASQUERADE --random-fully")
    dnat = [_ipt_dnat(hp) for hp in hostports]
    if family == 6 and dnat:
        dnat.insert(0, f"-A {IPT_HOSTPORT_CHAIN} -d {IPV6_LOOPBACK} -j RETURN")
    return {
        IPT_FWD_CHAIN: fwd,
        IPT_INPUT_CHAIN: guard_input,
        IPT_HOSTPORT_CHAIN: dnat,
        IPT_MASQ_CHAIN: masq,
    }


def render_iptables(rules: RuleSet, family: int) -> str:
    """``iptables-restore --noflush`` input resetting and refilling those of pycni's chains
    that have rules of ``family`` (4 or 6); empty when none has. Jumps are not included, and
    chains without rules are not mentioned: apply removes them with their jumps.
    """
    if family not in (4, 6):
        raise ValueError(f"family must be 4 or 6, not {family!r}")
    bodies = _ipt_bodies(rules, family)
    lines: list[str] = []
    for tbl in ("filter", "nat"):
        chains = [c for t, c in IPT_CHAINS if t == tbl and bodies[c]]
        if chains:
            lines.append(f"*{tbl}")
            lines += [f":{c} - [0:0]" for c in chains]
            lines += [line for c in chains for line in bodies[c]]
            lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""


def digest(rules: RuleSet) -> str:
    """sha256 (hex) of the canonical rendering: equal digests mean equal rule sets."""
    return hashlib.sha256(render_nft(rules).encode()).hexdigest()


# --------------------------------------------------------------------------- execution


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise CniError(RULES_FAILURE, f"packet rules: {argv[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise CniError(
            RULES_FAILURE, f"packet rules: {' '.join(argv)} timed out after {_TIMEOUT:g}s"
        ) from None


def _must(argv: list[str], stdin: str | None = None) -> str:
    proc = _run(argv, stdin)
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip()
        raise CniError(
            RULES_FAILURE,
            f"packet rules: {' '.join(argv)} failed (exit {proc.returncode}): {err}",
            details=stdin or "",
        )
    return proc.stdout


def resolve_backend(backend: str | None = None) -> str:
    """The backend to use: the argument, else $PYCNI_RULES_BACKEND, else nft if present."""
    if backend is not None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown rules backend {backend!r} (want one of {BACKENDS})")
        return backend
    env = os.environ.get(ENV_BACKEND, "").strip()
    if env:
        if env not in BACKENDS:
            raise CniError(
                INVALID_ENVIRONMENT, f"{ENV_BACKEND}={env!r}: want one of {', '.join(BACKENDS)}"
            )
        return env
    return "nft" if shutil.which("nft") else "iptables"


def _ipt(family: int) -> str:
    return "iptables" if family == 4 else "ip6tables"


def _ipt_base(table_name: str, family: int) -> list[str]:
    return [_ipt(family), "-w", "-t", table_name]


def _ipt_chain_exists(table_name: str, chain: str, family: int) -> bool:
    return _run([*_ipt_base(table_name, family), "-S", chain]).returncode == 0


def _ipt_jump_count(hook: _Hook, family: int) -> int:
    out = _must([*_ipt_base(hook.table, family), "-S", hook.parent])
    want = " ".join(["-A", hook.parent, *hook.jump])
    return sum(1 for line in out.splitlines() if line.strip() == want)


def _ipt_ensure_jump(hook: _Hook, family: int) -> None:
    base = _ipt_base(hook.table, family)
    if _run([*base, "-C", hook.parent, *hook.jump]).returncode != 0:
        _must([*base, "-I" if hook.first else "-A", hook.parent, *hook.jump])
    # Concurrent appliers could both have added one: keep exactly one.
    for _ in range(max(0, _ipt_jump_count(hook, family) - 1)):
        _must([*base, "-D", hook.parent, *hook.jump])


def _hooks_of(chain: str) -> list[_Hook]:
    return [h for h in HOOKS if h.chain == chain]


def _ipt_remove(table_name: str, chain: str, family: int) -> None:
    """Remove one of pycni's chains with every jump to it; nothing when it does not exist."""
    if not _ipt_chain_exists(table_name, chain, family):
        return
    base = _ipt_base(table_name, family)
    for hook in _hooks_of(chain):
        while _run([*base, "-C", hook.parent, *hook.jump]).returncode == 0:
            _must([*base, "-D", hook.parent, *hook.jump])
    _must([*base, "-F", chain])
    _must([*base, "-X", chain])


def _ipt_apply(rules: RuleSet, family: int) -> None:
    script = render_iptables(rules, family)
    if script:
        _must([f"{_ipt(family)}-restore", "-w", "--noflush"], script)
    bodies = _ipt_bodies(rules, family)
    for table_name, chain in IPT_CHAINS:
        if bodies[chain]:
            for hook in _hooks_of(chain):
                _ipt_ensure_jump(hook, family)
        else:
            _ipt_remove(table_name, chain, family)


def apply(rules: RuleSet, backend: str | None = None) -> str:
    """Install exactly ``rules`` (replacing what pycni had); an empty set removes everything.

    Returns the backend used. Failures raise CniError(RULES_FAILURE).
    """
    used = resolve_backend(backend)
    if used == "nft":
        _must(["nft", "-f", "-"], render_nft(rules))
        return used
    for family in (4, 6):
        _ipt_apply(rules, family)
    return used


def remove_all(backend: str | None = None) -> None:
    """Remove everything pycni installed (table, chains, jumps); idempotent.

    With no backend given, cleans up every backend whose tool is present.
    """
    if backend is not None:
        backends = [resolve_backend(backend)]
    else:
        backends = [b for b in BACKENDS if shutil.which(b)]
    for b in backends:
        if b == "nft":
            _must(["nft", "-f", "-"], render_nft(RuleSet()))
            continue
        for family in (4, 6):
            if shutil.which(_ipt(family)):
                for table_name, chain in IPT_CHAINS:
                    _ipt_remove(table_name, chain, family)


# --------------------------------------------------------------------------- read back


def _nft_net(value: object) -> list[Network]:
    """Networks from an nft JSON set element / match right-hand side."""
    if isinstance(value, str):
        return [ipaddress.ip_network(value)]
    if isinstance(value, dict):
        if "prefix" in value:
            p = value["prefix"]
            return [ipaddress.ip_network(f"{p['addr']}/{p['len']}")]
        if "range" in value:
            lo, hi = (ipaddress.ip_address(a) for a in value["range"])
            return list(ipaddress.summarize_address_range(lo, hi))
        if "set" in value:
            out: list[Network] = []
            for item in value["set"]:
                out.extend(_nft_net(item))
            return out
    raise ValueError(f"unexpected nft value {value!r}")


def _nft_matches(rule: dict) -> list[tuple[str, str, list[Network]]]:
    """(field, op, networks) of each address match in an nft JSON rule."""
    out = []
    for expr in rule.get("expr", []):
        match = expr.get("match")
        if not match:
            continue
        field = match.get("left", {}).get("payload", {}).get("field")
        if field in ("saddr", "daddr"):
            out.append((field, match.get("op"), _nft_net(match["right"])))
    return out


def _nft_is_dnated(rule: dict) -> bool:
    """Whether the rule matches ``ct status dnat``."""
    for expr in rule.get("expr", []):
        match = expr.get("match") or {}
        if match.get("left", {}).get("ct", {}).get("key") == "status" and (
            match.get("right") == "dnat"
        ):
            return True
    return False


def _nft_hostport(rule: dict) -> HostPort | None:
    """The HostPort an nft JSON rule of the hostports chain DNATs, if it is one pycni wrote."""
    host_ip = protocol = port = dnat = None
    for expr in rule.get("expr", []):
        if "dnat" in expr:
            dnat = expr["dnat"]
        match = expr.get("match")
        if not match or match.get("op") != "==":
            continue
        payload = match.get("left", {}).get("payload", {})
        if payload.get("field") == "daddr":
            host_ip = match["right"]
        elif payload.get("field") == "dport" and payload.get("protocol") in PROTOCOLS:
            protocol, port = payload["protocol"], match["right"]
    if dnat is None or protocol is None or "addr" not in dnat or "port" not in dnat:
        return None
    return HostPort(protocol, port, dnat["addr"], dnat["port"], host_ip)


def _installed_nft() -> RuleSet | None:
    proc = _run(["nft", "-j", "list", "table", "inet", TABLE])
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr or "does not exist" in proc.stderr:
            return None
        raise CniError(RULES_FAILURE, f"packet rules: nft list failed: {proc.stderr.strip()}")
    masq: list[MasqRule] = []
    hostports: list[HostPort] = []
    hairpin: list[Interface] = []
    accepted: dict[str, set[Network]] = {"saddr": set(), "daddr": set()}
    for obj in json.loads(proc.stdout).get("nftables", []):
        rule = obj.get("rule")
        if not rule:
            continue
        matches = _nft_matches(rule)
        if rule.get("chain") == NAT_CHAIN:
            source = [n for f, op, nets in matches if f == "saddr" and op == "==" for n in nets]
            dest = [n for f, op, nets in matches if f == "daddr" and op == "==" for n in nets]
            exclude = [n for f, op, nets in matches if f == "daddr" and op == "!=" for n in nets]
            if _nft_is_dnated(rule):
                # The 127/8 rule has no destination: it comes with the hostports.
                if len(source) == 1 and len(dest) == 1:
                    hairpin.append(_hairpin_of(source[0], dest[0]))
            elif len(source) == 1:
                masq.append(MasqRule(source[0], tuple(exclude)))
        elif rule.get("chain") == HOSTPORT_CHAIN:
            hp = _nft_hostport(rule)
            if hp is not None:
                hostports.append(hp)
        elif rule.get("chain") == FWD_CHAIN and any("accept" in e for e in rule["expr"]):
            for f, op, nets in matches:
                if op == "==" and len(nets) == 1:
                    accepted[f].add(nets[0])
    # A cluster CIDR counts as forwarded only with both directions accepted.
    return RuleSet(
        tuple(masq), tuple(accepted["saddr"] & accepted["daddr"]), tuple(hostports), tuple(hairpin)
    )


def _hairpin_of(source: Network, dest: Network) -> Interface:
    return ipaddress.ip_interface((dest.network_address, source.prefixlen))


def _ipt_words_value(words: list[str], flag: str) -> str | None:
    return words[words.index(flag) + 1] if flag in words else None


def _ipt_hostport(words: list[str]) -> HostPort | None:
    protocol, port = _ipt_words_value(words, "-p"), _ipt_words_value(words, "--dport")
    to = _ipt_words_value(words, "--to-destination")
    if protocol not in PROTOCOLS or port is None or to is None:
        return None
    addr, _, pod_port = to.rpartition(":")
    host = _ipt_words_value(words, "-d")
    host_ip = ipaddress.ip_network(host).network_address if host else None
    return HostPort(protocol, int(port), addr.strip("[]"), int(pod_port), host_ip)


def _installed_ipt() -> RuleSet | None:
    found = False
    masq_rules: list[MasqRule] = []
    hostports: list[HostPort] = []
    hairpin: list[Interface] = []
    accepted: dict[str, set[Network]] = {"-s": set(), "-d": set()}
    for family in (4, 6):
        if not shutil.which(_ipt(family)):
            continue
        for table_name, chain in IPT_CHAINS:
            proc = _run([*_ipt_base(table_name, family), "-S", chain])
            if proc.returncode != 0:
                continue
            found = True
            excludes: dict[Network, list[Network]] = {}
            masq: list[Network] = []
            for line in proc.stdout.splitlines():
                words = line.split()
                if not words or words[0] != "-A":
                    continue
                if chain == IPT_FWD_CHAIN and "ACCEPT" in words:
                    for flag in ("-s", "-d"):
                        if flag in words:
                            accepted[flag].add(ipaddress.ip_network(words[words.index(flag) + 1]))
                elif chain == IPT_HOSTPORT_CHAIN:
                    hp = _ipt_hostport(words)
                    if hp is not None:
                        hostports.append(hp)
                elif chain == IPT_MASQ_CHAIN and "-s" in words:
                    src = ipaddress.ip_network(words[words.index("-s") + 1])
                    dst = _ipt_words_value(words, "-d")
                    if "DNAT" in words:
                        # The 127/8 rule has no destination: it comes with the hostports.
                        if dst is not None and "MASQUERADE" in words:
                            hairpin.append(_hairpin_of(src, ipaddress.ip_network(dst)))
                    elif "RETURN" in words and dst is not None:
                        excludes.setdefault(src, []).append(ipaddress.ip_network(dst))
                    elif "MASQUERADE" in words:
                        masq.append(src)
            masq_rules.extend(MasqRule(s, tuple(excludes.get(s, ()))) for s in masq)
    if not found:
        return None
    return RuleSet(
        tuple(masq_rules), tuple(accepted["-s"] & accepted["-d"]), tuple(hostports), tuple(hairpin)
    )


def installed(backend: str | None = None) -> RuleSet | None:
    """The rules currently installed, or None if pycni has nothing there.

    Compare with the wanted RuleSet (both are normalized). Best-effort: only understands what
    pycni renders; the fixed rules that come with hostPorts (the DNATed accept, the 127/8
    guard and masquerade, the ::1 return) are not read back, they follow from the hostports.
    """
    if resolve_backend(backend) == "nft":
        return _installed_nft()
    return _installed_ipt()
