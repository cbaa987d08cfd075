"""The engine's own tasks: where hooks run, and what happens to hooks it stopped waiting for.

``async with Engine(...)`` opens one task group that every resource task of
every run is started in. A run waits for its resources through counters, not
by leaving a task group of its own, so it can stop waiting for a hook that
does not end (a cut that hangs, a hook that swallows its cancellation): the
hook is *abandoned*, its task stays here, owned by the engine, and the run
ends within its bound. Closing the engine cancels what is left and waits.

The task group sits under a shielded scope, in a service task of its own: the
caller's cancellation reaches runs through :meth:`Run.cancel`, never by
cancelling a cut from outside, and the caller's code inside ``async with``
is not shielded by it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Protocol

import anyio
import anyio.abc
import attrs

from karbor_async._holds import QuietGc
from karbor_async._log import get_logger, ref
from karbor_async._safety import SafetyThaws
from karbor_async._stall import Stall, StallMonitor
from karbor_async._types import Hook, Resource

__all__ = ["STALL_LISTENERS", "AbandonedHook", "EngineTasks", "Owned", "StallAware", "what_runs"]

_log = get_logger(__name__)

_STILL_RUNNING_EVERY = 10.0
"""Closing logs the hooks it is still waiting for at once and this often."""


@attrs.frozen
class AbandonedHook:
    """A hook the engine stopped waiting for; its task is still running, owned by the engine."""

    run_id: str
    resource: Resource
    hook: Hook | None
    """The hook that was running (``None``: the resource's task was between hooks)."""
    aborting: bool
    """Whether it was an aborting call (a thaw)."""
    abandoned_at: float
    """Engine clock (``anyio.current_time()``) when it was abandoned."""

    @property
    def what(self) -> str:
        """``a cut``, ``a thaw``, ``a copy``...: what was left running, for people."""
        return what_runs(self.hook, thaw=self.aborting)

    def describe(self) -> str:
        hook = self.hook.value if self.hook is not None else "no hook"
        return f"{self.what} ({self.resource} {hook}, run {self.run_id})"


def _described(record: AbandonedHook) -> str:
    """``describe()`` as log lines write it (the resource as ``TYPE#ID``)."""
    hook = record.hook.value if record.hook is not None else "no hook"
    return f"{record.what} ({ref(record.resource)} {hook}, run {record.run_id})"


_WHAT = {
    Hook.PREPARE_BEGIN: "a quiesce",
    Hook.PREPARE_FINISH: "a cut",
    Hook.MAIN: "a copy",
    Hook.COMPLETE: "a completion",
}


def what_runs(hook: Hook | None, *, thaw: bool) -> str:
    """What a running hook is doing, in words (``thaw``: it is an aborting call or a thaw)."""
    if hook is None:
        return "engine work"
    if thaw and hook is Hook.PREPARE_FINISH:
        return "a thaw"
    return _WHAT[hook]


class Owned(Protocol):
    """What the engine needs of an abandoned resource task: a way to cancel its hook."""

    def cancel_hook(self) -> None: ...


class StallAware(Protocol):
    """A running run: told of every stall of the loop, to push its deadlines back."""

    def stalled(self, stall: Stall) -> None: ...


async def _reraise(exc: BaseException) -> None:
    raise exc


STALL_LISTENERS: list[Callable[[Stall], None]] = []
"""Process-wide observers of settled stalls (``testing.no_loop_stalls``)."""


class EngineTasks:
    """The engine's task group and the registry of abandoned hooks."""

    def __init__(self, tg: anyio.abc.TaskGroup, *, native: bool = False) -> None:
        self._tg = tg
        self._loop = asyncio.get_running_loop() if native else None
        self._walks: dict[asyncio.Task[None], Owned] = {}
        """Walks running as the loop's own tasks (asyncio), and what cancels each."""
        self.running = 0
        """Resource tasks alive in the engine (of running runs and abandoned)."""
        self._abandoned: dict[Owned, AbandonedHook] = {}
        self._changed: anyio.Event | None = None
        self.closing = False
        """The engine is closing: a cancellation its hooks see now is the engine's."""
        self.runs: set[StallAware] = set()
        """Runs executing now (they hear of stalls)."""
        self.monitor: StallMonitor | None = None
        self.safety: SafetyThaws | None = None
        """The engine's dead-man sentinel (started on the first ``arm_safety_thaw``)."""

    def stalled(self, stall: Stall) -> None:
        """The monitor settled a stall (loop thread): every running run hears of it."""
        for run in list(self.runs):
            run.stalled(stall)
        if stall.culprit != "hook":
            _log.warning("loop_blocked", culprit=stall.culprit, seconds=round(stall.seconds, 3))
        for listener in STALL_LISTENERS[:]:
            listener(stall)

    def start_soon(self, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        self.running += 1
        self._tg.start_soon(fn, *args)

    def start_walk(
        self, owner: Owned, fn: Callable[..., Coroutine[Any, Any, None]], *args: Any
    ) -> None:
        """Start a resource's walk (``_walk.run_node``), owned by the engine like any task.

        On asyncio the walk is a task of the loop's own, held here: anyio's task groups
        spend about 10 us and 2 KB more per task (a task handle with a cancel scope and
        an event of its own, from anyio 4.14), and a run starts one per resource. It
        stays structured: the engine counts it (``running``), closing cancels it through
        the scopes its walk runs in (``owner.cancel_hook``; a walk that enters a scope
        after that finds it cancelled, see ``cancelled_on_entry``) and waits for it, and
        whatever escapes it (an engine bug) fails the engine's task group. Elsewhere
        (trio), it is a task of the engine's task group.
        """
        loop = self._loop
        if loop is None:
            self.start_soon(fn, *args)
            return
        self.running += 1
        task = loop.create_task(fn(*args))
        self._walks[task] = owner
        task.add_done_callback(self._walk_done)

    def _walk_done(self, task: asyncio.Task[None]) -> None:
        del self._walks[task]
        exc = None if task.cancelled() else task.exception()
        if exc is not None:  # (walks catch everything: an engine bug, surfaced loudly)
            self._tg.start_soon(_reraise, exc)

    def cancel_walks(self) -> None:
        """Closing: cancel what every walk runs (its scopes honour their shields)."""
        for owner in list(self._walks.values()):
            owner.cancel_hook()

    @contextlib.asynccontextmanager
    async def quiet_collector(self, cap: float) -> AsyncIterator[None]:
        """Hold the cyclic collector off inside the block, for ``cap`` seconds at most
        (a task of the engine's gives it back then; ``cap <= 0``: left alone). Building a
        run of 100,000 resources otherwise spends about a third of its time in full
        collections (the run itself holds it through ``Holds.hold_run``)."""
        if cap <= 0 or not QuietGc.take(unless_held_for=cap):
            yield
            return
        held = [True]
        scopes: list[anyio.CancelScope] = []

        def give() -> None:
            if held[0]:
                held[0] = False
                QuietGc.give()

        async def cap_it() -> None:
            with anyio.CancelScope() as scope:
                scopes.append(scope)
                await anyio.sleep(cap)
                give()

        self._tg.start_soon(cap_it)
        try:
            yield
        finally:
            give()
            for scope in scopes:
                scope.cancel()

    def cancelled_on_entry(self, scope: anyio.CancelScope) -> None:
        """A walk entered ``scope`` while the engine is closing (the caller checked
        ``closing``): a walk of the loop's own is cancelled at once (the task group's
        cancellation reaches the others)."""
        if self._loop is not None:
            scope.cancel()

    def ended(self, owned: Owned) -> None:
        """A resource task returned (call once per ``start_soon``, from its ``finally``)."""
        self.running -= 1
        record = self._abandoned.pop(owned, None)
        if record is not None:
            _log.info(
                "abandoned_task_ended",
                run_id=record.run_id,
                resource=ref(record.resource),
                hook=record.hook.value if record.hook else None,
            )
        if self._changed is not None:
            self._changed.set()

    def abandon(self, owned: Owned, record: AbandonedHook) -> None:
        self._abandoned[owned] = record

    @property
    def abandoned(self) -> tuple[AbandonedHook, ...]:
        return tuple(self._abandoned.values())

    async def drain(self, grace: float, *, forever: bool) -> tuple[AbandonedHook, ...]:
        """Cancel every abandoned hook and wait for the engine's tasks to end.

        Logs ``abandoned_hook_still_running`` at once and every 10 s while it
        waits. After ``timeout`` it logs an error and, with ``forever``, keeps
        waiting (a hook that swallows every cancellation keeps its task);
        without, it returns what is still running.
        """
        for owned in list(self._abandoned):
            owned.cancel_hook()
        if self.running == 0:
            return ()
        start = anyio.current_time()
        next_log = start
        warned = False
        with anyio.CancelScope(shield=True):
            while self.running:
                now = anyio.current_time()
                if now >= next_log:
                    next_log = now + _STILL_RUNNING_EVERY
                    for rec in self._abandoned.values():
                        _log.warning(
                            "abandoned_hook_still_running",
                            run_id=rec.run_id,
                            resource=ref(rec.resource),
                            hook=rec.hook.value if rec.hook else None,
                            seconds=round(now - rec.abandoned_at, 3),
                        )
                if now - start >= grace:
                    if not forever:
                        return self.abandoned
                    if not warned:
                        warned = True
                        _log.error(
                            "abandoned_hooks_ignore_cancellation",
                            running=self.running,
                            hooks=[_described(r) for r in self._abandoned.values()],
                            waited=round(now - start, 3),
                            note="a hook that swallows cancellation keeps its task until the "
                            "process ends (a plugin bug)",
                        )
                    until = next_log
                else:
                    until = min(next_log, start + grace)
                self._changed = anyio.Event()
                with anyio.CancelScope(deadline=until if math.isfinite(until) else math.inf):
                    await self._changed.wait()
                self._changed = None
        return ()
