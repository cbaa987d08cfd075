"""The PostgreSQL store's connections: telling a lost connection from a refusal, reconnecting.

A server restart, a failover or ``pg_terminate_backend`` ends a connection; the
store then reconnects, with backoff, for up to its *reconnect window*
(``PostgresStore.open(reconnect_seconds=)``) counted from the first failure, and
only then gives up with :class:`~karbor_async.exceptions.StoreUnavailableError`.
While the server stays down past the window, each later attempt is a single
connect, so callers are told at once; the first success closes the outage.

What counts as lost: the socket failed (``OSError``), the server said the
connection is gone or is shutting down or starting up (SQLSTATE class 08,
57P01-57P03), or the connection is closed after whatever was raised. Anything
else (a constraint, a refused password, a missing database) is the server's
answer and is not retried.

Reads (:class:`Reads`) are retried whole on a pooled connection: they change
nothing. Writes are the writer's (``_pg_store``): a transaction that was lost
before its ``COMMIT`` was sent is rolled back by the server and run again; one
lost *during* its ``COMMIT`` is in doubt, and :func:`settle` asks the server
what became of it by its transaction id.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

from karbor_async._log import get_logger
from karbor_async._pg_schema import scrub
from karbor_async.exceptions import StoreError, StoreUnavailableError

if TYPE_CHECKING:
    import asyncpg

__all__ = ["Link", "Reads", "WriterConnection", "close_quietly", "connection_lost"]

_log = get_logger("karbor_async.pg_store")
_T = TypeVar("_T")

FIRST_DELAY = 0.05
MAX_DELAY = 1.0
"""Reconnect attempts start 50 ms apart, then twice as long each time, at most 1 s."""
CONNECT_TIMEOUT = 10.0
"""Seconds one connection attempt may take (a server that does not answer at all)."""
_LOST_STATES = frozenset({"57P01", "57P02", "57P03"})
"""admin_shutdown, crash_shutdown, cannot_connect_now: the server ends or refuses
sessions for now (a restart), not for good."""


def connection_lost(exc: BaseException, conn: Any = None) -> bool:
    """Whether ``exc`` (raised using ``conn``, if given) means the connection is gone."""
    if isinstance(exc, OSError):  # (TimeoutError and ConnectionError are OSErrors)
        return True
    state = getattr(exc, "sqlstate", None)
    if isinstance(state, str) and (state.startswith("08") or state in _LOST_STATES):
        return True
    if conn is not None:
        try:
            return bool(conn.is_closed())
        except Exception:  # (a connection object in a state of its own)
            return False
    name = type(exc).__name__  # (a pooled connection: closed under the caller)
    return name == "ConnectionDoesNotExistError" or (
        name == "InterfaceError" and "closed" in str(exc)
    )


class Link:
    """One store's way to its server: a connect function and its reconnect window."""

    def __init__(
        self,
        connect: Callable[..., Awaitable[asyncpg.Connection]],
        *,
        where: str,
        secret: str | None,
        window: float,
    ) -> None:
        self._connect = connect
        self.where = where
        self.secret = secret
        self.window = window
        self.down_since: float | None = None
        """When the current outage began (monotonic), or None while connected."""
        self.reconnects = 0
        """Connections made again after one was lost."""
        self.outages: list[float] = []
        """How long each outage lasted, seconds (the last 100)."""

    def scrub(self, text: str) -> str:
        return scrub(text, self.secret)

    def lost(self, exc: BaseException) -> None:
        """A connection of this link was lost: the outage starts now unless it runs."""
        if self.down_since is None:
            self.down_since = time.monotonic()
            _log.warning("pg_connection_lost", dsn=self.where, error=self.scrub(str(exc)))

    def up(self) -> None:
        if self.down_since is not None:
            took = time.monotonic() - self.down_since
            self.down_since = None
            self.reconnects += 1
            self.outages = [*self.outages[-99:], took]
            _log.warning("pg_reconnected", dsn=self.where, after=round(took, 3))

    def unavailable(self, exc: BaseException) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"the PostgreSQL store {self.where} lost its connection and could not reconnect "
            f"within {self.window:g} s ({self.scrub(str(exc)) or type(exc).__name__}); what "
            "was not written is kept for when the server is back"
        )

    async def connect(self, **kwargs: Any) -> asyncpg.Connection:
        """A new connection; while an outage runs, tried again with backoff until its
        window has passed (then once per call). Raises :class:`StoreUnavailableError`
        (the window passed) or :class:`StoreError` (the server refused: a password, a
        missing database)."""
        delay = FIRST_DELAY
        while True:
            try:
                with anyio.fail_after(CONNECT_TIMEOUT):
                    conn = await self._connect(**kwargs)
            except Exception as exc:
                if not connection_lost(exc):
                    raise StoreError(
                        f"the PostgreSQL store {self.where} refused to reconnect: "
                        f"{self.scrub(str(exc))}"
                    ) from None
                self.lost(exc)
                if self.expired():
                    raise self.unavailable(exc) from None
                await anyio.sleep(delay)
                delay = min(MAX_DELAY, delay * 2)
                continue
            self.up()
            return conn

    def expired(self) -> bool:
        down = self.down_since
        return down is not None and time.monotonic() - down >= self.window

    async def pause(self, delay: float) -> float:
        """Wait before the next attempt of an outage; returns the next delay."""
        await anyio.sleep(delay)
        return min(MAX_DELAY, delay * 2)


