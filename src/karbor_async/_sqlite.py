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

Layout
    This module is the facade: :class:`SqliteStore` (the ``Store`` protocol),
    opening and closing, and the per-event methods, which fill the writer's
    pending batch directly. Each other concern has its own module, and imports
    go one way (down this list): ``_sqlite_leases`` (acquire, renew, release,
    the renew loop) and ``_sqlite_runs`` (creating and finishing runs, the
    checkpoint lifecycle, imports), both operations on ``_sqlite_writer`` (the
    write-behind batch loop, the write hold, group commit, fencing, the WAL
    checkpointer); ``_sqlite_queries`` (every read); ``_sqlite_state`` (the
    shared types: batches, operations, the lease book); ``_sqlite_records``
    (JSON and row codecs, the hook records); ``_sqlite_file`` (connections, WAL
    mode, migration) and ``_sqlite_schema`` (the file format).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite
import anyio
import attrs

from karbor_async._log import get_logger
from karbor_async._sqlite_file import (
    _BUSY_TIMEOUT,
    _close,
    _connect,
    _default_owner,
    _prepare,
    remove_store_files,
)
from karbor_async._sqlite_leases import _Leases
from karbor_async._sqlite_queries import _Queries
from karbor_async._sqlite_records import HookRecord, HookStatus, _encode
from karbor_async._sqlite_runs import _Runs
from karbor_async._sqlite_schema import inspect_file, read_only_uri
from karbor_async._sqlite_state import _LeaseBook
from karbor_async._sqlite_writer import _Writer
from karbor_async._types import ResourceKey, coerce_enum, coerce_optional
from karbor_async.events import Event, EventKind
from karbor_async.exceptions import LeaseHeldError, LeaseLostError, StoreError
from karbor_async.store import (
    CheckpointRecord,
    CheckpointStatus,
    RunOutcome,
    RunRecord,
)

__all__ = [
    "HookRecord",
    "HookStatus",
    "LeaseHeldError",
    "SqliteStore",
    "StoreStatistics",
]

_log = get_logger(__name__)

