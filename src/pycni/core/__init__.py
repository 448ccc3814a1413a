"""One implementation of ADD / DEL / CHECK / GC / STATUS, whatever runs it (plugin or agent)."""

from __future__ import annotations

from ..cni.env import Request
from ..cni.netconf import NetConf


def run(request: Request, conf: NetConf) -> dict | None:
    """Carry out one CNI command; return the JSON to print, or None for nothing."""
    if request.command == "ADD":
        from .add import cmd_add

        return cmd_add(request, conf)
    if request.command == "DEL":
        from .delete import cmd_del

        cmd_del(request, conf)
        return None
    if request.command == "CHECK":
        from .check import cmd_check

        cmd_check(request, conf)
        return None
    if request.command == "GC":
        from .gc import cmd_gc

        cmd_gc(request, conf)
        return None
    if request.command == "STATUS":
        from .status import cmd_status

        cmd_status(request, conf)
        return None
    raise ValueError(f"not a core command: {request.command}")
