"""The SQLite store's run operations: create and finish runs, checkpoint lifecycle, imports.

Each is an operation on the writer (its own savepoint in the writer's next
batch, so one that raises changes nothing) and reads what it checks inside
that transaction.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator

import aiosqlite

from karbor_async._liveness import owner_gone
from karbor_async._sqlite_file import _fetchone
from karbor_async._sqlite_records import _encode, _outcome_from
from karbor_async._sqlite_state import _LeaseBook
from karbor_async._sqlite_writer import _Writer
from karbor_async._types import OperationKind, ResourceKey, RunStatus
from karbor_async.exceptions import (
    CheckpointBusyError,
    CheckpointNotFoundError,
    IllegalTransitionError,
    LeaseLostError,
    ResourceBusyError,
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


class _Runs:
    """The run and checkpoint writes other than the per-event ones (one per store)."""

    def __init__(self, *, writer: _Writer, book: _LeaseBook, lease_seconds: float) -> None:
        self.writer = writer
        self.book = book
        self.lease_seconds = lease_seconds

    async def create_run(self, record: RunRecord) -> None:
        plan = _encode(record.plan)
        graph = _encode(record.graph)
        outcome = None if record.outcome is None else _encode(record.outcome.to_json())
        leased = record.status is RunStatus.RUNNING

        async def op(conn: aiosqlite.Connection) -> None:
            expires = time.time() + self.lease_seconds
            if record.operation is OperationKind.DELETE:
                await _start_deleting(conn, record)
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
                        self.book.owner if leased else None,
                        1 if leased else 0,
                        expires if leased else 0.0,
                    ),
                )
            except sqlite3.IntegrityError as exc:
                raise StoreError(f"a run with id {record.run_id!r} already exists") from exc
            if record.leases:
                await _take_resources(conn, record.run_id, record.leases)
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

        await self.writer.submit(op)
        if leased:
            self.book.hold(record.run_id, 1, record.checkpoint_id)

    async def finish_run(self, outcome: RunOutcome) -> None:
        if outcome.status is RunStatus.RUNNING:
            raise IllegalTransitionError(f"run {outcome.run_id!r} cannot finish as running")
        self.book.check(outcome.run_id)
        body = _encode(outcome.to_json())
        held = self.book.held.get(outcome.run_id)

        async def op(conn: aiosqlite.Connection) -> None:
            row = await _fetchone(
                conn,
                "SELECT operation, checkpoint_id, status, lease_token FROM runs WHERE run_id = ?",
                (outcome.run_id,),
            )
            if row is None:
                raise CheckpointNotFoundError(f"no run with id {outcome.run_id!r}")
            if held is not None and int(row["lease_token"]) != held.token:
                self.book.mark_lost([outcome.run_id])
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
            abandoned = [k for k, r in outcome.resources.items() if r.abandoned_hook is not None]
            if abandoned:  # their hooks still run: held until they end (or the process dies)
                await conn.executemany(
                    "UPDATE resource_leases SET abandoned_by = ?"
                    " WHERE run_id = ? AND rtype = ? AND rid = ?",
                    [(self.book.owner, outcome.run_id, k[0], k[1]) for k in abandoned],
                )
            await conn.execute(
                "DELETE FROM resource_leases WHERE run_id = ? AND abandoned_by IS NULL",
                (outcome.run_id,),
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

        _, batch = await self.writer.submit(op)
        self.book.unhold(outcome.run_id)
        if batch.error is not None:
            raise batch.error

    async def record_late_thaw(self, run_id: str, key: ResourceKey, at: float) -> None:
        self.writer.check_open()

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

        _, batch = await self.writer.submit_unchecked(op)
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

        await self.writer.submit(op)

    async def import_checkpoints(self, records: Iterable[CheckpointRecord]) -> int:
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
                raise StoreError(
                    f"importing checkpoints into {self.writer.path} failed: {exc}; an id "
                    "already in the store cannot be imported again"
                ) from exc

        await self.writer.submit(op)
        return len(rows)


async def _take_resources(
    conn: aiosqlite.Connection, run_id: str, keys: tuple[ResourceKey, ...]
) -> None:
    """Lease every resource to ``run_id``, all or none (in the run's creating transaction).

    A resource is held while its run is running with a live lease (an owner whose
    lease has not expired and that is not a dead process of this host).
    """
    wanted = set(keys)
    now = time.time()
    async with conn.execute(
        "SELECT l.rtype, l.rid, r.run_id, r.lease_owner, r.lease_expires, l.abandoned_by"
        " FROM resource_leases AS l JOIN runs AS r ON r.run_id = l.run_id"
        " WHERE (r.status = 'running' OR l.abandoned_by IS NOT NULL) AND r.run_id != ?",
        (run_id,),
    ) as cur:
        async for row in cur:
            key = (str(row[0]), str(row[1]))
            if key not in wanted:
                continue
            if row[5] is not None:  # an abandoned hook of an ended run may still run
                if not owner_gone(str(row[5])):
                    raise ResourceBusyError(key, str(row[2]), str(row[5]), None)
                continue
            owner, expires = row[3], float(row[4])
            if owner is None or expires <= now or owner_gone(str(owner)):
                continue
            raise ResourceBusyError(key, str(row[2]), str(owner), expires)
    await conn.executemany(
        "INSERT OR REPLACE INTO resource_leases (rtype, rid, run_id) VALUES (?, ?, ?)",
        [(k[0], k[1], run_id) for k in keys],
    )


async def _start_deleting(conn: aiosqlite.Connection, record: RunRecord) -> None:
    """Compare-and-set ``-> deleting`` in the delete run's creating transaction: the
    loser of two deletes creates no run (CheckpointBusyError names the winner)."""
    cp = record.checkpoint_id
    row = await _fetchone(conn, "SELECT status FROM checkpoints WHERE id = ?", (cp,))
    if row is None:
        raise CheckpointNotFoundError(f"no checkpoint with id {cp!r}")
    status = CheckpointStatus(row["status"])
    if status is CheckpointStatus.DELETING:
        other = await _fetchone(
            conn,
            "SELECT run_id, lease_owner, lease_expires FROM runs WHERE checkpoint_id = ?"
            " AND operation = 'delete' AND status = 'running' AND run_id != ?"
            " ORDER BY started_wall DESC LIMIT 1",
            (cp, record.run_id),
        )
        if other is None:
            raise CheckpointBusyError(cp, None)
        raise CheckpointBusyError(
            cp, str(other["run_id"]), other["lease_owner"], float(other["lease_expires"])
        )
    check_checkpoint_transition(status, CheckpointStatus.DELETING)
    await conn.execute(
        "UPDATE checkpoints SET status = ? WHERE id = ?", (CheckpointStatus.DELETING.value, cp)
    )
