"""GC must never run beside ADD or DEL: they share a lock file, GC takes it exclusively."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager

from ..cni.errors import IO_FAILURE, CniError


@contextmanager
def node_lock(data_dir: str, exclusive: bool):
    path = os.path.join(data_dir, "gc.lock")
    try:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise CniError(IO_FAILURE, f"cannot open lock file {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock
