"""In-process implementations of the store and bank ports (tests, embedding, benchmarks)."""

from __future__ import annotations

import copy
from collections.abc import AsyncIterable, AsyncIterator, Mapping, Sequence
from typing import Any

import attrs

from karbor_async._bankkeys import validate_key
from karbor_async._types import (
    OperationKind,
    ResourceKey,
    RunStatus,
    coerce_enum,
    coerce_optional,
)
from karbor_async.events import Event, EventKind
from karbor_async.exceptions import (
    BankKeyError,
    CheckpointBusyError,
    CheckpointNotFoundError,
    IllegalTransitionError,
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

__all__ = ["MemoryBank", "MemoryStore"]

_END_STATUS = {
    RunStatus.SUCCEEDED: CheckpointStatus.AVAILABLE,
    RunStatus.FAILED: CheckpointStatus.ERROR,
    RunStatus.CANCELLED: CheckpointStatus.CANCELLED,
}


_SCALARS = (str, int, float, bool, type(None))


def _copy_json(value: Any) -> Any:
    """A deep copy of JSON-like data, several times faster than ``copy.deepcopy`` for it.

    Saved info is JSON by contract (the SQLite store serialises it); anything
    else is handed to ``copy.deepcopy``.
    """
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is dict or isinstance(value, Mapping):
        return {k: _copy_json(v) for k, v in value.items()}
    if kind is list:
        return [_copy_json(v) for v in value]
    if kind is tuple:
        return tuple(_copy_json(v) for v in value)
    return copy.deepcopy(value)


class MemoryStore:
    """A :class:`~karbor_async.store.Store` that keeps everything in this process."""

    def __init__(self) -> None:
        self._runs: dict[str, RunRecord] = {}
        self._checkpoints: dict[str, CheckpointRecord] = {}
        self._events: dict[str, list[Event]] = {}
        self._saved: dict[str, dict[ResourceKey, dict[str, Any]]] = {}
        self._restored: dict[str, dict[ResourceKey, str]] = {}
        self._progress: dict[str, dict[ResourceKey, Event]] = {}
        self._leases: dict[ResourceKey, str] = {}
        """Resource leases: which run holds each (``RunRecord.leases``)."""
        self._abandoned: set[ResourceKey] = set()
        """Leases of ended runs whose hook there was abandoned and still runs."""
        self.commits = 0
        """How many times :meth:`commit` was awaited (tests check the commit points)."""

    async def create_run(self, record: RunRecord) -> None:
        if record.run_id in self._runs:
            raise StoreError(f"a run with id {record.run_id!r} already exists")
        if record.operation is OperationKind.DELETE:  # compare-and-set -> deleting
            cp = self._checkpoint(record.checkpoint_id)
            if cp.status is CheckpointStatus.DELETING:
                others = [
                    r.run_id
                    for r in self._runs.values()
                    if r.checkpoint_id == cp.id
                    and r.operation is OperationKind.DELETE
                    and r.status is RunStatus.RUNNING
                ]
                raise CheckpointBusyError(cp.id, others[-1] if others else None, "this process")
            check_checkpoint_transition(cp.status, CheckpointStatus.DELETING)
        for key in record.leases:  # all or none: check every one before taking any
            holder = self._leases.get(key)
            if holder is not None and (
                self._runs[holder].status is RunStatus.RUNNING or key in self._abandoned
            ):
                raise ResourceBusyError(key, holder, "this process", None)
        for key in record.leases:
            self._leases[key] = record.run_id
        if record.operation is OperationKind.DELETE:
            cp = self._checkpoint(record.checkpoint_id)
            self._checkpoints[cp.id] = attrs.evolve(cp, status=CheckpointStatus.DELETING)
        self._runs[record.run_id] = record
        self._events.setdefault(record.run_id, [])
        if record.operation is OperationKind.PROTECT:
            self._checkpoints[record.checkpoint_id] = CheckpointRecord(
                id=record.checkpoint_id,
                plan_name=str(record.plan.get("name", "")),
                status=CheckpointStatus.PROTECTING,
                created_wall=record.started_wall,
                plan=record.plan,
                graph=record.graph,
            )

    def append(self, event: Event) -> None:
        if event.kind is EventKind.PROGRESS:
            self._progress.setdefault(event.run_id, {})[event.resource or ("", "")] = event
            return
        self._events[event.run_id].append(event)

    async def load_progress(self, run_id: str) -> list[Event]:
        """The latest progress tick of each resource of a run."""
        return list(self._progress.get(run_id, {}).values())

    def save_info(self, checkpoint_id: str, key: ResourceKey, info: Mapping[str, Any]) -> None:
        self._saved.setdefault(checkpoint_id, {})[key] = _copy_json(info)

    def record_restored(self, run_id: str, key: ResourceKey, new_id: str) -> None:
        self._restored.setdefault(run_id, {})[key] = new_id

    async def commit(self) -> None:
        self.commits += 1

    def release_resource(self, run_id: str, key: ResourceKey) -> None:
        if self._leases.get(key) == run_id:
            del self._leases[key]
            self._abandoned.discard(key)

    async def finish_run(self, outcome: RunOutcome) -> None:
        run = self._run(outcome.run_id)
        for key in [k for k, holder in self._leases.items() if holder == outcome.run_id]:
            r = outcome.resources.get(key)
            if r is not None and r.abandoned_hook is not None:
                self._abandoned.add(key)  # its hook still runs: held until it ends
            else:
                del self._leases[key]
        if outcome.status is RunStatus.RUNNING:
            raise IllegalTransitionError(f"run {run.run_id} cannot finish as running")
        if run.status is not RunStatus.RUNNING:
            raise IllegalTransitionError(
                f"run {run.run_id} already ended {run.status.value}; a run ends once"
            )
        if run.operation is OperationKind.PROTECT:
            cp = self._checkpoint(run.checkpoint_id)
            new = _END_STATUS[outcome.status]
            check_checkpoint_transition(cp.status, new)
            self._checkpoints[cp.id] = attrs.evolve(cp, status=new, outcome=outcome)
        self._runs[run.run_id] = attrs.evolve(run, status=outcome.status, outcome=outcome)

    async def record_late_thaw(self, run_id: str, key: ResourceKey, at: float) -> None:
        run = self._run(run_id)
        if run.outcome is None:
            raise CheckpointNotFoundError(f"run {run_id} has not finished")
        outcome = with_late_thaw(run.outcome, key, at)
        self._runs[run_id] = attrs.evolve(run, outcome=outcome)
        cp = self._checkpoints.get(run.checkpoint_id)
        if run.operation is OperationKind.PROTECT and cp is not None:
            self._checkpoints[cp.id] = attrs.evolve(cp, outcome=outcome)

    async def set_checkpoint_status(
        self, checkpoint_id: str, status: CheckpointStatus | str
    ) -> None:
        status = coerce_enum(CheckpointStatus, status, "status")
        cp = self._checkpoint(checkpoint_id)
        check_checkpoint_transition(cp.status, status)
        self._checkpoints[checkpoint_id] = attrs.evolve(cp, status=status)

    async def get_run(self, run_id: str) -> RunRecord:
        return self._run(run_id)

    async def get_checkpoint(self, checkpoint_id: str) -> CheckpointRecord:
        return self._checkpoint(checkpoint_id)

    async def list_checkpoints(
        self,
        *,
        plan_name: str | None = None,
        status: CheckpointStatus | str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
        before_id: str | None = None,
    ) -> Sequence[CheckpointRecord]:
        status = coerce_optional(CheckpointStatus, status, "status")
        rows = sorted(
            self._checkpoints.values(), key=lambda c: (c.created_wall, c.id), reverse=True
        )
        if before_id is not None:
            ids = [c.id for c in rows]
            rows = rows[ids.index(before_id) + 1 :] if before_id in ids else []
        out = [
            c
            for c in rows
            if (plan_name is None or c.plan_name == plan_name)
            and (status is None or c.status is status)
            and (since is None or c.created_wall >= since)
            and (until is None or c.created_wall < until)
        ]
        return out[:limit]

    async def list_runs(
        self, *, checkpoint_id: str | None = None, limit: int = 100
    ) -> Sequence[RunRecord]:
        rows = [r for r in self._runs.values() if checkpoint_id in (None, r.checkpoint_id)]
        rows.sort(key=lambda r: (r.started_wall, r.run_id), reverse=True)
        return rows[:limit]

    async def load_saved_info(self, checkpoint_id: str) -> dict[ResourceKey, dict[str, Any]]:
        return {k: _copy_json(v) for k, v in self._saved.get(checkpoint_id, {}).items()}

    async def load_restored(self, run_id: str) -> dict[ResourceKey, str]:
        return dict(self._restored.get(run_id, {}))

    async def read_events(self, run_id: str, since: int = 0) -> Sequence[Event]:
        return [e for e in self._events.get(run_id, ()) if e.seq > since]

    def _run(self, run_id: str) -> RunRecord:
        try:
            return self._runs[run_id]
        except KeyError:
            raise CheckpointNotFoundError(f"no run with id {run_id!r}") from None

    def _checkpoint(self, checkpoint_id: str) -> CheckpointRecord:
        try:
            return self._checkpoints[checkpoint_id]
        except KeyError:
            raise CheckpointNotFoundError(f"no checkpoint with id {checkpoint_id!r}") from None


@attrs.define
class _MemorySection:
    _objects: dict[str, bytes]
    _prefix: str
    read_only: bool

    def _full(self, key: str) -> str:
        return self._prefix + validate_key(key)

    def _check_writable(self) -> None:
        if self.read_only:
            raise BankKeyError("this bank section is read-only (restore sections cannot write)")

    async def put(self, key: str, data: bytes) -> None:
        self._check_writable()
        self._objects[self._full(key)] = bytes(data)

    async def put_stream(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        self._check_writable()
        full = self._full(key)
        parts = [bytes(c) async for c in chunks]
        self._objects[full] = b"".join(parts)
        return len(self._objects[full])

    async def get(self, key: str) -> bytes:
        try:
            return self._objects[self._full(key)]
        except KeyError:
            raise KeyError(f"no object {key!r} in this bank section") from None

    async def get_stream(self, key: str, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        data = await self.get(key)
        for i in range(0, len(data), chunk_size):
            yield data[i : i + chunk_size]

    async def list(self, prefix: str = "") -> list[str]:
        start = self._prefix + prefix
        return sorted(k[len(self._prefix) :] for k in self._objects if k.startswith(start))

    async def delete(self, key: str) -> None:
        self._check_writable()
        self._objects.pop(self._full(key), None)


class MemoryBank:
    """A :class:`~karbor_async.plugin.Bank` that keeps objects in a dict."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def section(
        self, checkpoint_id: str, resource: ResourceKey, *, read_only: bool = False
    ) -> _MemorySection:
        prefix = f"{checkpoint_id}/{resource[0]}/{resource[1]}/"
        return _MemorySection(self.objects, prefix, read_only)

    async def delete_checkpoint(self, checkpoint_id: str) -> None:
        for key in [k for k in self.objects if k.startswith(checkpoint_id + "/")]:
            del self.objects[key]
