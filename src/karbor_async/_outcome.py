"""The outcome of a run: what each resource, each consistency group and the run did.

Re-exported, and documented, as :mod:`karbor_async.store` (``RunOutcome`` also as
:mod:`karbor_async`). It lives here so that :mod:`karbor_async.exceptions` (whose
``RunError`` carries an outcome) and :mod:`karbor_async.store` (which raises
``IllegalTransitionError``) need not import each other: it imports neither.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from karbor_async._types import (
    AbortReason,
    BarrierPolicy,
    Hook,
    OperationKind,
    Resource,
    ResourceKey,
    ResourceStatus,
    RunStatus,
)

__all__ = ["GroupOutcome", "ResourceOutcome", "RunOutcome"]


@attrs.frozen
class ResourceOutcome:
    """How one resource fared in a run, with its consistency instants (engine clock)."""

    resource: Resource
    group: str
    status: ResourceStatus
    hooks_run: tuple[Hook, ...] = ()
    failed_hook: Hook | None = None
    error: str | None = None
    """The exception chain, formatted (plugin exception last)."""
    cut_at: float | None = None
    quiesced_at: float | None = None
    thawed_at: float | None = None
    crash_consistent: bool = False
    thawed_early: bool = False
    attempt: int = 1
    abandoned_hook: Hook | None = None
    """The hook the run stopped waiting for (it did not end once cancelled), if any."""
    thawed_late_at: float | None = None
    """A thaw that was abandoned (``thaw_failed``) and then succeeded, after the run ended."""
    blocked_loop_s: float = 0.0
    """How long this resource's hooks held the event loop (stalls blamed on them)."""
    errors: tuple[tuple[Hook, AbortReason | None, str], ...] = ()
    """Every failure, in order: (hook, the aborting reason of the call or None, the
    formatted chain). ``error`` and ``failed_hook`` are the first of them."""
    window_approximate: bool = False
    """Its quiesce window crossed a crash: frozen by the attempt that died, thawed by the
    recovery; the window is computed from wall-clock times (the two processes' engine
    clocks differ)."""

    @property
    def quiesce_window(self) -> float | None:
        if self.quiesced_at is None or self.thawed_at is None:
            return None
        return self.thawed_at - self.quiesced_at

    def to_json(self) -> dict[str, Any]:
        return {
            "resource": self.resource.to_json(),
            "group": self.group,
            "status": self.status.value,
            "hooks_run": [h.value for h in self.hooks_run],
            "failed_hook": self.failed_hook.value if self.failed_hook else None,
            "error": self.error,
            "cut_at": self.cut_at,
            "quiesced_at": self.quiesced_at,
            "thawed_at": self.thawed_at,
            "crash_consistent": self.crash_consistent,
            "thawed_early": self.thawed_early,
            "attempt": self.attempt,
            "abandoned_hook": self.abandoned_hook.value if self.abandoned_hook else None,
            "thawed_late_at": self.thawed_late_at,
            "blocked_loop_s": self.blocked_loop_s,
            "errors": [[h.value, a.value if a else None, text] for h, a, text in self.errors],
            "window_approximate": self.window_approximate,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResourceOutcome:
        return cls(
            resource=Resource.from_json(data["resource"]),
            group=data["group"],
            status=ResourceStatus(data["status"]),
            hooks_run=tuple(Hook(h) for h in data.get("hooks_run", ())),
            failed_hook=Hook(data["failed_hook"]) if data.get("failed_hook") else None,
            error=data.get("error"),
            cut_at=data.get("cut_at"),
            quiesced_at=data.get("quiesced_at"),
            thawed_at=data.get("thawed_at"),
            crash_consistent=bool(data.get("crash_consistent", False)),
            thawed_early=bool(data.get("thawed_early", False)),
            attempt=int(data.get("attempt", 1)),
            abandoned_hook=Hook(data["abandoned_hook"]) if data.get("abandoned_hook") else None,
            thawed_late_at=data.get("thawed_late_at"),
            blocked_loop_s=float(data.get("blocked_loop_s", 0.0)),
            errors=tuple(
                (Hook(h), AbortReason(a) if a else None, str(text))
                for h, a, text in data.get("errors", ())
            ),
            window_approximate=bool(data.get("window_approximate", False)),
        )


@attrs.frozen
class GroupOutcome:
    """A consistency group's barrier, measured skew and abort reason."""

    name: str
    barrier: BarrierPolicy
    resources: int
    cuts: int
    skew: float | None
    """Latest cut minus earliest cut over the group's resources that cut (seconds)."""
    aborted: AbortReason | None = None
    crash_consistent: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "barrier": self.barrier.value,
            "resources": self.resources,
            "cuts": self.cuts,
            "skew": self.skew,
            "aborted": self.aborted.value if self.aborted else None,
            "crash_consistent": self.crash_consistent,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GroupOutcome:
        return cls(
            name=data["name"],
            barrier=BarrierPolicy(data["barrier"]),
            resources=int(data["resources"]),
            cuts=int(data["cuts"]),
            skew=data.get("skew"),
            aborted=AbortReason(data["aborted"]) if data.get("aborted") else None,
            crash_consistent=bool(data.get("crash_consistent", False)),
        )


@attrs.frozen
class RunOutcome:
    """The result of one run: status, every resource's outcome, skew and quiesce windows."""

    run_id: str
    checkpoint_id: str
    operation: OperationKind
    status: RunStatus
    started_wall: float
    ended_wall: float
    duration: float
    resources: Mapping[ResourceKey, ResourceOutcome]
    groups: Mapping[str, GroupOutcome]
    restored: Mapping[ResourceKey, str] = attrs.field(factory=dict)
    error: str | None = None
    recovered: bool = False
    """A recovery finished this run after the engine that started it died: the instants
    come from the committed events of the attempt that made them, ``started_wall`` is
    the run's first start and ``duration`` spans the crash."""

    @property
    def crash_consistent(self) -> bool:
        """True when some resource was captured without a held quiesce."""
        return any(g.crash_consistent for g in self.groups.values())

    @property
    def skew(self) -> float | None:
        """The largest skew of any group (``None`` when nothing cut)."""
        skews = [g.skew for g in self.groups.values() if g.skew is not None]
        return max(skews) if skews else None

    @property
    def quiesce_windows(self) -> dict[ResourceKey, float]:
        return {k: w for k, r in self.resources.items() if (w := r.quiesce_window) is not None}

    def by_status(self, status: ResourceStatus) -> list[ResourceKey]:
        return [k for k, r in self.resources.items() if r.status is status]

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "checkpoint_id": self.checkpoint_id,
            "operation": self.operation.value,
            "status": self.status.value,
            "started_wall": self.started_wall,
            "ended_wall": self.ended_wall,
            "duration": self.duration,
            "resources": [r.to_json() for r in self.resources.values()],
            "groups": [g.to_json() for g in self.groups.values()],
            "restored": [[k[0], k[1], v] for k, v in self.restored.items()],
            "error": self.error,
            "recovered": self.recovered,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunOutcome:
        resources = [ResourceOutcome.from_json(r) for r in data["resources"]]
        groups = [GroupOutcome.from_json(g) for g in data["groups"]]
        return cls(
            run_id=data["run_id"],
            checkpoint_id=data["checkpoint_id"],
            operation=OperationKind(data["operation"]),
            status=RunStatus(data["status"]),
            started_wall=float(data["started_wall"]),
            ended_wall=float(data["ended_wall"]),
            duration=float(data["duration"]),
            resources={r.resource.key: r for r in resources},
            groups={g.name: g for g in groups},
            restored={(t, i): v for t, i, v in data.get("restored", [])},
            error=data.get("error"),
            recovered=bool(data.get("recovered", False)),
        )
