"""What a run shows and leaves: its live statistics and its outcome."""

from __future__ import annotations

import time
from collections.abc import Mapping

import attrs

from karbor_async._node import HOOK_BITS, _Node
from karbor_async._runstate import RunState
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
from karbor_async.events import Progress
from karbor_async.exceptions import RunCancelledError, StoreError
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
    """Cuts that returned (a cut whose ``on_prepare_finish`` still runs is not counted)."""
    frozen: int
    """Resources quiesced and not yet thawed."""
    skew: float | None
    """Spread of the cuts returned so far, over all groups."""
    barriers_released: tuple[str, ...]
    bytes_done: int
    """The ``done`` of the last progress of every resource that reported a ``total``."""
    bytes_total: int
    """The sum of those totals (resources that reported none are not in it)."""
    active: tuple[tuple[Resource, Hook, Progress | None], ...]
    """Up to ``limit`` resources with a hook running, and their last progress."""
    mains_done: int = 0
    """``on_main`` calls (a protect's copies) that returned."""
    mains_running: int = 0
    mains_waiting: int = 0
    """Resources with an ``on_main`` not started yet (and not failed or skipped)."""
    reporting: int = 0
    """Resources whose last progress has a ``total`` (those ``bytes_*`` sum over)."""
    barriers_pending: tuple[str, ...] = ()
    """The groups' barriers (``group:cut``, ``group:main``) not released yet."""


def statistics(run: RunState, limit: int) -> RunStatistics:
    by_status: dict[ResourceStatus, int] = {}
    running: dict[Hook, int] = {}
    active: list[tuple[Resource, Hook, Progress | None]] = []
    hooks = cuts = frozen = done = total = reporting = 0
    mains = [0, 0, 0]  # done, running, waiting
    first: float | None = None
    last: float | None = None
    cut_bit, main_bit = HOOK_BITS[Hook.PREPARE_FINISH], HOOK_BITS[Hook.MAIN]
    for n in run.nodes:
        by_status[n.status] = by_status.get(n.status, 0) + 1
        hooks += n.hooks_done.bit_count()
        if n.current is not None:
            running[n.current] = running.get(n.current, 0) + 1
            if len(active) < limit:
                active.append((n.resource, n.current, n.last_progress))
        if n.cut_at is not None and n.hooks_done & cut_bit:
            cuts += 1
            first = n.cut_at if first is None else min(first, n.cut_at)
            last = n.cut_at if last is None else max(last, n.cut_at)
        frozen += n.frozen
        if n.main is not None:
            if n.hooks_done & main_bit:
                mains[0] += 1
            elif n.current is Hook.MAIN:
                mains[1] += 1
            elif n.status in (ResourceStatus.PENDING, ResourceStatus.RUNNING):
                mains[2] += 1
        p = n.data_progress
        if p is not None and p.total:
            reporting += 1
            total += p.total
            done += p.done or 0
    released: list[str] = []
    pending: list[str] = []
    for g in run.groups.values():
        barriers = {BarrierPolicy.CUT: ("cut", "main"), BarrierPolicy.MAIN: ("main",)}
        for b in barriers.get(g.policy, ()):
            ev = g.cut_released if b == "cut" else g.main_released
            (released if ev.is_set() else pending).append(f"{g.name}:{b}")
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
        barriers_released=tuple(released),
        bytes_done=done,
        bytes_total=total,
        active=tuple(active),
        mains_done=mains[0],
        mains_running=mains[1],
        mains_waiting=mains[2],
        reporting=reporting,
        barriers_pending=tuple(pending),
    )


def _resource_outcome(run: RunState, n: _Node) -> ResourceOutcome:
    fmt = run.rec.format
    return ResourceOutcome(
        resource=n.resource,
        group=n.gate.name,
        status=n.status,
        hooks_run=n.hooks_run,
        failed_hook=n.failed_hook,
        error=fmt(n.error) if n.error is not None else None,
        errors=tuple((h, a, fmt(e)) for h, a, e in n.errors) if n.errors else (),
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
        failure = g.abort_error
        if isinstance(failure, StoreError) and not any(e is failure for e in errors):
            errors.append(failure)  # (a commit point's commit failed: no resource's error)
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
        if errors and isinstance(errors[0], RunCancelledError):
            summary = f"{summary}; {errors[0]}"  # (a cancel, a time limit: not a hook's error)
        elif errors:
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
