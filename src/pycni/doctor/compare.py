"""The invariant as a pure comparison of snapshots: store, kernel, runtime, rules, routes.

At every quiet point the attachments the runtime knows, the attachments and allocations in the
IPAM store, and the pod interfaces and host veths in the kernel are the same set; no address is
held twice; the packet rules and the cluster routes are what the store and the node list ask
for. Each function here returns one Finding per difference, and a difference that follows from
another is folded into that one (a deleted pod netns takes its veth pair with it: one stale
attachment, not three findings).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections import defaultdict
from collections.abc import Iterable

from ..dataplane import names
from ..rules.model import PolicyFragment
from . import model as m
from .model import Finding, Link, NodeSnapshot, StoredAllocation, StoredAttachment

DEFAULT_BRIDGE = "cni0"
# A host veth pycni made: the derived name (names.host_veth_name).
_VETH_NAME = re.compile(rf"{names.HOST_VETH_PREFIX}[0-9a-f]{{11}}")


def compare(snap: NodeSnapshot, live: set[tuple[str, str]] | None = None) -> list[Finding]:
    """Every difference between `snap` and the invariant. `live`: the (container ID, ifname)
    pairs the runtime considers live, or None to leave the runtime out."""
    out = check_attachments(snap)
    out += check_orphans(snap)
    out += check_allocations(snap)
    if live is not None:
        out += check_live(snap, live)
    out += check_bridges(snap)
    if snap.rules is not None:
        out += check_rules(snap.rules)
        out += check_bridge_netfilter(snap.rules)
    if snap.cluster is not None:
        out += check_cluster(snap.cluster, snap.links)
        out += check_node_subnets(snap, snap.cluster)
    if snap.fast_path is not None:
        out += check_fast_path(snap.fast_path, snap.links)
    return out


def check_fast_path(fp: m.FastPathView, links: dict[str, Link]) -> list[Finding]:
    """The kernel holds the fast path the agent's last pass wanted: its programs on those
    interfaces and on no other (never on a shaped pod's, whose shaping it would skip), the
    maps' keys as wanted; with the fast path off, none of it. An interface gone since (a pod
    deleted) took its filter with it and is not a finding."""
    repair = (
        "the agent reconciles the fast path every --resync seconds; if this stays, see its "
        "log and `pycnictl status` (or run the agent with --no-fast-path)"
    )
    attached = {dev for dev, _ in fp.attached}
    if not fp.enabled:
        return [
            Finding(m.FAST_PATH_STALE, dev, "no pycni fast-path program (--no-fast-path)",
                    "a pycni tc program attached", "pycnictl uninstall, or an agent restart "
                    "with --no-fast-path, removes it")
            for dev in sorted(attached)
        ]  # fmt: skip
    out = []
    for dev in sorted(fp.want_interfaces - attached):
        if dev in links:
            out.append(
                Finding(m.FAST_PATH_PROGRAM_MISSING, dev, "pycni's tc ingress program",
                        "absent", repair)
            )  # fmt: skip
    for dev in sorted(attached - fp.want_interfaces):
        out.append(
            Finding(m.FAST_PATH_PROGRAM_EXTRA, dev, "no pycni fast-path program",
                    "one attached", repair)
        )  # fmt: skip
    for dev in sorted(attached & fp.shaped):
        out.append(
            Finding(m.FAST_PATH_PROGRAM_EXTRA, dev, "no fast path on a shaped pod's interface",
                    "a pycni tc program beside a shaping qdisc", repair)
        )  # fmt: skip
    for name, want, have in (
        ("pycni_fp_pods", fp.want_pods, fp.pods),
        ("pycni_fp_remote", fp.want_remote, fp.remote),
    ):
        if have is None:
            if attached or want:
                out.append(
                    Finding(m.FAST_PATH_MAP_DIFFERS, name, ", ".join(sorted(want)) or "empty",
                            "no map found", repair)
                )  # fmt: skip
        elif have != want:
            missing, extra = sorted(want - have), sorted(have - want)
            out.append(
                Finding(
                    m.FAST_PATH_MAP_DIFFERS,
                    name,
                    ", ".join(sorted(want)) or "empty",
                    "; ".join(
                        x
                        for x in (
                            missing and "missing " + ", ".join(missing),
                            extra and "extra " + ", ".join(extra),
                        )
                        if x
                    ),
                    repair,
                )
            )
    return out


# --- attachments: host veth, netns, pod interface ----------------------------------------


def _del_hint(att: StoredAttachment) -> str:
    return (
        f"run DEL for container {att.container_id} with CNI_IFNAME={att.ifname} on network "
        f"{att.network} (the runtime's DEL or GC does this when it removes the pod)"
    )


def _recreate_hint(att: StoredAttachment) -> str:
    return (
        f"recreate the pod: DEL then ADD container {att.container_id} "
        f"(CNI_IFNAME={att.ifname}, network {att.network})"
    )


def bridge_of(snap: NodeSnapshot, data_dir: str, network: str) -> str:
    store = next((s for s in snap.stores if s.data_dir == data_dir), None)
    info = store.networks.get(network, {}) if store else {}
    return info.get("bridge") or DEFAULT_BRIDGE


def check_attachments(snap: NodeSnapshot) -> list[Finding]:
    out: list[Finding] = []
    by_index = {link.index: link for link in snap.links.values()}
    allocations = _allocations_by_attachment(snap)
    gateways = _gateways(snap)
    for att in snap.attachments():
        ns = snap.netns.get(att.netns)
        host = snap.links.get(att.veth)
        if ns is not None and not ns.alive:
            still = f"; host veth {att.veth} is still there" if host else ""
            out.append(
                Finding(
                    m.STALE_ATTACHMENT,
                    att.label,
                    f"the pod's netns {att.netns} holding {att.ifname}",
                    f"netns {att.netns} {ns.problem}{still}",
                    f"the pod is gone but DEL never came: {_del_hint(att)}",
                )
            )
            continue
        bridge_name = bridge_of(snap, att.data_dir, att.network)
        if host is None:
            pod_gone = ns is not None and att.ifname not in ns.links
            out.append(
                Finding(
                    m.HOST_VETH_MISSING,
                    att.label,
                    f"host veth {att.veth} on bridge {bridge_name}",
                    f"no link {att.veth}"
                    + (f" (and {att.ifname} is gone from {att.netns})" if pod_gone else ""),
                    _recreate_hint(att),
                )
            )
            continue
        out += _check_host_veth(att, host, snap.links.get(bridge_name), bridge_name, by_index)
        out += _check_hairpin(snap, att, host)
        if ns is not None:
            out += _check_pod(att, host, ns, allocations.get(att.key, []), gateways)
    return out


def _check_host_veth(
    att: StoredAttachment,
    host: Link,
    bridge: Link | None,
    bridge_name: str,
    by_index: dict[int, Link],
) -> list[Finding]:
    if host.kind != "veth":
        return [
            Finding(
                m.HOST_VETH_NOT_VETH,
                att.label,
                f"{att.veth} to be a veth",
                f"a {host.kind or 'device of unknown kind'}",
                f"delete {att.veth} (ip link del {att.veth}), then " + _recreate_hint(att),
            )
        ]
    out = []
    alias = names.host_veth_alias(att.network, att.container_id, att.ifname)
    if host.alias != alias:
        out.append(
            Finding(
                m.HOST_VETH_ALIAS,
                att.label,
                f"{att.veth} with alias '{alias}'",
                f"alias '{host.alias}'" if host.alias else "no alias",
                f"ip link set {att.veth} alias '{alias}' (GC finds veths by it)",
            )
        )
    # A missing or foreign bridge is reported once, for the bridge (check_bridges).
    if bridge is not None and bridge.kind == "bridge" and host.master != bridge.index:
        master = by_index.get(host.master) if host.master is not None else None
        out.append(
            Finding(
                m.HOST_VETH_DETACHED,
                att.label,
                f"{att.veth} attached to bridge {bridge_name}",
                f"attached to {master.name}"
                if master
                else (
                    "attached to a device that does not exist" if host.master else "on no bridge"
                ),
                f"ip link set {att.veth} master {bridge_name}",
            )
        )
    if not host.up:
        out.append(
            Finding(
                m.HOST_VETH_DOWN, att.label, f"{att.veth} up", "down", f"ip link set {att.veth} up"
            )
        )
    return out


def hairpin_wanted(snap: NodeSnapshot, att: StoredAttachment) -> bool:
    """Whether the attachment's bridge port must be in hairpin mode: its network says so
    (hairpinMode, recorded at ADD; a store from before pycni recorded it is not judged), or
    the pod has hostPorts."""
    store = next((s for s in snap.stores if s.data_dir == att.data_dir), None)
    info = store.networks.get(att.network, {}) if store else {}
    return bool(info.get("hairpinMode")) or att.hostports


def _check_hairpin(snap: NodeSnapshot, att: StoredAttachment, host: Link) -> list[Finding]:
    # A port on no bridge is reported as detached; only a bridge port has a hairpin mode.
    if host.hairpin is not False or not hairpin_wanted(snap, att):
        return []
    why = "the pod has hostPorts" if att.hostports else "the network's hairpinMode"
    return [
        Finding(
            m.HOST_VETH_NO_HAIRPIN,
            att.label,
            f"bridge port {att.veth} in hairpin mode ({why})",
            "hairpin off: the pod cannot reach itself through a Service (kube-proxy DNATs "
            "the packet back to it) or its own hostPort",
            f"bridge link set dev {att.veth} hairpin on (or recreate the pod: DEL then ADD "
            f"container {att.container_id})",
        )
    ]


def _nsenter(netns: str, command: str) -> str:
    return f"nsenter --net={netns} {command}"


def _check_pod(
    att: StoredAttachment,
    host: Link,
    ns: m.NetnsView,
    allocations: list[StoredAllocation],
    gateways,
) -> list[Finding]:
    pod = ns.links.get(att.ifname)
    if pod is None:
        return [
            Finding(
                m.POD_INTERFACE_MISSING,
                att.label,
                f"{att.ifname} in {att.netns}, the peer of {att.veth}",
                f"no {att.ifname} in {att.netns}",
                _recreate_hint(att),
            )
        ]
    out = []
    if host.peer is not None and (host.peer != pod.index or pod.peer != host.index):
        out.append(
            Finding(
                m.POD_INTERFACE_NOT_PEER,
                att.label,
                f"{att.ifname} in {att.netns} to be the other end of {att.veth}",
                f"{att.veth}'s peer is index {host.peer} there, {att.ifname} is "
                f"index {pod.index}"
                + (f" (a {pod.kind or 'device'})" if pod.kind != "veth" else ""),
                _recreate_hint(att),
            )
        )
    if not pod.up:
        out.append(
            Finding(
                m.POD_INTERFACE_DOWN,
                att.label,
                f"{att.ifname} in {att.netns} up",
                "down",
                _nsenter(att.netns, f"ip link set {att.ifname} up"),
            )
        )
    # Allocations that cannot be right are reported as such (check_allocations); the pod is
    # only expected to hold the others, and to hold nothing beyond all of them.
    valid = {
        _iface(a.cidr)
        for a in allocations
        if allocation_problem(a, gateways.get(_range_key(a), set())) is None
    }
    every = {_iface(a.cidr) for a in allocations}
    have = {_iface(a) for a in pod.addresses}
    if (valid - have) or (have - every):
        missing, extra = sorted(valid - have, key=_sort), sorted(have - every, key=_sort)
        what = [f"missing {', '.join(map(str, missing))}"] if missing else []
        what += [f"unexpected {', '.join(map(str, extra))}"] if extra else []
        out.append(
            Finding(
                m.POD_ADDRESSES,
                att.label,
                f"{att.ifname} in {att.netns} holding exactly "
                f"{', '.join(str(a) for a in sorted(every, key=_sort)) or 'nothing'}",
                f"{', '.join(str(a) for a in sorted(have, key=_sort)) or 'no address'} "
                f"({'; '.join(what)})",
                _recreate_hint(att),
            )
        )
    return out


def _iface(text: str):
    try:
        return ipaddress.ip_interface(text)
    except ValueError:
        return text


def _sort(value) -> tuple:
    return (getattr(value, "version", 0), str(value))


# --- things in the kernel that no attachment owns ----------------------------------------


def check_orphans(snap: NodeSnapshot) -> list[Finding]:
    """Host veths carrying pycni's alias (or its name on a pycni bridge) and ifb devices
    carrying pycni's ifb alias that no store attachment owns."""
    if not snap.stores_complete:
        return []
    atts = snap.attachments()
    owned = {a.veth for a in atts} | {
        names.host_veth_name(a.network, a.container_id, a.ifname) for a in atts
    }
    ifbs = {names.ifb_name(a.network, a.container_id, a.ifname) for a in atts}
    bridges = {snap.links[b].index for b in _bridge_names(snap) if b in snap.links}
    out = []
    for link in sorted(snap.links.values(), key=lambda x: x.name):
        if (
            link.kind == "veth"
            and link.name not in owned
            and (
                link.alias.startswith(names.ALIAS_PREFIX + " ")
                or (link.master in bridges and _VETH_NAME.fullmatch(link.name))
            )
        ):
            out.append(_orphan(m.ORPHAN_VETH, link, "veth", names.ALIAS_PREFIX))
        elif (
            link.kind == "ifb"
            and link.name not in ifbs
            and link.alias.startswith(names.IFB_ALIAS_PREFIX + " ")
        ):
            out.append(_orphan(m.ORPHAN_IFB, link, "ifb", names.IFB_ALIAS_PREFIX))
    return out


