"""Recording an attachment: choosing its addresses from the network's range sets
(round-robin after the last one given out, or as requested), refusing an address or a host
port that another attachment holds, and writing its rows.

Each function runs inside the caller's write transaction (Store.add_attachment and
Store.restore_attachment open it), so choosing and recording are one atomic step.
"""

from __future__ import annotations

import ipaddress
import sqlite3
import time
from collections.abc import Sequence

from pycni.cni.errors import ADDRESS_UNAVAILABLE, ATTACHMENT_EXISTS, POOL_EXHAUSTED, CniError
from pycni.cni.netconf import PortMapping, port_mappings_conflict
from pycni.ipam.ranges import Address, RangeSet
from pycni.ipam.records import Allocation, parse_ip


def add_attachment(
    conn: sqlite3.Connection,
    network: str,
    container_id: str,
    ifname: str,
    host_veth: str,
    netns: str,
    range_sets: list[RangeSet],
    requested: list[Address],
    port_mappings: Sequence[PortMapping] = (),
    pod: tuple[str, str] | None = None,
) -> list[Allocation]:
    """Record an attachment, its addresses (those requested, else the next free ones) and its
    port mappings. A host port another attachment on this node holds is refused
    (ADDRESS_UNAVAILABLE)."""
    if _attachment_id(conn, network, container_id, ifname) is not None:
        raise CniError(
            ATTACHMENT_EXISTS,
            f"container {container_id} already has an attachment on interface "
            f"{ifname} in network {network}; DEL it first",
        )
    held = dict(
        conn.execute(
            "SELECT al.ip, at.container_id FROM allocations al"
            " JOIN attachments at ON at.id = al.attachment_id WHERE al.network = ?",
            (network,),
        ).fetchall()
    )
    chosen: dict[int, Address] = {}
    for ip in requested:
        i = _check_requested(network, range_sets, held, ip)
        if i in chosen:
            raise CniError(
                ADDRESS_UNAVAILABLE,
                f"requested addresses {chosen[i]} and {ip} are both in range set "
                f"{range_sets[i].key} of network {network}; request at most one each",
            )
        chosen[i] = ip

    families = {rs.family for rs in range_sets}
    for mapping in port_mappings:
        _check_host_port(conn, mapping, families)

    allocs: list[Allocation] = []
    for i, rs in enumerate(range_sets):
        ip = chosen[i] if i in chosen else _pick(conn, network, rs, held)
        r = rs.find(ip)
        assert r is not None
        held[str(ip)] = container_id
        allocs.append(Allocation(ip, r.subnet.prefixlen, r.gateway, rs.key))

    _insert(conn, network, container_id, ifname, host_veth, netns, allocs, port_mappings, pod)
    return allocs


def restore_attachment(
    conn: sqlite3.Connection,
    network: str,
    container_id: str,
    ifname: str,
    host_veth: str,
    netns: str,
    allocations: list[Allocation],
    port_mappings: Sequence[PortMapping] = (),
) -> None:
    """Record an attachment as found on the node, its addresses as they are (rebuilding a
    store that was lost). An attachment or address already recorded is refused."""
    if _attachment_id(conn, network, container_id, ifname) is not None:
        raise CniError(
            ATTACHMENT_EXISTS,
            f"container {container_id} already has an "
            f"attachment on interface {ifname} in network {network}",
        )
    for a in allocations:
        row = conn.execute(
            "SELECT at.container_id FROM allocations al JOIN attachments at ON"
            " at.id = al.attachment_id WHERE al.network = ? AND al.ip = ?",
            (network, str(a.ip)),
        ).fetchone()
        if row is not None:
            raise CniError(
                ADDRESS_UNAVAILABLE,
                f"address {a.ip} is already held by container {row[0]} in network {network}",
            )
    _insert(conn, network, container_id, ifname, host_veth, netns, allocations, port_mappings)


