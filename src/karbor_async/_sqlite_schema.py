"""The SQLite store's file format: schema, forward migrations and the refusal of foreign files.

A store file is a SQLite database whose header carries :data:`APPLICATION_ID` and
whose ``meta`` table holds :data:`MAGIC` and the schema version. Opening a file
first *inspects* it through a read-only connection (``mode=ro``), so a file that
is refused (not SQLite, another application's database, a newer schema, or
corrupt) is never written to. Only then is it opened for writing and migrated
forward, one step at a time, inside one transaction.

Migrations are a list of steps; step ``i`` takes the schema from version ``i`` to
``i + 1``. A step is a tuple of single SQL statements (not a script: Python's
``executescript`` would commit the surrounding transaction). Never edit a step
that has shipped; append a new one.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from karbor_async._schema_meta import MAGIC, stored_version
from karbor_async.exceptions import (
    CorruptStoreError,
    ForeignFileError,
    StoreFileError,
)

__all__ = [
    "APPLICATION_ID",
    "MAGIC",
    "MIGRATIONS",
    "read_only_uri",
    "inspect_file",
    "schema_version",
]

APPLICATION_ID = 0x4B415342
"""``PRAGMA application_id`` of a karbor-async store (``"KASB"``)."""

"""``meta.magic``: says the file is ours even if the header field were lost."""

_SQLITE_HEADER = b"SQLite format 3\x00"


_V1: tuple[str, ...] = (
    """CREATE TABLE meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID""",
    # One row per protect, restore or delete run. A checkpoint's id is its
    # protect run's id; the plan and graph live here and nowhere else.
    """CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        operation TEXT NOT NULL,
        checkpoint_id TEXT NOT NULL,
        plan TEXT NOT NULL,
        graph TEXT NOT NULL,
        status TEXT NOT NULL,
        started_wall REAL NOT NULL,
        ended_wall REAL,
        outcome TEXT,
        error TEXT,
        lease_owner TEXT,
        lease_token INTEGER NOT NULL DEFAULT 0,
        lease_expires REAL NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX runs_by_checkpoint ON runs (checkpoint_id, started_wall, run_id)",
    "CREATE INDEX runs_by_start ON runs (started_wall, run_id)",
    "CREATE INDEX runs_running ON runs (started_wall) WHERE status = 'running'",
    # Metrics are copied out of the outcome so that listings can show them
    # without parsing JSON.
    """CREATE TABLE checkpoints (
        id TEXT PRIMARY KEY,
        plan_name TEXT NOT NULL,
        status TEXT NOT NULL,
        created_wall REAL NOT NULL,
        ended_wall REAL,
        resources INTEGER,
        skew REAL,
        crash_consistent INTEGER,
        error TEXT
    )""",
    "CREATE INDEX checkpoints_by_date ON checkpoints (created_wall, id)",
    "CREATE INDEX checkpoints_by_plan ON checkpoints (plan_name, created_wall, id)",
    "CREATE INDEX checkpoints_by_status ON checkpoints (status, created_wall, id)",
    "CREATE INDEX checkpoints_by_plan_status ON checkpoints (plan_name, status, created_wall, id)",
    # Each resource's end state in a run (from the run's outcome).
    """CREATE TABLE resource_outcomes (
        run_id TEXT NOT NULL,
        rtype TEXT NOT NULL,
        rid TEXT NOT NULL,
        grp TEXT NOT NULL,
        status TEXT NOT NULL,
        failed_hook TEXT,
        error TEXT,
        cut_at REAL,
        quiesced_at REAL,
        thawed_at REAL,
        crash_consistent INTEGER NOT NULL,
        thawed_early INTEGER NOT NULL,
        attempt INTEGER NOT NULL,
        PRIMARY KEY (run_id, rtype, rid)
    ) WITHOUT ROWID""",
    """CREATE TABLE saved_info (
        checkpoint_id TEXT NOT NULL,
        rtype TEXT NOT NULL,
        rid TEXT NOT NULL,
        info TEXT NOT NULL,
        PRIMARY KEY (checkpoint_id, rtype, rid)
    ) WITHOUT ROWID""",
    """CREATE TABLE restored (
        run_id TEXT NOT NULL,
        rtype TEXT NOT NULL,
        rid TEXT NOT NULL,
        new_id TEXT NOT NULL,
        PRIMARY KEY (run_id, rtype, rid)
    ) WITHOUT ROWID""",
    # The lifecycle log, numbered by the engine in commit order. Stored as
    # columns (``data``: JSON, NULL when empty) so that writing an event costs
    # no JSON encoding in the common case and the log can be queried.
    """CREATE TABLE events (
        run_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        kind TEXT NOT NULL,
        operation TEXT NOT NULL,
        wall REAL NOT NULL,
        mono REAL NOT NULL,
        rtype TEXT,
        rid TEXT,
        hook TEXT,
        grp TEXT,
        attempt INTEGER NOT NULL,
        data TEXT,
        progress TEXT,
        PRIMARY KEY (run_id, seq)
    ) WITHOUT ROWID""",
    # Per hook call and attempt, derived from the lifecycle events: a view, so
    # recording a hook transition costs one event row and nothing more. The
    # status is the kind of the call's latest event.
    """CREATE VIEW hook_records AS
    SELECT g.run_id, g.rtype, g.rid, g.hook, g.attempt, g.grp, e.kind AS status,
           g.started_wall, g.ended_wall,
           CASE WHEN e.kind IN ('failed', 'thaw_failed')
                THEN json_extract(e.data, '$.error') END AS error,
           g.first_seq, g.last_seq
    FROM (
        SELECT run_id, rtype, rid, hook, attempt, MAX(grp) AS grp,
               MIN(CASE WHEN kind = 'started' THEN wall END) AS started_wall,
               MAX(CASE WHEN kind <> 'started' THEN wall END) AS ended_wall,
               MIN(seq) AS first_seq, MAX(seq) AS last_seq
        FROM events
        WHERE hook IS NOT NULL AND rtype IS NOT NULL
          AND kind IN ('started', 'finished', 'failed', 'skipped', 'aborted', 'thaw_failed')
        GROUP BY run_id, rtype, rid, hook, attempt
    ) AS g
    JOIN events AS e ON e.run_id = g.run_id AND e.seq = g.last_seq""",
    # Progress ticks, coalesced: the latest per run and resource.
    """CREATE TABLE progress (
        run_id TEXT NOT NULL,
        rtype TEXT NOT NULL,
        rid TEXT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (run_id, rtype, rid)
    ) WITHOUT ROWID""",
)

