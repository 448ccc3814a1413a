"""Lean rtnetlink for the hot paths: the reconcile pass and a pod's ADD and DEL.

pyroute2 decodes every attribute of every message into objects, runs an event loop per
request and waits for each answer before the next: with 5,000 peers, reading pycni's routes
alone took about 0.6 s of a pass and writing 3,000 VXLAN entries about 5 s, and each of an
ADD's ten requests cost 0.3-0.5 ms of interpreter time (against 0.02 ms here), all of it under
the agent's one GIL in a storm of pods. Here a dump reads only the few attributes the caller
needs, and writes go many to a send(2) with their acknowledgements read afterwards (the kernel
handles them in order, one after the other, exactly as single requests). pyroute2 stays for
everything else: its messages are the readable ones.

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

from .netns import _socket_in

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # acknowledgements of errors without the request echoed back
SIOCGSKNS = 0x894C  # a socket's network namespace, as a new descriptor (Linux 4.9)

NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR = 20
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK, NLM_F_ECHO, NLM_F_DUMP = 0x1, 0x2, 0x4, 0x8, 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_METRICS, RTA_TABLE = 1, 4, 5, 6, 8, 15
RTAX_MTU, RTAX_ADVMSS = 2, 8
IFLA_ADDRESS, IFLA_IFNAME, IFLA_MTU, IFLA_LINK, IFLA_MASTER = 1, 3, 4, 5, 10
IFLA_LINKINFO, IFLA_IFALIAS, IFLA_NET_NS_FD = 18, 20, 28
IFLA_INFO_KIND, IFLA_INFO_DATA, IFLA_INFO_SLAVE_DATA = 1, 2, 5
VETH_INFO_PEER = 1
IFLA_BRPORT_MODE = 4  # hairpin
IFA_ADDRESS, IFA_LOCAL, IFA_FLAGS = 1, 2, 8
IFF_UP = 0x1
NLA_F_NESTED = 0x8000
RTPROT_STATIC = 4
RT_TABLE_COMPAT, RT_TABLE_MAIN = 252, 254
NDA_DST, NDA_LLADDR = 1, 2
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE, RT_SCOPE_NOWHERE = 0, 255
AF_BRIDGE = 7

NLMSG = struct.Struct("=IHHII")  # len, type, flags, seq, pid
RTMSG = struct.Struct("=BBBBBBBBI")  # family, dst_len, src_len, tos, table, protocol, scope,
# type, flags
NDMSG = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBi")  # family, prefixlen, flags, scope, index
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


def nested(kind: int, *attributes: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(attributes))


def u32(kind: int, value: int) -> bytes:
    return attr(kind, U32.pack(value))


def text(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def mac(value: str) -> bytes:
    return bytes.fromhex(value.replace(":", ""))


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


class Rtnl:
    """One raw NETLINK_ROUTE socket; dumps and pipelined requests over it."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seq = 0

    @classmethod
    def here(cls) -> Rtnl:
        """A socket in the calling thread's network namespace."""
        return cls._bound(socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE))

    @classmethod
    def inside(cls, ns_fd: int) -> Rtnl:
        """A socket in the namespace behind an open descriptor (a pod's): the thread steps in
        and back, the socket stays there."""
        return cls._bound(_socket_in(ns_fd, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE))

    @classmethod
    def _bound(cls, sock: socket.socket, big_buffer: bool = False) -> Rtnl:
        try:
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            if big_buffer:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
                except OSError:  # not root: the default has to do
                    pass
            sock.bind((0, 0))
        except BaseException:
            sock.close()
            raise
        return cls(sock)

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
            else:  # the thread steps in and back
                sock = _socket_in(ns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        except OSError:
            return None
        finally:
            os.close(ns)
        try:
            return cls._bound(sock, big_buffer=True)
        except OSError:
            return None

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
        """Send every (type, flags, body) in order, SEND_COUNT per send(2) (their acks must fit
        the receive buffer); return each one's errno (0: done)."""
        codes: list[int] = []
        for at in range(0, len(messages), SEND_COUNT):
            codes += [answer.code for answer in self.transact(messages[at : at + SEND_COUNT])]
        return codes

    def transact(self, messages: list[tuple[int, int, bytes]]) -> list[Answer]:
        """Send (type, flags, body) requests in one send(2), in order (at most SEND_COUNT);
        return each one's errno (0: done) and the messages the kernel sent back for it
        (NLM_F_ECHO)."""
        first = self.seq + 1
        chunk = []
        for kind, flags, body in messages:
            self.seq += 1
            header = NLMSG.pack(
                NLMSG.size + len(body), kind, flags | NLM_F_REQUEST | NLM_F_ACK, self.seq, 0
            )
            chunk.append(header + body)
        self.sock.send(b"".join(chunk))
        answers = [Answer(0, []) for _ in messages]
        waiting = set(range(first, self.seq + 1))
        while waiting:
            data = self._recv()
            for mtype, _flags, seq, start, end in self._messages(data):
                if seq not in waiting:
                    continue
                if mtype == NLMSG_ERROR:
                    waiting.discard(seq)
                    answers[seq - first].code = -ERRNO.unpack_from(data, start)[0]
                else:
                    answers[seq - first].echoed.append(data[start - NLMSG.size : end])
        return answers

    def run(self, what: str, messages: list[tuple[int, int, bytes]]) -> list[Answer]:
        """transact(), raising the first failure as a NetlinkError that says which step."""
        answers = self.transact(messages)
        for answer in answers:
            if answer.code:
                raise NetlinkError(answer.code, f"{what}: {os.strerror(answer.code)}")
        return answers


class Answer:
    """The kernel's answer to one request: its errno and any message it echoed."""

    __slots__ = ("code", "echoed")

    def __init__(self, code: int, echoed: list[bytes]) -> None:
        self.code = code
        self.echoed = echoed


# --- the requests of a pod's ADD and DEL ------------------------------------------------------


def link_change(index: int = 0, flags: int = 0, change: int = 0, *attributes: bytes) -> bytes:
    """An ifinfomsg (index 0: the kernel finds the link by its IFLA_IFNAME) and attributes."""
    return IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags, change) + b"".join(attributes)


