"""The policy engine: from namespaces, pods and NetworkPolicies, one node's desired rules.

Pure: plain objects in, a ``NodePolicy`` out, no kernel, no API client. The output is shaped
for an nftables renderer and for stability: its *shape* (policies, rules, set names) depends
only on the policies, never on which pods exist, so a pod starting, stopping or changing labels
only changes set elements, never the rules.

How a renderer reads it (NetworkPolicy v1 semantics):

* Replies of allowed connections always pass (``ct state established,related accept``), and so
  does traffic between a pod and its own node (the host's stack: kubelet probes, hostNetwork
  pods), and a pod's traffic to itself.
* Each ``CompiledPolicy`` applies to the local pods in its ``targets`` sets (one per family).
  A packet leaving a target (source address in the set) is checked against the policy's
  ``egress`` rules, one entering a target (destination in the set) against its ``ingress``
  rules; ``None`` means the policy does not govern that direction, ``()`` that it allows
  nothing in it.
* A pod is isolated in a direction when some policy governing that direction targets it
  (``LocalPod.ingress`` / ``.egress`` list them); traffic in that direction is then allowed
  only if a rule of one of those policies matches, and the egress check at the source and the
  ingress check at the destination must both allow.
* A ``Rule`` matches when the remote address matches one of ``peers`` (``None``: any address)
  and the traffic matches one of ``ports`` (``None``: any protocol and port) or one of
  ``named_ports``: (destination address, destination port) in that set, for its protocol.
  Named ports resolve on the destination pod, which is the local target for ingress and the
  remote pod for egress, so both are an (address . port) lookup keyed on the destination.
* A ``SetPeer`` is the pods (on any node) one peer selects; a ``CidrPeer`` an ipBlock, also
  given as its interval form (``networks()``: cidr minus excepts).

Set names are short, deterministic and derived from what fills the set (a peer's selectors and
the namespace they are relative to; a policy podSelector; a protocol and port name), so equal
peers of different policies share one set.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property

from pycni.policy.objects import (
    Inventory,
    Namespace,
    Network,
    NetworkPolicy,
    Peer,
    Pod,
    PolicyPort,
    PolicyRule,
    Problem,
    load,
)
from pycni.policy.selectors import EVERYTHING, LabelSelector, peer_selects

log = logging.getLogger("pycni.policy")

FAMILIES = (4, 6)
ALL_PORTS = (0, 65535)


@dataclass(frozen=True, order=True)
class PolicyId:
    """Which NetworkPolicy a rule comes from; ``key`` is a short stable token for chain names
    and per-policy counters."""

    namespace: str
    name: str

    @property
    def key(self) -> str:
        return _digest(f"{self.namespace}/{self.name}", 10)

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, order=True)
class SetRef:
    """The two same-purpose sets of one thing, one per address family."""

    v4: str
    v6: str

    def name(self, family: int) -> str:
        return self.v4 if family == 4 else self.v6


@dataclass(frozen=True, order=True)
class PortRange:
    """``first``..``last`` of ``protocol``; (0, 65535) is every port of it."""

    protocol: str
    first: int
    last: int

    def contains(self, protocol: str, port: int) -> bool:
        return protocol == self.protocol and self.first <= port <= self.last


@dataclass(frozen=True)
class SetPeer:
    """The pods a peer's selectors pick, as address sets."""

    sets: SetRef


@dataclass(frozen=True)
class CidrPeer:
    """An ipBlock: ``cidr`` except ``excepts``."""

    cidr: Network
    excepts: tuple[Network, ...] = ()

    @property
    def family(self) -> int:
        return self.cidr.version

    def networks(self) -> tuple[Network, ...]:
        """The block as disjoint networks (cidr minus excepts), for an interval set."""
        nets: list[Network] = [self.cidr]
        for ex in self.excepts:
            kept: list[Network] = []
            # Every piece is a subnet of cidr, as is ex: a piece overlapping ex either holds
            # it (split around it) or lies inside it (dropped).
            for net in nets:
                if not net.overlaps(ex):
                    kept.append(net)
                elif ex.subnet_of(net):  # type: ignore[arg-type]
                    kept.extend(net.address_exclude(ex))  # type: ignore[arg-type]
            nets = kept
        return tuple(ipaddress.collapse_addresses(nets))  # type: ignore[type-var]


# What a compiled rule matches the remote end against.
RulePeer = SetPeer | CidrPeer


