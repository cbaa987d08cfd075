"""The PostgreSQL checkpoint store: one database shared by several engines (asyncio only).

``PostgresStore.open(dsn)`` is an async context manager. It owns a writer
connection, a small reader pool and a task group: the *writer* task is the only
code that writes, the *renewer* keeps this store's leases alive and the
*listener* serves live events to subscribers.

Writes
    :meth:`~PostgresStore.append`, :meth:`~PostgresStore.save_info`,
    :meth:`~PostgresStore.record_restored` and :meth:`~PostgresStore.release_resource`
    cost a list append; the writer writes the pending batch in one transaction
    whenever it has work. Every other write (``create_run``, ``finish_run``,
    leases, ...) and :meth:`~PostgresStore.commit` is handed to the writer, which
    first writes the pending batch, then the operation in a transaction of its
    own (so ``finish_run`` commits what came before it); the caller waits for
    its result. A caller that is cancelled stops waiting; its write still lands
    or fails whole, never half (as in the SQLite store).

A lost connection (``_pg_link``)
    A server restart, a failover or a killed backend costs a reconnect, not the
    run: the writer reconnects within ``reconnect_seconds`` and runs the lost
    transaction again (one lost during its ``COMMIT`` is settled by asking the
    server whether its transaction id committed, so nothing is written twice);
    reads are retried; the listener LISTENs again and wakes every subscriber to
    read the rows after the last seq it saw, so none misses an event. Past the
    window, the waiting writes raise
    :class:`~karbor_async.exceptions.StoreUnavailableError` and the records not
    written stay pending, written once the server is back (a run at a commit
    point fails, thawing everything, and is left to recovery).

Sequence numbers
    Each lifecycle event's ``seq`` is taken from the run's counter row
    (``run_seq``) in the transaction that writes it, so seqs are consecutive and
    in commit order whoever writes; the engine's own number is not stored. The
    transaction also NOTIFYs ``karbor_events`` with the run id and its last seq.

Leases and fencing
    As the SQLite store: ``create_run`` takes token 1 for this store's owner
    (``host:pid:start:nonce``); :meth:`~PostgresStore.acquire_lease` bumps the
    token; every batch locks the rows of the leased runs it touches and drops the
    writes of a run whose token moved on, raising :class:`LeaseLostError` from
    ``commit()``. Owner liveness: on this host by pid and start time, elsewhere by
    lease expiry.

The dead-man sentinel's journal (``_pg_journal``)
    There is no store file to journal beside: the sentinel journals its firings
    in a directory of this host keyed by the store's id, its shipper copies them
    into ``sentinel_firings`` once it has thawed, and recovery (by any replica)
    reads them there, after importing what this host's journals still hold.

Secrets
    The password comes from the DSN, ``password=`` (a secrets resolver's value) or
    libpq's ``PGPASSFILE``/``PGPASSWORD``; it is never logged and is scrubbed from
    every error this module raises.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import attrs

from karbor_async import _pg_journal as journal
from karbor_async import _pg_ops as ops
from karbor_async._liveness import owner_name
from karbor_async._log import get_logger
from karbor_async._pg_link import Link, Reads, WriterConnection
from karbor_async._pg_listen import Listener, PgSubscription
from karbor_async._pg_queries import PgQueries
from karbor_async._pg_schema import inspect, migrate, schema_version, scrub, scrub_dsn, store_id
from karbor_async._pg_writer import PgWriter
from karbor_async._safety import SentinelJournal
from karbor_async._sqlite_records import HookRecord, _encode
from karbor_async._types import ResourceKey, coerce_enum, coerce_optional
from karbor_async.events import Event, EventKind
from karbor_async.exceptions import (
    IllegalTransitionError,
    LeaseLostError,
    StoreError,
    StoreFileError,
    StoreUnavailableError,
)
from karbor_async.store import CheckpointRecord, CheckpointStatus, RunOutcome, RunRecord

if TYPE_CHECKING:
    import asyncpg

__all__ = ["PgStoreStatistics", "PostgresStore"]

_log = get_logger(__name__)
_T = TypeVar("_T")
_CLOSE_TIMEOUT = 10.0


def _asyncpg() -> Any:
    try:
        import asyncpg
    except ImportError:
        raise StoreError(
            "the PostgreSQL store needs asyncpg: pip install 'karbor-async[postgres]'"
        ) from None
    return asyncpg


@attrs.frozen
class PgStoreStatistics:
    """A snapshot of the store's writer and connections."""

    transactions: int
    """Write transactions committed since the store was opened."""
    events_written: int
    pending_writes: int
    """Records enqueued and not yet written."""
    commits_awaited: int
    leases_held: int
    leases_lost: int
    reconnects: int
    """Connections made again after one was lost (writer and readers)."""
    retried: int
    """Transactions run again after their connection was lost before they committed."""
    settled: int
    """Transactions whose connection was lost during ``COMMIT``, settled by asking the
    server (committed or not)."""
    listener_connections: int
    """LISTEN connections opened (the first, and one per reconnect)."""


