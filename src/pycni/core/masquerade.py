"""Keep the node's packet rules (masquerade, and forward accepts for the cluster) equal to what
the store says they should be.

Desired state, not event history: the rule set is computed from every network that has ipMasq
and at least one pod, plus the cluster settings the node agent recorded, so adding, deleting,
GC and the agent all converge on the same table.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
from collections.abc import Iterable

from ..cni.netconf import NetConf
from ..ipam.store import Store
from ..rules import table
from ..rules.table import Network

# Meta key of the cluster settings; one per store, like the cluster itself.
CLUSTER_KEY = "cluster"


def _digest_key() -> str:
    """Rules live in the kernel of one network namespace and one boot: a digest recorded under
    another boot or namespace says nothing about what is installed here."""
    return f"masquerade.digest.{_boot_id()}.{os.stat('/proc/self/ns/net').st_ino}"


@functools.cache
def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def record_network(store: Store, conf: NetConf) -> None:
    info = {
        "ipMasq": conf.ip_masq,
        "subnets": [str(r.subnet) for rs in conf.range_sets for r in rs.ranges],
        "clusterCidrs": [str(c) for c in conf.cluster_cidrs],
        "bridge": conf.bridge,
        # Pool sizes, for the agent's address gauges and `pycnictl status`.
        "rangeSets": [{"key": rs.key, "capacity": rs.capacity()} for rs in conf.range_sets],
    }
    if store.get_network(conf.name) != info:
        store.set_network(conf.name, info)


def _nets(values: Iterable[str | Network], what: str) -> list[str]:
    out = []
    for value in values:
        try:
            out.append(str(ipaddress.ip_network(value)))
        except ValueError as exc:
            raise ValueError(f"{what}: invalid network {value!r}: {exc}") from None
    return out


def record_cluster(
    store: Store, cluster_cidrs: Iterable[str | Network], masq_exclude: Iterable[str | Network]
) -> None:
    """Remember the cluster's settings: forwarded traffic from and to ``cluster_cidrs`` is
    accepted, and no pod subnet is masqueraded towards them or towards ``masq_exclude`` (e.g.
    the node network). Takes effect at the next sync(store). ValueError on a bad network."""
    info = {
        "clusterCidrs": _nets(cluster_cidrs, "cluster CIDR"),
        "masqExclude": _nets(masq_exclude, "masquerade exclusion"),
    }
    value = json.dumps(info, sort_keys=True)
    if store.get_meta(CLUSTER_KEY) != value:
        store.set_meta(CLUSTER_KEY, value)


def forget_cluster(store: Store) -> None:
    """Drop the cluster settings; the next sync(store) removes the forward accepts."""
    store.set_meta(CLUSTER_KEY, None)


def _cluster(store: Store) -> tuple[list[Network], list[Network]]:
    """(cluster CIDRs, extra masquerade exclusions) as recorded; empty when not recorded."""
    raw = store.get_meta(CLUSTER_KEY)
    if not raw:
        return [], []
    info = json.loads(raw)
    return (
        [ipaddress.ip_network(c) for c in info.get("clusterCidrs", [])],
        [ipaddress.ip_network(c) for c in info.get("masqExclude", [])],
    )


def desired_rules(store: Store) -> table.RuleSet:
    cluster, extra = _cluster(store)
    masq = set()
    for name, info in store.list_networks().items():
        if not info.get("ipMasq") or store.count_attachments(name) == 0:
            continue
        # Pod-to-pod traffic (to any cluster CIDR) is never masqueraded, nor is traffic to the
        # configured exclusions.
        never = [*map(ipaddress.ip_network, info.get("clusterCidrs", [])), *cluster, *extra]
        for subnet in map(ipaddress.ip_network, info.get("subnets", [])):
            exclude = {subnet} | {n for n in never if n.version == subnet.version}
            masq.add(table.MasqRule(subnet, tuple(sorted(exclude, key=str))))
    # Forward accepts do not depend on pods: a node forwards for the cluster once it is in it.
    return table.RuleSet(tuple(masq), tuple(cluster))


def sync(store: Store) -> None:
    """Apply the desired rules if they differ from what was last applied. Checked first without
    the write lock (most ADDs and DELs change nothing), then again inside one transaction, so
    concurrent ADDs and DELs apply rules one after the other, never interleaved."""
    key = _digest_key()
    if _applied(store, key) == table.digest(desired_rules(store)):
        return
    with store.transaction():
        rules = desired_rules(store)
        digest = table.digest(rules)
        if _applied(store, key) == digest:
            return
        table.apply(rules)
        store.set_meta(key, digest)


def _applied(store: Store, key: str) -> str:
    # Nothing recorded means nothing was ever installed: same as an empty rule set, so nodes
    # without ipMasq or a cluster never run nft at all.
    return store.get_meta(key) or table.digest(table.RuleSet())


def remove(store: Store | None) -> None:
    """Explicit cleanup: drop pycni's rules whatever the store says, and forget the digest so
    the next sync installs them again if still wanted."""
    table.remove_all()
    if store is not None:
        store.set_meta(_digest_key(), None)
