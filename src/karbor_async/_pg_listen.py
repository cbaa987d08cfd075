"""Live events across processes: one LISTEN connection per store, shared by its subscribers.

Each transaction that writes lifecycle events NOTIFYs ``karbor_events`` with the
run's last committed seq and its id (``_pg_ops.write_batch``); PostgreSQL
delivers notifications at commit, in commit order. A :class:`Listener` keeps
one connection LISTENing for the whole process's store and records, per run,
the highest seq announced. A :class:`PgSubscription` reads a run's rows from
the store (``seq > cursor``, in order: the replay contract of one process) and,
once caught up, waits until a notification announces a higher seq. The payload
carries no event, so its 8,000-byte limit never bites, and a notification that
is missed costs nothing: rows are read up to what is committed.

The subscriber listens before its first read, so an event committed between a
read and the wait is announced to it and never waited for twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from karbor_async._log import get_logger
from karbor_async._pg_ops import CHANNEL
from karbor_async.events import Event, EventKind

if TYPE_CHECKING:
    import asyncpg

__all__ = ["Listener", "PgSubscription"]

_log = get_logger(__name__)


class _Reader(Protocol):
    async def read_events(
        self, run_id: str, since: int = 0, *, limit: int | None = None
    ) -> Sequence[Event]: ...


class Listener:
    """The one LISTEN connection of a store, opened at its first subscriber."""

    def __init__(self) -> None:
        self._conn: asyncpg.Connection | None = None
        self._latest: dict[str, int] = {}
        self._waiters: dict[str, anyio.Event] = {}
        self._watching: dict[str, int] = {}
        self._opening = anyio.Lock()
        self.notifications = 0
        """Notifications received (tests and benchmarks read it)."""
        self.connections = 0
        """LISTEN connections opened (one per store)."""

    async def start(self, connect: Any) -> None:
        async with self._opening:
            if self._conn is None:
                conn = await connect()
                await conn.add_listener(CHANNEL, self._notified)
                self._conn = conn
                self.connections += 1

    def _notified(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        seq_text, _, run_id = payload.partition(" ")
        self.notifications += 1
        if run_id not in self._watching:
            return
        seq = int(seq_text)
        if seq > self._latest.get(run_id, 0):
            self._latest[run_id] = seq
            waiter = self._waiters.pop(run_id, None)
            if waiter is not None:
                waiter.set()

    def watch(self, run_id: str) -> None:
        self._watching[run_id] = self._watching.get(run_id, 0) + 1

    def unwatch(self, run_id: str) -> None:
        left = self._watching.get(run_id, 1) - 1
        if left:
            self._watching[run_id] = left
        else:
            self._watching.pop(run_id, None)
            self._latest.pop(run_id, None)

    async def wait_beyond(self, run_id: str, seq: int) -> None:
        """Return once a seq above ``seq`` of ``run_id`` was announced."""
        while self._latest.get(run_id, 0) <= seq:
            waiter = self._waiters.get(run_id)
            if waiter is None:
                waiter = self._waiters[run_id] = anyio.Event()
            await waiter.wait()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with anyio.CancelScope(shield=True):
                await conn.close()


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
