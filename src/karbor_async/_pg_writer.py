"""The PostgreSQL store's writer: the pending batch, the writer task, the lease book.

The writer task is the only code that writes. Per-event records go into the
pending :class:`~karbor_async._pg_ops.Batch` (a list append); every other write
is an :class:`_Op` handed to the task (:meth:`PgWriter.submit`), which first
writes the pending batch, then each operation in a transaction of its own. A
caller that is cancelled stops waiting; its write still lands or fails whole.

Across a lost connection (``_pg_link``) a transaction is run again within the
reconnect window. Past it, the batch is kept (``Batch.then``) and tried again
every :data:`RETRY_SECONDS` and at every write, waiting operations raise
:class:`StoreUnavailableError`, and a run's end that found the server gone is
*deferred*: written, after the batch before it, once the server is back.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import attrs

from karbor_async import _pg_ops as ops
from karbor_async._log import get_logger
from karbor_async._pg_schema import scrub
from karbor_async.exceptions import LeaseLostError, StoreError, StoreUnavailableError

if TYPE_CHECKING:
    import asyncpg

    from karbor_async._pg_link import WriterConnection

__all__ = ["RETRY_SECONDS", "PgWriter"]

_log = get_logger("karbor_async._pg_store")
_T = TypeVar("_T")

RETRY_SECONDS = 1.0
"""While the server cannot be reached, what is pending is tried again this often."""

Body = Callable[["asyncpg.Connection"], Awaitable[Any]]


@attrs.define
class _Op:
    """One write handed to the writer task (``body`` None: a commit, flush only)."""

    body: Body | None
    done: anyio.Event = attrs.Factory(anyio.Event)
    result: Any = None
    error: BaseException | None = None


class PgWriter:
    """One store's writes (``conn`` None: a store opened read-only, refusing them)."""

    def __init__(
        self,
        *,
        where: str,
        conn: WriterConnection | None,
        secret: str | None,
        lease_seconds: float,
    ) -> None:
        self.where = where
        self.conn = conn
        self.secret = secret
        self.lease_seconds = lease_seconds
        self.read_only = conn is None
        self.closed = False
        self.pending = ops.Batch()
        self._ops: list[_Op] = []
        self._wake = anyio.Event()
        self.quiet = 0
        """Holds of background writes (``hold``)."""
        self.held: dict[str, tuple[int, str]] = {}
        """run id -> (fencing token, checkpoint id) of the leases this store holds."""
        self.lost: dict[str, str] = {}
        """Runs another owner took from this store, with their checkpoint ids."""
        self.fenced: dict[str, tuple[int, str]] = {}
        """run id -> (fencing token, checkpoint id) of runs whose lease another process
        owns (a Temporal workflow) and that this store writes for (``fence``)."""
        self.lost_now: set[str] = set()
        self.unreported: BaseException | None = None
        self.stalled = False
        """The last write found the server unreachable past the window."""
        self.deferred: list[Body] = []
        """Run ends that found the server unreachable, written once it is back."""
        self.transactions = 0
        self.events_written = 0

    # -- checks --------------------------------------------------------------------------

    def check_open(self) -> None:
        if self.closed:
            raise StoreError(f"the PostgreSQL store {self.where} is closed")
        if self.read_only:
            raise StoreError(f"the PostgreSQL store {self.where} was opened read-only")

    def check_run(self, run_id: str) -> None:
        if run_id in self.lost:
            raise LeaseLostError(f"run {run_id!r} is owned by another engine now")

    def poke(self) -> None:
        if not self.quiet:
            self._wake.set()

    def hold(self, hold: bool) -> None:
        self.quiet = max(0, self.quiet + (1 if hold else -1))
        if not self.quiet and self.pending.has_work:
            self._wake.set()

    def tokens(self) -> dict[str, int]:
        return {r: t for r, (t, _) in self.held.items()}

    def fence(self, run_id: str, token: int, checkpoint_id: str) -> None:
        """Write ``run_id``'s records under ``token``, a lease another process owns (the
        Temporal workflow that drives the run): a batch whose token moved on is dropped
        and ``commit()`` raises :class:`LeaseLostError`, as for a lease of this store's.
        This store neither renews nor releases it."""
        if run_id not in self.held:
            self.fenced[run_id] = (token, checkpoint_id)

    def write_tokens(self) -> dict[str, int]:
        """The tokens writes go under: this store's leases and the runs it is fenced to."""
        return {r: t for r, (t, _) in (self.fenced | self.held).items()}

    # -- operations ----------------------------------------------------------------------

    async def submit(self, body: Callable[[asyncpg.Connection], Awaitable[_T]] | None) -> _T:
        """Hand a write to the writer task and wait for it (``None``: commit what is pending)."""
        self.check_open()
        op = _Op(body)
        self._ops.append(op)
        self._wake.set()
        await op.done.wait()
        if op.error is not None:
            raise op.error
        result: _T = op.result
        return result

    async def _transact(self, body: Body) -> Any:
        """``body`` in one transaction on the writer connection (the writer task only)."""
        assert self.conn is not None
        try:
            result = await self.conn.transact(body)
        except StoreError:
            raise
        except Exception as exc:
            if type(exc).__module__.startswith("asyncpg"):
                raise StoreError(
                    f"the PostgreSQL store {self.where} refused a write: "
                    f"{scrub(str(exc), self.secret)}"
                ) from None
            raise
        self.transactions += 1
        return result

    async def _flush(self) -> None:
        """Write the pending batch (the writer task only)."""
        batch, self.pending = self.pending, ops.Batch()
        if not batch.has_work:
            return
        held = self.write_tokens()
        try:
            lost = await self._transact(functools.partial(ops.write_batch, batch=batch, held=held))
        except StoreUnavailableError:
            self.pending = batch.then(self.pending)  # kept: written once the server is back
            raise
        except StoreError as exc:
            raise StoreError(f"writing to the PostgreSQL store failed: {exc}") from None
        self.events_written += sum(1 for e in batch.events if e.run_id not in lost)
        for run_id in lost:
            self.lost[run_id] = (self.held.pop(run_id, None) or self.fenced.pop(run_id))[1]
            self.lost_now.add(run_id)
            _log.warning("lease_lost", run_id=run_id)

    async def loop(self) -> None:
        """The writer task (in the store's task group)."""
        while True:
            if not (self._ops or self.deferred or (self.pending.has_work and not self.quiet)):
                await self._wake.wait()
                self._wake = anyio.Event()
                continue
            if self.stalled and not self._ops:
                # The server could not be reached: try again now and then (or at the next
                # write or commit), so that what is kept lands once it is back.
                with anyio.move_on_after(RETRY_SECONDS):
                    await self._wake.wait()
                self._wake = anyio.Event()
            todo, self._ops = self._ops, []
            failed: BaseException | None = None
            try:
                await self._flush()
            except StoreError as exc:
                failed = exc
            self.stalled = isinstance(failed, StoreUnavailableError)
            if failed is not None and not todo:
                self.unreported = failed
            if failed is None and self.deferred:
                await self._run_deferred()
            for op in todo:
                if failed is not None:
                    op.error = failed  # (what came before it was not written)
                elif op.body is not None:
                    try:
                        op.result = await self._transact(op.body)
                    except Exception as exc:
                        op.error = exc
                op.done.set()

    async def _run_deferred(self) -> None:
        """Writes that found the server down past the window (a run's end), in order."""
        while self.deferred:
            body = self.deferred[0]
            try:
                await self._transact(body)
            except StoreUnavailableError:
                self.stalled = True
                return
            except Exception as exc:
                _log.error("pg_deferred_write_failed", dsn=self.where, error=str(exc))
            self.deferred.pop(0)

    async def renew_loop(self) -> None:
        """Keep this store's leases alive (every third of their length)."""
        while True:
            await anyio.sleep(self.lease_seconds / 3)
            held = self.tokens()
            if not held:
                continue
            try:
                lost = await self.submit(
                    functools.partial(ops.renew, held=held, seconds=self.lease_seconds)
                )
            except StoreError as exc:
                _log.error("lease_renew_failed", dsn=self.where, error=str(exc))
                continue
            for run_id in lost:
                if run_id in self.held:
                    self.lost[run_id] = self.held.pop(run_id)[1]

    async def shutdown(self) -> None:
        """Flush what is pending and release this store's leases (the task still runs)."""
        try:
            await self.submit(None)
            if self.held:
                await self.submit(functools.partial(ops.release, held=self.tokens()))
                self.held.clear()
        except Exception as exc:  # closing: report, never hide the body's error
            _log.error("pg_store_close_failed", dsn=self.where, error=scrub(str(exc), self.secret))
        finally:
            self.closed = True
