"""Where the core gets its IPAM store and node netlink handles.

The one-shot plugin opens them per call and closes them. The agent keeps one of each per worker
thread (SQLite connections and pyroute2 handles belong to their thread), which saves opening
the database, checkpointing its WAL on close, and building a netlink socket and event loop on
every pod. Two netlink handles: pyroute2's for the bridge, shaping and reading, and a lean
socket (dataplane.rtnl) for the requests every pod makes.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager

from pyroute2 import IPRoute

from ..dataplane.bridge import ensure_bridge
from ..dataplane.rtnl import Rtnl
from ..ipam.store import Store

_warm = False
_local = threading.local()
_guard = threading.Lock()
_writer_locks: dict[str, threading.Lock] = {}  # one per data dir, shared by the threads


def keep_warm() -> None:
    """Called once by the agent at start-up."""
    global _warm
    _warm = True


@contextmanager
def store(data_dir: str):
    if not _warm:
        s = Store(data_dir)
        try:
            yield s
        finally:
            s.close()
        return
    cache: dict = _local.__dict__.setdefault("stores", {})
    entry = cache.get(data_dir)
    if entry is not None and not _same_file(entry):
        # The database was removed or replaced under us: never keep writing to a ghost.
        entry[0].close()
        entry = None
    if entry is None:
        with _guard:
            lock = _writer_locks.setdefault(data_dir, threading.Lock())
        s = Store(data_dir, writer_lock=lock)
        entry = cache[data_dir] = (s, _inode(s.path))
    yield entry[0]


def host_netlink():
    """pyroute2's handle in the node's namespace."""
    return _thread_handle("ipr", IPRoute)


def host_rtnl():
    """The lean rtnetlink socket in the node's namespace."""
    return _thread_handle("rtnl", Rtnl.here)


@contextmanager
def _thread_handle(attr: str, make: Callable):
    """A fresh handle for the one-shot plugin; in the agent, this thread's own, kept."""
    if not _warm:
        with make() as handle:
            yield handle
        return
    handle = getattr(_local, attr, None)
    if handle is None:
        handle = make()
        setattr(_local, attr, handle)
    try:
        yield handle
    except OSError:
        # A broken socket (or one left with unread answers) must not poison the next call
        # on this thread.
        setattr(_local, attr, None)
        handle.close()
        raise


# How long an agent thread trusts a bridge it has checked. Within it, ADD skips two netlink
# round trips; a bridge deleted meanwhile makes the veth creation fail, and ADD then checks
# again (see core.add), so staleness costs at most one retry.
BRIDGE_TTL = 5.0


def bridge(
    ipr,
    name: str,
    gateways: list,
    mtu: int | None,
    fresh: bool = False,
    on_made: Callable[[dict], None] | None = None,
):
    """The bridge's link message, made and addressed as needed (dataplane.bridge). `on_made`
    is called with it when it was down, i.e. made just now (or set down by someone)."""
    if not _warm or fresh:
        link = ensure_bridge(ipr, name, gateways, mtu)
        if on_made is not None and not link["flags"] & 1:  # IFF_UP: ensure_bridge set it up
            on_made(link)
        if _warm:
            _bridges()[name] = (link, frozenset(map(str, gateways)), time.monotonic())
        return link
    cached = _bridges().get(name)
    if (
        cached is not None
        and cached[1] >= frozenset(map(str, gateways))
        and time.monotonic() - cached[2] < BRIDGE_TTL
    ):
        return cached[0]
    return bridge(ipr, name, gateways, mtu, fresh=True, on_made=on_made)


def forget_bridge(name: str) -> bool:
    """Drop a cached bridge; True if there was one (the caller may then retry)."""
    return _warm and _bridges().pop(name, None) is not None


def _bridges() -> dict:
    return _local.__dict__.setdefault("bridges", {})


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _same_file(entry) -> bool:
    s, inode = entry
    return inode is not None and _inode(s.path) == inode