@attrs.frozen
class _Options:
    """How :meth:`PostgresStore.open` was called (the sentinel's shipper reconnects so)."""

    dsn: str = attrs.field(repr=False)
    password: str | None = attrs.field(repr=False)
    journal_dir: Path
    reconnect_seconds: float


class PostgresStore:
    """A :class:`~karbor_async.store.Store` in a PostgreSQL database (see :meth:`open`)."""

    def __init__(
        self,
        *,
        link: Link,
        writer: WriterConnection | None,
        reads: Reads,
        owner: str,
        lease_seconds: float,
        options: _Options,
        identity: str,
    ) -> None:
        self._link = link
        self._where = link.where
        self._w = PgWriter(
            where=link.where, conn=writer, secret=options.password, lease_seconds=lease_seconds
        )
        self._queries = PgQueries(reads)
        self._owner = owner
        self._lease_seconds = lease_seconds
        self._options = options
        self._identity = identity
        """The store's id (``karbor_meta.store_id``)."""
        self._listener = Listener(link)
        self.commits = 0
        """How many times :meth:`commit` was awaited."""

    @classmethod
    @asynccontextmanager
    async def open(
        cls,
        dsn: str,
        *,
        password: str | None = None,
        owner: str | None = None,
        lease_seconds: float = 30.0,
        auto_renew: bool = True,
        read_only: bool = False,
        reconnect_seconds: float = 30.0,
        journal_dir: str | Path | None = None,
    ) -> AsyncIterator[PostgresStore]:
        """Open (creating or migrating) the store in the database ``dsn`` names.

        A database holding another application's tables, or a newer store, is
        refused untouched (:class:`~karbor_async.exceptions.ForeignFileError`,
        :class:`~karbor_async.exceptions.NewerSchemaError`). Leaving the block
        flushes pending writes and releases this store's leases.

        ``read_only``: only to read (the CLI's read commands): nothing is created or
        migrated, the session is read-only, and every write raises
        :class:`StoreError`; the database must hold a store already.
        ``reconnect_seconds``: how long a lost connection is tried again before
        waiting writes raise :class:`StoreUnavailableError`. ``journal_dir``: where
        the dead-man sentinel journals its firings on this host (default
        ``$XDG_STATE_HOME/karbor-async/sentinel``).
        """
        if reconnect_seconds <= 0:
            raise ValueError(f"reconnect_seconds must be positive, not {reconnect_seconds!r}")
        options = _Options(
            dsn=dsn,
            password=password,
            journal_dir=journal.journal_root(journal_dir),
            reconnect_seconds=reconnect_seconds,
        )
        async with _open(
            cls,
            options,
            owner=owner,
            lease_seconds=lease_seconds,
            auto_renew=auto_renew,
            read_only=read_only,
        ) as store:
            yield store

    @property
    def owner(self) -> str:
        return self._owner

    @property
    def store_id(self) -> str:
        """The store's identity, the same from every host (made with the database)."""
        return self._identity

    @property
    def read_only(self) -> bool:
        return self._w.read_only

    def statistics(self) -> PgStoreStatistics:
        pending = self._w.pending
        writer = self._w.conn
        return PgStoreStatistics(
            transactions=self._w.transactions,
            events_written=self._w.events_written,
            pending_writes=len(pending.events)
            + len(pending.progress)
            + len(pending.saved)
            + len(pending.restored)
            + len(pending.released),
            commits_awaited=self.commits,
            leases_held=len(self._w.held),
            leases_lost=len(self._w.lost),
            reconnects=self._link.reconnects,
            retried=0 if writer is None else writer.retried,
            settled=0 if writer is None else writer.settled,
            listener_connections=self._listener.connections,
        )

    # -- the writer (``_pg_writer``) ----------------------------------------------------

    def hold_background_writes(self, hold: bool) -> None:
        """Held (counted): records wait for the next ``commit()`` or the release."""
        self._w.hold(hold)

    # -- Store protocol: writes ----------------------------------------------------------

    def append(self, event: Event) -> None:
        """Enqueue a lifecycle event (its stored seq comes from the run's counter row)."""
        self._w.check_open()
        self._w.check_run(event.run_id)
        if event.kind is EventKind.PROGRESS:
            rtype, rid = event.resource or ("", "")
            self._w.pending.progress[(event.run_id, rtype, rid)] = event
        else:
            self._w.pending.events.append(event)
        self._w.poke()

    def save_info(self, checkpoint_id: str, key: ResourceKey, info: Mapping[str, Any]) -> None:
        self._w.check_open()
        if checkpoint_id in self._w.lost.values():
            raise LeaseLostError(f"checkpoint {checkpoint_id!r} is owned by another engine now")
        self._w.pending.saved[(checkpoint_id, key[0], key[1])] = _encode(dict(info))
        self._w.poke()

    def record_restored(self, run_id: str, key: ResourceKey, new_id: str) -> None:
        self._w.check_open()
        self._w.check_run(run_id)
        self._w.pending.restored[(run_id, key[0], key[1])] = str(new_id)
        self._w.poke()

    def release_resource(self, run_id: str, key: ResourceKey) -> None:
        self._w.check_open()
        self._w.pending.released.add((run_id, key[0], key[1]))
        self._w.poke()

    async def commit(self, *, run_id: str | None = None) -> None:
        """Return when everything enqueued before this call is committed.

        Raises :class:`LeaseLostError` when writes were dropped because another owner
        took a run over, and :class:`StoreUnavailableError` when the server could not
        be reached within the reconnect window (the records stay pending).
        """
        self._w.check_open()
        self.commits += 1
        await self._w.submit(None)
        if run_id is not None:
            self._w.check_run(run_id)
        lost, self._w.lost_now = self._w.lost_now, set()
        if lost and (run_id is None or run_id in lost):
            raise LeaseLostError(
                f"writes of run(s) {', '.join(sorted(lost))} were dropped: another engine "
                "owns them now"
            )
        if self._w.unreported is not None:
            error, self._w.unreported = self._w.unreported, None
            if not isinstance(error, StoreUnavailableError):  # (that one passed, or recurs)
                raise error

    async def create_run(self, record: RunRecord) -> None:
        leased = await self._w.submit(
            lambda c: ops.create_run(c, record, self._owner, self._lease_seconds)
        )
        if leased:
            self._w.held[record.run_id] = (1, record.checkpoint_id)

    async def finish_run(self, outcome: RunOutcome) -> None:
        """Store the outcome, end the run and release its lease; commits what came before.

        With the server unreachable past the reconnect window this raises
        :class:`StoreUnavailableError`, and the outcome is stored (after the events
        before it) once the server is back while the store is open; closed before
        that, the run is left unfinished, for recovery.
        """
        if outcome.status.value == "running":
            raise IllegalTransitionError(f"run {outcome.run_id!r} cannot finish as running")
        self._w.check_run(run_id := outcome.run_id)
        held = self._w.held.get(run_id) or self._w.fenced.pop(run_id, None)
        token = None if held is None else held[0]

        async def finish(conn: asyncpg.Connection) -> bool:
            done = await ops.finish_run(conn, outcome, self._owner, token)
            if not done and held is not None:
                self._w.lost[run_id] = held[1]
            self._w.held.pop(run_id, None)
            return done

        try:
            done = await self._w.submit(finish)
        except StoreUnavailableError as exc:
            self._w.deferred.append(finish)
            exc.add_note(
                f"the outcome of run {run_id} is stored once the server is back, if this "
                "store is still open then; otherwise the run is left for recovery"
            )
            raise
        if not done:
            raise LeaseLostError(
                f"run {run_id!r} is owned by another engine now; its outcome was not stored"
            )

    async def record_late_thaw(self, run_id: str, key: ResourceKey, at: float) -> None:
        await self._w.submit(lambda c: ops.record_late_thaw(c, run_id, key, at))

    async def set_checkpoint_status(
        self, checkpoint_id: str, status: CheckpointStatus | str
    ) -> None:
        new = coerce_enum(CheckpointStatus, status, "status")
        await self._w.submit(lambda c: ops.set_checkpoint_status(c, checkpoint_id, new))

    async def import_checkpoints(self, records: Iterable[CheckpointRecord]) -> int:
        """Insert finished checkpoints (and their protect runs) in one transaction.

        The bulk path for imports and for building large stores in tests and
        benchmarks; it bypasses the lifecycle. An id already in the store refuses the
        whole import (:class:`StoreError`). Returns how many were inserted.
        """
        rows = list(records)
        return await self._w.submit(lambda c: ops.import_checkpoints(c, rows, self._where))

    # -- leases ------------------------------------------------------------------------

    async def acquire_lease(
        self, run_id: str, owner: str | None = None, ttl: float | None = None
    ) -> int:
        """Take over ``run_id`` (default: for this store) and return the new fencing token."""
        who = owner or self._owner
        seconds = self._lease_seconds if ttl is None else ttl
        token, checkpoint_id = await self._w.submit(
            lambda c: ops.acquire_lease(c, run_id, who, seconds)
        )
        if who == self._owner:
            self._w.held[run_id] = (token, checkpoint_id)
            self._w.lost.pop(run_id, None)
        _log.info("lease_acquired", run_id=run_id, owner=who, token=token)
        return token

    async def renew_lease(self, run_id: str, ttl: float | None = None) -> None:
        held = self._w.held.get(run_id)
        if held is None:
            raise LeaseLostError(f"this store holds no lease on run {run_id!r}")
        seconds = self._lease_seconds if ttl is None else ttl
        lost = await self._w.submit(lambda c: ops.renew(c, {run_id: held[0]}, seconds))
        if lost:
            self._w.lost[run_id] = self._w.held.pop(run_id)[1]
            raise LeaseLostError(f"run {run_id!r} is owned by another engine now")

    def fence(self, run_id: str, token: int, checkpoint_id: str) -> None:
        """Write ``run_id`` under ``token``, a lease a Temporal workflow owns (see the writer)."""
        self._w.fence(run_id, token, checkpoint_id)

    async def release_lease(self, run_id: str) -> None:
        held = self._w.held.pop(run_id, None)
        if held is not None:
            await self._w.submit(lambda c: ops.release(c, {run_id: held[0]}))

    def fencing_token(self, run_id: str) -> int | None:
        held = self._w.held.get(run_id)
        return None if held is None else held[0]

    async def unfinished_runs(self) -> list[RunRecord]:
        """Running runs recovery may take now (no owner, expired, or a dead local owner)."""
        return (await self._queries.unfinished_runs(self._owner))[0]

    async def held_runs(self) -> list[tuple[RunRecord, str, float]]:
        return (await self._queries.unfinished_runs(self._owner))[1]

    # -- the dead-man sentinel's journal -------------------------------------------------

    def sentinel_journal(self) -> SentinelJournal | None:
        """Where this host's sentinels journal firings for this store, and the shipper
        that copies them here once a sentinel has thawed (``_pg_journal``)."""
        if self._w.read_only:
            return None
        o = self._options
        ship = {
            "dsn": o.dsn,
            "password": o.password,
            "store_id": self._identity,
            "window": journal.SHIP_WINDOW,
        }
        return SentinelJournal(
            directory=str(journal.store_dir(o.journal_dir, self._identity)),
            ship=(sys.executable, "-m", "karbor_async._pg_journal"),
            ship_input=json.dumps(ship),
        )

    async def import_journals(self) -> int:
        """Copy what this host's sentinel journals for this store hold into the store
        (waiting, bounded, for the sentinels of dead engines still thawing); a journal
        whose sentinel has ended is removed once copied. Returns the firings copied."""
        directory = journal.store_dir(self._options.journal_dir, self._identity)
        found = await anyio.to_thread.run_sync(journal.settled_journals, directory)
        copied = 0
        for path, entries, closed in found:
            if entries:
                copied += await self._w.submit(
                    functools.partial(journal.upload, entries=entries, host=journal.host())
                )
            if closed:
                await anyio.to_thread.run_sync(journal.remove, path)
        return copied

    async def sentinel_firings(self, run_id: str) -> dict[ResourceKey, dict[str, Any]]:
        """The safety thaws sentinels ran for ``run_id`` (the last per resource), from any
        host: this host's journals are imported first."""
        if not self._w.read_only:
            await self.import_journals()
        return await self._queries.sentinel_firings(run_id)

    async def forget_sentinel_firings(self, run_id: str) -> None:
        """Recovery recorded them on the run: the table lets them go."""
        await self._w.submit(lambda c: journal.forget(c, run_id))

    # -- live events across processes ---------------------------------------------------

    @asynccontextmanager
    async def subscribe(self, run_id: str, since: int = 0) -> AsyncIterator[PgSubscription]:
        """``async with store.subscribe(run_id) as events: async for e in events``: the run's
        committed lifecycle events with ``seq > since``, live, whichever process writes
        them (one LISTEN connection per store serves every subscriber; it LISTENs again
        after a lost connection, and subscribers read what they missed from the rows);
        ends after ``RUN_FINISHED``."""
        if self._w.closed:
            raise StoreError(f"the PostgreSQL store {self._where} is closed")
        await self._listener.start()
        self._listener.watch(run_id)
        try:
            yield PgSubscription(self._listener, self, run_id, since)
        finally:
            self._listener.unwatch(run_id)

    @property
    def listener(self) -> Listener:
        """The store's LISTEN connection and its counters."""
        return self._listener

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
        """Committed lifecycle events of a run with ``seq > since``, in order."""
        return await self._queries.read_events(run_id, since, limit)

    async def last_seq(self, run_id: str) -> int:
        return await self._queries.last_seq(run_id)

    async def load_hook_records(self, run_id: str) -> list[HookRecord]:
        """Every committed hook call of a run, per resource, hook and attempt, in start order."""
        return await self._queries.load_hook_records(run_id)

    async def load_progress(self, run_id: str) -> list[Event]:
        return await self._queries.load_progress(run_id)


