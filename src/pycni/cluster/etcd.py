"""The KV contract on etcd v3, through its JSON gateway (the ``etcd3gw`` package).

A client grants one etcd lease on its first write; every key it creates or replaces is put with
that lease, so when the agent stops renewing it etcd deletes the keys and every watcher sees it.
Writes are transactions that also read the key on failure, which makes a write retried on the
next endpoint (after a connection error that hid its success) report the right answer.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import re
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
import urllib3.exceptions
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import (
    ConnectionFailedError,
    ConnectionTimeoutError,
    Etcd3Exception,
)

from .kv import KV, KVError

T = TypeVar("T")


def _b64(data: str | bytes) -> str:
    # etcd3gw's own encoder turns str into latin-1 (and fails on anything else): use UTF-8.
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def _unb64(data: str | None) -> str:
    return base64.b64decode(data or "").decode()


def _range_end(prefix: str) -> bytes:
    """The first key after every key starting with ``prefix`` (etcd's prefix range)."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b"\0"  # the empty prefix: every key
    raw[-1] += 1
    return bytes(raw)


def _short(exc: BaseException | str) -> str:
    """The useful end of a requests/urllib3 error chain ("Connection refused")."""
    text = str(exc)
    m = re.search(r"\[Errno -?\d+\] ([^'\"\)]+)", text)
    if m:
        return m.group(1).strip()
    if "timed out" in text:
        return "timed out"
    return text


def parse_endpoints(endpoints: str | list[str]) -> list[tuple[str, str, int]]:
    """``"http://h:2379,http://g:2379"`` or a list -> [(protocol, host, port)]."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out = []
    for item in (e.strip() for e in items):
        if not item:
            continue
        url = urlsplit(item if "://" in item else "http://" + item)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"bad etcd endpoint {item!r} (want http://host:port)")
        out.append((url.scheme, url.hostname, url.port or 2379))
    if not out:
        raise ValueError("no etcd endpoint given")
    return out


class EtcdKV(KV):
    """KV on etcd; ``endpoints`` are tried in order when one cannot be reached."""

    def __init__(self, endpoints: str | list[str], ttl: float, timeout: float = 5.0) -> None:
        self.ttl = float(ttl)
        self.timeout = timeout
        # The gateway answers at /v3/ from etcd 3.4 on; naming it saves a /version round trip.
        self._clients = [
            Etcd3Client(host=host, port=port, protocol=proto, timeout=timeout, api_path="/v3/")
            for proto, host, port in parse_endpoints(endpoints)
        ]
        self._current = 0  # the endpoint that answered last
        self._lease: int | None = None
        self._lost = False  # a write found our lease gone: keepalive must report it
        self._lock = threading.Lock()

    # --- plumbing --------------------------------------------------------------------------

    @staticmethod
    def _name(client: Etcd3Client) -> str:
        return client.base_url

    def _call(self, what: str, fn: Callable[[Etcd3Client], T]) -> T:
        """``fn`` on the current endpoint, moving to the next ones on connection errors."""
        n = len(self._clients)
        errors = []
        start = self._current
        for i in range(n):
            client = self._clients[(start + i) % n]
            try:
                result = fn(client)
            except (
                ConnectionFailedError,
                ConnectionTimeoutError,
                requests.exceptions.ConnectionError,
                requests.exceptions.Timeout,
            ) as exc:
                detail = exc.detail_text if isinstance(exc, Etcd3Exception) else exc
                errors.append(f"{self._name(client)}: {_short(detail or exc)}")
                continue
            except Etcd3Exception as exc:
                raise KVError(
                    f"etcd at {self._name(client)}: {what} failed: {_gateway_error(exc)}"
                ) from exc
            except requests.exceptions.RequestException as exc:
                raise KVError(f"etcd at {self._name(client)}: {what} failed: {exc}") from exc
            self._current = (start + i) % n
            return result
        raise KVError(f"etcd unreachable ({what}): {'; '.join(errors)}")

    def _post(self, client: Etcd3Client, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return client.post(client.get_url(path), json=body)

    def _grant(self, client: Etcd3Client) -> int:
        result = self._post(client, "/lease/grant", {"TTL": max(1, math.ceil(self.ttl)), "ID": 0})
        if result.get("error"):
            raise Etcd3Exception(result["error"], "lease grant refused")
        return int(result["ID"])

    def _write(
        self,
        what: str,
        key: str,
        ops: Callable[[int], dict[str, Any]],
        done: Callable[[dict[str, Any], int], bool],
    ) -> bool:
        """Run the txn ``ops(lease)``; a lease etcd no longer knows is replaced once."""
        for attempt in range(2):
            with self._lock:
                if self._lease is None:
                    self._lease = self._call("lease grant", self._grant)
                lease = self._lease
            try:
                result = self._call(
                    f"{what} {key}", lambda c, lease=lease: self._post(c, "/kv/txn", ops(lease))
                )
            except KVError as exc:
                if attempt == 0 and "lease not found" in str(exc):
                    with self._lock:
                        if self._lease == lease:  # expired under us: its keys are gone
                            self._lease, self._lost = None, True
                    continue
                raise
            return done(result, lease)
        raise AssertionError("unreachable")

    # --- the contract ----------------------------------------------------------------------

    def list(self, prefix: str) -> tuple[dict[str, str], int]:
        body = {"key": _b64(prefix), "range_end": _b64(_range_end(prefix))}
        result = self._call(f"list {prefix}", lambda c: self._post(c, "/kv/range", body))
        kvs = result.get("kvs", [])
        return (
            {_unb64(kv["key"]): _unb64(kv.get("value")) for kv in kvs},
            int(result["header"]["revision"]),
        )

    def create(self, key: str, value: str) -> bool:
        k, v = _b64(key), _b64(value)

        def ops(lease: int) -> dict[str, Any]:
            return {
                "compare": [
                    {"key": k, "result": "EQUAL", "target": "CREATE", "create_revision": 0}
                ],
                "success": [{"request_put": {"key": k, "value": v, "lease": lease}}],
                "failure": [{"request_range": {"key": k}}],
            }

        return self._write("create", key, ops, lambda r, lease: _won(r, v, lease))

    def put(self, key: str, value: str) -> None:
        body = {"key": _b64(key), "value": _b64(value)}  # no lease: it stays until deleted
        self._call(f"put {key}", lambda c: self._post(c, "/kv/put", body))

    def replace(self, key: str, old: str, new: str) -> bool:
        k, o, n = _b64(key), _b64(old), _b64(new)

        def ops(lease: int) -> dict[str, Any]:
            # The put names our lease: the key now lives as long as this client does.
            return {
                "compare": [{"key": k, "result": "EQUAL", "target": "VALUE", "value": o}],
                "success": [{"request_put": {"key": k, "value": n, "lease": lease}}],
                "failure": [{"request_range": {"key": k}}],
            }

        return self._write("replace", key, ops, lambda r, lease: _won(r, n, lease))

    def delete(self, key: str, old: str | None = None) -> bool:
        k = _b64(key)
        compare = (
            []
            if old is None
            else [{"key": k, "result": "EQUAL", "target": "VALUE", "value": _b64(old)}]
        )
        body = {
            "compare": compare,
            "success": [{"request_delete_range": {"key": k}}],
            "failure": [],
        }
        result = self._call(f"delete {key}", lambda c: self._post(c, "/kv/txn", body))
        if not result.get("succeeded"):
            return False
        resp = result.get("responses", [{}])[0].get("response_delete_range", {})
        return int(resp.get("deleted", 0)) > 0

    def keepalive(self) -> bool:
        with self._lock:
            lease, lost, self._lost = self._lease, self._lost, False
        if lease is None:
            return not lost  # nothing granted yet (or already forgotten): nothing to renew
        result = self._call("keepalive", lambda c: self._post(c, "/lease/keepalive", {"ID": lease}))
        # An expired lease answers without TTL (zero values are left out of the JSON).
        if int(result.get("result", {}).get("TTL", 0)) <= 0:
            with self._lock:
                if self._lease == lease:
                    self._lease = None  # the next create grants a fresh one
            return False
        return not lost

    def wait(self, prefix: str, revision: int, timeout: float) -> int:
        """A watch from ``revision + 1``: past changes are replayed, so none is missed.
        Returns ``revision`` itself when nothing under ``prefix`` changed in time."""
        body = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": _b64(_range_end(prefix)),
                "start_revision": revision + 1,
            }
        }
        deadline = time.monotonic() + timeout
        return self._call(f"watch {prefix}", lambda c: self._watch(c, body, revision, deadline))

    def _watch(
        self, client: Etcd3Client, body: dict[str, Any], revision: int, deadline: float
    ) -> int:
        # Not etcd3gw's watch: it has no timeout, leaves a thread reading the stream, and its
        # stop() closes every pooled connection of the session. Here the stream is read in
        # this thread, with the socket's read timeout as the wait's timeout.
        read_timeout = max(deadline - time.monotonic(), 0.05)
        try:
            resp = client.session.post(
                client.get_url("/watch"),
                json=body,
                stream=True,
                timeout=(self.timeout, read_timeout),
            )
        except requests.exceptions.ReadTimeout:
            return revision  # connected, but the timeout ran out before the first answer
        with contextlib.closing(resp):  # closes the socket: the server drops the watch
            if resp.status_code != 200:
                raise Etcd3Exception(resp.text, resp.reason)
            try:
                for line in resp.iter_lines():
                    if not line.strip():
                        continue
                    message = json.loads(line)
                    if "error" in message:
                        raise Etcd3Exception(json.dumps(message["error"]), "watch failed")
                    result = message.get("result", {})
                    rev = int(result.get("header", {}).get("revision", 0))
                    if result.get("events") or result.get("canceled"):
                        # canceled: the revision was compacted away; the caller lists again.
                        return max(rev, revision + 1)
                    if time.monotonic() >= deadline:
                        return revision
            except requests.exceptions.ConnectionError as exc:
                if _is_read_timeout(exc):
                    return revision  # the timeout: nothing changed
                raise
        raise requests.exceptions.ConnectionError("the watch stream ended")

    def close(self) -> None:
        for client in self._clients:
            client.session.close()


def _is_read_timeout(exc: BaseException) -> bool:
    return any(isinstance(a, urllib3.exceptions.ReadTimeoutError) for a in exc.args) or isinstance(
        exc, requests.exceptions.ReadTimeout
    )


def _won(result: dict[str, Any], value: str, lease: int) -> bool:
    """A txn's outcome; a failed one whose key already holds our value bound to our lease was
    a retry of a write that had succeeded."""
    if result.get("succeeded"):
        return True
    try:
        kv = result["responses"][0]["response_range"]["kvs"][0]
    except (KeyError, IndexError):
        return False
    return kv.get("value") == value and int(kv.get("lease", 0)) == lease


def _gateway_error(exc: Etcd3Exception) -> str:
    """etcd's own message from the gateway's JSON error body, else the HTTP reason."""
    detail = exc.detail_text or ""
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        data = json.loads(detail)
        detail = data.get("error") or data.get("message") or detail
    reason = " ".join(str(a) for a in exc.args)
    return f"{detail} ({reason})" if reason and detail else (detail or reason or repr(exc))
