"""The eBPF fast path as desired state: which interfaces carry pycni's programs, and what its
maps hold, kept by the agent's reconcile loop like the routes (docs/internals.md#the-fast-path).

Each pass, from the IPAM store (this node's pods, their host veths and addresses), the kernel
(interfaces, the bridge's learned MACs, qdiscs) and the backend's plan (the other nodes'
subnets):

- ``from_pod`` on the host veth of every pod that may use it; a pod with traffic shaping (a
  qdisc of the bandwidth capability on its host veth) is left alone, on the normal path both
  ways: redirecting into it or out of it would skip its shaping;
- ``from_underlay`` on the underlay interface and, when there is one, the VTEP;
- ``pycni_fp_pods``: every such pod's IPv4 address -> its host veth, its MAC (once the bridge
  has learned it) and the bridge's MAC; ``pycni_fp_remote``: the other nodes' IPv4 subnets the
  plan routes.

The programs leave to the stack every packet whose connection conntrack does not hold as
ASSURED and un-NATed (bpf/fastpath.c), so NetworkPolicy, masquerade, hostPorts and Services
keep working without the controller knowing about them. What it does need:
``nf_conntrack_tcp_be_liberal``, set while the fast path is on, so that conntrack, which does
not see the packets the programs carry, still accepts a connection's FIN and RST when they
come through the stack and closes its entry, rather than calling them out of window.

The pass takes the node's lock exclusively (like GC), so it never attaches to a veth an ADD is
still setting up (the bandwidth capability's ``ingress`` qdisc and clsact exclude each other).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from typing import Any

from ..cluster.model import NodeRecord

log = logging.getLogger("pycni")

BE_LIBERAL = "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal"


class FastPathController:
    def __init__(self, data_dir: str, network: str, bridge: str, enabled: bool = True) -> None:
        self.data_dir = data_dir
        self.network = network
        self.bridge = bridge
        self.enabled = enabled
        self.cache_dir = os.path.join(data_dir, "bpf")
        self.loaded: Any = None  # dataplane.fastpath.Loaded, once loaded
        self.error = ""
        self.last: dict = {}
        self._torn_down = False
        self.attached: dict[int, str] = {}  # ifindex -> program, attached from this load
        self._swept = False  # filters of earlier loads on unwanted interfaces removed
        # map id -> (the content this controller last wrote or found there, when it looked)
        self._synced: dict[int, tuple[dict[bytes, bytes], float]] = {}
        self._remote: tuple | None = None  # (local, remotes, nets, remote map) of the last pass

    # --- one pass --------------------------------------------------------------------------

    def reconcile(
        self, ipr, local: NodeRecord, remotes: Iterable[NodeRecord], underlays: Iterable[str]
    ) -> dict:
        """Make the kernel hold what the fast path should; never raises for kernel trouble
        (it is reported in ``self.error`` and retried on the next pass)."""
        from ..dataplane import fastpath as fp

        if not self.enabled:
            if not self._torn_down:
                removed = teardown(ipr)
                if removed:
                    log.info("fast path off: removed from %s", ", ".join(removed))
                self._torn_down = True
            self.last = {"enabled": False}
            return self.last
        started = time.monotonic()
        try:
            if self.loaded is None:
                self._load()
            self.last = self._pass(ipr, local, remotes, underlays)
            self.last["seconds"] = round(time.monotonic() - started, 4)
            if self.error:
                log.info("fast path: recovered (the last error was: %s)", self.error)
            self.error = ""
        except (fp.FastPathError, OSError) as exc:
            if str(exc) != self.error:
                log.warning("fast path: %s (pods use the normal path)", exc)
            self.error = str(exc)
        return self.last

    def _load(self) -> None:
        from ..dataplane import fastpath as fp

        why = fp.unavailable()
        if why:
            raise fp.FastPathError(why)
        obj = fp.build(self.cache_dir)
        self.loaded = fp.load(obj)
        _write_sysctl(BE_LIBERAL, "1")
        log.info(
            "fast path: loaded %s (programs %s)",
            os.path.basename(obj),
            ", ".join(f"{k} id {v}" for k, v in self.loaded.prog_ids.items()),
        )

    def _pass(self, ipr, local: NodeRecord, remotes, underlays) -> dict:
        from ..core.locks import node_lock
        from ..dataplane import fastpath as fp
        from ..ipam.store import Store

        loaded = self.loaded
        assert loaded is not None
        links = {link["index"]: link for link in ipr.link("dump")}
        by_name = {link.get("IFLA_IFNAME"): index for index, link in links.items()}
        bridge = by_name.get(self.bridge)
        gw_mac = links[bridge].get("IFLA_ADDRESS") if bridge else None
        pods: list[fp.PodEntry] = []
        on_veths: dict[int, str] = {}
        left_out: list[str] = []
        with node_lock(self.data_dir, exclusive=True), Store(self.data_dir) as store:
            attachments = store.list_attachments(self.network)
            macs = fp.learned_macs(ipr, bridge) if bridge else {}
            for att in attachments:
                index = by_name.get(att.host_veth)
                if index is None or bridge is None or links[index].get("IFLA_MASTER") != bridge:
                    continue  # not (or no longer) a port of the bridge: nothing to carry
                kinds = {q.get("TCA_KIND") for q in ipr.get_qdiscs(index)}
                if not kinds <= fp.SHAPING_FREE:
                    if fp.detach(ipr, index):
                        self.attached.pop(index, None)
                    left_out.append(
                        f"{att.host_veth}: traffic shaping ({', '.join(sorted(kinds))})"
                    )
                    continue
                on_veths[index] = "from_pod"
                for alloc in att.allocations:
                    if alloc.ip.version == 4 and index in macs:
                        pods.append(fp.PodEntry(alloc.ip, index, macs[index], gw_mac or ""))
            # Maps first, then the programs: a program never sees an empty map it should not.
            changed = self._sync(loaded.map_ids["pycni_fp_pods"], fp.pods_map(pods))
            nets, want_remote = self._remote_plan(local, remotes)
            changed += self._sync(loaded.map_ids["pycni_fp_remote"], want_remote)
            for name in underlays:
                index = by_name.get(name)
                if index is not None:
                    on_veths[index] = "from_underlay"
            for index, program in on_veths.items():
                if self.attached.get(index) == program and fp.attached(ipr, index) == program:
                    continue
                try:
                    fp.attach(ipr, index, program, loaded.prog_fds[program])
                    self.attached[index] = program
                    changed += 1
                except fp.FastPathError as exc:
                    left_out.append(str(exc))
        for index in [i for i in self.attached if i not in on_veths]:
            del self.attached[index]  # gone with its interface, or left out above
        if not self._swept:
            # Once per load: a filter an earlier agent left where none is wanted now (an old
            # underlay, a veth no pod owns) would run its old program on its old maps.
            for index in links:
                if index not in on_veths and fp.detach(ipr, index):
                    log.info(
                        "fast path: removed a stale filter from %s", links[index].get("IFLA_IFNAME")
                    )
            self._swept = True
        return {
            "enabled": True,
            "programs": dict(loaded.prog_ids),
            "maps": dict(loaded.map_ids),
            "pods": sorted(str(p.ip) for p in pods),
            "remoteSubnets": nets,
            "interfaces": sorted(links[i].get("IFLA_IFNAME") for i in on_veths if i in links),
            "leftOut": left_out,
            "changes": changed,
        }

    def _remote_plan(self, local: NodeRecord, remotes: Iterable[NodeRecord]) -> tuple:
        """(the other nodes' IPv4 subnets as text, the remote map's content), computed again
        only when the nodes changed: most passes see the same records, and with 5,000 nodes
        sorting and encoding their subnets costs tens of milliseconds."""
        from ..dataplane import fastpath as fp

        remotes = tuple(remotes)
        last = self._remote
        if last is not None and last[0] == local and last[1] == remotes:
            return last[2], last[3]
        nets = sorted(
            {s for n in remotes if n.name != local.name for s in n.subnets if s.version == 4}
            - set(local.subnets),
            key=lambda s: (int(s.network_address), s.prefixlen),
        )
        self._remote = (local, remotes, [str(n) for n in nets], fp.remote_map(nets))
        return self._remote[2], self._remote[3]

    def _sync(self, map_id: int, want: dict[bytes, bytes]) -> int:
        """Make map ``map_id`` hold ``want``; the number of changes. Reading a map back forks
        bpftool and decodes its JSON (~100 ms for 5,000 subnets), so a map this controller
        wrote or found holding ``want`` is trusted to still hold it for VERIFY_EVERY seconds,
        as the routes are between two reads of the kernel (backends/watch.py): only pycni
        writes these maps, which are reachable by id alone."""
        from ..backends.watch import VERIFY_EVERY
        from ..dataplane import fastpath as fp

        last = self._synced.pop(map_id, None)
        if last is not None and last[0] == want and time.monotonic() - last[1] < VERIFY_EVERY:
            self._synced[map_id] = last
            return 0
        looked = time.monotonic()
        changed = fp.write_map(map_id, fp.read_map(map_id), want)
        self._synced[map_id] = (want, looked)
        return changed

    def status(self) -> dict:
        from ..dataplane import fastpath as fp

        out = {**self.last, "error": self.error}
        if self.loaded is not None and self.enabled:
            try:
                out["stats"] = fp.read_stats(self.loaded.map_ids["pycni_fp_stats"])
            except fp.FastPathError as exc:
                out["stats"] = {"error": str(exc)}
        return out


def teardown(ipr) -> list[str]:
    """Every pycni fast-path filter in this namespace removed: the names of the interfaces."""
    from ..dataplane import fastpath as fp

    removed = []
    for link in ipr.link("dump"):
        if fp.detach(ipr, link["index"]):
            removed.append(link.get("IFLA_IFNAME"))
    return removed


def _write_sysctl(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError as exc:
        log.warning("fast path: cannot set %s: %s", path, exc)
