"""What can be wrong with the IPAM database itself, told so the operator can act on it.

When the database cannot be used (its filesystem full or read-only, the file or its
write-ahead log damaged), every operation raises StoreError naming the file, what is wrong
and what the operator does about it; docs/operations.md, "When the IPAM store cannot be used",
has the recovery. file_damage looks at the files without SQLite, for what SQLite would not notice.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import time

from pycni.cni.errors import IO_FAILURE, TRY_AGAIN_LATER, CniError


class StoreError(CniError):
    """The IPAM database cannot be used. `kind` says why: "busy", "full", "read-only",
    "corrupt" or "io"; the message names the file, `details` says what to do."""

    def __init__(self, code: int, msg: str, details: str = "", kind: str = "io"):
        super().__init__(code, msg, details)
        self.kind = kind


def store_error(path: str, e: BaseException, what: str = "") -> StoreError:
    """What went wrong with the database, for the operator: the file, the cause as far
    as the error and its filesystem tell, and the remedy."""
    if isinstance(e, sqlite3.OperationalError) and is_busy(e):
        return StoreError(
            TRY_AGAIN_LATER,
            f"IPAM database {path} is busy ({e}); try again later",
            kind="busy",
        )
    code = (getattr(e, "sqlite_errorcode", None) or 0) & 0xFF
    err = e.errno if isinstance(e, OSError) else None
    directory = os.path.dirname(path)
    cause = f"{what}: {e}" if what else str(e)
    if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return corrupt(path, f"is damaged ({cause})")
    read_only, free = _filesystem(directory)
    if code == _SQLITE_READONLY or err == errno.EROFS or read_only:
        return StoreError(
            IO_FAILURE,
            f"IPAM database {path}: its filesystem is read-only ({cause})",
            f"remount {_mount_point(directory)} read-write, then retry",
            kind="read-only",
        )
    if (
        code == _SQLITE_FULL
        or err in (errno.ENOSPC, errno.EDQUOT)
        or (code in (_SQLITE_IOERR, _SQLITE_CANTOPEN) and free is not None and free < _NEARLY_FULL)
    ):
        return StoreError(
            TRY_AGAIN_LATER,
            f"IPAM database {path}: no space left on its filesystem ({cause})",
            f"free space on {_mount_point(directory)}, then retry",
            kind="full",
        )
    return StoreError(
        IO_FAILURE,
        f"IPAM database {path}: {cause}",
        "see the pycni log and `pycnictl doctor`",
    )


def corrupt(path: str, problem: str) -> StoreError:
    return StoreError(
        IO_FAILURE,
        f"IPAM database {path} {problem}",
        "pycni will not use it: recover as docs/operations.md, "
        '"When the IPAM store cannot be used", says (stop the agent, move pycni.db, '
        "pycni.db-wal and pycni.db-shm aside, then "
        "`pycnictl doctor --rebuild-store`)",
        kind="corrupt",
    )


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
# so, not with "full") is the full filesystem; STATUS says not ready below it.
_NEARLY_FULL = 64 * 1024


def cannot_write(path: str) -> StoreError | None:
    """Why the database at `path` cannot take a write now as far as its filesystem tells
    (mounted read-only, or less than a few pages free), or None. A small write may still go
    through on a full filesystem (SQLite reuses its log's space), an ADD's would not."""
    directory = os.path.dirname(path)
    read_only, free = _filesystem(directory)
    if read_only:
        return store_error(path, OSError(errno.EROFS, "Read-only file system"), "a write")
    if free is not None and free < _NEARLY_FULL:
        return store_error(path, OSError(errno.ENOSPC, f"only {free} bytes free"), "a write")
    return None


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


def is_busy(e: sqlite3.Error) -> bool:
    msg = str(e).lower()
    return "locked" in msg or "busy" in msg