def _orphan(kind: str, link: Link, what: str, prefix: str) -> Finding:
    parts = link.alias[len(prefix) + 1 :].split(" ") if link.alias else []
    if len(parts) == 3:
        network, cid, ifname = parts
        owner = (
            f"alias '{link.alias}': no attachment of container {cid} {ifname} on network {network}"
        )
        hint = (
            f"run DEL for container {cid} with CNI_IFNAME={ifname} on network {network}, "
            f"or the runtime's GC; by hand: ip link del {link.name} (if the network's "
            "dataDir was not checked, give it with --data-dir)"
        )
    else:
        owner = f"alias '{link.alias}'" if link.alias else "no alias, on a pycni bridge"
        hint = f"ip link del {link.name} (the runtime's GC on its network removes it too)"
    return Finding(
        kind, f"{what} {link.name}", "a store attachment owning it", f"none ({owner})", hint
    )


# --- the store: every allocation owned, in its range, and held once ----------------------


def _allocations_by_attachment(snap: NodeSnapshot) -> dict[tuple[str, int], list]:
    out: dict[tuple[str, int], list[StoredAllocation]] = defaultdict(list)
    for store in snap.stores:
        for a in store.allocations:
            out[(a.data_dir, a.attachment_id)].append(a)
    return out


def _range_key(a: StoredAllocation) -> tuple:
    return (a.data_dir, a.network, a.range_set)


