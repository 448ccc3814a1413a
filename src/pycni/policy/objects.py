"""NetworkPolicy's inputs as plain data, and their parsing from the Kubernetes JSON form.

Owns what a Namespace, a Pod and a NetworkPolicy are to the policy code, the API's validation
rules (the same the API server applies, so an object a datastore without validation hands us is
judged as Kubernetes would judge it) and the API's defaulting (``policyTypes``). Nothing here
decides traffic: the engine and the reference evaluator both start from these objects.

Invalid input never raises out of ``load``: each bad object becomes a ``Problem`` naming the
object and the field, is logged, and is left out.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from typing import NoReturn

from pycni.policy.selectors import LabelSelector, SelectorError, parse_selector

log = logging.getLogger("pycni.policy")

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

PROTOCOLS = ("TCP", "UDP", "SCTP")
INGRESS, EGRESS = "Ingress", "Egress"
# The API server sets this label on every namespace (immutable, equal to the name).
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
# A port name as the API accepts it (IANA_SVC_NAME): at most 15 of [a-z0-9-], a letter among
# them, no leading, trailing or doubled hyphen.
_PORT_NAME_RE = re.compile(r"^(?=.*[a-z])[a-z0-9]([a-z0-9]|-(?!-))*(?<!-)$")


class PolicyError(ValueError):
    """An invalid object: its kind, namespace/name, the offending field and why."""

    def __init__(self, kind: str, namespace: str, name: str, field: str, message: str) -> None:
        self.problem = Problem(kind, namespace, name, field, message)
        super().__init__(str(self.problem))


@dataclass(frozen=True)
class Problem:
    """One invalid (left out) object, for the log and status output."""

    kind: str
    namespace: str
    name: str
    field: str
    message: str

    def __str__(self) -> str:
        who = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind} {who}: {self.field}: {self.message}"


@dataclass(frozen=True)
class Namespace:
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", {**self.labels, NAMESPACE_NAME_LABEL: self.name})


@dataclass(frozen=True)
class ContainerPort:
    """A port one of the pod's containers declares; ``name`` may be ""."""

    name: str
    protocol: str
    number: int


@dataclass(frozen=True)
class Pod:
    """A pod as policy sees it. ``ips``: its pod IPs (none before the runtime networked it, or
    once it finished); ``host_network`` pods share their node's addresses, and policy neither
    selects them nor names them as peers (traffic from them is traffic from the node)."""

    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    node: str = ""
    ips: tuple[str, ...] = ()
    ports: tuple[ContainerPort, ...] = ()
    host_network: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", dict(self.labels))
        object.__setattr__(self, "ips", tuple(str(ipaddress.ip_address(a)) for a in self.ips))
        object.__setattr__(self, "ports", tuple(self.ports))

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @cached_property
    def addresses(self) -> tuple[Address, ...]:
        return tuple(ipaddress.ip_address(a) for a in self.ips)


@dataclass(frozen=True)
class Node:
    """The node itself (its host network namespace: kubelet, hostNetwork pods) as an end of
    a connection; ``ips`` its own addresses."""

    name: str
    ips: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "ips", tuple(str(ipaddress.ip_address(a)) for a in self.ips))

    @cached_property
    def addresses(self) -> tuple[Address, ...]:
        return tuple(ipaddress.ip_address(a) for a in self.ips)


@dataclass(frozen=True)
class IPBlock:
    """``cidr`` minus every network in ``excepts`` (each a strict subnet of ``cidr``)."""

    cidr: Network
    excepts: tuple[Network, ...] = ()

    def contains(self, address: Address) -> bool:
        return address in self.cidr and not any(address in e for e in self.excepts)


@dataclass(frozen=True)
class PolicyPort:
    """``port``: None (every port of ``protocol``), a number (to ``end_port`` when set) or a
    container port's name, resolved on the destination pod."""

    protocol: str = "TCP"
    port: int | str | None = None
    end_port: int | None = None


