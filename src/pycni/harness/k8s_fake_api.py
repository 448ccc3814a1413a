"""A small fake kubernetes API server: Nodes, Namespaces, Pods and NetworkPolicies.

The real client talks HTTP to it, so the client's own request building, content types,
deserialization and watch machinery are exercised, not mocks of them. It serves the way
kube-apiserver does: lists with a resourceVersion, chunked watch streams of one JSON object per
line that resume from a resourceVersion, end at the client's ``timeoutSeconds`` and carry
``BOOKMARK`` events when ``allowWatchBookmarks`` asks for them (every ``bookmark_every``
seconds, and once just before the watch's timeout), an ``ERROR`` event with a 410 Status for a
compacted resourceVersion, a metav1.Status with every error. Cluster-scoped objects (Nodes,
Namespaces) can also be read and merge-patched one by one.

What the tests and `pycnictl bench watch` need beyond serving: every request is counted by
(method, resource, watch or not); ``restart()`` drops every connection as an API server
restart does (state and history kept, so watches can resume); ``compact()`` forgets history,
so the next watch from an older resourceVersion gets 410; ``unavailable`` answers 503 to
everything (an API server whose etcd is away), ``max_watch`` ends watches sooner than asked
(a server or load balancer that cuts long requests).

Two ways to use it:

- in-process: ``FakeAPIServer().start()`` serves from a thread; test code plays the other
  cluster actors (kubelet, controller-manager, kubectl) through put/modify/delete;
- as a process (``python k8s_fake_api.py``, e.g. under ``ip netns exec`` so that it listens on
  a network namespace's loopback): it prints ``{"url": ...}`` as its first line, then obeys one
  JSON command per line on stdin, answering each with one JSON line on stdout (see `serve_stdio`).
  It exits when stdin closes.

Standard library only: the process needs nothing but a Python. It lives in pycni.harness so
that `pycnictl bench watch` can use it too; the recorded Node objects stay test data.
"""

from __future__ import annotations

import copy
import json
import random
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

MERGE_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json")
# kube-apiserver's --min-request-timeout: a watch that names no timeoutSeconds lasts a random
# 1-2 times this.
MIN_REQUEST_TIMEOUT = 1800.0


@dataclass(frozen=True)
class Resource:
    name: str  # "nodes": how requests are counted and objects addressed
    path: str  # the collection's URL path (all namespaces for namespaced kinds)
    kind: str
    api_version: str
    namespaced: bool


RESOURCES = {
    r.name: r
    for r in (
        Resource("nodes", "/api/v1/nodes", "Node", "v1", False),
        Resource("namespaces", "/api/v1/namespaces", "Namespace", "v1", False),
        Resource("pods", "/api/v1/pods", "Pod", "v1", True),
        Resource(
            "networkpolicies",
            "/apis/networking.k8s.io/v1/networkpolicies",
            "NetworkPolicy",
            "networking.k8s.io/v1",
            True,
        ),
    )
}
NODES = RESOURCES["nodes"].path


def status(code: int, reason: str, message: str, name: str | None = None, kind: str = "nodes"):
    """A metav1.Status as the API server sends it with every error."""
    out: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if name:
        out["details"] = {"name": name, "kind": kind}
    return out


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def object_key(obj: dict) -> str:
    meta = obj["metadata"]
    return f"{meta['namespace']}/{meta['name']}" if meta.get("namespace") else meta["name"]


