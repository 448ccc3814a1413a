"""GC: release every attachment of this network that the runtime no longer knows.

Both halves are swept: allocations in the store, and host veths (and ifbs) in the kernel that
carry this network's alias (left by a crash after the veth was made but before the store knew
of it, or by a store that was reset). When the store cannot be used, GC sweeps the kernel half
only and fails, as DEL does.
"""

from __future__ import annotations

import logging

from ..cni.env import Request
from ..cni.netconf import NetConf
from ..dataplane import bandwidth, names, veth
from ..ipam.faults import StoreError
from . import masquerade, resources
from .delete import release
from .faults import checkpoint
from .locks import node_lock

log = logging.getLogger("pycni")


def cmd_gc(request: Request, conf: NetConf) -> None:
    # A list that is null or absent is empty, as the reference host-local reads it: libcni sends
    # it so only when it has no live attachment of this network (a nil slice; GCNetworkList
    # with nil args, as `cnitool gc` calls it), after DELing every attachment it had cached.
    # What is left is what a crash leaked: no runtime still uses it.
    valid = conf.valid_attachments if conf.valid_attachments is not None else set()
    try:
        _gc(request, conf, valid)
    except StoreError as exc:
        _sweep_without_store(conf, valid)
        raise StoreError(
            exc.code,
            f"{exc.msg}; GC removed the interfaces of pods the runtime "
            "no longer has, their addresses stay held until a GC or DEL "
            "succeeds",
            exc.details,
            exc.kind,
        ) from None


def _sweep_without_store(conf: NetConf, valid: set[tuple[str, str]]) -> None:
    """The store cannot be used. As DEL does then, the interfaces of pods the runtime no
    longer has go now: they are found by alias, which needs no store."""
    keep = {names.host_veth_name(conf.name, cid, ifn) for cid, ifn in valid}
    with (
        node_lock(conf.data_dir, exclusive=True),
        resources.host_netlink() as ipr,
        resources.host_rtnl() as nl,
    ):
        for name in veth.host_veths_with_alias(ipr, names.alias_prefix(conf.name)):
            if name not in keep:
                log.info("GC: deleting %s (the store cannot be used)", name)
                veth.delete_host_veth(nl, name)
        _sweep_ifbs(ipr, conf.name, valid)


def _gc(request: Request, conf: NetConf, valid: set[tuple[str, str]]) -> None:
    with node_lock(conf.data_dir, exclusive=True), resources.store(conf.data_dir) as store:
        with resources.host_netlink() as ipr, resources.host_rtnl() as nl:
            for att in store.list_attachments(conf.name):
                if (att.container_id, att.ifname) not in valid:
                    log.info("GC: releasing %s/%s", att.container_id, att.ifname)
                    release(store, nl, conf.name, att.container_id, att.ifname, request)
            checkpoint(request, "gc-store")
            keep = {names.host_veth_name(conf.name, cid, ifn) for cid, ifn in valid}
            keep |= {a.host_veth for a in store.list_attachments(conf.name)}
            for name in veth.host_veths_with_alias(ipr, names.alias_prefix(conf.name)):
                if name not in keep:
                    log.info("GC: deleting orphan veth %s", name)
                    veth.delete_host_veth(nl, name)
            _sweep_ifbs(
                ipr,
                conf.name,
                valid | {(a.container_id, a.ifname) for a in store.list_attachments(conf.name)},
            )
            checkpoint(request, "gc-veths")
        # Also for a network an ADD never got to record: a restarted agent's repair may have
        # installed its crashed ADD's hostPorts, which the store wanted until now.
        masquerade.sync(store)
        checkpoint(request, "gc-rules")


def _sweep_ifbs(ipr, network: str, keep: set[tuple[str, str]]) -> None:
    """ifb devices of this network that no kept attachment owns (a crash between making one
    and its DEL, a reset store)."""
    owned = {names.ifb_name(network, cid, ifn) for cid, ifn in keep}
    for name in bandwidth.ifbs_with_alias(ipr, names.ifb_alias_prefix(network)):
        if name not in owned:
            log.info("GC: deleting orphan ifb %s", name)
            bandwidth.delete_ifb(ipr, name)
