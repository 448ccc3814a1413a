"""The KV contract on one SQLite file shared by the agents of a lab (one filesystem, several
processes, possibly in different network namespaces).

Every write is one ``BEGIN IMMEDIATE`` transaction, so SQLite's file lock makes it atomic across
processes. A deleted or expired key stays as a tombstone (value NULL) carrying the revision of
its removal: ``wait`` sees deletions under a prefix the same way as writes, by comparing
``mod`` with the revision it was given.

Time stands still while nobody can write (the file unreachable, or every agent down): each
write records when it was made (``meta.seen``); a lease expires only by the time of the last
write plus a grace (STALL of the TTL), and the first write after a longer silence extends every
lease by that silence, as etcd renews its leases when it comes back. So an outage of the file,
however long, never expires a live node's lease: only a node silent while others write does.
Every live agent writes (its keepalive) every third of the TTL.
"""

from __future__ import annotations

import math
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from .kv import KV, KVError

_POLL = 0.02  # seconds between two looks at the revision in wait(): one row, cheap
_EXPIRY_POLL = 0.5  # seconds between two scans for keys whose lease ran out
_BUSY_MS = 10_000  # how long a write waits for another process's transaction
# A silence of writes longer than this part of the TTL is an outage, not late keepalives:
# with every live agent renewing each third of the TTL, it means two rounds missed by all.
STALL = 2 / 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (id INTEGER PRIMARY KEY CHECK (id = 0), rev INTEGER NOT NULL);
INSERT OR IGNORE INTO meta (id, rev) VALUES (0, 0);
CREATE TABLE IF NOT EXISTS leases (id TEXT PRIMARY KEY, expires REAL NOT NULL);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT,            -- NULL: a tombstone (deleted or expired at revision mod)
    lease TEXT,
    mod INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS kv_lease ON kv (lease);
