"""One resource's walk through its four hooks, as one task in the engine's task group.

The task waits where the ordering core says it must (its counters and
barriers, through the events ``_signals`` sets), checks the core's abort
rule right before each hook starts, and reports each hook's end back to the
core. It runs in one cancel scope of its own: an abort, a time limit or a
budget cancels it, and :func:`_interrupted` decides what follows (a thaw, the
rest of the walk after a budget, or nothing).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

from karbor_async import _ordering
from karbor_async._abandon import after_abandoned
from karbor_async._abort import abort_group, check_caller, store_failed
from karbor_async._calls import call, call_limited, deliver_pending
from karbor_async._log import ref
from karbor_async._node import Interrupt, _Abandoned, _Aborted, _Node
from karbor_async._runstate import RunState
from karbor_async._signals import (
    release_main,
    settle,
    signal_cp,
    signal_pb,
    signal_pf,
    signal_pf_edges,
)
from karbor_async._thaw import on_cancelled, thaw
from karbor_async._types import AbortReason, Hook, ResourceStatus
from karbor_async.events import EventKind
from karbor_async.exceptions import StoreError

__all__ = ["recovery_thaw", "run_node"]

Stage = Callable[[RunState, _Node], Awaitable[None]]


async def run_node(run: RunState, n: _Node) -> None:
    """Walk one resource's hooks; a cancelled scope hands over to _interrupted.

    The walk itself runs inline (no coroutine of its own: one less per
    resource); what ``_interrupted`` hands back runs as the next stage. The
    task lives in the engine's task group: nothing may escape it.
    """
    stage: Stage | None = None
    try:
        while True:
            finished = False
            try:
                with run.new_scope() as scope:
                    n.scope = scope
                    if run.tasks.closing:
                        run.tasks.cancelled_on_entry(scope)
                    if stage is None:
                        if await _prepare(run, n):
                            await _main_and_complete(run, n)
                    else:
                        await stage(run, n)
                    finished = True
            except _Aborted:
                n.scope = None
                with anyio.CancelScope(shield=True):
                    await on_cancelled(run, n)
                return
            n.scope = None
            if finished:
                return
            stage = await _interrupted(run, n)
            if stage is None:
                return
    except _Abandoned:
        await after_abandoned(run, n)
    except Exception as exc:  # an engine bug: it must not take the engine's tasks down
        run.log.exception("engine_error", resource=ref(n.resource))
        if not n.abandoned and n.error is None:
            n.error = exc
            n.status = ResourceStatus.FAILED
    finally:
        node_ended(run, n)


async def recovery_thaw(run: RunState, n: _Node) -> None:
    """Recovery's walk: only the thaw, with ``ctx.aborting`` set to ``recovery``."""
    try:
        await thaw(run, n, AbortReason.RECOVERY, None)
    except _Abandoned:
        await after_abandoned(run, n)
    finally:
        node_ended(run, n)


def node_ended(run: RunState, n: _Node) -> None:
    n.done = True
    if not n.abandoned:
        settle(run, n)
    run.account(n)
    run.tasks.ended(n)


async def _interrupted(run: RunState, n: _Node) -> Stage | None:
    """The node's scope was cancelled: a hook timed out, its budget ran out, or an abort."""
    g = n.gate
    kind, n.interrupt = n.interrupt, None
    with anyio.CancelScope(shield=True):
        if kind is Interrupt.TIMEOUT:
            hook = n.interrupt_hook
            assert hook is not None
            if hook in (Hook.PREPARE_BEGIN, Hook.PREPARE_FINISH):
                # guards.fire recorded the failure and aborted the group.
                await thaw(
                    run,
                    n,
                    g.aborting or AbortReason.FAILURE,
                    g.abort_error,
                    after_failed_finish=hook is Hook.PREPARE_FINISH,
                )
            else:
                if hook is Hook.MAIN:
                    run.rec.emit(EventKind.SKIPPED, n, Hook.COMPLETE, because="own_main_failed")
                signal_cp(n, failed=True)
            return None
        if kind is Interrupt.BUDGET:
            return await _budget_exceeded(run, n)
        await on_cancelled(run, n)
    return None


async def _budget_exceeded(run: RunState, n: _Node) -> Stage | None:
    """The resource was frozen past its quiesce budget: thaw it now (guarantee 2)."""
    n.thawed_early = True
    await thaw(run, n, AbortReason.BUDGET, None)
    if not run.plan.crash_consistent_fallback:
        await on_cancelled(run, n)  # guards.fire aborted the group when the budget fired
        return None
    signal_pb(run, n)
    await signal_pf(run, n)
    return _main_and_complete


