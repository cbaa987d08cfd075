"""Thawing: the aborting on_prepare_finish every started prepare is owed (guarantee 1).

Bounded by the abort deadline, retried with backoff while the resource
quiesces, never pretended: a thaw that does not succeed in time makes its
resource ``thaw_failed``.
"""

from __future__ import annotations

import math
import time

import anyio

from karbor_async import _ordering
from karbor_async._abort import THAW_FIRST_DELAY, THAW_MAX_DELAY, abort_group
from karbor_async._calls import call
from karbor_async._node import HOOK_BITS, _Node
from karbor_async._record import record_error
from karbor_async._runstate import RunState
from karbor_async._types import AbortReason, Hook, OperationKind, ResourceStatus
from karbor_async.events import EventKind
from karbor_async.exceptions import HookError, HookTimeoutError

__all__ = ["on_cancelled", "release_cut", "thaw"]


async def thaw(
    run: RunState,
    n: _Node,
    reason: AbortReason,
    error: BaseException | None,
    *,
    after_failed_finish: bool = False,
) -> None:
    """Aborting on_prepare_finish: bounded by the abort deadline, retried if it quiesces.

    Callers shield it from the run's cancellation.
    """
    if n.pf is None or not n.pb_started:
        return
    if n.thaw_done and not n.rescued:
        return
    if n.rescued:
        # A rescue thaw ran while the quiesce was still under way: thaw once more.
        n.rescued = n.thaw_done = False
    elif not _ordering.needs_thaw(n, after_failed_finish=after_failed_finish):
        return
    n.pf_started = True
    n.budget_token += 1
    n.holding = False
    deadline = run.now() + run.abort_timeout
    if n.gate.abandon_at is not None:
        deadline = min(deadline, n.gate.abandon_at)
    delay = THAW_FIRST_DELAY
    last: HookError | None = None
    with anyio.CancelScope(deadline=deadline) as bounded:
        while True:
            limit = math.inf if n.timeout is None else run.now() + n.timeout
            with anyio.CancelScope(deadline=limit) as attempt:
                n.hook_scope = attempt
                try:
                    last = await call(
                        run,
                        n,
                        Hook.PREPARE_FINISH,
                        n.pf,
                        aborting=reason,
                        abort_error=error,
                        scopes=(attempt, bounded),
                    )
                finally:
                    n.hook_scope = None
            if attempt.cancelled_caught:
                last = HookTimeoutError(
                    n.resource, Hook.PREPARE_FINISH, f"thaw timed out after {n.timeout} s"
                )
                run.rec.emit(EventKind.FAILED, n, Hook.PREPARE_FINISH, error=str(last))
            if last is None:
                n.thaw_done = True
                run.rec.release(n)
                if n.quiesces:
                    run.holds.set_frozen(n, False)
                    if n.thawed_at is None or n.quiesced_wall is not None:
                        n.thawed_at = _thaw_instant(run, n)  # (a mark is on this clock)
                    run.rec.emit(EventKind.THAWED, n, None, at=n.thawed_at, reason=reason.value)
                    n.disarm_safety()
                return
            if not n.quiesces:
                break  # not retried: nothing of it is frozen
            await anyio.sleep(delay)
            delay = min(delay * 2, THAW_MAX_DELAY)
    if not n.quiesces:
        # A failed aborting call is never lost: it joins the outcome and RunError.
        if last is None:
            last = HookTimeoutError(
                n.resource,
                Hook.PREPARE_FINISH,
                "aborting call did not finish before the abort deadline",
            )
            run.rec.emit(EventKind.FAILED, n, Hook.PREPARE_FINISH, error=str(last))
        record_error(n, Hook.PREPARE_FINISH, reason, last)
        return
    # Every thaw attempt failed or the abort deadline passed: never pretend.
    run.rec.thaw_failed(
        n,
        last
        or HookTimeoutError(
            n.resource, Hook.PREPARE_FINISH, "thaw did not finish before the abort deadline"
        ),
        run.abort_reason,
    )


async def on_cancelled(run: RunState, n: _Node) -> None:
    """The node stopped because its group (or the run) aborts: thaw it if it is owed."""
    g = n.gate
    reason = g.aborting or run.abort_reason or AbortReason.CANCELLED
    abort_group(run, g, reason, None)
    if _ordering.needs_thaw(n):
        await thaw(run, n, g.aborting or reason, g.abort_error)
    await release_cut(run, n, g.aborting or reason, g.abort_error)
    if n.status in (ResourceStatus.PENDING, ResourceStatus.RUNNING, ResourceStatus.SUCCEEDED):
        if reason in (AbortReason.CANCELLED, AbortReason.TIMEOUT):
            n.status = ResourceStatus.CANCELLED
        else:
            n.status = ResourceStatus.ABORTED
        run.rec.emit(EventKind.ABORTED, n, None, reason=reason.value)


async def release_cut(
    run: RunState, n: _Node, reason: AbortReason, error: BaseException | None
) -> None:
    """A cut that lives in the process, taken and not copied, when the run stops short.

    A type with ``cut_outlives_process=False`` holds its cut open (a read
    transaction) from its ``on_prepare_finish`` until its ``on_main`` has copied it.
    When its group aborts after the cut and before ``on_main`` finished, nothing
    else would ever run for it, so its ``on_prepare_finish`` is called once more with
    ``ctx.aborting`` set: the plugin closes what holds the cut. Once, bounded by the
    abort deadline; a failure joins the outcome (the resource is not frozen, so it
    is not retried and is not ``thaw_failed``). Callers shield it.
    """
    if n.pf is None or n.binding.spec.cut_outlives_process:
        return
    if run.operation is not OperationKind.PROTECT:
        return  # (only a protect cuts)
    cut = HOOK_BITS[Hook.PREPARE_FINISH]
    if not n.hooks_done & cut or n.hooks_done & HOOK_BITS[Hook.MAIN]:
        return
    deadline = run.now() + run.abort_timeout
    if n.gate.abandon_at is not None:
        deadline = min(deadline, n.gate.abandon_at)
    with anyio.CancelScope(deadline=deadline) as bounded:
        last = await call(
            run,
            n,
            Hook.PREPARE_FINISH,
            n.pf,
            aborting=reason,
            abort_error=error,
            scopes=(bounded,),
        )
    if bounded.cancelled_caught:
        last = HookTimeoutError(
            n.resource,
            Hook.PREPARE_FINISH,
            "releasing the cut did not finish before the abort deadline",
        )
        run.rec.emit(EventKind.FAILED, n, Hook.PREPARE_FINISH, error=str(last))
    if last is not None:
        record_error(n, Hook.PREPARE_FINISH, reason, last)


def _thaw_instant(run: RunState, n: _Node) -> float:
    """Now on the engine clock; for a resource an earlier (dead) attempt quiesced, now on
    that attempt's clock, estimated from the wall clock (and the window marked so)."""
    if n.quiesced_wall is None or n.quiesced_at is None:
        return run.now()
    n.window_approximate = True
    return n.quiesced_at + max(0.0, time.time() - n.quiesced_wall)
