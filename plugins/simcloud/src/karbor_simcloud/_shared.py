"""The SIMULATED cloud's shared state: a directory every process on the machine uses.

Why a directory and not a ``simcloud serve`` process: the state must survive
the engine (and any process) being killed, and there is then nothing to start,
supervise or find; SQLite in WAL mode gives every operation one transaction
that is atomic across processes (``BEGIN IMMEDIATE``), and a killed process
leaves exactly what it committed. A server process would add a second thing to
crash and a socket round trip per call, for nothing the file does not give.

What lives here (``DIR/simcloud.db``): what the application is (resources,
seed, latency: the inventory is regenerated from them, deterministically), the
servers' freeze state (frozen since when, by which process and run), the
snapshots and the checkpoint that owns each, the resources restores created,
and fault rules stored for every process (``karbor-async simcloud fault``).

Calls from the event loop run in a worker thread, one at a time per process
(a per-state limiter), so the loop is never blocked by a lock another process
holds.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import anyio
import attrs

from karbor_simcloud._compat import owner_gone, this_process

__all__ = [
    "CreatedRow",
    "FiredRow",
    "FrozenRow",
    "SharedState",
    "SharedStateError",
    "SnapshotRow",
    "StateView",
]

_T = TypeVar("_T")

SCHEMA_VERSION = 1
_IDENTITY = ("resources", "seed")
"""What makes a state one application (the latency may differ from process to process)."""
DB_NAME = "simcloud.db"
_BUSY_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS servers (
    id TEXT PRIMARY KEY,
    frozen INTEGER NOT NULL DEFAULT 0,
    frozen_by TEXT,
    frozen_owner TEXT,
    frozen_wall REAL,
    freezes INTEGER NOT NULL DEFAULT 0,
    thaws INTEGER NOT NULL DEFAULT 0,
    thawed_wall REAL
);
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    volume_id TEXT NOT NULL,
    content TEXT NOT NULL,
    checkpoint_id TEXT,
    owner TEXT,
    requested_at REAL NOT NULL,
    taken_at REAL NOT NULL,
    delay REAL NOT NULL,
    returned_at REAL,
    taken_wall REAL NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS created (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    id TEXT NOT NULL UNIQUE,
    record TEXT NOT NULL,
    origin_checkpoint TEXT,
    origin_id TEXT,
    by TEXT,
    wall REAL NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS created_origin ON created (kind, origin_checkpoint, origin_id)
    WHERE origin_checkpoint IS NOT NULL;
CREATE TABLE IF NOT EXISTS faults (seq INTEGER PRIMARY KEY AUTOINCREMENT, rule TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS fired (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    rule TEXT NOT NULL,
    operation TEXT NOT NULL,
    hook TEXT NOT NULL,
    resource TEXT NOT NULL,
    by TEXT NOT NULL,
    wall REAL NOT NULL
);
"""


class SharedStateError(RuntimeError):
    """The shared state cannot be used (it is another application's, newer, or damaged)."""


def process_owner(run_id: str | None = None) -> str:
    """Who acts: this host and process, and the run if known."""
    who = f"{socket.gethostname()} pid {os.getpid()}"
    return f"{who} run {run_id}" if run_id else who


@attrs.frozen
class FrozenRow:
    server_id: str
    by: str | None
    pid: int | None
    host: str | None
    since_wall: float | None
    alive: bool | None
    """Whether the freezing process still runs (None: another host, cannot tell)."""


@attrs.frozen
class SnapshotRow:
    id: str
    volume_id: str
    checkpoint_id: str | None
    owner: str | None
    taken_wall: float


@attrs.frozen
class CreatedRow:
    kind: str
    id: str
    origin_checkpoint: str | None
    origin_id: str | None
    by: str | None
    wall: float


@attrs.frozen
class FiredRow:
    rule: str
    operation: str
    hook: str
    resource: str
    by: str
    wall: float


@attrs.frozen
class StateView:
    """What ``karbor-async simcloud show`` prints."""

    path: Path
    meta: dict[str, str]
    frozen: tuple[FrozenRow, ...]
    snapshots: tuple[SnapshotRow, ...]
    created: tuple[CreatedRow, ...]
    faults: tuple[str, ...]
    fired: tuple[FiredRow, ...] = ()
    """The last faults that fired (newest last, at most 50)."""


