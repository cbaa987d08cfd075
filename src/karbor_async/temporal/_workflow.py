"""The Temporal workflow of one run: the graph walk, the ordering rules, the barriers, the limits.

Deterministic: everything it decides comes from the ordering core
(:class:`karbor_async._ordering.Ordering`, pure) fed with the results of its
activities, which Temporal records in the workflow's history. The workflow
never calls a hook: it schedules

- ``karbor-start`` (any worker): discover, check, record the run under the
  workflow's lease (owner ``temporal:<workflow id>``);
- ``karbor-lease`` (any worker, for the whole run): renews that lease;
- per consistency group, ``karbor-claim`` then ``karbor-prepare`` on the
  claimed worker's own queue: the group's prepare waves in one local run there
  (a cut is never one activity per resource: Temporal's dispatch costs ms per
  activity, a local barrier release microseconds). If that activity fails or
  times out, ``karbor-compensate`` on the same queue thaws what may be frozen;
  if nobody takes it in time (the worker is gone), that host's sentinel is left
  to thaw, and the workflow records which it was;
- per resource, ``karbor-hook`` for ``on_main`` and ``on_complete``, spread over
  the workers (or on the group's prepare worker, for a type whose cut lives in
  that process or that is bound to its host), retried on another worker with
  ``attempt`` + 1 when its worker is lost;
- ``karbor-finish``: one outcome, ``RUN_FINISHED``, the checkpoint's end state.

Asyncio tasks here are the Temporal SDK's deterministic workflow loop, not the
engine's (structured concurrency rules apply to the engine and the activities;
a workflow's tasks are replayed by the SDK).

On this backend, protect under barrier ``none`` behaves like ``main``: a group's
``on_main`` calls start once its prepare activity returned.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from karbor_async._ordering import Ordering
    from karbor_async._types import AbortReason, BarrierPolicy, Hook
    from karbor_async.temporal._wire import (
        WORKFLOW_NAME,
        CompensateInput,
        FinishInput,
        GroupInput,
        GroupResult,
        HookInput,
        HookResult,
        LeaseInput,
        Options,
        RunShape,
        StartInput,
    )

__all__ = ["RunWorkflow"]

_DAY = timedelta(days=1)
_NOT_RETRIED = RetryPolicy(maximum_attempts=1)
_REFUSALS = ["LeaseLost", "PlanError", "ResourceBusyError", "SecretError", "KarborError"]


def _key(shape: RunShape, i: int) -> str:
    n = shape.nodes[i]
    return f"{n.type}#{n.id}"


class _Lost(Exception):
    """A group's prepare activity failed or timed out (its worker was lost)."""

    def __init__(self, group: str, how: str, resources: dict[str, dict[str, Any]]) -> None:
        super().__init__(group)
        self.group = group
        self.how = how
        self.resources = resources


