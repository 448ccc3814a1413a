"""Whether the kernel may have changed pycni's entries since a pass found them as planned.

A no-op pass with 5,000 peers spends most of its time reading 15,000 routes, neighbours and FDB
entries back only to find them unchanged. The kernel announces every change of routes,
neighbours, FDB entries, links and addresses to subscribers: a socket subscribed to them and
drained at the start of a pass says whether anything that could touch pycni's entries happened
since the last pass that read the kernel and found it equal to the plan. Only then, and with
the same plan, may a pass skip reading the kernel.

Conservative on purpose: any route change in the main table (whoever made it), any neighbour or
FDB change on the VTEP, any link or address change on the underlay or the VTEP (a link going
down drops its IPv4 routes without a route notification), a lost notification (the socket's
buffer overran) or a verification older than VERIFY_EVERY makes the next pass read everything.
"""

from __future__ import annotations

import errno
import socket
import struct
import time

from ..dataplane.rtnl import NETLINK_ROUTE, NLMSG, RCVBUF, RTMSG, SO_RCVBUFFORCE

RTMGRP_LINK, RTMGRP_NEIGH = 0x1, 0x4
RTMGRP_IPV4_IFADDR, RTMGRP_IPV4_ROUTE = 0x10, 0x40
RTMGRP_IPV6_IFADDR, RTMGRP_IPV6_ROUTE = 0x100, 0x400
GROUPS = (
    RTMGRP_LINK
    | RTMGRP_NEIGH
    | RTMGRP_IPV4_IFADDR
    | RTMGRP_IPV4_ROUTE
    | RTMGRP_IPV6_IFADDR
    | RTMGRP_IPV6_ROUTE
)
RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWADDR, RTM_DELADDR = 20, 21
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTM_NEWNEIGH, RTM_DELNEIGH = 28, 29
RTA_TABLE = 15
MAIN_TABLE = 254
IFINDEX = struct.Struct("=xxxxi")  # ifinfomsg: family, pad, type; index
ADDR_INDEX = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
NEIGH_INDEX = struct.Struct("=Bxxxi")  # ndmsg: family, pad; ifindex
RTATTR = struct.Struct("=HH")
VERIFY_EVERY = 60.0  # seconds: read the kernel at least this often whatever it announced


class KernelWatch:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._verified: object = None  # the plan the kernel last matched
        self._at = 0.0
        self._dirty = True

    @classmethod
    def open(cls) -> KernelWatch | None:
        """Subscribed in this thread's network namespace, or None if that fails."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        except OSError:
            return None
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            except OSError:
                pass  # not root: an overrun only costs a full pass
            sock.bind((0, GROUPS))
            sock.setblocking(False)
        except OSError:
            sock.close()
            return None
        return cls(sock)

    def close(self) -> None:
        self.sock.close()

    def unchanged(self, plan: object, devices: set[int]) -> bool:
        """Drain what the kernel announced; True when nothing could have touched pycni's
        entries (on `devices`, the underlay and the VTEP) since verified(`plan`) was said."""
        self._drain(devices)
        fresh = time.monotonic() - self._at < VERIFY_EVERY
        return not self._dirty and fresh and self._verified is plan

    def verified(self, plan: object | None) -> None:
        """The pass that drained last read the kernel and found it holding `plan` (None: it
        did not, or changed it)."""
        self._verified, self._dirty = plan, plan is None
        self._at = time.monotonic()

    def _drain(self, devices: set[int]) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # announcements were lost
                    self._dirty = True
                    continue
                raise
            if not data:
                return
            if not self._dirty and self._relevant(data, devices):
                self._dirty = True

    @staticmethod
    def _relevant(data: bytes, devices: set[int]) -> bool:
        offset = 0
        while offset + NLMSG.size <= len(data):
            length, kind, _flags, _seq, _pid = NLMSG.unpack_from(data, offset)
            if length < NLMSG.size:
                return True  # unreadable: assume the worst
            body = offset + NLMSG.size
            if kind in (RTM_NEWROUTE, RTM_DELROUTE):
                if _route_table(data, body, offset + length) == MAIN_TABLE:
                    return True
            elif kind in (RTM_NEWNEIGH, RTM_DELNEIGH):
                if NEIGH_INDEX.unpack_from(data, body)[1] in devices:
                    return True
            elif kind in (RTM_NEWLINK, RTM_DELLINK):
                if IFINDEX.unpack_from(data, body)[0] in devices:
                    return True
            elif kind in (RTM_NEWADDR, RTM_DELADDR):
                if ADDR_INDEX.unpack_from(data, body)[4] in devices:
                    return True
            offset += (length + 3) & ~3
        return False


def _route_table(data: bytes, start: int, end: int) -> int:
    table = RTMSG.unpack_from(data, start)[4]
    offset = start + RTMSG.size
    while offset + 4 <= end:
        length, kind = RTATTR.unpack_from(data, offset)
        if length < 4:
            break
        if kind == RTA_TABLE and length >= 8:
            return struct.unpack_from("=I", data, offset + 4)[0]
        offset += (length + 3) & ~3
    return table
