"""Abandoning what does not end: the run stops waiting, records it, and thaws late.

A hook still running ``timeouts.abort`` after the engine stopped it is
abandoned: named in the outcome and events, its task left to the engine's
task group, its resource ``thaw_failed`` if its thaw is what hangs. When the
hook finally ends, its task does the late chores: log it, and thaw what may
still be frozen (recorded on the stored outcome as ``thawed_late_at``).
"""

from __future__ import annotations

import anyio
import anyio.lowlevel

from karbor_async._abort import thaw_beside
from karbor_async._log import ref
from karbor_async._node import _Node
from karbor_async._record import record_error
from karbor_async._runstate import RunState
from karbor_async._signals import settle
from karbor_async._tasks import AbandonedHook
from karbor_async._types import Hook, ResourceStatus
from karbor_async.events import EventKind
from karbor_async.exceptions import HookTimeoutError

__all__ = ["abandon", "abandon_due", "after_abandoned"]


async def abandon_due(run: RunState, nodes: list[_Node]) -> None:
    """Abandon the nodes still running, after giving those just cancelled a moment."""
    live = [n for n in nodes if not n.done and not n.abandoned]
    if not live:
        return
    # Deadlines that fall together (a thaw's own and the group's) let the hook end first.
    await anyio.lowlevel.checkpoint()
    await anyio.lowlevel.checkpoint()
    for n in live:
        if not n.done and not n.abandoned:
            abandon(run, n)


def abandon(run: RunState, n: _Node) -> None:
    """Stop waiting for ``n``: record it, release what waits on it, count it done.

    Its task stays in the engine's task group; when its hook ends it does only
    its late chores (:func:`after_abandoned`).
    """
    now = run.now()
    hook = n.current
    since = now - (n.cancelled_at if n.cancelled_at is not None else now)
    n.abandoned = True
    n.abandoned_at = now
    n.abandoned_hook = hook
    what = hook.value if hook is not None else "its task"
    cause = HookTimeoutError(
        n.resource,
        hook or Hook.PREPARE_FINISH,
        f"{what} was still running {since:.3f} s after the engine stopped it; abandoned",
    )
    run.rec.emit(
        EventKind.HOOK_ABANDONED,
        n,
        hook,
        seconds=round(since, 6),
        aborting=n.calling_aborting,
    )
    run.log.warning(
        "hook_abandoned",
        resource=ref(n.resource),
        hook=hook.value if hook is not None else None,
        seconds=round(since, 6),
    )
    if n.quiesces and n.pb_started and not n.thaw_done:
        # Its thaw is what hangs, or could not be called: never pretend.
        run.rec.thaw_failed(n, cause, run.abort_reason)
    else:
        record_error(
            n,
            hook or Hook.PREPARE_FINISH,
            n.gate.aborting if n.calling_aborting else None,
            cause,
        )
        n.status = ResourceStatus.ABANDONED
    run.tasks.abandon(
        n,
        AbandonedHook(run.run_id, n.resource, hook, n.calling_aborting, now),
    )
    settle(run, n)
    run.account(n)


async def after_abandoned(run: RunState, n: _Node) -> None:
    """An abandoned hook ended: log it; thaw late what may still be frozen."""
    hook, aborting, exc = n.late or (None, False, None)
    late = run.now() - (n.abandoned_at or run.now())
    run.log.warning(
        "abandoned_hook_ended",
        resource=ref(n.resource),
        hook=hook.value if hook is not None else None,
        aborting=aborting,
        seconds_after_abandoned=round(late, 6),
        error=run.scrub.text(repr(exc)) if exc is not None else None,
    )
    if not (n.quiesces and n.pb_started) or n.pf is None:
        _release_late(run, n)  # nothing of it can be frozen: its lease goes back now
        return
    if hook is Hook.PREPARE_BEGIN:
        await _late_thaw(run, n)  # it may have frozen after a rescue thaw, or not thawed
    elif not n.thaw_done:
        if hook is Hook.PREPARE_FINISH and exc is None:
            await _thawed_late(run, n)  # the thaw that was abandoned did thaw, late
        else:
            await _late_thaw(run, n)


def _release_late(run: RunState, n: _Node) -> None:
    """An abandoned hook ended: give its resource's lease back (the store may be closed
    already if the engine is closing: the lease then ends with the process)."""
    try:
        run.rec.release(n)
    except Exception as exc:  # a closed store: the owner's death frees it
        run.log.info("late_lease_release_skipped", resource=ref(n.resource), error=repr(exc))


async def _late_thaw(run: RunState, n: _Node) -> None:
    """Thaw a resource whose quiesce or thaw ended after it was abandoned (bounded by
    the abort deadline; run from the node's own task, which closing cancels)."""
    with anyio.CancelScope(shield=True):
        with anyio.move_on_after(run.abort_timeout) as scope:
            n.hook_scope = scope
            try:
                await thaw_beside(run, n, scope, "late_thaw_failed")
            finally:
                n.hook_scope = None
            await _thawed_late(run, n)


async def _thawed_late(run: RunState, n: _Node) -> None:
    """Record a thaw that succeeded after its resource was reported ``thaw_failed``."""
    n.thaw_done = True
    n.disarm_safety()
    _release_late(run, n)
    at = n.thawed_late_at = run.now()
    run.log.warning("thawed_late", resource=ref(n.resource), at=at)
    if not run.outcome_built:
        return  # the outcome, still to be built, carries it
    stored = run.outcome_stored
    with anyio.CancelScope(shield=True):
        if stored is not None:
            await stored.wait()
        try:
            await run.store.record_late_thaw(run.run_id, n.resource.key, at)
        except Exception as exc:  # a closed store, a lost lease: say so, do not crash
            run.log.warning("late_thaw_not_recorded", resource=ref(n.resource), error=repr(exc))
