"""The PostgreSQL store's transactions: the write-behind batch, runs, the lifecycle, leases.

Pure functions of an asyncpg connection inside a transaction the caller opened;
the store (``_pg_store``) serialises them on its writer connection. Rows reuse
the SQLite store's codecs (``_sqlite_records``): the same JSON and columns.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import attrs

from karbor_async._liveness import owner_gone
from karbor_async._sqlite_records import _encode, _event_row, _outcome_from
from karbor_async._types import OperationKind, ResourceKey, RunStatus
from karbor_async.events import Event
from karbor_async.exceptions import (
    CheckpointBusyError,
    CheckpointNotFoundError,
    IllegalTransitionError,
    LeaseHeldError,
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

if TYPE_CHECKING:
    import asyncpg

CHANNEL = "karbor_events"
DRIVEN = "temporal:"
"""The lease owner of a run a Temporal workflow drives (``temporal:<workflow id>``): only
that workflow renews it, and no engine takes it over, expired or not."""
"""The NOTIFY channel: payload ``"<last committed seq> <run key>"`` (the rows carry the
events): the run key is the run id, or ``#`` and its SHA-256 for an id too long for
PostgreSQL's 8,000-byte payload limit (:func:`notify_key`)."""

NOTIFY_LIMIT = 7999
"""PostgreSQL refuses a NOTIFY payload of 8,000 bytes or more."""
_KEY_LIMIT = 1000
"""Run ids longer than this (UTF-8 bytes) are announced by their digest: the payload then
stays far below :data:`NOTIFY_LIMIT` whatever the id (a seq has at most 20 digits)."""


def notify_key(run_id: str) -> str:
    """How NOTIFY names ``run_id``: itself, or ``#<sha256>`` for an id over 1,000 bytes."""
    raw = run_id.encode()
    if len(raw) <= _KEY_LIMIT:
        return run_id
    return "#" + hashlib.sha256(raw).hexdigest()


_END_STATUS = {
    RunStatus.SUCCEEDED: CheckpointStatus.AVAILABLE,
    RunStatus.FAILED: CheckpointStatus.ERROR,
    RunStatus.CANCELLED: CheckpointStatus.CANCELLED,
}


@attrs.define
class Batch:
    """Write-behind records not yet written (one transaction writes them all)."""

    events: list[Event] = attrs.Factory(list)
    progress: dict[tuple[str, str, str], Event] = attrs.Factory(dict)
    saved: dict[tuple[str, str, str], str] = attrs.Factory(dict)
    restored: dict[tuple[str, str, str], str] = attrs.Factory(dict)
    released: set[tuple[str, str, str]] = attrs.Factory(set)

    @property
    def has_work(self) -> bool:
        return bool(self.events or self.progress or self.saved or self.restored or self.released)

    def run_ids(self) -> set[str]:
        ids = {e.run_id for e in self.events}
        ids.update(k[0] for k in self.progress)
        ids.update(k[0] for k in self.restored)
        ids.update(k[0] for k in self.released)
        return ids

    def then(self, later: Batch) -> Batch:
        """This batch (not written) followed by what was enqueued after it: later records
        of one key win, events keep their order."""
        return Batch(
            events=[*self.events, *later.events],
            progress={**self.progress, **later.progress},
            saved={**self.saved, **later.saved},
            restored={**self.restored, **later.restored},
            released=self.released | later.released,
        )

    def drop(self, runs: set[str], checkpoints: set[str]) -> None:
        """Forget the writes of runs this store lost (fencing)."""
        self.events = [e for e in self.events if e.run_id not in runs]
        self.progress = {k: v for k, v in self.progress.items() if k[0] not in runs}
        self.restored = {k: v for k, v in self.restored.items() if k[0] not in runs}
        self.released = {k for k in self.released if k[0] not in runs}
        self.saved = {k: v for k, v in self.saved.items() if k[0] not in checkpoints}


