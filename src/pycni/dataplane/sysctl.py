"""Sysctls of the node's namespace (the one pycni runs in): forwarding, DAD, route_localnet."""

from __future__ import annotations


def _write(path: str, value: str) -> None:
    with open(path) as f:
        if f.read().strip() == value:
            return
    with open(path, "w") as f:
        f.write(value)


def enable_forwarding(families: set[int]) -> None:
    if 4 in families:
        _write("/proc/sys/net/ipv4/ip_forward", "1")
    if 6 in families:
        _write("/proc/sys/net/ipv6/conf/all/forwarding", "1")


def disable_dad(ifname: str) -> None:
    """No duplicate address detection on ``ifname`` (before it goes up); a no-op without IPv6."""
    try:
        _write(f"/proc/sys/net/ipv6/conf/{ifname}/accept_dad", "0")
    except FileNotFoundError:
        pass


def set_route_localnet(bridge: str, on: bool) -> None:
    """Let packets from or to 127.0.0.0/8 be routed via ``bridge`` (a hostPort reached from
    the node at 127.0.0.1 is DNATed to a pod, keeping that source until masquerade); a no-op
    when the bridge does not exist (yet, or any more)."""
    try:
        _write(f"/proc/sys/net/ipv4/conf/{bridge}/route_localnet", "1" if on else "0")
    except FileNotFoundError:
        pass
