"""The blocking half: every sqlite3 and file call, run in worker threads by the hooks.

Nothing here touches the event loop; the async layer (``protection``) calls these
through ``anyio.to_thread.run_sync``, the held cut's calls through its capacity-1
limiter, so that no two calls on that connection ever overlap.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

__all__ = [
    "MAGIC",
    "Cut",
    "Inspection",
    "backup_into",
    "close_cut",
    "connect",
    "file_sha256",
    "find_databases",
    "inspect",
    "integrity_check",
    "is_sqlite_file",
    "open_cut",
    "read_chunk",
    "remove_db_files",
]

MAGIC = b"SQLite format 3\x00"
"""The first 16 bytes of every SQLite database file."""

_SIDE_FILES = ("-journal", "-wal", "-shm")


def is_sqlite_file(path: Path) -> bool:
    """A regular file that starts with SQLite's header."""
    try:
        with path.open("rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except (IsADirectoryError, FileNotFoundError, PermissionError):
        return False


def connect(path: Path, *, timeout: float, query_only: bool = True) -> sqlite3.Connection:
    """A connection to an existing database (never creates one), autocommit mode.

    ``check_same_thread=False``: the connection moves between anyio's worker
    threads; SQLite allows that (``sqlite3.threadsafety``) as long as no two calls
    overlap, which the held cut's capacity-1 limiter guarantees. ``query_only``:
    this connection cannot write (not even through a plan's ``cut_query``).
    """
    uri = f"{path.absolute().as_uri()}?mode=rw"
    conn = sqlite3.connect(
        uri, uri=True, timeout=timeout, isolation_level=None, check_same_thread=False
    )
    try:
        if query_only:
            conn.execute("PRAGMA query_only = ON")
    except BaseException:
        conn.close()
        raise
    return conn


@attrs.frozen
class Inspection:
    journal_mode: str
    page_size: int
    page_count: int
    switched_to_wal: bool

    @property
    def size(self) -> int:
        return self.page_size * self.page_count


def inspect(path: Path, *, set_wal: bool, timeout: float) -> Inspection:
    """Refuse what cannot be protected; switch to WAL mode if asked (``set_wal``)."""
    if not path.is_absolute():
        raise ValueError(f"{path}: give the database as an absolute path")
    if not path.exists():
        raise ValueError(f"{path}: no such database file")
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file")
    if not is_sqlite_file(path):
        raise ValueError(f"{path}: not an SQLite database (its header is not {MAGIC!r})")
    conn = connect(path, timeout=timeout, query_only=False)
    try:
        mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
        switched = False
        if mode != "wal":
            if not set_wal:
                raise ValueError(
                    f"{path}: in journal_mode {mode}, not WAL; a read transaction would hold "
                    "its writers. Switch it (PRAGMA journal_mode=WAL) or set set_wal = true"
                )
            mode = str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
            if mode != "wal":
                raise ValueError(f"{path}: could not switch to WAL mode (still {mode})")
            switched = True
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        page_count = int(conn.execute("PRAGMA page_count").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    finally:
        conn.close()
    return Inspection(mode, page_size, page_count, switched)


@attrs.define
class Cut:
    """A held cut: its connection, in a read transaction, and what it saw."""

    conn: sqlite3.Connection | None = None
    page_size: int = 0
    page_count: int = 0
    query_result: list[Any] | None = None


def open_cut(cut: Cut, path: Path, *, timeout: float, cut_query: str | None) -> None:
    """Open the read transaction (the cut) on a new connection, kept in ``cut``.

    The connection is stored in ``cut`` before anything can fail, so a caller whose
    task is cancelled meanwhile still finds it and closes it. In WAL mode the
    snapshot is taken at the first read inside ``BEGIN``; writers go on.
    """
    conn = cut.conn = connect(path, timeout=timeout)
    mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
    if mode != "wal":
        raise RuntimeError(f"{path}: no longer in WAL mode ({mode}); the cut would hold writers")
    conn.execute("BEGIN")
    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()  # the snapshot: now
    cut.page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
    cut.page_count = int(conn.execute("PRAGMA page_count").fetchone()[0])
    if cut_query:
        row = conn.execute(cut_query).fetchone()
        cut.query_result = list(row) if row is not None else None


def close_cut(cut: Cut) -> None:
    """End the read transaction and close the connection (idempotent)."""
    conn, cut.conn = cut.conn, None
    if conn is None:
        return
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
    finally:
        conn.close()


def backup_into(
    cut: Cut, scratch: Path, *, step_pages: int, progress: Callable[[int, int], None]
) -> None:
    """The online backup from the cut's own connection into ``scratch``, in steps.

    From the connection that holds the read transaction, the backup copies
    exactly the snapshot, whatever other connections write meanwhile (a backup
    from a fresh connection restarts whenever another connection writes).
    ``progress(pages_done, pages_total)`` runs after each step in this thread; what
    it raises (a cancellation) stops the backup.
    """
    if cut.conn is None:
        raise RuntimeError("the cut was closed before its copy")
    remove_db_files(scratch)
    scratch.parent.mkdir(parents=True, exist_ok=True)
    dst = sqlite3.connect(scratch, isolation_level=None)
    try:
        dst.execute("PRAGMA synchronous = OFF")

        def step(_status: int, remaining: int, total: int) -> None:
            progress(total - remaining, total)

        cut.conn.backup(dst, pages=max(1, step_pages), progress=step)
    finally:
        dst.close()
    # The copy's own journal side files, if its connection left any.
    for suffix in _SIDE_FILES:
        Path(f"{scratch}{suffix}").unlink(missing_ok=True)


def read_chunk(f: Any, size: int, digest: Any) -> bytes:
    data: bytes = f.read(size)
    digest.update(data)
    return data


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def integrity_check(path: Path) -> None:
    """``PRAGMA integrity_check`` of a restored file; raises unless it says ``ok``."""
    conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=rw", uri=True, isolation_level=None)
    try:
        rows = [str(r[0]) for r in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()
    if rows != ["ok"]:
        raise RuntimeError(f"{path}: integrity_check failed: {'; '.join(rows[:5])}")


def remove_db_files(path: Path) -> None:
    """Remove a database file and its side files (none need exist)."""
    for suffix in ("", *_SIDE_FILES):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def find_databases(directory: Path) -> list[Path]:
    """The SQLite database files directly in ``directory`` (sorted, not recursive).

    Side files (``-wal``, ``-shm``, ``-journal``) and this plugin's partial files
    (``.part-*``, ``.karbor-*``) are skipped, whatever their header says.
    """
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory")
    found = []
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        name = entry.name
        if name.endswith(_SIDE_FILES) or ".part-" in name or ".karbor-" in name:
            continue
        if entry.is_file(follow_symlinks=False) and is_sqlite_file(Path(entry.path)):
            found.append(Path(entry.path).absolute())
    return found