def address_add(index: int, ip: str, prefixlen: int, flags: int = 0) -> tuple[int, int, bytes]:
    raw = packed(ip)
    family = socket.AF_INET6 if len(raw) == 16 else socket.AF_INET
    body = IFADDRMSG.pack(family, prefixlen, flags & 0xFF, RT_SCOPE_UNIVERSE, index)
    body += attr(IFA_LOCAL, raw) + attr(IFA_ADDRESS, raw)
    if flags > 0xFF:
        body += u32(IFA_FLAGS, flags)
    return RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, body


def route_add(
    index: int,
    dst: str,
    dst_len: int,
    gateway: str | None,
    *,
    priority: int | None = None,
    table: int = RT_TABLE_MAIN,
    scope: int = RT_SCOPE_UNIVERSE,
    metrics: dict[int, int] | None = None,
) -> tuple[int, int, bytes]:
    """A unicast route through `index` (protocol static, as `ip route add` makes one)."""
    raw = packed(dst)
    family = socket.AF_INET6 if len(raw) == 16 else socket.AF_INET
    body = RTMSG.pack(
        family,
        dst_len,
        0,
        0,
        table if table < 256 else RT_TABLE_COMPAT,
        RTPROT_STATIC,
        scope,
        RTN_UNICAST,
        0,
    )
    if dst_len:
        body += attr(RTA_DST, raw)
    if gateway is not None:
        body += attr(RTA_GATEWAY, packed(gateway))
    body += u32(RTA_OIF, index) + u32(RTA_TABLE, table)
    if priority is not None:
        body += u32(RTA_PRIORITY, priority)
    if metrics:
        body += nested(RTA_METRICS, *(u32(k, v) for k, v in sorted(metrics.items())))
    return RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body
