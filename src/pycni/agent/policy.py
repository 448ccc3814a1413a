"""NetworkPolicy on this node: objects in, rules in pycni's table, denied connections cut.

A thread waits on the object source (the API server's watches, or the objects stored in the
sqlite or etcd datastore) and, on every change and every resync, makes the node's rules equal
to what the objects say:

1. the objects, with this node's pods' addresses taken from the IPAM store (the store knows a
   pod's address the moment its ADD allocated it; the API server learns it later), compiled
   by the pure engine (pycni.policy) into this node's ``NodePolicy``;
2. rendered as nft statements (rules/policy.py) and recorded in the store, so every later
   ADD, DEL and repair installs them with the rest of the table in one ``nft -f``; when only
   set elements changed (a pod came, went or was relabelled) the controller changes just
   those elements in the kernel rather than replacing the table;
3. conntrack entries of connections the new rules deny are deleted, so they stop now rather
   than live on as "established" (entries of connections still allowed are left alone: a
   Service's NATed flows keep their endpoint).

The agent also calls ``pod_added`` after an ADD of a Kubernetes pod and before answering the
runtime, so a new pod is isolated before its containers start.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from ..cluster.kv import KVError
from ..cluster.objects import ObjectSource

log = logging.getLogger("pycni")

BRIDGE_NF = (
    "/proc/sys/net/bridge/bridge-nf-call-iptables",
    "/proc/sys/net/bridge/bridge-nf-call-ip6tables",
)
_PROTOCOLS = {socket.IPPROTO_TCP: "TCP", socket.IPPROTO_UDP: "UDP", 132: "SCTP"}


class PolicyController:
    def __init__(
        self, source: ObjectSource, node_name: str, data_dir: str, resync: float = 10.0
    ) -> None:
        self.source = source
        self.node_name = node_name
        self.data_dir = data_dir
        self.resync = resync
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one compile-and-install at a time
        self._thread: threading.Thread | None = None
        self.last: dict[str, Any] = {}  # what status and metrics show
        self.error: str | None = None
        self.active = False  # any policy exists: ADDs must wait for their rules
        # The last compile and what it was made from: (objects, local addresses), inventory,
        # NodePolicy, rendered rules.
        self._compiled: tuple[Any, Any, Any, Any] | None = None
        self._parsed = ParseCache()

    # --- life cycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="policy", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.source.close()

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                self.reconcile("objects changed" if self.last else "start")
                self.error, backoff = None, 0.5
                deadline = time.monotonic() + self.resync
                while not self._stop.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0 or self.source.wait(min(left, 1.0)):
                        break
            except KVError as exc:
                self.error = str(exc)
                log.error("policy: %s (retrying in %.1f s)", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                log.exception("policy reconcile")
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)

    # --- one pass --------------------------------------------------------------------------

    def pod_added(self, pod: tuple[str, str]) -> None:
        """After an ADD of ``pod`` (namespace, name): its rules before its containers run."""
        if self.active:
            self.reconcile(f"pod {pod[0]}/{pod[1]} added")

    def reconcile(self, why: str) -> dict[str, Any]:
        from ..core import masquerade
        from ..ipam.store import Store
        from ..policy import compile_inventory, load
        from ..policy.objects import parse_pod, parse_policy
        from ..rules import policy as policy_rules
        from ..rules.model import PolicyFragment
        from ..rules.sync import resolve_backend

        started = time.monotonic()
        with self._lock:
            clock = _Stopwatch()
            objects = self.source.snapshot()
            clock.lap("snapshot")
            with Store(self.data_dir) as store:
                inputs = (objects, store.pod_addresses())
                if self._compiled is not None and self._compiled[0] == inputs:
                    # Nothing the engine reads changed (a resync, or a wake for objects it
                    # does not read): the rules are what they were; install checks the kernel.
                    _, inventory, compiled, rendered = self._compiled
                    clock.lap("unchanged")
                else:
                    pods = with_local_addresses(objects.pods, inputs[1], self.node_name)
                    inventory = load(
                        objects.namespaces,
                        self._parsed.reuse("Pod", pods, parse_pod),
                        self._parsed.reuse("NetworkPolicy", objects.policies, parse_policy),
                    )
                    clock.lap("load")
                    compiled = compile_inventory(self.node_name, inventory)
                    clock.lap("compile")
                    rendered = policy_rules.render(compiled)
                    clock.lap("render")
                    self._compiled = (inputs, inventory, compiled, rendered)
                if rendered and resolve_backend() != "nft":
                    raise RuntimeError(
                        "NetworkPolicy needs the nft packet-rule backend "
                        "($PYCNI_RULES_BACKEND=iptables here): policies are NOT enforced"
                    )
                if rendered:
                    ensure_bridge_netfilter()
                recorded = (
                    {
                        "statements": list(rendered.statements),
                        "counters": [list(c) for c in rendered.counters],
                        "sizes": compiled.sizes(),
                        "policies": [str(p.id) for p in compiled.policies],
                    }
                    if rendered
                    else None
                )
                changed = masquerade.recorded_policy(store) != recorded
                clock.lap("record")
                how = masquerade.install_policy(store, recorded)
                clock.lap("install")
            cut = cut_denied_connections(compiled) if changed and rendered else 0
            clock.lap("cut")
            self.active = bool(rendered)
            problems = [str(p) for p in inventory.problems]
            for problem in problems:
                if problem not in self.last.get("problems", []):
                    log.warning("policy: left out: %s", problem)
            self.last = {
                "policies": [str(p.id) for p in compiled.policies],
                # What this pass installed (the kernel's policy_digest chain says the same)
                # and cut: reported only once both are done, so a client that sees the
                # digest of the objects it wrote knows their rules are enforced and the
                # connections they deny are gone.
                "digest": PolicyFragment(rendered.statements).digest,
                "cut": cut,
                "sizes": compiled.sizes(),
                "problems": problems,
                "counters": [list(c) for c in rendered.counters],
                "applied": time.time(),
                "seconds": round(time.monotonic() - started, 4),
                "install": how,  # unchanged, elements (set elements alone) or table
                # Where that went, for `pycnictl bench policy` and anyone profiling a node.
                "timings": clock.laps,
            }
            if changed:
                log.info(
                    "policy: %s: %d policies, %d pods isolated here, %d connections cut (%.0f ms)",
                    why,
                    len(compiled.policies),
                    sum(1 for p in compiled.pods if p.ingress or p.egress),
                    cut,
                    1000 * (time.monotonic() - started),
                )
            return self.last

    def status(self) -> dict[str, Any]:
        return {**self.last, "error": self.error}


class ParseCache:
    """The objects parsed by the last pass, with the dict each came from: an object equal to
    the one it was parsed from is not validated and parsed again (with 1,000 pods that was most
    of a pass's loading). Objects that do not parse are handed on as dicts, for load() to
    report."""

    def __init__(self) -> None:
        self._last: dict[str, dict[tuple[str, str], tuple[dict, Any]]] = {}

    def reuse(self, kind: str, items: Iterable[dict], parse: Callable[[dict], Any]) -> list:
        last, fresh = self._last.get(kind, {}), {}
        out: list = []
        for item in items:
            meta = item.get("metadata") if isinstance(item, dict) else None
            name = meta.get("name") if isinstance(meta, dict) else None
            if not isinstance(name, str):
                out.append(item)
                continue
            key = (str(meta.get("namespace") or ""), name)  # type: ignore[union-attr]
            hit = last.get(key)
            if hit is not None and hit[0] == item:
                fresh[key] = hit
                out.append(hit[1])
                continue
            try:
                parsed = parse(item)
            except Exception:  # noqa: BLE001 - load() judges it again and says why
                out.append(item)
                continue
            fresh[key] = (item, parsed)
            out.append(parsed)
        self._last[kind] = fresh
        return out


class _Stopwatch:
    """Seconds spent in each named step, each lap measured from the end of the one before."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 6)
        self._last = now


def forget(data_dir: str) -> bool:
    """An agent that no longer enforces NetworkPolicy (--no-network-policy) takes out the rules
    an earlier run recorded, or every ADD would go on installing them. True if there were any."""
    import os

    from ..core import masquerade
    from ..ipam.store import Store

    if not os.path.exists(os.path.join(data_dir, "pycni.db")):
        return False  # never create a store for this
    with Store(data_dir) as store:
        if masquerade.recorded_policy(store) is None:
            return False
        masquerade.record_policy(store, None)
        masquerade.sync(store)
    log.info("policy: NetworkPolicy is off (--no-network-policy): its rules are removed")
    return True


def with_local_addresses(
    pods: tuple[dict, ...], local: dict[tuple[str, str], list[str]], node_name: str
) -> list[dict]:
    """The Pod objects, this node's pods carrying the addresses the IPAM store holds for them
    (found by the namespace and name the runtime gave in CNI_ARGS) and this node's name."""
    out = []
    for pod in pods:
        meta = pod.get("metadata") if isinstance(pod, dict) else None
        key = (
            (meta.get("namespace") or "default", meta.get("name"))
            if isinstance(meta, dict)
            else None
        )
        ips = local.get(key) if key else None  # type: ignore[arg-type]
        if ips:
            spec = dict(pod.get("spec") or {}, nodeName=node_name)
            status = dict(
                pod.get("status") or {},
                podIP=ips[0],
                podIPs=[{"ip": ip} for ip in ips],
                phase="Running",
            )
            pod = {**pod, "spec": spec, "status": status}
        out.append(pod)
    return out


def ensure_bridge_netfilter() -> None:
    """Bridged frames between pods of this node reach the forward hook (and the policy rules)
    only with br_netfilter on, which is per network namespace."""
    for path in BRIDGE_NF:
        try:
            with open(path) as f:
                if f.read().strip() == "1":
                    continue
            with open(path, "w") as f:
                f.write("1")
            log.info("policy: turned on %s", path)
        except FileNotFoundError:
            log.error("policy: %s is missing: same-node pod traffic is not filtered", path)


def cut_denied_connections(compiled, conntrack=None) -> int:
    """Delete the conntrack entries of this node's connections that ``compiled`` denies.

    Each (protocol, source, destination, port) is judged once, however many entries share it
    (a busy pod's connections differ by their source ports only). ``conntrack``: the table to
    prune (tests give a fake); by default this namespace's, over ctnetlink."""
    from ..dataplane.conntrack import Conntrack
    from ..policy import Interpreter

    judge = Interpreter([compiled])
    local = {
        str(ipaddress.ip_address(ip))
        for pod in compiled.pods
        for ip in pod.ips
        if pod.ingress or pod.egress
    }
    if not local:
        return 0
    verdicts: dict[tuple[str, str, str, int], bool] = {}
    cut = 0
    with conntrack if conntrack is not None else Conntrack() as ct:
        for entry in ct.entries():  # both families, as of one dump
            protocol = _PROTOCOLS.get(entry.orig.proto)
            # After a DNAT (a Service) the real destination is the reply's source.
            src, dst = entry.orig.src, entry.reply.src
            if protocol is None or (src not in local and dst not in local):
                continue
            port = entry.reply.sport or entry.orig.dport or 0
            key = (protocol, src, dst, port)
            allowed = verdicts.get(key)
            if allowed is None:
                allowed = verdicts[key] = judge.allowed(src, dst, protocol, port)
            if not allowed and ct.delete(entry):  # False: gone meanwhile
                cut += 1
    return cut