async def write_batch(
    conn: asyncpg.Connection, batch: Batch, held: Mapping[str, int]
) -> dict[str, int]:
    """Write ``batch``; returns the runs whose lease token moved on (their writes dropped)."""
    lost: dict[str, int] = {}
    mine = sorted(r for r in batch.run_ids() if r in held)
    if mine:
        for row in await conn.fetch(
            "SELECT run_id, lease_token FROM runs WHERE run_id = ANY($1::text[])"
            " ORDER BY run_id FOR UPDATE",
            mine,
        ):
            if int(row["lease_token"]) != held[row["run_id"]]:
                lost[str(row["run_id"])] = int(row["lease_token"])
    per_run: dict[str, list[Event]] = {}
    for e in batch.events:
        if e.run_id not in lost:
            per_run.setdefault(e.run_id, []).append(e)
    rows: list[tuple[Any, ...]] = []
    for run_id in sorted(per_run):  # one lock order for every writer
        events = per_run[run_id]
        last = int(
            await conn.fetchval(
                "INSERT INTO run_seq (run_id, seq) VALUES ($1, $2) ON CONFLICT (run_id)"
                " DO UPDATE SET seq = run_seq.seq + excluded.seq RETURNING seq",
                run_id,
                len(events),
            )
        )
        first = last - len(events) + 1
        # Delivered at commit, in commit order: listeners read the rows up to ``last``.
        await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, f"{last} {notify_key(run_id)}")
        for i, e in enumerate(events):
            values = _event_row(e)
            rows.append((values[0], first + i, *values[2:]))
    if rows:
        await conn.executemany(
            "INSERT INTO events (run_id, seq, kind, operation, wall, mono, rtype, rid, hook,"
            " grp, attempt, data, progress)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)",
            rows,
        )
    progress = [
        (k[0], k[1], k[2], _encode(e.to_json()))
        for k, e in batch.progress.items()
        if k[0] not in lost
    ]
    if progress:
        await conn.executemany(
            "INSERT INTO progress (run_id, rtype, rid, body) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (run_id, rtype, rid) DO UPDATE SET body = excluded.body",
            progress,
        )
    if batch.saved:
        await conn.executemany(
            "INSERT INTO saved_info (checkpoint_id, rtype, rid, info) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (checkpoint_id, rtype, rid) DO UPDATE SET info = excluded.info",
            [(*k, v) for k, v in batch.saved.items()],
        )
    restored = [(*k, v) for k, v in batch.restored.items() if k[0] not in lost]
    if restored:
        await conn.executemany(
            "INSERT INTO restored (run_id, rtype, rid, new_id) VALUES ($1, $2, $3, $4)"
            " ON CONFLICT (run_id, rtype, rid) DO UPDATE SET new_id = excluded.new_id",
            restored,
        )
    released = [k for k in batch.released if k[0] not in lost]
    if released:
        await conn.executemany(
            "DELETE FROM resource_leases WHERE run_id = $1 AND rtype = $2 AND rid = $3",
            released,
        )
    return lost


_IMPORT_RUN_STATUS = {
    CheckpointStatus.PROTECTING: RunStatus.RUNNING,
    CheckpointStatus.AVAILABLE: RunStatus.SUCCEEDED,
    CheckpointStatus.ERROR: RunStatus.FAILED,
    CheckpointStatus.CANCELLED: RunStatus.CANCELLED,
}