class Reads:
    """The reader pool's ``fetch``/``fetchrow``/``fetchval``, each retried whole across a
    lost connection within the link's window (the pool reconnects what it hands out)."""

    def __init__(self, pool: asyncpg.Pool, link: Link) -> None:
        self.pool = pool
        self._link = link

    async def _retry(self, call: Callable[[], Awaitable[_T]]) -> _T:
        delay = FIRST_DELAY
        while True:
            try:
                result = await call()
            except Exception as exc:
                if not connection_lost(exc):
                    if type(exc).__module__.startswith("asyncpg"):
                        raise StoreError(
                            f"reading the PostgreSQL store {self._link.where} failed: "
                            f"{self._link.scrub(str(exc))}"
                        ) from None
                    raise
                self._link.lost(exc)
                if self._link.expired():
                    raise self._link.unavailable(exc) from None
                delay = await self._link.pause(delay)
                continue
            if self._link.down_since is not None:
                self._link.up()
            return result

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        rows: list[Any] = await self._retry(lambda: self.pool.fetch(query, *args))
        return rows

    async def fetchrow(self, query: str, *args: Any) -> Any:
        return await self._retry(lambda: self.pool.fetchrow(query, *args))

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self._retry(lambda: self.pool.fetchval(query, *args))


class WriterConnection:
    """The writer's one connection, made again after it is lost (the writer task only).

    :meth:`transact` runs a body in a transaction and, across a lost connection,
    runs it again within the link's window: lost before ``COMMIT``, the server
    rolled it back; lost *during* ``COMMIT``, it is in doubt and settled by its
    transaction id (``pg_xact_status``) before anything is run again, after the
    old session is ended if it still runs (a network fault rather than its death),
    so that its fate is final.
    """

    def __init__(self, link: Link, conn: asyncpg.Connection) -> None:
        self._link = link
        self._conn: asyncpg.Connection | None = conn
        self._ident: tuple[int, str, str] | None = None
        """The session: backend pid, its start, the server's start (a pid is reused)."""
        self.retried = 0
        self.settled = 0

    async def identify(self) -> None:
        assert self._conn is not None
        self._ident = await _identity(self._conn)

    async def _connection(self) -> asyncpg.Connection:
        conn = self._conn
        if conn is not None and not conn.is_closed():
            return conn
        if conn is not None:  # lost while idle (the server restarted, say)
            self._link.lost(ConnectionError("the writer's connection was closed"))
        self._conn = None
        delay = FIRST_DELAY
        while True:
            conn = await self._link.connect()
            try:
                ident = await _identity(conn)
            except Exception as exc:
                lost = connection_lost(exc, conn)
                conn.terminate()
                if not lost:
                    raise
                self._link.lost(exc)  # (lost again at once: a new outage, a new window)
                if self._link.expired():
                    raise self._link.unavailable(exc) from None
                delay = await self._link.pause(delay)
                continue
            self._conn, self._ident = conn, ident
            return conn

    def _drop(self, exc: BaseException) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()
        self._link.lost(exc)

    async def transact(self, body: Callable[[asyncpg.Connection], Awaitable[_T]]) -> _T:
        first_loss: float | None = None
        delay = FIRST_DELAY
        while True:
            if first_loss is not None:
                if time.monotonic() - first_loss >= self._link.window:
                    raise self._link.unavailable(ConnectionError("connection lost again"))
                delay = await self._link.pause(delay)
            conn = await self._connection()
            ident = self._ident
            tx = conn.transaction()
            started = False
            try:
                await tx.start()
                started = True
                xid = str(await conn.fetchval("SELECT pg_current_xact_id()::text"))
                result = await body(conn)
            except BaseException as exc:
                if started:
                    await _roll_back(tx, conn)
                if isinstance(exc, Exception) and connection_lost(exc, conn):
                    self._drop(exc)
                    first_loss = first_loss or time.monotonic()
                    self.retried += 1
                    continue
                raise
            try:
                with anyio.CancelScope(shield=True):
                    await tx.commit()
            except Exception as exc:
                if not connection_lost(exc, conn):
                    raise
                self._drop(exc)
                first_loss = first_loss or time.monotonic()
                self.settled += 1
                if await self._committed(xid, ident):
                    return result
                self.retried += 1
                continue
            return result

    async def _committed(self, xid: str, ident: tuple[int, str, str] | None) -> bool:
        """Whether the transaction ``xid``, whose ``COMMIT`` was sent on the lost session
        ``ident``, committed (asked on a new connection)."""
        delay = FIRST_DELAY
        while True:
            conn = await self._connection()
            try:
                if ident is not None:
                    await _end_session(conn, ident)
                status = await conn.fetchval("SELECT pg_xact_status($1::text::xid8)", xid)
            except Exception as exc:
                if not connection_lost(exc, conn):
                    raise
                self._drop(exc)
                if self._link.expired():
                    raise self._link.unavailable(exc) from None
                delay = await self._link.pause(delay)
                continue
            _log.warning("pg_commit_settled", dsn=self._link.where, xid=xid, status=status)
            if status == "committed":
                return True
            if status == "aborted":
                return False
            if status != "in progress":
                raise StoreError(
                    f"the PostgreSQL store {self._link.where} lost its connection while "
                    f"committing and cannot tell whether transaction {xid} committed "
                    f"(status {status!r})"
                )
            if self._link.expired():
                raise self._link.unavailable(TimeoutError(f"transaction {xid} still in progress"))
            delay = await self._link.pause(delay)

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await close_quietly(conn)