_V2: tuple[str, ...] = (
    # A hook the run stopped waiting for, and a thaw that ended after it was abandoned.
    "ALTER TABLE resource_outcomes ADD COLUMN abandoned_hook TEXT",
    "ALTER TABLE resource_outcomes ADD COLUMN thawed_late_at REAL",
)

_V3: tuple[str, ...] = (
    # Resource leases: a protect run holds each resource it may quiesce or cut. A row is
    # held while its run is running and the run's lease is live (same owner, same expiry).
    """CREATE TABLE resource_leases (
        rtype TEXT NOT NULL,
        rid TEXT NOT NULL,
        run_id TEXT NOT NULL,
        abandoned_by TEXT,
        PRIMARY KEY (rtype, rid)
    ) WITHOUT ROWID""",
    # (abandoned_by: the run ended with this resource's hook abandoned and still running
    # in that owner's process: the lease holds until the hook ends or the process dies.)
    "CREATE INDEX resource_leases_by_run ON resource_leases (run_id)",
)

MIGRATIONS: list[tuple[str, ...]] = [_V1, _V2, _V3]
"""Step ``i`` migrates version ``i`` to ``i + 1``; the current version is ``len(MIGRATIONS)``."""


def schema_version() -> int:
    """The schema version this code writes."""
    return len(MIGRATIONS)


