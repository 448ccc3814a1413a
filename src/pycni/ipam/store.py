"""Persistent IPAM state in SQLite: attachments, their addresses, and small shared tables.

Every CNI invocation is its own process, so all mutual exclusion comes from SQLite:
writes run in BEGIN IMMEDIATE transactions (one writer at a time, waiting up to
busy_timeout), and WAL keeps readers from blocking writers. A crash mid-ADD simply
rolls back, so no address can leak half-recorded.

Store is the one entry point: it opens the database and owns the transactions. Beside it:
schema.py (the file, its schema, making it), faults.py (StoreError: what is wrong with the
database and what the operator does about it), records.py (Attachment, Allocation and reading
them back), allocate.py (choosing and recording a new attachment's addresses).
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext

from pycni.cni.errors import IO_FAILURE, CniError
from pycni.cni.netconf import PortMapping
from pycni.ipam import allocate, records, schema
from pycni.ipam.faults import cannot_write, corrupt, file_damage, store_error
from pycni.ipam.ranges import Address, RangeSet
from pycni.ipam.records import Allocation, Attachment
from pycni.ipam.schema import BUSY_TIMEOUT_MS

# The meta row STATUS writes to learn that the store takes writes.
WRITE_PROBE_KEY = "status.write-probe"


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
                schema.create(self.path)
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
                raise corrupt(self.path, damage)
            self._conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            self._conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            schema.set_wal(self._conn)
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            schema.check_version(self._conn, self.path)
            if not schema.has_added_tables(self.conn):
                with self.transaction():
                    schema.add_missing_tables(self.conn)
        except (sqlite3.Error, OSError) as e:
            self.close()
            raise store_error(self.path, e, "cannot open it") from e
        except CniError:
            self.close()
            raise

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
            raise store_error(self.path, e) from e

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
        pod: tuple[str, str] | None = None,
    ) -> list[Allocation]:
        """Record an attachment, its addresses, its port mappings and which Kubernetes pod
        (namespace, name) it belongs to, in one transaction. A host port another attachment
        on this node holds is refused (ADDRESS_UNAVAILABLE)."""
        with self.transaction():
            return allocate.add_attachment(
                self.conn,
                network,
                container_id,
                ifname,
                host_veth,
                netns,
                range_sets,
                requested,
                port_mappings,
                pod,
            )

    def pod_addresses(self) -> dict[tuple[str, str], list[str]]:
        """{(namespace, name): addresses} of the Kubernetes pods attached on this node."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT r.namespace, r.name, al.ip FROM pod_refs r"
                " JOIN allocations al ON al.attachment_id = r.attachment_id"
                " ORDER BY r.namespace, r.name, al.attachment_id, al.seq"
            ).fetchall()
        out: dict[tuple[str, str], list[str]] = {}
        for namespace, name, ip in rows:
            out.setdefault((namespace, name), []).append(ip)
        return out

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
            allocate.restore_attachment(
                self.conn,
                network,
                container_id,
                ifname,
                host_veth,
                netns,
                allocations,
                port_mappings,
            )

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
            return records.select(conn, where, args)

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

    def check_writable(self) -> None:
        """Raise StoreError when the database cannot take a write now: its filesystem is
        read-only or (nearly) full, or a real write (one meta row, committed) fails."""
        problem = cannot_write(self.path)
        if problem is not None:
            raise problem
        self.set_meta(WRITE_PROBE_KEY, str(time.time()))

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