def _gateways(snap: NodeSnapshot) -> dict[tuple, set]:
    """Gateway addresses per range set: never a pod's."""
    out: dict[tuple, set] = defaultdict(set)
    for store in snap.stores:
        for a in store.allocations:
            if a.gateway:
                out[_range_key(a)].add(ipaddress.ip_address(a.gateway))
    return out


def parse_range_set_key(key: str) -> list[tuple]:
    """(subnet, first, last) per range of an ipam RangeSet.key ("subnet:start-end,...").
    ValueError when it is not one."""
    out = []
    for part in key.split(","):
        slash = part.index("/")
        colon = part.index(":", slash)  # the subnet ends at the first ':' after its prefix
        subnet = ipaddress.ip_network(part[:colon])
        first, last = (ipaddress.ip_address(x) for x in part[colon + 1 :].split("-"))
        out.append((subnet, first, last))
    return out


def allocation_problem(a: StoredAllocation, gateways: set) -> tuple[str, str] | None:
    """(finding kind, why) when the allocation can never be right, else None."""
    try:
        ip = ipaddress.ip_address(a.ip)
    except ValueError:
        return m.ALLOCATION_OUT_OF_RANGE, f"{a.ip!r} is not an IP address"
    try:
        ranges = parse_range_set_key(a.range_set)
    except ValueError:
        return m.ALLOCATION_OUT_OF_RANGE, f"its range set {a.range_set!r} cannot be read"
    found = next((r for r in ranges if r[0].version == ip.version and r[1] <= ip <= r[2]), None)
    if found is None:
        return m.ALLOCATION_OUT_OF_RANGE, f"{ip} is outside its range set {a.range_set}"
    subnet = found[0]
    if ip == subnet.network_address:
        return m.ALLOCATION_RESERVED, f"{ip} is the network address of {subnet}"
    if subnet.version == 4 and ip == subnet.broadcast_address:
        return m.ALLOCATION_RESERVED, f"{ip} is the broadcast address of {subnet}"
    if ip in gateways:
        return m.ALLOCATION_RESERVED, f"{ip} is the gateway of {subnet}"
    return None


