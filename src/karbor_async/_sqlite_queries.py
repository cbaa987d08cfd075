"""The SQLite store's queries: every read, on the read-only connection.

Reads see what is committed (WAL readers never wait for the writer), so a
subscriber reads events only once they are durable.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiosqlite

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


class _Queries:
    """The store's reads (one per store); ``check_open`` raises once the store is closed."""

    def __init__(self, *, reader: aiosqlite.Connection, check_open: Callable[[], None]) -> None:
        self.reader = reader
        self.check_open = check_open

    async def read(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        self.check_open()
        return list(await self.reader.execute_fetchall(sql, params))

    async def get_run(self, run_id: str) -> RunRecord:
        rows = await self.read(f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ?", (run_id,))
        if not rows:
            raise CheckpointNotFoundError(f"no run with id {run_id!r}")
        return _run_record(rows[0])

    async def get_checkpoint(self, checkpoint_id: str) -> CheckpointRecord:
        rows = await self.read(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints c JOIN runs r ON r.run_id = c.id"
            " WHERE c.id = ?",
            (checkpoint_id,),
        )
        if not rows:
            raise CheckpointNotFoundError(f"no checkpoint with id {checkpoint_id!r}")
        return _checkpoint_record(rows[0])

    async def list_checkpoints(
        self,
        *,
        plan_name: str | None = None,
        status: CheckpointStatus | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        before_id: str | None = None,
    ) -> Sequence[CheckpointRecord]:
        where: list[str] = []
        params: list[object] = []
        if before_id is not None:
            anchor = await self.read(
                "SELECT created_wall FROM checkpoints WHERE id = ?", (before_id,)
            )
            if not anchor:
                return []
            where.append("(c.created_wall, c.id) < (?, ?)")
            params += [anchor[0]["created_wall"], before_id]
        if plan_name is not None:
            where.append("c.plan_name = ?")
            params.append(plan_name)
        if status is not None:
            where.append("c.status = ?")
            params.append(status.value)
        if since is not None:
            where.append("c.created_wall >= ?")
            params.append(since)
        if until is not None:
            where.append("c.created_wall < ?")
            params.append(until)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        params.append(max(0, limit))
        rows = await self.read(
            f"SELECT {_CHECKPOINT_COLUMNS} FROM checkpoints c JOIN runs r ON r.run_id = c.id"
            f" {clause} ORDER BY c.created_wall DESC, c.id DESC LIMIT ?",
            params,
        )
        return [_checkpoint_record(r) for r in rows]

    async def list_runs(
        self, *, checkpoint_id: str | None = None, limit: int = 100
    ) -> Sequence[RunRecord]:
        if checkpoint_id is None:
            rows = await self.read(
                f"SELECT {_RUN_COLUMNS} FROM runs ORDER BY started_wall DESC, run_id DESC LIMIT ?",
                (max(0, limit),),
            )
        else:
            rows = await self.read(
                f"SELECT {_RUN_COLUMNS} FROM runs WHERE checkpoint_id = ?"
                " ORDER BY started_wall DESC, run_id DESC LIMIT ?",
                (checkpoint_id, max(0, limit)),
            )
        return [_run_record(r) for r in rows]

    async def load_saved_info(self, checkpoint_id: str) -> dict[ResourceKey, dict[str, Any]]:
        rows = await self.read(
            "SELECT rtype, rid, info FROM saved_info WHERE checkpoint_id = ?", (checkpoint_id,)
        )
        return {(r["rtype"], r["rid"]): _loads_mapping(r["info"]) for r in rows}

    async def load_restored(self, run_id: str) -> dict[ResourceKey, str]:
        rows = await self.read(
            "SELECT rtype, rid, new_id FROM restored WHERE run_id = ?", (run_id,)
        )
        return {(r["rtype"], r["rid"]): str(r["new_id"]) for r in rows}

    async def read_events(
        self, run_id: str, since: int = 0, *, limit: int | None = None
    ) -> Sequence[Event]:
        rows = await self.read(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE run_id = ? AND seq > ?"
            " ORDER BY seq LIMIT ?",
            (run_id, since, -1 if limit is None else limit),
        )
        return [_event_from_row(r) for r in rows]

    async def last_seq(self, run_id: str) -> int:
        rows = await self.read("SELECT MAX(seq) AS seq FROM events WHERE run_id = ?", (run_id,))
        value = rows[0]["seq"] if rows else None
        return 0 if value is None else int(value)

    async def load_hook_records(self, run_id: str) -> list[HookRecord]:
        rows = await self.read(
            "SELECT run_id, rtype, rid, hook, attempt, grp, status, started_wall, ended_wall,"
            " error, first_seq, last_seq FROM hook_records WHERE run_id = ? ORDER BY first_seq",
            (run_id,),
        )
        return [HookRecord.from_row(r) for r in rows]

    async def load_progress(self, run_id: str) -> list[Event]:
        rows = await self.read(
            "SELECT body FROM progress WHERE run_id = ? ORDER BY rtype, rid", (run_id,)
        )
        return [Event.from_json(_loads_mapping(r["body"])) for r in rows]

    async def unfinished_runs(
        self, owner: str
    ) -> tuple[list[RunRecord], list[tuple[RunRecord, str, float]]]:
        """Running runs this owner does not hold: (those recovery may take now, and those
        live engines hold, with the owner and lease expiry). A lease whose owner is a
        process of this host that no longer runs is free at once (``_liveness``)."""
        rows = await self.read(
            f"SELECT {_RUN_COLUMNS}, lease_owner, lease_expires FROM runs"
            " WHERE status = 'running' AND (lease_owner IS NULL OR lease_owner != ?)"
            " ORDER BY started_wall, run_id",
            (owner,),
        )
        now = time.time()
        free: list[RunRecord] = []
        held: list[tuple[RunRecord, str, float]] = []
        for r in rows:
            holder, expires = r["lease_owner"], float(r["lease_expires"])
            if holder is None or expires <= now or owner_gone(str(holder)):
                free.append(_run_record(r))
            else:
                held.append((_run_record(r), str(holder), expires))
        return free, held
