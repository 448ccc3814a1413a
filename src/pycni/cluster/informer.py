"""One kind of Kubernetes object kept current in memory, the way client-go's informers do it.

Why: the agent used to open a new watch every 0.5-1 s and list every node at least every 10 s,
about 7,600 requests per agent per hour (issue 19). An Informer lists the kind once, then keeps
ONE watch open from the list's resourceVersion, with bookmarks, for a random 5-10 minutes, the
way client-go's reflector asks; when the server ends it, the next one resumes from the last
resourceVersion seen (bookmarks keep that fresh through quiet periods), so nothing is listed
again and no event is lost. It lists again only when the server says that resourceVersion is
gone (410) or after an API error. Failures back off (1 s doubling to 30 s, jittered), so an
outage does not make it spin, and a connection that merely dropped (an API server restart, a
load balancer) resumes from where it was.

It knows nothing of nodes, so the node watch and the NetworkPolicy watches (Pods, Namespaces,
NetworkPolicies) are four instances of one mechanism: the caller gives the official client's
list function (``CoreV1Api.list_node``, ``list_namespace``, ``list_pod_for_all_namespaces``,
``NetworkingV1Api.list_network_policy_for_all_namespaces``) and a pure ``derive(obj)`` that
turns an object into the record kept (None: not kept, as if absent). Readers take snapshots;
waiters block on a change counter that moves only when a kept record changes, so a kubelet's
status heartbeat that changes nothing the caller keeps wakes nobody.

One daemon thread per informer does all the talking; ``stop()`` ends it promptly by shutting
the watch's socket from the caller's thread, not by waiting for a short watch to time out.
The official client is imported when the informer starts, never when this module is imported.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

log = logging.getLogger("pycni")

R = TypeVar("R")

# client-go's reflector: a watch asks for a random timeout between minWatchTimeout (5 min)
# and twice that, so that watches spread out and their renewals do not come in waves.
WATCH_TIMEOUT = (300.0, 600.0)
BACKOFF = (1.0, 30.0)  # seconds: first delay after a failure, and the cap of the doubling
# A watch that ends this soon having delivered nothing is treated as a failure (client-go's
# "very short watch"), so a server that closes watches at once cannot make us spin.
SHORT_WATCH = 1.0
# Beyond the watch's own timeout: how long a silent connection may stay before it counts as
# dead (the server ends every watch at its timeout, so only a vanished peer gets here).
READ_GRACE = 30.0


@dataclass(frozen=True)
class Failure:
    """The last thing that went wrong: which request ("list nodes") and the exception."""

    what: str
    error: BaseException


class Gone(Exception):
    """The watch's resourceVersion was compacted away (410): only a new list can go on."""


def object_key(obj: Any) -> str:
    """client-go's MetaNamespaceKeyFunc: ``namespace/name``, or ``name`` for cluster objects."""
    meta = obj.metadata
    return f"{meta.namespace}/{meta.name}" if meta.namespace else meta.name