def check_allocations(snap: NodeSnapshot) -> list[Finding]:
    out: list[Finding] = []
    gateways = _gateways(snap)
    owners = {a.key: a for a in snap.attachments()}
    by_attachment = _allocations_by_attachment(snap)
    holders: dict[object, list[tuple[StoredAllocation, StoredAttachment]]] = defaultdict(list)
    for att in snap.attachments():
        if not by_attachment.get(att.key):
            out.append(
                Finding(
                    m.ATTACHMENT_WITHOUT_ADDRESS,
                    att.label,
                    "at least one allocated address",
                    "none in the store",
                    _recreate_hint(att),
                )
            )
    for store in snap.stores:
        for a in store.allocations:
            att = owners.get((a.data_dir, a.attachment_id))
            subject = f"address {a.cidr} of network {a.network} in {a.data_dir}"
            if att is None:
                out.append(
                    Finding(
                        m.ORPHAN_ALLOCATION,
                        subject,
                        "an attachment owning it",
                        f"attachment row {a.attachment_id} does not exist",
                        f'delete the row: sqlite3 {a.data_dir}/pycni.db "DELETE FROM allocations '
                        f"WHERE attachment_id = {a.attachment_id} AND ip = '{a.ip}'\"",
                    )
                )
                continue
            problem = allocation_problem(a, gateways.get(_range_key(a), set()))
            if problem is not None:
                out.append(
                    Finding(
                        problem[0],
                        f"{subject}, held by {att.label}",
                        f"an allocatable address of range set {a.range_set}",
                        problem[1],
                        _recreate_hint(att),
                    )
                )
            try:
                holders[ipaddress.ip_address(a.ip)].append((a, att))
            except ValueError:
                pass  # reported above as unreadable
    for ip, held in sorted(holders.items(), key=lambda kv: _sort(kv[0])):
        if len(held) > 1:
            who = [f"{att.label} (dataDir {att.data_dir})" for _, att in held]
            out.append(
                Finding(
                    m.DUPLICATE_ADDRESS,
                    f"address {ip}",
                    "one holder",
                    f"{len(held)} holders: {'; '.join(who)}",
                    "recreate all but one of these pods (DEL then ADD); networks on one node "
                    "need subnets that do not overlap",
                )
            )
    return out