@dataclass(frozen=True)
class Peer:
    """One ``from``/``to`` entry: an ipBlock, or pod and/or namespace selectors (None: absent)."""

    pod_selector: LabelSelector | None = None
    namespace_selector: LabelSelector | None = None
    ip_block: IPBlock | None = None


@dataclass(frozen=True)
class PolicyRule:
    """An ingress or egress rule. Empty ``peers``: every peer; empty ``ports``: all traffic."""

    peers: tuple[Peer, ...] = ()
    ports: tuple[PolicyPort, ...] = ()


@dataclass(frozen=True)
class NetworkPolicy:
    """A NetworkPolicy with its API defaults applied: ``policy_types`` None means "not given",
    which becomes Ingress, plus Egress when the policy has egress rules (the API's defaulting:
    a policy with only egress rules and no policyTypes also isolates its pods for ingress)."""

    namespace: str
    name: str
    pod_selector: LabelSelector = LabelSelector()
    policy_types: tuple[str, ...] | None = None
    ingress: tuple[PolicyRule, ...] = ()
    egress: tuple[PolicyRule, ...] = ()

    def __post_init__(self) -> None:
        if not self.policy_types:
            types = (INGRESS, EGRESS) if self.egress else (INGRESS,)
            object.__setattr__(self, "policy_types", types)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def affects_ingress(self) -> bool:
        return INGRESS in (self.policy_types or ())

    @property
    def affects_egress(self) -> bool:
        return EGRESS in (self.policy_types or ())


@dataclass(frozen=True)
class Inventory:
    """Everything valid, indexed, plus the problems found while loading."""

    namespaces: Mapping[str, Namespace]
    pods: tuple[Pod, ...]
    policies: tuple[NetworkPolicy, ...]
    problems: tuple[Problem, ...] = ()

    def namespace_labels(self, name: str) -> Mapping[str, str]:
        ns = self.namespaces.get(name)
        return ns.labels if ns else {NAMESPACE_NAME_LABEL: name}


def load(
    namespaces: Iterable[Namespace | dict],
    pods: Iterable[Pod | dict],
    policies: Iterable[NetworkPolicy | dict],
) -> Inventory:
    """Parse (dicts) or take (objects) everything; never raises for bad input.

    Duplicates (same namespace/name) keep the first; an address held by two pods stays with
    the first (by namespace/name), as a finished pod's address may be handed out again."""
    problems: list[Problem] = []
    nss = _load_all(namespaces, Namespace, parse_namespace, "Namespace", problems)
    pod_list = _load_all(pods, Pod, parse_pod, "Pod", problems)
    pols = _load_all(policies, NetworkPolicy, parse_policy, "NetworkPolicy", problems)
    owners: dict[str, str] = {}
    kept: list[Pod] = []
    for pod in sorted(pod_list, key=lambda p: (p.namespace, p.name)):
        ips = []
        for ip in pod.ips if not pod.host_network else ():
            if ip in owners:
                problems.append(
                    Problem(
                        "Pod",
                        pod.namespace,
                        pod.name,
                        "status.podIPs",
                        f"{ip} is held by {owners[ip]}",
                    )
                )
                continue
            owners[ip] = pod.key
            ips.append(ip)
        if not pod.host_network and tuple(ips) != pod.ips:
            pod = Pod(pod.namespace, pod.name, pod.labels, pod.node, tuple(ips), pod.ports)
        kept.append(pod)
    for p in problems:
        log.warning("policy input left out: %s", p)
    return Inventory(
        namespaces={n.name: n for n in nss},
        pods=tuple(kept),
        policies=tuple(sorted(pols, key=lambda p: (p.namespace, p.name))),
        problems=tuple(problems),
    )


