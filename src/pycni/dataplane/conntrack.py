"""The kernel's connection tracking table, read and pruned over ctnetlink.

Only what NetworkPolicy needs (agent/policy.py cuts the connections a new policy denies):
every entry's original and reply tuples (addresses, protocol, ports), and deleting one entry.
Parsed here with ``struct`` because pyroute2's generic decoding costs about 0.3 ms an entry,
which on a busy node (tens of thousands of entries) held every policy change, and every ADD
waiting for its pod's rules, for seconds; this costs about 15 microseconds an entry (a TCP,
UDP or SCTP tuple is read in one unpack when laid out as the kernel always lays it out).

An entry is deleted by the original tuple exactly as the kernel sent it, with its zone and its
id: the kernel removes nothing but that entry (a new connection that took the same tuple
meanwhile has another id and is left alone).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER

CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_ID = 12
CTA_ZONE = 18
CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_IP_V4_SRC, CTA_IP_V4_DST, CTA_IP_V6_SRC, CTA_IP_V6_DST = 1, 2, 3, 4
CTA_PROTO_NUM, CTA_PROTO_SRC_PORT, CTA_PROTO_DST_PORT = 1, 2, 3

_NLMSG = struct.Struct("=LHHLL")
_NLA = struct.Struct("=HH")
_NFGEN = struct.Struct("=BBH")  # family, version (NFNETLINK_V0), res_id (big endian; 0)
_RECV = 1 << 20


@dataclass(frozen=True)
class Tuple:
    """One direction of a connection. Ports are 0 for protocols without them."""

    src: str
    dst: str
    proto: int
    sport: int = 0
    dport: int = 0


@dataclass(frozen=True)
class Entry:
    family: int  # socket.AF_INET or AF_INET6
    orig: Tuple
    reply: Tuple
    # What delete() sends back: the CTA_TUPLE_ORIG payload, the CTA_ZONE and CTA_ID attributes
    # as the kernel sent them.
    key: bytes = b""
    zone: bytes = b""
    id: bytes = b""


def _attrs(data: bytes | memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each attribute in data[start:end]."""
    while start + 4 <= end:
        length, kind = _NLA.unpack_from(data, start)
        if length < 4 or start + length > end:
            return
        yield kind & NLA_TYPE_MASK, start + 4, start + length
        start += (length + 3) & ~3


# How the kernel lays out a TCP, UDP or SCTP tuple (ctnetlink_dump_tuples): CTA_TUPLE_IP with
# the source and destination addresses, CTA_TUPLE_PROTO with the protocol number and the
# source and destination ports. Read in one unpack when the headers are exactly these; any
# other layout (ICMP's ids, a tuple zone) goes the general way.
_FAST: dict[int, tuple[struct.Struct, tuple[int, ...]]] = {
    int(family): (
        struct.Struct(f"=HHHH{n}sHH{n}sHHHHB3xHHH2xHHH2x"),
        (
            8 + 2 * (4 + n),
            CTA_TUPLE_IP,
            4 + n,
            src,
            4 + n,
            dst,
            28,
            CTA_TUPLE_PROTO,
            5,
            1,
            6,
            2,
            6,
            3,
        ),
    )
    for family, n, src, dst in (
        (socket.AF_INET, 4, CTA_IP_V4_SRC, CTA_IP_V4_DST),
        (socket.AF_INET6, 16, CTA_IP_V6_SRC, CTA_IP_V6_DST),
    )
}


def _tuple(data: bytes, start: int, end: int, family: int) -> Tuple | None:
    fast, headers = _FAST[family]
    if end - start == fast.size:
        f = fast.unpack_from(data, start)
        got = (f[0], f[1] & NLA_TYPE_MASK, f[2], f[3], f[5], f[6], f[8], f[9] & NLA_TYPE_MASK)
        if got + (f[10], f[11], f[13], f[14], f[16], f[17]) == headers:
            return Tuple(
                socket.inet_ntop(family, f[4]),
                socket.inet_ntop(family, f[7]),
                f[12],
                socket.ntohs(f[15]),
                socket.ntohs(f[18]),
            )
    src = dst = ""
    proto = sport = dport = 0
    for kind, a, b in _attrs(data, start, end):
        if kind == CTA_TUPLE_IP:
            for k, x, y in _attrs(data, a, b):
                if k in (CTA_IP_V4_SRC, CTA_IP_V6_SRC):
                    src = socket.inet_ntop(family, data[x:y])
                elif k in (CTA_IP_V4_DST, CTA_IP_V6_DST):
                    dst = socket.inet_ntop(family, data[x:y])
        elif kind == CTA_TUPLE_PROTO:
            for k, x, _ in _attrs(data, a, b):
                if k == CTA_PROTO_NUM:
                    proto = data[x]
                elif k == CTA_PROTO_SRC_PORT:
                    sport = struct.unpack_from("!H", data, x)[0]
                elif k == CTA_PROTO_DST_PORT:
                    dport = struct.unpack_from("!H", data, x)[0]
    if not src or not dst:
        return None
    return Tuple(src, dst, proto, sport, dport)