class Informer(Generic[R]):
    """The records of one kind of object, kept current by one long-lived watch.

    ``kind`` names the resource in messages and errors ("nodes"). ``list_fn`` is the official
    client's list function for it; ``derive(obj)`` the record kept for an object (None: not
    kept). ``watch_timeout``, ``backoff`` and ``request_timeout`` are seconds (tests and the
    benchmark shorten them)."""

    def __init__(
        self,
        kind: str,
        list_fn: Callable[..., Any],
        derive: Callable[[Any], R | None],
        *,
        key: Callable[[Any], str] = object_key,
        watch_timeout: tuple[float, float] = WATCH_TIMEOUT,
        backoff: tuple[float, float] = BACKOFF,
        request_timeout: tuple[float, float] = (5.0, 30.0),
    ) -> None:
        self.kind = kind
        self._list_fn = list_fn
        self._derive = derive
        self._key = key
        self.watch_timeout = watch_timeout
        self.backoff = backoff
        self.request_timeout = request_timeout
        self._cond = threading.Condition()
        self._cache: dict[str, R] = {}
        self._version = 0  # moves whenever a kept record changes
        self._synced = False  # a list has been applied (client-go's HasSynced)
        self._failure: Failure | None = None  # since the last success
        self.resource_version: str | None = None  # where the next watch resumes; None: list
        # What it did, by request and by outcome: lists, relists (after 410), watches, resumes
        # (after a dropped connection), events, bookmarks, failures.
        self.stats: Counter[str] = Counter()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._resp_lock = threading.Lock()
        self._resp: Any = None  # the open watch's response, for stop() to cut
        self._parser: Any = None  # the client's Watch, for its event parsing
        self._return_type: Any = None

    # -- life cycle -----------------------------------------------------------------------

    def seed(self, listed: Any) -> Informer[R]:
        """Before start(): go on from what ``list_fn`` returned to the caller a moment ago
        (watching from its resourceVersion) instead of listing again."""
        self._apply_list(listed)
        return self

    def start(self) -> Informer[R]:
        from kubernetes.watch import Watch

        # The client's own event parsing (models, bookmarks); we drive the requests ourselves
        # so that we know when a watch is open and can cut it from another thread.
        self._parser = Watch()
        self._return_type = self._parser.get_return_type(self._list_fn)
        self._thread = threading.Thread(target=self._run, name=f"informer-{self.kind}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 2.0) -> bool:
        """End the thread: shut the open watch's socket rather than wait for it to time out.
        True when it ended within ``timeout`` (a list in flight is not interrupted)."""
        self._stopping.set()
        with self._cond:
            self._cond.notify_all()
        with self._resp_lock:
            _cut(self._resp)
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def stopped(self) -> bool:
        return self._stopping.is_set()

    # -- reading --------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """A list has been applied: the cache holds the kind's objects (maybe stale since)."""
        return self._synced

    @property
    def healthy(self) -> bool:
        """Synced, and nothing has failed since the last list or watch that succeeded: the
        cache is as current as the watch, so reading it is as good as asking the server."""
        return self._synced and self._failure is None

    @property
    def failure(self) -> Failure | None:
        return self._failure

    @property
    def version(self) -> int:
        return self._version

    def snapshot(self) -> tuple[int, dict[str, R]]:
        """The change counter and a copy of the records, taken together."""
        with self._cond:
            return self._version, dict(self._cache)

    def get(self, key: str) -> R | None:
        with self._cond:
            return self._cache.get(key)

    # -- waiting --------------------------------------------------------------------------

    def wait_changed(self, since: int, timeout: float) -> int:
        """Block until the change counter differs from ``since``, ``timeout`` passes or the
        informer stops; the counter then."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._version == since and not self._stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._version

    def wait_synced(self, timeout: float) -> bool:
        """Block until the first list is applied, an attempt fails or ``timeout`` passes;
        whether it is synced."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._synced and self._failure is None and not self._stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            return self._synced

    def wait_until(self, check: Callable[[Mapping[str, R]], bool], timeout: float) -> bool:
        """Block until ``check(records)`` holds (evaluated at every change) or ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not check(self._cache):
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping.is_set():
                    return False
                self._cond.wait(left)
            return True

    # -- the thread -----------------------------------------------------------------------

    def _run(self) -> None:
        from kubernetes.client import ApiException
        from urllib3.exceptions import HTTPError

        failures = 0
        while not self._stopping.is_set():
            what, listed = f"list {self.kind}", False
            try:
                if self.resource_version is None:
                    self._list()
                    listed = True
                what = f"watch {self.kind}"
                if self._watch():
                    failures = 0
                    continue  # the server ended it (its timeout): resume at once
                # Ended at once with nothing: a server that does not really watch.
                error: BaseException = RuntimeError("the watch ended as soon as it began")
            except Gone as e:
                # Compacted: list again. Events after our version are not lost: the list is
                # newer than all of them.
                self.stats["relists"] += 1
                self.resource_version = None
                if not listed:
                    continue  # at once: the version we resumed from was merely old
                error = e  # gone right after a list: a confused server, do not spin on it
            except HTTPError as e:
                # Refused, reset, timed out: the API server is away or restarting. Our
                # resourceVersion is still good; the next watch resumes from it (or gets 410).
                error = e
            except ApiException as e:
                error = e  # an API error: what we hold may be incomplete, so list again
                self.resource_version = None
            except Exception as e:  # a bug or a surprise: never let the thread die
                error = e
                self.resource_version = None
            if self._stopping.is_set():
                break
            failures += 1
            delay = min(self.backoff[1], self.backoff[0] * 2 ** (failures - 1))
            delay *= random.uniform(0.5, 1.0)  # so that many agents do not come back at once
            self._fail(what, error)
            log.warning("%s: %s (retrying in %.1f s)", what, _brief(error), delay)
            self._stopping.wait(delay)

    def _list(self) -> None:
        # No resourceVersion: a consistent read, so a relist after 410 is never older than
        # the version that was gone.
        listed = self._list_fn(_request_timeout=self.request_timeout)
        self.stats["lists"] += 1
        self._apply_list(listed)

    def _apply_list(self, listed: Any) -> None:
        records = {}
        for obj in listed.items or ():
            record = self._derive(obj)
            if record is not None:
                records[self._key(obj)] = record
        with self._cond:
            if records != self._cache:
                self._cache = records
                self._changed()
            self._synced, self._failure = True, None
            self._cond.notify_all()
        self.resource_version = listed.metadata.resource_version

    def _watch(self) -> bool:
        """One watch from resource_version until the server ends it. False when it ended at
        once having delivered nothing. Raises Gone on 410, the client's exceptions else."""
        from kubernetes.client import ApiException
        from kubernetes.watch.watch import iter_resp_lines
        from urllib3.exceptions import HTTPError

        low, high = self.watch_timeout
        seconds = max(1, round(random.uniform(low, high)))
        began = time.monotonic()
        try:
            resp = self._list_fn(
                watch=True,
                resource_version=self.resource_version,
                allow_watch_bookmarks=True,
                timeout_seconds=seconds,
                _preload_content=False,
                _request_timeout=(self.request_timeout[0], seconds + READ_GRACE),
            )
        except ApiException as e:
            if e.status == 410:  # as an HTTP status rather than an ERROR event
                raise Gone(e.reason) from e
            raise
        with self._resp_lock:
            if self._stopping.is_set():
                resp.close()
                return True
            self._resp = resp
        self.stats["watches"] += 1
        if self._failure is not None:
            with self._cond:
                self._failure = None  # connected again: the cache is as current as the watch
        delivered = False
        try:
            for line in iter_resp_lines(resp):
                if self._stopping.is_set():
                    break
                delivered = self._handle(line) or delivered
        except (HTTPError, OSError):
            if self._stopping.is_set():
                return True
            if delivered or time.monotonic() - began >= SHORT_WATCH:
                # An established watch whose connection dropped: resume from where it was.
                self.stats["resumes"] += 1
                return True
            raise
        finally:
            with self._resp_lock:
                self._resp = None
            resp.close()
            resp.release_conn()
        return delivered or time.monotonic() - began >= SHORT_WATCH

    def _handle(self, line: str) -> bool:
        """Apply one line of the watch stream; whether it was an event."""
        event = self._parser.unmarshal_event(line, self._return_type)
        if not isinstance(event, dict):
            return False
        kind = event.get("type")
        if kind == "ERROR":
            from kubernetes.client import ApiException

            status = event.get("raw_object") or {}
            if status.get("code") == 410:
                raise Gone(status.get("message", ""))
            raise ApiException(
                status=status.get("code"), reason=f"{status.get('reason')}: {status.get('message')}"
            )
        if kind == "BOOKMARK":
            self.stats["bookmarks"] += 1
        elif kind in ("ADDED", "MODIFIED", "DELETED"):
            self.stats["events"] += 1
            self._apply(kind, event["object"])
        else:
            return False
        # The client's parser keeps the version of the last object or bookmark it read.
        self.resource_version = self._parser.resource_version or self.resource_version
        return True

    def _apply(self, kind: str, obj: Any) -> None:
        key = self._key(obj)
        record = None if kind == "DELETED" else self._derive(obj)
        with self._cond:
            old = self._cache.get(key)
            if record is None:
                self._cache.pop(key, None)
            else:
                self._cache[key] = record
            if record != old:
                self._changed()

    def _changed(self) -> None:
        """Caller holds _cond."""
        self._version += 1
        self._cond.notify_all()

    def _fail(self, what: str, error: BaseException) -> None:
        self.stats["failures"] += 1
        with self._cond:
            self._failure = Failure(what, error)
            self._cond.notify_all()


def _cut(resp: Any) -> None:
    """Shut the socket under an open response, so a read blocked on it returns at once (the
    client's Watch.stop does the same; closing would wait for the reader's locks)."""
    if resp is None:
        return
    conn = getattr(resp, "connection", None)
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _brief(error: BaseException) -> str:
    return str(getattr(error, "reason", None) or error) or type(error).__name__
