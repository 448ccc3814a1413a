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
    import json  # only configs that name a socket pay for the decoder

    try:
        value = json.loads(stdin).get("agentSocket")
    except (ValueError, AttributeError):
        return DEFAULT_SOCKET  # the in-process run reports the bad config properly
    return value if isinstance(value, str) else DEFAULT_SOCKET


def call_agent(path: str, stdin: bytes):
    """(exit status, stdout bytes) from the agent, or None when no agent is listening."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            sock.connect(path)
        except OSError:
            return None  # no socket, or a stale one: nobody would answer
        env = b"\0".join(
            k + b"=" + v for k, v in os.environb.items() if k.startswith(FORWARDED)
        )
        sock.settimeout(TIMEOUT)
        try:
            sock.sendall(b"%s CNI %d %d\n%s%s" % (MAGIC, len(env), len(stdin), env, stdin))
            chunks = []
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
        except OSError as exc:
            return 1, try_again(stdin, f"lost the pycni agent at {path}: {exc}")
        head, sep, out = b"".join(chunks).partition(b"\n")
        if not sep or not head.isdigit():
            return 1, try_again(stdin, f"the pycni agent at {path} went away before answering")
        return int(head), out
    finally:
        sock.close()


def try_again(stdin: bytes, msg: str) -> bytes:
    """CNI error 11: the runtime retries, and its retry finds the agent back or runs here."""
    import json

    from .cni import versions

    version = versions.LATEST
    try:
        asked = json.loads(stdin).get("cniVersion")
        if asked in versions.SUPPORTED:
            version = asked
    except (ValueError, AttributeError):
        pass
    err = {"cniVersion": version, "code": 11, "msg": msg + "; try again"}
    return json.dumps(err).encode() + b"\n"
