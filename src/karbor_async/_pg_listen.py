"""Live events across processes: one LISTEN connection per store, shared by its subscribers.

Each transaction that writes lifecycle events NOTIFYs ``karbor_events`` with the
run's last committed seq and its key (``_pg_ops.write_batch``, ``notify_key``);
PostgreSQL delivers notifications at commit, in commit order. A :class:`Listener`
keeps one connection LISTENing for the whole process's store and records, per
run, the highest seq announced. A :class:`PgSubscription` reads a run's rows
from the store (``seq > cursor``, in order: the replay contract of one process)
and, once caught up, waits until a notification announces a higher seq. The
payload carries no event, so its 8,000-byte limit never bites, and a
notification that is missed costs nothing: rows are read up to what is
committed.

The subscriber listens before its first read, so an event committed between a
read and the wait is announced to it and never waited for twice.

A lost LISTEN connection (a server restart, ``pg_terminate_backend``, a network
fault seen by the periodic probe) is made again within the store's reconnect
window; once it LISTENs again every waiting subscriber is woken to read the rows
after its cursor, which holds whatever was committed while nobody listened. Past
the window, waiting subscribers raise
:class:`~karbor_async.exceptions.StoreUnavailableError`; the listener keeps
trying, and later subscribers are served once it is back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import anyio

from karbor_async._log import get_logger
from karbor_async._pg_link import FIRST_DELAY, MAX_DELAY, close_quietly
from karbor_async._pg_ops import CHANNEL, notify_key
from karbor_async.events import Event, EventKind
from karbor_async.exceptions import StoreError

if TYPE_CHECKING:
    import asyncpg

    from karbor_async._pg_link import Link

__all__ = ["Listener", "PgSubscription"]

_log = get_logger("karbor_async.pg_store")

PROBE_SECONDS = 5.0
"""How often an idle LISTEN connection is probed (a fault that closes nothing, such as
a lost network, is found so)."""


class _Reader(Protocol):
    async def read_events(
        self, run_id: str, since: int = 0, *, limit: int | None = None
    ) -> Sequence[Event]: ...


class Listener:
    """The one LISTEN connection of a store, opened at its first subscriber."""

    def __init__(self, link: Link) -> None:
        self._link = link
        self._conn: asyncpg.Connection | None = None
        self._latest: dict[str, int] = {}
        self._waiters: dict[str, anyio.Event] = {}
        self._watching: dict[str, int] = {}
        self._keys: dict[str, set[str]] = {}
        """NOTIFY key -> the watched runs it names (``notify_key``)."""
        self._wanted = anyio.Event()
        self._up = anyio.Event()
        self._lost = anyio.Event()
        self._failure: StoreError | None = None
        self.epoch = 0
        """Bumped each time the connection LISTENs (again): subscribers re-read then."""
        self.notifications = 0
        """Notifications received (tests and benchmarks read it)."""
        self.connections = 0
        """LISTEN connections opened (one per store, and one per reconnect)."""

    async def start(self) -> None:
        """Return once the connection LISTENs (opening it at the first call)."""
        self._wanted.set()
        while not self._up.is_set():
            if self._failure is not None:
                raise self._failure
            await self._changed()

    async def _changed(self) -> None:
        """Wait for the next change of the connection's state (up, lost or failed)."""
        up, lost = self._up, self._lost
        async with anyio.create_task_group() as tg:

            async def wait(event: anyio.Event) -> None:
                await event.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(wait, up)
            tg.start_soon(wait, lost)

    async def serve(self) -> None:
        """The listener's task (in the store's task group): connect at the first
        subscriber, LISTEN, and connect again whenever the connection is lost."""
        await self._wanted.wait()
        delay = FIRST_DELAY
        while True:
            try:
                conn = await self._link.connect()
            except StoreError as exc:
                self._fail(exc)
                await anyio.sleep(delay)
                delay = min(MAX_DELAY, delay * 2)
                continue
            try:
                await conn.add_listener(CHANNEL, self._notified)
            except Exception as exc:  # lost again while LISTENing
                conn.terminate()
                self._link.lost(exc)
                await anyio.sleep(delay)
                delay = min(MAX_DELAY, delay * 2)
                continue
            delay = FIRST_DELAY
            self._conn = conn
            self.connections += 1
            self._failure = None
            gone = anyio.Event()
            conn.add_termination_listener(_setter(gone))
            self._lost = anyio.Event()
            self._up.set()
            self._wake_all()  # what was committed while nobody listened is in the rows
            try:
                await self._watch(conn, gone)
            finally:
                self._up = anyio.Event()
                self._lost.set()
                self._conn = None
                await close_quietly(conn, limit=1.0)

    async def _watch(self, conn: asyncpg.Connection, gone: anyio.Event) -> None:
        """Return once ``conn`` is lost (closed, or a probe fails)."""
        while not gone.is_set():
            with anyio.move_on_after(PROBE_SECONDS):
                await gone.wait()
                break
            try:
                with anyio.fail_after(PROBE_SECONDS):
                    await conn.execute("SELECT 1")
            except Exception as exc:
                self._link.lost(exc)
                return
        self._link.lost(ConnectionError("the LISTEN connection was closed"))
        _log.warning("pg_listener_lost", dsn=self._link.where)

    def _fail(self, exc: StoreError) -> None:
        if self._failure is None:
            _log.error("pg_listener_unavailable", dsn=self._link.where, error=str(exc))
        self._failure = exc
        self._lost.set()
        self._lost = anyio.Event()
        self._wake_all()

    def _wake_all(self) -> None:
        self.epoch += 1
        waiters, self._waiters = self._waiters, {}
        for waiter in waiters.values():
            waiter.set()

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        seq_text, _, key = str(payload).partition(" ")
        self.notifications += 1
        runs = self._keys.get(key)
        if not runs:
            return
        seq = int(seq_text)
        for run_id in runs:
            if seq > self._latest.get(run_id, 0):
                self._latest[run_id] = seq
                waiter = self._waiters.pop(run_id, None)
                if waiter is not None:
                    waiter.set()

    def watch(self, run_id: str) -> None:
        self._watching[run_id] = self._watching.get(run_id, 0) + 1
        self._keys.setdefault(notify_key(run_id), set()).add(run_id)

    def unwatch(self, run_id: str) -> None:
        left = self._watching.get(run_id, 1) - 1
        if left:
            self._watching[run_id] = left
            return
        self._watching.pop(run_id, None)
        self._latest.pop(run_id, None)
        key = notify_key(run_id)
        runs = self._keys.get(key, set())
        runs.discard(run_id)
        if not runs:
            self._keys.pop(key, None)

    async def wait_beyond(self, run_id: str, seq: int) -> None:
        """Return once a seq above ``seq`` of ``run_id`` was announced, or the connection
        LISTENs again (then the caller reads the rows: it may have missed some)."""
        epoch = self.epoch
        while self._latest.get(run_id, 0) <= seq:
            if self._failure is not None:
                raise self._failure
            waiter = self._waiters.get(run_id)
            if waiter is None:
                waiter = self._waiters[run_id] = anyio.Event()
            await waiter.wait()
            if self.epoch != epoch:
                if self._failure is not None:
                    raise self._failure
                return

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await close_quietly(conn, limit=1.0)


def _setter(event: anyio.Event) -> Callable[[object], None]:
    return lambda _conn: event.set()


class PgSubscription:
    """A run's committed lifecycle events, live, from any process sharing the database.

    ``async for event in subscription`` yields events with ``seq > since`` in order
    and ends after ``RUN_FINISHED``.
    """

    def __init__(self, listener: Listener, reader: _Reader, run_id: str, since: int) -> None:
        self._listener = listener
        self._reader = reader
        self.run_id = run_id
        self.cursor = since
        self._buffer: list[Event] = []
        self._done = False

    def __aiter__(self) -> PgSubscription:
        return self

    async def __anext__(self) -> Event:
        while not self._buffer:
            if self._done:
                raise StopAsyncIteration
            rows = await self._reader.read_events(self.run_id, self.cursor, limit=1000)
            if rows:
                self._buffer.extend(rows)
            else:
                await self._listener.wait_beyond(self.run_id, self.cursor)
        event = self._buffer.pop(0)
        self.cursor = event.seq
        if event.kind is EventKind.RUN_FINISHED:
            self._done = True
            self._buffer.clear()
        return event
