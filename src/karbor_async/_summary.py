"""What a run shows and leaves: its live statistics and its outcome."""

from __future__ import annotations

import time
from collections.abc import Mapping

import attrs

from karbor_async._node import _Node
from karbor_async._runstate import RunState
from karbor_async._types import (
    AbortReason,
    Hook,
    OperationKind,
    Resource,
    ResourceKey,
    ResourceStatus,
    RunStatus,
)
from karbor_async.events import Progress
from karbor_async.exceptions import RunCancelledError
from karbor_async.store import GroupOutcome, ResourceOutcome, RunOutcome

__all__ = ["RunStatistics", "build_outcome", "statistics"]


@attrs.frozen
class RunStatistics:
    """A frozen snapshot of a running run (cheap enough to take ten times a second)."""

    run_id: str
    operation: OperationKind
    elapsed: float
    resources: int
    by_status: Mapping[ResourceStatus, int]
    running: Mapping[Hook, int]
    """How many hooks of each kind are executing now."""
    hooks_finished: int
    cuts: int
    frozen: int
    """Resources quiesced and not yet thawed."""
    skew: float | None
    """Spread of the cuts so far, over all groups."""
    barriers_released: tuple[str, ...]
    bytes_done: int
    bytes_total: int
    active: tuple[tuple[Resource, Hook, Progress | None], ...]
    """Up to ``limit`` resources with a hook running, and their last progress."""


def statistics(run: RunState, limit: int) -> RunStatistics:
    by_status: dict[ResourceStatus, int] = {}
    running: dict[Hook, int] = {}
    active: list[tuple[Resource, Hook, Progress | None]] = []
    hooks = cuts = frozen = done = total = 0
    first: float | None = None
    last: float | None = None
    for n in run.nodes:
        by_status[n.status] = by_status.get(n.status, 0) + 1
        hooks += n.hooks_done.bit_count()
        if n.current is not None:
            running[n.current] = running.get(n.current, 0) + 1
            if len(active) < limit:
                active.append((n.resource, n.current, n.last_progress))
        if n.cut_at is not None:
            cuts += 1
            first = n.cut_at if first is None else min(first, n.cut_at)
            last = n.cut_at if last is None else max(last, n.cut_at)
        frozen += n.frozen
        p = n.last_progress
        if p is not None and p.total:
            total += p.total
            done += p.done or 0
    released = tuple(
        f"{g.name}:{b}"
        for g in run.groups.values()
        for b, ev in (("cut", g.cut_released), ("main", g.main_released))
        if ev.is_set()
    )
    return RunStatistics(
        run_id=run.run_id,
        operation=run.operation,
        elapsed=run.now() - run.t0 if run.t0 is not None else 0.0,
        resources=len(run.nodes),
        by_status=by_status,
        running=running,
        hooks_finished=hooks,
        cuts=cuts,
        frozen=frozen,
        skew=(last - first) if first is not None and last is not None else None,
        barriers_released=released,
        bytes_done=done,
        bytes_total=total,
        active=tuple(active),
    )


def _resource_outcome(run: RunState, n: _Node) -> ResourceOutcome:
    fmt = run.rec.format
    return ResourceOutcome(
        resource=n.resource,
        group=n.gate.name,
        status=n.status,
        hooks_run=tuple(n.hooks_run),
        failed_hook=n.failed_hook,
        error=fmt(n.error) if n.error is not None else None,
        errors=tuple((h, a, fmt(e)) for h, a, e in n.errors),
        cut_at=n.cut_at,
        quiesced_at=n.quiesced_at,
        thawed_at=n.thawed_at,
        crash_consistent=n.crash_consistent and n.cut_at is not None,
        thawed_early=n.thawed_early,
        attempt=n.attempt,
        abandoned_hook=n.abandoned_hook,
        thawed_late_at=n.thawed_late_at,
        blocked_loop_s=n.blocked_loop_s,
        window_approximate=n.window_approximate,
    )


def build_outcome(
    run: RunState, started_wall: float, started: float
) -> tuple[RunOutcome, list[Exception]]:
    """The run's outcome (every resource's, every group's) and the errors RunError carries."""
    errors: list[Exception] = []
    resources: dict[ResourceKey, ResourceOutcome] = {}
    cancelled = run.abort_reason in (AbortReason.CANCELLED, AbortReason.TIMEOUT)
    for n in run.nodes:
        if n.status in (ResourceStatus.PENDING, ResourceStatus.RUNNING):
            n.status = ResourceStatus.CANCELLED if cancelled else ResourceStatus.ABORTED
        errors.extend(e for _h, _a, e in n.errors if isinstance(e, Exception))
        resources[n.resource.key] = _resource_outcome(run, n)
    groups: dict[str, GroupOutcome] = {}
    for g in run.groups.values():
        cuts = [n.cut_at for n in g.nodes if n.cut_at is not None]
        groups[g.name] = GroupOutcome(
            name=g.name,
            barrier=g.policy,
            resources=len(g.nodes),
            cuts=len(cuts),
            skew=(max(cuts) - min(cuts)) if cuts else None,
            aborted=g.aborting,
            crash_consistent=any(n.crash_consistent and n.cut_at is not None for n in g.nodes),
        )
    if run.abort_reason is AbortReason.CANCELLED:
        status = RunStatus.CANCELLED
        errors.append(RunCancelledError(f"run {run.run_id} was cancelled"))
    elif run.abort_reason is AbortReason.TIMEOUT:
        status = RunStatus.FAILED
        errors.append(
            RunCancelledError(
                f"run {run.run_id} exceeded its time limit of {run.plan.timeouts.run} s"
            )
        )
    elif errors or any(n.status is not ResourceStatus.SUCCEEDED for n in run.nodes):
        status = RunStatus.FAILED
    else:
        status = RunStatus.SUCCEEDED
    if status is RunStatus.FAILED and not errors:
        errors.append(RunCancelledError(f"run {run.run_id} aborted"))
    summary = None
    if status is not RunStatus.SUCCEEDED:
        counts: dict[str, int] = {}
        for r in resources.values():
            counts[r.status.value] = counts.get(r.status.value, 0) + 1
        summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        if errors:
            summary = f"{summary}; first error: {errors[0]}"
    ended_wall = time.time()
    recovered = run.spec.resumed is not None
    if recovered and run.spec.started_wall is not None:
        started_wall = run.spec.started_wall  # the run's first start, before the crash
    outcome = RunOutcome(
        run_id=run.run_id,
        checkpoint_id=run.checkpoint_id,
        operation=run.operation,
        status=status,
        started_wall=started_wall,
        ended_wall=ended_wall,
        duration=ended_wall - started_wall if recovered else run.now() - started,
        recovered=recovered,
        resources=resources,
        groups=groups,
        restored=dict(run.rec.restored),
        error=summary,
    )
    return outcome, errors
