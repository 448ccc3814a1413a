"""pycni's rules for the iptables backend: rendering a RuleSet as ``iptables-restore`` input
per address family, the jumps into pycni's chains, and reading back what ``iptables -S``
shows of them. Pure text in and out; sync.py runs iptables.

Chain ``PYCNI-FWD`` in table ``filter``, reached from ``FORWARD``, chain ``PYCNI-MASQ`` in
table ``nat``, reached from ``POSTROUTING``, and for hostPorts chain ``PYCNI-HOSTPORTS`` in
``nat``, reached from ``PREROUTING`` and ``OUTPUT`` for local destinations (``-m addrtype
--dst-type LOCAL``), and ``PYCNI-INPUT`` in ``filter`` from ``INPUT``; each by exactly one jump
per parent carrying the comment ``pycni`` and refilled atomically by ``iptables-restore
--noflush``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from pycni.rules.model import (
    HAIRPIN_MARK,
    IPV6_LOOPBACK,
    LOCALNET,
    PROTOCOLS,
    HostPort,
    Interface,
    MasqRule,
    Network,
    RuleSet,
    hairpin_of,
    quote_store,
    unquote_store,
)

IPT_MASQ_CHAIN = "PYCNI-MASQ"
IPT_FWD_CHAIN = "PYCNI-FWD"
IPT_INPUT_CHAIN = "PYCNI-INPUT"
IPT_HOSTPORT_CHAIN = "PYCNI-HOSTPORTS"
# Nothing jumps to it: one rule per store whose wants the chains hold (RuleSet.stores).
IPT_STORES_CHAIN = "PYCNI-STORES"
IPT_COMMENT = "pycni"


@dataclass(frozen=True)
class Hook:
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
FWD_HOOK = Hook("filter", "FORWARD", IPT_FWD_CHAIN, first=True)
MASQ_HOOK = Hook("nat", "POSTROUTING", IPT_MASQ_CHAIN, first=False)
INPUT_HOOK = Hook("filter", "INPUT", IPT_INPUT_CHAIN, first=True)
DNAT_HOOKS = (
    Hook("nat", "PREROUTING", IPT_HOSTPORT_CHAIN, first=True, match=_LOCAL_DST),
    Hook("nat", "OUTPUT", IPT_HOSTPORT_CHAIN, first=True, match=_LOCAL_DST),
)
HOOKS = (FWD_HOOK, MASQ_HOOK, INPUT_HOOK, *DNAT_HOOKS)
# pycni's iptables chains as (table, chain), in the order they are rendered.
IPT_CHAINS = (
    ("filter", IPT_FWD_CHAIN),
    ("filter", IPT_INPUT_CHAIN),
    ("filter", IPT_STORES_CHAIN),
    ("nat", IPT_HOSTPORT_CHAIN),
    ("nat", IPT_MASQ_CHAIN),
)
_DNATED = "-m conntrack --ctstate DNAT"
_MARK = f"0x{HAIRPIN_MARK:x}/0x{HAIRPIN_MARK:x}"  # as iptables -S prints it back
_MARKED = f"-m mark --mark {_MARK}"


def _ipt_dnat(hp: HostPort) -> list[str]:
    """The hostPort's mark (for the hairpin masquerade: see model.HAIRPIN_MARK), then its
    DNAT: iptables sets a mark and DNATs in two rules of one match."""
    dst = f" -d {hp.host_ip}" if hp.host_ip else ""
    to = f"{hp.pod_ip}:{hp.pod_port}" if hp.version == 4 else f"[{hp.pod_ip}]:{hp.pod_port}"
    match = f"-A {IPT_HOSTPORT_CHAIN}{dst} -p {hp.protocol} -m {hp.protocol} --dport {hp.host_port}"
    return [f"{match} -j MARK --set-xmark {_MARK}", f"{match} -j DNAT --to-destination {to}"]


def chain_bodies(rules: RuleSet, family: int) -> dict[str, list[str]]:
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
        f"-A {IPT_MASQ_CHAIN} -s {iface.network} -d {iface.ip} {_DNATED} {_MARKED} -j MASQUERADE"
        for iface in rules.hairpin
        if iface.version == family
    ]
    for rule in rules.masquerade:
        if rule.version != family:
            continue
        for e in rule.exclude:
            masq.append(f"-A {IPT_MASQ_CHAIN} -s {rule.source} -d {e} -j RETURN")
        masq.append(f"-A {IPT_MASQ_CHAIN} -s {rule.source} -j MASQUERADE --random-fully")
    dnat = [line for hp in hostports for line in _ipt_dnat(hp)]
    if family == 6 and dnat:
        dnat.insert(0, f"-A {IPT_HOSTPORT_CHAIN} -d {IPV6_LOOPBACK} -j RETURN")
    stores = [
        f"-A {IPT_STORES_CHAIN} -m comment --comment {quote_store(d)} -j RETURN"
        for d in (rules.stores if rules else ())
    ]
    return {
        IPT_FWD_CHAIN: fwd,
        IPT_INPUT_CHAIN: guard_input,
        IPT_STORES_CHAIN: stores,
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
    bodies = chain_bodies(rules, family)
    lines: list[str] = []
    for tbl in ("filter", "nat"):
        chains = [c for t, c in IPT_CHAINS if t == tbl and bodies[c]]
        if chains:
            lines.append(f"*{tbl}")
            lines += [f":{c} - [0:0]" for c in chains]
            lines += [line for c in chains for line in bodies[c]]
            lines.append("COMMIT")
    return "\n".join(lines) + "\n" if lines else ""


# --------------------------------------------------------------------------- read back


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


def parse_iptables(listings: Iterable[tuple[str, str]]) -> RuleSet:
    """The RuleSet in ``iptables -S CHAIN`` / ``ip6tables -S CHAIN`` output of pycni's chains,
    given as (chain, output) pairs. Only understands what render_iptables writes: see
    sync.installed."""
    masq_rules: list[MasqRule] = []
    hostports: list[HostPort] = []
    hairpin: list[Interface] = []
    accepted: dict[str, set[Network]] = {"-s": set(), "-d": set()}
    stores: list[str] = []
    for chain, listing in listings:
        # (host address flag value, port) per protocol of the hostPorts marked so far: a DNAT
        # without its mark rule before it is not pycni's current rule.
        marked: dict[str, set[tuple[str | None, int]]] = {}
        excludes: dict[Network, list[Network]] = {}
        masq: list[Network] = []
        for line in listing.splitlines():
            words = line.split()
            if not words or words[0] != "-A":
                continue
            if chain == IPT_STORES_CHAIN and "--comment" in words:
                stores.append(unquote_store(words[words.index("--comment") + 1].strip('"')))
            elif chain == IPT_FWD_CHAIN and "ACCEPT" in words:
                for flag in ("-s", "-d"):
                    if flag in words:
                        accepted[flag].add(ipaddress.ip_network(words[words.index(flag) + 1]))
            elif chain == IPT_HOSTPORT_CHAIN:
                hp = _ipt_hostport(words)
                if hp is not None and marked.get(hp.protocol, set()) >= {
                    (_ipt_words_value(words, "-d"), hp.host_port)
                }:
                    hostports.append(hp)
                elif "MARK" in words and _ipt_words_value(words, "--set-xmark") == _MARK:
                    proto, port = _ipt_words_value(words, "-p"), _ipt_words_value(words, "--dport")
                    if proto is not None and port is not None:
                        marked.setdefault(proto, set()).add(
                            (_ipt_words_value(words, "-d"), int(port))
                        )
            elif chain == IPT_MASQ_CHAIN and "-s" in words:
                src = ipaddress.ip_network(words[words.index("-s") + 1])
                dst = _ipt_words_value(words, "-d")
                if "DNAT" in words:
                    # The 127/8 rule has no destination: it comes with the hostports. A hairpin
                    # rule from before the mark (masquerading every DNAT) reads back as none.
                    if dst is not None and "MASQUERADE" in words and _MARK in words:
                        hairpin.append(hairpin_of(src, ipaddress.ip_network(dst)))
                elif "RETURN" in words and dst is not None:
                    excludes.setdefault(src, []).append(ipaddress.ip_network(dst))
                elif "MASQUERADE" in words:
                    masq.append(src)
        masq_rules.extend(MasqRule(s, tuple(excludes.get(s, ()))) for s in masq)
    return RuleSet(
        tuple(masq_rules),
        tuple(accepted["-s"] & accepted["-d"]),
        tuple(hostports),
        tuple(hairpin),
        stores=tuple(stores),
    )
