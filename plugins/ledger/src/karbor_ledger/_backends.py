"""A shard's store as the shard process writes it: an SQLite file or a PostgreSQL database.

Both keep the same two tables (``accounts``, ``transfers``) and make the same two
writes, each one transaction: A's debit (a balance down, a log row), B's credit (a
balance up, a log row). The shard's event loop never blocks on them: SQLite's calls
run in one worker thread, PostgreSQL's are asyncpg's (asyncio), one statement at a
time on one connection.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import anyio.to_thread

from karbor_ledger._store import ACCOUNTS, OPENING_BALANCE, connect, create

if TYPE_CHECKING:
    from karbor_ledger._shard import ShardConfig

__all__ = ["PG_SCHEMA", "Backend", "open_backend"]

PG_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (id integer PRIMARY KEY, balance bigint NOT NULL);
CREATE TABLE IF NOT EXISTS transfers (id bigint PRIMARY KEY, account integer NOT NULL,
                                      amount bigint NOT NULL);
"""


class Backend(Protocol):
    async def last_id(self) -> int: ...

    async def last_transfer(self) -> tuple[int, int] | None:
        """The newest logged transfer, ``(id, amount)`` (a debit's amount is negative)."""

    async def debit(self, tid: int, account: int, amount: int) -> None: ...

    async def credit(self, tid: int, account: int, amount: int) -> None: ...

    async def close(self) -> None: ...


async def open_backend(config: ShardConfig) -> Backend:
    """The store ``config`` names, created with its opening balances if it is new."""
    if config.pg is not None:
        return await _Postgres.open(config.pg)
    if config.db is None:
        raise ValueError("a shard needs a store: an SQLite file (db) or a PostgreSQL URL (pg)")
    return await _Sqlite.open(config.db)


class _Sqlite:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._limiter = anyio.CapacityLimiter(1)

    @classmethod
    async def open(cls, path: Path) -> _Sqlite:
        await anyio.to_thread.run_sync(create, path)
        return cls(await anyio.to_thread.run_sync(connect, path))

    async def _write(self, sql_pairs: list[tuple[str, tuple[Any, ...]]]) -> None:
        db = self._db

        def apply() -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in sql_pairs:
                    db.execute(sql, args)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

        await anyio.to_thread.run_sync(apply, limiter=self._limiter)

    async def last_id(self) -> int:
        def read() -> int:
            row = self._db.execute("SELECT COALESCE(MAX(id), 0) FROM transfers").fetchone()
            return int(row[0])

        return await anyio.to_thread.run_sync(read, limiter=self._limiter)

    async def debit(self, tid: int, account: int, amount: int) -> None:
        await self._write(
            [
                ("UPDATE accounts SET balance = balance - ? WHERE id = ?", (amount, account)),
                (
                    "INSERT INTO transfers (id, account, amount) VALUES (?, ?, ?)",
                    (tid, account, -amount),
                ),
            ]
        )

    async def last_transfer(self) -> tuple[int, int] | None:
        def read() -> tuple[int, int] | None:
            sql = "SELECT id, amount FROM transfers ORDER BY id DESC LIMIT 1"
            row = self._db.execute(sql).fetchone()
            return None if row is None else (int(row[0]), int(row[1]))

        return await anyio.to_thread.run_sync(read, limiter=self._limiter)

    async def credit(self, tid: int, account: int, amount: int) -> None:
        """Apply a transfer's credit once: a credit already logged changes nothing."""
        db = self._db

        def apply() -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                new = db.execute(
                    "INSERT OR IGNORE INTO transfers (id, account, amount) VALUES (?, ?, ?)",
                    (tid, account, amount),
                ).rowcount
                if new:
                    db.execute(
                        "UPDATE accounts SET balance = balance + ? WHERE id = ?", (amount, account)
                    )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

        await anyio.to_thread.run_sync(apply, limiter=self._limiter)

    async def close(self) -> None:
        await anyio.to_thread.run_sync(self._db.close, limiter=self._limiter)


class _Postgres:
    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._lock = anyio.Lock()  # one connection: one statement at a time

    @classmethod
    async def open(cls, url: str) -> _Postgres:
        import asyncpg  # (only a PostgreSQL store needs it)

        conn = await asyncpg.connect(
            url, timeout=30, server_settings={"application_name": "ledger shard"}
        )
        try:
            async with conn.transaction():
                await conn.execute(PG_SCHEMA)
                if not await conn.fetchval("SELECT COUNT(*) FROM accounts"):
                    await conn.executemany(
                        "INSERT INTO accounts (id, balance) VALUES ($1, $2)",
                        [(i, OPENING_BALANCE) for i in range(ACCOUNTS)],
                    )
        except BaseException:
            await conn.close()
            raise
        return cls(conn)

    async def last_id(self) -> int:
        async with self._lock:
            return int(await self._conn.fetchval("SELECT COALESCE(MAX(id), 0) FROM transfers"))

    async def last_transfer(self) -> tuple[int, int] | None:
        async with self._lock:
            row = await self._conn.fetchrow(
                "SELECT id, amount FROM transfers ORDER BY id DESC LIMIT 1"
            )
        return None if row is None else (int(row[0]), int(row[1]))

    async def _apply(self, amount: int, tid: int, account: int, log_amount: int) -> None:
        """One transfer's half, once: logged and applied together, or not at all."""
        async with self._lock, self._conn.transaction():
            logged = await self._conn.fetchval(
                "INSERT INTO transfers (id, account, amount) VALUES ($1, $2, $3) "
                "ON CONFLICT (id) DO NOTHING RETURNING id",
                tid,
                account,
                log_amount,
            )
            if logged is not None:
                await self._conn.execute(
                    "UPDATE accounts SET balance = balance + $1 WHERE id = $2", amount, account
                )

    async def debit(self, tid: int, account: int, amount: int) -> None:
        await self._apply(-amount, tid, account, -amount)

    async def credit(self, tid: int, account: int, amount: int) -> None:
        await self._apply(amount, tid, account, amount)

    async def close(self) -> None:
        await self._conn.close(timeout=5)
