"""The lab's Kubernetes objects (Namespaces, Pods, NetworkPolicies) in its datastore, where the
node agents read them: the sqlite file `<state>/cluster.db`, or the lab's etcd under `/pycni/`.

The etcd listens in the router's namespace, which the host cannot reach: with etcd, every call
runs on one thread that entered the router's namespace (setns is per thread), so every
connection the client opens is born there. The process itself never moves.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable, Iterator
from concurrent.futures import BrokenExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

from ..cluster.factory import open_objects
from ..cluster.objects import KVObjects, Objects
from .model import Lab, LabError

T = TypeVar("T")
CLONE_NEWNET = 0x40000000


class LabObjects:
    """KVObjects' reading and writing, run in the namespace the datastore is reachable from."""

    def __init__(self, lab: Lab) -> None:
        self._pool: ThreadPoolExecutor | None = None
        if lab.datastore == "etcd":
            self._pool = ThreadPoolExecutor(1, initializer=_enter_netns, initargs=(lab.router,))
        try:
            self._objects: KVObjects = self._call(lambda: _open(lab))
        except BrokenExecutor:
            self.close()
            raise LabError(f"cannot enter {lab.router}, where the lab's etcd listens") from None
        except BaseException:
            self.close()
            raise

    def _call(self, fn: Callable[[], T]) -> T:
        if self._pool is None:
            return fn()
        return self._pool.submit(fn).result()

    def snapshot(self) -> Objects:
        return self._call(self._objects.snapshot)

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        return self._call(lambda: self._objects.get(kind, namespace, name))

    def apply(self, obj: dict) -> str:
        return self._call(lambda: self._objects.apply(obj))

    def delete(self, kind: str, namespace: str, name: str) -> bool:
        return self._call(lambda: self._objects.delete(kind, namespace, name))

    def close(self) -> None:
        objects = getattr(self, "_objects", None)
        if objects is not None:
            self._call(objects.close)
        if self._pool is not None:
            self._pool.shutdown()


def _open(lab: Lab) -> KVObjects:
    if lab.datastore == "etcd":
        source = open_objects("etcd", etcd_endpoints=lab.etcd_url)
    else:
        source = open_objects("sqlite", path=lab.cluster_db)
    assert isinstance(source, KVObjects)
    return source


@contextmanager
def lab_objects(lab: Lab) -> Iterator[LabObjects]:
    store = LabObjects(lab)
    try:
        yield store
    finally:
        store.close()


def _enter_netns(name: str) -> None:
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _libc().setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


@functools.cache
def _libc():
    return ctypes.CDLL(None, use_errno=True)