# --- the runtime's view ------------------------------------------------------------------


def check_live(snap: NodeSnapshot, live: set[tuple[str, str]]) -> list[Finding]:
    out = []
    known = set()
    for att in snap.attachments():
        known.add((att.container_id, att.ifname))
        ns = snap.netns.get(att.netns)
        if (att.container_id, att.ifname) in live or (ns is not None and not ns.alive):
            continue  # a stale attachment is reported once, as stale
        out.append(
            Finding(
                m.UNKNOWN_TO_RUNTIME,
                att.label,
                "an attachment the runtime considers live",
                "not in the runtime's list of live attachments",
                _del_hint(att),
            )
        )
    dirs = ", ".join(s.data_dir for s in snap.stores) or "no store"
    for cid, ifname in sorted(live - known) if snap.stores_complete else ():
        out.append(
            Finding(
                m.MISSING_IN_STORE,
                f"container {cid} {ifname}",
                "an attachment in the store (the runtime considers it live)",
                f"none in {dirs}",
                f"recreate the pod (DEL then ADD container {cid}), or check the dataDir",
            )
        )
    return out


# --- bridges -----------------------------------------------------------------------------


def _bridge_names(snap: NodeSnapshot) -> set[str]:
    return {bridge_of(snap, a.data_dir, a.network) for a in snap.attachments()}


