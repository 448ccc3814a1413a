"""The conntrack table over ctnetlink (dataplane/conntrack.py), from messages built as the kernel
builds them, and the policy controller's cut of the connections a new policy denies
(agent/policy.py's cut_denied_connections) over a fake table."""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from policy_world import World, policy
from pycni.agent.policy import cut_denied_connections
from pycni.dataplane import conntrack as ct
from pycni.dataplane.conntrack import Conntrack, Entry, Tuple, parse_entry


def attr(kind: int, payload: bytes, nested: bool = False) -> bytes:
    length = 4 + len(payload)
    flag = ct.NLA_F_NESTED if nested else 0
    return struct.pack("=HH", length, kind | flag) + payload + b"\0" * (-length % 4)


def tuple_attrs(family: int, t: Tuple) -> bytes:
    v4 = family == socket.AF_INET
    ip = attr(ct.CTA_IP_V4_SRC if v4 else ct.CTA_IP_V6_SRC, socket.inet_pton(family, t.src))
    ip += attr(ct.CTA_IP_V4_DST if v4 else ct.CTA_IP_V6_DST, socket.inet_pton(family, t.dst))
    proto = attr(ct.CTA_PROTO_NUM, bytes([t.proto]))
    proto += attr(ct.CTA_PROTO_SRC_PORT, struct.pack("!H", t.sport))
    proto += attr(ct.CTA_PROTO_DST_PORT, struct.pack("!H", t.dport))
    return attr(ct.CTA_TUPLE_IP, ip, True) + attr(ct.CTA_TUPLE_PROTO, proto, True)


def message(family: int, orig: Tuple, reply: Tuple, seq: int = 1, ident: int = 7) -> bytes:
    """An IPCTNL_MSG_CT_NEW message as a dump sends it, with attributes before, between and
    after the tuples that the parser must step over."""
    body = struct.pack("=BBH", family, 0, 0)
    body += attr(ct.CTA_TUPLE_ORIG, tuple_attrs(family, orig), True)
    body += attr(ct.CTA_TUPLE_REPLY, tuple_attrs(family, reply), True)
    body += attr(3, struct.pack("!I", 0x18E))  # CTA_STATUS
    body += attr(ct.CTA_ID, struct.pack("!I", ident))
    body += attr(7, struct.pack("!I", 120))  # CTA_TIMEOUT
    kind = (ct.NFNL_SUBSYS_CTNETLINK << 8) | 0  # IPCTNL_MSG_CT_NEW
    return struct.pack("=LHHLL", 16 + len(body), kind, 2, seq, 0) + body


def control(kind: int, seq: int, code: int = 0) -> bytes:
    body = struct.pack("=i", -code) + b"\0" * 16 if kind == ct.NLMSG_ERROR else b"\0\0\0\0"
    return struct.pack("=LHHLL", 16 + len(body), kind, 0, seq, 0) + body


TCP4 = (
    Tuple("10.0.1.2", "10.0.0.1", socket.IPPROTO_TCP, 40000, 80),
    Tuple("10.0.0.1", "10.0.1.2", socket.IPPROTO_TCP, 80, 40000),
)
UDP6 = (
    Tuple("fd00::1:2", "fd00::1", socket.IPPROTO_UDP, 5353, 81),
    Tuple("fd00::1", "fd00::1:2", socket.IPPROTO_UDP, 81, 5353),
)


def test_an_entry_is_read_as_the_kernel_sends_it():
    for family, (orig, reply) in ((socket.AF_INET, TCP4), (socket.AF_INET6, UDP6)):
        data = message(family, orig, reply)
        entry = parse_entry(data, 16, len(data))
        assert entry is not None
        assert (entry.family, entry.orig, entry.reply) == (family, orig, reply)
        assert entry.key == tuple_attrs(family, orig)  # sent back as is to delete it
        assert entry.id == attr(ct.CTA_ID, struct.pack("!I", 7)) and entry.zone == b""


def test_other_layouts_are_read_the_general_way():
    """The one-unpack path reads only the usual layout (with NLA_F_NESTED or, as older
    kernels send it, without); a tuple zone or ICMP's ids instead of ports are read attribute
    by attribute, to the same result."""
    orig, reply = TCP4
    family = socket.AF_INET
    zoned = tuple_attrs(family, orig) + attr(3, struct.pack("!H", 5))  # CTA_TUPLE_ZONE
    flat = tuple_attrs(family, orig).replace(b"\x01\x80", b"\x01\x00", 1)
    flat = flat.replace(b"\x02\x80", b"\x02\x00", 1)
    icmp = attr(
        ct.CTA_TUPLE_IP,
        attr(ct.CTA_IP_V4_SRC, socket.inet_aton("10.0.1.2"))
        + attr(ct.CTA_IP_V4_DST, socket.inet_aton("10.0.0.1")),
        True,
    ) + attr(
        ct.CTA_TUPLE_PROTO,
        attr(ct.CTA_PROTO_NUM, bytes([1])) + attr(4, struct.pack("!H", 9)) + attr(5, b"\x08"),
        True,
    )
    for payload, want in (
        (zoned, orig),
        (flat, orig),
        (icmp, Tuple("10.0.1.2", "10.0.0.1", 1)),
    ):
        body = struct.pack("=BBH", family, 0, 0) + attr(ct.CTA_TUPLE_ORIG, payload, True)
        body += attr(ct.CTA_TUPLE_REPLY, tuple_attrs(family, reply), True)
        entry = parse_entry(body, 0, len(body))
        assert entry is not None and entry.orig == want and entry.reply == reply
        assert entry.key == payload


