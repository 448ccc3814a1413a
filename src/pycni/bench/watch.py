"""`pycnictl bench watch`: what one agent's Kubernetes watches cost the API server in a steady
cluster, and whether an event is ever lost on the way (issue 19).

The fake API server (harness/k8s_fake_api.py) serves a cluster of N nodes, with Namespaces, Pods
and NetworkPolicies, in this process on loopback; one agent's side talks to it through the
official client: the kubernetes datastore driven the way the agent's cluster loop drives it
(register, then nodes(), wait() in STOP_CHECK slices up to the resync period, keepalive() every
renew_every), and one informer for each of the NetworkPolicy kinds, as that work will add them.
The kubelets post every node's status every 5 minutes, as they do; the API server sends a
bookmark every minute to watches that allow them.

Time is compressed: every period of the mechanism (the informers' 5-10 minute watches and their
backoff, keepalive, resync, the server's bookmarks and watch limit, the kubelets' status posts)
is divided by --speedup, so --duration real seconds stand for duration x speedup seconds of a
real cluster. The requests the server counts in that window, per kind, are extrapolated to an
hour and compared with the issue's target (at most 15 per watched kind per hour).

Then the checks, one per way a watch ends: a renewal (the server ends every watch), a 410 (the
history is compacted while no watch is open) and an API server restart (every connection
dropped). In each, new watches are held back while nodes, namespaces, pods and policies change,
so the changes can only arrive through the next watch or list; the agent loop's last node list
and every informer's cache must then converge to the server's state within --converge seconds.
Loopback only, no root.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..agent.cluster import STOP_CHECK, ClusterOptions
from ..cluster.datastore import Datastore
from ..cluster.informer import WATCH_TIMEOUT, Informer
from ..cluster.kv import KVError
from ..cluster.model import ClusterError, NodeRecord
from ..harness.k8s_fake_api import (
    RESOURCES,
    FakeAPIServer,
    make_namespace,
    make_network_policy,
    make_node,
    make_pod,
)
from .common import run_and_print

TARGET_PER_HOUR = 15  # requests per watched kind per agent per hour (issue 19)
KINDS = ("nodes", "namespaces", "pods", "networkpolicies")
NODE_STATUS_EVERY = 300.0  # s: kubelet's nodeStatusReportFrequency
HOUR = 3600.0
ME = "node-0"


@dataclass
class Settings:
    duration: float = 60.0  # real seconds measured
    speedup: float = 60.0
    nodes: int = 50
    server_timeout: float = 0.0  # simulated s: the server ends watches after this; 0: never
    bookmark_every: float = 60.0  # simulated s
    converge: float = 10.0  # real s each check may take

    def scaled(self, seconds: float) -> float:
        return seconds / self.speedup


# -- the cluster ------------------------------------------------------------------------------


def _node(i: int) -> dict:
    return make_node(f"node-{i}", [_subnet(i)], [_ip(i)])


def _subnet(i: int) -> str:
    return f"10.{100 + (i >> 8)}.{i & 255}.0/24"


def _ip(i: int) -> str:
    return f"172.20.{i // 250}.{i % 250 + 1}"


def populate(server: FakeAPIServer, nodes: int) -> None:
    """N nodes, a namespace per 10 of them, a pod per node, a policy per namespace."""
    spaces = [f"team-{j}" for j in range(max(1, nodes // 10))]
    server.load("nodes", [_node(i) for i in range(nodes)])
    server.load("namespaces", [make_namespace(ns, {"team": ns}) for ns in spaces])
    server.load(
        "pods",
        [
            make_pod(
                spaces[i % len(spaces)],
                f"app-{i}",
                f"node-{i}",
                _subnet(i).replace(".0/24", ".2"),
                {"app": "a"},
            )
            for i in range(nodes)
        ],
    )
    server.load(
        "networkpolicies", [make_network_policy(ns, "same-ns", {"app": "a"}) for ns in spaces]
    )


def change_everything(server: FakeAPIServer, tag: str, serial: int) -> None:
    """One of each change the agent must see: a node joins, one changes its VTEP MAC, one
    leaves; a namespace is relabelled; a pod comes and one goes; a policy comes and one goes."""
    with server.cond:
        names = sorted(n for n in server.nodes if n != ME)
        spaces = sorted(server.objects["namespaces"])
        pods = sorted(server.objects["pods"])
        policies = sorted(server.objects["networkpolicies"])
    server.put(make_node(f"join-{tag}", [f"10.245.{serial}.0/24"], [f"172.21.0.{serial}"]))
    server.modify(
        names[0],
        {"metadata": {"annotations": {"pycni.io/vtep-mac": f"0a:58:00:00:00:{serial:02x}"}}},
    )
    server.delete(names[-1])
    server.modify_object("namespaces", spaces[0], {"metadata": {"labels": {"changed": tag}}})
    server.put_object("pods", make_pod(spaces[0], f"new-{tag}", ME, f"10.246.0.{serial}"))
    server.delete_object("pods", pods[-1])
    server.put_object("networkpolicies", make_network_policy(spaces[0], f"new-{tag}", {"x": tag}))
    server.delete_object("networkpolicies", policies[-1])


# -- what the agent keeps of each kind ------------------------------------------------------


def namespace_record(ns: Any) -> dict:
    return dict(ns.metadata.labels or {})


def pod_record(pod: Any) -> tuple:
    return (
        pod.spec.node_name,
        pod.status.pod_ip,
        tuple(sorted((pod.metadata.labels or {}).items())),
    )


def policy_record(policy: Any) -> str:
    return json.dumps(policy.spec.to_dict(), sort_keys=True, default=str)


MODELS = {
    "nodes": "V1Node",
    "namespaces": "V1Namespace",
    "pods": "V1Pod",
    "networkpolicies": "V1NetworkPolicy",
}


def expected(
    server: FakeAPIServer, api_client: Any, resource: str, derive: Callable[[Any], Any]
) -> dict:
    """What an informer of `resource` should hold now: the server's objects, derived."""
    with server.cond:
        objects = {key: json.dumps(obj) for key, obj in server.objects[resource].items()}
    out = {}
    for key, text in objects.items():
        record = derive(api_client.deserialize(text, MODELS[resource], "application/json"))
        if record is not None:
            out[key] = record
    return out