async def _identity(conn: asyncpg.Connection) -> tuple[int, str, str] | None:
    """The session: backend pid, its start, the server's start (a pid is reused)."""
    row = await conn.fetchrow(
        "SELECT pid, backend_start::text, pg_postmaster_start_time()::text"
        " FROM pg_stat_activity WHERE pid = pg_backend_pid()"
    )
    return None if row is None else (int(row[0]), str(row[1]), str(row[2]))


async def _roll_back(tx: Any, conn: asyncpg.Connection) -> None:
    if conn.is_closed():
        return
    try:
        with anyio.CancelScope(shield=True), anyio.fail_after(5):
            await tx.rollback()
    except Exception:  # the connection is unusable: it goes
        conn.terminate()


async def _end_session(conn: asyncpg.Connection, ident: tuple[int, str, str]) -> None:
    """End the session ``ident`` if it still runs (the same server, the same backend)."""
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE pid = $1 AND backend_start::text = $2"
            " AND pg_postmaster_start_time()::text = $3",
            *ident,
        )
    except Exception as exc:
        if connection_lost(exc, conn):
            raise
        # (not allowed to: its fate is asked all the same, and it ends by itself)


async def close_quietly(conn: asyncpg.Connection, limit: float = 5.0) -> None:
    """Close ``conn``, or drop it if the server does not answer within ``limit`` seconds."""
    with anyio.CancelScope(shield=True):
        try:
            with anyio.fail_after(limit):
                await conn.close()
        except Exception:
            conn.terminate()
