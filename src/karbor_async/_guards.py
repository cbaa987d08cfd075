"""Guards: hook time limits, quiesce budgets, the run limit, and hooks that hold the loop.

The deadlines are kept by the run's watcher (``_timers.Timers``); when one
passes, :func:`fire` interrupts the node. Hook time runs on "hook time": the
engine clock less the loop's stalls, so a hook is not blamed for time it only
waited behind another that held the loop; the one that held it is charged
(:func:`stalled`, :func:`held_too_long`).
"""

from __future__ import annotations

import time

import anyio

from karbor_async._abort import abort_all, abort_group, arm_rescue, due_call
from karbor_async._log import ref
from karbor_async._node import Interrupt, _Node
from karbor_async._runstate import RunState
from karbor_async._stall import Stall
from karbor_async._types import AbortReason, Hook
from karbor_async.events import EventKind
from karbor_async.exceptions import HookError, HookTimeoutError

__all__ = ["fire", "held_too_long", "stalled", "watchdog"]


def fire(run: RunState, n: _Node, kind: Interrupt) -> None:
    """The watcher saw a deadline pass: interrupt the node if it is still there."""
    if n.done or n.scope is None or n.interrupt is not None:
        return
    if kind is Interrupt.TIMEOUT:
        if n.current is None:
            return
        n.interrupt_hook = n.current
    elif not n.frozen or n.pf_started:
        return
    n.interrupt = kind
    n.scope.cancel()
    if kind is Interrupt.BUDGET:
        # Before its thaw starts: the quiesce no longer holds for any cut from now on,
        # and without the fallback no cut of the group starts at all.
        n.holding = False
        run.log.warning(
            "quiesce_budget_exceeded",
            resource=ref(n.resource),
            budget=n.budget,
            group=n.gate.name,
        )
        if not run.plan.crash_consistent_fallback:
            abort_group(run, n.gate, AbortReason.BUDGET, None)
    # (c): a call the engine cancelled that has not ended timeouts.abort later is abandoned.
    now = run.now()
    if n.cancelled_at is None:
        n.cancelled_at = now
    token = n.token
    run.timers.alarm(now + run.abort_timeout, lambda: due_call(run, n, token))
    arm_rescue(run, n, now)
    if kind is Interrupt.TIMEOUT:
        # The hook failed now, whenever it ends: a prepare hook aborts its group at once.
        hook = n.interrupt_hook
        assert hook is not None
        note, n.timeout_note = n.timeout_note, None
        err = HookTimeoutError(n.resource, hook, note or f"timed out after {n.timeout} s")
        run.rec.emit(EventKind.FAILED, n, hook, error=str(err), timeout=True)
        run.rec.fail(n, hook, err)
        if hook in (Hook.PREPARE_BEGIN, Hook.PREPARE_FINISH):
            abort_group(run, n.gate, AbortReason.FAILURE, err)


async def watchdog(run: RunState, limit: float) -> None:
    """The run's own time limit: the whole run aborts when it passes."""
    await anyio.sleep(limit)
    run.log.warning("run_timeout", limit=limit)
    abort_all(run, AbortReason.TIMEOUT)


def run_time(run: RunState, n: _Node) -> float:
    """The running call's time so far, other resources' stalls left out."""
    return (run.now() - n.call_start) - (run.timers.stalled - n.call_stalled)


def held_too_long(run: RunState, n: _Node, hook: Hook, token: int) -> HookError | None:
    """A hook that returned inside the stall it caused: charged, it may have timed out."""
    monitor = run.monitor
    blame = monitor.blamed() if monitor is not None else None
    if blame is None or blame[0] is not n or blame[1] != token:
        return None
    assert n.timeout is not None
    if run_time(run, n) <= n.timeout:
        return None
    held = time.monotonic() - blame[2]
    err = HookTimeoutError(
        n.resource, hook, f"held the event loop for {held:.1f} s; limit {n.timeout:g} s"
    )
    run.rec.emit(EventKind.FAILED, n, hook, error=str(err), timeout=True)
    return err


def stalled(run: RunState, stall: Stall) -> None:
    """The loop was stalled (settled on the loop thread): push back the hook limits,
    and name and charge the hook that held it if it is one of ours."""
    timers = run.timers
    timers.stalled += stall.seconds
    n = stall.node
    if stall.culprit != "hook" or not isinstance(n, _Node) or n.run is not run.rec:
        return
    if stall.hook is None or n.abandoned or run.closed:
        return
    n.blocked_loop_s += stall.seconds
    n.call_stalled += stall.seconds  # its own stall is charged to it, not pushed back
    run.log.warning(
        "loop_blocked",
        resource=ref(n.resource),
        hook=stall.hook.value,
        seconds=round(stall.seconds, 3),
        frame=stall.frame,
    )
    run.rec.emit(
        EventKind.LOOP_BLOCKED,
        n,
        stall.hook,
        seconds=round(stall.seconds, 6),
        frame=stall.frame,
    )
    still = n.token == stall.token and n.current is stall.hook and not n.calling_aborting
    if not still or n.timeout is None:
        return
    note = f"held the event loop for {stall.seconds:.1f} s; limit {n.timeout:g} s"
    remaining = n.timeout - run_time(run, n)
    if remaining <= 0:
        n.timeout_note = note
        fire(run, n, Interrupt.TIMEOUT)
        return
    # Its deadline was pushed back with everyone's: bring its own back in.
    token = n.token

    def charge() -> None:
        if n.token == token and n.current is stall.hook and not n.done:
            n.timeout_note = note
            fire(run, n, Interrupt.TIMEOUT)

    timers.alarm(run.now() + remaining, charge)
