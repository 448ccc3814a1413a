"""Keep the node's packet rules (masquerade, forward accepts for the cluster, hostPort DNATs)
equal to what the stores say they should be.

Desired state, not event history: a store's wants are computed from every network that has
ipMasq and at least one pod, every attachment's port mappings, plus the cluster settings the
node agent recorded, so adding, deleting, GC, the agent and a restart after a crash all
converge on the same table. The bridges' route_localnet (hostPorts on 127.0.0.1) follows the
same state.

A node has one table but may have several stores (data dirs): the table holds the merge of
every store's wants and lists those stores (RuleSet.stores), and a store that syncs reads the
others' wants from their own stores, under a lock per network namespace (rules.sync.node_lock),
so no store's rules ever replace another's.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import json
import os
from collections.abc import Iterable

from ..cni.errors import RULES_FAILURE, CniError
from ..cni.netconf import NetConf
from ..dataplane import sysctl
from ..ipam.records import Attachment
from ..ipam.store import Store
from ..rules import sync as rules_sync
from ..rules.model import HostPort, MasqRule, Network, PolicyFragment, RuleSet, merge

# Meta key of the cluster settings; one per store, like the cluster itself.
CLUSTER_KEY = "cluster"
# Meta key of the node's NetworkPolicy rules, as the agent's policy controller compiled them.
POLICY_KEY = "policy"


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
        # Whether its pods' bridge ports are in hairpin mode: `pycnictl doctor` checks them.
        "hairpinMode": conf.hairpin_mode,
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


def data_dir_of(store: Store) -> str:
    """The store's data dir as the node's table lists it."""
    return os.path.realpath(os.path.dirname(store.path))


def desired_rules(store: Store) -> RuleSet:
    """This store's wants, naming the store when there are any."""
    rules = _wants(store)
    return dataclasses.replace(rules, stores=(data_dir_of(store),)) if rules else rules


def node_rules(store: Store, listed: Iterable[str]) -> RuleSet:
    """The node's whole rule set: this store's wants merged with those of every other store
    the installed rules list (``listed``: RuleSet.stores) that still exists (one whose data
    dir is gone, or that wants nothing any more, drops out). CniError when another store
    cannot be read: its wants are unknown, and installing without them would take its pods'
    rules away."""
    mine = data_dir_of(store)
    sets = [desired_rules(store)]
    for other in listed:
        if other == mine or not os.path.exists(os.path.join(other, "pycni.db")):
            continue  # never create a store
        try:
            with Store(other) as theirs:
                sets.append(desired_rules(theirs))
        except CniError as exc:
            raise CniError(
                RULES_FAILURE,
                f"packet rules: cannot read what data dir {other} wants, whose rules this "
                f"node's table holds beside {mine}'s: {exc.msg}",
                exc.details,
            ) from None
    try:
        return merge(sets)
    except ValueError as exc:
        dirs = ", ".join(d for s in sets for d in s.stores)
        raise CniError(
            RULES_FAILURE, f"packet rules: the data dirs {dirs} want conflicting rules: {exc}"
        ) from None


def _wants(store: Store) -> RuleSet:
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
            masq.add(MasqRule(subnet, tuple(sorted(exclude, key=str))))
    hostports, hairpin = hostport_rules(store.attachments_with_port_mappings())
    # Forward accepts do not depend on pods: a node forwards for the cluster once it is in it.
    return RuleSet(tuple(masq), tuple(cluster), tuple(hostports), tuple(hairpin), _policy(store))


def _policy(store: Store) -> PolicyFragment:
    raw = store.get_meta(POLICY_KEY)
    if not raw:
        return PolicyFragment()
    return PolicyFragment(tuple(json.loads(raw).get("statements", ())))


def record_policy(store: Store, recorded: dict | None) -> None:
    """What the policy controller compiled for this node (``{"statements", "counters",
    "summary"}``), or None once no policy applies; the next sync installs it."""
    value = None if not recorded else json.dumps(recorded, sort_keys=True)
    if store.get_meta(POLICY_KEY) != value:
        store.set_meta(POLICY_KEY, value)


def recorded_policy(store: Store) -> dict | None:
    raw = store.get_meta(POLICY_KEY)
    return json.loads(raw) if raw else None


def hostport_rules(attachments: list[Attachment]) -> tuple[list[HostPort], list]:
    """(DNATs, pod addresses to hairpin) for attachments with port mappings: each mapping goes
    to the pod's address of each family it covers."""
    hostports, hairpin = [], []
    for att in attachments:
        for a in att.allocations:
            mapped = [
                m
                for m in att.port_mappings
                if m.host_ip is None or m.host_ip.version == a.ip.version
            ]
            hostports += [
                HostPort(m.protocol, m.host_port, a.ip, m.container_port, m.host_ip) for m in mapped
            ]
            if mapped:
                hairpin.append(ipaddress.ip_interface(f"{a.ip}/{a.prefixlen}"))
    return hostports, hairpin


