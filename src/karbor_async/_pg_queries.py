"""The PostgreSQL store's reads: every query, on the reader pool (committed rows only).

Each read goes through :class:`~karbor_async._pg_link.Reads`, which runs it again
across a lost connection (a read changes nothing).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from karbor_async._liveness import owner_gone
from karbor_async._sqlite_records import (
    _CHECKPOINT_COLUMNS,
    _EVENT_COLUMNS,
    _RUN_COLUMNS,
    HookRecord,
    _checkpoint_record,
    _event_from_row,
    _loads_mapping,
    _run_record,
)
from karbor_async._types import ResourceKey
from karbor_async.events import Event
from karbor_async.exceptions import CheckpointNotFoundError
from karbor_async.store import CheckpointRecord, CheckpointStatus, RunRecord

if TYPE_CHECKING:
    from karbor_async._pg_link import Reads

_CP_FROM = f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints c JOIN runs r ON r.run_id = c.id"


_HOOK_RECORDS = """
SELECT g.run_id, g.rtype, g.rid, g.hook, g.attempt, g.grp, e.kind AS status,
       g.started_wall, g.ended_wall,
       CASE WHEN e.kind IN ('failed', 'thaw_failed') THEN e.data::json ->> 'error' END AS error,
       g.first_seq, g.last_seq
