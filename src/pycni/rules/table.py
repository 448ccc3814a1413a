"""The one packet-rule table pycni owns on a node: masquerade and forward accepts.

pycni keeps ONE rule set per node, in objects it owns, and replaces it atomically:

* nft backend: ``table inet pycni`` with a filter chain ``forward`` (accept traffic from and
  to the cluster CIDRs) and a nat chain ``postrouting`` (masquerade pod subnets); the whole
  table is replaced in a single ``nft -f -`` transaction and exists only while it has rules.
* iptables backend: chain ``PYCNI-FWD`` in table ``filter``, reached from ``FORWARD``, and
  chain ``PYCNI-MASQ`` in table ``nat``, reached from ``POSTROUTING``, each by exactly one jump
  carrying the comment ``pycni`` and refilled atomically by ``iptables-restore --noflush``.

Never per-pod chains: a node masquerades its pod subnet(s) for every destination except the
excluded ones (the subnet itself, the cluster CIDR, multicast, configured extras).

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
from ipaddress import IPv4Network, IPv6Network

from pycni.cni.errors import INVALID_ENVIRONMENT, RULES_FAILURE, CniError

Network = IPv4Network | IPv6Network

TABLE = "pycni"
NAT_CHAIN = "postrouting"
FWD_CHAIN = "forward"
IPT_MASQ_CHAIN = "PYCNI-MASQ"
IPT_FWD_CHAIN = "PYCNI-FWD"
IPT_COMMENT = "pycni"
BACKENDS = ("nft", "iptables")
ENV_BACKEND = "PYCNI_RULES_BACKEND"

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


@dataclass(frozen=True)
class RuleSet:
    """Everything pycni wants in its table, normalized on construction (so two sets meaning
    the same compare, render and digest equal whatever order or form they were given in).

    ``masquerade``: per pod subnet, what to masquerade (MasqRule). ``forward``: networks (the
    cluster CIDRs) whose forwarded traffic is accepted, as source or as destination. Any
    iterables are accepted (networks also as strings) and stored as sorted tuples. An empty
    set means "no table at all".
    """

    masquerade: tuple[MasqRule, ...] = ()
    forward: tuple[Network, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "masquerade", tuple(normalize(self.masquerade)))
        object.__setattr__(self, "forward", collapse(self.forward))

    def __bool__(self) -> bool:
        return bool(self.masquerade or self.forward)


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
    if rules.forward:
        lines.append(f"\tchain {FWD_CHAIN} {{")
        lines.append("\t\ttype filter hook forward priority filter; policy accept;")
        for net in rules.forward:
            p = _proto(net.version)
            # Counters are cheap and show (nft list table) that cluster traffic goes this way.
            lines.append(f"\t\t{p} saddr {net} counter accept")
            lines.append(f"\t\t{p} daddr {net} counter accept")
        lines.append("\t}")
    if rules.masquerade:
        lines.append(f"\tchain {NAT_CHAIN} {{")
        lines.append("\t\ttype nat hook postrouting priority srcnat; policy accept;")
        for rule in rules.masquerade:
            p = _proto(rule.version)
            excl = ", ".join(str(e) for e in rule.exclude)
            lines.append(
                f"\t\t{p} saddr {rule.source} {p} daddr != {{ {excl} }} masquerade fully-random"
            )
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class _Hook:
    """One of pycni's iptables chains and the built-in chain that jumps to it."""

    table: str
    parent: str
    chain: str
    # FORWARD: first, so the accepts win over the host's own drops later in FORWARD (Docker's
    # isolation chains, a firewall's final reject). POSTROUTING: appended, after the host's.
    first: bool

    @property
    def jump(self) -> list[str]:
        return ["-m", "comment", "--comment", IPT_COMMENT, "-j", self.chain]


FWD_HOOK = _Hook("filter", "FORWARD", IPT_FWD_CHAIN, first=True)
MASQ_HOOK = _Hook("nat", "POSTROUTING", IPT_MASQ_CHAIN, first=False)
HOOKS = (FWD_HOOK, MASQ_HOOK)


def _ipt_bodies(rules: RuleSet, family: int) -> dict[_Hook, list[str]]:
    """Per pycni chain, its rules for ``family``; empty means the chain should not exist."""
    fwd = [
        f"-A {IPT_FWD_CHAIN} {flag} {net} -j ACCEPT"
        for net in rules.forward
        if net.version == family
        for flag in ("-s", "-d")
    ]
    masq: list[str] = []
    for rule in rules.masquerade:
        if rule.version != family:
            continue
        for e in rule.exclude:
            masq.append(f"-A {IPT_MASQ_CHAIN} -s {rule.source} -d {e} -j RETURN")
        masq.append(f"-A {IPT_MASQ_CHAIN} -s {rule.source} -j MASQUERADE --random-fully")
    return {FWD_HOOK: fwd, MASQ_HOOK: masq}


def render_iptables(rules: RuleSet, family: int) -> str:
    """``iptables-restore --noflush`` input resetting and refilling those of pycni's chains
    that have rules of ``family`` (4 or 6); empty when none has. Jumps are not included, and
    chains without rules are not mentioned: apply removes them with their jumps.
    """
    if family not in (4, 6):
        raise ValueError(f"family must be 4 or 6, not {family!r}")
    lines: list[str] = []
    for hook, body in _ipt_bodies(rules, family).items():
        if body:
            lines += [f"*{hook.table}", f":{hook.chain} - [0:0]", *body, "COMMIT"]
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


