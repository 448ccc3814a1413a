"""A reference evaluator: would NetworkPolicy let a new connection from ``src`` to ``dst`` pass?

Written from the API's wording and shares nothing with the engine but the objects and the
selector rules, so tests can hold the engine's compiled rules (and later the enforced kernel
matrix) against it. It is deliberately direct and slow: for each question it walks every
policy.

The rules it follows (networking.k8s.io/v1 NetworkPolicySpec and the NetworkPolicy concept
page):

* A connection passes when the egress side of ``src`` allows it and the ingress side of
  ``dst`` allows it.
* A pod is isolated for a direction when at least one policy of its namespace selects it
  (podSelector) and lists that direction in its policyTypes; a pod not isolated in a direction
  allows everything in it. An isolated pod allows what at least one rule of one of those
  policies allows (policies add up).
* A rule allows traffic when its peer list is empty or one peer matches, and its port list is
  empty or one port matches. An ipBlock matches the remote address (cidr, not an except); a
  selector peer matches pod-network pods only. A port matches its protocol and, when given, the
  number, the number range to endPort, or the destination pod's container port of that name and
  protocol.
* Always allowed: traffic between a pod and its own node ("traffic to and from the node where
  a Pod is running is always allowed"), and a pod's traffic to itself ("a Pod cannot block
  access to itself"). Neither a node nor an outside address is ever isolated.
* hostNetwork pods are their node, as upstream's most common implementation treats them.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

from pycni.policy.objects import (
    Address,
    Inventory,
    Namespace,
    NetworkPolicy,
    Node,
    Peer,
    Pod,
    PolicyPort,
    PolicyRule,
    load,
)
from pycni.policy.selectors import peer_selects

Endpoint = Pod | Node | str | Address


def allowed(
    namespaces: Iterable[Namespace | dict],
    pods: Iterable[Pod | dict],
    policies: Iterable[NetworkPolicy | dict],
    src: Endpoint,
    dst: Endpoint,
    protocol: str,
    port: int,
    family: int | None = None,
) -> bool:
    """Whether a new ``protocol`` connection from ``src`` to ``dst``:``port`` is allowed.

    ``src``/``dst``: a pod, the node itself (``Node``), or an address (that of a known pod
    stands for that pod). ``family``: which of dual-stack ends' addresses connect (default: IPv4
    when both ends have one, else IPv6); ends without a common family cannot connect."""
    return Evaluator(load(namespaces, pods, policies)).allowed(src, dst, protocol, port, family)


class Evaluator:
    """``allowed`` over one loaded inventory, for asking many questions."""

    def __init__(self, inventory: Inventory) -> None:
        self.inv = inventory
        self._pods = {p.key: p for p in inventory.pods}
        self._by_ip = {ip: p for p in inventory.pods if not p.host_network for ip in p.ips}

    def allowed(
        self,
        src: Endpoint,
        dst: Endpoint,
        protocol: str,
        port: int,
        family: int | None = None,
    ) -> bool:
        a, b = self._resolve(src), self._resolve(dst)
        if isinstance(a, Pod) and isinstance(b, Pod) and a.key == b.key:
            return True
        if isinstance(a, Node) and isinstance(b, Pod) and b.node == a.name:
            return True
        if isinstance(b, Node) and isinstance(a, Pod) and a.node == b.name:
            return True
        if not isinstance(a, Pod) and not isinstance(b, Pod):
            return True
        pair = _pick_addresses(_addresses(a), _addresses(b), family)
        if pair is None:
            return False
        src_addr, dst_addr = pair
        return self._egress_allows(a, b, dst_addr, protocol, port) and self._ingress_allows(
            a, b, src_addr, protocol, port
        )

    def _resolve(self, end: Endpoint) -> Pod | Node | Address:
        if isinstance(end, Pod):
            pod = self._pods.get(end.key, end)
            return Node(pod.node, pod.ips) if pod.host_network else pod
        if isinstance(end, Node):
            return end
        addr = _address(end)
        return self._by_ip.get(str(addr), addr)

    def _egress_allows(self, src, dst, dst_addr: Address, protocol: str, port: int) -> bool:
        if not isinstance(src, Pod):
            return True
        governing = [p for p in self._selecting(src) if p.affects_egress]
        return not governing or any(
            self._rule_allows(p, rule, dst, dst_addr, dst, protocol, port)
            for p in governing
            for rule in p.egress
        )

    def _ingress_allows(self, src, dst, src_addr: Address, protocol: str, port: int) -> bool:
        if not isinstance(dst, Pod):
            return True
        governing = [p for p in self._selecting(dst) if p.affects_ingress]
        return not governing or any(
            self._rule_allows(p, rule, src, src_addr, dst, protocol, port)
            for p in governing
            for rule in p.ingress
        )

    def _selecting(self, pod: Pod) -> list[NetworkPolicy]:
        return [
            p
            for p in self.inv.policies
            if p.namespace == pod.namespace and p.pod_selector.matches(pod.labels)
        ]

    def _rule_allows(
        self,
        policy: NetworkPolicy,
        rule: PolicyRule,
        remote: Pod | Node | Address,
        remote_addr: Address,
        destination: Pod | Node | Address,
        protocol: str,
        port: int,
    ) -> bool:
        peers_ok = not rule.peers or any(
            self._peer_matches(policy, peer, remote, remote_addr) for peer in rule.peers
        )
        ports_ok = not rule.ports or any(
            _port_matches(pp, destination, protocol, port) for pp in rule.ports
        )
        return peers_ok and ports_ok

    def _peer_matches(
        self, policy: NetworkPolicy, peer: Peer, remote: Pod | Node | Address, addr: Address
    ) -> bool:
        if peer.ip_block is not None:
            return peer.ip_block.contains(addr)
        return isinstance(remote, Pod) and peer_selects(
            peer.pod_selector,
            peer.namespace_selector,
            policy.namespace,
            remote.namespace,
            remote.labels,
            self.inv.namespace_labels(remote.namespace),
        )


def _port_matches(pp: PolicyPort, destination, protocol: str, port: int) -> bool:
    if pp.protocol != protocol:
        return False
    if pp.port is None:
        return True
    if isinstance(pp.port, int):
        return pp.port <= port <= (pp.end_port or pp.port)
    return isinstance(destination, Pod) and any(
        cp.name == pp.port and cp.protocol == protocol and cp.number == port
        for cp in destination.ports
    )


@functools.lru_cache(maxsize=4096)
def _address(ip: str | Address) -> Address:
    return ipaddress.ip_address(ip)


def _addresses(end: Pod | Node | Address) -> tuple[Address, ...]:
    if isinstance(end, Pod | Node):
        return end.addresses
    return (end,)


def _pick_addresses(
    a: tuple[Address, ...], b: tuple[Address, ...], family: int | None
) -> tuple[Address, Address] | None:
    for fam in (family,) if family else (4, 6):
        x = next((i for i in a if i.version == fam), None)
        y = next((i for i in b if i.version == fam), None)
        if x is not None and y is not None:
            return x, y
    return None
