"""The IPAM database's file: its schema and version, the tables added since, making it
complete or not at all, and switching a connection to WAL. Store (store.py) opens it with
these.

A database is born complete (made aside, schema and all, then linked into place), so an empty
or schema-less pycni.db is always damage, never one being made: pycni refuses it rather than
start afresh and hand out addresses live pods hold.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time

from pycni.cni.errors import IO_FAILURE, CniError
from pycni.ipam.faults import corrupt, is_busy

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
CREATE TABLE IF NOT EXISTS pod_refs (
    attachment_id  INTEGER PRIMARY KEY REFERENCES attachments (id) ON DELETE CASCADE,
    namespace      TEXT NOT NULL,
    name           TEXT NOT NULL
);
"""


def create(path: str) -> None:
    """Make the database aside, schema and WAL mode and all, and link it into place: it
    appears complete or not at all. Two processes racing: the first link wins, the other
    opens the winner's."""
    wal = path + "-wal"
    if os.path.exists(wal) and os.path.getsize(wal) > 0:
        if os.path.lexists(path):
            # Another process linked its database into place since the caller looked, and
            # a third already opened it and wrote this log: it is that database's.
            return
        # SQLite would replay this log, written for some other database file, into the
        # new one: a database moved aside without its log.
        raise corrupt(
            path,
            f"is missing but its write-ahead log {wal} is there: put the "
            "database back, or move the log (and -shm) aside too",
        )
    fd, tmp = tempfile.mkstemp(prefix="pycni.db.new.", dir=os.path.dirname(path))
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
            os.link(tmp, path)
        except FileExistsError:
            pass
    finally:
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                os.unlink(tmp + suffix)
            except FileNotFoundError:
                pass


def has_added_tables(conn: sqlite3.Connection) -> bool:
    # Checked by reading, so opening a complete database writes nothing (a read-only or
    # full filesystem still lets it be read).
    names = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return {"port_mappings", "pod_refs"} <= names


def add_missing_tables(conn: sqlite3.Connection) -> None:
    """Create the tables added since (inside the caller's write transaction)."""
    # Statement by statement: executescript() would commit the open transaction.
    for stmt in _ADDED.split(";"):
        if stmt.strip():
            conn.execute(stmt)


def set_wal(conn: sqlite3.Connection) -> None:
    # Switching a fresh database to WAL can report "locked" without going through the
    # busy handler when many processes open it at once, so retry by hand.
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if not is_busy(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def check_version(conn: sqlite3.Connection, path: str) -> None:
    """Refuse a database without pycni's schema (damage), or of another schema version."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:
        raise corrupt(path, "holds no pycni schema (truncated, or not pycni's?)")
    if version != SCHEMA_VERSION:
        raise CniError(
            IO_FAILURE,
            f"IPAM database {path} has schema version {version}, "
            f"this pycni understands {SCHEMA_VERSION}",
        )