def _ipt_base(hook: _Hook, family: int) -> list[str]:
    return [_ipt(family), "-w", "-t", hook.table]


def _ipt_chain_exists(hook: _Hook, family: int) -> bool:
    return _run([*_ipt_base(hook, family), "-S", hook.chain]).returncode == 0


def _ipt_jump_count(hook: _Hook, family: int) -> int:
    out = _must([*_ipt_base(hook, family), "-S", hook.parent])
    want = " ".join(["-A", hook.parent, *hook.jump])
    return sum(1 for line in out.splitlines() if line.strip() == want)


def _ipt_ensure_jump(hook: _Hook, family: int) -> None:
    base = _ipt_base(hook, family)
    if _run([*base, "-C", hook.parent, *hook.jump]).returncode != 0:
        _must([*base, "-I" if hook.first else "-A", hook.parent, *hook.jump])
    # Concurrent appliers could both have added one: keep exactly one.
    for _ in range(max(0, _ipt_jump_count(hook, family) - 1)):
        _must([*base, "-D", hook.parent, *hook.jump])


def _ipt_remove(hook: _Hook, family: int) -> None:
    if not _ipt_chain_exists(hook, family):
        return
    base = _ipt_base(hook, family)
    while _run([*base, "-C", hook.parent, *hook.jump]).returncode == 0:
        _must([*base, "-D", hook.parent, *hook.jump])
    _must([*base, "-F", hook.chain])
    _must([*base, "-X", hook.chain])


def _ipt_apply(rules: RuleSet, family: int) -> None:
    script = render_iptables(rules, family)
    if script:
        _must([f"{_ipt(family)}-restore", "-w", "--noflush"], script)
    for hook, body in _ipt_bodies(rules, family).items():
        if body:
            _ipt_ensure_jump(hook, family)
        else:
            _ipt_remove(hook, family)


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
                for hook in HOOKS:
                    _ipt_remove(hook, family)


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


def _installed_nft() -> RuleSet | None:
    proc = _run(["nft", "-j", "list", "table", "inet", TABLE])
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr or "does not exist" in proc.stderr:
            return None
        raise CniError(RULES_FAILURE, f"packet rules: nft list failed: {proc.stderr.strip()}")
    masq: list[MasqRule] = []
    accepted: dict[str, set[Network]] = {"saddr": set(), "daddr": set()}
    for obj in json.loads(proc.stdout).get("nftables", []):
        rule = obj.get("rule")
        if not rule:
            continue
        matches = _nft_matches(rule)
        if rule.get("chain") == NAT_CHAIN:
            source = [n for f, op, nets in matches if f == "saddr" and op == "==" for n in nets]
            exclude = [n for f, op, nets in matches if f == "daddr" and op == "!=" for n in nets]
            if len(source) == 1:
                masq.append(MasqRule(source[0], tuple(exclude)))
        elif rule.get("chain") == FWD_CHAIN and any("accept" in e for e in rule["expr"]):
            for f, op, nets in matches:
                if op == "==" and len(nets) == 1:
                    accepted[f].add(nets[0])
    # A cluster CIDR counts as forwarded only with both directions accepted.
    return RuleSet(tuple(masq), tuple(accepted["saddr"] & accepted["daddr"]))


def _installed_ipt() -> RuleSet | None:
    found = False
    masq_rules: list[MasqRule] = []
    accepted: dict[str, set[Network]] = {"-s": set(), "-d": set()}
    for family in (4, 6):
        if not shutil.which(_ipt(family)):
            continue
        for hook in HOOKS:
            proc = _run([*_ipt_base(hook, family), "-S", hook.chain])
            if proc.returncode != 0:
                continue
            found = True
            excludes: dict[Network, list[Network]] = {}
            masq: list[Network] = []
            for line in proc.stdout.splitlines():
                words = line.split()
                if not words or words[0] != "-A":
                    continue
                if hook is FWD_HOOK and "ACCEPT" in words:
                    for flag in ("-s", "-d"):
                        if flag in words:
                            accepted[flag].add(ipaddress.ip_network(words[words.index(flag) + 1]))
                elif hook is MASQ_HOOK and "-s" in words:
                    src = ipaddress.ip_network(words[words.index("-s") + 1])
                    if "RETURN" in words and "-d" in words:
                        excludes.setdefault(src, []).append(
                            ipaddress.ip_network(words[words.index("-d") + 1])
                        )
                    elif "MASQUERADE" in words:
                        masq.append(src)
            masq_rules.extend(MasqRule(s, tuple(excludes.get(s, ()))) for s in masq)
    if not found:
        return None
    return RuleSet(tuple(masq_rules), tuple(accepted["-s"] & accepted["-d"]))


def installed(backend: str | None = None) -> RuleSet | None:
    """The rules currently installed, or None if pycni has nothing there.

    Compare with the wanted RuleSet (both are normalized). Best-effort: only understands what
    pycni renders.
    """
    if resolve_backend(backend) == "nft":
        return _installed_nft()
    return _installed_ipt()