async def import_checkpoints(
    conn: asyncpg.Connection, records: Sequence[CheckpointRecord], where: str
) -> int:
    """Insert finished checkpoints and their protect runs (as ``SqliteStore``'s import)."""
    runs: list[tuple[object, ...]] = []
    checkpoints: list[tuple[object, ...]] = []
    for c in records:
        o = c.outcome
        status = o.status if o else _IMPORT_RUN_STATUS.get(c.status, RunStatus.SUCCEEDED)
        runs.append(
            (
                c.id,
                OperationKind.PROTECT.value,
                c.id,
                _encode(c.plan),
                _encode(c.graph),
                status.value,
                c.created_wall,
                None if o is None else o.ended_wall,
                None if o is None else _encode(o.to_json()),
            )
        )
        checkpoints.append(
            (
                c.id,
                c.plan_name,
                c.status.value,
                c.created_wall,
                None if o is None else o.ended_wall,
                None if o is None else len(o.resources),
                None if o is None else o.skew,
                None if o is None else bool(o.crash_consistent),
                None if o is None else o.error,
            )
        )
    try:
        await conn.executemany(
            "INSERT INTO runs (run_id, operation, checkpoint_id, plan, graph, status,"
            " started_wall, ended_wall, outcome) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            runs,
        )
        await conn.executemany(
            "INSERT INTO checkpoints (id, plan_name, status, created_wall, ended_wall,"
            " resources, skew, crash_consistent, error)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            checkpoints,
        )
    except Exception as exc:
        if getattr(exc, "sqlstate", None) != "23505":  # unique_violation
            raise
        raise StoreError(
            f"importing checkpoints into {where} failed: {exc}; an id already in the store "
            "cannot be imported again"
        ) from None
    return len(records)


async def create_run(
    conn: asyncpg.Connection, record: RunRecord, owner: str, lease_seconds: float
) -> bool:
    """Insert the run (and its checkpoint, leases); True when it took the run's lease."""
    leased = record.status is RunStatus.RUNNING
    if record.operation is OperationKind.DELETE:
        await _start_deleting(conn, record)
    inserted = await conn.fetchval(
        "INSERT INTO runs (run_id, operation, checkpoint_id, plan, graph, status, started_wall,"
        " outcome, lease_owner, lease_token, lease_expires)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        " ON CONFLICT (run_id) DO NOTHING RETURNING 1",
        record.run_id,
        record.operation.value,
        record.checkpoint_id,
        _encode(record.plan),
        _encode(record.graph),
        record.status.value,
        record.started_wall,
        None if record.outcome is None else _encode(record.outcome.to_json()),
        owner if leased else None,
        1 if leased else 0,
        time.time() + lease_seconds if leased else 0.0,
    )
    if inserted is None:
        raise StoreError(f"a run with id {record.run_id!r} already exists")
    if record.leases:
        await _take_resources(conn, record.run_id, record.leases)
    if record.operation is OperationKind.PROTECT:
        done = await conn.fetchval(
            "INSERT INTO checkpoints (id, plan_name, status, created_wall)"
            " VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING RETURNING 1",
            record.checkpoint_id,
            str(record.plan.get("name", "")),
            CheckpointStatus.PROTECTING.value,
            record.started_wall,
        )
        if done is None:
            raise StoreError(f"a checkpoint with id {record.checkpoint_id!r} already exists")
    return leased


async def _take_resources(
    conn: asyncpg.Connection, run_id: str, keys: tuple[ResourceKey, ...]
) -> None:
    """Lease every resource to ``run_id``, all or none, as the SQLite store does."""
    now = time.time()
    rows = await conn.fetch(
        "SELECT l.rtype, l.rid, r.run_id, r.lease_owner, r.lease_expires, l.abandoned_by"
        " FROM resource_leases AS l JOIN runs AS r ON r.run_id = l.run_id"
        " WHERE (l.rtype, l.rid) IN (SELECT * FROM unnest($1::text[], $2::text[]))"
        " AND (r.status = 'running' OR l.abandoned_by IS NOT NULL) AND r.run_id <> $3"
        " FOR UPDATE OF l",
        [k[0] for k in keys],
        [k[1] for k in keys],
        run_id,
    )
    for row in rows:
        key = (str(row[0]), str(row[1]))
        if row[5] is not None:
            if not owner_gone(str(row[5])):
                raise ResourceBusyError(key, str(row[2]), str(row[5]), None)
            continue
        owner, expires = row[3], float(row[4])
        if owner is None or expires <= now or owner_gone(str(owner)):
            continue
        raise ResourceBusyError(key, str(row[2]), str(owner), expires)
    await conn.executemany(
        "INSERT INTO resource_leases (rtype, rid, run_id) VALUES ($1, $2, $3)"
        " ON CONFLICT (rtype, rid) DO UPDATE SET run_id = excluded.run_id, abandoned_by = NULL",
        [(k[0], k[1], run_id) for k in keys],
    )


