"""The SQLite checkpoint store: one WAL file, one writer task, group commit, leased runs.

``SqliteStore.open(path)`` is an async context manager (asyncio only: aiosqlite
resolves its futures on an asyncio loop). It owns two connections and a task
group: the *writer* task is the only code that writes, and the *renewer* task
keeps this store's leases alive.

Writes
    :meth:`~SqliteStore.append`, :meth:`~SqliteStore.save_info` and
    :meth:`~SqliteStore.record_restored` are synchronous and cost a list append:
    they go into the pending batch. The writer drains the pending batch in one
    transaction whenever it has work (write-behind). :meth:`~SqliteStore.commit`
    returns once everything enqueued before it is committed; callers that
    commit at the same time share one transaction. The async operations
    (``create_run``, ``finish_run``, lifecycle changes, leases) ride the same
    batches, each in its own savepoint, so one that raises changes nothing.
    Events are encoded to JSON on the writer connection's thread, not on the
    event loop.

Reads
    go through a second, read-only connection and see what is committed (WAL
    readers never wait for the writer). A subscriber therefore reads events only
    once they are durable, as DESIGN.md section 6 asks.

Leases and fencing
    ``create_run`` takes a lease for this store's ``owner`` (token 1). A
    recovering engine calls :meth:`~SqliteStore.unfinished_runs` and
    :meth:`~SqliteStore.acquire_lease`, which bumps the run's fencing token.
    Every batch checks, inside its write transaction, that each leased run it
    touches still carries the token this store was given; writes of a run that
    another owner took over are dropped and :class:`LeaseLostError` is raised
    from ``commit()`` and from the next write of that run.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite
import anyio
import attrs
import structlog
from anyio.abc import TaskStatus

from karbor_async._sqlite_file import _close, _connect, _default_owner, _fetchone, _prepare
from karbor_async._sqlite_queries import _Queries
from karbor_async._sqlite_records import (
    _INSERT_EVENT,
    _UPSERT_PROGRESS,
    _UPSERT_RESTORED,
    _UPSERT_SAVED,
    HookRecord,
    HookStatus,
    _encode,
    _event_row,
    _outcome_from,
    _progress_rows,
)
from karbor_async._sqlite_schema import inspect_file
from karbor_async._sqlite_state import _Batch, _LeaseBook, _Op
from karbor_async._types import OperationKind, ResourceKey, RunStatus
from karbor_async.events import Event, EventKind
from karbor_async.exceptions import (
    CheckpointNotFoundError,
    IllegalTransitionError,
    LeaseHeldError,
    LeaseLostError,
    StoreError,
)
from karbor_async.store import (
    CheckpointRecord,
    CheckpointStatus,
    RunOutcome,
    RunRecord,
    check_checkpoint_transition,
    with_late_thaw,
)

__all__ = [
    "HookRecord",
    "HookStatus",
    "LeaseHeldError",
    "SqliteStore",
    "StoreStatistics",
]

_log = structlog.get_logger(__name__)

_T = TypeVar("_T")

_CLOSE_TIMEOUT = 10.0
"""How long closing may take to flush pending writes and release leases."""

_CHECKPOINT_INTERVAL = 0.5
"""How often the checkpointer copies new WAL content into the database file."""

_MAX_HELD_WRITES = 20_000
"""Write-behind records held back (see ``hold_background_writes``) before writing anyway."""

_END_STATUS = {
    RunStatus.SUCCEEDED: CheckpointStatus.AVAILABLE,
    RunStatus.FAILED: CheckpointStatus.ERROR,
    RunStatus.CANCELLED: CheckpointStatus.CANCELLED,
}

_IMPORT_RUN_STATUS = {
    CheckpointStatus.PROTECTING: RunStatus.RUNNING,
    CheckpointStatus.AVAILABLE: RunStatus.SUCCEEDED,
    CheckpointStatus.ERROR: RunStatus.FAILED,
    CheckpointStatus.CANCELLED: RunStatus.CANCELLED,
}


@attrs.frozen
class StoreStatistics:
    """A snapshot of the store's writer."""

    transactions: int
    """Write transactions committed since the store was opened."""
    events_written: int
    """Lifecycle events committed since the store was opened."""
    pending_writes: int
    """Records enqueued and not yet handed to the writer."""
    commits_awaited: int
    """How many times :meth:`SqliteStore.commit` was awaited."""
    leases_held: int
    leases_lost: int


