"""The SQLite store's writer: the write-behind batch, group commit, the write hold and fencing.

One :class:`_Writer` per store owns the pending :class:`~karbor_async._sqlite_state._Batch`
and the writer task that drains it, one transaction per batch: the fencing check
first (under the write lock), then the write-behind records, then each queued
operation in its own savepoint. It also runs the checkpointer task that copies
the WAL back into the database file.

The store's per-event methods (``append``, ``save_info``, ``commit``) read and
fill :attr:`_Writer.pending` directly, with no call in between.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar, cast

import aiosqlite
import anyio
from anyio.abc import TaskStatus

from karbor_async._log import get_logger
from karbor_async._sqlite_file import _BUSY_TIMEOUT
from karbor_async._sqlite_records import (
    _INSERT_EVENT,
    _RELEASE_RESOURCE,
    _UPSERT_PROGRESS,
    _UPSERT_RESTORED,
    _UPSERT_SAVED,
    _encode,
    _event_row,
    _progress_rows,
)
from karbor_async._sqlite_state import _Batch, _LeaseBook, _Op
from karbor_async.events import Event
from karbor_async.exceptions import StoreBusyError, StoreError

_log = get_logger("karbor_async._sqlite")

_T = TypeVar("_T")

_CHECKPOINT_INTERVAL = 0.5
"""How often the checkpointer copies new WAL content into the database file."""

_MAX_HELD_WRITES = 20_000
"""Write-behind records held back (see ``hold_background_writes``) before writing anyway."""


class _Writer:
    """The only code that writes to the store's file (one per store)."""

    def __init__(
        self,
        *,
        path: Path,
        conn: aiosqlite.Connection,
        checkpointer: aiosqlite.Connection,
        book: _LeaseBook,
    ) -> None:
        self.path = path
        self.conn = conn
        self.checkpointer = checkpointer
        self.checkpointed_at = 0
        self.book = book
        self.pending = _Batch()
        self.inflight: _Batch | None = None
        self.wake = anyio.Event()
        self.poked = False
        self.quiet = 0
        self.closed = False
        self.unreported: StoreError | None = None
        self.transactions = 0
        self.events_written = 0

    # -- waking the writer, holding it -------------------------------------------------

    def poke(self) -> None:
        """A write-behind record is waiting: wake the writer, unless writes are held."""
        if self.quiet and self.pending.writes < _MAX_HELD_WRITES:
            return
        self.poke_now()

    def poke_now(self) -> None:
        if not self.poked:
            self.poked = True
            self.wake.set()

    def hold(self, hold: bool) -> None:
        """The body of ``SqliteStore.hold_background_writes`` (counted holds)."""
        self.quiet += 1 if hold else -1
        if self.quiet < 0:
            self.quiet = 0
        if not self.quiet and self.pending.has_work:
            self.poke_now()

    read_only = False
    """The store was opened only to read (``SqliteStore.open(read_only=True)``)."""

    def check_open(self) -> None:
        if self.closed:
            if self.read_only:
                raise StoreError(
                    f"the store {self.path} is open read-only: open it without read_only to write"
                )
            raise StoreError(f"the store {self.path} is closed")

    # -- the writer task ---------------------------------------------------------------

    async def write_loop(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            await self.wake.wait()
            batch, self.pending = self.pending, _Batch()
            self.wake = anyio.Event()
            self.poked = False
            self.inflight = batch
            try:
                # A batch is short; shielding it keeps a transaction from being cut in half.
                with anyio.CancelScope(shield=True):
                    await self._write_batch(batch)
            finally:
                self.inflight = None
                if batch.error is not None and batch.waiters == 0:
                    self.unreported = batch.error
                batch.done.set()

    async def _write_batch(self, batch: _Batch) -> None:
        conn = self.conn
        try:
            if conn.in_transaction:
                await conn.execute("ROLLBACK")
            await conn.execute("BEGIN IMMEDIATE")
            if batch.writes:
                await self._fence(batch)
                await self._write_records(batch)
            for op in batch.ops:
                await conn.execute("SAVEPOINT op")
                try:
                    op.result = await op.fn(conn)
                except Exception as exc:  # the op's own failure: undo just the op
                    op.error = exc
                    await conn.execute("ROLLBACK TO op")
                await conn.execute("RELEASE op")
            await conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                await conn.execute("ROLLBACK")
            if _locked(exc):
                error: StoreError = StoreBusyError(
                    f"the store {self.path} stayed locked by another process for "
                    f"{_BUSY_TIMEOUT:g} s (the busy timeout): nothing was written; retry after "
                    "it is released"
                )
            else:
                error = StoreError(
                    f"writing to the store {self.path} failed: {exc}; check the free space "
                    f"and the permissions of {self.path.parent}"
                )
            error.__cause__ = exc
            batch.error = error
            for op in batch.ops:
                op.error = op.error or error
            _log.error("store_write_failed", path=str(self.path), error=str(exc))
            return
        self.transactions += 1
        self.events_written += len(batch.events)

    async def _fence(self, batch: _Batch) -> None:
        """Drop the writes of runs another owner took over (checked under the write lock).

        A run is dropped if it was already known lost (its lease may have been found
        taken after its records were enqueued) or if the token in the file is no
        longer the one this store was given.
        """
        book = self.book
        if not book.held and not book.lost:
            return
        by_checkpoint = (
            {**book.lost_by_checkpoint, **book.held_by_checkpoint} if batch.saved else {}
        )
        touched = batch.run_ids(by_checkpoint)
        lost = touched & book.lost.keys()
        check = touched & book.held.keys()
        if check:
            marks = ", ".join("?" * len(check))
            rows = await self.conn.execute_fetchall(
                f"SELECT run_id, lease_token FROM runs WHERE run_id IN ({marks})",
                tuple(check),
            )
            tokens = {str(r[0]): int(r[1]) for r in rows}
            taken = {r for r in check if tokens.get(r) != book.held[r].token}
            book.mark_lost(taken)
            lost |= taken
        if lost:
            batch.drop_runs(lost, {r: book.lost[r] for r in lost})
            batch.lost |= lost

    async def _write_records(self, batch: _Batch) -> None:
        conn = self.conn
        await conn.execute("SAVEPOINT records")
        try:
            await self._write_all(batch)
        except (sqlite3.Error, TypeError, ValueError) as exc:
            await conn.execute("ROLLBACK TO records")
            failures = await self._write_one_by_one(batch)
            error = StoreError(
                f"{len(failures)} record(s) could not be written to {self.path} "
                f"and were dropped: {'; '.join(failures[:5])}"
            )
            error.__cause__ = exc
            batch.error = error
            _log.error("store_records_dropped", path=str(self.path), failures=failures[:20])
        await conn.execute("RELEASE records")

    async def _write_all(self, batch: _Batch) -> None:
        conn = self.conn
        if batch.events:
            await conn.executemany(_INSERT_EVENT, map(_event_row, batch.events))
        if batch.progress:
            await conn.executemany(_UPSERT_PROGRESS, _progress_rows(batch.progress))
        if batch.saved:
            await conn.executemany(_UPSERT_SAVED, [(*k, v) for k, v in batch.saved.items()])
        if batch.restored:
            await conn.executemany(_UPSERT_RESTORED, [(*k, v) for k, v in batch.restored.items()])
        if batch.released:
            await conn.executemany(_RELEASE_RESOURCE, sorted(batch.released))

    async def _write_one_by_one(self, batch: _Batch) -> list[str]:
        """After a failed bulk write: write each record alone and report the ones that fail."""
        conn = self.conn
        failures: list[str] = []
        kept: list[Event] = []
        for e in batch.events:
            try:
                await conn.execute(_INSERT_EVENT, _event_row(e))
                kept.append(e)
            except (sqlite3.Error, TypeError, ValueError) as exc:
                failures.append(f"event {e.run_id}#{e.seq}: {exc}")
        batch.events = kept
        for (run_id, rtype, rid), e in batch.progress.items():
            try:
                await conn.execute(_UPSERT_PROGRESS, (run_id, rtype, rid, _encode(e.to_json())))
            except (sqlite3.Error, TypeError, ValueError) as exc:
                failures.append(f"progress {run_id} {rtype}#{rid}: {exc}")
        for k, v in batch.saved.items():
            try:
                await conn.execute(_UPSERT_SAVED, (*k, v))
            except sqlite3.Error as exc:
                failures.append(f"saved info {k}: {exc}")
        for k, v in batch.restored.items():
            try:
                await conn.execute(_UPSERT_RESTORED, (*k, v))
            except sqlite3.Error as exc:
                failures.append(f"restored id {k}: {exc}")
        for k in sorted(batch.released):
            try:
                await conn.execute(_RELEASE_RESOURCE, k)
            except sqlite3.Error as exc:
                failures.append(f"resource lease {k}: {exc}")
        return failures

    # -- operations and waiting for a commit -------------------------------------------

    async def submit(
        self, fn: Callable[[aiosqlite.Connection], Awaitable[_T]]
    ) -> tuple[_T, _Batch]:
        """Run ``fn`` in the writer's next transaction and wait for it to commit."""
        self.check_open()
        return await self.submit_unchecked(fn)

    async def submit_unchecked(
        self, fn: Callable[[aiosqlite.Connection], Awaitable[_T]]
    ) -> tuple[_T, _Batch]:
        op: _Op[_T] = _Op(fn)
        batch = self.pending
        batch.ops.append(op)
        batch.waiters += 1
        self.poke_now()
        await batch.done.wait()
        if op.error is not None:
            raise op.error
        return cast(_T, op.result), batch

    async def wait_for(self, batch: _Batch | None) -> _Batch | None:
        if batch is None:
            return None
        batch.waiters += 1
        if batch is self.pending:
            self.poke_now()
        await batch.done.wait()
        return batch

    # -- the checkpointer task ---------------------------------------------------------

    async def checkpoint_loop(self) -> None:
        """Copy the WAL back into the database while the writer keeps committing."""
        while True:
            await anyio.sleep(_CHECKPOINT_INTERVAL)
            if self.transactions == self.checkpointed_at:
                continue
            self.checkpointed_at = self.transactions
            try:
                await self.checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:  # a checkpoint is an optimisation; retry later
                _log.warning("wal_checkpoint_failed", path=str(self.path), error=str(exc))


def _locked(exc: sqlite3.Error) -> bool:
    """Whether SQLite gave up waiting for another connection's lock (SQLITE_BUSY)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)
