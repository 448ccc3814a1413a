"""The agent's wire format, server side (the client side is pycni.shim, kept import-free)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..cni import MAX_CONFIG_BYTES
from ..shim import MAGIC

MAX_ENV_BYTES = 1 << 20
MAX_HEADER = 128


class ProtocolError(Exception):
    pass


@dataclass
class Call:
    op: str  # "CNI" or "HEALTH"
    environ: dict[str, str]
    stdin: bytes


def read_exactly(conn, n: int, deadline: float | None = None) -> bytes:
    chunks, left = [], n
    while left:
        chunk = _recv(conn, min(left, 1 << 16), deadline)
        if not chunk:
            raise ProtocolError(f"connection closed with {left} of {n} bytes unread")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(conn, size: int, deadline: float | None) -> bytes:
    """conn.recv, but never past `deadline` (time.monotonic()): a caller trickling a byte
    now and then must not hold a worker for longer than one whole request may take."""
    if deadline is not None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ProtocolError("request not complete in time")
        conn.settimeout(left)
    try:
        return conn.recv(size)
    except TimeoutError:
        raise ProtocolError("request not complete in time") from None


def read_call(conn, deadline: float | None = None) -> Call:
    header = b""
    while not header.endswith(b"\n"):
        chunk = _recv(conn, 1, deadline)
        if not chunk:
            raise ProtocolError("connection closed before a complete header")
        header += chunk
        if len(header) > MAX_HEADER:
            raise ProtocolError("header too long")
    parts = header.split()
    if len(parts) != 4 or parts[0] != MAGIC or not parts[2].isdigit() or not parts[3].isdigit():
        raise ProtocolError(f"malformed header {header[:60]!r}")
    op, env_len, stdin_len = parts[1].decode("ascii", "replace"), int(parts[2]), int(parts[3])
    if op not in ("CNI", "HEALTH"):
        raise ProtocolError(f"unknown operation {op!r}")
    if env_len > MAX_ENV_BYTES or stdin_len > MAX_CONFIG_BYTES + 1:
        raise ProtocolError("request too large")
    env = read_exactly(conn, env_len, deadline)
    stdin = read_exactly(conn, stdin_len, deadline)
    environ = {}
    for entry in env.split(b"\0") if env else ():
        key, sep, value = entry.partition(b"=")
        if not sep:
            raise ProtocolError(f"malformed environment entry {entry[:60]!r}")
        environ[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    return Call(op, environ, stdin)


def reply(status: int, body: bytes) -> bytes:
    return b"%d\n%s" % (status, body)
