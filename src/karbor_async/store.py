"""The checkpoint store port: records, lifecycle and the protocol stores implement.

The engine depends only on :class:`Store`. ``MemoryStore`` (in this package) keeps
everything in the process; the SQLite store persists it. Writes of the per-hook
path (:meth:`Store.append`, :meth:`Store.save_info`) are synchronous and written
behind; :meth:`Store.commit` waits until everything appended so far is durable.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import attrs

from karbor_async._liveness import owner_gone, this_process
from karbor_async._outcome import GroupOutcome, ResourceOutcome, RunOutcome
from karbor_async._types import OperationKind, ResourceKey, RunStatus
from karbor_async.events import Event
from karbor_async.exceptions import IllegalTransitionError

__all__ = [
    "CheckpointRecord",
    "CheckpointStatus",
    "GroupOutcome",
    "ResourceOutcome",
    "RunOutcome",
    "RunRecord",
    "owner_gone",
    "this_process",
    "Store",
    "check_checkpoint_transition",
    "key_from_str",
    "key_to_str",
    "with_late_thaw",
]


def key_to_str(key: ResourceKey) -> str:
    """``("OS::Cinder::Volume", "v1")`` -> ``"OS::Cinder::Volume#v1"`` (as in plan overrides)."""
    return f"{key[0]}#{key[1]}"


def key_from_str(text: str) -> ResourceKey:
    rtype, sep, rid = text.partition("#")
    if not sep:
        raise ValueError(f"not a resource key (TYPE#ID): {text!r}")
    return (rtype, rid)


class CheckpointStatus(enum.StrEnum):
    PROTECTING = "protecting"
    AVAILABLE = "available"
    ERROR = "error"
    CANCELLED = "cancelled"
    DELETING = "deleting"
    DELETED = "deleted"
    ERROR_DELETING = "error_deleting"


_CHECKPOINT_TRANSITIONS: Mapping[CheckpointStatus, frozenset[CheckpointStatus]] = {
    CheckpointStatus.PROTECTING: frozenset(
        {CheckpointStatus.AVAILABLE, CheckpointStatus.ERROR, CheckpointStatus.CANCELLED}
    ),
    CheckpointStatus.AVAILABLE: frozenset({CheckpointStatus.DELETING}),
    CheckpointStatus.ERROR: frozenset({CheckpointStatus.DELETING}),
    CheckpointStatus.CANCELLED: frozenset({CheckpointStatus.DELETING}),
    CheckpointStatus.ERROR_DELETING: frozenset({CheckpointStatus.DELETING}),
    CheckpointStatus.DELETING: frozenset(
        {CheckpointStatus.DELETED, CheckpointStatus.ERROR_DELETING}
    ),
    CheckpointStatus.DELETED: frozenset(),
}


def check_checkpoint_transition(old: CheckpointStatus, new: CheckpointStatus) -> None:
    """Raise :class:`IllegalTransitionError` unless DESIGN.md section 5 allows ``old -> new``."""
    if new not in _CHECKPOINT_TRANSITIONS[old]:
        allowed = ", ".join(sorted(s.value for s in _CHECKPOINT_TRANSITIONS[old])) or "nothing"
        raise IllegalTransitionError(
            f"checkpoint cannot go from {old.value} to {new.value} (from {old.value}: {allowed})"
        )


def with_late_thaw(outcome: RunOutcome, key: ResourceKey, at: float) -> RunOutcome:
    """``outcome`` with ``thawed_late_at`` set on one resource (stores share this)."""
    resources = dict(outcome.resources)
    resources[key] = attrs.evolve(resources[key], thawed_late_at=at)
    return attrs.evolve(outcome, resources=resources)


@attrs.frozen
class RunRecord:
    """One protect, restore or delete run as stored."""

    run_id: str
    operation: OperationKind
    checkpoint_id: str
    plan: Mapping[str, Any]
    """The plan as JSON; secret parameters hold references, never values."""
    graph: Mapping[str, Any]
    """The resource graph as JSON (restore and delete walk this, not a fresh discovery)."""
    status: RunStatus
    started_wall: float
    outcome: RunOutcome | None = None
    leases: tuple[ResourceKey, ...] = ()
    # (Creating a delete run also moves its checkpoint to ``deleting``, compare-and-set
    # in the same transaction: CheckpointBusyError if another run is deleting it.)
    """Resources the run takes a lease on as it is created, all or none (a protect: each
    it may quiesce or cut); released with the run, or one by one (``release_resource``).
    Creating a run raises :class:`~karbor_async.exceptions.ResourceBusyError` if a live
    run holds one."""


@attrs.frozen
class CheckpointRecord:
    """A checkpoint: the durable record of one protect run."""

    id: str
    plan_name: str
    status: CheckpointStatus
    created_wall: float
    plan: Mapping[str, Any]
    graph: Mapping[str, Any]
    outcome: RunOutcome | None = None


class Store(Protocol):
    """Where runs, checkpoints, events and saved info live."""

    async def create_run(self, record: RunRecord) -> None:
        """Record a new run (a protect run also creates its checkpoint, ``protecting``)."""

    def append(self, event: Event) -> None:
        """Append a lifecycle event to its run's log (written behind, in order)."""

    def save_info(self, checkpoint_id: str, key: ResourceKey, info: Mapping[str, Any]) -> None:
        """Replace a resource's saved info (written behind, ordered with events)."""

    def record_restored(self, run_id: str, key: ResourceKey, new_id: str) -> None:
        """Record the id a restore hook created (the engine commits right after)."""

    def release_resource(self, run_id: str, key: ResourceKey) -> None:
        """Give back the lease ``run_id`` took on ``key`` (``RunRecord.leases``) before the
        run ends (written behind); ending the run gives back the rest."""

    async def commit(self) -> None:
        """Return when everything written so far is durable."""

    async def finish_run(self, outcome: RunOutcome) -> None:
        """Store a run's outcome and move its checkpoint to its end state; commits."""

    async def set_checkpoint_status(
        self, checkpoint_id: str, status: CheckpointStatus | str
    ) -> None:
        """Move a checkpoint along its lifecycle; an illegal transition raises, changing nothing."""

    async def record_late_thaw(self, run_id: str, key: ResourceKey, at: float) -> None:
        """A finished run's abandoned thaw ended well: set ``thawed_late_at`` on its stored
        outcome (nothing else of the outcome changes); commits."""

    async def get_run(self, run_id: str) -> RunRecord: ...

    async def get_checkpoint(self, checkpoint_id: str) -> CheckpointRecord: ...

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
        """Newest first; page with ``before_id`` (the last id of the previous page)."""

    async def list_runs(
        self, *, checkpoint_id: str | None = None, limit: int = 100
    ) -> Sequence[RunRecord]: ...

    async def load_saved_info(self, checkpoint_id: str) -> dict[ResourceKey, dict[str, Any]]: ...

    async def load_restored(self, run_id: str) -> dict[ResourceKey, str]: ...

    async def read_events(self, run_id: str, since: int = 0) -> Sequence[Event]:
        """Lifecycle events of a run with ``seq > since``, in order."""
