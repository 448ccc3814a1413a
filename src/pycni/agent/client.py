"""Asking a running agent how it is, over its unix socket (status, doctor, the lab and the
benchmarks ask; the plugin's own calls go through shim.py)."""

from __future__ import annotations

import json
import socket

HEALTH_TIMEOUT = 2.0
HEALTH_REQUEST = b"PYCNI/1 HEALTH 0 0\n"


def agent_health(path: str, timeout: float = HEALTH_TIMEOUT) -> dict:
    """{"running": bool, "health": dict | None, "error": str | None} for the agent at `path`."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except OSError as exc:
            return {"running": False, "health": None, "error": f"not running ({exc.strerror})"}
        try:
            sock.sendall(HEALTH_REQUEST)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError as exc:
            return {"running": False, "health": None, "error": f"no answer: {exc}"}
    finally:
        sock.close()
    head, _, body = b"".join(chunks).partition(b"\n")
    try:
        health = json.loads(body)
    except ValueError:
        health = None
    if head != b"0" or not isinstance(health, dict):
        return {
            "running": True,
            "health": health if isinstance(health, dict) else None,
            "error": f"unexpected reply: {b''.join(chunks)[:200]!r}",
        }
    return {"running": True, "health": health, "error": None}
