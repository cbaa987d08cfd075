"""Aborting: a group or the whole run, the caller's cancellation, and the rescue thaw.

The abort rules themselves (what stops, what is interrupted) are the ordering
core's (``_ordering.abort``, ``interruptible``); this room applies them to the
running tasks: it cancels their scopes, arms the deadlines after which what
does not end is abandoned (DESIGN.md guarantee 1, the bound) and, beside a
quiesce that does not end once cancelled, calls its thaw (the rescue).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import anyio

from karbor_async import _ordering
from karbor_async._log import ref
from karbor_async._node import Rescue, _Group, _Node
from karbor_async._params import resolve_secrets
from karbor_async._record import record_error
from karbor_async._runstate import RunState
from karbor_async._types import AbortReason, Hook, ResourceStatus
from karbor_async.events import EventKind
from karbor_async.exceptions import StoreError
from karbor_async.plugin import HookContext

__all__ = [
    "THAW_FIRST_DELAY",
    "THAW_MAX_DELAY",
    "abort_all",
    "abort_group",
    "arm_rescue",
    "check_caller",
    "due_call",
    "on_caller_cancel",
    "only_cancellation",
    "store_failed",
    "thaw_beside",
]

THAW_FIRST_DELAY = 0.05
THAW_MAX_DELAY = 2.0
"""A failed thaw is retried after 50 ms, then twice as long each time, at most 2 s apart."""


def only_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is the backend's cancellation (or a group of nothing else)."""
    cancelled = anyio.get_cancelled_exc_class()
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(cancelled)[1] is None
    return isinstance(exc, cancelled)


def abort_all(run: RunState, reason: AbortReason) -> None:
    """(a) The whole run aborts: every group aborts at this instant."""
    if run.abort_reason is None:
        run.abort_reason = reason
    for group in run.groups.values():
        abort_group(run, group, reason, None)


def store_failed(run: RunState, g: _Group, n: _Node | None, exc: StoreError) -> None:
    """A commit point's commit failed (the store lost its server past its reconnect
    window, or another engine owns the run now): the run cannot promise recovery what
    it needs, so the group aborts and everything frozen thaws. ``n``, whose quiesce
    waited for the commit, fails with the store's error (its hook was not called)."""
    run.log.error("store_commit_failed", group=g.name, error=str(exc))
    if n is not None:
        record_error(n, Hook.PREPARE_BEGIN, None, exc)
        n.status = ResourceStatus.FAILED
    abort_group(run, g, AbortReason.FAILURE, exc)


def abort_group(run: RunState, g: _Group, reason: AbortReason, error: BaseException | None) -> None:
    """The group aborts: interrupt what of it runs, except a started cut (the core's rule)."""
    if not _ordering.abort(g, reason):
        return
    g.abort_error = error
    now = run.now()
    g.abandon_at = now + run.abort_timeout
    run.log.warning("group_aborting", group=g.name, reason=reason.value)
    run.rec.emit(EventKind.GROUP_ABORTING, None, None, group=g.name, reason=reason.value)
    for n in g.nodes:
        if n.done:
            continue
        if n.cancelled_at is None:
            n.cancelled_at = now
        if n.scope is None or not _ordering.interruptible(n):
            continue  # not started, or running a cut that must finish
        n.scope.cancel()
        arm_rescue(run, n, now)
    # (b): what of the group still runs timeouts.abort from now is abandoned.
    run.timers.alarm(g.abandon_at, lambda: due_all(run, g.nodes))


def on_caller_cancel(run: RunState) -> None:
    """The caller's scope was cancelled: the same as ``Run.cancel()`` at that instant."""
    if run.caller_cancelled:
        return
    run.caller_cancelled = True
    run.caller_probe = None
    run.log.warning("run_cancelled_by_caller")
    abort_all(run, AbortReason.CANCELLED)


def check_caller(run: RunState) -> None:
    """Before a hook starts: has the caller been cancelled since the last look?

    (Inlined on the per-hook path in ``_calls.call``.)"""
    probe = run.caller_probe
    if probe is not None and probe():
        on_caller_cancel(run)


def due_all(run: RunState, nodes: Sequence[_Node]) -> None:
    run.timers.due.extend(n for n in nodes if not n.done and not n.abandoned)


def due_call(run: RunState, n: _Node, token: int) -> None:
    if n.token == token and not n.done and not n.abandoned:
        run.timers.due.append(n)  # no call of it has ended since it was cancelled


# -- a quiesce that does not end: its thaw beside it ---------------------------------------
def arm_rescue(run: RunState, n: _Node, now: float) -> None:
    """A quiescing on_prepare_begin was cancelled: if it has not ended half the abort
    deadline later, its thaw is called beside it, so the resource is not left frozen
    while the engine waits (the thaw must be safe on a resource never frozen)."""
    if n.rescue_armed or not n.quiesces or n.current is not Hook.PREPARE_BEGIN:
        return
    n.rescue_armed = True
    token = n.token

    def due() -> None:
        if n.token == token and not n.done and not n.thaw_done and n.pf is not None:
            run.tasks.start_soon(rescue_thaw, run, Rescue(n))

    run.timers.alarm(now + run.abort_timeout / 2, due)


async def rescue_thaw(run: RunState, rescue: Rescue) -> None:
    n = rescue.node
    g = n.gate
    deadline = g.abandon_at if g.abandon_at is not None else math.inf
    run.log.warning(
        "rescue_thaw",
        resource=ref(n.resource),
        note="on_prepare_begin did not end once cancelled: its thaw is called beside it",
    )
    try:
        with anyio.CancelScope(shield=True), anyio.CancelScope(deadline=deadline) as scope:
            rescue.scope = scope
            reason = await thaw_beside(run, n, scope, "rescue_thaw_failed")
            n.thaw_done = n.rescued = True
            if n.thawed_at is None:
                n.thawed_at = run.now()
            # (rescue: recovery still thaws it, the quiesce may freeze after this)
            run.rec.emit(
                EventKind.THAWED, n, None, at=n.thawed_at, reason=reason.value, rescue=True
            )
    finally:
        run.tasks.ended(rescue)


async def thaw_beside(
    run: RunState, n: _Node, scope: anyio.CancelScope, failed: str
) -> AbortReason:
    """Call ``n``'s aborting on_prepare_finish outside its walk (beside a quiesce that
    does not end, or late, after it was abandoned) until one succeeds; retried with
    backoff until ``scope`` ends it. Returns the reason the calls were given."""
    assert n.pf is not None
    g = n.gate
    reason = g.aborting or run.abort_reason or AbortReason.FAILURE
    delay = THAW_FIRST_DELAY
    while True:
        try:
            params = n.params.values
            if n.params.secrets:
                params = await resolve_secrets(n.params, run.secrets)
            ctx = HookContext(n.resource, Hook.PREPARE_FINISH, params, n, reason, g.abort_error)
            await n.pf(ctx)
        except BaseException as exc:  # nothing may escape a task the engine owns
            if only_cancellation(exc) and scope.cancel_called:
                raise
            run.log.warning(failed, resource=ref(n.resource), error=run.scrub.text(repr(exc)))
        else:
            return reason
        await anyio.sleep(delay)
        delay = min(delay * 2, THAW_MAX_DELAY)