def check_bridges(snap: NodeSnapshot) -> list[Finding]:
    """Each bridge of a network with pods exists, is up, and holds its gateways. (A network
    without pods needs no bridge: its next ADD makes it.)"""
    out = []
    gateways: dict[str, set] = defaultdict(set)
    networks: dict[str, set] = defaultdict(set)
    pods: dict[str, int] = defaultdict(int)
    owners = {a.key: a for a in snap.attachments()}
    for att in owners.values():
        bridge = bridge_of(snap, att.data_dir, att.network)
        networks[bridge].add(att.network)
        pods[bridge] += 1
    for store in snap.stores:
        for a in store.allocations:
            att = owners.get((a.data_dir, a.attachment_id))
            if att is not None and a.gateway:
                gateways[bridge_of(snap, att.data_dir, att.network)].add(
                    _iface(f"{a.gateway}/{a.prefixlen}")
                )
    for bridge in sorted(networks):
        subject = f"bridge {bridge} (network {', '.join(sorted(networks[bridge]))})"
        link = snap.links.get(bridge)
        want = ", ".join(str(g) for g in sorted(gateways[bridge], key=_sort)) or "no address"
        if link is None:
            out.append(
                Finding(
                    m.BRIDGE_MISSING,
                    subject,
                    f"a bridge holding {want}",
                    f"no link {bridge}; the host veths of its {pods[bridge]} pod(s) "
                    "are on no bridge",
                    "the next ADD on the network makes it again and puts the existing pods' host "
                    "veths back on it",
                )
            )
            continue
        if link.kind != "bridge":
            out.append(
                Finding(
                    m.BRIDGE_NOT_BRIDGE,
                    subject,
                    f"{bridge} to be a bridge",
                    f"a {link.kind or 'device of unknown kind'}",
                    "remove or rename that device, then recreate the pods",
                )
            )
            continue
        if not link.up:
            out.append(Finding(m.BRIDGE_DOWN, subject, "up", "down", f"ip link set {bridge} up"))
        have = {_iface(a) for a in link.addresses}
        missing = sorted(gateways[bridge] - have, key=_sort)
        if missing:
            out.append(
                Finding(
                    m.BRIDGE_GATEWAY_MISSING,
                    subject,
                    f"gateway address {', '.join(map(str, missing))}",
                    ", ".join(str(a) for a in sorted(have, key=_sort)) or "no address",
                    "; ".join(f"ip addr add {g} dev {bridge}" for g in missing)
                    + " (the next ADD on the network adds it too)",
                )
            )
    return out


# --- packet rules ------------------------------------------------------------------------


def describe_rule(field: str, entry: object) -> str:
    source = getattr(entry, "source", None)
    if source is not None:
        p = "ip" if source.version == 4 else "ip6"
        excl = ", ".join(str(e) for e in getattr(entry, "exclude", ()))
        return f"masquerade {p} saddr {source} daddr != {{ {excl} }}"
    if getattr(entry, "host_port", None) is not None:
        host = entry.host_ip or "any address"  # type: ignore[attr-defined]
        return (
            f"hostPort {entry.protocol} {host} port {entry.host_port} -> "  # type: ignore
            f"{entry.pod_ip} port {entry.pod_port}"
        )  # type: ignore[attr-defined]
    if field == "forward":
        return f"accept forwarded traffic from and to {entry}"
    if isinstance(entry, PolicyFragment):
        return f"NetworkPolicy rules (digest {entry.digest})"
    if field == "hairpin":
        return f"masquerade hairpin hostPort traffic of pod {entry}"
    return f"{field} {entry}"


def _rule_key(entry: object) -> object:
    """Entries with one key are one rule that differs, not a missing and an extra one."""
    if getattr(entry, "source", None) is not None:
        return ("source", entry.source)  # type: ignore[attr-defined]
    if getattr(entry, "host_port", None) is not None:
        return ("hostport", entry.protocol, entry.host_ip, entry.host_port)  # type: ignore
    if isinstance(entry, PolicyFragment):
        return ("policy",)  # one fragment per table: another digest is the same rules, changed
    return entry