async def _start_deleting(conn: asyncpg.Connection, record: RunRecord) -> None:
    cp = record.checkpoint_id
    status = await conn.fetchval("SELECT status FROM checkpoints WHERE id = $1 FOR UPDATE", cp)
    if status is None:
        raise CheckpointNotFoundError(f"no checkpoint with id {cp!r}")
    if CheckpointStatus(status) is CheckpointStatus.DELETING:
        other = await conn.fetchrow(
            "SELECT run_id, lease_owner, lease_expires FROM runs WHERE checkpoint_id = $1"
            " AND operation = 'delete' AND status = 'running' AND run_id <> $2"
            " ORDER BY started_wall DESC LIMIT 1",
            cp,
            record.run_id,
        )
        if other is None:
            raise CheckpointBusyError(cp, None)
        raise CheckpointBusyError(
            cp, str(other["run_id"]), other["lease_owner"], float(other["lease_expires"])
        )
    check_checkpoint_transition(CheckpointStatus(status), CheckpointStatus.DELETING)
    await conn.execute(
        "UPDATE checkpoints SET status = $1 WHERE id = $2", CheckpointStatus.DELETING.value, cp
    )


async def finish_run(
    conn: asyncpg.Connection, outcome: RunOutcome, owner: str, token: int | None
) -> bool:
    """End the run; False (nothing written) when its lease token moved on to another owner."""
    row = await conn.fetchrow(
        "SELECT operation, checkpoint_id, status, lease_token FROM runs WHERE run_id = $1"
        " FOR UPDATE",
        outcome.run_id,
    )
    if row is None:
        raise CheckpointNotFoundError(f"no run with id {outcome.run_id!r}")
    if token is not None and int(row["lease_token"]) != token:
        return False
    old = RunStatus(row["status"])
    if old is not RunStatus.RUNNING:
        raise IllegalTransitionError(
            f"run {outcome.run_id!r} already ended {old.value}; it cannot end again"
        )
    if OperationKind(row["operation"]) is OperationKind.PROTECT:
        cp = str(row["checkpoint_id"])
        status = await conn.fetchval("SELECT status FROM checkpoints WHERE id = $1", cp)
        if status is None:
            raise CheckpointNotFoundError(f"no checkpoint with id {cp!r}")
        new = _END_STATUS[outcome.status]
        check_checkpoint_transition(CheckpointStatus(status), new)
        await conn.execute(
            "UPDATE checkpoints SET status = $1, ended_wall = $2, resources = $3, skew = $4,"
            " crash_consistent = $5, error = $6 WHERE id = $7",
            new.value,
            outcome.ended_wall,
            len(outcome.resources),
            outcome.skew,
            bool(outcome.crash_consistent),
            outcome.error,
            cp,
        )
    await conn.execute(
        "UPDATE runs SET status = $1, ended_wall = $2, outcome = $3, error = $4,"
        " lease_owner = NULL, lease_expires = 0 WHERE run_id = $5",
        outcome.status.value,
        outcome.ended_wall,
        _encode(outcome.to_json()),
        outcome.error,
        outcome.run_id,
    )
    abandoned = [k for k, r in outcome.resources.items() if r.abandoned_hook is not None]
    if abandoned:
        await conn.executemany(
            "UPDATE resource_leases SET abandoned_by = $1"
            " WHERE run_id = $2 AND rtype = $3 AND rid = $4",
            [(owner, outcome.run_id, k[0], k[1]) for k in abandoned],
        )
    await conn.execute(
        "DELETE FROM resource_leases WHERE run_id = $1 AND abandoned_by IS NULL", outcome.run_id
    )
    return True