_CLOSE_TIMEOUT = 10.0
"""How long closing may take to flush pending writes and release leases."""


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
        self._owner = owner
        self._lease_seconds = lease_seconds
        book = _LeaseBook(owner=owner, path=path)
        self._book = book
        self._writes = _Writer(path=path, conn=writer, checkpointer=checkpointer, book=book)
        """The writer: the pending batch, the writer and checkpointer tasks, fencing."""
        self._leases = _Leases(writer=self._writes, book=book, lease_seconds=lease_seconds)
        self._runs = _Runs(writer=self._writes, book=book, lease_seconds=lease_seconds)
        self._queries = _Queries(reader=reader, check_open=self._writes.check_open)
        # The book's own dicts (never rebound), so that the per-event methods below
        # read them with one attribute load, as when they lived here.
        self._held = book.held
        self._lost = book.lost
        """Runs another owner took from this store, with their checkpoint ids."""
        self._lost_by_checkpoint = book.lost_by_checkpoint
        self._commits = 0

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
        read_only: bool = False,
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

        ``read_only``: only to read, never writing the file, so it works on read-only
        media (``immutable`` when nothing can be writing it, see ``read_only_uri``);
        the store must exist, and every write raises :class:`StoreError`.
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
        if read_only:
            async with _open_read_only(cls, db_path, owner=owner, check=check) as store:
                yield store
            return
        created = not await anyio.Path(db_path).exists()
        inspected = await anyio.to_thread.run_sync(
            functools.partial(inspect_file, db_path, check=check)
        )
        body_error: BaseException | None = None
        opened = False
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
                opened = True
                async with anyio.create_task_group() as tg:
                    await tg.start(store._writes.write_loop)
                    tg.start_soon(store._writes.checkpoint_loop)
                    if auto_renew:
                        tg.start_soon(store._leases.renew_loop)
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
        except BaseException:
            if created and not opened:
                # A failed creation (a full disk, a directory that refused it) leaves no
                # file behind: nothing was ever stored in it.
                with anyio.CancelScope(shield=True):
                    await remove_store_files(db_path)
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
        writes = self._writes
        return StoreStatistics(
            transactions=writes.transactions,
            events_written=writes.events_written,
            pending_writes=writes.pending.writes,
            commits_awaited=self._commits,
            leases_held=len(self._held),
            leases_lost=len(self._lost),
        )

    # -- the writer ----------------------------------------------------------------------

    def hold_background_writes(self, hold: bool) -> None:
        """While held, write-behind records wait for the next ``commit()`` (or the release).

        The engine holds them while anything it quiesced is frozen: each
        background transaction costs the event loop time (rows to encode,
        round trips to aiosqlite's thread) that a frozen application waits
        for. Commits and store operations are never held. Counted: several
        runs may hold at once.
        """
        self._writes.hold(hold)

    async def _shutdown(self) -> None:
        """Flush what is pending and release this store's leases (clean close)."""
        writes = self._writes
        writes.closed = True
        if self._held:
            await self._leases.release_all()
        else:
            await writes.wait_for(writes.pending if writes.pending.has_work else writes.inflight)

    # -- Store protocol: writes ----------------------------------------------------------

    def append(self, event: Event) -> None:
        """Enqueue a lifecycle event (a progress tick is kept coalesced, latest per resource)."""
        writes = self._writes
        if writes.closed or event.run_id in self._lost:
            writes.check_open()
            self._book.check(event.run_id)
        if event.kind is EventKind.PROGRESS:
            rtype, rid = event.resource or ("", "")
            writes.pending.progress[(event.run_id, rtype, rid)] = event
        else:
            writes.pending.events.append(event)
        writes.poke()

    def save_info(self, checkpoint_id: str, key: ResourceKey, info: Mapping[str, Any]) -> None:
        """Enqueue a resource's saved info (encoded now: later mutation does not leak in)."""
        writes = self._writes
        writes.check_open()
        if self._lost:
            self._book.check(self._lost_by_checkpoint.get(checkpoint_id, checkpoint_id))
        writes.pending.saved[(checkpoint_id, key[0], key[1])] = _encode(dict(info))
        writes.poke()

    def record_restored(self, run_id: str, key: ResourceKey, new_id: str) -> None:
        writes = self._writes
        writes.check_open()
        self._book.check(run_id)
        writes.pending.restored[(run_id, key[0], key[1])] = str(new_id)
        writes.poke()

    def release_resource(self, run_id: str, key: ResourceKey) -> None:
        """Give back one resource's lease before the run ends (its prepare is over);
        written behind, like events."""
        writes = self._writes
        writes.check_open()
        writes.pending.released.add((run_id, key[0], key[1]))
        writes.poke()

    async def commit(self, *, run_id: str | None = None) -> None:
        """Return when everything enqueued before this call is committed.

        Raises :class:`LeaseLostError` when writes were dropped because another
        owner took a run over (only for ``run_id`` if given), and
        :class:`StoreError` when write-behind records could not be written.
        """
        writes = self._writes
        writes.check_open()
        self._commits += 1
        batch = await writes.wait_for(
            writes.pending if writes.pending.has_work else writes.inflight
        )
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
        if writes.unreported is not None:
            error, writes.unreported = writes.unreported, None
            raise error

    async def create_run(self, record: RunRecord) -> None:
        """Record a new run and take its lease for this store's owner (a protect run also
        creates its checkpoint, ``protecting``). A duplicate id raises :class:`StoreError`."""
        await self._runs.create_run(record)

    async def finish_run(self, outcome: RunOutcome) -> None:
        """Store the outcome, end the run (``running`` -> its status), move a protect run's
        checkpoint to its end state and release the lease; commits everything before it."""
        await self._runs.finish_run(outcome)

    async def record_late_thaw(self, run_id: str, key: ResourceKey, at: float) -> None:
        """Set ``thawed_late_at`` of one resource of a finished run (its outcome otherwise kept)."""
        await self._runs.record_late_thaw(run_id, key, at)

    async def set_checkpoint_status(
        self, checkpoint_id: str, status: CheckpointStatus | str
    ) -> None:
        """Move a checkpoint along its lifecycle; an illegal transition raises, changes nothing."""
        status = coerce_enum(CheckpointStatus, status, "status")
        await self._runs.set_checkpoint_status(checkpoint_id, status)

    async def import_checkpoints(self, records: Iterable[CheckpointRecord]) -> int:
        """Insert finished checkpoints (and their protect runs) in one transaction.

        The bulk path for imports and for building large stores in tests and
        benchmarks; it bypasses the lifecycle. Returns how many were inserted.
        """
        return await self._runs.import_checkpoints(records)

    # -- leases ------------------------------------------------------------------------

    async def acquire_lease(
        self, run_id: str, owner: str | None = None, ttl: float | None = None
    ) -> int:
        """Take over ``run_id`` for ``owner`` (default: this store's) and return the new
        fencing token. Raises :class:`LeaseHeldError` if another owner's lease is live,
        :class:`IllegalTransitionError` if the run has ended."""
        return await self._leases.acquire(run_id, owner, ttl)

    async def renew_lease(self, run_id: str, ttl: float | None = None) -> None:
        """Extend this store's lease on ``run_id``; :class:`LeaseLostError` if it was taken."""
        await self._leases.renew(run_id, ttl)

    async def release_lease(self, run_id: str) -> None:
        """Give up this store's lease on ``run_id`` (the run becomes recoverable at once)."""
        await self._leases.release(run_id)

    async def unfinished_runs(self) -> list[RunRecord]:
        """Runs still ``running`` that recovery may take now (oldest first): no owner,
        an expired lease, or an owner on this host whose process no longer runs."""
        return (await self._queries.unfinished_runs(self.owner))[0]

    async def held_runs(self) -> list[tuple[RunRecord, str, float]]:
        """Runs still ``running`` that a live engine other than this store holds, with
        its owner name and lease expiry (wall clock): what recovery leaves alone."""
        return (await self._queries.unfinished_runs(self.owner))[1]

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
        status: CheckpointStatus | str | None = None,
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
            status=coerce_optional(CheckpointStatus, status, "status"),
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