def parse_entry(data: bytes, start: int, end: int) -> Entry | None:
    """One IPCTNL_MSG_CT_NEW message's payload (nfgenmsg and attributes) in data[start:end];
    None for what is not IPv4 or IPv6."""
    family = data[start]
    if family not in (socket.AF_INET, socket.AF_INET6):
        return None
    orig = reply = None
    key = zone = ident = b""
    at = start + _NFGEN.size
    while at + 4 <= end:  # the top-level attributes, inline: this loop runs for every entry
        length, kind = _NLA.unpack_from(data, at)
        if length < 4 or at + length > end:
            break
        kind &= NLA_TYPE_MASK
        if kind == CTA_TUPLE_ORIG:
            key = data[at + 4 : at + length]
            orig = _tuple(data, at + 4, at + length, family)
        elif kind == CTA_TUPLE_REPLY:
            reply = _tuple(data, at + 4, at + length, family)
        elif kind == CTA_ZONE:
            zone = data[at : at + length]
        elif kind == CTA_ID:
            ident = data[at : at + length]
        at += (length + 3) & ~3
    if orig is None or reply is None:
        return None
    return Entry(family, orig, reply, bytes(key), bytes(zone), bytes(ident))


def _attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * (-length % 4)


class Conntrack:
    """A ctnetlink socket of the current network namespace."""

    def __init__(self) -> None:
        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
        )
        self.sock.bind((0, 0))
        self.seq = 0

    def __enter__(self) -> Conntrack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def _send(self, msg_type: int, flags: int, family: int, payload: bytes = b"") -> int:
        self.seq += 1
        body = _NFGEN.pack(family, 0, 0) + payload
        kind = (NFNL_SUBSYS_CTNETLINK << 8) | msg_type
        self.sock.send(_NLMSG.pack(_NLMSG.size + len(body), kind, flags, self.seq, 0) + body)
        return self.seq

    def entries(self) -> list[Entry]:
        """Every IPv4 and IPv6 entry, as of one dump."""
        seq = self._send(IPCTNL_MSG_CT_GET, NLM_F_REQUEST | NLM_F_DUMP, socket.AF_UNSPEC)
        out: list[Entry] = []
        while True:
            data = self.sock.recv(_RECV)
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, kind, _, mseq, _ = _NLMSG.unpack_from(data, offset)
                if length < _NLMSG.size:
                    raise OSError(errno.EIO, "ctnetlink: a malformed message")
                end = offset + length
                if mseq == seq:
                    if kind == NLMSG_DONE:
                        return out
                    if kind == NLMSG_ERROR:
                        code = -struct.unpack_from("=i", data, offset + _NLMSG.size)[0]
                        raise OSError(code, f"ctnetlink dump: {os.strerror(code)}")
                    entry = parse_entry(data, offset + _NLMSG.size, end)
                    if entry is not None:
                        out.append(entry)
                offset += (length + 3) & ~3

    def delete(self, entry: Entry) -> bool:
        """Delete the entry; False when it is gone already."""
        payload = _attr(CTA_TUPLE_ORIG | NLA_F_NESTED, entry.key) + entry.zone + entry.id
        seq = self._send(IPCTNL_MSG_CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, entry.family, payload)
        while True:
            data = self.sock.recv(_RECV)
            offset = 0
            while offset + _NLMSG.size <= len(data):
                length, kind, _, mseq, _ = _NLMSG.unpack_from(data, offset)
                if length < _NLMSG.size:
                    raise OSError(errno.EIO, "ctnetlink: a malformed message")
                if mseq == seq and kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, offset + _NLMSG.size)[0]
                    if code == 0:
                        return True
                    if code == errno.ENOENT:
                        return False
                    raise OSError(code, f"ctnetlink delete: {os.strerror(code)}")
                offset += (length + 3) & ~3
