"""Entering a pod's network namespace.

setns(2) is per thread, so pycni never switches its own namespace: pyroute2 opens the netlink
socket inside the target namespace (in a short-lived child) and hands it back; all pod-side work
goes through that socket while this process stays in the node's namespace.
"""

from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager

from pyroute2 import IPRoute

from ..cni.errors import INVALID_ENVIRONMENT, UNKNOWN_CONTAINER, CniError


@contextmanager
def pod_netlink(path: str):
    try:
        # flags=0: never create a namespace that is not there (pyroute2 defaults to O_CREAT).
        ipr = IPRoute(netns=path, flags=0)
    except FileNotFoundError:
        raise CniError(UNKNOWN_CONTAINER, f"network namespace {path} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise CniError(
                INVALID_ENVIRONMENT, f"CNI_NETNS {path} is not a network namespace"
            ) from None
        raise CniError(UNKNOWN_CONTAINER, f"cannot enter network namespace {path}: {exc}") from None
    try:
        yield ipr
    finally:
        ipr.close()


@contextmanager
def netns_fd(path: str):
    """An open descriptor of the namespace, for creating the veth peer directly inside it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CniError(UNKNOWN_CONTAINER, f"network namespace {path} does not exist") from None
    except OSError as exc:
        raise CniError(UNKNOWN_CONTAINER, f"cannot open network namespace {path}: {exc}") from None
    try:
        _require_netns(fd, path)
        yield fd
    finally:
        os.close(fd)


NS_GET_NSTYPE = 0xB703  # ioctl on an nsfs file: the CLONE_NEW* type of the namespace
CLONE_NEWNET = 0x40000000


def _require_netns(fd: int, path: str) -> None:
    """Refuse a CNI_NETNS that is not a network namespace (a regular file, a mount namespace)
    before anything is allocated or created, instead of failing later in veth creation."""
    try:
        kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
    except OSError:
        kind = None
    if kind != CLONE_NEWNET:
        raise CniError(INVALID_ENVIRONMENT, f"CNI_NETNS {path} is not a network namespace")