# -- one agent --------------------------------------------------------------------------------


class AgentLoop:
    """The agent's cluster loop as far as the datastore sees it (agent/cluster.py's _run and
    _wait, without the kernel): register, then nodes(), wait() in STOP_CHECK slices until a
    change or the resync period, keepalive() every renew_every."""

    def __init__(self, store: Datastore, resync: float, renew: float) -> None:
        self.store = store
        self.resync, self.renew = resync, renew
        self.last_nodes: list[NodeRecord] = []
        self.passes = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-agent-loop", daemon=True)

    def start(self) -> AgentLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        record = None
        next_keepalive = 0.0
        while not self._stop.is_set():
            try:
                if record is None:
                    record = self.store.register(NodeRecord(ME, (_ip(0),), (), "0a:58:ac:14:00:01"))
                    next_keepalive = time.monotonic() + self.renew
                elif time.monotonic() >= next_keepalive:
                    record = self.store.keepalive()
                    next_keepalive = time.monotonic() + self.renew
                nodes = self.store.nodes()
                mine = next((n for n in nodes if n.name == ME), None)
                if mine is None or (set(mine.subnets), mine.node_ips, mine.vtep_mac) != (
                    set(record.subnets),
                    record.node_ips,
                    record.vtep_mac,
                ):
                    # Our own Node changed under us: publish again now (ClusterNode.reconcile).
                    record = self.store.keepalive()
                    nodes = self.store.nodes()
                self.last_nodes = nodes
                self.passes += 1
                deadline = time.monotonic() + min(self.resync, next_keepalive - time.monotonic())
                while not self._stop.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0 or self.store.wait(min(left, STOP_CHECK)):
                        break
            except (ClusterError, KVError) as exc:
                self.errors.append(str(exc))
                self._stop.wait(0.5)
            except Exception as exc:  # the bench must report it, not hang on a dead loop
                self.errors.append(f"{type(exc).__name__}: {exc}")
                self._stop.wait(0.5)