def _load_all(items, cls, parse, kind: str, problems: list[Problem]) -> list:
    out = []
    seen: set[tuple[str, str]] = set()
    for item in items:
        try:
            obj = item if isinstance(item, cls) else parse(item)
        except PolicyError as exc:
            problems.append(exc.problem)
            continue
        except Exception as exc:  # noqa: BLE001 - a parser bug must not stop the others
            problems.append(Problem(kind, "", _guess_name(item), "", f"unexpected: {exc!r}"))
            continue
        key = (getattr(obj, "namespace", ""), obj.name)
        if key in seen:
            problems.append(Problem(kind, key[0], key[1], "metadata.name", "duplicate, ignored"))
            continue
        seen.add(key)
        out.append(obj)
    return out


def _guess_name(item: object) -> str:
    meta = item.get("metadata") if isinstance(item, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) else "?"


# ---- parsing the Kubernetes JSON form ---------------------------------------------------


class _Ctx:
    """The object being parsed, so every error names it."""

    def __init__(self, kind: str, data: object) -> None:
        self.kind, self.namespace, self.name = kind, "", "?"  # type: str, str, str
        if not isinstance(data, dict):
            self.fail("", f"must be an object, not {type(data).__name__}")
        self.data = data
        found = data.get("kind")
        meta = data.get("metadata")
        if not isinstance(meta, dict):
            self.fail("metadata", "must be an object")
        name = meta.get("name")
        self.name = name if isinstance(name, str) and name else "?"
        if self.name == "?":
            self.fail("metadata.name", "must be a non-empty string")
        if kind != "Namespace":
            ns = meta.get("namespace", "default")
            if not isinstance(ns, str) or not ns:
                self.fail("metadata.namespace", "must be a non-empty string")
            self.namespace = ns
        if found is not None and found != kind:
            self.fail("kind", f"{found!r} is not {kind}")
        self.labels = self.string_map(meta.get("labels"), "metadata.labels")

    def fail(self, field: str, message: str) -> NoReturn:
        raise PolicyError(self.kind, self.namespace, self.name, field, message)

    def obj(self, value: object, field: str) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.fail(field, f"must be an object, not {type(value).__name__}")
        return value

    def list(self, value: object, field: str) -> list:
        if value is None:
            return []
        if not isinstance(value, list):
            self.fail(field, f"must be a list, not {type(value).__name__}")
        return value

    def string_map(self, value: object, field: str) -> dict[str, str]:
        value = self.obj(value, field)
        for k, v in value.items():
            if not isinstance(k, str) or not isinstance(v, str):
                self.fail(field, f"{k!r}: {v!r} is not a string pair")
        return value

    def selector(self, value: object, field: str) -> LabelSelector:
        try:
            return parse_selector(value, field)
        except SelectorError as exc:
            self.fail(exc.field, exc.message)

    def port_number(self, value: object, field: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            self.fail(field, f"{value!r} is not a port number (1-65535)")
        return value

    def protocol(self, value: object, field: str) -> str:
        if value is None:
            return "TCP"
        if value not in PROTOCOLS:
            self.fail(field, f"{value!r} is not one of {', '.join(PROTOCOLS)}")
        return value


def parse_namespace(data: object) -> Namespace:
    ctx = _Ctx("Namespace", data)
    return Namespace(ctx.name, ctx.labels)


def parse_pod(data: object) -> Pod:
    """A pod from ``kubectl get pod -o json`` form. Finished pods (Succeeded, Failed) hold no
    addresses any more: theirs may already belong to a new pod."""
    ctx = _Ctx("Pod", data)
    spec = ctx.obj(ctx.data.get("spec"), "spec")
    status = ctx.obj(ctx.data.get("status"), "status")
    node = spec.get("nodeName") or ""
    if not isinstance(node, str):
        ctx.fail("spec.nodeName", "must be a string")
    host_network = spec.get("hostNetwork", False)
    if not isinstance(host_network, bool):
        ctx.fail("spec.hostNetwork", "must be a boolean")
    ips: list[str] = []
    entries = ctx.list(status.get("podIPs"), "status.podIPs")
    raw = [
        (f"status.podIPs[{i}].ip", ctx.obj(e, f"status.podIPs[{i}]").get("ip"))
        for i, e in enumerate(entries)
    ]
    if not raw and status.get("podIP"):
        raw = [("status.podIP", status.get("podIP"))]
    for where, ip in raw:
        try:
            if not isinstance(ip, str):
                raise ValueError(ip)
            ips.append(str(ipaddress.ip_address(ip)))
        except ValueError:
            ctx.fail(where, f"{ip!r} is not an IP address")
    if status.get("phase") in ("Succeeded", "Failed"):
        ips = []
    ports: list[ContainerPort] = []
    for ci, c in enumerate(ctx.list(spec.get("containers"), "spec.containers")):
        c = ctx.obj(c, f"spec.containers[{ci}]")
        for pi, p in enumerate(ctx.list(c.get("ports"), f"spec.containers[{ci}].ports")):
            where = f"spec.containers[{ci}].ports[{pi}]"
            p = ctx.obj(p, where)
            number = ctx.port_number(p.get("containerPort"), f"{where}.containerPort")
            proto = ctx.protocol(p.get("protocol"), f"{where}.protocol")
            name = p.get("name") or ""
            if (
                not isinstance(name, str)
                or (name and not _PORT_NAME_RE.match(name))
                or len(name) > 15
            ):
                ctx.fail(f"{where}.name", f"{name!r} is not a valid port name")
            ports.append(ContainerPort(name, proto, number))
    return Pod(ctx.namespace, ctx.name, ctx.labels, node, tuple(ips), tuple(ports), host_network)


def parse_policy(data: object) -> NetworkPolicy:
    """A NetworkPolicy (networking.k8s.io/v1) from its JSON form, validated and defaulted."""
    ctx = _Ctx("NetworkPolicy", data)
    api = ctx.data.get("apiVersion")
    if api is not None and api != "networking.k8s.io/v1":
        ctx.fail("apiVersion", f"{api!r} is not networking.k8s.io/v1")
    spec = ctx.obj(ctx.data.get("spec"), "spec")
    unknown = set(spec) - {"podSelector", "policyTypes", "ingress", "egress"}
    if unknown:
        ctx.fail(f"spec.{sorted(unknown)[0]}", "unknown field")
    # podSelector is a required struct in the Go API: absent decodes as {} (every pod).
    pod_selector = ctx.selector(spec.get("podSelector") or {}, "spec.podSelector")
    types = ctx.list(spec.get("policyTypes"), "spec.policyTypes")
    if len(types) > 2:
        ctx.fail("spec.policyTypes", "may not list more than two policyTypes")
    for i, t in enumerate(types):
        if t not in (INGRESS, EGRESS):
            ctx.fail(f"spec.policyTypes[{i}]", f"{t!r} is not Ingress or Egress")
    ingress = tuple(
        _parse_rule(ctx, r, f"spec.ingress[{i}]", "from")
        for i, r in enumerate(ctx.list(spec.get("ingress"), "spec.ingress"))
    )
    egress = tuple(
        _parse_rule(ctx, r, f"spec.egress[{i}]", "to")
        for i, r in enumerate(ctx.list(spec.get("egress"), "spec.egress"))
    )
    types_t = tuple(dict.fromkeys(types)) or None
    return NetworkPolicy(ctx.namespace, ctx.name, pod_selector, types_t, ingress, egress)


def _parse_rule(ctx: _Ctx, data: object, where: str, peers_key: str) -> PolicyRule:
    rule = ctx.obj(data, where)
    unknown = set(rule) - {peers_key, "ports"}
    if unknown:
        ctx.fail(f"{where}.{sorted(unknown)[0]}", "unknown field")
    peers = tuple(
        _parse_peer(ctx, p, f"{where}.{peers_key}[{i}]")
        for i, p in enumerate(ctx.list(rule.get(peers_key), f"{where}.{peers_key}"))
    )
    ports = tuple(
        _parse_port(ctx, p, f"{where}.ports[{i}]")
        for i, p in enumerate(ctx.list(rule.get("ports"), f"{where}.ports"))
    )
    return PolicyRule(peers, ports)


def _parse_peer(ctx: _Ctx, data: object, where: str) -> Peer:
    peer = ctx.obj(data, where)
    unknown = set(peer) - {"podSelector", "namespaceSelector", "ipBlock"}
    if unknown:
        ctx.fail(f"{where}.{sorted(unknown)[0]}", "unknown field")
    given = [k for k in ("podSelector", "namespaceSelector", "ipBlock") if peer.get(k) is not None]
    if not given:
        ctx.fail(where, "must specify a peer (podSelector, namespaceSelector or ipBlock)")
    if "ipBlock" in given and len(given) > 1:
        ctx.fail(where, "may not specify both ipBlock and another peer")
    if "ipBlock" in given:
        return Peer(ip_block=_parse_ip_block(ctx, peer["ipBlock"], f"{where}.ipBlock"))
    pods = peer.get("podSelector")
    nss = peer.get("namespaceSelector")
    return Peer(
        pod_selector=None if pods is None else ctx.selector(pods, f"{where}.podSelector"),
        namespace_selector=None if nss is None else ctx.selector(nss, f"{where}.namespaceSelector"),
    )


def _parse_ip_block(ctx: _Ctx, data: object, where: str) -> IPBlock:
    block = ctx.obj(data, where)
    cidr = _network(ctx, block.get("cidr"), f"{where}.cidr")
    excepts = []
    for i, e in enumerate(ctx.list(block.get("except"), f"{where}.except")):
        net = _network(ctx, e, f"{where}.except[{i}]")
        # A strict subset of cidr (same family, inside it, longer prefix), as the API requires.
        if (
            net.version != cidr.version
            or not net.subnet_of(cidr)  # type: ignore[arg-type]
            or net.prefixlen <= cidr.prefixlen
        ):
            ctx.fail(f"{where}.except[{i}]", f"{e} is not a strict subset of {cidr}")
        excepts.append(net)
    return IPBlock(cidr, tuple(excepts))


def _network(ctx: _Ctx, value: object, where: str) -> Network:
    if not isinstance(value, str) or "/" not in value:
        ctx.fail(where, f"{value!r} is not a CIDR")
    try:
        # Host bits set ("10.0.0.1/24") are accepted as the API's legacy parsing does.
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        ctx.fail(where, f"{value!r} is not a CIDR")


def _parse_port(ctx: _Ctx, data: object, where: str) -> PolicyPort:
    port = ctx.obj(data, where)
    unknown = set(port) - {"protocol", "port", "endPort"}
    if unknown:
        ctx.fail(f"{where}.{sorted(unknown)[0]}", "unknown field")
    proto = ctx.protocol(port.get("protocol"), f"{where}.protocol")
    number = port.get("port")
    end = port.get("endPort")
    if number is None:
        if end is not None:
            ctx.fail(f"{where}.endPort", "may not be given without port")
        return PolicyPort(proto)
    if isinstance(number, str):
        if end is not None:
            ctx.fail(f"{where}.endPort", "may not be given with a named port")
        if len(number) > 15 or not _PORT_NAME_RE.match(number):
            ctx.fail(f"{where}.port", f"{number!r} is not a valid port name")
        return PolicyPort(proto, number)
    number = ctx.port_number(number, f"{where}.port")
    if end is not None:
        end = ctx.port_number(end, f"{where}.endPort")
        if end < number:
            ctx.fail(f"{where}.endPort", f"{end} is less than port {number}")
    return PolicyPort(proto, number, end)