"""

# A key is live when it has a value and is bound to no lease (put), or its lease row exists
# and has not expired.
_LIVE = (
    "kv.value IS NOT NULL AND (kv.lease IS NULL OR EXISTS "
    "(SELECT 1 FROM leases l WHERE l.id = kv.lease AND l.expires > ?))"
)
_UNDER = "substr(kv.key, 1, ?) = ?"
# list(): each key under a prefix, its value (NULL: a tombstone), whether it is bound to no
# lease, and its lease's expiry (NULL: the lease row is gone).
_ROWS = (
    "SELECT kv.key, kv.value, kv.lease IS NULL, l.expires FROM kv "
    f"LEFT JOIN leases l ON l.id = kv.lease WHERE {_UNDER} AND "
)


def _new_lease() -> str:
    return secrets.token_hex(8)


class SqliteKV(KV):
    """KV on a SQLite file; every client has its own lease, renewed by ``keepalive``."""

    def __init__(self, path: str, ttl: float, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.ttl = float(ttl)
        self._clock = clock
        self._lease = _new_lease()
        self._bound = False  # True once a key was bound to self._lease (its row exists)
        self._lost = False  # a write found our lease expired: keepalive must report it
        # list(): prefix -> (revision, the live keys then, the earliest expiry of their leases)
        self._listed: dict[str, tuple[int, dict[str, str], float]] = {}
        # One connection for the threads of this process; the lock serialises its use.
        self._lock = threading.RLock()
        try:
            self._conn = self._open(path)
        except (OSError, sqlite3.Error) as exc:
            raise KVError(f"cannot open the cluster database {path}: {exc}") from exc

    @staticmethod
    def _open(path: str) -> sqlite3.Connection:
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # Create the file ourselves so that it is 0600 whatever the umask; SQLite gives the
        # -wal and -shm files the database's mode. Only when it is new: closing any descriptor
        # of a file drops every POSIX lock this process holds on it, so opening and closing an
        # existing one would pull the locks from under another connection of this process
        # (and a writer elsewhere, taking itself for the last one, would checkpoint and reset
        # the WAL that connection still reads: it would read a stale revision for ever).
        try:
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            pass
        conn = sqlite3.connect(
            path, timeout=_BUSY_MS / 1000, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {_BUSY_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable enough, much faster
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                columns = {row[1] for row in conn.execute("PRAGMA table_info(meta)")}
                if "seen" not in columns:  # a file from before the outage rule
                    conn.execute("ALTER TABLE meta ADD COLUMN seen REAL")
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except BaseException:
            conn.close()
            raise
        return conn

    # --- transactions ----------------------------------------------------------------------

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A snapshot: every statement inside sees the same state of the file."""
        with self._lock:
            try:
                self._conn.execute("BEGIN")
                try:
                    yield self._conn
                finally:
                    self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise KVError(f"cluster database {self.path}: {exc}") from exc

    @contextmanager
    def _write(self) -> Iterator[_Txn]:
        """An exclusive write transaction that first removes the keys of expired leases."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    txn = _Txn(self._conn, self._clock())
                    txn.resume(self.ttl * STALL)
                    txn.purge()
                    yield txn
                    txn.finish()
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                self._conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise KVError(f"cluster database {self.path}: {exc}") from exc

    def _ensure_lease(self, txn: _Txn) -> str:
        """This client's lease, live: a fresh one when the old one expired under us."""
        row = txn.conn.execute("SELECT expires FROM leases WHERE id = ?", (self._lease,)).fetchone()
        if row is None or row[0] <= txn.now:
            if self._bound:
                # Its keys are gone (purged above); keepalive() tells the owner.
                self._lease, self._lost = _new_lease(), True
            txn.conn.execute(
                "INSERT OR REPLACE INTO leases (id, expires) VALUES (?, ?)",
                (self._lease, txn.now + self.ttl),
            )
        self._bound = True
        return self._lease

    def _now(self, conn: sqlite3.Connection) -> float:
        """The time leases are judged by when reading: the clock, but never more than STALL
        of the TTL past the last write (while nobody writes, time stands still)."""
        now = self._clock()
        seen = conn.execute("SELECT seen FROM meta").fetchone()[0]
        return now if seen is None else min(now, seen + self.ttl * STALL)

    # --- the contract ----------------------------------------------------------------------

    def list(self, prefix: str) -> tuple[dict[str, str], int]:
        """Reads only the keys changed since the last list of ``prefix`` while none of that
        list's leases can have expired: the agent lists thousands of leases on every pass,
        mostly unchanged, and building them again from the file was most of a no-op pass.
        That is exact because every change, a purge of expired keys included, sets the key's
        ``mod`` (tombstones stay), and a live lease's expiry only ever moves later."""
        with self._lock:
            for _ in range(3):  # more than one round only if the clock stepped back meanwhile
                with self._read() as conn:
                    now = self._now(conn)
                    rev = conn.execute("SELECT rev FROM meta").fetchone()[0]
                    last = self._listed.pop(prefix, None)
                    args: tuple = (len(prefix), prefix)
                    if last is not None and last[0] <= rev and last[2] > now:
                        since, values, until = last
                        where, args = "kv.mod > ?", (*args, since)
                    else:
                        values, until = {}, math.inf
                        where = "kv.value IS NOT NULL"
                    rows = conn.execute(_ROWS + where, args).fetchall()
                expired = False
                for key, value, unleased, expires in rows:
                    if value is not None and (unleased or (expires is not None and expires > now)):
                        values[key] = value
                        if not unleased:
                            until = min(until, expires)
                    else:
                        values.pop(key, None)
                        expired = expired or value is not None
                if not expired:
                    if len(self._listed) >= 16:  # a few prefixes are listed again and again
                        self._listed.clear()
                    self._listed[prefix] = (rev, values, until)
                    break
                # Expired keys are still rows: remove them so that the revision we return
                # counts their removal (a wait() from it then does not wake up for it again).
                with self._write():
                    pass
            return dict(values), rev

    def create(self, key: str, value: str) -> bool:
        with self._write() as txn:
            row = txn.conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
            if row is not None and row[0] is not None:
                return False  # live: expired ones were purged by _write
            txn.put(key, value, self._ensure_lease(txn))
            return True

    def put(self, key: str, value: str) -> None:
        with self._write() as txn:
            txn.put(key, value, None)

    def replace(self, key: str, old: str, new: str) -> bool:
        with self._write() as txn:
            row = txn.conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
            if row is None or row[0] != old:
                return False
            txn.put(key, new, self._ensure_lease(txn))  # rebinds the key to our lease
            return True

    def delete(self, key: str, old: str | None = None) -> bool:
        with self._write() as txn:
            row = txn.conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
            if row is None or row[0] is None or (old is not None and row[0] != old):
                return False
            txn.tombstone("key = ?", (key,))
            return True

    def keepalive(self) -> bool:
        with self._write() as txn:
            lost, self._lost = self._lost, False
            if not self._bound:
                return not lost  # nothing bound yet: nothing to lose
            renewed = txn.conn.execute(
                "UPDATE leases SET expires = ? WHERE id = ? AND expires > ?",
                (txn.now + self.ttl, self._lease, txn.now),
            ).rowcount
            if not renewed:
                # Expired (and purged with its keys): the next create binds to a fresh lease.
                self._lease, self._bound = _new_lease(), False
                return False
            return not lost

    def wait(self, prefix: str, revision: int, timeout: float) -> int:
        """Polls the file; returns ``revision`` itself when nothing under ``prefix`` changed."""
        deadline = time.monotonic() + timeout
        seen_rev, next_expiry_scan = None, 0.0
        while True:
            expired = None
            with self._read() as conn:
                rev = conn.execute("SELECT rev FROM meta").fetchone()[0]
                if rev != seen_rev:  # something changed somewhere: was it under prefix?
                    seen_rev = rev
                    changed = conn.execute(
                        f"SELECT max(mod) FROM kv WHERE {_UNDER}", (len(prefix), prefix)
                    ).fetchone()[0]
                    if changed is not None and changed > revision:
                        return rev
                if time.monotonic() >= next_expiry_scan:
                    next_expiry_scan = time.monotonic() + _EXPIRY_POLL
                    expired = conn.execute(
                        f"SELECT 1 FROM kv WHERE kv.value IS NOT NULL AND {_UNDER} AND "
                        f"NOT ({_LIVE}) LIMIT 1",
                        (len(prefix), prefix, self._now(conn)),
                    ).fetchone()
            if expired:
                # Nobody wrote since that key expired: purge it ourselves, which is the change.
                with self._write():
                    pass
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return revision
            time.sleep(min(_POLL, remaining))

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class _Txn:
    """One write transaction: at most one revision bump, shared by all its changes."""

    def __init__(self, conn: sqlite3.Connection, now: float) -> None:
        self.conn = conn
        self.now = now
        self._rev: int | None = None

    def rev(self) -> int:
        if self._rev is None:
            self._rev = self.conn.execute("SELECT rev FROM meta").fetchone()[0] + 1
        return self._rev

    def put(self, key: str, value: str, lease: str | None) -> None:
        self.conn.execute(
            "INSERT INTO kv (key, value, lease, mod) VALUES (?, ?, ?, ?) ON CONFLICT (key) "
            "DO UPDATE SET value = excluded.value, lease = excluded.lease, mod = excluded.mod",
            (key, value, lease, self.rev()),
        )

    def tombstone(self, where: str, args: tuple) -> int:
        return self.conn.execute(
            "UPDATE kv SET value = NULL, lease = NULL, mod = ? "
            f"WHERE value IS NOT NULL AND {where}",
            (self.rev(), *args),
        ).rowcount

    def resume(self, stall: float) -> None:
        """Record this write's time; after a silence longer than ``stall`` (nobody could
        write), first extend every lease by the silence, so that none expires for it."""
        seen = self.conn.execute("SELECT seen FROM meta").fetchone()[0]
        if seen is not None and self.now - seen > stall:
            self.conn.execute("UPDATE leases SET expires = expires + ?", (self.now - seen,))
        if seen is None or self.now > seen:
            self.conn.execute("UPDATE meta SET seen = ?", (self.now,))

    def purge(self) -> None:
        """Remove the keys of expired leases (and the leases)."""
        # Keys put without a lease never expire.
        expired = (
            "lease IS NOT NULL AND NOT EXISTS "
            "(SELECT 1 FROM leases l WHERE l.id = kv.lease AND l.expires > ?)"
        )
        dead = self.conn.execute(
            f"SELECT 1 FROM kv WHERE value IS NOT NULL AND {expired} LIMIT 1", (self.now,)
        ).fetchone()
        if dead:
            self.tombstone(expired, (self.now,))
        self.conn.execute("DELETE FROM leases WHERE expires <= ?", (self.now,))

    def finish(self) -> None:
        if self._rev is not None:
            self.conn.execute("UPDATE meta SET rev = ?", (self._rev,))