FROM (
    SELECT run_id, rtype, rid, hook, attempt, MAX(grp) AS grp,
           MIN(CASE WHEN kind = 'started' THEN wall END) AS started_wall,
           MAX(CASE WHEN kind <> 'started' THEN wall END) AS ended_wall,
           MIN(seq) AS first_seq, MAX(seq) AS last_seq
    FROM events
    WHERE run_id = $1 AND hook IS NOT NULL AND rtype IS NOT NULL
      AND kind IN ('started', 'finished', 'failed', 'skipped', 'aborted', 'thaw_failed')
    GROUP BY run_id, rtype, rid, hook, attempt
) AS g
JOIN events AS e ON e.run_id = g.run_id AND e.seq = g.last_seq
ORDER BY g.first_seq
"""


def _row(record: Any) -> Any:
    """asyncpg records read by column name like ``sqlite3.Row`` (the codecs take either)."""
    return record


class PgQueries:
    """Reads through a pool of connections (one store)."""

    def __init__(self, pool: Reads) -> None:
        self.pool = pool

    async def get_run(self, run_id: str) -> RunRecord:
        row = await self.pool.fetchrow(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = $1", run_id)
        if row is None:
            raise CheckpointNotFoundError(f"no run with id {run_id!r}")
        return _run_record(_row(row))

    async def get_checkpoint(self, checkpoint_id: str) -> CheckpointRecord:
        row = await self.pool.fetchrow(f"{_CP_FROM} WHERE c.id = $1", checkpoint_id)
        if row is None:
            raise CheckpointNotFoundError(f"no checkpoint with id {checkpoint_id!r}")
        return _checkpoint_record(_row(row))

    async def list_checkpoints(
        self,
        *,
        plan_name: str | None,
        status: CheckpointStatus | None,
        since: float | None,
        until: float | None,
        limit: int,
        before_id: str | None,
    ) -> Sequence[CheckpointRecord]:
        where: list[str] = []
        args: list[object] = []

        def arg(value: object) -> str:
            args.append(value)
            return f"${len(args)}"

        if before_id is not None:
            wall = await self.pool.fetchval(
                "SELECT created_wall FROM checkpoints WHERE id = $1", before_id
            )
            if wall is None:
                return []
            where.append(f"(c.created_wall, c.id) < ({arg(float(wall))}, {arg(before_id)})")
        if plan_name is not None:
            where.append(f"c.plan_name = {arg(plan_name)}")
        if status is not None:
            where.append(f"c.status = {arg(status.value)}")
        if since is not None:
            where.append(f"c.created_wall >= {arg(since)}")
        if until is not None:
            where.append(f"c.created_wall < {arg(until)}")
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = await self.pool.fetch(
            f"{_CP_FROM}{clause} ORDER BY c.created_wall DESC, c.id DESC LIMIT {arg(limit)}",
            *args,
        )
        return [_checkpoint_record(_row(r)) for r in rows]

    async def list_runs(self, *, checkpoint_id: str | None, limit: int) -> Sequence[RunRecord]:
        if checkpoint_id is None:
            rows = await self.pool.fetch(
                f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY started_wall DESC, run_id DESC LIMIT $1",
                limit,
            )
        else:
            rows = await self.pool.fetch(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE checkpoint_id = $1"
                " ORDER BY started_wall DESC, run_id DESC LIMIT $2",
                checkpoint_id,
                limit,
            )
        return [_run_record(_row(r)) for r in rows]

    async def load_saved_info(self, checkpoint_id: str) -> dict[ResourceKey, dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT rtype, rid, info FROM saved_info WHERE checkpoint_id = $1", checkpoint_id
        )
        return {(str(r[0]), str(r[1])): _loads_mapping(str(r[2])) for r in rows}

    async def load_restored(self, run_id: str) -> dict[ResourceKey, str]:
        rows = await self.pool.fetch(
            "SELECT rtype, rid, new_id FROM restored WHERE run_id = $1", run_id
        )
        return {(str(r[0]), str(r[1])): str(r[2]) for r in rows}

    async def read_events(self, run_id: str, since: int, limit: int | None) -> Sequence[Event]:
        rows = await self.pool.fetch(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE run_id = $1 AND seq > $2"
            " ORDER BY seq LIMIT $3",
            run_id,
            since,
            limit,
        )
        return [_event_from_row(_row(r)) for r in rows]

    async def last_seq(self, run_id: str) -> int:
        value = await self.pool.fetchval("SELECT seq FROM run_seq WHERE run_id = $1", run_id)
        return 0 if value is None else int(value)

    async def load_hook_records(self, run_id: str) -> list[HookRecord]:
        """Per hook call and attempt, from the lifecycle events (SQLite's ``hook_records``
        view, as one query): the status is the kind of the call's latest event."""
        rows = await self.pool.fetch(_HOOK_RECORDS, run_id)
        return [HookRecord.from_row(_row(r)) for r in rows]

    async def sentinel_firings(self, run_id: str) -> dict[ResourceKey, dict[str, Any]]:
        rows = await self.pool.fetch(
            "SELECT rtype, rid, at, why, result, host FROM sentinel_firings WHERE run_id = $1"
            " ORDER BY at",
            run_id,
        )
        return {
            (str(r[0]), str(r[1])): {
                "run": run_id,
                "resource": [str(r[0]), str(r[1])],
                "at": float(r[2]),
                "why": str(r[3]),
                "result": _loads_mapping(str(r[4])),
                "host": str(r[5]),
            }
            for r in rows
        }

    async def load_progress(self, run_id: str) -> list[Event]:
        rows = await self.pool.fetch(
            "SELECT body FROM progress WHERE run_id = $1 ORDER BY rtype, rid", run_id
        )
        return [Event.from_json(_loads_mapping(str(r[0]))) for r in rows]

    async def unfinished_runs(
        self, owner: str
    ) -> tuple[list[RunRecord], list[tuple[RunRecord, str, float]]]:
        """(runs recovery may take now, runs a live other owner holds)."""
        rows = await self.pool.fetch(
            f"SELECT {_RUN_COLUMNS}, lease_owner, lease_expires FROM runs"
            " WHERE status = 'running' AND (lease_owner IS NULL OR lease_owner <> $1)"
            " ORDER BY started_wall, run_id",
            owner,
        )
        now = time.time()
        free: list[RunRecord] = []
        held: list[tuple[RunRecord, str, float]] = []
        for r in rows:
            record = _run_record(_row(r))
            holder, expires = r["lease_owner"], float(r["lease_expires"])
            if holder is None or expires <= now or owner_gone(str(holder)):
                free.append(record)
            else:
                held.append((record, str(holder), expires))
        return free, held
