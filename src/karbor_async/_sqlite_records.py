"""The SQLite store's rows: JSON encoding, the SQL column lists and row <-> record codecs.

Everything here is pure (no connection, no store state), so every other
``_sqlite*`` module may import it. The batch row generators run on the writer
connection's thread (aiosqlite hands them to ``executemany``), not on the loop.
"""

from __future__ import annotations

import enum
import functools
import json
import sqlite3
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from karbor_async._types import Hook, OperationKind, ResourceKey, RunStatus
from karbor_async.events import Event, EventKind, Progress
from karbor_async.exceptions import StoreError
from karbor_async.store import CheckpointRecord, CheckpointStatus, RunOutcome, RunRecord

__all__ = ["HookRecord", "HookStatus"]


class HookStatus(enum.Enum):
    """Where one hook call (of one attempt) stands: the kind of its latest lifecycle event."""

    STARTED = "started"
    FINISHED = "finished"
    FAILED = "failed"
    SKIPPED = "skipped"
    ABORTED = "aborted"
    THAW_FAILED = "thaw_failed"


@attrs.frozen
class HookRecord:
    """One hook call of one attempt on one resource, as committed (for crash recovery)."""

    run_id: str
    resource: ResourceKey
    hook: Hook
    attempt: int
    status: HookStatus
    group: str | None
    started_wall: float | None
    ended_wall: float | None
    error: str | None
    first_seq: int
    last_seq: int

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> HookRecord:
        return cls(
            run_id=row["run_id"],
            resource=(row["rtype"], row["rid"]),
            hook=Hook(row["hook"]),
            attempt=int(row["attempt"]),
            status=HookStatus(row["status"]),
            group=row["grp"],
            started_wall=row["started_wall"],
            ended_wall=row["ended_wall"],
            error=None if row["error"] is None else str(row["error"]),
            first_seq=int(row["first_seq"]),
            last_seq=int(row["last_seq"]),
        )


# -- JSON --------------------------------------------------------------------------------


def _json_default(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, set | frozenset):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable: {value!r}")


_encode = functools.partial(
    json.dumps, default=_json_default, separators=(",", ":"), ensure_ascii=False
)


def _loads_mapping(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise StoreError(f"stored JSON is not an object: {text[:80]!r}")
    return value


# -- rows -> records ---------------------------------------------------------------------

_RUN_COLUMNS = "run_id, operation, checkpoint_id, plan, graph, status, started_wall, outcome"
_CHECKPOINT_COLUMNS = "c.id, c.plan_name, c.status, c.created_wall, r.plan, r.graph, r.outcome"


def _outcome_from(text: str | None) -> RunOutcome | None:
    return None if text is None else RunOutcome.from_json(_loads_mapping(text))


def _run_record(row: sqlite3.Row) -> RunRecord:
    return RunRecord(
        run_id=row["run_id"],
        operation=OperationKind(row["operation"]),
        checkpoint_id=row["checkpoint_id"],
        plan=_loads_mapping(row["plan"]),
        graph=_loads_mapping(row["graph"]),
        status=RunStatus(row["status"]),
        started_wall=float(row["started_wall"]),
        outcome=_outcome_from(row["outcome"]),
    )


def _checkpoint_record(row: sqlite3.Row) -> CheckpointRecord:
    return CheckpointRecord(
        id=row["id"],
        plan_name=row["plan_name"],
        status=CheckpointStatus(row["status"]),
        created_wall=float(row["created_wall"]),
        plan=_loads_mapping(row["plan"]),
        graph=_loads_mapping(row["graph"]),
        outcome=_outcome_from(row["outcome"]),
    )


# -- batch rows (generators run on the writer connection's thread) -------------------------

_EVENT_COLUMNS = (
    "run_id, seq, kind, operation, wall, mono, rtype, rid, hook, grp, attempt, data, progress"
)

_INSERT_EVENT = (
    f"INSERT INTO events ({_EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)

_UPSERT_PROGRESS = """
INSERT INTO progress (run_id, rtype, rid, body) VALUES (?, ?, ?, ?)
ON CONFLICT (run_id, rtype, rid) DO UPDATE SET body = excluded.body
"""

_UPSERT_SAVED = """
INSERT INTO saved_info (checkpoint_id, rtype, rid, info) VALUES (?, ?, ?, ?)
ON CONFLICT (checkpoint_id, rtype, rid) DO UPDATE SET info = excluded.info
"""

_RELEASE_RESOURCE = "DELETE FROM resource_leases WHERE run_id = ? AND rtype = ? AND rid = ?"

_UPSERT_RESTORED = """
INSERT INTO restored (run_id, rtype, rid, new_id) VALUES (?, ?, ?, ?)
ON CONFLICT (run_id, rtype, rid) DO UPDATE SET new_id = excluded.new_id
"""

_EventRow = tuple[
    str,
    int,
    str,
    str,
    float,
    float,
    str | None,
    str | None,
    str | None,
    str | None,
    int,
    str | None,
    str | None,
]


def _event_row(e: Event) -> _EventRow:
    res = e.resource
    progress = None
    if e.progress is not None or e.tick:
        progress = _encode(
            {"progress": attrs.asdict(e.progress) if e.progress else None, "tick": e.tick}
        )
    return (
        e.run_id,
        e.seq,
        e.kind.value,
        e.operation.value,
        e.wall,
        e.mono,
        None if res is None else res[0],
        None if res is None else res[1],
        None if e.hook is None else e.hook.value,
        e.group,
        e.attempt,
        _encode(e.data) if e.data else None,
        progress,
    )


def _event_from_row(row: sqlite3.Row) -> Event:
    rtype, rid = row["rtype"], row["rid"]
    hook = row["hook"]
    extra = None if row["progress"] is None else _loads_mapping(row["progress"])
    progress = None if extra is None else extra.get("progress")
    return Event(
        run_id=row["run_id"],
        seq=int(row["seq"]),
        kind=EventKind(row["kind"]),
        operation=OperationKind(row["operation"]),
        wall=float(row["wall"]),
        mono=float(row["mono"]),
        resource=None if rtype is None else (rtype, rid),
        hook=None if hook is None else Hook(hook),
        group=row["grp"],
        attempt=int(row["attempt"]),
        progress=None
        if progress is None
        else Progress(
            fraction=progress.get("fraction"),
            done=progress.get("done"),
            total=progress.get("total"),
            message=progress.get("message"),
        ),
        tick=0 if extra is None else int(extra.get("tick", 0)),
        data={} if row["data"] is None else _loads_mapping(row["data"]),
    )


def _progress_rows(
    progress: Mapping[tuple[str, str, str], Event],
) -> Iterator[tuple[str, str, str, str]]:
    for (run_id, rtype, rid), e in progress.items():
        yield (run_id, rtype, rid, _encode(e.to_json()))
