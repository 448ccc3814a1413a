"""Node-level masquerade of pod traffic leaving the cluster.

pycni keeps ONE rule set per node, in objects it owns, and replaces it atomically:

* nft backend: ``table inet pycni`` with a nat chain ``postrouting``; the whole table is
  replaced in a single ``nft -f -`` transaction.
* iptables backend: chain ``PYCNI-MASQ`` in table ``nat`` (refilled atomically by
  ``iptables-restore --noflush``), reached from ``POSTROUTING`` by exactly one jump
  carrying the comment ``pycni``.

Never per-pod chains: a node masquerades its pod subnet(s) for every destination except the
excluded ones (the subnet itself, the cluster CIDR, multicast).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Network, IPv6Network

from pycni.cni.errors import INVALID_ENVIRONMENT, RULES_FAILURE, CniError

Network = IPv4Network | IPv6Network

TABLE = "pycni"
CHAIN = "postrouting"
IPT_CHAIN = "PYCNI-MASQ"
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
        raise ValueError(f"masquerade rule: invalid network {value!r}: {exc}") from None


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
    """Canonical, deduplicated, sorted form of ``rules`` (what render/installed work with).

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


# --------------------------------------------------------------------------- rendering


def render_nft(rules: Sequence[MasqRule]) -> str:
    """An nft script atomically replacing ``table inet pycni`` (removing it when no rules).

    Declaring the table empty first makes the ``delete`` valid whether or not it exists; the
    whole script is one transaction.
    """
    lines = [f"table inet {TABLE} {{}}", f"delete table inet {TABLE}"]
    canon = normalize(rules)
    if canon:
        lines.append(f"table inet {TABLE} {{")
        lines.append(f"\tchain {CHAIN} {{")
        lines.append("\t\ttype nat hook postrouting priority srcnat; policy accept;")
        for rule in canon:
            proto = "ip" if rule.version == 4 else "ip6"
            excl = ", ".join(str(e) for e in rule.exclude)
            lines.append(
                f"\t\t{proto} saddr {rule.source} {proto} daddr != {{ {excl} }}"
                " masquerade fully-random"
            )
        lines.append("\t}")
        lines.append("}")
    return "\n".join(lines) + "\n"


def render_iptables(rules: Sequence[MasqRule], family: int) -> str:
    """``iptables-restore --noflush`` input resetting and refilling chain PYCNI-MASQ.

    Only rules of ``family`` (4 or 6) are rendered. The POSTROUTING jump is not included.
    """
    if family not in (4, 6):
        raise ValueError(f"family must be 4 or 6, not {family!r}")
    lines = ["*nat", f":{IPT_CHAIN} - [0:0]"]
    for rule in normalize(rules):
        if rule.version != family:
            continue
        for e in rule.exclude:
            lines.append(f"-A {IPT_CHAIN} -s {rule.source} -d {e} -j RETURN")
        lines.append(f"-A {IPT_CHAIN} -s {rule.source} -j MASQUERADE --random-fully")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def digest(rules: Sequence[MasqRule]) -> str:
    """sha256 (hex) of the canonical rendering: equal digests mean equal rule sets."""
    return hashlib.sha256(render_nft(rules).encode()).hexdigest()


# --------------------------------------------------------------------------- execution


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            argv, input=stdin, capture_output=True, text=True, timeout=_TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise CniError(RULES_FAILURE, f"masquerade: {argv[0]} not found") from None
    except subprocess.TimeoutExpired:
        raise CniError(
            RULES_FAILURE, f"masquerade: {' '.join(argv)} timed out after {_TIMEOUT:g}s"
        ) from None


