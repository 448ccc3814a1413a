"""The upstream NetworkPolicy e2e world for the policy unit tests (tests/unit/test_policy_*.py):
namespaces x, y, z (label ns=<name>), pods a, b, c in each (label pod=<name>), every pod
serving ports 80 and 81 over TCP, UDP and SCTP under the names serve-<port>-<protocol>, spread
over two nodes, dual stack; and truth tables to state expected connectivity the way the e2e
tests print it.
"""

from __future__ import annotations

from pycni.policy.engine import compile_inventory
from pycni.policy.evaluate import Evaluator
from pycni.policy.interpret import Interpreter
from pycni.policy.objects import ContainerPort, Inventory, Namespace, Node, Pod, load

NAMESPACES = ("x", "y", "z")
POD_NAMES = ("a", "b", "c")
NODES = ("node1", "node2")
NODE_IPS = {"node1": ("192.168.0.1", "fd00:ffff::1"), "node2": ("192.168.0.2", "fd00:ffff::2")}


def pod_ips(ns: str, pod: str) -> tuple[str, str]:
    """x/a is 10.0.0.1, y/b 10.0.1.2...: each namespace has its own /24 (and /112)."""
    i, j = NAMESPACES.index(ns), POD_NAMES.index(pod) + 1
    return f"10.0.{i}.{j}", f"fd00::{i}:{j}"


def world_namespaces() -> list[Namespace]:
    return [Namespace(n, {"ns": n}) for n in NAMESPACES]


def world_pods() -> list[Pod]:
    ports = tuple(
        ContainerPort(f"serve-{n}-{proto.lower()}", proto, n)
        for n in (80, 81)
        for proto in ("TCP", "UDP", "SCTP")
    )
    return [
        Pod(ns, p, {"pod": p}, NODES[(i + j) % 2], pod_ips(ns, p), ports)
        for i, ns in enumerate(NAMESPACES)
        for j, p in enumerate(POD_NAMES)
    ]


def policy(name: str, namespace: str, spec: dict) -> dict:
    """A NetworkPolicy in the JSON form kubectl prints."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }


def parse_table(text: str) -> dict[tuple[str, str], bool]:
    """A truth table: a header of destinations, then one row per source; "." allowed,
    "X" denied."""
    lines = [ln.split() for ln in text.strip().splitlines()]
    header, rows = lines[0], lines[1:]
    out = {}
    for row in rows:
        src, marks = row[0], row[1:]
        assert len(marks) == len(header), row
        for dst, mark in zip(header, marks, strict=True):
            assert mark in ".X", mark
            out[(src, dst)] = mark == "."
    return out


def format_table(matrix: dict[tuple[str, str], bool], names: list[str]) -> str:
    lines = ["    " + " ".join(f"{n:>3}" for n in names)]
    for s in names:
        lines.append(f"{s:>3} " + " ".join(f"{'.' if matrix[(s, d)] else 'X':>3}" for d in names))
    return "\n".join(lines)


class World:
    """One inventory, its evaluator, and the interpreter over every node's compiled rules."""

    def __init__(self, policies: list[dict], namespaces=None, pods=None) -> None:
        self.inventory: Inventory = load(
            world_namespaces() if namespaces is None else namespaces,
            world_pods() if pods is None else pods,
            policies,
        )
        assert not self.inventory.problems, self.inventory.problems
        nodes = sorted({p.node for p in self.inventory.pods if p.node})
        self.compiled = {n: compile_inventory(n, self.inventory) for n in nodes}
        self.evaluator = Evaluator(self.inventory)
        self.interpreter = Interpreter(self.compiled.values())
        self.pods = {p.key: p for p in self.inventory.pods}

    def evaluated(self, protocol: str, port: int, family: int = 4) -> dict:
        return {
            (s, d): self.evaluator.allowed(self.pods[s], self.pods[d], protocol, port, family)
            for s in self.pods
            for d in self.pods
        }

    def interpreted(self, protocol: str, port: int, family: int = 4) -> dict:
        def ip(key: str) -> str:
            return next(a for a in self.pods[key].ips if (":" in a) == (family == 6))

        return {
            (s, d): self.interpreter.allowed(ip(s), ip(d), protocol, port)
            for s in self.pods
            for d in self.pods
        }

    def node(self, name: str) -> Node:
        return Node(name, NODE_IPS[name])
