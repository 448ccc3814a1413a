"""A small fake kubernetes API server: Node objects only (list, get, merge-patch, watch).

The real client talks HTTP to it, so the client's own request building, content types,
deserialization and watch machinery are exercised, not mocks of them. It serves the way
kube-apiserver does: chunked watch streams of one JSON object per line, an ``ERROR`` event with
a 410 Status for an expired resourceVersion, a metav1.Status with every error.

Two ways to use it:

- in-process: ``FakeAPIServer().start()`` serves from a thread; test code plays the other
  cluster actors (kubelet, controller-manager, kubectl) through put/modify/delete;
- as a process (``python k8s_fake_api.py``, e.g. under ``ip netns exec`` so that it listens on
  a network namespace's loopback): it prints ``{"url": ...}`` as its first line, then obeys one
  JSON command per line on stdin, answering each with one JSON line on stdout (see `serve_stdio`).
  It exits when stdin closes.

Standard library only: the process needs nothing but a Python. It lives in pycni.harness so
that `pycnictl bench` can use it too; the recorded Node objects stay test data (tests/data/k8s).
"""

from __future__ import annotations

import copy
import json
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

NODES = "/api/v1/nodes"
MERGE_TYPES = ("application/merge-patch+json", "application/strategic-merge-patch+json")


def status(code: int, reason: str, message: str, name: str | None = None) -> dict:
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
        out["details"] = {"name": name, "kind": "nodes"}
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


