"""Lean rtnetlink for the reconcile pass: dumps parsed with struct, writes pipelined.

pyroute2 decodes every attribute of every message into objects and waits for each answer
before the next request: with 5,000 peers, reading pycni's routes alone took about 0.6 s of a
pass and writing 3,000 VXLAN entries about 5 s. Here a dump reads only the few attributes the
plan compares, and writes go many to a send(2) with their acknowledgements read afterwards
(the kernel handles them in order, one after the other, exactly as single requests).

The socket is a fresh one in the network namespace of the caller's pyroute2 handle (found with
SIOCGSKNS), so it works wherever that handle does. `Rtnl.open` returns None when it cannot make
one (no such ioctl, a handle without a socket): the caller keeps using pyroute2.
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import select
import socket
import struct
from collections.abc import Iterator

from pyroute2.netlink.exceptions import NetlinkError

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # acknowledgements of errors without the request echoed back
SIOCGSKNS = 0x894C  # a socket's network namespace, as a new descriptor (Linux 4.9)

NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x2, 0x4, 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_TABLE = 1, 4, 5, 15
NDA_DST, NDA_LLADDR = 1, 2
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE, RT_SCOPE_NOWHERE = 0, 255
AF_BRIDGE = 7

NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope,
# type, flags
NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
RTATTR = struct.Struct("=HH")  # len, type
U32 = struct.Struct("=I")
ERRNO = struct.Struct("=i")

# Requests per send(2): each ack is an skb of its own (about 768 bytes of receive buffer), and
# an overrun receive buffer loses acks (ENOBUFS); 128 fit the default 208 KiB.
SEND_COUNT = 128
RECV_BYTES = 1 << 20
SO_RCVBUFFORCE = 33
RCVBUF = 4 << 20  # dumps of thousands of entries arrive faster than a busy pass reads them
TIMEOUT = 30.0  # seconds without a byte from the kernel: something is badly wrong

# Parsed addresses and networks, shared by every pass: the same few thousand recur.
_addresses: dict[bytes, str] = {}
_networks: dict[tuple[bytes, int], ipaddress.IPv4Network | ipaddress.IPv6Network] = {}
CACHE_LIMIT = 200_000


def address(raw: bytes) -> str:
    """str(ip_address) of a packed address, cached."""
    text = _addresses.get(raw)
    if text is None:
        if len(_addresses) > CACHE_LIMIT:
            _addresses.clear()
        text = _addresses[raw] = str(ipaddress.ip_address(raw))
    return text


def network(raw: bytes, prefixlen: int):
    """ip_network of a packed address and prefix length, cached."""
    key = (raw, prefixlen)
    net = _networks.get(key)
    if net is None:
        if len(_networks) > CACHE_LIMIT:
            _networks.clear()
        net = _networks[key] = ipaddress.ip_network(f"{address(raw)}/{prefixlen}")
    return net


def packed(text: str) -> bytes:
    """The packed form of an address written as str(ip_address) writes it."""
    return socket.inet_pton(socket.AF_INET6 if ":" in text else socket.AF_INET, text)


def attrs(data: bytes | memoryview, offset: int, end: int) -> dict[int, bytes]:
    """The attributes from `offset` to `end`, by type (the last of a type wins)."""
    out = {}
    while offset + 4 <= end:
        length, kind = RTATTR.unpack_from(data, offset)
        if length < 4:
            break
        out[kind & 0x3FFF] = bytes(data[offset + 4 : offset + length])
        offset += (length + 3) & ~3
    return out


def attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return RTATTR.pack(length, kind) + payload + b"\0" * (-length % 4)


class Rtnl:
    """One raw NETLINK_ROUTE socket; dumps and pipelined requests over it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seq = 0
        self._pending = b""

    @classmethod
    def open(cls, ipr) -> Rtnl | None:
        """A socket in the namespace of pyroute2 handle `ipr`, or None if none can be made."""
        try:
            ns = fcntl.ioctl(ipr.fileno(), SIOCGSKNS)
        except (AttributeError, OSError, TypeError, ValueError):
            return None
        try:
            here = os.stat("/proc/thread-self/ns/net").st_ino
            if os.fstat(ns).st_ino == here:
                sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
            else:
                from ..dataplane.netns import _socket_in  # the thread steps in and back

                sock = _socket_in(ns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        except OSError:
            return None
        finally:
            os.close(ns)
        try:
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            except OSError:  # not root: the default has to do
                pass
            sock.bind((0, 0))
        except OSError:
            sock.close()
            return None
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Rtnl:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- reading ---------------------------------------------------------------------------

    def _recv(self) -> bytes:
        ready, _, _ = select.select([self.sock], [], [], TIMEOUT)
        if not ready:
            raise NetlinkError(errno.ETIMEDOUT, "no answer from the kernel")
        return self.sock.recv(RECV_BYTES)

    def _messages(self, data: bytes) -> Iterator[tuple[int, int, int, int, int]]:
        """(type, flags, seq, offset of the payload, end) of each message in `data`."""
        offset = 0
        while offset + NLMSG.size <= len(data):
            length, kind, flags, seq, _pid = NLMSG.unpack_from(data, offset)
            if length < NLMSG.size:
                break
            yield kind, flags, seq, offset + NLMSG.size, offset + length
            offset += (length + 3) & ~3

    def dump(self, kind: int, header: bytes) -> Iterator[tuple[bytes, int, int]]:
        """Every message a dump request answers: (data, offset of the payload, end)."""
        self.seq += 1
        seq = self.seq
        body = header
        self.sock.send(
            NLMSG.pack(NLMSG.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body
        )
        while True:
            data = self._recv()
            for mtype, _flags, mseq, start, end in self._messages(data):
                if mseq != seq:
                    continue  # an answer to something earlier: never ours to read
                if mtype == NLMSG_DONE:
                    return
                if mtype == NLMSG_ERROR:
                    code = -ERRNO.unpack_from(data, start)[0]
                    if code:
                        raise NetlinkError(code, os.strerror(code))
                    return
                yield data, start, end

    # --- writing ---------------------------------------------------------------------------

    def requests(self, messages: list[tuple[int, int, bytes]]) -> list[int]:
        """Send every (type, flags, body) in order, many per send(2); return each one's
        errno (0: done)."""
        results = [0] * len(messages)
        first = self.seq + 1
        chunk: list[bytes] = []
        sent_upto = 0
        for n, (kind, flags, body) in enumerate(messages):
            self.seq += 1
            msg = NLMSG.pack(
                NLMSG.size + len(body), kind, flags | NLM_F_REQUEST | NLM_F_ACK, self.seq, 0
            )
            chunk.append(msg + body)
            if len(chunk) >= SEND_COUNT or n == len(messages) - 1:
                self.sock.send(b"".join(chunk))
                self._acks(first + sent_upto, first + n, first, results)
                sent_upto = n + 1
                chunk = []
        return results

    def _acks(self, low: int, high: int, first: int, results: list[int]) -> None:
        """Read the acknowledgements of requests `low`..`high` (sequence numbers)."""
        waiting = set(range(low, high + 1))
        while waiting:
            data = self._recv()
            for mtype, _flags, seq, start, _end in self._messages(data):
                if mtype != NLMSG_ERROR or seq not in waiting:
                    continue
                waiting.discard(seq)
                results[seq - first] = -ERRNO.unpack_from(data, start)[0]