async def _inspect_existing(conn: asyncpg.Connection, where: str) -> int:
    """A read-only open: the store's version, which must exist (nothing is created)."""
    version = await inspect(conn, where)
    if version == 0:
        raise StoreFileError(
            f"{where} holds no checkpoint store yet (it is empty, left untouched): "
            "a write (protect) makes it one"
        )
    return version


@asynccontextmanager
async def _open(
    cls: type[PostgresStore],
    options: _Options,
    *,
    owner: str | None,
    lease_seconds: float,
    auto_renew: bool,
    read_only: bool,
) -> AsyncIterator[PostgresStore]:
    """``PostgresStore.open``: connect, migrate, run the writer, renewer and listener, close."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise StoreError("PostgresStore runs on asyncio only (asyncpg)") from None
    if lease_seconds <= 0:
        raise ValueError(f"lease_seconds must be positive, not {lease_seconds!r}")
    asyncpg = _asyncpg()
    dsn, password = options.dsn, options.password
    where = scrub_dsn(dsn)
    settings = {"default_transaction_read_only": "on"} if read_only else None
    connect = functools.partial(asyncpg.connect, dsn, password=password, server_settings=settings)
    link = Link(connect, where=where, secret=password, window=options.reconnect_seconds)
    try:
        first = await connect()
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StoreFileError(  # the store cannot be used (nothing was written)
            f"cannot connect to the PostgreSQL store {where}: {scrub(str(exc), password)}; "
            "check the URL, the server, and the password (PGPASSFILE or PGPASSWORD)"
        ) from None
    pool = None
    try:
        version = await (_inspect_existing(first, where) if read_only else migrate(first, where))
        identity = await store_id(first)
        pool = await asyncpg.create_pool(
            dsn, password=password, min_size=0, max_size=2, server_settings=settings
        )
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await first.close()
            if pool is not None:
                await pool.close()
        if isinstance(exc, OSError | asyncpg.PostgresError | asyncpg.InterfaceError):
            raise StoreFileError(  # e.g. no right to create tables in that database
                f"the PostgreSQL store {where} cannot be opened: {scrub(str(exc), password)}"
            ) from None
        raise
    writer = None
    if read_only:
        await first.close()
    else:
        writer = WriterConnection(link, first)
        await writer.identify()
    store = cls(
        link=link,
        writer=writer,
        reads=Reads(pool, link),
        owner=owner or owner_name(),
        lease_seconds=lease_seconds,
        options=options,
        identity=identity,
    )
    _log.info(
        "pg_store_opened",
        dsn=where,
        schema_version=max(version, schema_version()) if not read_only else version,
        owner=store._owner,
        read_only=read_only,
    )
    body_error: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(store._listener.serve)
            if not read_only:
                tg.start_soon(store._w.loop)
                if auto_renew:
                    tg.start_soon(store._w.renew_loop)
            try:
                yield store
            except BaseException as exc:
                body_error = exc
                raise
            finally:
                if read_only:
                    store._w.closed = True
                else:
                    with anyio.CancelScope(
                        shield=True, deadline=anyio.current_time() + _CLOSE_TIMEOUT
                    ):
                        await store._w.shutdown()
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # The task group wraps what the caller's block raised; give it back as it was
        # (the store's own tasks end only by cancellation).
        if body_error is None or list(group.exceptions) != [body_error]:
            raise
    finally:
        with anyio.CancelScope(shield=True):
            await store._listener.close()
            await pool.close()
            if writer is not None:
                await writer.close()
        _log.info("pg_store_closed", dsn=where)
    if body_error is not None:
        raise body_error