def _frozen_row(
    server_id: str, by: str | None, owner: str | None, since: float | None
) -> FrozenRow:
    """A frozen server as ``show`` lists it; its freezer is the engine's owner name
    (host:pid:start:nonce), so liveness is the store's own rule (a reused pid is not it)."""
    host, pid_text = [*owner.split(":"), "", ""][:2] if owner else (None, "")
    alive = None
    if host == socket.gethostname() and owner is not None:
        alive = not owner_gone(owner)
    pid = int(pid_text) if pid_text.isdigit() else None
    return FrozenRow(server_id, by, pid, host, since, alive)


class SharedState:
    """The connection to one state directory (see the module docstring)."""

    def __init__(self, directory: Path, conn: sqlite3.Connection) -> None:
        self.directory = directory
        self._conn = conn
        self._lock = threading.Lock()
        self._limiter: anyio.CapacityLimiter | None = None

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def open(cls, directory: Path, meta: dict[str, str] | None = None) -> tuple[SharedState, bool]:
        """Open the state in ``directory``; with ``meta``, create it if absent.

        Returns the state and whether it was created now. An existing state must
        hold the same ``meta`` (the same application), or this raises naming both.
        """
        path = directory / DB_NAME
        if not path.exists():
            if meta is None:
                raise SharedStateError(
                    f"no simulated cloud state in {directory}: create one with "
                    "--simcloud N[:SEED[:LATENCY]] on a command, or point --simcloud-state at it"
                )
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise SharedStateError(
                    f"cannot create the simulated cloud state directory {directory}: "
                    f"{exc.strerror or exc}; choose another with --simcloud-state"
                ) from None
        try:
            conn = sqlite3.connect(
                path, timeout=_BUSY_MS / 1000, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
        except sqlite3.Error as exc:
            raise SharedStateError(
                f"the simulated cloud state {path} cannot be opened: {exc}; remove the "
                "directory to start a new simulated cloud"
            ) from None
        state = cls(directory, conn)
        try:
            created = state._prepare(meta)
        except BaseException:
            conn.close()
            raise
        return state, created

    def _prepare(self, meta: dict[str, str] | None) -> bool:
        if meta is None:
            stored = self._stored_meta()
        else:
            with self._txn() as c:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        c.execute(statement)
                stored = dict(c.execute("SELECT key, value FROM meta").fetchall())
                if not stored:
                    rows = {
                        **meta,
                        "schema": str(SCHEMA_VERSION),
                        "created_wall": str(time.time()),
                    }
                    c.executemany("INSERT INTO meta VALUES (?, ?)", sorted(rows.items()))
                    return True
        version = int(stored.get("schema", "0"))
        if version > SCHEMA_VERSION:
            raise SharedStateError(
                f"the simulated cloud state {self.directory} was written by a newer "
                f"karbor_simcloud (schema {version}; this one knows {SCHEMA_VERSION}): upgrade"
            )
        if meta is not None:
            differ = {
                k: (stored.get(k), v)
                for k, v in meta.items()
                if k in _IDENTITY and stored.get(k) != v
            }
            if differ:
                said = ", ".join(
                    f"{k} {old} (asked {new})" for k, (old, new) in sorted(differ.items())
                )
                raise SharedStateError(
                    f"the simulated cloud state in {self.directory} is another application: "
                    f"{said}; pass the same --simcloud, another --simcloud-state, or remove "
                    "the directory to start over"
                )
        return False

    def _stored_meta(self) -> dict[str, str]:
        """(Opening an existing state, which writes nothing.) Its meta; a state another
        process is creating right now (its file there, its first transaction not yet
        committed) is waited for, up to 5 s."""
        deadline = time.monotonic() + 5.0
        while True:
            with self._lock:
                conn = self._conn
                has = conn.execute(
                    "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
                ).fetchone()
                stored = dict(conn.execute("SELECT key, value FROM meta").fetchall()) if has else {}
            if stored:
                return stored
            if time.monotonic() > deadline:
                raise SharedStateError(f"{self.directory / DB_NAME} holds no simulated cloud")
            time.sleep(0.05)

    @property
    def meta(self) -> dict[str, str]:
        with self._txn() as c:
            return dict(c.execute("SELECT key, value FROM meta").fetchall())

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    # -- transactions ----------------------------------------------------------------------
    @contextmanager
    def _txn(self) -> Iterator[sqlite3.Connection]:
        """One transaction, atomic across processes (the write lock taken at its start)."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    async def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run ``fn`` in one transaction, in a worker thread (one at a time per process)."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(1)

        def work() -> _T:
            with self._txn() as c:
                return fn(c)

        return await anyio.to_thread.run_sync(work, limiter=self._limiter)

    # -- servers -------------------------------------------------------------------------
    async def freeze(self, server_id: str, by: str) -> bool:
        """Mark the server frozen by ``by``; False if it already was (by anyone)."""
        now = time.time()

        def op(c: sqlite3.Connection) -> bool:
            c.execute("INSERT OR IGNORE INTO servers (id) VALUES (?)", (server_id,))
            cur = c.execute(
                "UPDATE servers SET frozen = 1, frozen_by = ?, frozen_owner = ?,"
                " frozen_wall = ?, freezes = freezes + 1"
                " WHERE id = ? AND frozen = 0",
                (by, this_process(), now, server_id),
            )
            return cur.rowcount == 1

        return await self._call(op)

    async def thaw(self, server_id: str) -> bool:
        """Mark the server thawed; False if it was not frozen."""
        now = time.time()

        def op(c: sqlite3.Connection) -> bool:
            cur = c.execute(
                "UPDATE servers SET frozen = 0, thaws = thaws + 1, thawed_wall = ?"
                " WHERE id = ? AND frozen = 1",
                (now, server_id),
            )
            return cur.rowcount == 1

        return await self._call(op)

    async def is_frozen(self, server_id: str) -> bool:
        def op(c: sqlite3.Connection) -> bool:
            row = c.execute("SELECT frozen FROM servers WHERE id = ?", (server_id,)).fetchone()
            return bool(row and row[0])

        return await self._call(op)

    # -- snapshots -----------------------------------------------------------------------
    async def put_snapshot(self, row: dict[str, Any]) -> dict[str, Any]:
        """Record a snapshot; one of that id already there (alive) wins and is returned."""

        def op(c: sqlite3.Connection) -> dict[str, Any]:
            existing = _snapshot(c, row["id"])
            if existing is not None and not existing["deleted"]:
                return existing
            c.execute(
                "INSERT OR REPLACE INTO snapshots (id, volume_id, content, checkpoint_id, owner,"
                " requested_at, taken_at, delay, returned_at, taken_wall, deleted)"
                " VALUES (:id, :volume_id, :content, :checkpoint_id, :owner, :requested_at,"
                " :taken_at, :delay, :returned_at, :taken_wall, 0)",
                row,
            )
            return {**row, "deleted": 0}

        return await self._call(op)

    async def get_snapshot(self, snapshot_id: str) -> dict[str, Any] | None:
        def op(c: sqlite3.Connection) -> dict[str, Any] | None:
            row = _snapshot(c, snapshot_id)
            return None if row is None or row["deleted"] else row

        return await self._call(op)

    async def delete_snapshot(self, snapshot_id: str) -> bool:
        def op(c: sqlite3.Connection) -> bool:
            cur = c.execute(
                "UPDATE snapshots SET deleted = 1 WHERE id = ? AND deleted = 0", (snapshot_id,)
            )
            return cur.rowcount == 1

        return await self._call(op)

    # -- created resources -------------------------------------------------------------------
    async def create(
        self,
        kind: str,
        prefix: str,
        record: dict[str, Any],
        origin: tuple[str, str] | None,
        by: str,
    ) -> tuple[str, dict[str, Any], bool]:
        """Allocate an id and record a created resource (True); with an ``origin`` already
        created (by any process), return that one instead (False: adoption is atomic)."""

        def op(c: sqlite3.Connection) -> tuple[str, dict[str, Any], bool]:
            if origin is not None:
                found = c.execute(
                    "SELECT id, record FROM created WHERE kind = ? AND origin_checkpoint = ?"
                    " AND origin_id = ?",
                    (kind, *origin),
                ).fetchone()
                if found is not None:
                    return str(found[0]), json.loads(found[1]), False
            seq = c.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM created").fetchone()[0]
            rid = f"{prefix}-r{seq:06d}"
            full = {**record, "id": rid}
            c.execute(
                "INSERT INTO created (seq, kind, id, record, origin_checkpoint, origin_id, by,"
                " wall) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    seq,
                    kind,
                    rid,
                    json.dumps(full, sort_keys=True),
                    origin[0] if origin else None,
                    origin[1] if origin else None,
                    by,
                    time.time(),
                ),
            )
            return rid, full, True

        return await self._call(op)

    def created_since_sync(self, seq: int) -> list[tuple[int, str, dict[str, Any]]]:
        """(Not from the event loop: at open.) Created resources after ``seq``, in order."""
        with self._txn() as c:
            return _created_since(c, seq)

    async def created_since(self, seq: int) -> list[tuple[int, str, dict[str, Any]]]:
        return await self._call(lambda c: _created_since(c, seq))

    async def find_created(self, kind: str, origin: tuple[str, str]) -> str | None:
        def op(c: sqlite3.Connection) -> str | None:
            row = c.execute(
                "SELECT id FROM created WHERE kind = ? AND origin_checkpoint = ? AND origin_id = ?",
                (kind, *origin),
            ).fetchone()
            return None if row is None else str(row[0])

        return await self._call(op)

    # -- faults --------------------------------------------------------------------------
    async def record_fired(
        self, rule: str, operation: str, hook: str, resource: str, by: str
    ) -> None:
        """A fault fired (before it acts): every process can see where a run was hit."""
        now = time.time()

        def op(c: sqlite3.Connection) -> None:
            c.execute(
                "INSERT INTO fired (rule, operation, hook, resource, by, wall)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (rule, operation, hook, resource, by, now),
            )

        await self._call(op)

    def fault_rules(self) -> list[str]:
        with self._txn() as c:
            return [str(r[0]) for r in c.execute("SELECT rule FROM faults ORDER BY seq")]

    def add_faults(self, rules: Sequence[str]) -> None:
        with self._txn() as c:
            c.executemany("INSERT INTO faults (rule) VALUES (?)", [(r,) for r in rules])

    def clear_faults(self) -> int:
        with self._txn() as c:
            return c.execute("DELETE FROM faults").rowcount

    # -- showing -------------------------------------------------------------------------
    def view(self) -> StateView:
        with self._txn() as c:
            meta = dict(c.execute("SELECT key, value FROM meta").fetchall())
            frozen = tuple(
                _frozen_row(str(r[0]), r[1], r[2], r[3])
                for r in c.execute(
                    "SELECT id, frozen_by, frozen_owner, frozen_wall"
                    " FROM servers WHERE frozen = 1 ORDER BY frozen_wall, id"
                )
            )
            snaps = tuple(
                SnapshotRow(str(r[0]), str(r[1]), r[2], r[3], float(r[4]))
                for r in c.execute(
                    "SELECT id, volume_id, checkpoint_id, owner, taken_wall FROM snapshots"
                    " WHERE deleted = 0 ORDER BY taken_wall, id"
                )
            )
            created = tuple(
                CreatedRow(str(r[0]), str(r[1]), r[2], r[3], r[4], float(r[5]))
                for r in c.execute(
                    "SELECT kind, id, origin_checkpoint, origin_id, by, wall FROM created"
                    " ORDER BY seq"
                )
            )
            faults = tuple(str(r[0]) for r in c.execute("SELECT rule FROM faults ORDER BY seq"))
            fired = tuple(
                FiredRow(str(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), float(r[5]))
                for r in reversed(
                    c.execute(
                        "SELECT rule, operation, hook, resource, by, wall FROM fired"
                        " ORDER BY seq DESC LIMIT 50"
                    ).fetchall()
                )
            )
        return StateView(self.directory, meta, frozen, snaps, created, faults, fired)


def _snapshot(c: sqlite3.Connection, snapshot_id: str) -> dict[str, Any] | None:
    c.row_factory = sqlite3.Row
    try:
        row = c.execute("SELECT * FROM snapshots WHERE id = ?", (snapshot_id,)).fetchone()
    finally:
        c.row_factory = None
    return None if row is None else dict(row)


def _created_since(c: sqlite3.Connection, seq: int) -> list[tuple[int, str, dict[str, Any]]]:
    return [
        (int(r[0]), str(r[1]), json.loads(r[2]))
        for r in c.execute(
            "SELECT seq, kind, record FROM created WHERE seq > ? ORDER BY seq", (seq,)
        )
    ]