@dataclass
class Rig:
    """The server, the agent's datastore and loop, the policy informers."""

    settings: Settings
    server: FakeAPIServer
    api_client: Any
    store: Any
    loop: AgentLoop
    informers: dict[str, Informer] = field(default_factory=dict)
    derive: dict[str, Callable[[Any], Any]] = field(default_factory=dict)


def split_counts(server: FakeAPIServer) -> dict[str, dict[str, int]]:
    """Requests so far per kind, as list / watch / get / patch (get: one object by name)."""
    out = {kind: {"list": 0, "watch": 0, "get": 0, "patch": 0} for kind in KINDS}
    paths = {RESOURCES[kind].path: kind for kind in KINDS}
    for method, path, _, _ in list(server.requests):
        route, _, query = path.partition("?")
        if route in paths:
            kind = paths[route]
            verb = "watch" if "watch=true" in query else "list"
        else:
            kind = next((k for p, k in paths.items() if route.startswith(p + "/")), "")
            verb = method.lower()
        if kind:
            out[kind][verb] += 1
    return out


def start_rig(settings: Settings, progress: Callable[[str], None]) -> Rig:
    from kubernetes import client

    from ..cluster.kubernetes import KubernetesDatastore

    server = FakeAPIServer()
    populate(server, settings.nodes)
    server.bookmark_every = settings.scaled(settings.bookmark_every)
    if settings.server_timeout:
        server.max_watch = settings.scaled(settings.server_timeout)
    server.start()
    api_client = client.ApiClient(client.Configuration(host=server.url))
    watch_timeout = (settings.scaled(WATCH_TIMEOUT[0]), settings.scaled(WATCH_TIMEOUT[1]))
    backoff = (settings.scaled(1.0), settings.scaled(30.0))
    store = KubernetesDatastore(ME, api_client=api_client)
    store.watch_timeout, store.backoff = watch_timeout, backoff
    loop = AgentLoop(
        store,
        resync=settings.scaled(ClusterOptions.resync),
        renew=settings.scaled(store.renew_every),
    )
    rig = Rig(settings, server, api_client, store, loop)
    core, networking = client.CoreV1Api(api_client), client.NetworkingV1Api(api_client)
    for kind, list_fn, derive in (
        ("namespaces", core.list_namespace, namespace_record),
        ("pods", core.list_pod_for_all_namespaces, pod_record),
        ("networkpolicies", networking.list_network_policy_for_all_namespaces, policy_record),
    ):
        rig.derive[kind] = derive
        rig.informers[kind] = Informer(
            kind, list_fn, derive, watch_timeout=watch_timeout, backoff=backoff
        ).start()
    progress(f"bench watch: fake API server at {server.url}, {settings.nodes} nodes")
    loop.start()
    return rig


def stop_rig(rig: Rig) -> None:
    rig.loop.stop()
    for informer in rig.informers.values():
        informer.stop()
    rig.store.close()
    rig.server.stop()
    rig.api_client.close()


# -- measuring --------------------------------------------------------------------------------


