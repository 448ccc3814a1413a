"""STATUS: can an ADD succeed right now? The store must open and take a write (its filesystem
neither read-only nor full), and every range set have room."""

from __future__ import annotations

from ..cni.env import Request
from ..cni.errors import NOT_AVAILABLE, CniError
from ..cni.netconf import NetConf
from ..ipam.store import Store


def cmd_status(request: Request, conf: NetConf) -> None:
    try:
        store = Store(conf.data_dir)
    except CniError as exc:
        raise CniError(NOT_AVAILABLE, f"not ready: {exc.msg}", exc.details) from None
    try:
        try:
            store.check_writable()
        except CniError as exc:
            raise CniError(NOT_AVAILABLE, f"not ready: {exc.msg}", exc.details) from None
        for rs in conf.range_sets:
            used = store.used_count(conf.name, rs.key)
            if used >= rs.capacity():
                raise CniError(
                    NOT_AVAILABLE,
                    f"not ready: address pool {rs.key} of network {conf.name} is exhausted "
                    f"({used} of {rs.capacity()} in use)",
                )
    finally:
        store.close()
