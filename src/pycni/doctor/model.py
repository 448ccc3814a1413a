"""The doctor's data: findings, and snapshots of the store and the kernel it compares.

Snapshots are plain values so the comparison (doctor.compare) is pure and is tested from
hand-made ones; doctor.read fills them from SQLite and netlink.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..dataplane import names

# Finding kinds. Each names one way the node differs from the invariant.
STALE_ATTACHMENT = "stale-attachment"
HOST_VETH_MISSING = "host-veth-missing"
HOST_VETH_NOT_VETH = "host-veth-not-veth"
HOST_VETH_ALIAS = "host-veth-alias"
HOST_VETH_DETACHED = "host-veth-detached"
HOST_VETH_DOWN = "host-veth-down"
HOST_VETH_NO_HAIRPIN = "host-veth-no-hairpin"
POD_INTERFACE_MISSING = "pod-interface-missing"
POD_INTERFACE_NOT_PEER = "pod-interface-not-peer"
POD_INTERFACE_DOWN = "pod-interface-down"
POD_ADDRESSES = "pod-addresses"
ORPHAN_VETH = "orphan-veth"
ORPHAN_IFB = "orphan-ifb"
ATTACHMENT_WITHOUT_ADDRESS = "attachment-without-address"
ORPHAN_ALLOCATION = "orphan-allocation"
ALLOCATION_OUT_OF_RANGE = "allocation-out-of-range"
ALLOCATION_RESERVED = "allocation-reserved"
DUPLICATE_ADDRESS = "duplicate-address"
UNKNOWN_TO_RUNTIME = "unknown-to-runtime"
MISSING_IN_STORE = "missing-in-store"
BRIDGE_MISSING = "bridge-missing"
BRIDGE_NOT_BRIDGE = "bridge-not-bridge"
BRIDGE_DOWN = "bridge-down"
BRIDGE_GATEWAY_MISSING = "bridge-gateway-missing"
RULES_MISSING = "rules-missing"
RULE_MISSING = "rule-missing"
RULE_EXTRA = "rule-extra"
RULE_DIFFERS = "rule-differs"
BRIDGE_NETFILTER_OFF = "bridge-netfilter-off"
CLUSTER_NOT_READY = "cluster-not-ready"
POD_OUTSIDE_NODE_SUBNET = "pod-outside-node-subnet"
VTEP_MISSING = "vtep-missing"
VTEP_WRONG = "vtep-wrong"
VTEP_STALE = "vtep-stale"
FAST_PATH_PROGRAM_MISSING = "fast-path-program-missing"
FAST_PATH_PROGRAM_EXTRA = "fast-path-program-extra"
FAST_PATH_MAP_DIFFERS = "fast-path-map-differs"
FAST_PATH_STALE = "fast-path-stale"
# Routes, neighbours and FDB entries: f"{route|neighbour|fdb}-{missing|differs|extra}".


class DoctorError(Exception):
    """Something could not be checked (an unreadable store, no packet-rule tool)."""


@dataclass(frozen=True)
class Finding:
    """One difference from the invariant: what kind, where, what should be, what is, and how
    to repair it."""

    kind: str
    subject: str
    expected: str
    actual: str
    hint: str

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "subject": self.subject,
            "expected": self.expected,
            "actual": self.actual,
            "hint": self.hint,
        }

    def __str__(self) -> str:
        return (
            f"{self.kind}: {self.subject}: expected {self.expected}; found {self.actual}; "
            f"repair: {self.hint}"
        )


@dataclass
class Report:
    """Everything one examination found. `errors`: what could not be checked (the findings
    may then be incomplete); `notes`: what was skipped on purpose, and why."""

    findings: list[Finding] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data_dirs: list[str] = field(default_factory=list)
    attachments: int = 0
    addresses: int = 0

    @property
    def ok(self) -> bool:
        return not self.findings and not self.errors

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "findings": [f.to_json() for f in self.findings],
            "errors": list(self.errors),
            "notes": list(self.notes),
            "dataDirs": list(self.data_dirs),
            "attachments": self.attachments,
            "addresses": self.addresses,
        }


# --- snapshots ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """A network device as the doctor needs it. `peer`: a veth's IFLA_LINK, the index of its
    other end (in the other end's namespace); `addresses`: "ip/prefixlen", link-local left
    out; `hairpin`: a bridge port's hairpin mode, None when it is on no bridge."""

    name: str
    index: int
    kind: str = ""
    up: bool = True
    master: int | None = None
    alias: str = ""
    peer: int | None = None
    mac: str = ""
    addresses: frozenset[str] = frozenset()
    hairpin: bool | None = None


@dataclass(frozen=True)
class StoredAttachment:
    """`hostports`: whether it has port mappings (its bridge port then needs hairpin mode
    whatever the network's hairpinMode)."""

    data_dir: str
    id: int
    network: str
    container_id: str
    ifname: str
    host_veth: str
    netns: str
    hostports: bool = False

    @property
    def veth(self) -> str:
        """The host veth it should have: the name recorded at ADD, else the derived one."""
        return self.host_veth or names.host_veth_name(self.network, self.container_id, self.ifname)

    @property
    def label(self) -> str:
        return f"network {self.network}, container {self.container_id} {self.ifname}"

    @property
    def key(self) -> tuple[str, int]:
        return (self.data_dir, self.id)


@dataclass(frozen=True)
class StoredAllocation:
    """One allocations row as stored (the address as text, as the store holds it)."""

    data_dir: str
    attachment_id: int
    network: str
    ip: str
    prefixlen: int
    gateway: str | None
    range_set: str  # ipam.ranges.RangeSet.key: "subnet:start-end,..."

    @property
    def cidr(self) -> str:
        return f"{self.ip}/{self.prefixlen}"


@dataclass
class StoreSnapshot:
    data_dir: str
    attachments: list[StoredAttachment] = field(default_factory=list)
    allocations: list[StoredAllocation] = field(default_factory=list)
    networks: dict[str, dict] = field(default_factory=dict)  # name -> recorded info


@dataclass(frozen=True)
class NetnsView:
    """A pod's network namespace: whether it could be entered, and its links if so.
    `problem` says why not: "does not exist", "is not a network namespace"."""

    path: str
    problem: str = ""
    links: dict[str, Link] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return not self.problem


@dataclass
class RulesView:
    """pycni's packet rules: what the stores want and what the kernel holds (None: no table
    or chains at all). Both are rules.model.RuleSet."""

    backend: str
    desired: object
    installed: object | None
    # net.bridge.bridge-nf-call-ip(6)tables: sysctl name -> value ("" when absent)
    bridge_netfilter: dict[str, str] = field(default_factory=dict)


@dataclass
class ClusterView:
    """The cluster side as the running agent reports it, with the backend's plan and the
    kernel's routes, neighbours and FDB entries (backends.plan.State). `network`: the CNI
    network the agent writes the node's config for; `subnets`: the node's subnets now (its
    podCIDRs), which that network's pods' addresses must lie in."""

    node: str
    backend: str
    ready: bool
    reason: str = ""
    want: object | None = None
    have: object | None = None
    vtep_name: str = ""
    vtep_mac: str = ""  # what the node publishes; the device should carry it
    network: str = ""
    subnets: tuple[str, ...] = ()


@dataclass(frozen=True)
class FastPathView:
    """The eBPF fast path: what the agent's last pass made its desired state (its status),
    and what the kernel holds (bpftool). `attached`: interface -> our tc filter's name on it;
    `shaped`: interfaces with a qdisc of traffic shaping; `pods`, `remote`: the maps' keys."""

    enabled: bool
    want_interfaces: frozenset[str] = frozenset()
    want_pods: frozenset[str] = frozenset()
    want_remote: frozenset[str] = frozenset()
    attached: tuple[tuple[str, str], ...] = ()
    shaped: frozenset[str] = frozenset()
    pods: frozenset[str] | None = None  # None: the maps could not be found
    remote: frozenset[str] | None = None


@dataclass
class NodeSnapshot:
    stores: list[StoreSnapshot] = field(default_factory=list)
    links: dict[str, Link] = field(default_factory=dict)  # the node's namespace, by name
    netns: dict[str, NetnsView] = field(default_factory=dict)  # by path; absent: not read
    rules: RulesView | None = None
    cluster: ClusterView | None = None
    fast_path: FastPathView | None = None
    # False when a store could not be read: a link or a live pod none of the others owns may
    # be that store's, so nothing is called an orphan.
    stores_complete: bool = True

    def attachments(self) -> list[StoredAttachment]:
        return [a for s in self.stores for a in s.attachments]
