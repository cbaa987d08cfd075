"""Structured events of a run (DESIGN.md section 6).

Lifecycle events (every kind but ``PROGRESS``) are the run's log: numbered by
``seq`` in commit order, persisted, never dropped. Progress ticks carry the
``seq`` of the last lifecycle event before them and their own ``tick`` counter.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from karbor_async._slots import slot_builder
from karbor_async._types import Hook, OperationKind, ResourceKey

__all__ = ["Event", "EventKind", "Progress"]


class EventKind(enum.StrEnum):
    RUN_STARTED = "run_started"
    STARTED = "started"
    """A hook started."""
    FINISHED = "finished"
    """A hook returned."""
    FAILED = "failed"
    """A hook raised or timed out (``data['error']``)."""
    SKIPPED = "skipped"
    """A hook could not run because a resource it depends on failed."""
    ABORTED = "aborted"
    """A resource's remaining hooks were not run because its group aborted."""
    QUIESCED = "quiesced"
    CUT = "cut"
    THAWED = "thawed"
    THAW_FAILED = "thaw_failed"
    """Alert: every thaw attempt failed; the resource may still be frozen."""
    CUT_INTENT = "cut_intent"
    """Committed before any cut of a protect: the group's (``data['group']``) resources
    that may cut (``data['resources']``, ``[type, id]`` pairs), so recovery and delete
    know a snapshot may exist even where no cut or saved info was committed."""
    BARRIER_RELEASED = "barrier_released"
    GROUP_ABORTING = "group_aborting"
    LOOP_BLOCKED = "loop_blocked"
    """A hook held the event loop for ``data['seconds']`` (``data['frame']``: the innermost
    frame outside the engine)."""
    MARK_REFUSED = "mark_refused"
    """Warning: an aborting call's mark broke a rule (``data['mark']``, ``data['rule']``);
    the engine's default instant was used."""
    HOOK_ABANDONED = "hook_abandoned"
    """A hook did not end ``timeouts.abort`` after the engine cancelled it (or its group
    aborted); the run stopped waiting for it (``data['seconds']`` since then). Its task
    stays owned by the engine until it ends or the engine closes."""
    RESTORED = "restored"
    """A restore hook reported the new id of what it created."""
    PROGRESS = "progress"
    TICKS_DROPPED = "ticks_dropped"
    """To one subscriber: it fell behind and lost ``data['count']`` progress ticks."""
    RUN_FINISHED = "run_finished"


@attrs.frozen
class Progress:
    """What a plugin reported through ``HookContext.report_progress``."""

    fraction: float | None = None
    done: int | None = None
    total: int | None = None
    message: str | None = None


@attrs.frozen
class Event:
    """One thing that happened in a run."""

    run_id: str
    seq: int
    kind: EventKind
    operation: OperationKind
    wall: float
    """``time.time()`` when it happened."""
    mono: float
    """The engine clock (``anyio.current_time()``) when it happened."""
    resource: ResourceKey | None = None
    hook: Hook | None = None
    group: str | None = None
    attempt: int = 1
    progress: Progress | None = None
    tick: int = 0
    data: Mapping[str, Any] = attrs.field(factory=dict)

    @property
    def is_lifecycle(self) -> bool:
        return self.kind is not EventKind.PROGRESS

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "run_id": self.run_id,
            "seq": self.seq,
            "kind": self.kind.value,
            "operation": self.operation.value,
            "wall": self.wall,
            "mono": self.mono,
            "resource": list(self.resource) if self.resource else None,
            "hook": self.hook.value if self.hook else None,
            "group": self.group,
            "attempt": self.attempt,
            "data": dict(self.data),
        }
        if self.progress is not None:
            out["progress"] = attrs.asdict(self.progress)
            out["tick"] = self.tick
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Event:
        res = data.get("resource")
        prog = data.get("progress")
        return cls(
            run_id=data["run_id"],
            seq=int(data["seq"]),
            kind=EventKind(data["kind"]),
            operation=OperationKind(data["operation"]),
            wall=float(data["wall"]),
            mono=float(data["mono"]),
            resource=(str(res[0]), str(res[1])) if res else None,
            hook=Hook(data["hook"]) if data.get("hook") else None,
            group=data.get("group"),
            attempt=int(data.get("attempt", 1)),
            progress=Progress(**prog) if prog else None,
            tick=int(data.get("tick", 0)),
            data=data.get("data") or {},
        )


new_event: Callable[..., Event] = slot_builder(Event)
"""``Event(...)`` with every field given, positionally, in about half the time (the
engine's hot path; ``_slots.slot_builder``)."""
