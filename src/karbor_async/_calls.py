"""Calling one hook: its context, its deadline, its events, and what it raised.

Everything a plugin's hook raises becomes a :class:`HookError` of that hook,
except a cancellation the engine asked for, which propagates. A
``KeyboardInterrupt`` or ``SystemExit`` is also that hook's failure first and
aborts the whole run (the run re-raises it once all is thawed).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import anyio
import anyio.lowlevel
import sniffio

from karbor_async._abort import abort_all, abort_group, on_caller_cancel, only_cancellation
from karbor_async._guards import held_too_long
from karbor_async._log import ref
from karbor_async._node import HOOK_BITS, HookFn, Interrupt, _Abandoned, _Aborted, _Node
from karbor_async._params import resolve_secrets
from karbor_async._record import format_error
from karbor_async._runstate import RunState
from karbor_async._slots import slot_builder
from karbor_async._types import AbortReason, Hook, ResourceStatus
from karbor_async.events import EventKind
from karbor_async.exceptions import HookError
from karbor_async.plugin import HookContext

__all__ = [
    "call",
    "call_limited",
    "cancel_probe",
    "deliver_pending",
    "fast_clock",
    "fast_primitives",
    "hook_call_code",
]

_new_context: Callable[..., HookContext] = slot_builder(HookContext)
"""``HookContext(...)``, every field given: built four times per resource (a hot path)."""

_FATAL = (KeyboardInterrupt, SystemExit)
"""Raised by a hook, these abort the whole run and reach the caller after the thaws."""


def fast_clock() -> Callable[[], float]:
    """``anyio.current_time`` without the backend lookup on every call (a hot path)."""
    try:
        return asyncio.get_running_loop().time  # the same clock anyio reads on asyncio
    except RuntimeError:  # not on asyncio (trio): keep anyio's own, mock clocks included
        return anyio.current_time


def fast_primitives() -> tuple[Callable[[], anyio.Event], Callable[[], anyio.CancelScope]]:
    """``anyio.Event`` and ``anyio.CancelScope`` without the backend lookup each one makes.

    Both dispatch to the running backend's class on every construction (a sniffio
    lookup, about 1 us); a run builds one scope and up to three events per resource,
    so it asks once and builds the backend's classes directly. Whatever cannot be
    built that way (an anyio that changed) falls back to the public constructors.
    """
    event_cls: Callable[[], anyio.Event] = type(anyio.Event())
    scope_cls: Callable[[], anyio.CancelScope] = type(anyio.CancelScope())
    try:
        event, scope = event_cls(), scope_cls()
    except TypeError:  # pragma: no cover - an anyio whose classes take other arguments
        return anyio.Event, anyio.CancelScope
    if not (isinstance(event, anyio.Event) and isinstance(scope, anyio.CancelScope)):
        return anyio.Event, anyio.CancelScope  # pragma: no cover
    return event_cls, scope_cls


def cancel_probe() -> Callable[[], object] | None:
    """Whether the current task is cancelled, asked cheaply from any task later.

    Lets the run see its caller's cancellation the instant it happens, not at the
    guard task's next step (by then dozens of hooks may have started). asyncio:
    anyio delivers a scope's cancellation with ``Task.cancel()`` at once, so
    ``cancelling()`` says it; trio: the task's cancel status (private, so looked
    up defensively; without it the guard task's step is what notices).
    """
    try:
        library = sniffio.current_async_library()
    except sniffio.AsyncLibraryNotFoundError:
        return None
    if library == "asyncio":
        task = asyncio.current_task()
        if task is None:
            return None
        return task.cancelling  # (an int: non-zero once cancelled)
    if library == "trio":
        import trio

        status = getattr(trio.lowlevel.current_task(), "_cancel_status", None)
        if status is None or not hasattr(status, "effectively_cancelled"):
            return None
        return lambda: bool(status.effectively_cancelled)
    return None


def fatal_in(exc: BaseException) -> BaseException | None:
    """The first KeyboardInterrupt or SystemExit in ``exc`` (which may be a group)."""
    if isinstance(exc, _FATAL):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = fatal_in(inner)
            if found is not None:
                return found
    return None


async def deliver_pending(n: _Node) -> None:
    """Raise a cancellation requested while the node was being woken, before a hook starts.

    anyio delivers a cancel at the task's next wait; a task already woken can
    run on past it. A cut must never start under a pending interrupt.
    """
    scope = n.scope
    if scope is not None and scope.cancel_called:
        await anyio.lowlevel.checkpoint()


async def call_limited(run: RunState, n: _Node, hook: Hook, fn: HookFn) -> HookError | None:
    """Call on_main/on_complete under the node's limits, unless its group is aborting.

    A task woken just before an abort may resume before the cancellation reaches
    it, so the abort is checked right before the hook starts, after every wait.
    """
    if not n.limiters:
        if n.gate.aborting is not None:
            raise _Aborted
        n.status = ResourceStatus.RUNNING
        return await call(run, n, hook, fn)
    taken: list[anyio.CapacityLimiter] = []
    try:
        for limiter in n.limiters:  # in the core's one order, so limits cannot deadlock
            await limiter.acquire()
            taken.append(limiter)
        if n.gate.aborting is not None:
            raise _Aborted
        n.status = ResourceStatus.RUNNING
        return await call(run, n, hook, fn)
    finally:
        for limiter in reversed(taken):
            limiter.release()


async def call(
    run: RunState,
    n: _Node,
    hook: Hook,
    fn: HookFn,
    *,
    started: bool = False,
    aborting: AbortReason | None = None,
    abort_error: BaseException | None = None,
    scopes: tuple[anyio.CancelScope, ...] = (),
) -> HookError | None:
    """Run one hook; its exception is returned as a HookError, cancellation propagates.

    A non-aborting call is timed by the run's watcher, which cancels the node's
    scope when the hook's limit passes. An aborting call names the ``scopes``
    that bound it. Any ``BaseException`` the hook raises is its failure, except
    a cancellation the engine asked for (one of those scopes, or the node's,
    was cancelled, or the engine is closing); ``KeyboardInterrupt`` and
    ``SystemExit`` also abort the whole run (:func:`_fatal_raised`). If the run
    abandoned the call meanwhile, ``_Abandoned`` unwinds the node's task.
    (The stall monitor finds this frame by its code and reads ``n`` and ``hook``.)
    """
    if aborting is None:
        probe = run.caller_probe
        if probe is not None and probe():
            on_caller_cancel(run)
        if n.scope is not None and n.scope.cancel_called:
            await deliver_pending(n)
    params = n.params.values
    if n.params.secrets:
        params = await resolve_secrets(n.params, run.secrets)
        run.scrub.add(params[k] for k in n.params.secrets)
    ctx = _new_context(n.resource, hook, params, n, aborting, abort_error)
    now = n.call_start = run.now()
    rec = run.rec
    if not started and rec.record:
        if aborting is None:
            rec.emit(EventKind.STARTED, n, hook, now)
        else:
            rec.emit(EventKind.STARTED, n, hook, now, aborting=aborting.value)
    timers = run.timers
    if aborting is None and n.timeout is not None:
        timers.arm_hook(n, n.timeout, now)
    n.current = hook
    n.last_progress = None  # (the progress shown is the running call's own)
    n.calling_aborting = aborting is not None
    if n.call_marks:
        n.call_marks = 0
    n.call_stalled = timers.stalled
    token = n.token
    try:
        await fn(ctx)
    except Exception as exc:
        if n.abandoned:
            n.late = (hook, aborting is not None, exc)
            raise _Abandoned from None
        if n.interrupt is Interrupt.TIMEOUT:
            # The plugin turned our cancellation into its own error: deliver the timeout.
            await anyio.lowlevel.checkpoint()
        err = rec.hook_error(n, hook, exc)
        rec.emit(EventKind.FAILED, n, hook, error=format_error(err))
        return err
    except BaseException as exc:
        if n.abandoned:
            n.late = (hook, aborting is not None, exc)
            raise _Abandoned from None
        if only_cancellation(exc) and _cancel_requested(run, n, aborting, scopes):
            raise
        # Not a cancellation the engine asked for: the hook's own failure.
        err = rec.hook_error(n, hook, exc)
        rec.emit(EventKind.FAILED, n, hook, error=format_error(err))
        fatal = fatal_in(exc)
        if fatal is not None:
            _fatal_raised(run, n, fatal, err)
        elif n.interrupt is Interrupt.TIMEOUT:
            await anyio.lowlevel.checkpoint()  # deliver the timeout it swallowed
        return err
    finally:
        n.current = None
        n.token += 1  # the watcher's entry for this call is now stale
    if n.abandoned:
        n.late = (hook, aborting is not None, None)
        raise _Abandoned
    monitor = run.monitor
    if monitor is not None and monitor.stalling and aborting is None and n.timeout is not None:
        held = held_too_long(run, n, hook, token)
        if held is not None:
            return held
    if n.interrupt is Interrupt.TIMEOUT:
        # The hook returned after its deadline passed; the cancellation is pending.
        await anyio.lowlevel.checkpoint()
    if aborting is None:
        n.hooks_done |= HOOK_BITS[hook]
    if rec.record:
        rec.emit(EventKind.FINISHED, n, hook)
    return None


def hook_call_code() -> Any:
    """The code object of the frame that calls hooks (the stall monitor looks for it)."""
    return call.__code__


def _cancel_requested(
    run: RunState, n: _Node, aborting: AbortReason | None, scopes: tuple[anyio.CancelScope, ...]
) -> bool:
    """Whether a cancellation a hook raised is one the engine (or its closing) asked for."""
    if run.tasks.closing:
        return True
    if aborting is None:
        return n.scope is not None and n.scope.cancel_called
    return any(scope.cancel_called for scope in scopes)


def _fatal_raised(run: RunState, n: _Node, exc: BaseException, err: HookError) -> None:
    """A hook raised KeyboardInterrupt or SystemExit: abort the whole run at once.

    It is that hook's failure first (everything is thawed, the outcome is
    recorded); ``Run.execute`` then re-raises the same object.
    """
    run.log.error("hook_raised_fatal", resource=ref(n.resource), error=type(exc).__name__)
    if run.fatal is None:
        run.fatal = exc
    run.rec.fail(n, err.hook, err)
    abort_group(run, n.gate, AbortReason.FAILURE, err)
    abort_all(run, AbortReason.FAILURE)
