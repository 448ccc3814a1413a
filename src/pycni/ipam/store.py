"""Persistent IPAM state in SQLite: attachments, their addresses, and small shared tables.

Every CNI invocation is its own process, so all mutual exclusion comes from SQLite:
writes run in BEGIN IMMEDIATE transactions (one writer at a time, waiting up to
busy_timeout), and WAL keeps readers from blocking writers. A crash mid-ADD simply
rolls back, so no address can leak half-recorded.

When the database itself cannot be used (its filesystem full or read-only, the file or its
write-ahead log damaged), every operation raises StoreError naming the file, what is wrong
and what the operator does about it; the README's "When the IPAM store cannot be used" has the
recovery. A database is born complete (made aside, schema and all, then linked into place),
so an empty or schema-less pycni.db is always damage, never one being made: pycni refuses it
rather than start afresh and hand out addresses live pods hold.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import sqlite3
import stat
import tempfile
import time
from collections.abc import Iterator, Sequence
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
from pycni.cni.netconf import PortMapping, port_mappings_conflict
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

# Tables added since: created if missing at every open, so a database made by an earlier pycni
# gains them, and that pycni can still open this one (it ignores them, and deleting an
# attachment still removes their rows by ON DELETE CASCADE). A change existing code could not
# live with would raise SCHEMA_VERSION instead.
_ADDED = """
CREATE TABLE IF NOT EXISTS port_mappings (
    attachment_id  INTEGER NOT NULL REFERENCES attachments (id) ON DELETE CASCADE,
    protocol       TEXT NOT NULL,
    host_ip        TEXT NOT NULL,
    host_port      INTEGER NOT NULL,
    container_port INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS port_mappings_attachment ON port_mappings (attachment_id);
CREATE INDEX IF NOT EXISTS port_mappings_port ON port_mappings (host_port, protocol);
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
    port_mappings: list[PortMapping] = field(default_factory=list)


class StoreError(CniError):
    """The IPAM database cannot be used. `kind` says why: "busy", "full", "read-only",
    "corrupt" or "io"; the message names the file, `details` says what to do."""

    def __init__(self, code: int, msg: str, details: str = "", kind: str = "io"):
        super().__init__(code, msg, details)
        self.kind = kind


class Store:
    def __init__(self, data_dir: str, writer_lock: AbstractContextManager | None = None):
        self.path = os.path.join(data_dir, "pycni.db")
        self._conn: sqlite3.Connection | None = None
        # Threads of one process (the agent) queue for writes on this lock, which wakes the
        # next one at once; SQLite's busy handler would have them sleep up to 100 ms a try.
        self._writer_lock = writer_lock if writer_lock is not None else nullcontext()
        try:
            os.makedirs(data_dir, 0o700, exist_ok=True)
            if not os.path.lexists(self.path):
                self._create()
            # Never open and close an existing database outside SQLite: closing any
            # descriptor of it drops every POSIX lock this process holds on it, including
            # those of other open connections (the agent keeps one per thread). A one-shot
            # plugin closing next would then think itself the last user and delete the WAL
            # under them, losing every write they make afterwards. stat() opens nothing.
            st = os.stat(self.path)
            if stat.S_IMODE(st.st_mode) != 0o600:
                os.chmod(self.path, 0o600)  # never world-readable (older pycni made it so)
            damage = file_damage(self.path, st)
            if damage:
                raise self._corrupt(damage)
            self._conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._set_wal()
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                raise self._corrupt("holds no pycni schema (truncated, or not pycni's?)")
            if version != SCHEMA_VERSION:
                raise CniError(
                    IO_FAILURE,
                    f"IPAM database {self.path} has schema version {version}, "
                    f"this pycni understands {SCHEMA_VERSION}",
                )
            if not self._has_added_tables():
                with self.transaction():
                    self._run_script(_ADDED)
        except (sqlite3.Error, OSError) as e:
            self.close()
            raise self._error(e, "cannot open it") from e
        except CniError:
            self.close()
            raise

    def _create(self) -> None:
        """Make the database aside, schema and WAL mode and all, and link it into place: it
        appears complete or not at all. Two processes racing: the first link wins, the other
        opens the winner's."""
        wal = self.path + "-wal"
        if os.path.exists(wal) and os.path.getsize(wal) > 0:
            # SQLite would replay this log, written for some other database file, into the
            # new one: a database moved aside without its log.
            raise self._corrupt(
                f"is missing but its write-ahead log {wal} is there: put the "
                "database back, or move the log (and -shm) aside too"
            )
        fd, tmp = tempfile.mkstemp(prefix="pycni.db.new.", dir=os.path.dirname(self.path))
        os.close(fd)  # mkstemp makes it 0600; no SQLite connection has it open yet
        try:
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("BEGIN IMMEDIATE")
                for script in (_SCHEMA, _ADDED):
                    for stmt in script.split(";"):
                        if stmt.strip():
                            conn.execute(stmt)
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                conn.execute("COMMIT")
            finally:
                conn.close()  # the last connection: checkpoints the WAL into the file
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                pass
        finally:
            for suffix in ("", "-wal", "-shm", "-journal"):
                try:
                    os.unlink(tmp + suffix)
                except FileNotFoundError:
                    pass

    def _has_added_tables(self) -> bool:
        # Checked by reading, so opening a complete database writes nothing (a read-only or
        # full filesystem still lets it be read).
        names = {
            row[0]
            for row in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
        return "port_mappings" in names

    def _run_script(self, script: str) -> None:
        # Statement by statement: executescript() would commit the open transaction.
        for stmt in script.split(";"):
            if stmt.strip():
                self.conn.execute(stmt)

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

    def _error(self, e: BaseException, what: str = "") -> StoreError:
        """What went wrong with the database, for the operator: the file, the cause as far
        as the error and its filesystem tell, and the remedy."""
        if isinstance(e, sqlite3.OperationalError) and _is_busy(e):
            return StoreError(
                TRY_AGAIN_LATER,
                f"IPAM database {self.path} is busy ({e}); try again later",
                kind="busy",
            )
        code = (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF
        err = e.errno if isinstance(e, OSError) else None
        directory = os.path.dirname(self.path)
        cause = f"{what}: {e}" if what else str(e)
        if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            return self._corrupt(f"is damaged ({cause})")
        read_only, free = _filesystem(directory)
        if code == _SQLITE_READONLY or err == errno.EROFS or read_only:
            return StoreError(
                IO_FAILURE,
                f"IPAM database {self.path}: its filesystem is read-only ({cause})",
                f"remount {_mount_point(directory)} read-write, then retry",
                kind="read-only",
            )
        if (
            code == _SQLITE_FULL
            or err in (errno.ENOSPC, errno.EDQUOT)
            or (
                code in (_SQLITE_IOERR, _SQLITE_CANTOPEN)
                and free is not None
                and free < _NEARLY_FULL
            )
        ):
            return StoreError(
                TRY_AGAIN_LATER,
                f"IPAM database {self.path}: no space left on its filesystem ({cause})",
                f"free space on {_mount_point(directory)}, then retry",
                kind="full",
            )
        return StoreError(
            IO_FAILURE,
            f"IPAM database {self.path}: {cause}",
            "see the pycni log and `pycnictl doctor`",
        )

    def _corrupt(self, problem: str) -> StoreError:
        return StoreError(
            IO_FAILURE,
            f"IPAM database {self.path} {problem}",
            'pycni will not use it: recover as the README\'s "When the IPAM store cannot be used" '
            "says (stop the agent, move pycni.db, pycni.db-wal and pycni.db-shm aside, then "
            "`pycnictl doctor --rebuild-store`)",
            kind="corrupt",
        )

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
        port_mappings: Sequence[PortMapping] = (),
    ) -> list[Allocation]:
        """Record an attachment, its addresses and its port mappings in one transaction.
        A host port another attachment on this node holds is refused (ADDRESS_UNAVAILABLE)."""
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

            families = {rs.family for rs in range_sets}
            for mapping in port_mappings:
                self._check_host_port(mapping, families)

            allocs: list[Allocation] = []
            for i, rs in enumerate(range_sets):
                ip = chosen[i] if i in chosen else self._pick(network, rs, held)
                r = rs.find(ip)
                assert r is not None
                held[str(ip)] = container_id
                allocs.append(Allocation(ip, r.subnet.prefixlen, r.gateway, rs.key))

            self._insert(network, container_id, ifname, host_veth, netns, allocs, port_mappings)
            return allocs

    def restore_attachment(
        self,
        network: str,
        container_id: str,
        ifname: str,
        host_veth: str,
        netns: str,
        allocations: list[Allocation],
        port_mappings: Sequence[PortMapping] = (),
    ) -> None:
        """Record an attachment as found on the node, its addresses as they are (rebuilding a
        store that was lost). An attachment or address already recorded is refused."""
        with self.transaction():
            if self._attachment_id(network, container_id, ifname) is not None:
                raise CniError(
                    ATTACHMENT_EXISTS,
                    f"container {container_id} already has an "
                    f"attachment on interface {ifname} in network {network}",
                )
            for a in allocations:
                row = self.conn.execute(
                    "SELECT at.container_id FROM allocations al JOIN attachments at ON"
                    " at.id = al.attachment_id WHERE al.network = ? AND al.ip = ?",
                    (network, str(a.ip)),
                ).fetchone()
                if row is not None:
                    raise CniError(
                        ADDRESS_UNAVAILABLE,
                        f"address {a.ip} is already held by "
                        f"container {row[0]} in network {network}",
                    )
            self._insert(
                network, container_id, ifname, host_veth, netns, allocations, port_mappings
            )

    def _insert(
        self,
        network: str,
        container_id: str,
        ifname: str,
        host_veth: str,
        netns: str,
        allocs: list[Allocation],
        port_mappings: Sequence[PortMapping],
    ) -> None:
        conn = self.conn
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
                "INSERT OR REPLACE INTO last_reserved (network, range_set, ip) VALUES (?, ?, ?)",
                (network, a.range_set, str(a.ip)),
            )
        for m in port_mappings:
            conn.execute(
                "INSERT INTO port_mappings (attachment_id, protocol, host_ip, host_port,"
                " container_port) VALUES (?, ?, ?, ?, ?)",
                (att_id, m.protocol, _str(m.host_ip) or "", m.host_port, m.container_port),
            )

    def _check_host_port(self, mapping: PortMapping, families: set[int]) -> None:
        """Refuse a mapping whose host port another attachment (of any network: the node's
        ports are shared) holds on an overlapping address."""
        rows = self.conn.execute(
            "SELECT pm.attachment_id, pm.host_ip, pm.container_port, at.network,"
            " at.container_id FROM port_mappings pm JOIN attachments at ON at.id ="
            " pm.attachment_id WHERE pm.host_port = ? AND pm.protocol = ?",
            (mapping.host_port, mapping.protocol),
        ).fetchall()
        want = mapping.claims(families)
        for att_id, host_ip, container_port, network, container_id in rows:
            theirs = PortMapping(
                mapping.host_port, container_port, mapping.protocol, _parse_ip(host_ip)
            )
            their_families = {
                _family(ip)
                for (ip,) in self.conn.execute(
                    "SELECT ip FROM allocations WHERE attachment_id = ?", (att_id,)
                )
            }
            if port_mappings_conflict(want, theirs.claims(their_families)):
                where = f" on {mapping.host_ip}" if mapping.host_ip else ""
                raise CniError(
                    ADDRESS_UNAVAILABLE,
                    f"host port {mapping.host_port}/{mapping.protocol}{where} is already "
                    f"mapped to container {container_id} in network {network}",
                )

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
            for att_id, protocol, host_ip, host_port, container_port in conn.execute(
                "SELECT attachment_id, protocol, host_ip, host_port, container_port"
                f" FROM port_mappings WHERE attachment_id IN ({ids}) ORDER BY rowid"
            ):
                by_id[att_id].port_mappings.append(
                    PortMapping(host_port, container_port, protocol, _parse_ip(host_ip or None))
                )
            return list(by_id.values())

    def attachments_with_port_mappings(self) -> list[Attachment]:
        """Every attachment (of any network) that has port mappings, with them."""
        return self._select("WHERE id IN (SELECT attachment_id FROM port_mappings)", ())

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


# SQLite's primary result codes (sqlite3.h), as exceptions carry them in sqlite_errorcode.
_SQLITE_READONLY = 8
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_NOTADB = 26
# The first 8 bytes of every WAL file: magic (either byte order of its checksums), version.
_WAL_MAGICS = (0x377F0682, 0x377F0683)
_WAL_VERSION = 3007000


def file_damage(path: str, st: os.stat_result | None = None) -> str | None:
    """What is wrong with the database at `path` or its write-ahead log, as far as looking at
    the files without SQLite tells (SQLite reports the rest when it reads), or None."""
    try:
        if (st or os.stat(path)).st_size == 0:
            return "is empty (truncated?)"
    except FileNotFoundError:
        return None
    return _wal_problem(path)


def _wal_problem(path: str) -> str | None:
    """Why the write-ahead log beside `path` is not one SQLite wrote, or None.

    SQLite replays a log up to its first bad frame and silently forgets everything after, so
    damage there would make the database look older than the pods on the node (and hand their
    addresses out again). What SQLite itself leaves is never refused: an empty log, a header
    of zeros (a power cut before the log was synced), the frames of earlier generations after
    the current ones (their salts differ). Refused: a header that is not a WAL header, and a
    frame of the current generation after one that is not (a hole in the log). Writers append
    while we read, so a reader can catch the tail half-written: only what two looks in a row
    find alike is damage. Reading is safe: SQLite takes no locks on the log file itself."""
    wal = path + "-wal"
    seen = None
    for _ in range(5):
        try:
            with open(wal, "rb", buffering=0) as f:
                head = f.read(32)
                if not any(head):
                    return None
                if (
                    len(head) < 32
                    or int.from_bytes(head[:4], "big") not in _WAL_MAGICS
                    or int.from_bytes(head[4:8], "big") != _WAL_VERSION
                ):
                    found = (head, None)
                else:
                    hole = _wal_hole(f, head)
                    if hole is None:
                        return None
                    found = (head, hole)
        except FileNotFoundError:
            return None
        if found == seen:
            if found[1] is None:
                return f"has a damaged write-ahead log: {wal} has no SQLite WAL header"
            return (
                f"has a damaged write-ahead log: frame {found[1]} of {wal} belongs to it "
                "but an earlier one does not (transactions after the damage would be lost)"
            )
        seen = found
        time.sleep(0.01)
    return None  # changing under us all along: being written, not damaged


def _wal_hole(f, head: bytes) -> int | None:
    """The first frame of the log's current generation (its salts) that follows a frame of
    another, or None. Only the 24-byte frame headers are read."""
    page_size = int.from_bytes(head[8:12], "big")
    if page_size == 1:
        page_size = 65536
    salts = head[16:24]
    foreign = False
    frame = 0
    while True:
        f.seek(32 + frame * (24 + page_size))
        header = f.read(24)
        if len(header) < 24:
            return None
        if header[8:16] != salts:
            foreign = True
        elif foreign:
            return frame
        frame += 1


# Less free space than this, and SQLite's I/O error (growing its shared-memory index fails
# so, not with "full") is the full filesystem.
_NEARLY_FULL = 64 * 1024


def _filesystem(directory: str) -> tuple[bool, int | None]:
    """(mounted read-only, bytes free) of the filesystem holding `directory`, free as root
    sees it (pycni runs as root: the blocks reserved for root are its too); (False, None) when
    it cannot be asked."""
    try:
        st = os.statvfs(directory)
    except OSError:
        return False, None
    return bool(st.f_flag & os.ST_RDONLY), st.f_bfree * st.f_frsize


def _mount_point(path: str) -> str:
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def _is_busy(e: sqlite3.Error) -> bool:
    msg = str(e).lower()
    return "locked" in msg or "busy" in msg


def _allocatable(rs: RangeSet, ip: Address | None) -> bool:
    r = rs.find(ip) if ip is not None else None
    return r is not None and ip is not None and not r.is_reserved(ip)


def _family(ip: str) -> int:
    return ipaddress.ip_address(ip).version


def _str(ip: Address | None) -> str | None:
    return None if ip is None else str(ip)


def _parse_ip(s: str | None) -> Address | None:
    if s is None:
        return None
    try:
        return ipaddress.ip_address(s)
    except ValueError:
        return None