def _localnet_bridges(store: Store) -> tuple[set[str], set[str]]:
    """(bridges that need route_localnet, bridges of every recorded network). A bridge needs
    it while a pod on it has IPv4 hostPorts: the node's clients of 127.0.0.1 reach them."""
    networks = store.list_networks()
    wanted = set()
    for att in store.attachments_with_port_mappings():
        bridge = networks.get(att.network, {}).get("bridge")
        if (
            bridge
            and any(a.ip.version == 4 for a in att.allocations)
            and any(m.host_ip is None or m.host_ip.version == 4 for m in att.port_mappings)
        ):
            wanted.add(bridge)
    every = {info["bridge"] for info in networks.values() if info.get("bridge")}
    return wanted, every


def sync(store: Store, force: bool = False) -> None:
    """Install the node's rules anew if this store's wants differ from what it last had
    installed. Checked first without the lock (most ADDs and DELs change nothing), then again
    under the node's rule lock, so concurrent ADDs and DELs, of this store or another, apply
    rules one after the other, never interleaved; what is installed is the merge of every
    store's wants (node_rules). `force`: install even so (the kernel lost what was installed:
    see repair)."""
    key = _digest_key()
    if not force and _applied(store, key) == rules_sync.digest(desired_rules(store)):
        # Nothing to do, unless a sync is under way: it may be installing what this call's
        # change (already in the store) made stale, and will see that change when it looks
        # again. Waiting for it below means that once an ADD, DEL or GC returns, the kernel
        # holds what it changed (a GC racing a restarted agent's repair returned while the
        # repair's first install still held the pod GC had released).
        if not rules_sync.node_lock_held_elsewhere():
            return
    with rules_sync.node_lock():
        digest = rules_sync.digest(desired_rules(store))
        if not force and _applied(store, key) == digest:
            return
        # Until what was applied is still what the store wants: a DEL or GC that changed the
        # store while this ran saw the digest of before (its unlocked check above) and left
        # the work to us. Without the second look, a restarted agent's repair could install a
        # pod GC had just released (seen in test_fault_kill, once in three runs).
        while True:
            _install(store)
            store.set_meta(key, digest)
            now = rules_sync.digest(desired_rules(store))
            if now == digest:
                return
            digest = now


def _install(store: Store) -> None:
    """Install the merge of every store's wants, this one's read now. Under the node lock."""
    rules = node_rules(store, rules_sync.installed_stores())
    wanted, every = _localnet_bridges(store)
    # Off before the 127/8 guard goes, on after it came: never open without the guard.
    # (Only this store's bridges: another store's keep the guard its wants bring.)
    for bridge in every - wanted:
        sysctl.set_route_localnet(bridge, False)
    rules_sync.apply(rules)
    for bridge in wanted:
        sysctl.set_route_localnet(bridge, True)


def install_policy(store: Store, recorded: dict | None) -> str:
    """Record the node's policy rules (as record_policy) and install them: when the kernel
    holds what the store said before and only policy set elements change (a pod came, went or
    was relabelled), by changing those elements alone (one small nft transaction, about a
    third of replacing a table of 1,000 pods and 100 policies, and the counters live on);
    else as sync does. "unchanged", "elements" or "table"."""
    key = _digest_key()
    with rules_sync.node_lock(), store.transaction():
        before = desired_rules(store)
        record_policy(store, recorded)
        wanted = desired_rules(store)
        digest = rules_sync.digest(wanted)
        applied = _applied(store, key)
        if applied == digest:
            return "unchanged"
        if applied == rules_sync.digest(before) and rules_sync.apply_policy_elements(
            before, wanted
        ):
            store.set_meta(key, digest)
            return "elements"
        sync(store)
        return "table"


def repair(store: Store) -> bool:
    """Apply the desired rules again if the kernel holds others (someone deleted or edited
    pycni's table: sync() trusts its digest and would not notice). One `nft list`, about 4 ms:
    for the agent's periodic pass, not for every ADD. True when it applied them."""
    desired = desired_rules(store)
    if not desired and _applied(store, _digest_key()) == rules_sync.digest(desired):
        return False  # nothing wanted, nothing installed: never run nft for nothing
    installed = rules_sync.installed()
    if (installed or RuleSet()) == node_rules(store, installed.stores if installed else ()):
        return False
    sync(store, force=True)
    return True


def _applied(store: Store, key: str) -> str:
    # Nothing recorded means nothing was ever installed: same as an empty rule set, so nodes
    # without ipMasq or a cluster never run nft at all.
    return store.get_meta(key) or rules_sync.digest(RuleSet())


def remove(store: Store | None) -> None:
    """Explicit cleanup: drop pycni's rules whatever the store says, and forget the digest so
    the next sync installs them again if still wanted."""
    rules_sync.remove_all()
    if store is not None:
        store.set_meta(_digest_key(), None)