@dataclass(frozen=True, order=True)
class NamedPort:
    """A port named on the destination pod: (address . port) pairs in ``sets``."""

    protocol: str
    name: str
    sets: SetRef


@dataclass(frozen=True)
class Rule:
    """One ingress/egress rule of a policy (``index`` in the policy's list), compiled."""

    index: int
    peers: tuple[RulePeer, ...] | None
    ports: tuple[PortRange, ...] | None
    named_ports: tuple[NamedPort, ...] = ()


@dataclass(frozen=True)
class CompiledPolicy:
    id: PolicyId
    targets: SetRef
    ingress: tuple[Rule, ...] | None
    egress: tuple[Rule, ...] | None


@dataclass(frozen=True)
class AddressSet:
    name: str
    family: int
    elements: tuple[str, ...]


@dataclass(frozen=True)
class PortSet:
    """(address, port number) elements of one protocol: a named port, resolved per pod."""

    name: str
    family: int
    protocol: str
    elements: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class LocalPod:
    """A pod of this node with addresses, and the policies isolating it per direction."""

    namespace: str
    name: str
    ips: tuple[str, ...]
    ingress: tuple[PolicyId, ...]
    egress: tuple[PolicyId, ...]


@dataclass(frozen=True)
class NodePolicy:
    """Everything one node enforces. ``waiting``: its pods without addresses yet (nothing to
    enforce until they have some); ``problems``: objects left out as invalid."""

    node: str
    pods: tuple[LocalPod, ...]
    policies: tuple[CompiledPolicy, ...]
    address_sets: tuple[AddressSet, ...]
    port_sets: tuple[PortSet, ...]
    waiting: tuple[str, ...] = ()
    problems: tuple[Problem, ...] = ()

    @cached_property
    def _sets(self) -> dict[str, AddressSet | PortSet]:
        sets: list[AddressSet | PortSet] = [*self.address_sets, *self.port_sets]
        return {s.name: s for s in sets}

    def elements(self, name: str) -> tuple:
        """The elements of the address or port set ``name``."""
        return self._sets[name].elements

    def address_set(self, name: str) -> AddressSet:
        s = self._sets[name]
        assert isinstance(s, AddressSet)
        return s

    def port_set(self, name: str) -> PortSet:
        s = self._sets[name]
        assert isinstance(s, PortSet)
        return s

    def shape(self) -> tuple:
        """What the ruleset looks like without set elements: equal shapes need only element
        updates, different ones a new ruleset."""
        return (
            self.policies,
            tuple((s.name, s.family) for s in self.address_sets),
            tuple((s.name, s.family, s.protocol) for s in self.port_sets),
        )

    def sizes(self) -> dict[str, int]:
        """Counts for status output."""
        return {
            "pods": len(self.pods),
            "waiting": len(self.waiting),
            "isolated_ingress": sum(1 for p in self.pods if p.ingress),
            "isolated_egress": sum(1 for p in self.pods if p.egress),
            "policies": len(self.policies),
            "active_policies": sum(1 for p in self.policies if self._targets(p)),
            "rules": sum(len(p.ingress or ()) + len(p.egress or ()) for p in self.policies),
            "address_sets": len(self.address_sets),
            "address_elements": sum(len(s.elements) for s in self.address_sets),
            "port_sets": len(self.port_sets),
            "port_elements": sum(len(s.elements) for s in self.port_sets),
            "problems": len(self.problems),
        }

    def policy_sizes(self) -> dict[str, dict[str, int]]:
        """Per policy ("namespace/name"): local targets, rules per direction."""
        return {
            str(p.id): {
                "targets": self._targets(p),
                "ingress_rules": len(p.ingress or ()),
                "egress_rules": len(p.egress or ()),
            }
            for p in self.policies
        }

    def _targets(self, policy: CompiledPolicy) -> int:
        return sum(len(self.address_set(policy.targets.name(f)).elements) for f in FAMILIES)


def compile_node(
    node: str,
    namespaces: Iterable[Namespace | dict],
    pods: Iterable[Pod | dict],
    policies: Iterable[NetworkPolicy | dict],
) -> NodePolicy:
    """The desired rules of ``node``. Objects may be given parsed or as Kubernetes JSON dicts;
    invalid ones are reported in ``problems`` and left out, never raised."""
    return compile_inventory(node, load(namespaces, pods, policies))