class _Drive:
    """One run's walk: the ordering core, the activities in flight, the parts' outcomes."""

    def __init__(self, shape: RunShape, opts: Options, workflow_id: str, queue: str) -> None:
        self.shape = shape
        self.opts = opts
        self.workflow_id = workflow_id
        self.queue = queue
        self.ordering = Ordering(
            [frozenset(Hook(h) for h in n.hooks) for n in shape.nodes],
            [(p, c) for p, c in shape.edges],
            [n.group for n in shape.nodes],
            {g: BarrierPolicy(p) for g, p in shape.groups.items()},
            quiesces=[n.quiesces for n in shape.nodes],
            cuts=[n.cuts for n in shape.nodes],
        )
        self.members: dict[str, list[int]] = {g: [] for g in shape.groups}
        for i, n in enumerate(shape.nodes):
            self.members[n.group].append(i)
        self.parts: dict[str, list[dict[str, Any]]] = {}
        self.groups: dict[str, dict[str, Any]] = {}
        self.notes: dict[str, str] = {}
        self.queue_of: dict[str, str] = {}
        self.used: dict[str, int] = {}
        self.tasks: dict[asyncio.Future[Any], tuple[str, int, Hook | None]] = {}
        """In flight: ("group", index of its first member, None) or ("hook", slot, hook)."""
        self.ran: set[tuple[int, Hook]] = set()
        self.abort: str | None = None
        self.signalled: dict[str, GroupResult] = {}
        """Prepare results signalled by activities that stay open (cuts in a process)."""
        self.holding: dict[str, Any] = {}
        """Those activities, until their group's process-bound resources are done."""

    # -- scheduling ----------------------------------------------------------------------
    def start_groups(self) -> None:
        for g, members in self.members.items():
            if members:
                task = asyncio.ensure_future(self._prepare(g))
                self.tasks[task] = ("group", members[0], None)

    async def _prepare(self, group: str) -> GroupResult:
        opts = self.opts
        queue = await workflow.execute_activity(
            "karbor-claim",
            start_to_close_timeout=timedelta(seconds=30),
            result_type=str,
            task_queue=self.queue,
        )
        self.queue_of[group] = queue
        hold = any(self.shape.nodes[i].place == "process" for i in self.members[group])
        try:
            handle = workflow.start_activity(
                "karbor-prepare",
                GroupInput(self.shape.run_id, self.shape.token, group, self.workflow_id, hold),
                result_type=GroupResult,
                task_queue=queue,
                schedule_to_start_timeout=timedelta(seconds=opts.compensate_wait),
                start_to_close_timeout=_DAY,
                heartbeat_timeout=timedelta(seconds=opts.heartbeat_timeout),
                retry_policy=_NOT_RETRIED,
                cancellation_type=(
                    workflow.ActivityCancellationType.TRY_CANCEL
                    if hold
                    else workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED
                ),
            )
            if hold:
                # Its result comes by signal; the activity stays open, holding the cuts
                # that live in its process, until their resources are done (``release``).
                await workflow.wait_condition(lambda: group in self.signalled or handle.done())
                if group in self.signalled:
                    self.holding[group] = handle
                    return self.signalled[group]
            result: GroupResult = await handle
        except ActivityError as exc:
            if isinstance(exc.cause, asyncio.CancelledError) or self.abort is not None:
                raise
            workflow.logger.warning("group %s: its prepare worker was lost (%s)", group, exc)
        else:
            return result
        try:
            thawed = await workflow.execute_activity(
                "karbor-compensate",
                CompensateInput(self.shape.run_id, self.shape.token, group, "worker_lost"),
                result_type=dict,
                task_queue=queue,
                schedule_to_start_timeout=timedelta(seconds=opts.compensate_wait),
                start_to_close_timeout=timedelta(seconds=2 * self.shape.abort_timeout + 30),
                heartbeat_timeout=timedelta(seconds=opts.heartbeat_timeout),
                retry_policy=_NOT_RETRIED,
            )
        except ActivityError:
            raise _Lost(group, "sentinel", {}) from None
        raise _Lost(group, "compensation", thawed)

    def dispatch(self) -> None:
        """Start every on_main / on_complete the core allows, within the limits."""
        if self.abort is not None:
            return
        o = self.ordering
        for i in sorted(o.ready):
            hook, aborting = o.ready[i]
            if hook not in (Hook.MAIN, Hook.COMPLETE) or aborting is not None:
                continue
            node = self.shape.nodes[i]
            limits = self.shape.limits
            if any(self.used.get(x, 0) >= limits[x] for x in node.limits):
                continue
            for x in node.limits:
                self.used[x] = self.used.get(x, 0) + 1
            o.start(i, hook)
            queue = self.queue if node.place == "any" else self.queue_of[node.group]
            here = node.place != "any"
            task = workflow.start_activity(
                "karbor-hook",
                HookInput(self.shape.run_id, self.shape.token, node.type, node.id, hook.value),
                result_type=HookResult,
                task_queue=queue,
                schedule_to_start_timeout=(
                    timedelta(seconds=self.opts.compensate_wait) if here else None
                ),
                start_to_close_timeout=timedelta(
                    seconds=(node.timeout or 86400.0) + self.shape.abort_timeout + 30
                ),
                heartbeat_timeout=timedelta(seconds=self.opts.heartbeat_timeout),
                retry_policy=RetryPolicy(
                    maximum_attempts=1 if node.place == "process" else self.opts.hook_attempts,
                    initial_interval=timedelta(milliseconds=200),
                    non_retryable_error_types=_REFUSALS,
                ),
                cancellation_type=workflow.ActivityCancellationType.WAIT_CANCELLATION_COMPLETED,
            )
            self.tasks[task] = ("hook", i, hook)

    # -- results -------------------------------------------------------------------------
    def ended(self, task: asyncio.Future[Any]) -> None:
        kind, i, hook = self.tasks.pop(task)
        if kind == "group":
            self._group_ended(self.shape.nodes[i].group, task)
        else:
            assert hook is not None
            self._hook_ended(i, hook, task)

    def _group_ended(self, group: str, task: asyncio.Future[Any]) -> None:
        o = self.ordering
        try:
            result: GroupResult = task.result()
        except _Lost as lost:
            self.notes[group] = lost.how
            for key, part in lost.resources.items():
                self.parts.setdefault(key, []).append(part)
            o.abort(group, AbortReason.FAILURE)
            return
        except (ActivityError, asyncio.CancelledError):
            o.abort(group, AbortReason(self.abort) if self.abort else AbortReason.FAILURE)
            return
        self.queue_of[group] = result.queue
        self.groups[group] = result.outcome
        for key, part in result.resources.items():
            self.parts.setdefault(key, []).append(part)
        if result.aborted is not None:
            o.abort(group, AbortReason(result.aborted))
            return
        members = set(self.members[group])
        moved = True
        while moved:  # the prepare hooks the activity ran, replayed in an allowed order
            moved = False
            for i in sorted(o.ready):
                hook, aborting = o.ready[i]
                if (
                    i in members
                    and aborting is None
                    and hook in (Hook.PREPARE_BEGIN, Hook.PREPARE_FINISH)
                ):
                    o.start(i, hook)
                    o.finished(i, hook)
                    moved = True

    def _hook_ended(self, i: int, hook: Hook, task: asyncio.Future[Any]) -> None:
        o = self.ordering
        for x in self.shape.nodes[i].limits:
            self.used[x] -= 1
        key = _key(self.shape, i)
        try:
            result: HookResult = task.result()
        except (ActivityError, asyncio.CancelledError) as exc:
            workflow.logger.warning("%s %s: lost (%s)", key, hook.value, exc)
            o.failed(i, hook, cancelled=self.abort is not None)
            return
        self.parts.setdefault(key, []).append(result.resource)
        if result.ok:
            self.ran.add((i, hook))
            o.finished(i, hook)
        else:
            o.failed(i, hook)

    def release(self) -> None:
        """Let go of each held prepare activity whose process-bound resources are done."""
        for group, handle in list(self.holding.items()):
            bound = [i for i in self.members[group] if self.shape.nodes[i].place == "process"]
            if all(self.ordering.slots[i].phase.value == "done" for i in bound):
                handle.cancel()
                del self.holding[group]

    def stop(self, reason: str) -> None:
        """The run is cancelled or timed out: nothing more starts, what runs is cancelled
        (a group's prepare thaws in its activity, with the local engine's guarantees)."""
        if self.abort is not None:
            return
        self.abort = reason
        self.ordering.abort(None, AbortReason(reason))
        for task in self.tasks:
            task.cancel()
        for handle in self.holding.values():
            handle.cancel()
        self.holding.clear()

    def skipped(self) -> list[str]:
        """Resources whose on_complete did not run because a dependent failed."""
        out = []
        for s in self.ordering.slots:
            i = s.index
            if Hook.COMPLETE not in s.hooks or (i, Hook.COMPLETE) in self.ran:
                continue
            main_ok = Hook.MAIN not in s.hooks or (i, Hook.MAIN) in self.ran
            if s.child_failed and main_ok and s.gate.aborting is None:
                out.append(_key(self.shape, i))
        return out