class FakeAPIServer:
    """The API server's state and its counters; test code plays the other cluster actors
    (kubelet, controller-manager, kubectl) through put/modify/delete."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.objects: dict[str, dict[str, dict]] = {name: {} for name in RESOURCES}
        self.nodes = self.objects["nodes"]
        self.rv = 0
        self.events: list[tuple[int, str, str, dict]] = []  # rv, resource, type, object
        self.compacted = 0  # watches from a resourceVersion below this get 410 Gone
        self.gone_as_status = False  # 410 as the HTTP status rather than an ERROR event
        self.forbid_patch = False
        self.unavailable = False  # answer 503 to every request
        self.bookmark_every = 60.0  # seconds between bookmarks (kube-apiserver: about a minute)
        self.max_watch: float | None = None  # end every watch after at most this many seconds
        self.requests: list[tuple[str, str, str, str]] = []  # method, path, type, auth
        self.counts: Counter[tuple[str, str, bool]] = Counter()  # (method, resource, watch)
        self.restarts = 0
        self.endings = 0  # end_watches() calls
        self.holding = False  # watch requests wait (counted) until this is False again
        # Watches being served, by resource and by the restart they began after.
        self.watching: Counter[tuple[str, int]] = Counter()
        self.stopping = False
        self.conns: set[socket.socket] = set()
        self.httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self.httpd.api = self
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, name="fake-apiserver", kwargs={"poll_interval": 0.05}
        )

    def start(self) -> FakeAPIServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.httpd.shutdown()
        self.thread.join()
        self._shut_connections()  # wake handlers parked on a keep-alive connection
        self.httpd.server_close()  # joins every handler thread

    def _shut_connections(self) -> None:
        for conn in list(self.conns):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- what the tests and the benchmark do to the server itself --------------------------

    def restart(self) -> None:
        """As if the API server restarted: every connection drops (watches end without their
        final chunk), the state and its history stay."""
        with self.cond:
            self.restarts += 1
            self.cond.notify_all()
        self._shut_connections()

    def end_watches(self) -> None:
        """End every open watch now, as its timeout would (a last bookmark, the final chunk):
        a renewal at a moment of the test's choosing."""
        with self.cond:
            self.endings += 1
            self.cond.notify_all()

    def hold_watches(self, hold: bool = True) -> None:
        """Make new watch requests wait (they are counted) until released: with watches ended
        or dropped, what changes meanwhile must reach the clients through the next watch."""
        with self.cond:
            self.holding = hold
            self.cond.notify_all()

    def watches_open(self) -> int:
        with self.cond:
            return sum(self.watching.values())

    def compact(self) -> None:
        """etcd compaction: every resourceVersion before now is forgotten."""
        with self.cond:
            self.compacted = self.rv
            self.events = [e for e in self.events if e[0] > self.compacted]

    def wait_watching(self, resource: str = "nodes", n: int = 1, timeout: float = 5.0) -> bool:
        """Until at least `n` watches of `resource` begun since the last restart are being
        served (an informer has synced and its watch is open, so changes from now on reach it
        as events)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.watching[(resource, self.restarts)] < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return True

    def count(self, method: str, watch: bool = False, resource: str | None = None) -> int:
        """Requests with this method, watches or not, of one resource (None: any)."""
        return sum(
            n
            for (m, r, w), n in list(self.counts.items())
            if m == method and w == watch and (resource is None or r == resource)
        )

    # -- cluster state, as other actors change it ----------------------------------------

    def load(self, resource: str, items: list[dict], rv: int | None = None) -> None:
        """Objects that exist from the start: no watch events."""
        res = RESOURCES[resource]
        with self.cond:
            for item in items:
                obj = {"kind": res.kind, "apiVersion": res.api_version, **copy.deepcopy(item)}
                if rv is None:
                    self.rv += 1
                    obj["metadata"]["resourceVersion"] = str(self.rv)
                self.objects[resource][object_key(obj)] = obj
            if rv is not None:
                self.rv = max(self.rv, rv)

    def load_list(self, listed: dict) -> None:
        """A recorded NodeList as the initial state, at its resourceVersion."""
        self.load("nodes", listed["items"], int(listed["metadata"]["resourceVersion"]))

    def _event(self, resource: str, kind: str, obj: dict) -> None:
        """Caller holds cond."""
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.events.append((self.rv, resource, kind, copy.deepcopy(obj)))
        self.cond.notify_all()

    def put_object(self, resource: str, obj: dict) -> None:
        """Create (ADDED) or replace (MODIFIED) an object."""
        res = RESOURCES[resource]
        obj = {"kind": res.kind, "apiVersion": res.api_version, **copy.deepcopy(obj)}
        with self.cond:
            key = object_key(obj)
            kind = "MODIFIED" if key in self.objects[resource] else "ADDED"
            self.objects[resource][key] = obj
            self._event(resource, kind, obj)

    def modify_object(self, resource: str, key: str, patch: dict) -> None:
        with self.cond:
            obj = merge_patch(self.objects[resource][key], patch)
            self.objects[resource][key] = obj
            self._event(resource, "MODIFIED", obj)

    def delete_object(self, resource: str, key: str) -> None:
        with self.cond:
            self._event(resource, "DELETED", self.objects[resource].pop(key))

    def put(self, node: dict) -> None:
        self.put_object("nodes", node)

    def modify(self, name: str, patch: dict) -> None:
        self.modify_object("nodes", name, patch)

    def delete(self, name: str) -> None:
        self.delete_object("nodes", name)

    def replay(self, event: dict) -> None:
        """One recorded node watch event, applied as if it had happened here."""
        if event["type"] == "DELETED":
            self.delete(event["object"]["metadata"]["name"])
        else:
            self.put(event["object"])

    def annotations(self, name: str) -> dict[str, str]:
        with self.cond:
            return dict(self.nodes[name]["metadata"].get("annotations", {}))


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handler threads: none outlives a test
    block_on_close = True
    api: FakeAPIServer


def _route(path: str) -> tuple[Resource | None, str | None]:
    """The resource a URL path addresses, and the object's name when it names one."""
    for res in RESOURCES.values():
        if path == res.path:
            return res, None
        name = path.removeprefix(res.path + "/")
        if name != path and not res.namespaced and name and "/" not in name:
            return res, name
    return None, None


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked watch streams, like the real one
    timeout = 10  # safety net; stop() shuts connections down well before
    server: _HTTPServer

    def setup(self) -> None:
        super().setup()
        # Go's net/http does this too; without it headers and body in two writes cost 40 ms
        # of delayed ACK per request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.api.conns.add(self.connection)

    def finish(self) -> None:
        self.server.api.conns.discard(self.connection)
        try:
            super().finish()
        except OSError:
            pass  # the connection was dropped under us (restart)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        pass

    def _record(self, res: Resource | None, watch: bool) -> None:
        api = self.server.api
        api.requests.append(
            (
                self.command,
                self.path,
                self.headers.get("Content-Type", ""),
                self.headers.get("Authorization", ""),
            )
        )
        with api.cond:
            api.counts[(self.command, res.name if res else urlsplit(self.path).path, watch)] += 1

    def send_json(self, code: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def unavailable(self) -> None:
        self.send_json(503, status(503, "ServiceUnavailable", "the server is currently unable"))

    def not_found(self, res: Resource | None, name: str | None) -> None:
        what = res.name if res else "the server"
        message = f'{what} "{name}" not found' if name else "the server could not find it"
        self.send_json(404, status(404, "NotFound", message, name, what))

    def do_GET(self) -> None:
        api = self.server.api
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        res, name = _route(url.path)
        watching = res is not None and name is None and query.get("watch", [""])[0] in ("true", "1")
        self._record(res, watching)
        if api.unavailable:
            return self.unavailable()
        if res is None:
            return self.not_found(None, None)
        if watching:
            timeout = query.get("timeoutSeconds", [""])[0]
            return self.watch(
                res,
                int(query.get("resourceVersion", ["0"])[0] or 0),
                float(timeout) if timeout else None,
                query.get("allowWatchBookmarks", [""])[0] in ("true", "1"),
            )
        with api.cond:
            if name is None:
                items = [
                    {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}
                    for _, obj in sorted(api.objects[res.name].items())
                ]
                return self.send_json(
                    200,
                    {
                        "kind": f"{res.kind}List",
                        "apiVersion": res.api_version,
                        "metadata": {"resourceVersion": str(api.rv)},
                        "items": items,
                    },
                )
            if name in api.objects[res.name]:
                return self.send_json(200, api.objects[res.name][name])
        self.not_found(res, name)

    def do_PATCH(self) -> None:
        api = self.server.api
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        res, name = _route(urlsplit(self.path).path)
        self._record(res, False)
        ctype = self.headers.get("Content-Type", "").split(";")[0]
        if api.unavailable:
            return self.unavailable()
        if res is None or name is None:
            return self.not_found(res, name)
        if api.forbid_patch:
            return self.send_json(
                403,
                status(
                    403,
                    "Forbidden",
                    f'{res.name} "{name}" is forbidden: User "system:serviceaccount:'
                    f'kube-system:pycni" cannot patch resource "{res.name}" in API group "" at '
                    "the cluster scope",
                    name,
                    res.name,
                ),
            )
        if ctype not in MERGE_TYPES:
            return self.send_json(
                415,
                status(
                    415,
                    "UnsupportedMediaType",
                    f"the body of the request was in an unknown "
                    f"format - accepted media types include: {', '.join(MERGE_TYPES)}",
                ),
            )
        with api.cond:
            objects = api.objects[res.name]
            if name not in objects:
                return self.not_found(res, name)
            obj = merge_patch(objects[name], body)
            if obj != objects[name]:  # a no-op patch changes nothing, not even the RV
                objects[name] = obj
                api._event(res.name, "MODIFIED", obj)
            return self.send_json(200, obj)

    def watch(self, res: Resource, since: int, timeout: float | None, bookmarks: bool) -> None:
        api = self.server.api
        with api.cond:
            while api.holding and not api.stopping:
                api.cond.wait()
            restarts, compacted = api.restarts, api.compacted
        if since < compacted:
            gone = status(410, "Expired", f"too old resource version: {since} ({compacted})")
            if api.gone_as_status:
                return self.send_json(410, gone)
            self.begin_stream()
            self.chunk({"type": "ERROR", "object": gone})
            self.chunk(None)
            return
        if timeout is None:
            timeout = random.uniform(MIN_REQUEST_TIMEOUT, 2 * MIN_REQUEST_TIMEOUT)
        if api.max_watch is not None:
            timeout = min(timeout, api.max_watch)
        self.begin_stream()
        with api.cond:
            api.watching[(res.name, restarts)] += 1
            endings = api.endings
            api.cond.notify_all()
        try:
            self._stream(res, since, timeout, bookmarks, restarts, endings)
        finally:
            with api.cond:
                api.watching[(res.name, restarts)] -= 1

    def _stream(
        self,
        res: Resource,
        since: int,
        timeout: float,
        bookmarks: bool,
        restarts: int,
        endings: int,
    ) -> None:
        api = self.server.api
        now = time.monotonic()
        deadline = now + timeout
        next_bookmark = now + api.bookmark_every if bookmarks else float("inf")
        while True:
            send: list[dict] = []
            with api.cond:
                if api.restarts != restarts:
                    self.close_connection = True
                    return  # dropped, no final chunk: the client sees the connection break
                pending = [e for e in api.events if e[0] > since and e[1] == res.name]
                for rv, _, kind, obj in pending:
                    send.append({"type": kind, "object": obj})
                    since = rv
                now = time.monotonic()
                last = now >= deadline or api.stopping or api.endings != endings
                if not send and bookmarks and (now >= next_bookmark or (last and since < api.rv)):
                    # Nothing of ours since `since`: the client may resume from the newest version.
                    since = api.rv
                    meta = {"resourceVersion": str(since)}
                    send.append(
                        {
                            "type": "BOOKMARK",
                            "object": {
                                "kind": res.kind,
                                "apiVersion": res.api_version,
                                "metadata": meta,
                            },
                        }
                    )
                    next_bookmark = now + api.bookmark_every
                elif not send and not last:
                    api.cond.wait(min(deadline, next_bookmark) - now)
                    continue
            for event in send:
                if not self.chunk(event):
                    return
            if last and not pending:
                break
        self.chunk(None)

    def begin_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def chunk(self, obj: Any) -> bool:
        """One watch line as one chunk; None ends the stream. False once the client left."""
        data = b"" if obj is None else json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            return True
        except OSError:
            self.close_connection = True
            return False


# -- objects as the other actors make them ----------------------------------------------------


def _node_template() -> dict:
    """A Node as kubeadm's kubelet registers it (the recorded node-a of tests/data/k8s)."""
    condition = {
        "status": "False",
        "lastHeartbeatTime": "2024-05-14T07:41:19Z",
        "lastTransitionTime": "2024-05-13T09:12:41Z",
    }
    return {
        "kind": "Node",
        "apiVersion": "v1",
        "metadata": {
            "creationTimestamp": "2024-05-13T09:12:41Z",
            "labels": {
                "beta.kubernetes.io/arch": "amd64",
                "beta.kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/os": "linux",
            },
            "annotations": {
                "kubeadm.alpha.kubernetes.io/cri-socket": "unix:///var/run/containerd/containerd.sock",
                "node.alpha.kubernetes.io/ttl": "0",
                "volumes.kubernetes.io/controller-managed-attach-detach": "true",
            },
        },
        "spec": {},
        "status": {
            "capacity": {
                "cpu": "2",
                "ephemeral-storage": "20470152Ki",
                "memory": "4015472Ki",
                "pods": "110",
            },
            "allocatable": {
                "cpu": "2",
                "ephemeral-storage": "18864735075",
                "memory": "3913072Ki",
                "pods": "110",
            },
            "conditions": [
                {"type": "MemoryPressure", "reason": "KubeletHasSufficientMemory", **condition},
                {"type": "DiskPressure", "reason": "KubeletHasNoDiskPressure", **condition},
                {"type": "PIDPressure", "reason": "KubeletHasSufficientPID", **condition},
                {**condition, "type": "Ready", "status": "True", "reason": "KubeletReady"},
            ],
            "addresses": [],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": "a81c5b0e7d4f4b9c9f3b2e1d0c6a7b8e",
                "systemUUID": "3f1c2a4e-0000-4000-8000-000000000000",
                "bootID": "d2b7c1e4-5f6a-4b3c-8d9e-0f1a2b3c4d5e",
                "kernelVersion": "6.1.0-21-amd64",
                "osImage": "Debian GNU/Linux 12 (bookworm)",
                "containerRuntimeVersion": "containerd://1.7.15",
                "kubeletVersion": "v1.30.1",
                "kubeProxyVersion": "v1.30.1",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        },
    }


def make_node(
    name: str,
    pod_cidrs: list[str] | None,
    internal_ips: list[str],
    annotations: dict[str, str] | None = None,
) -> dict:
    """A Node as the kubelet registers it, with these pod CIDRs (None: none allocated yet),
    InternalIP addresses and extra annotations."""
    node = _node_template()
    meta = node["metadata"]
    meta["name"] = name
    meta["uid"] = str(uuid.uuid5(uuid.NAMESPACE_DNS, name))
    meta["labels"]["kubernetes.io/hostname"] = name
    meta["annotations"].update(annotations or {})
    node["spec"] = {"podCIDR": pod_cidrs[0], "podCIDRs": list(pod_cidrs)} if pod_cidrs else {}
    node["status"]["addresses"] = [{"type": "InternalIP", "address": ip} for ip in internal_ips] + [
        {"type": "Hostname", "address": name}
    ]
    return node


def _meta(name: str, namespace: str | None, labels: dict[str, str] | None) -> dict:
    meta: dict[str, Any] = {"name": name, "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, name))}
    if namespace:
        meta["namespace"] = namespace
        meta["uid"] = str(uuid.uuid5(uuid.NAMESPACE_DNS, f"{namespace}/{name}"))
    meta["labels"] = dict(labels or {})
    return meta


def make_namespace(name: str, labels: dict[str, str] | None = None) -> dict:
    labels = {"kubernetes.io/metadata.name": name, **(labels or {})}
    return {"metadata": _meta(name, None, labels), "spec": {"finalizers": ["kubernetes"]}}


def make_pod(
    namespace: str, name: str, node: str, ip: str, labels: dict[str, str] | None = None
) -> dict:
    """A running pod on `node` with address `ip`."""
    return {
        "metadata": _meta(name, namespace, labels),
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "busybox"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    }


def make_network_policy(namespace: str, name: str, match_labels: dict[str, str]) -> dict:
    """Ingress to the pods matching `match_labels` only from pods of the same namespace."""
    return {
        "metadata": _meta(name, namespace, None),
        "spec": {
            "podSelector": {"matchLabels": dict(match_labels)},
            "ingress": [{"from": [{"podSelector": {}}]}],
            "policyTypes": ["Ingress"],
        },
    }


# -- as a process -----------------------------------------------------------------------------


def serve_stdio(stdin=sys.stdin, stdout=sys.stdout) -> None:
    """Serve until stdin closes. Commands, one JSON object a line:

    - ``{"op": "load", "items": [node, ...]}``: the initial state (no watch events);
    - ``{"op": "put", "node": node}``: ADDED, or MODIFIED when the name exists;
    - ``{"op": "modify", "name": n, "patch": merge_patch}``: MODIFIED;
    - ``{"op": "delete", "name": n}``: DELETED;
    - ``{"op": "get", "name": n}``: the node as stored (null when there is none);
    - ``{"op": "restart"}``, ``{"op": "compact"}``: as the methods of the same names.

    Each is answered ``{"ok": true, "node": ...}`` or ``{"ok": false, "error": "..."}``.
    """
    api = FakeAPIServer().start()
    try:
        print(json.dumps({"url": api.url}), file=stdout, flush=True)
        for line in stdin:
            if not line.strip():
                continue
            reply: dict[str, Any]
            try:
                reply = {"ok": True, "node": _command(api, json.loads(line))}
            except Exception as e:  # a bad command is the test's bug: say so, keep serving
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            print(json.dumps(reply), file=stdout, flush=True)
    finally:
        api.stop()


def _command(api: FakeAPIServer, cmd: dict) -> dict | None:
    op = cmd["op"]
    if op == "load":
        api.load("nodes", cmd["items"])
    elif op == "put":
        api.put(cmd["node"])
    elif op == "modify":
        api.modify(cmd["name"], cmd["patch"])
    elif op == "delete":
        api.delete(cmd["name"])
    elif op == "restart":
        api.restart()
    elif op == "compact":
        api.compact()
    elif op != "get":
        raise ValueError(f"unknown op {op!r}")
    if op not in ("get", "modify"):
        return None
    with api.cond:
        node = api.nodes.get(cmd["name"])
        return copy.deepcopy(node) if node is not None else None


if __name__ == "__main__":
    serve_stdio()