def compile_inventory(node: str, inventory: Inventory) -> NodePolicy:
    """``compile_node`` over already loaded objects (to compile several nodes at once)."""
    b = _Builder(node, inventory)
    problems = list(inventory.problems)
    compiled: list[CompiledPolicy] = []
    valid: list[NetworkPolicy] = []
    for pol in inventory.policies:
        try:
            compiled.append(b.policy(pol))
            valid.append(pol)
        except Exception as exc:  # noqa: BLE001 - one bad policy must not stop the node
            log.exception("policy %s could not be compiled", pol.key)
            problems.append(
                Problem("NetworkPolicy", pol.namespace, pol.name, "", f"internal: {exc!r}")
            )
    local_pods = tuple(b.local_pod(p, valid) for p in b.local)
    waiting = tuple(
        p.key for p in inventory.pods if p.node == node and not p.host_network and not p.ips
    )
    return NodePolicy(
        node=node,
        pods=local_pods,
        policies=tuple(compiled),
        address_sets=tuple(sorted(b.address_sets.values(), key=lambda s: s.name)),
        port_sets=tuple(sorted(b.port_sets.values(), key=lambda s: s.name)),
        waiting=waiting,
        problems=tuple(problems),
    )


class _Builder:
    """Compiles policies for one node, creating each named set once."""

    def __init__(self, node: str, inv: Inventory) -> None:
        self.inv = inv
        # Pods policy can name: pod-network pods with addresses, on any node.
        self.selectable = [p for p in inv.pods if not p.host_network and p.ips]
        self.local = [p for p in self.selectable if p.node == node]
        # Selectors see only a pod's namespace and labels, which many pods share (the replicas
        # of a Deployment): each selector is matched once per distinct pair, not once per pod.
        self.groups = _groups(self.selectable)
        self.local_groups = _groups(self.local)
        self.address_sets: dict[str, AddressSet] = {}
        self.port_sets: dict[str, PortSet] = {}
        self._names: dict[str, str] = {}  # name stem -> the key it was made from
        self._selecting: dict[_GroupKey, list[NetworkPolicy]] = {}

    def policy(self, pol: NetworkPolicy) -> CompiledPolicy:
        pid = PolicyId(pol.namespace, pol.name)
        targets = self._pod_sets(
            "t",
            ["targets", pol.namespace, pol.pod_selector.canonical()],
            lambda: [
                p
                for (namespace, labels), pods in self.local_groups.items()
                if namespace == pol.namespace and pol.pod_selector.matches(dict(labels))
                for p in pods
            ],
        )
        ingress = egress = None
        if pol.affects_ingress:
            ingress = tuple(self.rule(pol, i, r, "local") for i, r in enumerate(pol.ingress))
        if pol.affects_egress:
            egress = tuple(self.rule(pol, i, r, "all") for i, r in enumerate(pol.egress))
        return CompiledPolicy(pid, targets, ingress, egress)

    def rule(self, pol: NetworkPolicy, index: int, rule: PolicyRule, scope: str) -> Rule:
        """``scope``: whose named ports a rule's named ports resolve on: "local" pods for
        ingress (the destination is the target), "all" pods for egress."""
        peers = None
        if rule.peers:
            peers = tuple(dict.fromkeys(self.peer(pol.namespace, p) for p in rule.peers))
        if not rule.ports:
            return Rule(index, peers, None)
        numeric = [_port_range(pp) for pp in rule.ports if not isinstance(pp.port, str)]
        named = sorted(
            {self.named_port(scope, pp) for pp in rule.ports if isinstance(pp.port, str)}
        )
        return Rule(index, peers, _merge(numeric), tuple(named))

    def peer(self, namespace: str, peer: Peer) -> RulePeer:
        if peer.ip_block is not None:
            return CidrPeer(peer.ip_block.cidr, tuple(sorted(set(peer.ip_block.excepts))))
        pods_sel, ns_sel = peer.pod_selector, peer.namespace_selector
        if ns_sel is not None and pods_sel is None:
            pods_sel = EVERYTHING  # namespaceSelector alone: every pod of those namespaces
        # The policy's namespace matters only when no namespaceSelector is given.
        key = [
            "peer",
            namespace if ns_sel is None else None,
            _canon(pods_sel),
            _canon(ns_sel),
        ]

        def pods() -> list[Pod]:
            return [
                p
                for (pod_namespace, labels), group in self.groups.items()
                if peer_selects(
                    pods_sel,
                    ns_sel,
                    namespace,
                    pod_namespace,
                    dict(labels),
                    self.inv.namespace_labels(pod_namespace),
                )
                for p in group
            ]

        return SetPeer(self._pod_sets("p", key, pods))

    def named_port(self, scope: str, pp: PolicyPort) -> NamedPort:
        assert isinstance(pp.port, str)
        pods = self.local if scope == "local" else self.selectable
        key = ["port", scope, pp.protocol, pp.port]
        stem = self._stem("n", key)
        names = SetRef(f"n4_{stem}", f"n6_{stem}")
        if names.v4 not in self.port_sets:
            for family in FAMILIES:
                # Sorted as parsed addresses (by number), then written out.
                found = {
                    (a, cp.number)
                    for p in pods
                    for cp in p.ports
                    if cp.name == pp.port and cp.protocol == pp.protocol
                    for a in p.addresses
                    if a.version == family
                }
                ordered = sorted(found, key=lambda e: (int(e[0]), e[1]))
                name = names.name(family)
                self.port_sets[name] = PortSet(
                    name, family, pp.protocol, tuple((str(a), n) for a, n in ordered)
                )
        return NamedPort(pp.protocol, pp.port, names)

    def local_pod(self, pod: Pod, policies: list[NetworkPolicy]) -> LocalPod:
        group = _group_key(pod)
        selecting = self._selecting.get(group)
        if selecting is None:
            selecting = self._selecting[group] = [
                p
                for p in policies
                if p.namespace == pod.namespace and p.pod_selector.matches(pod.labels)
            ]
        return LocalPod(
            pod.namespace,
            pod.name,
            pod.ips,
            tuple(PolicyId(p.namespace, p.name) for p in selecting if p.affects_ingress),
            tuple(PolicyId(p.namespace, p.name) for p in selecting if p.affects_egress),
        )

    def _pod_sets(self, prefix: str, key: list, pods: Callable[[], list[Pod]]) -> SetRef:
        """The sets named after ``key``, filled with the addresses of ``pods()`` (called only
        the first time: equal peers of many policies share one set)."""
        stem = self._stem(prefix, key)
        names = SetRef(f"{prefix}4_{stem}", f"{prefix}6_{stem}")
        if names.v4 not in self.address_sets:
            chosen = pods()
            for family in FAMILIES:
                ips = {a for p in chosen for a in p.addresses if a.version == family}
                name = names.name(family)
                self.address_sets[name] = AddressSet(
                    name, family, tuple(str(a) for a in sorted(ips, key=int))
                )
        return names

    def _stem(self, prefix: str, key: list) -> str:
        """A short hash of ``key``; lengthened in the (unlikely) case of a collision."""
        text = json.dumps(key, separators=(",", ":"))
        n = 10
        while True:
            stem = _digest(text, n)
            if self._names.setdefault(f"{prefix}{stem}", text) == text:
                return stem
            n += 2