@workflow.defn(name=WORKFLOW_NAME)
class RunWorkflow:
    """One protect run driven by Temporal (see the module docstring)."""

    def __init__(self) -> None:
        self._drive: _Drive | None = None

    @workflow.signal
    def prepared(self, result: GroupResult) -> None:
        """A group's prepare activity that stays open reports its result."""
        if self._drive is not None:
            self._drive.signalled[result.group] = result

    @workflow.query
    def progress(self) -> dict[str, Any]:
        """Where the walk stands: parts done, activities in flight, groups prepared."""
        d = self._drive
        if d is None:
            return {"started": False}
        return {
            "started": True,
            "in_flight": len(d.tasks),
            "hooks_done": len(d.ran),
            "groups_prepared": sorted(d.groups),
            "abort": d.abort,
        }

    @workflow.run
    async def run(self, inp: StartInput) -> dict[str, Any]:
        opts = inp.options
        queue = workflow.info().task_queue
        shape = await workflow.execute_activity(
            "karbor-start",
            inp,
            result_type=RunShape,
            start_to_close_timeout=timedelta(hours=1),
            heartbeat_timeout=timedelta(seconds=max(opts.heartbeat_timeout, 30)),
            retry_policy=RetryPolicy(maximum_attempts=3, non_retryable_error_types=_REFUSALS),
        )
        lease = workflow.start_activity(
            "karbor-lease",
            LeaseInput(shape.run_id, shape.token, opts.lease_seconds),
            start_to_close_timeout=timedelta(days=30),
            heartbeat_timeout=timedelta(seconds=opts.heartbeat_timeout),
            retry_policy=RetryPolicy(
                initial_interval=timedelta(seconds=1), non_retryable_error_types=_REFUSALS
            ),
            cancellation_type=workflow.ActivityCancellationType.TRY_CANCEL,
        )
        d = self._drive = _Drive(shape, opts, inp.workflow_id, queue)
        try:
            await self._walk(d, lease)
        except asyncio.CancelledError:
            d.stop(AbortReason.CANCELLED.value)
            await self._settle(d)
        outcome: dict[str, Any] = await workflow.execute_activity(
            "karbor-finish",
            FinishInput(
                run_id=shape.run_id,
                token=shape.token,
                started_wall=shape.started_wall,
                parts=d.parts,
                groups=d.groups,
                skipped=d.skipped(),
                abort=d.abort,
                notes=d.notes,
            ),
            result_type=dict,
            start_to_close_timeout=timedelta(minutes=10),
            retry_policy=RetryPolicy(maximum_attempts=5, non_retryable_error_types=_REFUSALS),
        )
        for handle in d.holding.values():
            handle.cancel()
        lease.cancel()
        return outcome

    async def _walk(self, d: _Drive, lease: Awaitable[Any]) -> None:
        deadline = None
        if d.shape.run_timeout is not None:
            deadline = workflow.time() + d.shape.run_timeout
        lease_task = asyncio.ensure_future(lease)
        d.start_groups()
        while True:
            d.dispatch()
            if not d.tasks:
                return
            timeout = None if deadline is None else max(0.0, deadline - workflow.time())
            done, _ = await asyncio.wait(
                [*d.tasks, lease_task], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if lease_task in done:  # the lease was lost: stop, with the local guarantees
                workflow.logger.error("run %s: its lease was lost", d.shape.run_id)
                d.stop(AbortReason.CANCELLED.value)
                await self._settle(d)
                return
            if not done:
                d.stop(AbortReason.TIMEOUT.value)
                await self._settle(d)
                return
            for task in sorted(done, key=lambda t: d.tasks[t][1]):
                d.ended(task)
            d.release()

    async def _settle(self, d: _Drive) -> None:
        """Wait for what was cancelled to end (a prepare activity thaws first)."""
        while d.tasks:
            done, _ = await asyncio.wait(list(d.tasks), return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=lambda t: d.tasks[t][1]):
                d.ended(task)
