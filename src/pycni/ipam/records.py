"""What the IPAM store records, as Python objects: an attachment (one container interface
in one network) with its addresses and port mappings, and reading them back from the database.
"""

from __future__ import annotations

import ipaddress
import sqlite3
from dataclasses import dataclass, field

from pycni.cni.netconf import PortMapping
from pycni.ipam.ranges import Address


@dataclass(frozen=True)
class Allocation:
    ip: Address
    prefixlen: int
    gateway: Address | None
    range_set: str  # RangeSet.key


@dataclass
class Attachment:
    network: str
    container_id: str
    ifname: str
    host_veth: str
    netns: str
    created: float
    allocations: list[Allocation] = field(default_factory=list)
    port_mappings: list[PortMapping] = field(default_factory=list)


def select(conn: sqlite3.Connection, where: str, args: tuple) -> list[Attachment]:
    """The attachments the ``where`` clause picks, with their addresses and port mappings
    (inside the caller's read transaction)."""
    rows = conn.execute(
        "SELECT id, network, container_id, ifname, host_veth, netns, created"
        f" FROM attachments {where} ORDER BY network, created, id",
        args,
    ).fetchall()
    by_id = {row[0]: Attachment(*row[1:], allocations=[]) for row in rows}
    if not by_id:
        return []
    ids = ",".join(str(i) for i in by_id)  # integers from the db: safe to inline
    for att_id, ip, prefixlen, gw, rs_key in conn.execute(
        "SELECT attachment_id, ip, prefixlen, gateway, range_set FROM allocations"
        f" WHERE attachment_id IN ({ids}) ORDER BY attachment_id, seq"
    ):
        by_id[att_id].allocations.append(
            Allocation(ipaddress.ip_address(ip), prefixlen, parse_ip(gw), rs_key)
        )
    for att_id, protocol, host_ip, host_port, container_port in conn.execute(
        "SELECT attachment_id, protocol, host_ip, host_port, container_port"
        f" FROM port_mappings WHERE attachment_id IN ({ids}) ORDER BY rowid"
    ):
        by_id[att_id].port_mappings.append(
            PortMapping(host_port, container_port, protocol, parse_ip(host_ip or None))
        )
    return list(by_id.values())


def parse_ip(s: str | None) -> Address | None:
    if s is None:
        return None
    try:
        return ipaddress.ip_address(s)
    except ValueError:
        return None
