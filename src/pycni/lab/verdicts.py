"""What the NetworkPolicies stored in the lab say about each path of its connectivity matrix,
from the reference evaluator (`pycni.policy.evaluate`), so a measured failure can be told
from an expected denial.

A path is judged by its TCP probe, to the port the target's probe server listens on. ICMP is
judged only where no policy governs the path (NetworkPolicy speaks of TCP, UDP and SCTP; what
it does to ICMP is up to the implementation). A node reaching its own pods is always allowed;
another node is, to the policies, only the address its packets come from (its VXLAN VTEP's
address, or its underlay address where it routes host-gw), matched by ipBlocks alone.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..cluster.objects import Objects
from ..policy.evaluate import Evaluator
from ..policy.objects import Inventory, Problem, load
from ..policy.objects import Node as PolicyNode
from ..policy.objects import Pod as PolicyPod
from .model import PROBE_PORT, Lab, Node, Pod


@dataclass(frozen=True)
class Verdict:
    allowed: bool = True  # the policies allow the TCP probe
    governed: bool = False  # a policy isolates an end of the path: ICMP is not judged


class Policies:
    """The lab's stored objects, loaded once, asked about many paths."""

    def __init__(self, lab: Lab, objects: Objects | None = None) -> None:
        self.lab = lab
        objects = objects or Objects()
        self.inventory: Inventory = load(objects.namespaces, objects.pods, objects.policies)
        self.evaluator = Evaluator(self.inventory)
        self._pods = {p.key: p for p in self.inventory.pods}

    @property
    def problems(self) -> tuple[Problem, ...]:
        return self.inventory.problems

    @property
    def any(self) -> bool:
        return bool(self.inventory.policies)

    def pod(self, node: Node, pod: Pod) -> PolicyPod:
        """The pod as stored (labels, container ports), or as the lab knows it."""
        stored = self._pods.get(pod.key)
        return stored or PolicyPod(pod.namespace, pod.k8s_name, {}, node.name, tuple(pod.ips))

    def port(self, node: Node, pod: Pod) -> int:
        """The port the pod's probe server listens on: its first TCP container port, else the
        lab's PROBE_PORT (which the lab's own pods declare as `serve`)."""
        ports = [p.number for p in self.pod(node, pod).ports if p.protocol == "TCP"]
        return ports[0] if ports else PROBE_PORT

    def _isolated(self, pod: PolicyPod, ingress: bool) -> bool:
        return any(
            (p.affects_ingress if ingress else p.affects_egress)
            and p.namespace == pod.namespace
            and p.pod_selector.matches(pod.labels)
            for p in self.inventory.policies
        )

    def pod_to_pod(self, na: Node, a: Pod, nb: Node, b: Pod, family: int) -> Verdict:
        src, dst = self.pod(na, a), self.pod(nb, b)
        return Verdict(
            self.evaluator.allowed(src, dst, "TCP", self.port(nb, b), family),
            self._isolated(src, False) or self._isolated(dst, True),
        )

    def node_to_pod(self, node: Node, nb: Node, b: Pod, family: int) -> Verdict:
        dst = self.pod(nb, b)
        if nb is node:
            return Verdict()  # a pod's own node always reaches it
        source = PolicyNode(node.name, (self.node_source(node, nb, family),))
        return Verdict(
            self.evaluator.allowed(source, dst, "TCP", self.port(nb, b), family),
            self._isolated(dst, True),
        )

    def pod_to_address(self, na: Node, a: Pod, address: str, family: int) -> Verdict:
        src = self.pod(na, a)
        return Verdict(
            self.evaluator.allowed(src, address, "TCP", PROBE_PORT, family),
            self._isolated(src, False),
        )

    def node_source(self, node: Node, target: Node, family: int) -> str:
        """The address `node`'s packets to a pod of `target` (another node) come from: its
        underlay address where it routes to `target` directly (host-gw; auto on one
        underlay), else its VTEP's, the network address of its own pod subnet."""
        v6 = family == 6
        direct = self.lab.backend == "host-gw" or (
            self.lab.backend == "auto" and node.lan == target.lan
        )
        if direct:
            return node.lan6_ip if v6 else node.lan_ip
        return str(ipaddress.ip_network(node.subnet6 if v6 else node.subnet).network_address)
