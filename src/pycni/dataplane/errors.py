"""Netlink failures translated into what the core cares about."""

from __future__ import annotations

import errno
from contextlib import contextmanager

from pyroute2.netlink.exceptions import NetlinkError

from ..cni.errors import DATAPLANE_FAILURE, CniError


class NotFound(Exception):
    """The thing is already gone: DEL and GC treat this as success."""


def is_missing(exc: object) -> bool:
    code = getattr(exc, "code", None) or getattr(exc, "errno", None)
    return code in (errno.ENODEV, errno.ENOENT, errno.ESRCH, errno.EADDRNOTAVAIL)


def is_exists(exc: object) -> bool:
    code = getattr(exc, "code", None) or getattr(exc, "errno", None)
    return code == errno.EEXIST


def dataplane_error(step: str, exc: BaseException) -> CniError:
    code = getattr(exc, "code", None) or getattr(exc, "errno", None)
    reason = errno.errorcode.get(code, "") if isinstance(code, int) else ""
    text = f"{exc}" if not reason else f"{reason}: {exc}"
    return CniError(DATAPLANE_FAILURE, f"{step} failed: {text}")


@contextmanager
def tolerating_exists(step: str):
    """Run a netlink "add" that may race with another ADD (or a rerun): EEXIST is success,
    anything else is a dataplane failure named after the step."""
    try:
        yield
    except NetlinkError as exc:
        if not is_exists(exc):
            raise dataplane_error(step, exc) from None
