"""The SQLite store's leases: acquire, renew, release, the renew loop and the release on close.

Each lease change is an operation on the writer (its own savepoint in the next
batch); the in-memory book of held and lost leases, with the fencing tokens,
is :class:`~karbor_async._sqlite_state._LeaseBook`. Fencing itself (dropping
the writes of a run taken over) is the writer's, under its write lock.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Mapping

import aiosqlite
import anyio

from karbor_async._liveness import owner_gone
from karbor_async._log import get_logger
from karbor_async._sqlite_file import _fetchone
from karbor_async._sqlite_state import _LeaseBook
from karbor_async._sqlite_writer import _Writer
from karbor_async._types import RunStatus
from karbor_async.exceptions import (
    CheckpointNotFoundError,
    IllegalTransitionError,
    LeaseHeldError,
    LeaseLostError,
    StoreError,
)

_log = get_logger("karbor_async._sqlite")


class _Leases:
    """Taking, keeping and giving up runs' leases (one per store)."""

    def __init__(self, *, writer: _Writer, book: _LeaseBook, lease_seconds: float) -> None:
        self.writer = writer
        self.book = book
        self.lease_seconds = lease_seconds

    async def acquire(self, run_id: str, owner: str | None, ttl: float | None) -> int:
        who = owner or self.book.owner
        seconds = self.lease_seconds if ttl is None else ttl

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
            expires = float(row["lease_expires"])
            if current is not None and current != who and expires > now:
                if not owner_gone(current):
                    raise LeaseHeldError(run_id, str(current), expires)
                _log.warning("lease_owner_gone", run_id=run_id, owner=current)
            token = int(row["lease_token"]) + 1
            await conn.execute(
                "UPDATE runs SET lease_owner = ?, lease_token = ?, lease_expires = ?"
                " WHERE run_id = ?",
                (who, token, now + seconds, run_id),
            )
            return token, str(row["checkpoint_id"])

        (token, checkpoint_id), _ = await self.writer.submit(op)
        self.book.hold(run_id, token, checkpoint_id)
        _log.info("lease_acquired", run_id=run_id, owner=who, token=token)
        return token

    async def renew(self, run_id: str, ttl: float | None) -> None:
        self.book.check(run_id)
        held = self.book.held.get(run_id)
        if held is None:
            raise LeaseLostError(f"this store holds no lease on run {run_id!r}")
        seconds = self.lease_seconds if ttl is None else ttl
        renewed, _ = await self.writer.submit(
            functools.partial(self._renew_with_ttl, run_id, held.token, seconds)
        )
        if not renewed:
            self.book.mark_lost([run_id])
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

    async def release(self, run_id: str) -> None:
        held = self.book.held.get(run_id)
        if held is None:
            return
        token = held.token

        async def op(conn: aiosqlite.Connection) -> None:
            await conn.execute(
                "UPDATE runs SET lease_owner = NULL, lease_expires = 0"
                " WHERE run_id = ? AND lease_token = ?",
                (run_id, token),
            )

        await self.writer.submit(op)
        self.book.unhold(run_id)

    async def release_all(self) -> None:
        """On a clean close: give up every lease still held (the store is already closed)."""
        book = self.book
        held = list(book.held)

        async def release(conn: aiosqlite.Connection) -> None:
            await conn.executemany(
                "UPDATE runs SET lease_owner = NULL, lease_expires = 0"
                " WHERE run_id = ? AND lease_token = ? AND status = 'running'",
                [(r, book.held[r].token) for r in held],
            )

        try:
            await self.writer.submit_unchecked(release)
        except StoreError as exc:
            _log.error("lease_release_failed", path=str(book.path), error=str(exc))
        for run_id in held:
            book.unhold(run_id)

    async def renew_loop(self) -> None:
        interval = self.lease_seconds / 3
        book = self.book
        while True:
            await anyio.sleep(interval)
            if not book.held or self.writer.closed:
                continue
            held = {r: h.token for r, h in book.held.items()}
            try:
                renewed, _ = await self.writer.submit(functools.partial(self._renew_op, held))
            except StoreError as exc:
                _log.error("lease_renew_failed", path=str(book.path), error=str(exc))
                continue
            book.mark_lost(
                [
                    r
                    for r, token in held.items()
                    if r not in renewed and r in book.held and book.held[r].token == token
                ]
            )

    async def _renew_op(self, held: Mapping[str, int], conn: aiosqlite.Connection) -> set[str]:
        expires = time.time() + self.lease_seconds
        renewed: set[str] = set()
        for run_id, token in held.items():
            async with conn.execute(
                "UPDATE runs SET lease_expires = ? WHERE run_id = ? AND lease_token = ?",
                (expires, run_id, token),
            ) as cur:
                if cur.rowcount:
                    renewed.add(run_id)
        return renewed