_GroupKey = tuple[str, frozenset[tuple[str, str]]]


def _group_key(pod: Pod) -> _GroupKey:
    return pod.namespace, frozenset(pod.labels.items())


def _groups(pods: Iterable[Pod]) -> dict[_GroupKey, list[Pod]]:
    """Pods by (namespace, labels), each group in the pods' order."""
    out: dict[_GroupKey, list[Pod]] = {}
    for pod in pods:
        out.setdefault(_group_key(pod), []).append(pod)
    return out


def _canon(selector: LabelSelector | None) -> list | None:
    return None if selector is None else selector.canonical()


def _port_range(pp: PolicyPort) -> PortRange:
    if pp.port is None:
        return PortRange(pp.protocol, *ALL_PORTS)
    assert isinstance(pp.port, int)
    return PortRange(pp.protocol, pp.port, pp.end_port or pp.port)


def _merge(ranges: list[PortRange]) -> tuple[PortRange, ...]:
    """Sorted, overlapping or adjacent ranges of a protocol joined (nft interval sets reject
    overlapping elements)."""
    out: list[PortRange] = []
    for r in sorted(ranges):
        last = out[-1] if out else None
        if last and last.protocol == r.protocol and r.first <= last.last + 1:
            out[-1] = PortRange(r.protocol, last.first, max(last.last, r.last))
        else:
            out.append(r)
    return tuple(out)


def _digest(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]
