"""The four-phase scheduler: a run of one protect, restore or delete, and its public face.

One task per resource walks the four hooks (``_walk``), in the engine's task
group. The rules of who may start when are the ordering core's
(``_ordering``: Karbor's edges, the barriers, the abort rules, the limit
order); the rest lives in rooms, each a module of functions over the run's
shared state (``_runstate.RunState``) or a small class held once per run:

- ``_calls``: calling one hook (its context, deadline, events, what it raised);
- ``_guards`` and ``_timers``: hook time limits, quiesce budgets, the run limit,
  hooks that hold the loop, and the watcher task that keeps the deadlines;
- ``_abort``, ``_thaw``, ``_abandon``: aborting, the thaw every started
  prepare is owed, and what the run stops waiting for;
- ``_signals``: the core's outputs turned into wake-ups and commit point 2;
- ``_record`` and ``_summary``: events, progress, saved info, errors, the
  statistics and the outcome;
- ``_holds``: the collector and the store's writes held while things are frozen;
- ``_build``: the nodes of a run.

The whole run is shielded from the caller; the caller's cancellation is
turned into :meth:`Run.cancel`, which knows not to interrupt a running cut.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

import anyio
import anyio.lowlevel

from karbor_async._abandon import abandon_due
from karbor_async._abort import abort_all, abort_group, on_caller_cancel
from karbor_async._build import build_nodes
from karbor_async._calls import cancel_probe, fast_clock, fast_primitives
from karbor_async._calls import hook_call_code as _hook_call_code
from karbor_async._guards import fire, stalled, watchdog
from karbor_async._hub import EventHub
from karbor_async._node import Interrupt, _Node
from karbor_async._record import record_error
from karbor_async._runstate import RunSpec, RunState
from karbor_async._stall import Stall
from karbor_async._summary import RunStatistics, build_outcome, statistics
from karbor_async._tasks import EngineTasks
from karbor_async._timers import Timers
from karbor_async._types import (
    AbortReason,
    Hook,
    OperationKind,
    ResourceKey,
    ResourceStatus,
    RunStatus,
)
from karbor_async._walk import recovery_thaw, run_node
from karbor_async.events import EventKind
from karbor_async.exceptions import CutLostError, RunError, StoreError
from karbor_async.plugin import Bank, SecretResolver
from karbor_async.store import RunOutcome, Store

__all__ = ["Run", "RunSpec", "RunStatistics"]


class Run(RunState):
    """One protect, restore or delete run, built and validated by the engine.

    Start it with :meth:`execute` (once); stop it from another task with :meth:`cancel`.
    """

    def __init__(
        self,
        spec: RunSpec,
        *,
        tasks: EngineTasks,
        store: Store,
        bank: Bank,
        secrets: SecretResolver | None,
        record_events: bool = True,
        after_finish: Callable[[RunOutcome], Awaitable[None]] | None = None,
        hub: EventHub | None = None,
        quiet_gc: float = 10.0,
    ) -> None:
        timers = Timers(self._fire, self._abandon_due)
        super().__init__(
            spec,
            tasks=tasks,
            store=store,
            bank=bank,
            secrets=secrets,
            record_events=record_events,
            after_finish=after_finish,
            hub=hub,
            quiet_gc=quiet_gc,
            timers=timers,
        )
        self.nodes = build_nodes(spec, self.groups, self.rec)

    def _fire(self, n: _Node, kind: Interrupt) -> None:
        fire(self, n, kind)

    async def _abandon_due(self, nodes: list[_Node]) -> None:
        await abandon_due(self, nodes)

    # -- observing -------------------------------------------------------------------------
    def statistics(self, *, limit: int = 20) -> RunStatistics:
        """A frozen snapshot of where the run stands (for progress displays)."""
        return statistics(self, limit)

    def stalled(self, stall: Stall) -> None:
        """The loop was stalled: push back the hook limits, charge the hook that held it."""
        stalled(self, stall)

    @staticmethod
    def hook_call_code() -> Any:
        """The code object of the frame that calls hooks (the stall monitor looks for it)."""
        return _hook_call_code()

    # -- stopping --------------------------------------------------------------------------
    def cancel(self) -> None:
        """Cancel the run from another task: frozen resources are thawed, the run ends cancelled.

        Hooks that are running see an ordinary anyio cancellation, except an
        ``on_prepare_finish`` already started, which is allowed to finish. A hook
        still running ``timeouts.abort`` later is abandoned: :meth:`execute`
        returns without it. On a finished run this does nothing.
        """
        if self.closed:
            return
        abort_all(self, AbortReason.CANCELLED)

    def abandon(self) -> None:
        """Stop waiting at once for every hook still running (a second Ctrl-C).

        Cancels the run first if it was not. What is still running is recorded
        ``abandoned`` (its task stays owned by the engine), a thaw that had not
        finished makes its resource ``thaw_failed``, and :meth:`execute` returns.
        """
        if self.closed or not self.started:
            return
        abort_all(self, AbortReason.CANCELLED)
        self.timers.due.extend(n for n in self.nodes if not n.done)
        self.timers.poke()

    # -- running -------------------------------------------------------------------------
    async def execute(self) -> RunOutcome:
        """Run every hook under the ordering rules; return the outcome or raise RunError.

        The run is shielded from the caller's cancellation: a guard task turns it
        into :meth:`cancel`, the run thaws and records itself ``cancelled``, and
        then the caller's cancellation propagates as usual.
        """
        if self.started:
            raise RuntimeError("a Run executes once; build a new one with the engine")
        self.started = True
        result: list[tuple[RunOutcome, list[Exception]]] = []

        async def guard() -> None:
            self.caller_probe = cancel_probe()
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                if not self.finished:
                    on_caller_cancel(self)
                raise

        store_failure: StoreError | None = None
        async with anyio.create_task_group() as guard_tg:
            guard_tg.start_soon(guard)
            with anyio.CancelScope(shield=True):
                try:
                    result.append(await self._execute_shielded())
                except StoreError as exc:  # (before any hook, or storing the outcome)
                    store_failure = exc
            self.finished = True
            guard_tg.cancel_scope.cancel()
        if store_failure is not None:
            store_failure.add_note(
                f"{self.operation.value} run {self.run_id} has ended (every thaw was called); "
                "its record in the store is left unfinished, for recovery"
            )
            raise store_failure
        if self.caller_cancelled:
            # Everything is thawed and recorded: now let the caller's cancellation through.
            await anyio.lowlevel.checkpoint()
        outcome, errors = result[0]
        if outcome.status is RunStatus.SUCCEEDED:
            return outcome
        word = "was cancelled" if outcome.status is RunStatus.CANCELLED else "failed"
        error = RunError(
            f"{self.operation.value} run {self.run_id} {word}: {outcome.error}", errors, outcome
        )
        fatal = self.fatal
        if fatal is not None:
            # A hook's KeyboardInterrupt/SystemExit reaches the caller, everything thawed.
            fatal.__cause__ = error
            raise fatal
        raise error

    async def _execute_shielded(self) -> tuple[RunOutcome, list[Exception]]:
        self.set_clock(fast_clock())
        self.new_event, self.new_scope = fast_primitives()
        # Per-event debug logs only when the run's stdlib logger lets debug through
        # (asked once per run): building each line costs microseconds.
        self.rec.log_events = self.log.isEnabledFor(logging.DEBUG)
        started_wall = time.time()
        started = self.t0 = self.now()
        self.log.info("run_started", resources=len(self.nodes), groups=len(self.groups))
        self.rec.emit(EventKind.RUN_STARTED, None, None, resources=len(self.nodes))
        self._sentinel_thaws()
        with self.holds.briefly():  # (its record lists every resource that may cut)
            await self._cut_intent()
        await self._drive(run_node, self.nodes, self.plan.timeouts.run)
        with self.holds.briefly():
            return await self._finish(started_wall, started)

    async def _cut_intent(self) -> None:
        """Before any hook of a protect: commit, per group, the resources that may cut.

        A kill during the cut wave then leaves a committed trace of every snapshot that
        may exist (the write hold keeps CUT events back while anything is frozen).
        Committed here, before the first quiesce, so it costs no quiesce window.
        """
        if self.operation is not OperationKind.PROTECT or not self.rec.record:
            return
        emitted = False
        for g in self.groups.values():
            keys = [list(n.resource.key) for n in g.nodes if n.cuts and n.pf is not None]
            if keys:
                self.rec.emit(EventKind.CUT_INTENT, None, None, group=g.name, resources=keys)
                emitted = True
        if emitted:
            await self.rec.commit()

    async def _drive(
        self,
        walk: Callable[[RunState, _Node], Coroutine[Any, Any, None]],
        nodes: Sequence[_Node],
        run_limit: float | None,
    ) -> None:
        """Start ``walk`` for each node in the engine's task group and wait until each
        one ended or was abandoned; the watcher keeps deadlines meanwhile."""
        monitor = self.tasks.monitor
        self.timers.catch_up = monitor.catch_up if monitor is not None else None
        self.tasks.runs.add(self)
        try:
            async with anyio.create_task_group() as tg:
                self.holds.watching = True
                self.holds.hold_run()  # no collection for the run (capped: quiet_gc)
                tg.start_soon(self.timers.watch)
                if run_limit is not None:
                    tg.start_soon(watchdog, self, run_limit)
                self.pending = len(nodes)
                if nodes:
                    self.settled = anyio.Event()
                    spawn = self.tasks.start_walk
                    for node in nodes:
                        spawn(node, walk, self, node)
                    await self.settled.wait()
                tg.cancel_scope.cancel()  # stops the watcher and the watchdog
        finally:
            self.tasks.runs.discard(self)
            self.holds.release_all()  # (a thaw that failed, a cancelled task)

    async def abort_after_crash(
        self, maybe_frozen: list[ResourceKey], lost: Mapping[ResourceKey, str] | None = None
    ) -> RunOutcome:
        """Recovery of a protect that cannot resume: thaw, then end it failed.

        Each resource that may still be frozen gets its ``on_prepare_finish`` with
        ``ctx.aborting`` set to ``recovery`` (retried like any thaw); nothing else runs.
        ``lost``: the resources that are why (their cut is gone) and the reason, each
        recorded as that resource's failure of ``on_main`` (an event and its outcome).
        """
        if self.started:
            raise RuntimeError("a Run executes once; build a new one with the engine")
        self.started = True
        self.set_clock(fast_clock())
        started_wall = time.time()
        started = self.t0 = self.now()
        self.abort_reason = AbortReason.RECOVERY
        by_key = {n.resource.key: n for n in self.nodes}
        for key, why in sorted((lost or {}).items()):
            n = by_key.get(key)
            if n is None:
                continue
            err = CutLostError(n.resource, Hook.MAIN, why)
            record_error(n, Hook.MAIN, AbortReason.RECOVERY, err)
            n.status = ResourceStatus.FAILED
            self.rec.emit(EventKind.FAILED, n, Hook.MAIN, error=str(err), reason="cut_lost")
            self.log.error("recovery_cut_lost", resource=str(n.resource), reason=why)
        self._sentinel_thaws()
        for group in self.groups.values():
            abort_group(self, group, AbortReason.RECOVERY, None)
        thaws: list[_Node] = []
        for key in maybe_frozen:
            n = by_key.get(key)
            if n is None or n.pf is None:
                continue
            n.pb_started = True
            n.quiesces = n.binding.spec.quiesces
            self.holds.set_frozen(n, n.quiesces)
            thaws.append(n)
        with anyio.CancelScope(shield=True):
            await self._drive(recovery_thaw, thaws, None)
            outcome, _errors = await self._finish(started_wall, started)
        self.finished = True
        return outcome

    def _sentinel_thaws(self) -> None:
        """A recovered run: record the safety thaws the dead engine's sentinel ran
        (``THAWED`` with reason ``sentinel``); recovery's own thaw still follows."""
        fired = self.spec.sentinel_thaws
        if not fired:
            return
        for n in self.nodes:
            entry = fired.get(n.resource.key)
            if entry is None:
                continue
            result = entry.get("result") or {}
            wall = float(entry.get("at", time.time()))
            at = self.now()
            if result.get("ok") and n.quiesced_at is not None and n.quiesced_wall is not None:
                # Its window closed then: on the dead attempt's clock, from the wall clock.
                at = n.thawed_at = n.quiesced_at + max(0.0, wall - n.quiesced_wall)
                n.quiesced_wall = None
                n.window_approximate = True
            self.log.warning("sentinel_thawed", resource=str(n.resource), ok=result.get("ok"))
            self.rec.emit(
                EventKind.THAWED,
                n,
                None,
                at=at,
                reason="sentinel",
                ok=bool(result.get("ok")),
                wall_at=wall,
                result=dict(result),
                rescue=not result.get("ok"),
            )

    async def _finish(
        self, started_wall: float, started: float
    ) -> tuple[RunOutcome, list[Exception]]:
        # A resource whose thaw failed stays frozen; the run is over all the same.
        self.holds.hold_writes(False)
        self.outcome_built = True  # a late thaw from now on is recorded on the stored outcome
        self.outcome_stored = anyio.Event()
        outcome, errors = build_outcome(self, started_wall, started)
        self.rec.emit(EventKind.RUN_FINISHED, None, None, status=outcome.status.value)
        self.rec.flush()  # (a cut wave's events, if the watcher stopped before it built them)
        self.rec.closed = True  # after run_finished a run emits no lifecycle event
        try:
            await self.store.finish_run(outcome)
        finally:
            self.outcome_stored.set()
        if self.after_finish is not None:
            await self.after_finish(outcome)
        self.log.info(
            "run_finished",
            status=outcome.status.value,
            duration=round(outcome.duration, 6),
            skew=outcome.skew,
        )
        return outcome, errors
