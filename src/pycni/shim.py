"""The executable runtimes exec: hand the CNI call to the node agent, or run it here.

Every import here is pod start-up latency, so this module uses only builtin modules (_socket,
os, sys) and forwards raw bytes. When no agent listens, the same core runs in this process,
so a node set up by hand works without a daemon.

Wire format (one request per connection):
  request  b"PYCNI/1 CNI <env bytes> <stdin bytes>\\n" + env + stdin
           env is b"KEY=VALUE" entries joined by NUL: the CNI_* variables, DEBUG, PYCNI_*
  reply    b"<exit status>\\n" + what the plugin prints on stdout
"""

import _socket
import os
import sys

from .cni import MAX_CONFIG_BYTES

DEFAULT_SOCKET = "/run/pycni/agent.sock"
CONFIG_KEY = b'"agentSocket"'
MAGIC = b"PYCNI/1"
FORWARDED = (b"CNI_", b"DEBUG", b"PYCNI_")
# Longer than any sane ADD; shorter than kubelet's 2-minute runtime request timeout.
TIMEOUT = 110.0
# A live agent accepts at once: a connect that waits this long has found an agent whose listen
# backlog is full, hung or swamped. Answered with "try again" (never the in-process fallback:
# the hung agent may still hold that container's call and resume it).
CONNECT_TIMEOUT = 5.0


def main() -> None:
    stdin = b"" if sys.stdin.isatty() else sys.stdin.buffer.read(MAX_CONFIG_BYTES + 1)
    path = socket_path(stdin)
    reply = call_agent(path, stdin) if path else None
    if reply is None:
        from .plugin import run

        run(stdin)  # no agent: do the work in this process
        return
    status, out = reply
    if out:
        os.write(1, out)
    sys.exit(status)


def socket_path(stdin: bytes) -> str:
    """The agent socket: the config's `agentSocket` if given ("" = never use an agent)."""
    if CONFIG_KEY not in stdin:
        return DEFAULT_SOCKET
    conf = decode_object(stdin)
    value = conf.get("agentSocket") if conf is not None else None
    if value == "":
        return ""
    # A broken config goes to the default agent, which reports it properly. Never a relative
    # path (whatever socket is in the runtime's cwd) nor a NUL one (Linux's abstract
    # namespace, where any user may listen).
    ok = isinstance(value, str) and value.startswith("/") and "\0" not in value
    return value if ok else DEFAULT_SOCKET


class _ScanContext:
    """What the C JSON scanner reads from json.JSONDecoder, without importing the json
    package: it drags in re and enum, about 6 ms of every pod's start-up."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float
    memo: dict = {}


def decode_object(data: bytes):
    """The JSON object in `data`, or None if it is not one."""
    import _json

    try:
        text = data.decode()
        start = len(text) - len(text.lstrip())
        obj, end = _json.make_scanner(_ScanContext())(text, start)
    except Exception:
        # Malformed JSON: the C scanner raises ValueError, StopIteration, or SystemError when
        # json.decoder (for its error class) was never imported. The core reports it properly.
        return None
    if text[end:].strip() or not isinstance(obj, dict):
        return None
    return obj


def call_agent(path: str, stdin: bytes):
    """(exit status, stdout bytes) from the agent, or None when no agent is listening."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        # A blocking connect() to a unix socket waits for room in the listener's backlog for
        # as long as SO_SNDTIMEO says (for ever by default), then fails with EAGAIN.
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, _timeval(CONNECT_TIMEOUT))
        try:
            sock.connect(path)
        except BlockingIOError:
            return 1, try_again(stdin, hung_message(path))
        except (OSError, ValueError):
            # No socket, or a stale one: nobody would answer. ValueError: a path no socket can
            # have (NUL, undecodable); the core run here reports the config's agentSocket.
            return None
        if peer_uid(sock) not in (0, os.geteuid()):
            return None  # not an agent of ours (a squatted path): do the work here
        env = b"\0".join(k + b"=" + v for k, v in os.environb.items() if k.startswith(FORWARDED))
        sock.settimeout(TIMEOUT)
        chunks = []
        try:
            try:
                sock.sendall(b"%s CNI %d %d\n%s%s" % (MAGIC, len(env), len(stdin), env, stdin))
            except (BrokenPipeError, ConnectionResetError):
                pass  # it answered without reading everything (a refusal): read that answer
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except ConnectionResetError as exc:
            # An agent that closes with part of the request unread (refusing a caller, or a
            # malformed request) makes the kernel report a reset, but only after everything
            # it sent has been read: what came is its whole answer.
            if not chunks:
                return 1, try_again(stdin, f"lost the pycni agent at {path}: {exc}")
        except OSError as exc:
            return 1, try_again(stdin, f"lost the pycni agent at {path}: {exc}")
        head, sep, out = b"".join(chunks).partition(b"\n")
        if not sep or not head.isdigit():
            return 1, try_again(stdin, f"the pycni agent at {path} went away before answering")
        return int(head), out
    finally:
        sock.close()


def hung_message(path: str) -> str:
    return (
        f"the pycni agent at {path} accepted no connection within {CONNECT_TIMEOUT:g} s "
        "(hung, or swamped)"
    )


def _timeval(seconds: float) -> bytes:
    """struct timeval (time_t and suseconds_t are C longs on Linux)."""
    import _struct

    whole = int(seconds)
    return _struct.pack("ll", whole, int((seconds - whole) * 1e6))


def peer_uid(sock) -> int:
    """The uid of the process at the other end (struct ucred: pid, uid, gid as C ints)."""
    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    return int.from_bytes(creds[4:8], sys.byteorder)


def try_again(stdin: bytes, msg: str) -> bytes:
    """CNI error 11: the runtime retries, and its retry finds the agent back or runs here."""
    import json

    from .cni import versions

    conf = decode_object(stdin) or {}
    version = conf.get("cniVersion")
    if version not in versions.SUPPORTED:
        version = versions.LATEST
    err = {"cniVersion": version, "code": 11, "msg": msg + "; try again"}
    return json.dumps(err).encode() + b"\n"
