"""The SQLite store's shared state types: batches, writer operations and the lease book.

The lowest of the ``_sqlite*`` modules that hold state: the writer, the leases
and the run operations all import it, and it imports none of them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Generic, TypeVar

import aiosqlite
import anyio
import attrs

from karbor_async._log import get_logger
from karbor_async.events import Event
from karbor_async.exceptions import LeaseLostError, StoreError

_log = get_logger("karbor_async._sqlite")

_T = TypeVar("_T")


@attrs.define
class _Held:
    token: int
    checkpoint_id: str


@attrs.define(eq=False)
class _Op(Generic[_T]):
    """An async store operation run by the writer inside its own savepoint."""

    fn: Callable[[aiosqlite.Connection], Awaitable[_T]]
    result: Any = None
    error: Exception | None = None


@attrs.define(eq=False)
class _Batch:
    """Everything enqueued between two writer transactions."""

    events: list[Event] = attrs.Factory(list)
    progress: dict[tuple[str, str, str], Event] = attrs.Factory(dict)
    saved: dict[tuple[str, str, str], str] = attrs.Factory(dict)
    restored: dict[tuple[str, str, str], str] = attrs.Factory(dict)
    released: set[tuple[str, str, str]] = attrs.Factory(set)
    """Resource leases given back before their run ends: (run_id, rtype, rid)."""
    ops: list[_Op[Any]] = attrs.Factory(list)
    done: anyio.Event = attrs.Factory(anyio.Event)
    error: StoreError | None = None
    lost: set[str] = attrs.Factory(set)
    waiters: int = 0

    @property
    def writes(self) -> int:
        return (
            len(self.events)
            + len(self.progress)
            + len(self.saved)
            + len(self.restored)
            + len(self.released)
        )

    @property
    def has_work(self) -> bool:
        return bool(self.ops) or self.writes > 0

    def run_ids(self, held_by_checkpoint: Mapping[str, str]) -> set[str]:
        runs = {e.run_id for e in self.events}
        runs.update(k[0] for k in self.progress)
        runs.update(k[0] for k in self.restored)
        runs.update(held_by_checkpoint[k[0]] for k in self.saved if k[0] in held_by_checkpoint)
        return runs

    def drop_runs(self, lost: set[str], checkpoint_of: Mapping[str, str]) -> None:
        lost_checkpoints = {checkpoint_of[r] for r in lost if r in checkpoint_of}
        self.events = [e for e in self.events if e.run_id not in lost]
        self.progress = {k: v for k, v in self.progress.items() if k[0] not in lost}
        self.restored = {k: v for k, v in self.restored.items() if k[0] not in lost}
        self.saved = {k: v for k, v in self.saved.items() if k[0] not in lost_checkpoints}


class _LeaseBook:
    """The leases this store holds (with their fencing tokens) and the ones it lost.

    In memory only: the file is the truth, and the writer checks it under the
    write lock (fencing). One per store, shared by the writer, the leases and
    the run operations.
    """

    def __init__(self, *, owner: str, path: Path) -> None:
        self.owner = owner
        self.path = path
        self.held: dict[str, _Held] = {}
        self.held_by_checkpoint: dict[str, str] = {}
        self.lost: dict[str, str] = {}
        """Runs another owner took from this store, with their checkpoint ids."""
        self.lost_by_checkpoint: dict[str, str] = {}

    def check(self, run_id: str) -> None:
        if run_id in self.lost:
            raise LeaseLostError(
                f"run {run_id!r} is owned by another engine now; {self.owner} must stop writing"
            )

    def mark_lost(self, runs: Iterable[str]) -> None:
        for run_id in runs:
            held = self.held.pop(run_id, None)
            if held is None:
                continue
            if self.held_by_checkpoint.get(held.checkpoint_id) == run_id:
                del self.held_by_checkpoint[held.checkpoint_id]
            self.lost[run_id] = held.checkpoint_id
            self.lost_by_checkpoint[held.checkpoint_id] = run_id
            _log.warning("lease_lost", run_id=run_id, owner=self.owner, path=str(self.path))

    def hold(self, run_id: str, token: int, checkpoint_id: str) -> None:
        self.held[run_id] = _Held(token=token, checkpoint_id=checkpoint_id)
        self.held_by_checkpoint[checkpoint_id] = run_id
        if self.lost.pop(run_id, None) is not None:
            self.lost_by_checkpoint.pop(checkpoint_id, None)

    def unhold(self, run_id: str) -> None:
        held = self.held.pop(run_id, None)
        if held is not None and self.held_by_checkpoint.get(held.checkpoint_id) == run_id:
            del self.held_by_checkpoint[held.checkpoint_id]
