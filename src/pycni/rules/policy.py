"""NetworkPolicy in ``table inet pycni``: a node's compiled ``NodePolicy`` as nft sets and chains.

Pure text out (sync.py applies it with the rest of the table, in the same ``nft -f``
transaction). The layout keeps the ruleset's *shape* a function of the policies alone, so a pod
starting, stopping or being relabelled changes set elements, never chains:

* ``policy_forward``, a base chain on the forward hook just before pycni's ``forward``: replies
  of allowed connections pass (``ct state established,related``), and so does IPv6 neighbour
  discovery (ICMPv6 neighbour solicitations and advertisements: IPv6's ARP, which pods of one
  node exchange across the bridge); a new connection whose source is an egress-isolated pod
  of this node jumps to ``policy_egress_v4/6``, one whose destination is an ingress-isolated
  pod jumps to ``policy_ingress_v4/6``. A TCP packet to or from an isolated pod that belongs
  to no known connection and is not a SYN is dropped: conntrack would otherwise take it up
  mid-stream as a new connection in its own direction, and a connection the agent cut would
  come back with its peer's next segment. A pod no policy isolates costs one set lookup per
  new connection and direction, nothing else.
* ``policy_egress_vN`` / ``policy_ingress_vN``: one rule per (policy, rule, peer, port), each
  ANDing the policy's target set with the rule's peer and port match and ending in ``return``
  (allowed in this direction: go on to the other direction's check). Whatever no rule allows
  is counted against every policy isolating the pod and dropped.
* Traffic of the node itself (input and output hooks) is never filtered: kubelet probes and
  hostNetwork pods always reach the node's pods, as upstream implementations do; nor is a
  pod's traffic to itself (a Service DNATing it back to its source: ``policy_self_vN``).

Denied traffic is dropped, not rejected: clients see what a firewall does (a timeout), as
with Calico's and kube-network-policies' defaults, and no ICMP or RST leaves on a policy's
behalf. Same-node traffic crosses ``cni0`` as bridged frames: they reach the forward hook only
with br_netfilter (``net.bridge.bridge-nf-call-iptables``/``ip6tables`` = 1 in the node's
network namespace), which the agent turns on and the doctor checks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pycni.policy.engine import (
    CidrPeer,
    CompiledPolicy,
    NamedPort,
    NodePolicy,
    PortRange,
    Rule,
    SetPeer,
)

BASE_CHAIN = "policy_forward"
# Just before pycni's own forward chain (priority filter): a drop here is final for the packet.
PRIORITY = "filter - 5"
FAMILIES = (4, 6)
# Neighbour solicitations and advertisements: never filtered (conntrack leaves them untracked,
# so no "established" rule would let them through).
ND_TYPES = ("nd-neighbor-solicit", "nd-neighbor-advert")


def _ip(family: int) -> str:
    return "ip" if family == 4 else "ip6"


def _addr_type(family: int) -> str:
    return "ipv4_addr" if family == 4 else "ipv6_addr"


def isolated_set(direction: str, family: int) -> str:
    return f"policy_{direction}_isolated_v{family}"


def self_set(family: int) -> str:
    return f"policy_self_v{family}"


def direction_chain(direction: str, family: int) -> str:
    return f"policy_{direction}_v{family}"


def allow_counter(policy: CompiledPolicy) -> str:
    return f"policy_{policy.id.key}_allow"


def deny_counter(policy: CompiledPolicy) -> str:
    return f"policy_{policy.id.key}_deny"


@dataclass(frozen=True)
class PolicyRules:
    """A node's NetworkPolicy rules ready for the table: the nft statements inside
    ``table inet pycni { ... }``, and which counter belongs to which policy (for metrics)."""

    statements: tuple[str, ...] = ()
    counters: tuple[tuple[str, str, str], ...] = ()  # (counter, "namespace/name", allow|deny)

    def __bool__(self) -> bool:
        return bool(self.statements)


def render(node: NodePolicy) -> PolicyRules:
    """The statements enforcing ``node``; empty when no policy exists at all."""
    if not node.policies:
        return PolicyRules()
    out: list[str] = []
    for s in node.address_sets:
        out += _set(s.name, _addr_type(s.family), s.elements)
    for p in node.port_sets:
        elements = [f"{addr} . {port}" for addr, port in p.elements]
        out += _set(p.name, f"{_addr_type(p.family)} . inet_service", elements, interval=False)
    isolated = {
        ("ingress", f): sorted(
            ip for pod in node.pods if pod.ingress for ip in pod.ips if _fam(ip) == f
        )
        for f in FAMILIES
    }
    isolated |= {
        ("egress", f): sorted(
            ip for pod in node.pods if pod.egress for ip in pod.ips if _fam(ip) == f
        )
        for f in FAMILIES
    }
    for (direction, family), ips in sorted(isolated.items()):
        out += _set(isolated_set(direction, family), _addr_type(family), ips, interval=False)
    for family in FAMILIES:
        either = sorted(set(isolated["ingress", family]) | set(isolated["egress", family]))
        out += _set(isolated_set("any", family), _addr_type(family), either, interval=False)
    for family in FAMILIES:
        # A pod reaching itself (through a Service DNATed back to it) is never filtered.
        pairs = [f"{ip} . {ip}" for pod in node.pods for ip in pod.ips if _fam(ip) == family]
        t = _addr_type(family)
        out += _set(self_set(family), f"{t} . {t}", pairs, interval=False)
    counters = []
    for policy in node.policies:
        for kind, name in (("allow", allow_counter(policy)), ("deny", deny_counter(policy))):
            out.append(f"  counter {name} {{ }}")
            counters.append((name, str(policy.id), kind))
    out += [
        f"  chain {BASE_CHAIN} {{",
        f"    type filter hook forward priority {PRIORITY}; policy accept;",
        "    ct state established,related accept",
        # IPv6 neighbour discovery between pods of this node (they share the bridge's
        # subnet) is what ARP is to IPv4, which this table never sees: an isolated pod must
        # still resolve its neighbours and answer theirs, or even what its policies allow,
        # and the replies to it, fail with "no route to host".
        f"    icmpv6 type {{ {', '.join(ND_TYPES)} }} accept",
        f"    ip saddr . ip daddr @{self_set(4)} accept",
        f"    ip6 saddr . ip6 daddr @{self_set(6)} accept",
    ]
    # From here on no packet belongs to a connection conntrack knows. A TCP one that is not
    # a connection's first SYN would be picked up mid-stream as a new connection in whatever
    # direction it flows: a connection the agent cut because a policy denies it would come
    # back with its peer's next segment, judged as the peer's connection to the pod. To and
    # from isolated pods, only a SYN starts a TCP connection.
    for family in FAMILIES:
        for addr in ("saddr", "daddr"):
            out.append(
                f"    tcp flags & (fin | syn | rst | ack) != syn {_ip(family)} {addr} "
                f"@{isolated_set('any', family)} counter drop"
            )
    for direction, addr in (("egress", "saddr"), ("ingress", "daddr")):
        for family in FAMILIES:
            ip = _ip(family)
            out.append(
                f"    {ip} {addr} @{isolated_set(direction, family)} "
                f"jump {direction_chain(direction, family)}"
            )
    out.append("  }")
    for direction in ("egress", "ingress"):
        for family in FAMILIES:
            out += _direction_chain(node.policies, direction, family)
    return PolicyRules(tuple(out), tuple(counters))


def _fam(ip: str) -> int:
    return 6 if ":" in ip else 4


def _set(name: str, type_: str, elements: Iterable[str], interval: bool = True) -> list[str]:
    # Interval sets take CIDRs as well as addresses; pod sets stay plain (faster lookups).
    flags = " flags interval;" if interval else ""
    items = list(elements)
    body = f" elements = {{ {', '.join(items)} }};" if items else ""
    return [f"  set {name} {{ type {type_};{flags}{body} }}"]


def _direction_chain(policies: Iterable[CompiledPolicy], direction: str, family: int) -> list[str]:
    ip = _ip(family)
    own, remote = ("saddr", "daddr") if direction == "egress" else ("daddr", "saddr")
    lines = [f"  chain {direction_chain(direction, family)} {{"]
    governing = [p for p in policies if getattr(p, direction) is not None]
    for policy in governing:
        target = f"{ip} {own} @{policy.targets.name(family)}"
        for rule in getattr(policy, direction):
            for match in _rule_matches(rule, family, remote):
                parts = [target, match, f"counter name {allow_counter(policy)} return"]
                lines.append("    " + " ".join(p for p in parts if p))
    # Nothing allowed it: count it against each policy isolating the pod, then drop.
    for policy in governing:
        target = f"{ip} {own} @{policy.targets.name(family)}"
        lines.append(f"    {target} counter name {deny_counter(policy)}")
    lines += ["    drop", "  }"]
    return lines


def _rule_matches(rule: Rule, family: int, remote: str) -> list[str]:
    """The nft match expressions (ORed: one rule each) of one compiled rule in one family."""
    ip = _ip(family)
    if rule.peers is None:
        peers = [""]
    else:
        peers = []
        for peer in rule.peers:
            if isinstance(peer, SetPeer):
                peers.append(f"{ip} {remote} @{peer.sets.name(family)}")
            elif isinstance(peer, CidrPeer) and peer.family == family:
                nets = ", ".join(str(n) for n in peer.networks())
                if nets:
                    peers.append(f"{ip} {remote} {{ {nets} }}")
        if not peers:
            return []  # no peer of this family: the rule allows nothing here
    ports = _port_matches(rule.ports, rule.named_ports, family)
    if not ports:
        return []
    return [f"{peer} {port}".strip() for peer in peers for port in ports]


def _port_matches(
    ports: tuple[PortRange, ...] | None, named: tuple[NamedPort, ...], family: int
) -> list[str]:
    if ports is None and not named:
        return [""]
    out = []
    for pr in ports or ():
        if (pr.first, pr.last) == (0, 65535):
            out.append(f"meta l4proto {pr.protocol.lower()}")
        elif pr.first == pr.last:
            out.append(f"{pr.protocol.lower()} dport {pr.first}")
        else:
            out.append(f"{pr.protocol.lower()} dport {pr.first}-{pr.last}")
    for np in named:
        proto = np.protocol.lower()
        out.append(
            f"meta l4proto {proto} {_ip(family)} daddr . {proto} dport @{np.sets.name(family)}"
        )
    return out
