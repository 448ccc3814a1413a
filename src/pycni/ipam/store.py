"""Persistent IPAM state in SQLite: attachments, their addresses, and small shared tables.

Every CNI invocation is its own process, so all mutual exclusion comes from SQLite:
writes run in BEGIN IMMEDIATE transactions (one writer at a time, waiting up to
busy_timeout), and WAL keeps readers from blocking writers. A crash mid-ADD simply
rolls back, so no address can leak half-recorded.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field

from pycni.cni.errors import (
    ADDRESS_UNAVAILABLE,
    ATTACHMENT_EXISTS,
    IO_FAILURE,
    POOL_EXHAUSTED,
    TRY_AGAIN_LATER,
    CniError,
)
from pycni.ipam.ranges import Address, RangeSet

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 30000

_SCHEMA = """
CREATE TABLE attachments (
    id           INTEGER PRIMARY KEY,
    network      TEXT NOT NULL,
    container_id TEXT NOT NULL,
    ifname       TEXT NOT NULL,
    host_veth    TEXT NOT NULL,
    netns        TEXT NOT NULL,
    created      REAL NOT NULL,
    UNIQUE (network, container_id, ifname)
);
CREATE TABLE allocations (
    attachment_id INTEGER NOT NULL REFERENCES attachments (id) ON DELETE CASCADE,
    seq           INTEGER NOT NULL,
    network       TEXT NOT NULL,
    ip            TEXT NOT NULL,
    prefixlen     INTEGER NOT NULL,
    gateway       TEXT,
    range_set     TEXT NOT NULL,
    UNIQUE (network, ip)
);
CREATE INDEX allocations_attachment ON allocations (attachment_id);
CREATE INDEX allocations_range_set ON allocations (network, range_set);
CREATE TABLE last_reserved (
    network   TEXT NOT NULL,
    range_set TEXT NOT NULL,
    ip        TEXT NOT NULL,
    PRIMARY KEY (network, range_set)
);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE networks (name TEXT PRIMARY KEY, info TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Allocation:
    ip: Address
    prefixlen: int
    gateway: Address | None
    range_set: str  # RangeSet.key


@dataclass
class Attachment:
    network: str
    container_id: str
    ifname: str
    host_veth: str
    netns: str
    created: float
    allocations: list[Allocation] = field(default_factory=list)


class Store:
    def __init__(self, data_dir: str, writer_lock: AbstractContextManager | None = None):
        self.path = os.path.join(data_dir, "pycni.db")
        self._conn: sqlite3.Connection | None = None
        # Threads of one process (the agent) queue for writes on this lock, which wakes the
        # next one at once; SQLite's busy handler would have them sleep up to 100 ms a try.
        self._writer_lock = writer_lock if writer_lock is not None else nullcontext()
        try:
            os.makedirs(data_dir, 0o700, exist_ok=True)
            # Create the file ourselves so it is never world-readable, even briefly. Never
            # open and close an existing database outside SQLite: closing any descriptor of
            # it drops every POSIX lock this process holds on it, including those of other
            # open connections (the agent keeps one per thread). A one-shot plugin closing
            # next would then think itself the last user and delete the WAL under them,
            # losing every write they make afterwards.
            try:
                os.close(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                pass
            os.chmod(self.path, 0o600)
            self._conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._set_wal()
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            with self.transaction():
                version = self._conn.execute("PRAGMA user_version").fetchone()[0]
                if version == 0:
                    for stmt in _SCHEMA.split(";"):
                        if stmt.strip():
                            self._conn.execute(stmt)
                    self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                elif version != SCHEMA_VERSION:
                    raise CniError(
                        IO_FAILURE,
                        f"IPAM database {self.path} has schema version {version}, "
                        f"this pycni understands {SCHEMA_VERSION}",
                    )
        except (sqlite3.Error, OSError) as e:
            self.close()
            raise self._error(e, "cannot open IPAM database") from e
        except CniError:
            self.close()
            raise

    def _set_wal(self) -> None:
        # Switching a fresh database to WAL can report "locked" without going through the
        # busy handler when many processes open it at once, so retry by hand.
        assert self._conn is not None
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                self._conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if not _is_busy(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise CniError(IO_FAILURE, f"IPAM database {self.path} is closed")
        return self._conn

    def _error(self, e: BaseException, what: str = "IPAM database error") -> CniError:
        if isinstance(e, sqlite3.OperationalError) and _is_busy(e):
            return CniError(
                TRY_AGAIN_LATER, f"IPAM database {self.path} is busy ({e}); try again later"
            )
        return CniError(IO_FAILURE, f"{what}: {self.path}: {e}")

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One BEGIN IMMEDIATE transaction; nested use joins the open one."""
        with self._transaction("BEGIN IMMEDIATE", self._writer_lock):
            yield

    def _read(self) -> AbstractContextManager[sqlite3.Connection]:
        """A deferred (snapshot) transaction for multi-statement reads; no write lock taken."""
        return self._transaction("BEGIN", nullcontext())

    @contextmanager
    def _transaction(
        self, begin: str, lock: AbstractContextManager
    ) -> Iterator[sqlite3.Connection]:
        conn = self.conn
        if conn.in_transaction:
            yield conn
            return
        try:
            with lock:
                conn.execute(begin)
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    self._rollback()
                    raise
        except sqlite3.Error as e:
            raise self._error(e) from e

    def _rollback(self) -> None:
        if self._conn is not None and self._conn.in_transaction:
            try:
                self._conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the original error matters more; SQLite rolls back on close anyway

    # --- attachments -------------------------------------------------------------------

    def add_attachment(
        self,
        network: str,
        container_id: str,
        ifname: str,
        host_veth: str,
        netns: str,
        range_sets: list[RangeSet],
        requested: list[Address],
    ) -> list[Allocation]:
        with self.transaction():
            conn = self.conn
            if self._attachment_id(network, container_id, ifname) is not None:
                raise CniError(
                    ATTACHMENT_EXISTS,
                    f"container {container_id} already has an attachment on interface "
                    f"{ifname} in network {network}; DEL it first",
                )
            held = dict(
                conn.execute(
                    "SELECT al.ip, at.container_id FROM allocations al"
                    " JOIN attachments at ON at.id = al.attachment_id WHERE al.network = ?",
                    (network,),
                ).fetchall()
            )
            chosen: dict[int, Address] = {}
            for ip in requested:
                i = self._check_requested(network, range_sets, held, ip)
                if i in chosen:
                    raise CniError(
                        ADDRESS_UNAVAILABLE,
                        f"requested addresses {chosen[i]} and {ip} are both in range set "
                        f"{range_sets[i].key} of network {network}; request at most one each",
                    )
                chosen[i] = ip

            allocs: list[Allocation] = []
            for i, rs in enumerate(range_sets):
                ip = chosen[i] if i in chosen else self._pick(network, rs, held)
                r = rs.find(ip)
                assert r is not None
                held[str(ip)] = container_id
                allocs.append(Allocation(ip, r.subnet.prefixlen, r.gateway, rs.key))

            cur = conn.execute(
                "INSERT INTO attachments (network, container_id, ifname, host_veth, netns,"
                " created) VALUES (?, ?, ?, ?, ?, ?)",
                (network, container_id, ifname, host_veth, netns, time.time()),
            )
            att_id = cur.lastrowid
            for seq, a in enumerate(allocs):
                conn.execute(
                    "INSERT INTO allocations (attachment_id, seq, network, ip, prefixlen,"
                    " gateway, range_set) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (att_id, seq, network, str(a.ip), a.prefixlen, _str(a.gateway), a.range_set),
                )
                # Requested addresses move the cursor too, as in host-local.
                conn.execute(
                    "INSERT OR REPLACE INTO last_reserved (network, range_set, ip)"
                    " VALUES (?, ?, ?)",
                    (network, a.range_set, str(a.ip)),
                )
            return allocs

    def _check_requested(
        self, network: str, range_sets: list[RangeSet], held: dict[str, str], ip: Address
    ) -> int:
        """Index of the range set that can give out requested `ip`, or raise why not."""
        hits = [i for i, rs in enumerate(range_sets) if rs.find(ip) is not None]
        if len(hits) != 1:
            raise CniError(
                ADDRESS_UNAVAILABLE,
                f"requested address {ip} is not in any range of network {network}",
            )
        r = range_sets[hits[0]].find(ip)
        assert r is not None
        if r.is_reserved(ip):
            raise CniError(
                ADDRESS_UNAVAILABLE,
                f"requested address {ip} is reserved (network, broadcast or gateway address "
                f"of {r.subnet}) in network {network}",
            )
        if str(ip) in held:
            raise CniError(
                ADDRESS_UNAVAILABLE,
                f"requested address {ip} is already in use by container {held[str(ip)]} "
                f"in network {network}",
            )
        return hits[0]

    def _pick(self, network: str, rs: RangeSet, held: dict[str, str]) -> Address:
        row = self.conn.execute(
            "SELECT ip FROM last_reserved WHERE network = ? AND range_set = ?",
            (network, rs.key),
        ).fetchone()
        after = _parse_ip(row[0]) if row else None
        capacity = rs.capacity()
        # Cheap exhaustion test first, so a full large pool is not walked address by address.
        in_set = sum(1 for s in held if _allocatable(rs, _parse_ip(s)))
        if in_set < capacity:
            for _r, ip in rs.candidates(after):
                if str(ip) not in held:
                    return ip
        raise CniError(
            POOL_EXHAUSTED,
            f"no free address in {rs.key} of network {network} ({capacity} addresses, all in use)",
        )

    def _attachment_id(self, network: str, container_id: str, ifname: str) -> int | None:
        row = self.conn.execute(
            "SELECT id FROM attachments WHERE network = ? AND container_id = ? AND ifname = ?",
            (network, container_id, ifname),
        ).fetchone()
        return row[0] if row else None

    def remove_attachment(self, network: str, container_id: str, ifname: str) -> Attachment | None:
        with self.transaction():
            att = self.get_attachment(network, container_id, ifname)
            if att is not None:
                self.conn.execute(
                    "DELETE FROM attachments WHERE network = ? AND container_id = ? AND ifname = ?",
                    (network, container_id, ifname),
                )
            return att

    def get_attachment(self, network: str, container_id: str, ifname: str) -> Attachment | None:
        found = self._select(
            "WHERE network = ? AND container_id = ? AND ifname = ?",
            (network, container_id, ifname),
        )
        return found[0] if found else None

    def list_attachments(self, network: str | None = None) -> list[Attachment]:
        if network is None:
            return self._select("", ())
        return self._select("WHERE network = ?", (network,))

    def _select(self, where: str, args: tuple) -> list[Attachment]:
        with self._read() as conn:
            rows = conn.execute(
                "SELECT id, network, container_id, ifname, host_veth, netns, created"
                f" FROM attachments {where} ORDER BY network, created, id",
                args,
            ).fetchall()
            by_id = {row[0]: Attachment(*row[1:], allocations=[]) for row in rows}
            if not by_id:
                return []
            ids = ",".join(str(i) for i in by_id)  # integers from the db: safe to inline
            for att_id, ip, prefixlen, gw, rs_key in conn.execute(
                "SELECT attachment_id, ip, prefixlen, gateway, range_set FROM allocations"
                f" WHERE attachment_id IN ({ids}) ORDER BY attachment_id, seq"
            ):
                by_id[att_id].allocations.append(
                    Allocation(ipaddress.ip_address(ip), prefixlen, _parse_ip(gw), rs_key)
                )
            return list(by_id.values())

    def count_attachments(self, network: str) -> int:
        return self._scalar("SELECT COUNT(*) FROM attachments WHERE network = ?", (network,))

    def used_count(self, network: str, range_set_key: str) -> int:
        return self._scalar(
            "SELECT COUNT(*) FROM allocations WHERE network = ? AND range_set = ?",
            (network, range_set_key),
        )

    def _scalar(self, sql: str, args: tuple) -> int:
        with self._read() as conn:
            return conn.execute(sql, args).fetchone()[0]

    # --- small shared tables -----------------------------------------------------------

    def get_meta(self, key: str) -> str | None:
        with self._read() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str | None) -> None:
        with self.transaction():
            if value is None:
                self.conn.execute("DELETE FROM meta WHERE key = ?", (key,))
            else:
                self.conn.execute(
                    "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value)
                )

    def set_network(self, network: str, info: dict | None) -> None:
        """Record per-network JSON info; None forgets the network."""
        with self.transaction():
            if info is None:
                self.conn.execute("DELETE FROM networks WHERE name = ?", (network,))
            else:
                self.conn.execute(
                    "INSERT OR REPLACE INTO networks (name, info) VALUES (?, ?)",
                    (network, json.dumps(info, sort_keys=True)),
                )

    def get_network(self, network: str) -> dict | None:
        with self._read() as conn:
            row = conn.execute("SELECT info FROM networks WHERE name = ?", (network,)).fetchone()
        return json.loads(row[0]) if row else None

    def list_networks(self) -> dict[str, dict]:
        with self._read() as conn:
            rows = conn.execute("SELECT name, info FROM networks ORDER BY name").fetchall()
        return {name: json.loads(info) for name, info in rows}


def _is_busy(e: sqlite3.Error) -> bool:
    msg = str(e).lower()
    return "locked" in msg or "busy" in msg


def _allocatable(rs: RangeSet, ip: Address | None) -> bool:
    r = rs.find(ip) if ip is not None else None
    return r is not None and ip is not None and not r.is_reserved(ip)


def _str(ip: Address | None) -> str | None:
    return None if ip is None else str(ip)


def _parse_ip(s: str | None) -> Address | None:
    if s is None:
        return None
    try:
        return ipaddress.ip_address(s)
    except ValueError:
        return None