def test_other_families_are_left_out():
    data = bytearray(message(socket.AF_INET, *TCP4))
    data[16] = 7  # AF_BRIDGE
    assert parse_entry(bytes(data), 16, len(data)) is None


class FakeSocket:
    def __init__(self, replies: list[bytes]) -> None:
        self.replies, self.sent = replies, []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        return len(data)

    def recv(self, size: int) -> bytes:
        return self.replies.pop(0)

    def close(self) -> None:
        pass


def fake(replies: list[bytes]) -> Conntrack:
    table = Conntrack.__new__(Conntrack)
    table.sock, table.seq = FakeSocket(replies), 0  # type: ignore[assignment]
    return table


def test_a_dump_spans_several_reads_and_ends_at_done():
    one = message(socket.AF_INET, *TCP4, seq=1, ident=1)
    two = message(socket.AF_INET6, *UDP6, seq=1, ident=2)
    table = fake([one + two, one, control(ct.NLMSG_DONE, 1)])
    entries = table.entries()
    assert [e.orig for e in entries] == [TCP4[0], UDP6[0], TCP4[0]]
    request = table.sock.sent[0]
    assert struct.unpack_from("=HH", request, 4) == (
        (ct.NFNL_SUBSYS_CTNETLINK << 8) | ct.IPCTNL_MSG_CT_GET,
        ct.NLM_F_REQUEST | ct.NLM_F_DUMP,
    )
    with pytest.raises(OSError) as failed:
        fake([control(ct.NLMSG_ERROR, 1, errno.EPERM)]).entries()
    assert failed.value.errno == errno.EPERM


def test_delete_sends_the_original_tuple_zone_and_id_back():
    data = message(socket.AF_INET, *TCP4)
    entry = parse_entry(data, 16, len(data))
    assert entry is not None
    table = fake([control(ct.NLMSG_ERROR, 1), control(ct.NLMSG_ERROR, 2, errno.ENOENT)])
    assert table.delete(entry) is True
    assert table.delete(entry) is False  # gone meanwhile
    request = table.sock.sent[0]
    assert struct.unpack_from("=HH", request, 4) == (
        (ct.NFNL_SUBSYS_CTNETLINK << 8) | ct.IPCTNL_MSG_CT_DELETE,
        ct.NLM_F_REQUEST | ct.NLM_F_ACK,
    )
    assert request[16] == socket.AF_INET
    assert request[20:] == attr(ct.CTA_TUPLE_ORIG, entry.key, True) + entry.id
    with pytest.raises(OSError):
        fake([control(ct.NLMSG_ERROR, 1, errno.EPERM)]).delete(entry)


class FakeTable:
    def __init__(self, entries: list[Entry]) -> None:
        self.table, self.deleted = entries, []

    def __enter__(self) -> FakeTable:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def entries(self) -> list[Entry]:
        return list(self.table)

    def delete(self, entry: Entry) -> bool:
        self.deleted.append(entry)
        return True


def entry(src: str, dst: str, port: int, sport: int = 40000, real_dst: str = "") -> Entry:
    """A TCP connection src -> dst:port; ``real_dst``: where a DNAT sent it."""
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    answer = real_dst or dst
    return Entry(
        family,
        Tuple(src, dst, socket.IPPROTO_TCP, sport, port),
        Tuple(answer, src, socket.IPPROTO_TCP, port, sport),
    )


def test_the_cut_deletes_what_the_policies_deny_and_nothing_else(monkeypatch):
    # x/a (10.0.0.1, node1) takes TCP 80 from namespace y only.
    world = World(
        [
            policy(
                "from-y",
                "x",
                {
                    "podSelector": {"matchLabels": {"pod": "a"}},
                    "ingress": [
                        {
                            "from": [{"namespaceSelector": {"matchLabels": {"ns": "y"}}}],
                            "ports": [{"port": 80}],
                        }
                    ],
                },
            )
        ]
    )
    denied = [
        entry("10.0.2.1", "10.0.0.1", 80),  # z/a -> x/a
        entry("10.0.2.1", "10.0.0.1", 80, sport=40001),  # another of the same
        entry("10.0.1.1", "10.0.0.1", 81),  # y/a -> x/a, port 81
        entry("10.0.2.2", "10.96.0.10", 80, real_dst="10.0.0.1"),  # z/b -> a Service -> x/a
    ]
    kept = [
        entry("10.0.1.1", "10.0.0.1", 80),  # y/a -> x/a:80
        entry("10.0.0.1", "10.0.2.1", 81),  # x/a's own (egress is not isolated)
        entry("10.0.2.1", "10.0.1.2", 80),  # z/a -> y/b: no isolated pod of this node
    ]
    table = FakeTable(denied + kept)
    judged = []
    from pycni.policy import Interpreter

    real = Interpreter.allowed

    def counting(self, *args, **kw):
        judged.append(args)
        return real(self, *args, **kw)

    monkeypatch.setattr(Interpreter, "allowed", counting)
    assert cut_denied_connections(world.compiled["node1"], table) == len(denied)
    assert table.deleted == denied
    # One verdict per kind of connection (z/a -> x/a:80 twice), none where no isolated pod of
    # this node takes part (z/a -> y/b).
    assert len(judged) == len(denied) + len(kept) - 2
