"""DEL: release exactly what ADD took; succeed when any of it is already gone, again and again.

The host veth is found by its deterministic name, so DEL never needs the pod's netns: deleting the
host end removes the pod end with it, and a DEL after the netns is gone still cleans up. Nor does
it need the store for that: when the store cannot be used, DEL removes the interfaces and fails,
and the runtime's retries release the addresses once the store is repaired.
"""

from __future__ import annotations

import logging
import socket
from typing import NoReturn

from ..cni.env import Request
from ..cni.netconf import NetConf
from ..dataplane import bandwidth, names, veth
from ..dataplane.rtnl import Rtnl
from ..ipam.faults import StoreError
from ..ipam.store import Store
from . import masquerade, resources
from .faults import checkpoint
from .locks import node_lock

log = logging.getLogger("pycni")


def cmd_del(request: Request, conf: NetConf) -> None:
    with node_lock(conf.data_dir, exclusive=False):
        try:
            with resources.store(conf.data_dir) as store:
                with resources.host_rtnl() as nl:
                    release(store, nl, conf.name, request.container_id, request.ifname, request)
                # Also for a network an ADD never got to record: a restarted agent's repair
                # may have installed its crashed ADD's hostPorts, which the store wanted.
                masquerade.sync(store)
                checkpoint(request, "del-rules")
        except StoreError as exc:
            _del_without_store(request, conf, exc)


def _del_without_store(request: Request, conf: NetConf, exc: StoreError) -> NoReturn:
    """The store cannot be used. The pod is going away whatever the store says: its interfaces
    go now (found by name), and DEL fails, so the runtime retries until the store can release
    the addresses too. Succeeding would leak them; removing nothing would leave a dead pod's
    veth on the bridge until the store is repaired."""
    cid, ifname = request.container_id, request.ifname
    host = names.host_veth_name(conf.name, cid, ifname)
    ifb = names.ifb_name(conf.name, cid, ifname)
    with resources.host_rtnl() as nl:
        deleted = [host] if veth.delete_host_veth(nl, host) else []
    with resources.host_netlink() as ipr:
        deleted += [ifb] if bandwidth.delete_ifb(ipr, ifb) else []
    for name in deleted:
        log.info("DEL %s/%s: deleted %s (the store cannot be used)", cid, ifname, name)
    raise StoreError(
        exc.code,
        f"{exc.msg}; DEL removed the pod's interfaces, its addresses "
        "stay held until a DEL succeeds",
        exc.details,
        exc.kind,
    ) from None


def release(
    store: Store, nl: Rtnl, network: str, container_id: str, ifname: str, request: Request
) -> None:
    """Remove one attachment: its host veth (by name, and by the name recorded at ADD in case the
    naming ever changes; its qdiscs go with it), its ifb if shaped, and its allocations. The
    kernel objects go first: a crash in between leaves an attachment that the next DEL or GC
    finds, never a veth that no store row leads to."""
    attachment = store.get_attachment(network, container_id, ifname)
    host_names = {names.host_veth_name(network, container_id, ifname)}
    if attachment is not None and attachment.host_veth:
        host_names.add(attachment.host_veth)
    for name in sorted(host_names):
        if veth.delete_host_veth(nl, name):
            log.info("DEL %s/%s: deleted %s", container_id, ifname, name)
    checkpoint(request, "del-veth")
    ifb = names.ifb_name(network, container_id, ifname)
    # Most pods are not shaped. Looking the ifb up by name takes no lock (an ioctl); a delete
    # request would queue behind every link change on the machine for the kernel's rtnl lock,
    # 15% of a DEL's time in a storm.
    if _link_exists(ifb):
        with resources.host_netlink() as ipr:
            if bandwidth.delete_ifb(ipr, ifb):
                log.info("DEL %s/%s: deleted %s", container_id, ifname, ifb)
    checkpoint(request, "del-ifb")
    removed = store.remove_attachment(network, container_id, ifname)
    if removed is not None:
        log.info(
            "DEL %s/%s: released %s",
            container_id,
            ifname,
            ", ".join(str(a.ip) for a in removed.allocations),
        )
    checkpoint(request, "del-store")


def _link_exists(name: str) -> bool:
    """Whether this thread's namespace has a link `name` (SIOCGIFINDEX: no rtnl lock)."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True