class SqliteStore:
    """A :class:`~karbor_async.store.Store` in one SQLite file (WAL, ``synchronous=NORMAL``).

    Create it with :meth:`open`; it is usable only inside that context.
    Durable means it survives the process being killed, not power loss.
    """

    def __init__(
        self,
        *,
        path: Path,
        writer: aiosqlite.Connection,
        reader: aiosqlite.Connection,
        checkpointer: aiosqlite.Connection,
        owner: str,
        lease_seconds: float,
    ) -> None:
        self._path = path
        self._writer = writer
        self._reader = reader
        self._checkpointer = checkpointer
        self._checkpointed_at = 0
        self._owner = owner
        self._lease_seconds = lease_seconds
        self._pending = _Batch()
        self._inflight: _Batch | None = None
        self._wake = anyio.Event()
        self._poked = False
        self._quiet = 0
        self._closed = False
        book = _LeaseBook(owner=owner, path=path)
        self._book = book
        # The book's own dicts (never rebound), so that the per-event methods below
        # read them with one attribute load, as when they lived here.
        self._held = book.held
        self._lost = book.lost
        """Runs another owner took from this store, with their checkpoint ids."""
        self._lost_by_checkpoint = book.lost_by_checkpoint
        self._unreported: StoreError | None = None
        self._transactions = 0
        self._events_written = 0
        self._commits = 0
        self._queries = _Queries(reader=reader, check_open=self._check_open)

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        owner: str | None = None,
        lease_seconds: float = 30.0,
        auto_renew: bool = True,
        check: bool = True,
    ) -> AsyncIterator[SqliteStore]:
        """Open (creating or migrating) the store at ``path`` for the duration of the block.

        ``owner`` names this engine in leases (default: host, pid and a random
        suffix). Leases last ``lease_seconds`` and are renewed every third of
        that while ``auto_renew`` is on. ``check`` runs SQLite's quick integrity
        check when opening an existing file. A file that is not a karbor-async
        store, is corrupt, or comes from a newer version is refused with a
        :class:`~karbor_async._sqlite_schema.StoreFileError` and left untouched.
        Leaving the block flushes pending writes and releases this store's leases,
        so another engine can recover unfinished runs at once.
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            raise StoreError(
                "SqliteStore runs on asyncio only (aiosqlite resolves asyncio futures); "
                "use MemoryStore or run the engine on asyncio"
            ) from None
        if lease_seconds <= 0:
            raise ValueError(f"lease_seconds must be positive, not {lease_seconds!r}")
        db_path = Path(path)
        inspected = await anyio.to_thread.run_sync(
            functools.partial(inspect_file, db_path, check=check)
        )
        body_error: BaseException | None = None
        try:
            async with contextlib.AsyncExitStack() as connections:
                writer = await _connect(db_path, read_only=False)
                connections.push_async_callback(_close, writer)
                version = await _prepare(writer, db_path, inspected)
                reader = await _connect(db_path, read_only=True)
                connections.push_async_callback(_close, reader)
                checkpointer = await _connect(db_path, read_only=False)
                connections.push_async_callback(_close, checkpointer)
                store = cls(
                    path=db_path,
                    writer=writer,
                    reader=reader,
                    checkpointer=checkpointer,
                    owner=owner or _default_owner(),
                    lease_seconds=lease_seconds,
                )
                _log.info(
                    "sqlite_store_opened",
                    path=str(db_path),
                    schema_version=version,
                    owner=store.owner,
                )
                async with anyio.create_task_group() as tg:
                    await tg.start(store._write_loop)
                    tg.start_soon(store._checkpoint_loop)
                    if auto_renew:
                        tg.start_soon(store._renew_loop)
                    try:
                        yield store
                    except BaseException as exc:
                        body_error = exc
                        raise
                    finally:
                        with anyio.CancelScope(
                            shield=True, deadline=anyio.current_time() + _CLOSE_TIMEOUT
                        ):
                            await store._shutdown()
                        tg.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The task group wraps what the caller's block raised; give it back as it
            # was (the store's own tasks only end by cancellation).
            if body_error is None or list(group.exceptions) != [body_error]:
                raise
        if body_error is not None:
            raise body_error
        _log.info("sqlite_store_closed", path=str(db_path))

    # -- properties ----------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def owner(self) -> str:
        """The lease owner name this store writes for."""
        return self._owner

    @property
    def commits(self) -> int:
        """How many times :meth:`commit` was awaited (like ``MemoryStore.commits``)."""
        return self._commits

    def statistics(self) -> StoreStatistics:
        return StoreStatistics(
            transactions=self._transactions,
            events_written=self._events_written,
            pending_writes=self._pending.writes,
            commits_awaited=self._commits,
            leases_held=len(self._held),
            leases_lost=len(self._lost),
        )

    # -- the writer ----------------------------------------------------------------------

    def _poke(self) -> None:
        """A write-behind record is waiting: wake the writer, unless writes are held."""
        if self._quiet and self._pending.writes < _MAX_HELD_WRITES:
            return
        self._poke_now()

    def _poke_now(self) -> None:
        if not self._poked:
            self._poked = True
            self._wake.set()

    def hold_background_writes(self, hold: bool) -> None:
        """While held, write-behind records wait for the next ``commit()`` (or the release).

        The engine holds them while anything it quiesced is frozen: each
        background transaction costs the event loop time (rows to encode,
        round trips to aiosqlite's thread) that a frozen application waits
        for. Commits and store operations are never held. Counted: several
        runs may hold at once.
        """
        self._quiet += 1 if hold else -1
        if self._quiet < 0:
            self._quiet = 0
        if not self._quiet and self._pending.has_work:
            self._poke_now()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the store {self._path} is closed")

    async def _write_loop(
        self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        task_status.started()
        while True:
            await self._wake.wait()
            batch, self._pending = self._pending, _Batch()
            self._wake = anyio.Event()
            self._poked = False
            self._inflight = batch
            try:
                # A batch is short; shielding it keeps a transaction from being cut in half.
                with anyio.CancelScope(shield=True):
                    await self._write_batch(batch)
            finally:
                self._inflight = None
                if batch.error is not None and batch.waiters == 0:
                    self._unreported = batch.error
                batch.done.set()

    async def _write_batch(self, batch: _Batch) -> None:
        conn = self._writer
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
            error = StoreError(f"writing to the store {self._path} failed: {exc}")
            error.__cause__ = exc
            batch.error = error
            for op in batch.ops:
                op.error = op.error or error
            _log.error("store_write_failed", path=str(self._path), error=str(exc))
            return
        self._transactions += 1
        self._events_written += len(batch.events)

    async def _fence(self, batch: _Batch) -> None:
        """Drop the writes of runs another owner took over (checked under the write lock).

        A run is dropped if it was already known lost (its lease may have been found
        taken after its records were enqueued) or if the token in the file is no
        longer the one this store was given.
        """
        if not self._held and not self._lost:
            return
        by_checkpoint = (
            {**self._lost_by_checkpoint, **self._book.held_by_checkpoint} if batch.saved else {}
        )
        touched = batch.run_ids(by_checkpoint)
        lost = touched & self._lost.keys()
        check = touched & self._held.keys()
        if check:
            marks = ", ".join("?" * len(check))
            rows = await self._writer.execute_fetchall(
                f"SELECT run_id, lease_token FROM runs WHERE run_id IN ({marks})",
                tuple(check),
            )
            tokens = {str(r[0]): int(r[1]) for r in rows}
            taken = {r for r in check if tokens.get(r) != self._held[r].token}
            self._book.mark_lost(taken)
            lost |= taken
        if lost:
            batch.drop_runs(lost, {r: self._lost[r] for r in lost})
            batch.lost |= lost

    async def _write_records(self, batch: _Batch) -> None:
        conn = self._writer
        await conn.execute("SAVEPOINT records")
        try:
            await self._write_all(batch)
        except (sqlite3.Error, TypeError, ValueError) as exc:
            await conn.execute("ROLLBACK TO records")
            failures = await self._write_one_by_one(batch)
            error = StoreError(
                f"{len(failures)} record(s) could not be written to {self._path} "
                f"and were dropped: {'; '.join(failures[:5])}"
            )
            error.__cause__ = exc
            batch.error = error
            _log.error("store_records_dropped", path=str(self._path), failures=failures[:20])
        await conn.execute("RELEASE records")

    async def _write_all(self, batch: _Batch) -> None:
        conn = self._writer
        if batch.events:
            await conn.executemany(_INSERT_EVENT, map(_event_row, batch.events))
        if batch.progress:
            await conn.executemany(_UPSERT_PROGRESS, _progress_rows(batch.progress))
        if batch.saved:
            await conn.executemany(_UPSERT_SAVED, [(*k, v) for k, v in batch.saved.items()])
        if batch.restored:
            await conn.executemany(_UPSERT_RESTORED, [(*k, v) for k, v in batch.restored.items()])

    async def _write_one_by_one(self, batch: _Batch) -> list[str]:
        """After a failed bulk write: write each record alone and report the ones that fail."""
        conn = self._writer
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
        return failures

    async def _submit(
        self, fn: Callable[[aiosqlite.Connection], Awaitable[_T]]
    ) -> tuple[_T, _Batch]:
        """Run ``fn`` in the writer's next transaction and wait for it to commit."""
        self._check_open()
        return await self._submit_unchecked(fn)

    async def _submit_unchecked(
        self, fn: Callable[[aiosqlite.Connection], Awaitable[_T]]
    ) -> tuple[_T, _Batch]:
        op: _Op[_T] = _Op(fn)
        batch = self._pending
        batch.ops.append(op)
        batch.waiters += 1
        self._poke_now()
        await batch.done.wait()
        if op.error is not None:
            raise op.error
        return cast(_T, op.result), batch

    async def _shutdown(self) -> None:
        """Flush what is pending and release this store's leases (clean close)."""
        self._closed = True
        held = list(self._held)
        if held:

            async def release(conn: aiosqlite.Connection) -> None:
                await conn.executemany(
                    "UPDATE runs SET lease_owner = NULL, lease_expires = 0"
                    " WHERE run_id = ? AND lease_token = ? AND status = 'running'",
                    [(r, self._held[r].token) for r in held],
                )

            try:
                await self._submit_unchecked(release)
            except StoreError as exc:
                _log.error("lease_release_failed", path=str(self._path), error=str(exc))
            for run_id in held:
                self._book.unhold(run_id)
        else:
            await self._wait_for(self._pending if self._pending.has_work else self._inflight)

    async def _wait_for(self, batch: _Batch | None) -> _Batch | None:
        if batch is None:
            return None
        batch.waiters += 1
        if batch is self._pending:
            self._poke_now()
        await batch.done.wait()
        return batch

    async def _checkpoint_loop(self) -> None:
        """Copy the WAL back into the database while the writer keeps committing."""
        while True:
            await anyio.sleep(_CHECKPOINT_INTERVAL)
            if self._transactions == self._checkpointed_at:
                continue
            self._checkpointed_at = self._transactions
            try:
                await self._checkpointer.execute("PRAGMA wal_checkpoint(PASSIVE)")
            except sqlite3.Error as exc:  # a checkpoint is an optimisation; retry later
                _log.warning("wal_checkpoint_failed", path=str(self._path), error=str(exc))

    async def _renew_loop(self) -> None:
        interval = self._lease_seconds / 3
        while True:
            await anyio.sleep(interval)
            if not self._held or self._closed:
                continue
            held = {r: h.token for r, h in self._held.items()}
            try:
                renewed, _ = await self._submit(functools.partial(self._renew_op, held))
            except StoreError as exc:
                _log.error("lease_renew_failed", path=str(self._path), error=str(exc))
                continue
            self._book.mark_lost(
                [
                    r
                    for r, token in held.items()
                    if r not in renewed and r in self._held and self._held[r].token == token
                ]
            )

    async def _renew_op(self, held: Mapping[str, int], conn: aiosqlite.Connection) -> set[str]:
        expires = time.time() + self._lease_seconds
        renewed: set[str] = set()
        for run_id, token in held.items():
            async with conn.execute(
                "UPDATE runs SET lease_expires = ? WHERE run_id = ? AND lease_token = ?",
                (expires, run_id, token),
            ) as cur:
                if cur.rowcount:
                    renewed.add(run_id)
        return renewed

    # -- Store protocol: writes ----------------------------------------------------------

    def append(self, event: Event) -> None:
        """Enqueue a lifecycle event (a progress tick is kept coalesced, latest per resource)."""
        if self._closed or event.run_id in self._lost:
            self._check_open()
            self._book.check(event.run_id)
        if event.kind is EventKind.PROGRESS:
            rtype, rid = event.resource or ("", "")
            self._pending.progress[(event.run_id, rtype, rid)] = event
        else:
            self._pending.events.append(event)
        self._poke()

    def save_info(self, checkpoint_id: str, key: ResourceKey, info: Mapping[str, Any]) -> None:
        """Enqueue a resource's saved info (encoded now: later mutation does not leak in)."""
        self._check_open()
        if self._lost:
            self._book.check(self._lost_by_checkpoint.get(checkpoint_id, checkpoint_id))
        self._pending.saved[(checkpoint_id, key[0], key[1])] = _encode(dict(info))
        self._poke()

    def record_restored(self, run_id: str, key: ResourceKey, new_id: str) -> None:
        self._check_open()
        self._book.check(run_id)
        self._pending.restored[(run_id, key[0], key[1])] = str(new_id)
        self._poke()

    async def commit(self, *, run_id: str | None = None) -> None:
        """Return when everything enqueued before this call is committed.

        Raises :class:`LeaseLostError` when writes were dropped because another
        owner took a run over (only for ``run_id`` if given), and
        :class:`StoreError` when write-behind records could not be written.
        """
        self._check_open()
        self._commits += 1
        batch = await self._wait_for(self._pending if self._pending.has_work else self._inflight)
        if run_id is not None:
            self._book.check(run_id)
        if batch is not None:
            if batch.lost and (run_id is None or run_id in batch.lost):
                names = ", ".join(sorted(batch.lost))
                raise LeaseLostError(
                    f"writes of run(s) {names} were dropped: another engine owns them now"
                )
            if batch.error is not None:
                raise batch.error
        if self._unreported is not None:
            error, self._unreported = self._unreported, None
            raise error

    async def create_run(self, record: RunRecord) -> None:
        """Record a new run and take its lease for this store's owner (a protect run also
        creates its checkpoint, ``protecting``). A duplicate id raises :class:`StoreError`."""
        plan = _encode(record.plan)
        graph = _encode(record.graph)
        outcome = None if record.outcome is None else _encode(record.outcome.to_json())
        leased = record.status is RunStatus.RUNNING

        async def op(conn: aiosqlite.Connection) -> None:
            expires = time.time() + self._lease_seconds
            try:
                await conn.execute(
                    "INSERT INTO runs (run_id, operation, checkpoint_id, plan, graph, status,"
                    " started_wall, outcome, lease_owner, lease_token, lease_expires)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        record.run_id,
                        record.operation.value,
                        record.checkpoint_id,
                        plan,
                        graph,
                        record.status.value,
                        record.started_wall,
                        outcome,
                        self._owner if leased else None,
                        1 if leased else 0,
                        expires if leased else 0.0,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise StoreError(f"a run with id {record.run_id!r} already exists") from exc
            if record.operation is OperationKind.PROTECT:
                try:
                    await conn.execute(
                        "INSERT INTO checkpoints (id, plan_name, status, created_wall)"
                        " VALUES (?, ?, ?, ?)",
                        (
                            record.checkpoint_id,
                            str(record.plan.get("name", "")),
                            CheckpointStatus.PROTECTING.value,
                            record.started_wall,
                        ),
                    )
                except sqlite3.IntegrityError as exc:
                    raise StoreError(
                        f"a checkpoint with id {record.checkpoint_id!r} already exists"
                    ) from exc

        await self._submit(op)
        if leased:
            self._book.hold(record.run_id, 1, record.checkpoint_id)

    async def finish_run(self, outcome: RunOutcome) -> None:
        """Store the outcome, end the run (``running`` -> its status), move a protect run's
        checkpoint to its end state and release the lease; commits everything before it."""
        if outcome.status is RunStatus.RUNNING:
            raise IllegalTransitionError(f"run {outcome.run_id!r} cannot finish as running")
        self._book.check(outcome.run_id)
        body = _encode(outcome.to_json())
        held = self._held.get(outcome.run_id)

        async def op(conn: aiosqlite.Connection) -> None:
            row = await _fetchone(
                conn,
                "SELECT operation, checkpoint_id, status, lease_token FROM runs WHERE run_id = ?",
                (outcome.run_id,),
            )
            if row is None:
                raise CheckpointNotFoundError(f"no run with id {outcome.run_id!r}")
            if held is not None and int(row["lease_token"]) != held.token:
                self._book.mark_lost([outcome.run_id])
                raise LeaseLostError(
                    f"run {outcome.run_id!r} is owned by another engine now; "
                    "its outcome was not stored"
                )
            old = RunStatus(row["status"])
            if old is not RunStatus.RUNNING:
                raise IllegalTransitionError(
                    f"run {outcome.run_id!r} already ended {old.value}; it cannot end again"
                )
            if OperationKind(row["operation"]) is OperationKind.PROTECT:
                await self._finish_checkpoint(conn, row["checkpoint_id"], outcome)
            await conn.execute(
                "UPDATE runs SET status = ?, ended_wall = ?, outcome = ?, error = ?,"
                " lease_owner = NULL, lease_expires = 0 WHERE run_id = ?",
                (outcome.status.value, outcome.ended_wall, body, outcome.error, outcome.run_id),
            )
            await conn.executemany(
                "INSERT OR REPLACE INTO resource_outcomes (run_id, rtype, rid, grp, status,"
                " failed_hook, error, cut_at, quiesced_at, thawed_at, crash_consistent,"
                " thawed_early, attempt, abandoned_hook, thawed_late_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        outcome.run_id,
                        key[0],
                        key[1],
                        r.group,
                        r.status.value,
                        r.failed_hook.value if r.failed_hook else None,
                        r.error,
                        r.cut_at,
                        r.quiesced_at,
                        r.thawed_at,
                        int(r.crash_consistent),
                        int(r.thawed_early),
                        r.attempt,
                        r.abandoned_hook.value if r.abandoned_hook else None,
                        r.thawed_late_at,
                    )
                    for key, r in outcome.resources.items()
                ],
            )

        _, batch = await self._submit(op)
        self._book.unhold(outcome.run_id)
        if batch.error is not None:
            raise batch.error

    async def record_late_thaw(self, run_id: str, key: ResourceKey, at: float) -> None:
        """Set ``thawed_late_at`` of one resource of a finished run (its outcome otherwise kept)."""
        self._check_open()

        async def op(conn: aiosqlite.Connection) -> None:
            row = await _fetchone(conn, "SELECT outcome FROM runs WHERE run_id = ?", (run_id,))
            outcome = _outcome_from(row["outcome"]) if row is not None else None
            if outcome is None:
                raise CheckpointNotFoundError(f"no finished run with id {run_id!r}")
            updated = with_late_thaw(outcome, key, at)
            await conn.execute(
                "UPDATE runs SET outcome = ? WHERE run_id = ?",
                (_encode(updated.to_json()), run_id),
            )
            await conn.execute(
                "UPDATE resource_outcomes SET thawed_late_at = ?"
                " WHERE run_id = ? AND rtype = ? AND rid = ?",
                (at, run_id, key[0], key[1]),
            )

        _, batch = await self._submit_unchecked(op)
        if batch.error is not None:
            raise batch.error

    async def _finish_checkpoint(
        self, conn: aiosqlite.Connection, checkpoint_id: str, outcome: RunOutcome
    ) -> None:
        row = await _fetchone(conn, "SELECT status FROM checkpoints WHERE id = ?", (checkpoint_id,))
        if row is None:
            raise CheckpointNotFoundError(f"no checkpoint with id {checkpoint_id!r}")
        new = _END_STATUS[outcome.status]
        check_checkpoint_transition(CheckpointStatus(row["status"]), new)
        await conn.execute(
            "UPDATE checkpoints SET status = ?, ended_wall = ?, resources = ?, skew = ?,"
            " crash_consistent = ?, error = ? WHERE id = ?",
            (
                new.value,
                outcome.ended_wall,
                len(outcome.resources),
                outcome.skew,
                int(outcome.crash_consistent),
                outcome.error,
                checkpoint_id,
            ),
        )

    async def set_checkpoint_status(self, checkpoint_id: str, status: CheckpointStatus) -> None:
        """Move a checkpoint along its lifecycle; an illegal transition raises, changes nothing."""

        async def op(conn: aiosqlite.Connection) -> None:
            row = await _fetchone(
                conn, "SELECT status FROM checkpoints WHERE id = ?", (checkpoint_id,)
            )
            if row is None:
                raise CheckpointNotFoundError(f"no checkpoint with id {checkpoint_id!r}")
            check_checkpoint_transition(CheckpointStatus(row["status"]), status)
            await conn.execute(
                "UPDATE checkpoints SET status = ? WHERE id = ?", (status.value, checkpoint_id)
            )

        await self._submit(op)

    async def import_checkpoints(self, records: Iterable[CheckpointRecord]) -> int:
        """Insert finished checkpoints (and their protect runs) in one transaction.

        The bulk path for imports and for building large stores in tests and
        benchmarks; it bypasses the lifecycle. Returns how many were inserted.
        """
        rows = list(records)

        def run_rows() -> Iterator[tuple[object, ...]]:
            for c in rows:
                status = (
                    c.outcome.status
                    if c.outcome
                    else _IMPORT_RUN_STATUS.get(c.status, RunStatus.SUCCEEDED)
                )
                yield (
                    c.id,
                    OperationKind.PROTECT.value,
                    c.id,
                    _encode(c.plan),
                    _encode(c.graph),
                    status.value,
                    c.created_wall,
                    None if c.outcome is None else c.outcome.ended_wall,
                    None if c.outcome is None else _encode(c.outcome.to_json()),
                )

        def checkpoint_rows() -> Iterator[tuple[object, ...]]:
            for c in rows:
                o = c.outcome
                yield (
                    c.id,
                    c.plan_name,
                    c.status.value,
                    c.created_wall,
                    None if o is None else o.ended_wall,
                    None if o is None else len(o.resources),
                    None if o is None else o.skew,
                    None if o is None else int(o.crash_consistent),
                    None if o is None else o.error,
                )

        async def op(conn: aiosqlite.Connection) -> None:
            try:
                await conn.executemany(
                    "INSERT INTO runs (run_id, operation, checkpoint_id, plan, graph, status,"
                    " started_wall, ended_wall, outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    run_rows(),
                )
                await conn.executemany(
                    "INSERT INTO checkpoints (id, plan_name, status, created_wall, ended_wall,"
                    " resources, skew, crash_consistent, error)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    checkpoint_rows(),
                )
            except sqlite3.IntegrityError as exc:
                raise StoreError(f"importing checkpoints failed: {exc}") from exc

        await self._submit(op)
        return len(rows)

    # -- leases ------------------------------------------------------------------------

    async def acquire_lease(
        self, run_id: str, owner: str | None = None, ttl: float | None = None
    ) -> int:
        """Take over ``run_id`` for ``owner`` (default: this store's) and return the new
        fencing token. Raises :class:`LeaseHeldError` if another owner's lease is live,
        :class:`IllegalTransitionError` if the run has ended."""
        who = owner or self._owner
        seconds = self._lease_seconds if ttl is None else ttl

        async def op(conn: aiosqlite.Connection) -> tuple[int, str]:
            row = await _fetchone(
                conn,
                "SELECT checkpoint_id, status, lease_owner, lease_token, lease_expires"
                " FROM runs WHERE run_id = ?",
                (run_id,),
            )
            if row is None:
                raise CheckpointNotFoundError(f"no run with id {run_id!r}")
            if RunStatus(row["status"]) is not RunStatus.RUNNING:
                raise IllegalTransitionError(
                    f"run {run_id!r} has ended ({row['status']}); there is nothing to take over"
                )
            now = time.time()
            current = row["lease_owner"]
            if current is not None and current != who and float(row["lease_expires"]) > now:
                raise LeaseHeldError(
                    f"run {run_id!r} is owned by {current} for another "
                    f"{float(row['lease_expires']) - now:.1f}s; leave it to that engine"
                )
            token = int(row["lease_token"]) + 1
            await conn.execute(
                "UPDATE runs SET lease_owner = ?, lease_token = ?, lease_expires = ?"
                " WHERE run_id = ?",
                (who, token, now + seconds, run_id),
            )
            return token, str(row["checkpoint_id"])

        (token, checkpoint_id), _ = await self._submit(op)
        self._book.hold(run_id, token, checkpoint_id)
        _log.info("lease_acquired", run_id=run_id, owner=who, token=token)
        return token

    async def renew_lease(self, run_id: str, ttl: float | None = None) -> None:
        """Extend this store's lease on ``run_id``; :class:`LeaseLostError` if it was taken."""
        self._book.check(run_id)
        held = self._held.get(run_id)
        if held is None:
            raise LeaseLostError(f"this store holds no lease on run {run_id!r}")
        seconds = self._lease_seconds if ttl is None else ttl
        renewed, _ = await self._submit(
            functools.partial(self._renew_with_ttl, run_id, held.token, seconds)
        )
        if not renewed:
            self._book.mark_lost([run_id])
            raise LeaseLostError(f"run {run_id!r} is owned by another engine now")

    @staticmethod
    async def _renew_with_ttl(
        run_id: str, token: int, seconds: float, conn: aiosqlite.Connection
    ) -> bool:
        async with conn.execute(
            "UPDATE runs SET lease_expires = ? WHERE run_id = ? AND lease_token = ?",
            (time.time() + seconds, run_id, token),
        ) as cur:
            return cur.rowcount > 0

    async def release_lease(self, run_id: str) -> None:
        """Give up this store's lease on ``run_id`` (the run becomes recoverable at once)."""
        held = self._held.get(run_id)
        if held is None:
            return
        token = held.token

        async def op(conn: aiosqlite.Connection) -> None:
            await conn.execute(
                "UPDATE runs SET lease_owner = NULL, lease_expires = 0"
                " WHERE run_id = ? AND lease_token = ?",
                (run_id, token),
            )

        await self._submit(op)
        self._book.unhold(run_id)

    async def unfinished_runs(self) -> list[RunRecord]:
        """Runs still ``running`` whose lease expired or that have no owner (oldest first)."""
        return await self._queries.unfinished_runs()

    def fencing_token(self, run_id: str) -> int | None:
        """The token this store holds for ``run_id`` (``None`` if it holds no lease)."""
        held = self._held.get(run_id)
        return None if held is None else held.token

    # -- Store protocol: reads ---------------------------------------------------------

    async def get_run(self, run_id: str) -> RunRecord:
        return await self._queries.get_run(run_id)

    async def get_checkpoint(self, checkpoint_id: str) -> CheckpointRecord:
        return await self._queries.get_checkpoint(checkpoint_id)

    async def list_checkpoints(
        self,
        *,
        plan_name: str | None = None,
        status: CheckpointStatus | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        before_id: str | None = None,
    ) -> Sequence[CheckpointRecord]:
        """Newest first; page with ``before_id`` (the last id of the previous page).

        Keyset paging on ``(created_wall, id)``: each page costs an index seek,
        however deep. An unknown ``before_id`` gives an empty page.
        """
        return await self._queries.list_checkpoints(
            plan_name=plan_name,
            status=status,
            since=since,
            until=until,
            limit=limit,
            before_id=before_id,
        )

    async def list_runs(
        self, *, checkpoint_id: str | None = None, limit: int = 100
    ) -> Sequence[RunRecord]:
        return await self._queries.list_runs(checkpoint_id=checkpoint_id, limit=limit)

    async def load_saved_info(self, checkpoint_id: str) -> dict[ResourceKey, dict[str, Any]]:
        return await self._queries.load_saved_info(checkpoint_id)

    async def load_restored(self, run_id: str) -> dict[ResourceKey, str]:
        return await self._queries.load_restored(run_id)

    async def read_events(
        self, run_id: str, since: int = 0, *, limit: int | None = None
    ) -> Sequence[Event]:
        """Committed lifecycle events of a run with ``seq > since``, in order (up to ``limit``)."""
        return await self._queries.read_events(run_id, since, limit=limit)

    async def last_seq(self, run_id: str) -> int:
        """The highest committed lifecycle ``seq`` of a run (0 if none)."""
        return await self._queries.last_seq(run_id)

    async def load_hook_records(self, run_id: str) -> list[HookRecord]:
        """Every committed hook call of a run, per resource, hook and attempt, in start order."""
        return await self._queries.load_hook_records(run_id)

    async def load_progress(self, run_id: str) -> list[Event]:
        """The latest committed progress tick of each resource of a run."""
        return await self._queries.load_progress(run_id)
