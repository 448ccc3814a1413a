"""A tiny interpreter of compiled ``NodePolicy`` outputs: what a kernel holding them would do.

It answers the evaluator's question from the engine's output alone, the way the dataplane
will: by addresses, the source node's egress rules and the destination node's ingress rules,
the policies' target sets, the peer sets, the ipBlocks' interval form and the named-port
(address . port) sets. Tests compare it with the independent evaluator, so the compiled form is
checked without a kernel.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable

from pycni.policy.engine import CidrPeer, LocalPod, NodePolicy, Rule, SetPeer
from pycni.policy.objects import Address


class Interpreter:
    """Decides connections from the NodePolicy of every node involved."""

    def __init__(self, node_policies: Iterable[NodePolicy]) -> None:
        self.nodes = {np.node: np for np in node_policies}
        # Which node's bridge a pod address sits behind: what the kernel knows by routing.
        self._local: dict[str, tuple[NodePolicy, LocalPod]] = {
            ip: (np, pod) for np in self.nodes.values() for pod in np.pods for ip in pod.ips
        }
        self._members: dict[tuple[str, str], frozenset] = {}

    def allowed(
        self,
        src_ip: str | None,
        dst_ip: str | None,
        protocol: str,
        port: int,
        *,
        src_host: str | None = None,
        dst_host: str | None = None,
    ) -> bool:
        """Whether a new connection passes. ``src_host``/``dst_host``: the name of the node
        when that end is the node's own stack (the kernel tells by hook: output/input), whose
        address is then optional."""
        src_key, dst_key = _norm(src_ip), _norm(dst_ip)
        s = self._local.get(src_key) if src_host is None and src_key is not None else None
        d = self._local.get(dst_key) if dst_host is None and dst_key is not None else None
        if s and d and s[1] is d[1]:
            return True  # a pod to itself never leaves its namespace
        if src_host is not None and d and d[0].node == src_host:
            return True
        if dst_host is not None and s and s[0].node == dst_host:
            return True
        if not s and not d:
            return True  # no local pod at either end: nothing here enforces
        if src_ip is None or dst_ip is None:
            return False
        src, dst = _address(src_ip), _address(dst_ip)
        if src.version != dst.version:
            return False
        if s and not self._direction(s[0], "egress", src, dst, dst, protocol, port):
            return False
        return not d or self._direction(d[0], "ingress", dst, src, dst, protocol, port)

    def _direction(
        self,
        np: NodePolicy,
        direction: str,
        local: Address,
        remote: Address,
        destination: Address,
        protocol: str,
        port: int,
    ) -> bool:
        isolated = False
        for pol in np.policies:
            rules = pol.ingress if direction == "ingress" else pol.egress
            if rules is None or str(local) not in self._set(np, pol.targets.name(local.version)):
                continue
            isolated = True
            if any(self._rule(np, r, remote, destination, protocol, port) for r in rules):
                return True
        return not isolated

    def _rule(
        self,
        np: NodePolicy,
        rule: Rule,
        remote: Address,
        destination: Address,
        protocol: str,
        port: int,
    ) -> bool:
        if rule.peers is not None and not any(self._peer(np, p, remote) for p in rule.peers):
            return False
        if rule.ports is None or any(r.contains(protocol, port) for r in rule.ports):
            return True
        return any(
            n.protocol == protocol
            and (str(destination), port) in self._set(np, n.sets.name(destination.version))
            for n in rule.named_ports
        )

    def _peer(self, np: NodePolicy, peer: SetPeer | CidrPeer, remote: Address) -> bool:
        if isinstance(peer, SetPeer):
            return str(remote) in self._set(np, peer.sets.name(remote.version))
        return any(remote in net for net in peer.networks())

    def _set(self, np: NodePolicy, name: str) -> frozenset:
        key = (np.node, name)
        if key not in self._members:
            self._members[key] = frozenset(np.elements(name))
        return self._members[key]


@functools.lru_cache(maxsize=4096)
def _address(ip: str) -> Address:
    return ipaddress.ip_address(ip)


def _norm(ip: str | None) -> str | None:
    return None if ip is None else str(_address(ip))