def _file_uri(path: Path, mode: str) -> str:
    return f"{path.absolute().as_uri()}?mode={mode}"


def read_only_uri(path: Path) -> str:
    """How to open a store only to read it.

    ``immutable=1`` (no locks, no ``-shm``: what read-only media need) only when its
    directory cannot be written and no ``-wal`` file exists, so no process can be
    writing it; otherwise plain ``mode=ro``.
    """
    directory = path.absolute().parent
    wal = Path(f"{path}-wal")
    if not os.access(directory, os.W_OK) and not wal.exists():
        return f"{_file_uri(path, 'ro')}&immutable=1"
    return _file_uri(path, "ro")


def inspect_file(path: Path, *, check: bool = True) -> int:
    """Return the schema version of the store at ``path`` (0: absent or empty, create it).

    Reads through a read-only connection and never writes. Raises
    :class:`ForeignFileError`, :class:`NewerSchemaError` or
    :class:`CorruptStoreError` (all naming the path and what to do) for a file
    that must be refused. ``check`` runs ``PRAGMA quick_check`` on our own files.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        return 0
    if not path.is_file():
        raise ForeignFileError(
            f"{path} is not a regular file; give the store the path of a database file"
        )
    with path.open("rb") as f:
        header = f.read(100)
    if st.st_size > 0 and not header.startswith(_SQLITE_HEADER[: len(header)]):
        raise ForeignFileError(
            f"{path} is not a karbor-async store (it is not a SQLite database); "
            "it was left untouched: point the store at a new file"
        )
    try:
        conn = sqlite3.connect(read_only_uri(path), uri=True, timeout=10.0)
    except sqlite3.Error as exc:
        raise StoreFileError(
            f"{path} cannot be opened for reading: {exc}; check that it and its directory "
            "are readable by this user"
        ) from exc
    try:
        return _inspect(conn, path, check=check)
    except sqlite3.DatabaseError as exc:
        if st.st_size >= len(_SQLITE_HEADER) and header.startswith(_SQLITE_HEADER):
            raise CorruptStoreError(
                f"{path} looks like a SQLite database but cannot be read ({exc}); "
                "it was left untouched: restore it from a copy or move it aside"
            ) from exc
        raise ForeignFileError(
            f"{path} is not a karbor-async store ({exc}); "
            "it was left untouched: point the store at a new file"
        ) from exc
    finally:
        conn.close()


def _inspect(conn: sqlite3.Connection, path: Path, *, check: bool) -> int:
    app_id = int(conn.execute("PRAGMA application_id").fetchone()[0])
    tables = {str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if app_id == 0 and not tables:
        return 0  # an empty SQLite file: ours to initialise
    if app_id != APPLICATION_ID:
        raise ForeignFileError(
            f"{path} is a SQLite database of another application "
            f"(application_id {app_id:#x}, tables: {', '.join(sorted(tables)) or 'none'}); "
            "it was left untouched: point the store at a new file"
        )
    if "meta" not in tables:
        raise CorruptStoreError(
            f"{path} is marked as a karbor-async store but has no meta table; "
            "it was left untouched: restore it from a copy or move it aside"
        )
    meta = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta")}
    damaged = CorruptStoreError(
        f"{path} is marked as a karbor-async store but its meta table is damaged "
        f"({meta!r}); it was left untouched: restore it from a copy or move it aside"
    )
    version = stored_version(str(path), meta, schema_version(), "file", damaged)
    if check:
        problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise CorruptStoreError(
                f"{path} failed SQLite's integrity check ({'; '.join(problems[:5])}); "
                "it was left untouched: restore it from a copy or move it aside"
            )
    return version


def migration_statements(from_version: int) -> Sequence[tuple[int, tuple[str, ...]]]:
    """The steps to run from ``from_version``, each with the version it produces."""
    return [(i + 1, MIGRATIONS[i]) for i in range(from_version, len(MIGRATIONS))]