@contextlib.asynccontextmanager
async def _open_read_only(
    cls: type[SqliteStore], db_path: Path, *, owner: str | None, check: bool
) -> AsyncIterator[SqliteStore]:
    """``SqliteStore.open(read_only=True)``: one read-only connection, nothing written."""
    if not await anyio.Path(db_path).is_file():
        raise StoreError(
            f"no checkpoint store at {db_path} to read: protect something first, or give "
            "the path of an existing store"
        )
    version = await anyio.to_thread.run_sync(functools.partial(inspect_file, db_path, check=check))
    if version == 0:
        raise StoreError(
            f"{db_path} holds no checkpoint store yet (it is empty, left untouched): a "
            "write (protect) makes it one"
        )
    reader = await aiosqlite.connect(
        read_only_uri(db_path), uri=True, isolation_level=None, timeout=_BUSY_TIMEOUT
    )
    try:
        reader.row_factory = sqlite3.Row
        await reader.execute("PRAGMA query_only = ON")
        store = cls(
            path=db_path,
            writer=reader,
            reader=reader,
            checkpointer=reader,
            owner=owner or _default_owner(),
            lease_seconds=30.0,
        )
        store._writes.read_only = store._writes.closed = True  # every write refused
        store._queries.check_open = lambda: None
        yield store
    finally:
        with anyio.CancelScope(shield=True):
            await reader.close()