def _insert(
    conn: sqlite3.Connection,
    network: str,
    container_id: str,
    ifname: str,
    host_veth: str,
    netns: str,
    allocs: list[Allocation],
    port_mappings: Sequence[PortMapping],
    pod: tuple[str, str] | None = None,
) -> None:
    cur = conn.execute(
        "INSERT INTO attachments (network, container_id, ifname, host_veth, netns,"
        " created) VALUES (?, ?, ?, ?, ?, ?)",
        (network, container_id, ifname, host_veth, netns, time.time()),
    )
    att_id = cur.lastrowid
    for seq, a in enumerate(allocs):
        conn.execute(
            "INSERT INTO allocations (attachment_id, seq, network, ip, prefixlen,"
            " gateway, range_set) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (att_id, seq, network, str(a.ip), a.prefixlen, _str(a.gateway), a.range_set),
        )
        # Requested addresses move the cursor too, as in host-local.
        conn.execute(
            "INSERT OR REPLACE INTO last_reserved (network, range_set, ip) VALUES (?, ?, ?)",
            (network, a.range_set, str(a.ip)),
        )
    if pod is not None:
        # Which Kubernetes pod this is (CNI_ARGS): NetworkPolicy finds its addresses by it.
        conn.execute(
            "INSERT INTO pod_refs (attachment_id, namespace, name) VALUES (?, ?, ?)",
            (att_id, pod[0], pod[1]),
        )
    for m in port_mappings:
        conn.execute(
            "INSERT INTO port_mappings (attachment_id, protocol, host_ip, host_port,"
            " container_port) VALUES (?, ?, ?, ?, ?)",
            (att_id, m.protocol, _str(m.host_ip) or "", m.host_port, m.container_port),
        )


def _check_host_port(conn: sqlite3.Connection, mapping: PortMapping, families: set[int]) -> None:
    """Refuse a mapping whose host port another attachment (of any network: the node's
    ports are shared) holds on an overlapping address."""
    rows = conn.execute(
        "SELECT pm.attachment_id, pm.host_ip, pm.container_port, at.network,"
        " at.container_id FROM port_mappings pm JOIN attachments at ON at.id ="
        " pm.attachment_id WHERE pm.host_port = ? AND pm.protocol = ?",
        (mapping.host_port, mapping.protocol),
    ).fetchall()
    want = mapping.claims(families)
    for att_id, host_ip, container_port, network, container_id in rows:
        theirs = PortMapping(mapping.host_port, container_port, mapping.protocol, parse_ip(host_ip))
        their_families = {
            _family(ip)
            for (ip,) in conn.execute(
                "SELECT ip FROM allocations WHERE attachment_id = ?", (att_id,)
            )
        }
        if port_mappings_conflict(want, theirs.claims(their_families)):
            where = f" on {mapping.host_ip}" if mapping.host_ip else ""
            raise CniError(
                ADDRESS_UNAVAILABLE,
                f"host port {mapping.host_port}/{mapping.protocol}{where} is already "
                f"mapped to container {container_id} in network {network}",
            )


def _check_requested(
    network: str, range_sets: list[RangeSet], held: dict[str, str], ip: Address
) -> int:
    """Index of the range set that can give out requested `ip`, or raise why not."""
    hits = [i for i, rs in enumerate(range_sets) if rs.find(ip) is not None]
    if len(hits) != 1:
        raise CniError(
            ADDRESS_UNAVAILABLE,
            f"requested address {ip} is not in any range of network {network}",
        )
    r = range_sets[hits[0]].find(ip)
    assert r is not None
    if r.is_reserved(ip):
        raise CniError(
            ADDRESS_UNAVAILABLE,
            f"requested address {ip} is reserved (network, broadcast or gateway address "
            f"of {r.subnet}) in network {network}",
        )
    if str(ip) in held:
        raise CniError(
            ADDRESS_UNAVAILABLE,
            f"requested address {ip} is already in use by container {held[str(ip)]} "
            f"in network {network}",
        )
    return hits[0]


def _pick(conn: sqlite3.Connection, network: str, rs: RangeSet, held: dict[str, str]) -> Address:
    row = conn.execute(
        "SELECT ip FROM last_reserved WHERE network = ? AND range_set = ?",
        (network, rs.key),
    ).fetchone()
    after = parse_ip(row[0]) if row else None
    # Candidates are distinct: among len(held) + 1 of them one is free, so this walk ends
    # within that many steps (usually the first), or when a smaller pool runs out. No count
    # of what is held first: that cost every ADD a parse of every pod's address.
    for _r, ip in rs.candidates(after):
        if str(ip) not in held:
            return ip
    size = rs.capacity()
    raise CniError(
        POOL_EXHAUSTED,
        f"no free address in {rs.key} of network {network} ({size} addresses, all in use)",
    )


def _attachment_id(
    conn: sqlite3.Connection, network: str, container_id: str, ifname: str
) -> int | None:
    row = conn.execute(
        "SELECT id FROM attachments WHERE network = ? AND container_id = ? AND ifname = ?",
        (network, container_id, ifname),
    ).fetchone()
    return row[0] if row else None


def _family(ip: str) -> int:
    return ipaddress.ip_address(ip).version


def _str(ip: Address | None) -> str | None:
    return None if ip is None else str(ip)
