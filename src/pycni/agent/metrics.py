"""The agent's HTTP side: Prometheus `/metrics`, `/healthz` and `/readyz`.

A stdlib ThreadingHTTPServer on a daemon thread, so it never holds the agent up on exit.
Per-call metrics come from an observer the agent calls after each CNI call; address-pool
gauges are computed at scrape time from every data dir the agent knows, so they always show
what the store says, including work done by plugins that ran without the agent.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("pycni")

# CNI calls take from about a millisecond (VERSION, a warm DEL) to seconds (a busy node).
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_PAGE = os.sysconf("SC_PAGE_SIZE")


def start(agent, addr: str, port: int, *, allow_remote: bool = False) -> ThreadingHTTPServer:
    """Serve metrics and health for `agent` on addr:port from a daemon thread.

    Only loopback addresses unless `allow_remote` (the operator named the address): the
    endpoint is unauthenticated and shows pod counts and addresses.
    """
    if not allow_remote and not is_loopback(addr):
        raise ValueError(
            f"metrics address {addr} is not loopback; give it explicitly to "
            "serve metrics beyond this host"
        )
    registry = build_registry(agent)
    handler = type("Handler", (_Handler,), {"agent": agent, "registry": registry})
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    server_class = type(
        "Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True}
    )
    server = server_class((addr, port), handler)
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    log.info("metrics on http://%s:%d/metrics", addr, server.server_address[1])
    return server


def is_loopback(addr: str) -> bool:
    try:
        infos = socket.getaddrinfo(addr, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(infos) and all(
        ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in infos
    )


# --- the registry ------------------------------------------------------------------------


def build_registry(agent) -> CollectorRegistry:
    registry = CollectorRegistry()
    duration = Histogram(
        "pycni_cni_request_duration_seconds",
        "CNI calls served by the agent, by outcome",
        ["command", "result"],
        buckets=DURATION_BUCKETS,
        registry=registry,
    )
    errors = Counter(
        "pycni_cni_errors_total",
        "CNI calls that failed, by CNI error code",
        ["command", "code"],
        registry=registry,
    )
    Gauge(
        "pycni_cni_requests_in_flight", "Connections the agent is serving now", registry=registry
    ).set_function(lambda: agent.inflight)
    Gauge(
        "pycni_agent_resident_memory_bytes", "Resident set size of the agent", registry=registry
    ).set_function(resident_memory)
    Gauge(
        "pycni_agent_uptime_seconds", "Seconds since the agent started", registry=registry
    ).set_function(lambda: time.time() - agent.started)
    ProcessCollector(registry=registry)
    from .. import version

    # The Prometheus idiom for "which build runs here": a constant 1 carrying labels.
    Gauge(
        "pycni_build_info",
        "The agent's version and the commit it was built from ('' when unknown)",
        ["version", "commit"],
        registry=registry,
    ).labels(version.version(), version.commit()).set(1)
    registry.register(IpamCollector(agent))

    def observe(command: str, code: int, seconds: float) -> None:
        command = command or "unknown"
        duration.labels(command, "error" if code else "ok").observe(seconds)
        if code:
            errors.labels(command, str(code)).inc()

    agent.observers.append(observe)
    if getattr(agent, "cluster", None) is not None:
        _cluster_metrics(agent.cluster, registry)
    if getattr(agent, "policy", None) is not None:
        registry.register(PolicyCollector(agent.policy))
    return registry


# A reconcile pass is a few netlink dumps and writes: milliseconds, up to seconds for
# hundreds of nodes appearing at once.
RECONCILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


def _cluster_metrics(cluster, registry: CollectorRegistry) -> None:
    Gauge(
        "pycni_cluster_ready",
        "1 once this node has its subnet and its CNI config is written",
        registry=registry,
    ).set_function(lambda: 1.0 if cluster.ready else 0.0)
    Gauge(
        "pycni_cluster_remote_nodes", "Other nodes the last reconcile routed to", registry=registry
    ).set_function(
        lambda: sum(
            1 for n in cluster.nodes if cluster.record is None or n.name != cluster.record.name
        )
    )
    duration = Histogram(
        "pycni_reconcile_duration_seconds",
        "Reconcile passes (datastore read and kernel apply)",
        buckets=RECONCILE_BUCKETS,
        registry=registry,
    )
    changes = Counter(
        "pycni_reconcile_changes_total",
        "Routes, neighbours, FDB entries and VTEP changes made by reconcile",
        ["action"],
        registry=registry,
    )
    errors = Counter(
        "pycni_reconcile_errors_total",
        "Entries reconcile failed to apply (retried next pass)",
        registry=registry,
    )

    def observe(seconds: float, result) -> None:
        duration.observe(seconds)
        for action in ("added", "replaced", "removed"):
            if getattr(result, action):
                changes.labels(action).inc(getattr(result, action))
        if result.errors:
            errors.inc(len(result.errors))

    cluster.observers.append(observe)


def resident_memory() -> float:
    try:
        with open("/proc/self/statm") as f:
            return float(int(f.read().split()[1]) * _PAGE)
    except (OSError, ValueError, IndexError):
        return float("nan")


def _has_store(data_dir: str) -> bool:
    return os.path.exists(os.path.join(data_dir, "pycni.db"))


class IpamCollector:
    """`pycni_ipam_addresses{network,range,state}` straight from each data dir's store.

    A data dir without a database yet (no ADD so far) or one that fails to open is skipped and
    counted in `pycni_ipam_scrape_errors_total{reason="missing"|"broken"}`.
    """

    def __init__(self, agent) -> None:
        self.agent = agent
        self.errors = {"missing": 0, "broken": 0}
        self._lock = threading.Lock()

    def describe(self) -> Iterator:
        yield GaugeMetricFamily("pycni_ipam_addresses", "", labels=["network", "range", "state"])
        yield CounterMetricFamily("pycni_ipam_scrape_errors", "", labels=["reason"])

    def collect(self) -> Iterator:
        from ..ipam.store import Store

        gauge = GaugeMetricFamily(
            "pycni_ipam_addresses",
            "Pool addresses per network and range set, by state",
            labels=["network", "range", "state"],
        )
        seen: set[tuple[str, str]] = set()
        for data_dir in sorted(self.agent.data_dirs):
            if not _has_store(data_dir):
                self._count("missing")
                continue
            try:
                with Store(data_dir) as store:
                    rows = list(pool_usage(store))
            except Exception as exc:
                log.warning("metrics: cannot read the IPAM store in %s: %s", data_dir, exc)
                self._count("broken")
                continue
            for network, key, used, capacity in rows:
                if (network, key) in seen:
                    continue  # the same network in two data dirs: the first one wins
                seen.add((network, key))
                gauge.add_metric([network, key, "allocated"], used)
                if capacity is not None:
                    gauge.add_metric([network, key, "free"], max(capacity - used, 0))
        yield gauge
        counter = CounterMetricFamily(
            "pycni_ipam_scrape_errors",
            "Data dirs skipped while computing pool gauges",
            labels=["reason"],
        )
        with self._lock:
            for reason, count in sorted(self.errors.items()):
                counter.add_metric([reason], count)
        yield counter

    def _count(self, reason: str) -> None:
        with self._lock:
            self.errors[reason] += 1


def pool_usage(store) -> Iterator[tuple[str, str, int, int | None]]:
    """(network, range set key, allocated, capacity or None) for every network in `store`.

    Capacity comes from the network info ADD records; a network recorded before range sets
    were (or only known from its attachments) reports allocations with unknown capacity.
    """
    networks = store.list_networks()
    attached: dict[str, dict[str, int]] = {}
    for att in store.list_attachments():
        per_key = attached.setdefault(att.network, {})
        for alloc in att.allocations:
            per_key[alloc.range_set] = per_key.get(alloc.range_set, 0) + 1
    for network in sorted(set(networks) | set(attached)):
        used = attached.get(network, {})
        known = {
            rs["key"]: int(rs["capacity"]) for rs in networks.get(network, {}).get("rangeSets", [])
        }
        for key in sorted(set(known) | set(used)):
            yield network, key, used.get(key, 0), known.get(key)


# --- HTTP --------------------------------------------------------------------------------


def serving(agent) -> bool:
    return not agent.stopping.is_set() and getattr(agent, "_listener", None) is not None


def readiness(agent) -> tuple[bool, dict]:
    """Ready: serving, and every known data dir's store opens (a data dir without a database
    yet is fine: the first ADD creates it)."""
    from ..ipam.store import Store

    stores: dict[str, str] = {}
    for data_dir in sorted(agent.data_dirs):
        if not _has_store(data_dir):
            stores[data_dir] = "none yet"
            continue
        try:
            with Store(data_dir) as store:
                store.list_networks()
            stores[data_dir] = "ok"
        except Exception as exc:
            stores[data_dir] = f"error: {exc}"
    ok = serving(agent) and all(not v.startswith("error") for v in stores.values())
    out = {"ready": ok, "serving": serving(agent), "stores": stores}
    cluster = getattr(agent, "cluster", None)
    if cluster is not None:
        # No subnet yet (or none left): pods cannot be networked here.
        out["cluster"] = cluster.not_ready_reason() or "ok"
        ok = ok and cluster.ready
        out["ready"] = ok
    return ok, out


class _Handler(BaseHTTPRequestHandler):
    agent = None
    registry: CollectorRegistry
    server_version = "pycni-agent"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                self._send(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                health = self.agent.health()
                if not serving(self.agent) and health["status"] == "ok":
                    health["status"] = "starting"
                self._json(200 if serving(self.agent) else 503, health)
            elif path == "/readyz":
                ok, body = readiness(self.agent)
                self._json(200 if ok else 503, body)
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain")
        except Exception:
            log.exception("metrics endpoint %s", path)
            self._send(500, b"internal error\n", "text/plain")

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode() + b"\n", "application/json")

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        log.debug("metrics %s: " + format, self.address_string(), *args)


class PolicyCollector:
    """NetworkPolicy at scrape time: packets and bytes each policy allowed and denied (its
    counters in pycni's nft table), and what the controller installed last."""

    def __init__(self, controller) -> None:
        self.controller = controller

    def describe(self) -> Iterator:
        yield CounterMetricFamily("pycni_policy_packets", "", labels=["policy", "verdict"])
        yield CounterMetricFamily("pycni_policy_bytes", "", labels=["policy", "verdict"])
        yield GaugeMetricFamily("pycni_policy_objects", "", labels=["what"])
        yield GaugeMetricFamily("pycni_policy_apply_seconds", "")

    def collect(self) -> Iterator:
        from ..rules.sync import policy_counters

        last = self.controller.last
        packets = CounterMetricFamily(
            "pycni_policy_packets",
            "New connections' packets a NetworkPolicy allowed, or denied while isolating the pod",
            labels=["policy", "verdict"],
        )
        size = CounterMetricFamily(
            "pycni_policy_bytes", "Bytes of those packets", labels=["policy", "verdict"]
        )
        names = {c[0]: (c[1], c[2]) for c in last.get("counters", [])}
        for name, (pkts, nbytes) in policy_counters().items():
            if name in names:
                policy, verdict = names[name]
                packets.add_metric([policy, verdict], pkts)
                size.add_metric([policy, verdict], nbytes)
        yield packets
        yield size
        objects = GaugeMetricFamily(
            "pycni_policy_objects",
            "What the node enforces: policies, isolated pods, rules, set elements",
            labels=["what"],
        )
        for what, value in sorted(last.get("sizes", {}).items()):
            objects.add_metric([what], value)
        yield objects
        if "seconds" in last:
            yield GaugeMetricFamily(
                "pycni_policy_apply_seconds",
                "How long the last compile-and-install of the policies took",
                value=last["seconds"],
            )
