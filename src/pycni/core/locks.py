"""GC must never run beside ADD or DEL: they share a lock file, GC takes it exclusively."""

from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager

from ..cni.errors import IO_FAILURE, CniError


@contextmanager
def node_lock(data_dir: str, exclusive: bool):
    path = os.path.join(data_dir, "gc.lock")
    try:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            if exc.errno != errno.EROFS:
                raise
            # flock needs no write access: DEL still removes a pod's interfaces on a read-only
            # data dir, and ADD and GC go on to report the store's own error.
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CniError(IO_FAILURE, f"cannot open lock file {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock
