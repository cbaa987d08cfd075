"""The PostgreSQL checkpoint store: one database shared by several engines (asyncio only).

``PostgresStore.open(dsn)`` is an async context manager. It owns a writer
connection, a small reader pool and a task group: the *writer* task drains the
write-behind batch, the *renewer* keeps this store's leases alive.

Writes
    :meth:`~PostgresStore.append`, :meth:`~PostgresStore.save_info`,
    :meth:`~PostgresStore.record_restored` and :meth:`~PostgresStore.release_resource`
    cost a list append; the writer writes the pending batch in one transaction
    whenever it has work, and :meth:`~PostgresStore.commit` returns once
    everything enqueued before it is committed. Every other write is its own
    transaction on the same connection, after the pending batch (so
    ``finish_run`` commits what came before it). One lock orders them.

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

Secrets
    The password comes from the DSN, ``password=`` (a secrets resolver's value) or
    libpq's ``PGPASSFILE``/``PGPASSWORD``; it is never logged and is scrubbed from
    every error this module raises.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from karbor_async import _pg_ops as ops
from karbor_async._liveness import owner_name
from karbor_async._log import get_logger
from karbor_async._pg_listen import Listener, PgSubscription
from karbor_async._pg_queries import PgQueries
from karbor_async._pg_schema import migrate, schema_version, scrub, scrub_dsn
from karbor_async._sqlite_records import _encode
from karbor_async._types import ResourceKey, coerce_enum, coerce_optional
from karbor_async.events import Event, EventKind
from karbor_async.exceptions import (
    IllegalTransitionError,
    LeaseLostError,
    StoreError,
    StoreFileError,
)
from karbor_async.store import CheckpointRecord, CheckpointStatus, RunOutcome, RunRecord

if TYPE_CHECKING:
    import asyncpg

__all__ = ["PostgresStore"]

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


class PostgresStore:
    """A :class:`~karbor_async.store.Store` in a PostgreSQL database (see :meth:`open`)."""

    def __init__(
        self,
        *,
        where: str,
        writer: asyncpg.Connection,
        pool: asyncpg.Pool,
        owner: str,
        lease_seconds: float,
        secret: str | None,
    ) -> None:
        self._where = where
        self._conn = writer
        self._queries = PgQueries(pool)
        self._owner = owner
        self._lease_seconds = lease_seconds
        self._secret = secret
        self._lock = anyio.Lock()
        self._pending = ops.Batch()
        self._wake = anyio.Event()
        self._held: dict[str, tuple[int, str]] = {}
        """run id -> (fencing token, checkpoint id) of the leases this store holds."""
        self._lost: dict[str, str] = {}
        """Runs another owner took from this store, with their checkpoint ids."""
        self._fenced: dict[str, tuple[int, str]] = {}
        """run id -> (fencing token, checkpoint id) of runs whose lease another process
        owns (a Temporal workflow) and that this store writes for (:meth:`fence`)."""
        self._lost_now: set[str] = set()
        self._unreported: BaseException | None = None
        self._closed = False
        self._quiet = 0
        """Holds of background writes (``hold_background_writes``)."""
        self._listener = Listener()
        self._connect: Callable[[], Awaitable[asyncpg.Connection]] | None = None
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
    ) -> AsyncIterator[PostgresStore]:
        """Open (creating or migrating) the store in the database ``dsn`` names.

        A database holding another application's tables, or a newer store, is
        refused untouched (:class:`~karbor_async.exceptions.ForeignFileError`,
        :class:`~karbor_async.exceptions.NewerSchemaError`). Leaving the block
        flushes pending writes and releases this store's leases.
        """
        async with _open(
            cls,
            dsn,
            password=password,
            owner=owner,
            lease_seconds=lease_seconds,
            auto_renew=auto_renew,
        ) as store:
            yield store

    @property
    def owner(self) -> str:
        return self._owner

    # -- the writer ----------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise StoreError(f"the PostgreSQL store {self._where} is closed")

    def _check_run(self, run_id: str) -> None:
        if run_id in self._lost:
            raise LeaseLostError(f"run {run_id!r} is owned by another engine now")

    def _poke(self) -> None:
        if not self._quiet:
            self._wake.set()

    def hold_background_writes(self, hold: bool) -> None:
        """While held, write-behind records wait for the next ``commit()`` (or the release):
        no background transaction while the engine has anything frozen. Counted."""
        self._quiet = max(0, self._quiet + (1 if hold else -1))
        if not self._quiet and self._pending.has_work:
            self._wake.set()

    async def _flush(self) -> None:
        """Write the pending batch (the caller holds the lock)."""
        batch, self._pending = self._pending, ops.Batch()
        if not batch.has_work:
            return
        held = {r: t for r, (t, _) in (self._fenced | self._held).items()}
        try:
            async with self._conn.transaction():
                lost = await ops.write_batch(self._conn, batch, held)
        except Exception as exc:
            raise StoreError(
                f"writing to the PostgreSQL store {self._where} failed: "
                f"{scrub(str(exc), self._secret)}"
            ) from None
        for run_id in lost:
            self._lost[run_id] = (self._held.pop(run_id, None) or self._fenced.pop(run_id))[1]
            self._lost_now.add(run_id)
            _log.warning("lease_lost", run_id=run_id)

    async def _run(self, op: Callable[[asyncpg.Connection], Awaitable[_T]]) -> _T:
        """Flush what is pending, then run ``op`` in its own transaction."""
        self._check_open()
        # Shielded: a caller cancelled halfway through a transaction would leave the
        # shared writer connection inside it (every later write then vanishes into it).
        with anyio.CancelScope(shield=True):
            result = await self._run_shielded(op)
        return result

    async def _run_shielded(self, op: Callable[[asyncpg.Connection], Awaitable[_T]]) -> _T:
        async with self._lock:
            await self._flush()
            try:
                async with self._conn.transaction():
                    return await op(self._conn)
            except StoreError:
                raise
            except Exception as exc:
                if type(exc).__module__.startswith("asyncpg"):
                    raise StoreError(
                        f"the PostgreSQL store {self._where} refused a write: "
                        f"{scrub(str(exc), self._secret)}"
                    ) from None
                raise

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            if self._quiet:
                continue  # held: the next commit (or the release) writes it
            async with self._lock:
                try:
                    await self._flush()
                except StoreError as exc:
                    self._unreported = exc

    async def _renew_loop(self) -> None:
        while True:
            await anyio.sleep(self._lease_seconds / 3)
            held = {r: t for r, (t, _) in self._held.items()}
            try:
                lost = await self._run(
                    functools.partial(ops.renew, held=held, seconds=self._lease_seconds)
                )
            except StoreError as exc:
                _log.error("lease_renew_failed", dsn=self._where, error=str(exc))
                continue
            for run_id in lost:
                if run_id in self._held:
                    self._lost[run_id] = self._held.pop(run_id)[1]

    async def _shutdown(self) -> None:
        async with self._lock:
            try:
                await self._flush()
                if self._held:
                    held = {r: t for r, (t, _) in self._held.items()}
                    async with self._conn.transaction():
                        await ops.release(self._conn, held)
                    self._held.clear()
            except Exception as exc:  # closing: report, never hide the body's error
                _log.error(
                    "pg_store_close_failed", dsn=self._where, error=scrub(str(exc), self._secret)
                )
            finally:
                self._closed = True

    # -- Store protocol: writes ----------------------------------------------------------

    def append(self, event: Event) -> None:
        """Enqueue a lifecycle event (its stored seq comes from the run's counter row)."""
        self._check_open()
        self._check_run(event.run_id)
        if event.kind is EventKind.PROGRESS:
            rtype, rid = event.resource or ("", "")
            self._pending.progress[(event.run_id, rtype, rid)] = event
        else:
            self._pending.events.append(event)
        self._poke()

    def save_info(self, checkpoint_id: str, key: ResourceKey, info: Mapping[str, Any]) -> None:
        self._check_open()
        if checkpoint_id in self._lost.values():
            raise LeaseLostError(f"checkpoint {checkpoint_id!r} is owned by another engine now")
        self._pending.saved[(checkpoint_id, key[0], key[1])] = _encode(dict(info))
        self._poke()

    def record_restored(self, run_id: str, key: ResourceKey, new_id: str) -> None:
        self._check_open()
        self._check_run(run_id)
        self._pending.restored[(run_id, key[0], key[1])] = str(new_id)
        self._poke()

    def release_resource(self, run_id: str, key: ResourceKey) -> None:
        self._check_open()
        self._pending.released.add((run_id, key[0], key[1]))
        self._poke()

    async def commit(self, *, run_id: str | None = None) -> None:
        """Return when everything enqueued before this call is committed."""
        self._check_open()
        self.commits += 1
        with anyio.CancelScope(shield=True):  # (as ``_run``: never leave a transaction open)
            async with self._lock:
                await self._flush()
        if run_id is not None:
            self._check_run(run_id)
        lost, self._lost_now = self._lost_now, set()
        if lost and (run_id is None or run_id in lost):
            raise LeaseLostError(
                f"writes of run(s) {', '.join(sorted(lost))} were dropped: another engine "
                "owns them now"
            )
        if self._unreported is not None:
            error, self._unreported = self._unreported, None
            raise error

    async def create_run(self, record: RunRecord) -> None:
        leased = await self._run(
            lambda c: ops.create_run(c, record, self._owner, self._lease_seconds)
        )
        if leased:
            self._held[record.run_id] = (1, record.checkpoint_id)

    async def finish_run(self, outcome: RunOutcome) -> None:
        if outcome.status.value == "running":
            raise IllegalTransitionError(f"run {outcome.run_id!r} cannot finish as running")
        self._check_run(outcome.run_id)
        held = self._held.get(outcome.run_id) or self._fenced.pop(outcome.run_id, None)
        token = None if held is None else held[0]
        done = await self._run(lambda c: ops.finish_run(c, outcome, self._owner, token))
        if not done:
            if held is not None:
                self._lost[outcome.run_id] = held[1]
            self._held.pop(outcome.run_id, None)
            raise LeaseLostError(
                f"run {outcome.run_id!r} is owned by another engine now; its outcome was not stored"
            )
        self._held.pop(outcome.run_id, None)

    async def record_late_thaw(self, run_id: str, key: ResourceKey, at: float) -> None:
        await self._run(lambda c: ops.record_late_thaw(c, run_id, key, at))

    async def set_checkpoint_status(
        self, checkpoint_id: str, status: CheckpointStatus | str
    ) -> None:
        new = coerce_enum(CheckpointStatus, status, "status")
        await self._run(lambda c: ops.set_checkpoint_status(c, checkpoint_id, new))

    # -- leases ------------------------------------------------------------------------

    async def acquire_lease(
        self, run_id: str, owner: str | None = None, ttl: float | None = None
    ) -> int:
        """Take over ``run_id`` (default: for this store) and return the new fencing token."""
        who = owner or self._owner
        seconds = self._lease_seconds if ttl is None else ttl
        token, checkpoint_id = await self._run(lambda c: ops.acquire_lease(c, run_id, who, seconds))
        if who == self._owner:
            self._held[run_id] = (token, checkpoint_id)
            self._lost.pop(run_id, None)
        _log.info("lease_acquired", run_id=run_id, owner=who, token=token)
        return token

    async def renew_lease(self, run_id: str, ttl: float | None = None) -> None:
        held = self._held.get(run_id)
        if held is None:
            raise LeaseLostError(f"this store holds no lease on run {run_id!r}")
        seconds = self._lease_seconds if ttl is None else ttl
        lost = await self._run(lambda c: ops.renew(c, {run_id: held[0]}, seconds))
        if lost:
            self._lost[run_id] = self._held.pop(run_id)[1]
            raise LeaseLostError(f"run {run_id!r} is owned by another engine now")

    def fence(self, run_id: str, token: int, checkpoint_id: str) -> None:
        """Write ``run_id``'s records under ``token``, a lease another process owns (the
        Temporal workflow that drives the run): a batch whose token moved on is dropped
        and ``commit()`` raises :class:`LeaseLostError`, as for a lease of this store's.
        This store neither renews nor releases it."""
        if run_id not in self._held:
            self._fenced[run_id] = (token, checkpoint_id)

    async def release_lease(self, run_id: str) -> None:
        held = self._held.pop(run_id, None)
        if held is not None:
            await self._run(lambda c: ops.release(c, {run_id: held[0]}))

    def fencing_token(self, run_id: str) -> int | None:
        held = self._held.get(run_id)
        return None if held is None else held[0]

    async def unfinished_runs(self) -> list[RunRecord]:
        """Running runs recovery may take now (no owner, expired, or a dead local owner)."""
        return (await self._queries.unfinished_runs(self._owner))[0]

    async def held_runs(self) -> list[tuple[RunRecord, str, float]]:
        return (await self._queries.unfinished_runs(self._owner))[1]

    # -- live events across processes ---------------------------------------------------

    @asynccontextmanager
    async def subscribe(self, run_id: str, since: int = 0) -> AsyncIterator[PgSubscription]:
        """``async with store.subscribe(run_id) as events: async for e in events``: the run's
        committed lifecycle events with ``seq > since``, live, whichever process writes
        them (one LISTEN connection per store serves every subscriber); ends after
        ``RUN_FINISHED``."""
        self._check_open()
        if self._connect is None:
            raise StoreError("this store was not opened with PostgresStore.open")
        await self._listener.start(self._connect)
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

    async def load_progress(self, run_id: str) -> list[Event]:
        return await self._queries.load_progress(run_id)


@asynccontextmanager
async def _open(
    cls: type[PostgresStore],
    dsn: str,
    *,
    password: str | None,
    owner: str | None,
    lease_seconds: float,
    auto_renew: bool,
) -> AsyncIterator[PostgresStore]:
    """``PostgresStore.open``: connect, migrate, run the writer and renewer, close."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        raise StoreError("PostgresStore runs on asyncio only (asyncpg)") from None
    if lease_seconds <= 0:
        raise ValueError(f"lease_seconds must be positive, not {lease_seconds!r}")
    asyncpg = _asyncpg()
    where = scrub_dsn(dsn)
    try:
        writer = await asyncpg.connect(dsn, password=password)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StoreFileError(  # the store cannot be used (nothing was written)
            f"cannot connect to the PostgreSQL store {where}: {scrub(str(exc), password)}; "
            "check the URL, the server, and the password (PGPASSFILE or PGPASSWORD)"
        ) from None
    try:
        version = await migrate(writer, where)
        pool = await asyncpg.create_pool(dsn, password=password, min_size=1, max_size=2)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await writer.close()
        if isinstance(exc, OSError | asyncpg.PostgresError | asyncpg.InterfaceError):
            raise StoreFileError(  # e.g. no right to create tables in that database
                f"the PostgreSQL store {where} cannot be opened: {scrub(str(exc), password)}"
            ) from None
        raise
    store = cls(
        where=where,
        writer=writer,
        pool=pool,
        owner=owner or owner_name(),
        lease_seconds=lease_seconds,
        secret=password,
    )
    store._connect = functools.partial(asyncpg.connect, dsn, password=password)
    _log.info(
        "pg_store_opened",
        dsn=where,
        schema_version=max(version, schema_version()),
        owner=store._owner,
    )
    body_error: BaseException | None = None
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(store._write_loop)
            if auto_renew:
                tg.start_soon(store._renew_loop)
            try:
                yield store
            except BaseException as exc:
                body_error = exc
                raise
            finally:
                with anyio.CancelScope(shield=True, deadline=anyio.current_time() + _CLOSE_TIMEOUT):
                    await store._shutdown()
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
            await writer.close()
        _log.info("pg_store_closed", dsn=where)
    if body_error is not None:
        raise body_error