def check_bridge_netfilter(rules: m.RulesView) -> list[Finding]:
    """NetworkPolicy rules see pod-to-pod traffic on one node's bridge only through
    br_netfilter: with it off, same-node traffic is not filtered at all."""
    if not getattr(rules.desired, "policy", None):
        return []
    return [
        Finding(
            m.BRIDGE_NETFILTER_OFF,
            f"net.bridge.{name}",
            "1 (bridged pod-to-pod frames go through the NetworkPolicy rules)",
            value or "absent",
            f"sysctl -w net.bridge.{name}=1 in the node's network namespace (the agent "
            "sets it when it installs policies)",
        )
        for name, value in sorted(rules.bridge_netfilter.items())
        if value != "1"
    ]


def check_rules(rules: m.RulesView) -> list[Finding]:
    where = "nftables table inet pycni" if rules.backend == "nft" else "pycni's iptables chains"
    hint = (
        "a running agent puts the wanted rules back within 10 s (--resync with a cluster); "
        "without one, pycni rewrites them only when the wanted set changes: run `pycnictl "
        "cleanup --data-dir DIR` (it forgets what it installed), then the next ADD or DEL "
        "installs them"
    )
    desired = rules.desired
    if rules.installed is None:
        if not desired:
            return []
        return [
            Finding(
                m.RULES_MISSING,
                where,
                "; ".join(describe_rule(f, e) for f, e in _entries(desired)),
                "absent",
                hint,
            )
        ]
    out = []
    for f in _rule_fields(desired):
        want = set(_field_entries(getattr(desired, f.name)))
        have = set(_field_entries(getattr(rules.installed, f.name, ())))
        extra = {_rule_key(e): e for e in have - want}
        for entry in sorted(want - have, key=str):
            subject = f"{f.name} rule in {where}"
            other = extra.pop(_rule_key(entry), None)
            if other is not None:
                out.append(
                    Finding(
                        m.RULE_DIFFERS,
                        subject,
                        describe_rule(f.name, entry),
                        describe_rule(f.name, other),
                        hint,
                    )
                )
            else:
                out.append(
                    Finding(m.RULE_MISSING, subject, describe_rule(f.name, entry), "absent", hint)
                )
        for entry in sorted(extra.values(), key=str):
            out.append(
                Finding(
                    m.RULE_EXTRA,
                    f"{f.name} rule in {where}",
                    "absent",
                    describe_rule(f.name, entry),
                    hint,
                )
            )
    return out


def _rule_fields(rules: object) -> list:
    """The RuleSet's fields that are rules: which stores the table lists is bookkeeping (a
    store this doctor was not told of still has its own rules, which are what matters)."""
    return [f for f in dataclasses.fields(rules) if f.name != "stores"]  # type: ignore[arg-type]


def _entries(rules: object) -> Iterable[tuple[str, object]]:
    for f in _rule_fields(rules):
        for entry in _field_entries(getattr(rules, f.name)):
            yield f.name, entry


def _field_entries(value: object) -> Iterable[object]:
    """A rule set field's entries: the NetworkPolicy fragment is one entry (or none)."""
    if isinstance(value, PolicyFragment):
        return (value,) if value else ()
    return value  # type: ignore[return-value]


# --- cluster routes ----------------------------------------------------------------------