def wait_started(rig: Rig, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if rig.loop.passes and all(rig.server.wait_watching(kind, 1, 0.1) for kind in KINDS):
            return
    raise RuntimeError(
        f"the agent did not start watching within {timeout:.0f} s: {rig.loop.errors}"
    )


def kubelets(rig: Rig, stop: threading.Event) -> None:
    """Every node's status posted every NODE_STATUS_EVERY (simulated), spread evenly."""
    settings = rig.settings
    every = settings.scaled(NODE_STATUS_EVERY) / settings.nodes
    i = 0
    while not stop.wait(every):
        name = f"node-{i % settings.nodes}"
        i += 1
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        condition = {
            "type": "Ready",
            "status": "True",
            "lastHeartbeatTime": stamp,
            "lastTransitionTime": "2024-05-13T09:14:02Z",
            "reason": "KubeletReady",
        }
        try:
            rig.server.modify(name, {"status": {"conditions": [condition]}})
        except KeyError:
            pass  # removed by a check


def steady(rig: Rig, progress: Callable[[str], None]) -> dict:
    settings = rig.settings
    before = split_counts(rig.server)
    stop = threading.Event()
    posts = threading.Thread(target=kubelets, args=(rig, stop), daemon=True)
    posts.start()
    progress(
        f"bench watch: steady cluster for {settings.duration:.0f} s "
        f"({settings.duration * settings.speedup / HOUR:.2f} simulated h)"
    )
    t0 = time.monotonic()
    time.sleep(settings.duration)
    elapsed = time.monotonic() - t0
    after = split_counts(rig.server)
    stop.set()
    posts.join()
    hours = elapsed * settings.speedup / HOUR
    rows = []
    for kind in KINDS:
        counted = {verb: after[kind][verb] - before[kind][verb] for verb in after[kind]}
        total = sum(counted.values())
        per_hour = round(total / hours, 1)
        rows.append(
            {
                "kind": kind,
                **counted,
                "per_hour": per_hour,
                "target": TARGET_PER_HOUR,
                "pass": per_hour <= TARGET_PER_HOUR,
            }
        )
    return {"simulated_hours": round(hours, 3), "startup": before, "kinds": rows}


def check(rig: Rig, name: str, serial: int, disturb: Callable[[], None]) -> dict:
    """Hold new watches, disturb (end, compact, drop), change everything, release: the agent
    loop's nodes and every informer must converge to the server's state."""
    from ..cluster.kubernetes import node_record

    server = rig.server
    before = split_counts(server)
    server.hold_watches()
    try:
        disturb()
        deadline = time.monotonic() + 5
        while server.watches_open() and time.monotonic() < deadline:
            time.sleep(0.01)
        change_everything(server, name, serial)
        if name == "410":
            server.compact()  # after the changes: every version a watch could resume from is gone
    finally:
        server.hold_watches(False)
    t0 = time.monotonic()
    deadline = t0 + rig.settings.converge
    problems: list[str] = []
    while True:
        want_nodes = sorted(
            expected(server, rig.api_client, "nodes", node_record).values(), key=lambda r: r.name
        )
        problems = [] if rig.loop.last_nodes == want_nodes else ["the agent loop's node list"]
        for kind, informer in rig.informers.items():
            if informer.snapshot()[1] != expected(server, rig.api_client, kind, rig.derive[kind]):
                problems.append(f"the {kind} informer")
        if not problems or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    seconds = time.monotonic() - t0
    after = split_counts(server)
    return {
        "check": name,
        "ok": not problems,
        "seconds": round(seconds, 3),
        "lists": sum(after[k]["list"] - before[k]["list"] for k in KINDS),
        "watches": sum(after[k]["watch"] - before[k]["watch"] for k in KINDS),
        "stale": problems,
    }


def bench(settings: Settings, progress: Callable[[str], None]) -> dict:
    rig = start_rig(settings, progress)
    try:
        wait_started(rig)
        report = steady(rig, progress)
        progress("bench watch: checks: a renewal, a 410, an API server restart")
        checks = [
            check(rig, "renewal", 1, rig.server.end_watches),
            check(rig, "410", 2, rig.server.end_watches),
            check(rig, "restart", 3, rig.server.restart),
        ]
        # A renewal and a restart resume from the last version: nothing is listed again; after
        # the 410 every kind lists once.
        for c in checks:
            want = len(KINDS) if c["check"] == "410" else 0
            if c["lists"] != want:
                c["ok"] = False
                c["stale"].append(f"{c['lists']} lists, expected {want}")
        nodes = rig.store.informer
        stats = {"nodes": dict(nodes.stats) if nodes is not None else {}}
        stats.update({kind: dict(i.stats) for kind, i in rig.informers.items()})
    finally:
        stop_rig(rig)
    total = round(sum(row["per_hour"] for row in report["kinds"]), 1)
    return {
        "ok": all(r["pass"] for r in report["kinds"]) and all(c["ok"] for c in checks),
        "settings": {
            "duration": settings.duration,
            "speedup": settings.speedup,
            "nodes": settings.nodes,
            "server_timeout": settings.server_timeout,
            "bookmark_every": settings.bookmark_every,
            "watch_timeout": list(WATCH_TIMEOUT),
        },
        **report,
        "total_per_hour": total,
        "checks": checks,
        "informers": stats,
        "loop_errors": rig.loop.errors[:5],
    }


def format_table(report: dict) -> str:
    s = report["settings"]
    limit = f"{s['server_timeout']:.0f} s" if s["server_timeout"] else "the client's"
    lines = [
        f"pycnictl bench watch: one agent, {s['nodes']} nodes, {report['simulated_hours']:.2f} "
        f"simulated h ({s['duration']:.0f} s at {s['speedup']:.0f}x); watches "
        f"{s['watch_timeout'][0] / 60:.0f}-{s['watch_timeout'][1] / 60:.0f} min, server "
        f"limit {limit}, bookmarks every {s['bookmark_every']:.0f} s",
        "",
        f"{'kind':<16}{'list':>6}{'watch':>7}{'get':>5}{'patch':>7}{'per hour':>10}  target",
    ]
    for row in report["kinds"]:
        verdict = "PASS" if row["pass"] else "FAIL"
        lines.append(
            f"{row['kind']:<16}{row['list']:>6}{row['watch']:>7}{row['get']:>5}{row['patch']:>7}"
            f"{row['per_hour']:>10.1f}  <={row['target']} {verdict}"
        )
    lines.append(f"{'all kinds':<41}{report['total_per_hour']:>10.1f}")
    lines += ["", f"{'check':<10}{'converged':>11}{'lists':>7}{'watches':>9}  result"]
    for c in report["checks"]:
        verdict = "PASS" if c["ok"] else "FAIL: " + "; ".join(c["stale"])
        lines.append(
            f"{c['check']:<10}{c['seconds']:>9.3f} s{c['lists']:>7}{c['watches']:>9}  {verdict}"
        )
    return "\n".join(lines)


def run(args) -> int:
    settings = Settings(
        duration=args.duration,
        speedup=args.speedup,
        nodes=args.nodes,
        server_timeout=args.server_timeout,
        bookmark_every=args.bookmark_every,
        converge=args.converge,
    )
    problem = validate(settings)
    if problem:
        import sys

        print(f"pycnictl bench watch: {problem}", file=sys.stderr)
        return 2
    return run_and_print(
        "pycnictl bench watch",
        lambda progress: bench(settings, progress),
        format_table,
        args,
        (RuntimeError, OSError),
        "the fake API server stopped",
    )


def validate(settings: Settings) -> str | None:
    if not 1 <= settings.speedup <= 300:
        return "--speedup 1..300 (a watch's timeout must stay at least 1 s)"
    if settings.duration <= 0 or settings.converge <= 0:
        return "--duration and --converge must be positive"
    if not 3 <= settings.nodes <= 5000:
        return "--nodes 3..5000"
    if settings.server_timeout < 0 or settings.bookmark_every <= 0:
        return "--server-timeout at least 0, --bookmark-every positive"
    return None
