"""pycni's rules for the nftables backend: rendering a RuleSet as an nft script, and reading
back what ``nft -j list`` shows of it. Pure text in and out; sync.py runs nft.

``table inet pycni`` with a filter chain ``forward`` (accept traffic from and to the cluster
CIDRs, and DNATed traffic), a nat chain ``postrouting`` (masquerade pod subnets; hostPort
hairpin and localhost traffic), and for hostPorts a regular chain ``hostports`` (the DNATs)
reached from nat ``prerouting`` and ``output`` for local destinations, plus a filter chain
``input`` guarding 127.0.0.0/8; the whole table is replaced in a single ``nft -f -``
transaction and exists only while it has rules.

Limit of the nft backend: an ``accept`` ends the packet's walk through pycni's base chain
only; another table's forward hook (e.g. iptables' FORWARD with policy DROP, as Docker sets
it) still sees the packet and may drop it. The iptables backend jumps from that very FORWARD
chain, so its accepts do hold there.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Sequence

from pycni.rules.model import (
    HAIRPIN_MARK,
    IPV6_LOOPBACK,
    LOCALNET,
    PROTOCOLS,
    HostPort,
    Interface,
    MasqRule,
    Network,
    PolicyFragment,
    RuleSet,
    hairpin_of,
    quote_store,
    unquote_store,
)

TABLE = "pycni"
NAT_CHAIN = "postrouting"
FWD_CHAIN = "forward"
INPUT_CHAIN = "input"
HOSTPORT_CHAIN = "hostports"
PREROUTING_CHAIN = "prerouting"
OUTPUT_CHAIN = "output"
# A chain nothing jumps to, holding the policy fragment's digest in a rule comment: how the
# installed policy is read back (nft -j shows rule comments, not chain comments).
POLICY_DIGEST_CHAIN = "policy_digest"
# A chain nothing jumps to, one rule per store whose wants the table holds, its data dir in
# the rule's comment: how a store syncing finds the others (RuleSet.stores).
STORES_CHAIN = "stores"


def _proto(version: int) -> str:
    return "ip" if version == 4 else "ip6"


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
    if rules.policy:
        lines += [f"\t{s}" for s in rules.policy.statements]
        lines.append(f"\tchain {POLICY_DIGEST_CHAIN} {{")
        lines.append(f'\t\treturn comment "{rules.policy.digest}"')
        lines.append("\t}")
    if rules.stores:
        lines.append(f"\tchain {STORES_CHAIN} {{")
        lines += [f'\t\treturn comment "{quote_store(d)}"' for d in rules.stores]
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
                f"\t\tct status dnat meta mark & {_MARK} == {_MARK}"
                f" {p} saddr {iface.network} {p} daddr {iface.ip} masquerade"
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


# A policy set statement as rules/policy.py writes it: name, declaration, elements (if any).
_POLICY_SET = re.compile(
    r"^\s*set (\S+) \{ (type [^;]+;(?: flags interval;)?)(?: elements = \{ (.*) \};)? \}$"
)


def render_policy_elements(old: Sequence[str], new: PolicyFragment) -> str | None:
    """An nft script that turns a table holding the policy statements ``old`` into one holding
    ``new``, when the two differ only in the elements of their sets (a pod started, stopped or
    was relabelled): the elements that went deleted, those that came added and the digest rule
    replaced, in one transaction, so no packet sees a half-updated set, and the policies'
    counters live on.
    None when anything else differs (a policy came, went or changed): replace the table."""
    if len(old) != len(new.statements):
        return None
    lines = []
    for before, after in zip(old, new.statements, strict=True):
        if before == after:
            continue
        a, b = _POLICY_SET.match(before), _POLICY_SET.match(after)
        if a is None or b is None or a.group(1, 2) != b.group(1, 2):
            return None
        was, now = _elements(a.group(3)), _elements(b.group(3))
        was_set, now_set = set(was), set(now)
        gone = [e for e in was if e not in now_set]
        came = [e for e in now if e not in was_set]
        if gone:
            lines.append(f"delete element inet {TABLE} {b.group(1)} {{ {', '.join(gone)} }}")
        if came:
            lines.append(f"add element inet {TABLE} {b.group(1)} {{ {', '.join(came)} }}")
    lines.append(f"flush chain inet {TABLE} {POLICY_DIGEST_CHAIN}")
    lines.append(f'add rule inet {TABLE} {POLICY_DIGEST_CHAIN} return comment "{new.digest}"')
    return "\n".join(lines) + "\n"


def _elements(text: str | None) -> list[str]:
    # Addresses, networks and "address . port": none holds a comma.
    return text.split(", ") if text else []


_MARK = f"0x{HAIRPIN_MARK:08x}"  # as nft prints it back


def _nft_dnat(hp: HostPort) -> str:
    p = _proto(hp.version)
    # "any local address" still needs the family: `dnat ip` on an IPv6 packet cannot work.
    match = f"{p} daddr {hp.host_ip}" if hp.host_ip else f"meta nfproto ipv{hp.version}"
    to = f"{hp.pod_ip}:{hp.pod_port}" if hp.version == 4 else f"[{hp.pod_ip}]:{hp.pod_port}"
    # The mark tells the hairpin masquerade that this DNAT was a hostPort's.
    return (
        f"{match} {hp.protocol} dport {hp.host_port} meta mark set meta mark | {_MARK}"
        f" dnat {p} to {to}"
    )


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


def _nft_wants_mark(rule: dict) -> bool:
    """Whether the rule matches ``meta mark & HAIRPIN_MARK == HAIRPIN_MARK`` (a hairpin rule
    from before the mark, masquerading every DNAT, reads back as none: repair replaces it)."""
    for expr in rule.get("expr", []):
        match = expr.get("match") or {}
        left = match.get("left", {})
        if (
            match.get("right") == HAIRPIN_MARK
            and left.get("&", [None])[0] == {"meta": {"key": "mark"}}
            and left["&"][1] == HAIRPIN_MARK
        ):
            return True
    return False


def _nft_sets_mark(rule: dict) -> bool:
    """Whether the rule sets HAIRPIN_MARK (``meta mark set meta mark | ...``)."""
    for expr in rule.get("expr", []):
        mangle = expr.get("mangle") or {}
        if mangle.get("key") == {"meta": {"key": "mark"}} and mangle.get("value") == {
            "|": [{"meta": {"key": "mark"}}, HAIRPIN_MARK]
        }:
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


def parse_nft(listing: str) -> RuleSet:
    """The RuleSet in ``nft -j list table inet pycni`` output (JSON). Only understands what
    render_nft writes: see sync.installed."""
    masq: list[MasqRule] = []
    hostports: list[HostPort] = []
    hairpin: list[Interface] = []
    accepted: dict[str, set[Network]] = {"saddr": set(), "daddr": set()}
    policy = PolicyFragment()
    stores: list[str] = []
    for obj in json.loads(listing).get("nftables", []):
        rule = obj.get("rule")
        if not rule:
            continue
        if rule.get("chain") == POLICY_DIGEST_CHAIN and rule.get("comment"):
            policy = PolicyFragment((), str(rule["comment"]))
            continue
        if rule.get("chain") == STORES_CHAIN and rule.get("comment"):
            stores.append(unquote_store(str(rule["comment"])))
            continue
        if str(rule.get("chain", "")).startswith("policy_"):
            continue  # the policy's own chains are read back through the digest
        matches = _nft_matches(rule)
        if rule.get("chain") == NAT_CHAIN:
            source = [n for f, op, nets in matches if f == "saddr" and op == "==" for n in nets]
            dest = [n for f, op, nets in matches if f == "daddr" and op == "==" for n in nets]
            exclude = [n for f, op, nets in matches if f == "daddr" and op == "!=" for n in nets]
            if _nft_is_dnated(rule):
                # The 127/8 rule has no destination: it comes with the hostports.
                if len(source) == 1 and len(dest) == 1 and _nft_wants_mark(rule):
                    hairpin.append(hairpin_of(source[0], dest[0]))
            elif len(source) == 1:
                masq.append(MasqRule(source[0], tuple(exclude)))
        elif rule.get("chain") == HOSTPORT_CHAIN:
            hp = _nft_hostport(rule)
            if hp is not None and _nft_sets_mark(rule):
                hostports.append(hp)
        elif rule.get("chain") == FWD_CHAIN and any("accept" in e for e in rule["expr"]):
            for f, op, nets in matches:
                if op == "==" and len(nets) == 1:
                    accepted[f].add(nets[0])
    # A cluster CIDR counts as forwarded only with both directions accepted.
    return RuleSet(
        tuple(masq),
        tuple(accepted["saddr"] & accepted["daddr"]),
        tuple(hostports),
        tuple(hairpin),
        policy,
        tuple(stores),
    )