def check_cluster(c: m.ClusterView, links: dict[str, Link]) -> list[Finding]:
    from ..backends.plan import Fdb, Neighbour, diff

    subject = f"node {c.node} ({c.backend})"
    repair = (
        "the agent reconciles on every datastore change and every --resync seconds; if "
        "this stays, see the agent's log and `pycnictl status`"
    )
    if not c.ready:
        return [
            Finding(
                m.CLUSTER_NOT_READY, subject, "a leased pod subnet", c.reason or "not ready", repair
            )
        ]
    out = []
    vtep = links.get(c.vtep_name) if c.vtep_name else None
    if c.backend == "host-gw":
        if vtep is not None and vtep.kind == "vxlan":
            out.append(
                Finding(
                    m.VTEP_STALE,
                    subject,
                    "no VXLAN device (backend host-gw)",
                    f"{c.vtep_name} present",
                    repair,
                )
            )
    elif vtep is None or vtep.kind != "vxlan":
        # Its routes, neighbours and FDB entries went with it, and without it the plan has
        # none either (read.read_cluster): one finding, not one per peer.
        out.append(
            Finding(
                m.VTEP_MISSING,
                subject,
                f"VXLAN device {c.vtep_name} with MAC {c.vtep_mac}",
                "absent" if vtep is None else f"{c.vtep_name} is a {vtep.kind or 'device'}",
                repair,
            )
        )
    else:
        wrong = []
        if c.vtep_mac and vtep.mac.lower() != c.vtep_mac.lower():
            wrong.append(f"MAC {vtep.mac}")
        if not vtep.up:
            wrong.append("down")
        if wrong:
            out.append(
                Finding(
                    m.VTEP_WRONG,
                    subject,
                    f"{c.vtep_name} up with MAC {c.vtep_mac}",
                    ", ".join(wrong),
                    repair,
                )
            )
    if c.want is None or c.have is None:
        return out
    names_by_index = {link.index: link.name for link in links.values()}
    have_by_key = {e.key: e for e in c.have.entries()}  # type: ignore[attr-defined]
    plan = diff(c.want, c.have)  # type: ignore[arg-type]
    for verb, entries in (("missing", plan.add), ("differs", plan.replace), ("extra", plan.remove)):
        for e in entries:
            kind = (
                "fdb"
                if isinstance(e, Fdb)
                else "neighbour"
                if isinstance(e, Neighbour)
                else "route"
            )
            text = describe_entry(e, names_by_index)
            if verb == "missing":
                expected, actual = text, "absent"
            elif verb == "differs":
                expected, actual = text, describe_entry(have_by_key[e.key], names_by_index)
            else:
                expected, actual = "absent (no node in the agent's list needs it)", text
            out.append(Finding(f"{kind}-{verb}", subject, expected, actual, repair))
    return out


def check_node_subnets(snap: NodeSnapshot, c: m.ClusterView) -> list[Finding]:
    """Every address of the cluster network's pods lies in the node's subnet of its family
    now. A pod that kept an address of an earlier subnet (the node was deleted and registered
    again with another podCIDR) is unreachable from other nodes, whose routes follow the
    node's subnet now."""
    if not c.ready or not c.network or not c.subnets:
        return []
    subnets = {}
    for text in c.subnets:
        net = _network(text)
        if net is not None:
            subnets.setdefault(net.version, net)
    by_attachment = _allocations_by_attachment(snap)
    gateways = _gateways(snap)
    out = []
    for att in snap.attachments():
        if att.network != c.network:
            continue
        outside = []
        for a in by_attachment.get(att.key, []):
            if allocation_problem(a, gateways.get(_range_key(a), set())) is not None:
                continue  # reported as what it is (check_allocations)
            ip = _iface(a.cidr)
            version = getattr(ip, "version", None)
            if version in subnets and ip.ip not in subnets[version]:  # type: ignore[union-attr]
                outside.append(str(ip.ip))  # type: ignore[union-attr]
        if outside:
            current = ", ".join(str(n) for _, n in sorted(subnets.items()))
            out.append(
                Finding(
                    m.POD_OUTSIDE_NODE_SUBNET,
                    att.label,
                    f"addresses in node {c.node}'s subnet {current}",
                    f"{', '.join(outside)}: from an earlier subnet of this node (its podCIDR "
                    "changed); other nodes no longer route to it",
                    "recreate the pod (delete it and let its controller make it again; by hand: "
                    f"DEL then ADD container {att.container_id}): its new address comes from "
                    f"{current}",
                )
            )
    return out


def _network(text: str):
    try:
        return ipaddress.ip_network(text)
    except ValueError:
        return None


def describe_entry(e: object, names_by_index: dict[int, str]) -> str:
    from ..backends.plan import Fdb, Neighbour

    def dev(index: int) -> str:
        return names_by_index.get(index, f"index {index}")

    if isinstance(e, Fdb):
        return f"fdb {e.lladdr} dst {e.dst or '-'} dev {dev(e.dev)}"
    if isinstance(e, Neighbour):
        return f"neighbour {e.ip} lladdr {e.lladdr} dev {dev(e.dev)} permanent"
    return (
        f"route {e.dst} via {e.gateway or '-'} dev {dev(e.dev)}"  # type: ignore
        + (" onlink" if e.onlink else "")
        + " proto 120"
    )  # type: ignore[attr-defined]
