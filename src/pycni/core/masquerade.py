"""Keep the node's masquerade rules equal to what the store says they should be.

Desired state, not event history: the rule set is computed from every network that has ipMasq
and at least one pod, so adding, deleting and GC all converge on the same table.
"""

from __future__ import annotations

import functools
import ipaddress
import os

from ..cni.netconf import NetConf
from ..ipam.store import Store
from ..rules import masquerade


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


def desired_rules(store: Store) -> list[masquerade.MasqRule]:
    rules = set()
    for name, info in store.list_networks().items():
        if not info.get("ipMasq") or store.count_attachments(name) == 0:
            continue
        cluster = [ipaddress.ip_network(c) for c in info.get("clusterCidrs", [])]
        for subnet in map(ipaddress.ip_network, info.get("subnets", [])):
            exclude = {subnet} | {c for c in cluster if c.version == subnet.version}
            rules.add(masquerade.MasqRule(subnet, tuple(sorted(exclude, key=str))))
    return sorted(rules)


def sync(store: Store) -> None:
    """Apply the desired rules if they differ from what was last applied. Checked first without
    the write lock (most ADDs and DELs change nothing), then again inside one transaction, so
    concurrent ADDs and DELs apply rules one after the other, never interleaved."""
    key = _digest_key()
    if _applied(store, key) == masquerade.digest(desired_rules(store)):
        return
    with store.transaction():
        rules = desired_rules(store)
        digest = masquerade.digest(rules)
        if _applied(store, key) == digest:
            return
        masquerade.apply(rules)
        store.set_meta(key, digest)


def _applied(store: Store, key: str) -> str:
    # Nothing recorded means nothing was ever installed: same as an empty rule set, so nodes
    # without ipMasq never run nft at all.
    return store.get_meta(key) or masquerade.digest([])


def remove(store: Store | None) -> None:
    """Explicit cleanup: drop pycni's rules whatever the store says, and forget the digest so
    the next ADD installs them again if still wanted."""
    masquerade.remove_all()
    if store is not None:
        store.set_meta(_digest_key(), None)