def _must(argv: list[str], stdin: str | None = None) -> str:
    proc = _run(argv, stdin)
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip()
        raise CniError(
            RULES_FAILURE,
            f"masquerade: {' '.join(argv)} failed (exit {proc.returncode}): {err}",
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


_JUMP = ["-m", "comment", "--comment", IPT_COMMENT, "-j", IPT_CHAIN]


def _ipt_chain_exists(family: int) -> bool:
    return _run([_ipt(family), "-w", "-t", "nat", "-S", IPT_CHAIN]).returncode == 0


def _ipt_jump_count(family: int) -> int:
    out = _must([_ipt(family), "-w", "-t", "nat", "-S", "POSTROUTING"])
    want = " ".join(["-A", "POSTROUTING", *_JUMP])
    return sum(1 for line in out.splitlines() if line.strip() == want)


def _ipt_install(rules: Sequence[MasqRule], family: int) -> None:
    _must([f"{_ipt(family)}-restore", "-w", "--noflush"], render_iptables(rules, family))
    base = [_ipt(family), "-w", "-t", "nat"]
    if _run([*base, "-C", "POSTROUTING", *_JUMP]).returncode != 0:
        _must([*base, "-A", "POSTROUTING", *_JUMP])
    # Concurrent appliers could both have appended: keep exactly one.
    for _ in range(max(0, _ipt_jump_count(family) - 1)):
        _must([*base, "-D", "POSTROUTING", *_JUMP])


def _ipt_remove(family: int) -> None:
    if not _ipt_chain_exists(family):
        return
    base = [_ipt(family), "-w", "-t", "nat"]
    while _run([*base, "-C", "POSTROUTING", *_JUMP]).returncode == 0:
        _must([*base, "-D", "POSTROUTING", *_JUMP])
    _must([*base, "-F", IPT_CHAIN])
    _must([*base, "-X", IPT_CHAIN])


def apply(rules: Sequence[MasqRule], backend: str | None = None) -> str:
    """Install exactly ``rules`` (replacing what pycni had); empty rules remove everything.

    Returns the backend used. Failures raise CniError(RULES_FAILURE).
    """
    used = resolve_backend(backend)
    canon = normalize(rules)
    if used == "nft":
        _must(["nft", "-f", "-"], render_nft(canon))
        return used
    for family in (4, 6):
        if any(r.version == family for r in canon):
            _ipt_install(canon, family)
        else:
            _ipt_remove(family)
    return used


def remove_all(backend: str | None = None) -> None:
    """Remove everything pycni installed for masquerading; idempotent.

    With no backend given, cleans up every backend whose tool is present.
    """
    if backend is not None:
        backends = [resolve_backend(backend)]
    else:
        backends = [b for b in BACKENDS if shutil.which(b)]
    for b in backends:
        if b == "nft":
            _must(["nft", "-f", "-"], render_nft([]))
        else:
            for family in (4, 6):
                if shutil.which(_ipt(family)):
                    _ipt_remove(family)


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


def _installed_nft() -> list[MasqRule] | None:
    proc = _run(["nft", "-j", "list", "table", "inet", TABLE])
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr or "does not exist" in proc.stderr:
            return None
        raise CniError(RULES_FAILURE, f"masquerade: nft list failed: {proc.stderr.strip()}")
    rules: list[MasqRule] = []
    for obj in json.loads(proc.stdout).get("nftables", []):
        rule = obj.get("rule")
        if not rule or rule.get("chain") != CHAIN:
            continue
        source: list[Network] = []
        exclude: list[Network] = []
        for expr in rule.get("expr", []):
            match = expr.get("match")
            if not match:
                continue
            field = match.get("left", {}).get("payload", {}).get("field")
            if field == "saddr" and match.get("op") == "==":
                source = _nft_net(match["right"])
            elif field == "daddr" and match.get("op") == "!=":
                exclude = _nft_net(match["right"])
        if len(source) == 1:
            rules.append(MasqRule(source[0], tuple(exclude)))
    return normalize(rules)


def _installed_ipt() -> list[MasqRule] | None:
    found = False
    rules: list[MasqRule] = []
    for family in (4, 6):
        if not shutil.which(_ipt(family)):
            continue
        proc = _run([_ipt(family), "-w", "-t", "nat", "-S", IPT_CHAIN])
        if proc.returncode != 0:
            continue
        found = True
        excludes: dict[Network, list[Network]] = {}
        masq: list[Network] = []
        for line in proc.stdout.splitlines():
            words = line.split()
            if not words or words[0] != "-A" or "-s" not in words:
                continue
            src = ipaddress.ip_network(words[words.index("-s") + 1])
            if "RETURN" in words and "-d" in words:
                excludes.setdefault(src, []).append(
                    ipaddress.ip_network(words[words.index("-d") + 1])
                )
            elif "MASQUERADE" in words:
                masq.append(src)
        rules.extend(MasqRule(s, tuple(excludes.get(s, ()))) for s in masq)
    return normalize(rules) if found else None


def installed(backend: str | None = None) -> list[MasqRule] | None:
    """The rules currently installed (in normalized form), or None if pycni has none there.

    Compare with ``normalize(wanted)``. Best-effort: only understands what pycni renders.
    """
    if resolve_backend(backend) == "nft":
        return _installed_nft()
    return _installed_ipt()
