"""The invariant checker behind `pycnictl doctor`, and the tests' way to assert a node is sound.

At every quiet point: the attachments the runtime considers live, the attachments and
allocations in the IPAM store, and the pod interfaces and host veths in the kernel are one set;
no address is held twice; pycni's packet rules and the cluster's routes are what the store and
the node list ask for. `examine` reports every difference as a Finding saying what, where,
expected, found, and how to repair it; it only reads, and it looks at the network namespace it
runs in.

    from pycni.doctor import check
    assert check(data_dir) == []

model: findings and snapshots; compare: the invariant as a pure function of snapshots;
read: the snapshots from SQLite and netlink (imported only when examining: pyroute2).
"""

from __future__ import annotations

import os

from .model import DoctorError, Finding, Report

__all__ = ["DoctorError", "Finding", "Report", "check", "examine", "parse_live"]


def examine(
    data_dirs: str | list[str],
    live: set[tuple[str, str]] | None = None,
    agent_socket: str | None = None,
) -> Report:
    """Check this network namespace against `data_dirs` (one or several dataDirs).

    `live`: the (container ID, ifname) pairs the runtime considers live, or None to leave the
    runtime out. `agent_socket`: the node agent to ask for the cluster's node list, or None to
    leave the cluster routes out."""
    from .compare import compare
    from .read import snapshot

    given = [data_dirs] if isinstance(data_dirs, str) else data_dirs
    # One store named twice would hold every address twice.
    dirs = list({os.path.realpath(d): d for d in given}.values())
    snap, errors, notes = snapshot(dirs, agent_socket)
    owned = {a.key for a in snap.attachments()}
    addresses = sum(
        1 for s in snap.stores for a in s.allocations if (a.data_dir, a.attachment_id) in owned
    )
    return Report(
        findings=compare(snap, live),
        errors=errors,
        notes=notes,
        data_dirs=dirs,
        attachments=len(owned),
        addresses=addresses,
    )


def check(
    data_dirs: str | list[str],
    live: set[tuple[str, str]] | None = None,
    agent_socket: str | None = None,
) -> list[Finding]:
    """The findings of `examine`; DoctorError when something could not be checked, so an
    empty list always means the invariant holds."""
    report = examine(data_dirs, live, agent_socket)
    if report.errors:
        raise DoctorError("; ".join(report.errors))
    return report.findings


def parse_live(obj: object) -> set[tuple[str, str]]:
    """The runtime's live attachments from JSON: a list of {"containerID", "ifname"} (CNI GC's
    cni.dev/valid-attachments), a GC config holding that key, or a list of [containerID,
    ifname] pairs. ValueError says what is wrong."""
    from ..cni.netconf import VALID_ATTACHMENTS

    if isinstance(obj, dict):
        if VALID_ATTACHMENTS not in obj:
            raise ValueError(f"an object needs the key {VALID_ATTACHMENTS!r}")
        obj = obj[VALID_ATTACHMENTS]
    if not isinstance(obj, list):
        raise ValueError("want a list of live attachments")
    out = set()
    for i, item in enumerate(obj):
        if isinstance(item, dict):
            pair = (item.get("containerID"), item.get("ifname"))
        elif isinstance(item, list) and len(item) == 2:
            pair = (item[0], item[1])
        else:
            pair = (None, None)
        if not all(isinstance(x, str) and x for x in pair):
            raise ValueError(
                f'item {i}: want {{"containerID": ..., "ifname": ...}} or '
                f"[containerID, ifname], not {item!r}"
            )
        out.add(pair)  # type: ignore[arg-type]
    return out