class FakeAPIServer:
    """Nodes only: list, get, merge-patch, watch. Test code plays the other cluster actors
    (kubelet, controller-manager, kubectl) through put/modify/delete."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.nodes: dict[str, dict] = {}
        self.rv = 0
        self.events: list[tuple[int, str, dict]] = []
        self.compacted = 0  # watches from a resourceVersion below this get 410 Gone
        self.gone_as_status = False  # 410 as the HTTP status rather than an ERROR event
        self.forbid_patch = False
        self.requests: list[tuple[str, str, str, str]] = []  # method, path, type, auth
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
        for conn in list(self.conns):  # wake handlers parked on a keep-alive connection
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.httpd.server_close()  # joins every handler thread

    # -- cluster state, as other actors change it ----------------------------------------

    def load_list(self, listed: dict) -> None:
        """A recorded NodeList as the initial state, at its resourceVersion."""
        for item in listed["items"]:
            self.nodes[item["metadata"]["name"]] = {"kind": "Node", "apiVersion": "v1", **item}
        self.rv = int(listed["metadata"]["resourceVersion"])

    def _event(self, kind: str, node: dict) -> None:
        """Caller holds cond."""
        self.rv += 1
        node["metadata"]["resourceVersion"] = str(self.rv)
        self.events.append((self.rv, kind, copy.deepcopy(node)))
        self.cond.notify_all()

    def put(self, node: dict) -> None:
        node = copy.deepcopy(node)
        with self.cond:
            name = node["metadata"]["name"]
            kind = "MODIFIED" if name in self.nodes else "ADDED"
            self.nodes[name] = node
            self._event(kind, node)

    def modify(self, name: str, patch: dict) -> None:
        with self.cond:
            node = merge_patch(self.nodes[name], patch)
            self.nodes[name] = node
            self._event("MODIFIED", node)

    def delete(self, name: str) -> None:
        with self.cond:
            self._event("DELETED", self.nodes.pop(name))

    def replay(self, event: dict) -> None:
        """One recorded watch event, applied as if it had happened here."""
        if event["type"] == "DELETED":
            self.delete(event["object"]["metadata"]["name"])
        else:
            self.put(event["object"])

    def compact(self) -> None:
        """etcd compaction: every resourceVersion before now is forgotten."""
        with self.cond:
            self.compacted = self.rv

    def annotations(self, name: str) -> dict[str, str]:
        with self.cond:
            return dict(self.nodes[name]["metadata"].get("annotations", {}))

    def count(self, method: str, watch: bool = False) -> int:
        return sum(
            1 for m, p, _, _ in self.requests if m == method and ("watch=true" in p) == watch
        )


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the handler threads: none outlives a test
    block_on_close = True
    api: FakeAPIServer


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
        super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - base signature
        pass

    def _record(self) -> None:
        self.server.api.requests.append(
            (
                self.command,
                self.path,
                self.headers.get("Content-Type", ""),
                self.headers.get("Authorization", ""),
            )
        )

    def send_json(self, code: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._record()
        api = self.server.api
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if url.path == NODES and query.get("watch", [""])[0] in ("true", "1"):
            return self.watch(
                int(query.get("resourceVersion", ["0"])[0] or 0),
                float(query.get("timeoutSeconds", ["5"])[0]),
            )
        with api.cond:
            if url.path == NODES:
                items = [
                    {k: v for k, v in n.items() if k not in ("kind", "apiVersion")}
                    for _, n in sorted(api.nodes.items())
                ]
                return self.send_json(
                    200,
                    {
                        "kind": "NodeList",
                        "apiVersion": "v1",
                        "metadata": {"resourceVersion": str(api.rv)},
                        "items": items,
                    },
                )
            name = url.path.removeprefix(NODES + "/")
            if url.path.startswith(NODES + "/") and name in api.nodes:
                return self.send_json(200, api.nodes[name])
        self.send_json(404, status(404, "NotFound", f'nodes "{name}" not found', name))

    def do_PATCH(self) -> None:
        self._record()
        api = self.server.api
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        name = urlsplit(self.path).path.removeprefix(NODES + "/")
        ctype = self.headers.get("Content-Type", "").split(";")[0]
        if api.forbid_patch:
            return self.send_json(
                403,
                status(
                    403,
                    "Forbidden",
                    f'nodes "{name}" is forbidden: User "system:serviceaccount:'
                    f'kube-system:pycni" cannot patch resource "nodes" in API group "" at the '
                    "cluster scope",
                    name,
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
            if name not in api.nodes:
                return self.send_json(
                    404, status(404, "NotFound", f'nodes "{name}" not found', name)
                )
            node = merge_patch(api.nodes[name], body)
            if node != api.nodes[name]:  # a no-op patch changes nothing, not even the RV
                api.nodes[name] = node
                api._event("MODIFIED", node)
            return self.send_json(200, node)

    def watch(self, since: int, timeout: float) -> None:
        api = self.server.api
        if since < api.compacted:
            gone = status(410, "Expired", f"too old resource version: {since} ({api.compacted})")
            if api.gone_as_status:
                return self.send_json(410, gone)
            self.begin_stream()
            self.chunk({"type": "ERROR", "object": gone})
            self.chunk(None)
            return
        self.begin_stream()
        deadline = time.monotonic() + timeout
        while True:
            with api.cond:
                pending = [e for e in api.events if e[0] > since]
                if not pending:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or api.stopping:
                        break
                    api.cond.wait(remaining)
                    continue
            for rv, kind, obj in pending:
                if not self.chunk({"type": kind, "object": obj}):
                    return
                since = rv
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


# -- as a process -----------------------------------------------------------------------------


def serve_stdio(stdin=sys.stdin, stdout=sys.stdout) -> None:
    """Serve until stdin closes. Commands, one JSON object a line:

    - ``{"op": "load", "items": [node, ...]}``: the initial state (no watch events);
    - ``{"op": "put", "node": node}``: ADDED, or MODIFIED when the name exists;
    - ``{"op": "modify", "name": n, "patch": merge_patch}``: MODIFIED;
    - ``{"op": "delete", "name": n}``: DELETED;
    - ``{"op": "get", "name": n}``: the node as stored (null when there is none).

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
        with api.cond:
            for item in cmd["items"]:
                api.nodes[item["metadata"]["name"]] = copy.deepcopy(item)
        return None
    if op == "put":
        api.put(cmd["node"])
        return None
    if op == "modify":
        api.modify(cmd["name"], cmd["patch"])
    elif op == "delete":
        api.delete(cmd["name"])
        return None
    elif op != "get":
        raise ValueError(f"unknown op {op!r}")
    with api.cond:
        node = api.nodes.get(cmd["name"])
        return copy.deepcopy(node) if node is not None else None


if __name__ == "__main__":
    serve_stdio()