async def record_late_thaw(
    conn: asyncpg.Connection, run_id: str, key: ResourceKey, at: float
) -> None:
    text = await conn.fetchval("SELECT outcome FROM runs WHERE run_id = $1 FOR UPDATE", run_id)
    outcome = _outcome_from(cast("str | None", text))
    if outcome is None:
        raise CheckpointNotFoundError(f"no finished run with id {run_id!r}")
    await conn.execute(
        "UPDATE runs SET outcome = $1 WHERE run_id = $2",
        _encode(with_late_thaw(outcome, key, at).to_json()),
        run_id,
    )


async def set_checkpoint_status(
    conn: asyncpg.Connection, checkpoint_id: str, status: CheckpointStatus
) -> None:
    old = await conn.fetchval(
        "SELECT status FROM checkpoints WHERE id = $1 FOR UPDATE", checkpoint_id
    )
    if old is None:
        raise CheckpointNotFoundError(f"no checkpoint with id {checkpoint_id!r}")
    check_checkpoint_transition(CheckpointStatus(old), status)
    await conn.execute(
        "UPDATE checkpoints SET status = $1 WHERE id = $2", status.value, checkpoint_id
    )


async def acquire_lease(
    conn: asyncpg.Connection, run_id: str, owner: str, seconds: float
) -> tuple[int, str]:
    """Take ``run_id`` over for ``owner``: the new fencing token and the checkpoint id."""
    row = await conn.fetchrow(
        "SELECT checkpoint_id, status, lease_owner, lease_token, lease_expires FROM runs"
        " WHERE run_id = $1 FOR UPDATE",
        run_id,
    )
    if row is None:
        raise CheckpointNotFoundError(f"no run with id {run_id!r}")
    if RunStatus(row["status"]) is not RunStatus.RUNNING:
        raise IllegalTransitionError(f"run {run_id!r} has ended; there is nothing to recover")
    current, expires = row["lease_owner"], float(row["lease_expires"])
    if current is not None and current != owner and str(current).startswith(DRIVEN):
        raise LeaseHeldError(run_id, str(current), expires)  # a workflow drives it: never
    if (
        current is not None
        and current != owner
        and expires > time.time()
        and not owner_gone(str(current))
    ):
        raise LeaseHeldError(run_id, str(current), expires)
    token = int(row["lease_token"]) + 1
    await conn.execute(
        "UPDATE runs SET lease_owner = $1, lease_token = $2, lease_expires = $3 WHERE run_id = $4",
        owner,
        token,
        time.time() + seconds,
        run_id,
    )
    return token, str(row["checkpoint_id"])


async def renew(conn: asyncpg.Connection, held: Mapping[str, int], seconds: float) -> set[str]:
    """Extend each held lease whose token still stands; returns the runs that were lost."""
    if not held:
        return set()
    ids = list(held)
    kept = await conn.fetch(
        "UPDATE runs AS r SET lease_expires = $1 FROM unnest($2::text[], $3::bigint[])"
        " AS h(run_id, token) WHERE r.run_id = h.run_id AND r.lease_token = h.token"
        " RETURNING r.run_id",
        time.time() + seconds,
        ids,
        [held[i] for i in ids],
    )
    return set(ids) - {str(r[0]) for r in kept}


async def release(conn: asyncpg.Connection, held: Mapping[str, int]) -> None:
    if held:
        ids = list(held)
        await conn.execute(
            "UPDATE runs AS r SET lease_owner = NULL, lease_expires = 0"
            " FROM unnest($1::text[], $2::bigint[]) AS h(run_id, token)"
            " WHERE r.run_id = h.run_id AND r.lease_token = h.token AND r.status = 'running'",
            ids,
            [held[i] for i in ids],
        )