# -- prepare: begin, barriers, finish ---------------------------------------------------
async def _prepare(run: RunState, n: _Node) -> bool:
    g = n.gate
    if n.wait_pb:
        n.ev_pb = run.new_event()
        await n.ev_pb.wait()
        n.ev_pb = None  # set once: let it go (an event with its waiter queue is ~0.8 KB)
    if g.aborting is not None:
        raise _Aborted
    if n.pb is not None:
        n.status = ResourceStatus.RUNNING
        if n.quiesces:
            # Commit point 1: recovery must know this resource may be frozen.
            check_caller(run)
            if g.aborting is not None:
                raise _Aborted
            run.rec.emit(EventKind.STARTED, n, Hook.PREPARE_BEGIN)
            try:
                await run.rec.commit()
            except StoreError as exc:
                store_failed(run, g, n, exc)
                raise _Aborted from None
            if g.aborting is not None:
                raise _Aborted
            await deliver_pending(n)
            n.pb_started = True
            err = await call(run, n, Hook.PREPARE_BEGIN, n.pb, started=True)
        else:
            await deliver_pending(n)
            n.pb_started = True
            err = await call(run, n, Hook.PREPARE_BEGIN, n.pb)
        if err is not None:
            run.rec.fail(n, Hook.PREPARE_BEGIN, err)
            abort_group(run, g, AbortReason.FAILURE, err)
            with anyio.CancelScope(shield=True):
                await thaw(run, n, g.aborting or AbortReason.FAILURE, err)
            return False
        if n.quiesces:
            run.holds.set_frozen(n, True)
            n.holding = True
            if n.quiesced_at is None:
                n.quiesced_at = run.now()
                if n.budget is not None:
                    run.timers.arm_budget(n, n.quiesced_at + n.budget)
            run.rec.emit(EventKind.QUIESCED, n, None, at=n.quiesced_at)
            if n.safety is not None:
                n.safety.frozen()  # the sentinel's limit (budget + margin) runs from now
    signal_pb(run, n)
    if _ordering.held_at_cut(n):
        barrier = g.cut_released if n.cuts else g.cut_released_rest
        if not barrier.is_set():
            await barrier.wait()
    if n.wait_pf:
        n.ev_pf = run.new_event()
        await n.ev_pf.wait()
        n.ev_pf = None  # set once: let it go (an event with its waiter queue is ~0.8 KB)
    if n.waits_cuts and n.pf is not None and _ordering.held_at_thaw(n):
        await g.thaw_released.wait()  # under cut: thaw once every cut of the group is done
    if g.aborting is not None:
        # Woken just before the abort reached it: cuts not yet started are not started.
        raise _Aborted
    if n.pf is not None and not await _finish_prepare(run, n):
        return False
    if signal_pf_edges(n):
        await release_main(run, g)
    return True


async def _finish_prepare(run: RunState, n: _Node) -> bool:
    """Call the non-aborting on_prepare_finish (the cut; a server's thaw).

    From here on, aborts leave this node alone until the call returns; only
    its own time limit interrupts it.
    """
    assert n.pf is not None
    g = n.gate
    check_caller(run)  # (before in_cut: a cancelled caller starts no cut)
    if n.scope is not None and n.scope.cancel_called:
        await deliver_pending(n)
    n.pf_started = True
    n.budget_token += 1  # the budget no longer applies: the thaw is under way
    n.status = ResourceStatus.RUNNING
    if n.cuts:
        guards = n.guards  # held: some ancestor-or-self quiesced, and all still hold
        n.crash_consistent = not (guards and all(x.holding for x in guards))
    n.holding = False  # (a quiescing resource's own pf is its thaw: it starts now)
    n.in_cut = True
    try:
        err = await call(run, n, Hook.PREPARE_FINISH, n.pf)
    finally:
        n.in_cut = False
    if err is not None:
        run.rec.fail(n, Hook.PREPARE_FINISH, err)
        abort_group(run, g, AbortReason.FAILURE, err)
        if n.quiesces:
            reason = g.aborting or AbortReason.FAILURE
            with anyio.CancelScope(shield=True):
                await thaw(run, n, reason, err, after_failed_finish=True)
        return False
    if n.cuts:
        if n.cut_at is None:
            n.cut_at = n.call_start  # the default cut: the start of the call
        if run.rec.record:
            run.rec.emit(EventKind.CUT, n, None, at=n.cut_at, crash_consistent=n.crash_consistent)
    if n.quiesces:
        run.holds.set_frozen(n, False)
        n.thaw_done = True
        if n.thawed_at is None:
            n.thawed_at = run.now()
        run.rec.emit(EventKind.THAWED, n, None, at=n.thawed_at)
        n.disarm_safety()
    return True


# -- main and complete ------------------------------------------------------------------
async def _main_and_complete(run: RunState, n: _Node) -> None:
    g = n.gate
    if g.aborting is not None:
        raise _Aborted
    if _ordering.held_at_main(n) and not g.main_released.is_set():
        await g.main_released.wait()
    if n.main is not None:
        err = await call_limited(run, n, Hook.MAIN, n.main)
        if err is not None:
            run.rec.fail(n, Hook.MAIN, err)
            run.rec.emit(EventKind.SKIPPED, n, Hook.COMPLETE, because="own_main_failed")
            signal_cp(n, failed=True)
            return
    if n.wait_cp:
        n.ev_cp = run.new_event()
        await n.ev_cp.wait()
        n.ev_cp = None  # set once: let it go (an event with its waiter queue is ~0.8 KB)
        if g.aborting is not None:
            raise _Aborted  # cancelled or timed out: ``cancelled``, not ``skipped``
    if n.child_failed:
        if n.status is not ResourceStatus.THAW_FAILED:
            n.status = ResourceStatus.SKIPPED
        run.rec.emit(EventKind.SKIPPED, n, Hook.COMPLETE, because="dependent_failed")
        signal_cp(n, failed=True)
        return
    if n.complete is not None:
        err = await call_limited(run, n, Hook.COMPLETE, n.complete)
        if err is not None:
            run.rec.fail(n, Hook.COMPLETE, err)
            signal_cp(n, failed=True)
            return
    if n.status is not ResourceStatus.THAW_FAILED:
        n.status = ResourceStatus.SUCCEEDED
    signal_cp(n, failed=False)
