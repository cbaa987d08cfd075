"""The four-phase scheduler: Karbor's ordering rules, phase barriers and the guarantees.

One task per resource walks the four hooks. Edges are counters: when a hook
finishes it decrements the counters of the resources waiting on it and sets
their event only when it reaches zero, so a resource with nothing to wait for
never touches an event. A barrier is one ``anyio.Event`` per consistency
group; the tasks it holds are already parked on it and wake together when it
is set.

Each resource task runs in one cancel scope of its own. Aborting a group
cancels the scopes of its resources, except those running a cut (a started
``on_prepare_finish`` is never interrupted by others); every interrupted task
then thaws what it froze in a shielded, bounded scope (DESIGN.md section 4,
guarantee 1). Hook time limits and quiesce budgets are kept by one watcher
task per run instead of a timer per hook. The whole run is shielded from the
caller; the caller's cancellation is turned into :meth:`Run.cancel`, which
knows not to interrupt a running cut.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import heapq
import logging
import math
import threading
import time
import traceback
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
import attrs
import sniffio
import structlog

from karbor_async._graph import ResourceGraph
from karbor_async._hub import EventHub
from karbor_async._params import NodeParams, resolve_secrets
from karbor_async._plan import Plan
from karbor_async._registry import TypeBinding
from karbor_async._scrub import Scrubber
from karbor_async._stall import Stall
from karbor_async._tasks import AbandonedHook, EngineTasks
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
from karbor_async.events import Event, EventKind, Progress
from karbor_async.exceptions import (
    HookError,
    HookTimeoutError,
    MarkError,
    RunCancelledError,
    RunError,
    ThawFailedError,
)
from karbor_async.plugin import Bank, BankSection, HookContext, SecretResolver
from karbor_async.store import GroupOutcome, ResourceOutcome, RunOutcome, Store

__all__ = ["Run", "RunSpec", "RunStatistics"]

_log = structlog.get_logger("karbor_async")

HookFn = Callable[[HookContext], Awaitable[None]]

_THAW_FIRST_DELAY = 0.05
_THAW_MAX_DELAY = 2.0
_HOOK_BITS = {Hook.PREPARE_BEGIN: 1, Hook.PREPARE_FINISH: 2, Hook.MAIN: 4, Hook.COMPLETE: 8}
_MARK_BITS = {"quiesced": 1, "cut": 2, "thawed": 4}


def format_error(exc: BaseException) -> str:
    """The exception chain, outermost first, with the tracebacks."""
    return "".join(traceback.format_exception(exc)).rstrip()


def _fast_clock() -> Callable[[], float]:
    """``anyio.current_time`` without the backend lookup on every call (a hot path)."""
    try:
        return asyncio.get_running_loop().time  # the same clock anyio reads on asyncio
    except RuntimeError:  # not on asyncio (trio): keep anyio's own, mock clocks included
        return anyio.current_time


def _cancel_probe() -> Callable[[], object] | None:
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


def _debug_enabled(log: Any) -> bool:
    """Whether ``log`` passes debug events on (filtering loggers say; others may)."""
    check = getattr(log, "is_enabled_for", None)
    if check is None:
        return True
    try:
        return bool(check(logging.DEBUG))
    except Exception:  # a logger with its own idea of the method: assume it logs
        return True


class _QuietGc:
    """Holds the cyclic garbage collector off while cut waves are dispatched.

    Process-wide and counted (several runs, several threads): the collector is
    disabled by the first holder, if it was enabled, and enabled again by the
    last. A full collection in a large heap takes tens to hundreds of
    milliseconds; inside a cut wave every one of them is added to the skew.
    """

    _lock = threading.Lock()
    _holders = 0
    _resume = False

    @classmethod
    def take(cls) -> None:
        with cls._lock:
            if cls._holders == 0:
                cls._resume = gc.isenabled()
                if cls._resume:
                    gc.disable()
            cls._holders += 1

    @classmethod
    def give(cls) -> None:
        with cls._lock:
            cls._holders -= 1
            if cls._holders == 0 and cls._resume:
                gc.enable()


class _Aborted(Exception):
    """The node's group began aborting before its next hook could start."""


class _Abandoned(BaseException):
    """The run stopped waiting for this node's hook; the hook has now ended (late).

    A BaseException so that no ``except Exception`` on the way turns it into a
    failure: it unwinds the node's task, which then does only its late chores.
    """


_FATAL = (KeyboardInterrupt, SystemExit)
"""Raised by a hook, these abort the whole run and reach the caller after the thaws."""


def _only_cancellation(exc: BaseException) -> bool:
    """Whether ``exc`` is the backend's cancellation (or a group of nothing else)."""
    cancelled = anyio.get_cancelled_exc_class()
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(cancelled)[1] is None
    return isinstance(exc, cancelled)


def _fatal_in(exc: BaseException) -> BaseException | None:
    """The first KeyboardInterrupt or SystemExit in ``exc`` (which may be a group)."""
    if isinstance(exc, _FATAL):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _fatal_in(inner)
            if found is not None:
                return found
    return None


class _Interrupt(enum.Enum):
    """Why the watcher cancelled a node's scope."""

    TIMEOUT = "timeout"
    BUDGET = "budget"


@attrs.define(eq=False, slots=True)
class _Group:
    name: str
    policy: BarrierPolicy
    nodes: list[_Node] = attrs.Factory(list)
    pending_pb: int = 0
    pending_pf: int = 0
    cut_released: anyio.Event = attrs.Factory(anyio.Event)
    """Wakes the resources that cut; set first, so their cuts are dispatched first."""
    cut_released_rest: anyio.Event = attrs.Factory(anyio.Event)
    """Wakes the others (servers waiting to thaw, images, ...) right after."""
    main_released: anyio.Event = attrs.Factory(anyio.Event)
    aborting: AbortReason | None = None
    abort_error: BaseException | None = None
    abandon_at: float | None = None
    """When the group aborted, plus ``timeouts.abort``: hooks still running then are abandoned."""


@attrs.define(eq=False, slots=True)
class _Node:
    """Mutable per-resource state; also the handle a HookContext acts through."""

    run: Run
    resource: Resource
    group: _Group
    binding: TypeBinding
    params: NodeParams
    pb: HookFn | None
    pf: HookFn | None
    main: HookFn | None
    complete: HookFn | None
    timeout: float | None
    budget: float | None
    quiesces: bool
    cuts: bool
    limiters: tuple[anyio.CapacityLimiter, ...] = ()
    parents: Sequence[_Node] = ()
    """Lists while the graph is built, then tuples (smaller; most resources have none)."""
    children: Sequence[_Node] = ()
    wait_pb: int = 0
    wait_pf: int = 0
    wait_cp: int = 0
    ev_pb: anyio.Event | None = None
    ev_pf: anyio.Event | None = None
    ev_cp: anyio.Event | None = None
    signalled_pb: bool = False
    signalled_pf: bool = False
    signalled_cp: bool = False
    child_failed: bool = False
    status: ResourceStatus = ResourceStatus.PENDING
    hooks_done: int = 0
    """Bit set of the hooks that returned (non-aborting calls)."""
    failed_hook: Hook | None = None
    error: BaseException | None = None
    pb_started: bool = False
    pf_started: bool = False
    in_cut: bool = False
    """A non-aborting on_prepare_finish is running: aborts do not interrupt it."""
    thaw_done: bool = False
    frozen: bool = False
    """Quiesced and not yet thawed (its thaw has not returned)."""
    holding: bool = False
    """Its quiesce still holds for cuts: from its quiesce until its thaw *starts* or its
    budget fires, whichever is first (a cut after that is crash-consistent)."""
    thawed_early: bool = False
    crash_consistent: bool = False
    cut_at: float | None = None
    quiesced_at: float | None = None
    thawed_at: float | None = None
    attempt: int = 1
    section: BankSection | None = None
    ticks: int = 0
    current: Hook | None = None
    last_progress: Progress | None = None
    scope: anyio.CancelScope | None = None
    interrupt: _Interrupt | None = None
    interrupt_hook: Hook | None = None
    token: int = 0
    """Identifies the running hook call for the watcher (bumped when it ends)."""
    budget_token: int = 0
    done: bool = False
    progress_stored_at: float = -math.inf
    guards: tuple[_Node, ...] = ()
    """The quiescing resources among this one and its ancestors (precomputed)."""
    hook_scope: anyio.CancelScope | None = None
    """The scope of a running aborting call (a thaw runs shielded from the node's scope)."""
    calling_aborting: bool = False
    cancelled_at: float | None = None
    """When the engine first cancelled this node or its group aborted (engine clock)."""
    abandoned: bool = False
    abandoned_at: float | None = None
    abandoned_hook: Hook | None = None
    late: tuple[Hook, bool, BaseException | None] | None = None
    """What an abandoned call did when it finally ended: (hook, aborting, exception)."""
    thawed_late_at: float | None = None
    accounted: bool = False
    rescue_armed: bool = False
    rescued: bool = False
    """Its thaw ran beside an on_prepare_begin that did not end once cancelled; the
    node thaws again when that call ends (it may have frozen after the rescue)."""
    call_start: float = 0.0
    """When the running hook call started (engine clock): marks may not precede it."""
    call_marks: int = 0
    """Bit set of the marks the running call made (each is allowed once per call)."""
    call_stalled: float = 0.0
    """The run's stall total when the running call started (others' stalls are not its)."""
    blocked_loop_s: float = 0.0
    """How long this resource's hooks held the event loop, in all (stalls blamed on it)."""
    timeout_note: str | None = None
    """Why the watcher's TIMEOUT fires, when it is not the plain limit (a held loop)."""
    errors: list[tuple[Hook, AbortReason | None, BaseException]] = attrs.Factory(list)
    """Every failure of the resource, in order (the first is also ``error``)."""

    def cancel_hook(self) -> None:
        """Cancel whatever hook call runs (the engine closing, or an abandoned hook)."""
        if self.scope is not None:
            self.scope.cancel()
        if self.hook_scope is not None:
            self.hook_scope.cancel()

    # -- the _HookHandle protocol (what HookContext calls) -----------------------------
    def saved_info(self, key: ResourceKey) -> Mapping[str, Any]:
        return self.run.saved_info(key)

    def save_info(self, info: Mapping[str, Any]) -> None:
        self.run.save_info(self.resource.key, info)

    def progress(
        self, fraction: float | None, done: int | None, total: int | None, message: str | None
    ) -> None:
        self.ticks += 1
        if message is not None and self.run.scrubber.active:
            message = self.run.scrubber.text(message)
        progress = self.last_progress = Progress(fraction, done, total, message)
        self.run.progress_tick(self, progress)

    def mark(self, what: str, at: float | None, hook: Hook, aborting: bool) -> None:
        """A hook marked an instant: check it against the rules, then record it."""
        run = self.run
        now = run.now()
        when = now if at is None else at
        rule = self._mark_refusal(what, when, now, hook, aborting)
        if rule is not None:
            if not aborting:
                raise MarkError(
                    f"{self.resource} {hook.value}: mark_{what}("
                    f"{'' if at is None else at!r}) refused: {rule}"
                )
            if what == "thawed" and self.quiesced_at is None:
                return  # a thaw of a resource that never quiesced: nothing to record
            run.mark_refused(self, hook, what, at, rule)
            return
        self.call_marks |= _MARK_BITS[what]
        if what == "cut":
            self.cut_at = when
        elif what == "quiesced":
            self.quiesced_at = when
            if self.budget is not None:
                run.arm_budget(self, when + self.budget)
        else:
            self.thawed_at = when

    def _mark_refusal(
        self, what: str, when: float, now: float, hook: Hook, aborting: bool
    ) -> str | None:
        """Why the rules refuse this mark, or None (docs/plugins.md has the table)."""
        spec = self.binding.spec
        protect = self.run.operation is OperationKind.PROTECT
        start = self.call_start
        if what == "quiesced":
            if not (protect and hook is Hook.PREPARE_BEGIN and spec.quiesces):
                return "mark_quiesced is for protect's on_prepare_begin of a quiescing type"
        elif what == "cut":
            if not (protect and hook is Hook.PREPARE_FINISH and not aborting and spec.snapshots):
                return (
                    "mark_cut is for protect's non-aborting on_prepare_finish of a type that "
                    "snapshots"
                )
        else:
            if not (protect and hook is Hook.PREPARE_FINISH and spec.quiesces):
                return "mark_thawed is for protect's on_prepare_finish of a quiescing type"
            if self.quiesced_at is None:
                return "the resource never quiesced"
            start = max(start, self.quiesced_at)
        if self.call_marks & _MARK_BITS[what]:
            return f"mark_{what} may be called once per call"
        if not (math.isfinite(when) and start <= when <= now):
            return f"at must be between {start!r} and now ({now!r}) on the engine clock"
        return None

    async def report_restored(self, new_id: str) -> None:
        await self.run.report_restored(self, new_id)

    def restored_id(self, key: ResourceKey) -> str | None:
        return self.run.restored.get(key)

    def bank_section(self) -> BankSection:
        section = self.section
        if section is None:
            run = self.run
            section = self.section = run.bank.section(
                run.checkpoint_id,
                self.resource.key,
                read_only=run.operation is OperationKind.RESTORE,
            )
        return section

    def neighbours(self, parents: bool) -> tuple[Resource, ...]:
        return tuple(n.resource for n in (self.parents if parents else self.children))

    def logger(self, hook: Hook) -> Any:
        log = self.run.log.bind(resource=str(self.resource), hook=hook.value)
        scrub = self.run.scrubber
        return _ScrubbingLogger(log, scrub) if scrub.active else log

    @property
    def hooks_run(self) -> tuple[Hook, ...]:
        return tuple(h for h, bit in _HOOK_BITS.items() if self.hooks_done & bit)


class _ScrubbingLogger:
    """``ctx.log`` once the run resolved secrets: fields and messages are scrubbed first."""

    __slots__ = ("_log", "_scrub")

    def __init__(self, log: Any, scrub: Scrubber) -> None:
        self._log = log
        self._scrub = scrub

    def bind(self, **kw: Any) -> _ScrubbingLogger:
        return _ScrubbingLogger(self._log.bind(**self._scrub.data(kw)), self._scrub)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._log, name)
        if not callable(method):
            return method
        scrub = self._scrub

        def call(*args: Any, **kw: Any) -> Any:
            return method(*scrub.data(list(args)), **scrub.data(kw))

        return call


class _Rescue:
    """The engine's handle on a rescue thaw's task (see ``Run._rescue_thaw``)."""

    __slots__ = ("node", "scope")

    def __init__(self, node: _Node) -> None:
        self.node = node
        self.scope: anyio.CancelScope | None = None

    def cancel_hook(self) -> None:
        if self.scope is not None:
            self.scope.cancel()


class _Timers:
    """Hook deadlines and quiesce budgets for one run, watched by one task.

    Hook deadlines go to a FIFO per time limit: calls with the same limit
    start in time order, so each FIFO is sorted and arming costs one append.
    Budgets (few: one per quiescing resource) go to a heap. An entry whose
    node has moved on (its token changed) is dropped when it reaches the head.
    The watcher also runs the run's own chores: a callback at its next wake-up
    (``soon``, which runs after every task woken before it), alarms (the
    collector hold's cap, abandonment deadlines), and the abandonment of the
    nodes put ``due`` (an awaited step: they get a moment to end first).
    """

    def __init__(
        self,
        fire: Callable[[_Node, _Interrupt], None],
        abandon: Callable[[list[_Node]], Awaitable[None]],
    ) -> None:
        self._fire = fire
        self._abandon = abandon
        self.now: Callable[[], float] = anyio.current_time
        self._fifos: dict[float, deque[tuple[float, _Node, int]]] = {}
        self._budgets: list[tuple[float, int, _Node, int]] = []
        self._seq = 0
        self._target = math.inf
        self._wake: anyio.Event | None = None
        self._soon: list[Callable[[], None]] = []
        self._alarms: list[tuple[float, int, Callable[[], None]]] = []
        self.due: list[_Node] = []
        """Nodes whose hooks the run stops waiting for at the watcher's next step."""
        self.stalled = 0.0
        """Seconds the loop was stalled during the run: hook limits run on ``now - stalled``
        (a stall is not counted against the hooks that only waited behind it)."""
        self.catch_up: Callable[[], None] | None = None
        """Settles a stall the loop just came out of, before any deadline is looked at."""

    def poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def soon(self, call: Callable[[], None]) -> None:
        """Run ``call`` at the watcher's next step: after every task already woken."""
        self._soon.append(call)
        if self._wake is not None:
            self._wake.set()

    def alarm(self, deadline: float, call: Callable[[], None]) -> None:
        """Run ``call`` once at ``deadline``."""
        self._seq += 1
        heapq.heappush(self._alarms, (deadline, self._seq, call))
        if deadline < self._target and self._wake is not None:
            self._wake.set()

    def arm_hook(self, n: _Node, limit: float, now: float) -> None:
        deadline = now - self.stalled + limit  # hook time
        fifo = self._fifos.get(limit)
        if fifo is None:
            fifo = self._fifos[limit] = deque()
        while fifo and fifo[0][1].token != fifo[0][2]:
            fifo.popleft()  # that call has ended: do not keep it until its deadline
        fifo.append((deadline, n, n.token))
        if deadline + self.stalled < self._target and self._wake is not None:
            self._wake.set()

    def arm_budget(self, n: _Node, deadline: float) -> None:
        n.budget_token += 1
        self._seq += 1
        heapq.heappush(self._budgets, (deadline, self._seq, n, n.budget_token))
        if deadline < self._target and self._wake is not None:
            self._wake.set()

    async def watch(self) -> None:
        while True:
            if self.catch_up is not None:
                self.catch_up()
            if self._soon:
                calls, self._soon = self._soon, []
                for call in calls:
                    call()
            now = self.now()
            earliest = math.inf
            alarms = self._alarms
            while alarms:
                when, _, call = alarms[0]
                if when > now:
                    earliest = when
                    break
                heapq.heappop(alarms)
                call()
            hook_now = now - self.stalled
            for fifo in self._fifos.values():
                while fifo:
                    deadline, n, token = fifo[0]
                    if token != n.token:
                        fifo.popleft()  # that call already ended
                    elif deadline <= hook_now:
                        fifo.popleft()
                        self._fire(n, _Interrupt.TIMEOUT)
                    else:
                        earliest = min(earliest, deadline + self.stalled)
                        break
            budgets = self._budgets
            while budgets:
                deadline, _, n, token = budgets[0]
                if token != n.budget_token:
                    heapq.heappop(budgets)
                elif deadline <= now:
                    heapq.heappop(budgets)
                    self._fire(n, _Interrupt.BUDGET)
                else:
                    earliest = min(earliest, deadline)
                    break
            if self.due:
                nodes, self.due = self.due, []
                await self._abandon(nodes)
                continue  # time passed: look at every deadline again
            if alarms:  # firing a deadline above may have set an alarm
                earliest = min(earliest, alarms[0][0])
            self._target = earliest
            self._wake = anyio.Event()
            with anyio.move_on_at(earliest):
                await self._wake.wait()


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
    frozen: int
    """Resources quiesced and not yet thawed."""
    skew: float | None
    """Spread of the cuts so far, over all groups."""
    barriers_released: tuple[str, ...]
    bytes_done: int
    bytes_total: int
    active: tuple[tuple[Resource, Hook, Progress | None], ...]
    """Up to ``limit`` resources with a hook running, and their last progress."""


@attrs.frozen
class RunSpec:
    """Everything a run needs, validated by the engine before the run exists."""

    run_id: str
    checkpoint_id: str
    operation: OperationKind
    plan: Plan
    graph: ResourceGraph
    group_of: tuple[str, ...]
    groups: Mapping[str, BarrierPolicy]
    bindings: tuple[TypeBinding, ...]
    params: tuple[NodeParams, ...]
    saved: Mapping[ResourceKey, Mapping[str, Any]]
    restored: Mapping[ResourceKey, str]
    attempts: Mapping[ResourceKey, int] = attrs.Factory(dict)
    done_hooks: Mapping[ResourceKey, frozenset[Hook]] = attrs.Factory(dict)
    """Hooks whose finish was committed by an earlier attempt (recovery skips them)."""
    first_seq: int = 0


class Run:
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
        self.spec = spec
        self._tasks = tasks
        self.run_id = spec.run_id
        self.checkpoint_id = spec.checkpoint_id
        self.operation = spec.operation
        self._store = store
        self.bank = bank
        self._secrets = secrets
        self._record = record_events
        self._quiet_gc = quiet_gc
        self._gc_holds = 0
        self._gc_for_frozen = False
        self._gc_capped = False
        self._gc_cap_armed = False
        self._frozen_now = 0
        self._writes_held = False
        self._watching = False
        """The run's watcher task is up (it keeps the collector hold's chores)."""
        self._after_finish = after_finish
        self._hub = hub
        self._log_events = False
        self._seq = spec.first_seq
        self._saved: dict[ResourceKey, dict[str, Any]] = {k: dict(v) for k, v in spec.saved.items()}
        self._own_saved: dict[ResourceKey, dict[str, Any]] = {}
        self.restored: dict[ResourceKey, str] = dict(spec.restored)
        self._abort_reason: AbortReason | None = None
        self._started = False
        self._finished = False
        self._closed = False
        """RUN_FINISHED was emitted: the run's log is closed (late hooks emit nothing)."""
        self._outcome_built = False
        self._outcome_stored: anyio.Event | None = None
        self._fatal: BaseException | None = None
        """A KeyboardInterrupt or SystemExit a hook raised: re-raised once all is thawed."""
        self._pending = 0
        self._settled: anyio.Event | None = None
        self._caller_probe: Callable[[], object] | None = None
        """Asks whether the caller's task was cancelled (checked before each hook starts)."""
        self._caller_cancelled = False
        self._t0: float | None = None
        self._timers = _Timers(self._fire, self._abandon_due)
        self._monitor = tasks.monitor
        self._scrub = Scrubber()
        """The secret values this run resolved, kept out of all it writes."""
        self.now: Callable[[], float] = anyio.current_time
        """The engine clock: ``anyio.current_time``, read straight from the loop on asyncio."""
        self.log = _log.bind(run_id=spec.run_id, operation=spec.operation.value)
        self.groups: dict[str, _Group] = {
            name: _Group(name, policy) for name, policy in spec.groups.items()
        }
        self.nodes: list[_Node] = self._build_nodes()

    # -- construction ------------------------------------------------------------------
    def _build_nodes(self) -> list[_Node]:
        spec = self.spec
        plan = spec.plan
        op = spec.operation
        limiters: dict[str, anyio.CapacityLimiter] = {
            name: anyio.CapacityLimiter(n) for name, n in sorted(plan.limits.items())
        }
        nodes: list[_Node] = []
        ops_cache: dict[str, tuple[HookFn | None, ...]] = {}
        for i, res in enumerate(spec.graph.resources):
            binding = spec.bindings[i]
            hooks = ops_cache.get(res.type)
            if hooks is None:
                opobj = binding.plugin.get_operation(op, res.type)
                hooks = tuple(
                    getattr(opobj, h.value, None) if opobj is not None else None for h in Hook
                )
                ops_cache[res.type] = hooks
            pb, pf, main, complete = hooks
            done = spec.done_hooks.get(res.key, frozenset())
            if done:
                # Recovery: hooks whose finish was committed are not run again.
                pb = None if Hook.PREPARE_BEGIN in done else pb
                pf = None if Hook.PREPARE_FINISH in done else pf
                main = None if Hook.MAIN in done else main
                complete = None if Hook.COMPLETE in done else complete
            group = self.groups[spec.group_of[i]]
            node_limits = tuple(
                limiters[name]
                for name in sorted({binding.plugin.plugin_name(), res.type})
                if name in limiters
            )
            node = _Node(
                run=self,
                resource=res,
                group=group,
                binding=binding,
                params=spec.params[i],
                pb=pb,
                pf=pf,
                main=main,
                complete=complete,
                timeout=self._hook_timeout(binding, res),
                budget=self._budget(res),
                quiesces=op is OperationKind.PROTECT and binding.spec.quiesces and pb is not None,
                cuts=op is OperationKind.PROTECT and binding.spec.snapshots,
                limiters=node_limits,
                attempt=spec.attempts.get(res.key, 1),
            )
            nodes.append(node)
            group.nodes.append(node)
        parents: list[list[_Node]] = [[] for _ in nodes]
        children: list[list[_Node]] = [[] for _ in nodes]
        for p, c in spec.graph.edges:
            children[p].append(nodes[c])
            parents[c].append(nodes[p])
        for node, ps, cs in zip(nodes, parents, children, strict=True):
            node.parents = tuple(ps)
            node.children = tuple(cs)
        if op is OperationKind.PROTECT:
            for i in spec.graph.topological_order():  # parents before children
                node = nodes[i]
                own = (node,) if node.quiesces else ()
                if len(node.parents) == 1:
                    node.guards = node.parents[0].guards + own
                elif node.parents:
                    merged = [g for p in node.parents for g in p.guards]
                    node.guards = tuple(dict.fromkeys(merged)) + own
                else:
                    node.guards = own
        for node in nodes:
            node.wait_pb = len(node.parents)
            node.wait_pf = len(node.children)
            node.wait_cp = len(node.children)
        for group in self.groups.values():
            group.pending_pb = group.pending_pf = len(group.nodes)
        return nodes

    def _hook_timeout(self, binding: TypeBinding, res: Resource) -> float | None:
        t = self.spec.plan.timeouts
        if res.type in t.per_type:
            return t.per_type[res.type]
        name = binding.plugin.plugin_name()
        if name in t.per_plugin:
            return t.per_plugin[name]
        if binding.plugin.hook_timeout is not None:
            return binding.plugin.hook_timeout
        return t.hook

    def _budget(self, res: Resource) -> float | None:
        t = self.spec.plan.timeouts
        per = t.quiesce_budget_per_type
        return per.get(f"{res.type}#{res.id}", per.get(res.type, t.quiesce_budget))

    # -- events --------------------------------------------------------------------------
    def _emit(
        self,
        kind: EventKind,
        node: _Node | None,
        hook: Hook | None,
        _mono: float | None = None,
        **data: Any,
    ) -> None:
        """Record a lifecycle event (``_mono``: its engine-clock time, if already read)."""
        if not self._record or self._closed:
            return
        if self._scrub.active:
            data = self._scrub.data(data)
        self._seq += 1
        if node is not None:
            resource: ResourceKey | None = node.resource.key
            group = node.group.name
            attempt = node.attempt
        else:
            resource, group, attempt = None, data.pop("group", None), 1
        # Positional, in Event's field order: a third cheaper than keywords (a hot path).
        event = Event(
            self.run_id,
            self._seq,
            kind,
            self.operation,
            time.time(),
            self.now() if _mono is None else _mono,
            resource,
            hook,
            group,
            attempt,
            None,
            0,
            data,
        )
        self._store.append(event)
        if self._hub is not None:
            self._hub.lifecycle(event)
        if self._log_events:
            self.log.debug(
                kind.value,
                seq=event.seq,
                resource=f"{event.resource[0]}#{event.resource[1]}" if event.resource else None,
                hook=hook.value if hook else None,
                group=event.group,
                **data,
            )

    _PROGRESS_STORE_INTERVAL = 0.1
    """Progress is stored coalesced: at most ten ticks a second per resource."""

    def progress_tick(self, n: _Node, progress: Progress) -> None:
        """A plugin reported progress: live to subscribers, stored at most 10 times a second."""
        if not self._record or n.abandoned:
            return
        hub = self._hub
        live = hub is not None and hub.active
        now = self.now()
        due = now - n.progress_stored_at >= self._PROGRESS_STORE_INTERVAL
        if not live and not due:
            return
        event = Event(
            run_id=self.run_id,
            seq=self._seq,
            kind=EventKind.PROGRESS,
            operation=self.operation,
            wall=time.time(),
            mono=now,
            resource=n.resource.key,
            hook=n.current,
            group=n.group.name,
            attempt=n.attempt,
            progress=progress,
            tick=n.ticks,
        )
        if live:
            assert hub is not None
            hub.tick(event)
        if due:
            n.progress_stored_at = now
            self._store.append(event)

    @property
    def scrubber(self) -> Scrubber:
        return self._scrub

    # -- saved info and restore mapping -----------------------------------------------------
    def saved_info(self, key: ResourceKey) -> Mapping[str, Any]:
        own = self._own_saved.get(key)
        base = self._saved.get(key, {})
        return {**base, **own} if own else base

    def save_info(self, key: ResourceKey, info: Mapping[str, Any]) -> None:
        if self._scrub.active:
            info = self._scrub.data(info)
        if self.operation is OperationKind.PROTECT:
            merged = self._saved.setdefault(key, {})
            merged.update(info)
            self._store.save_info(self.checkpoint_id, key, merged)
        else:
            merged = self._own_saved.setdefault(key, {})
            merged.update(info)
            self._store.save_info(self.run_id, key, merged)

    async def report_restored(self, node: _Node, new_id: str) -> None:
        key = node.resource.key
        self.restored[key] = new_id
        self._store.record_restored(self.run_id, key, new_id)
        self._emit(EventKind.RESTORED, node, None, new_id=new_id)
        await self._store.commit()

    # -- observing -------------------------------------------------------------------------
    def statistics(self, *, limit: int = 20) -> RunStatistics:
        """A frozen snapshot of where the run stands (for progress displays)."""
        by_status: dict[ResourceStatus, int] = {}
        running: dict[Hook, int] = {}
        active: list[tuple[Resource, Hook, Progress | None]] = []
        hooks = cuts = frozen = done = total = 0
        first: float | None = None
        last: float | None = None
        for n in self.nodes:
            by_status[n.status] = by_status.get(n.status, 0) + 1
            hooks += n.hooks_done.bit_count()
            if n.current is not None:
                running[n.current] = running.get(n.current, 0) + 1
                if len(active) < limit:
                    active.append((n.resource, n.current, n.last_progress))
            if n.cut_at is not None:
                cuts += 1
                first = n.cut_at if first is None else min(first, n.cut_at)
                last = n.cut_at if last is None else max(last, n.cut_at)
            frozen += n.frozen
            p = n.last_progress
            if p is not None and p.total:
                total += p.total
                done += p.done or 0
        released = tuple(
            f"{g.name}:{b}"
            for g in self.groups.values()
            for b, ev in (("cut", g.cut_released), ("main", g.main_released))
            if ev.is_set()
        )
        return RunStatistics(
            run_id=self.run_id,
            operation=self.operation,
            elapsed=self.now() - self._t0 if self._t0 is not None else 0.0,
            resources=len(self.nodes),
            by_status=by_status,
            running=running,
            hooks_finished=hooks,
            cuts=cuts,
            frozen=frozen,
            skew=(last - first) if first is not None and last is not None else None,
            barriers_released=released,
            bytes_done=done,
            bytes_total=total,
            active=tuple(active),
        )

    # -- aborting ------------------------------------------------------------------------
    def cancel(self) -> None:
        """Cancel the run from another task: frozen resources are thawed, the run ends cancelled.

        Hooks that are running see an ordinary anyio cancellation, except an
        ``on_prepare_finish`` already started, which is allowed to finish. A hook
        still running ``timeouts.abort`` later is abandoned: :meth:`execute`
        returns without it. On a finished run this does nothing.
        """
        if self._closed:
            return
        self._abort_all(AbortReason.CANCELLED)

    def _on_caller_cancel(self) -> None:
        """The caller's scope was cancelled: the same as :meth:`cancel` at that instant."""
        if self._caller_cancelled:
            return
        self._caller_cancelled = True
        self._caller_probe = None
        self.log.warning("run_cancelled_by_caller")
        self._abort_all(AbortReason.CANCELLED)

    def _check_caller(self) -> None:
        """Before a hook starts: has the caller been cancelled since the last look?

        (Inlined on the per-hook path in ``_call``.)"""
        probe = self._caller_probe
        if probe is not None and probe():
            self._on_caller_cancel()

    def abandon(self) -> None:
        """Stop waiting at once for every hook still running (a second Ctrl-C).

        Cancels the run first if it was not. What is still running is recorded
        ``abandoned`` (its task stays owned by the engine), a thaw that had not
        finished makes its resource ``thaw_failed``, and :meth:`execute` returns.
        """
        if self._closed or not self._started:
            return
        self._abort_all(AbortReason.CANCELLED)
        self._timers.due.extend(n for n in self.nodes if not n.done)
        self._timers.poke()

    def _abort_all(self, reason: AbortReason) -> None:
        if self._abort_reason is None:
            self._abort_reason = reason
        for group in self.groups.values():
            self._abort_group(group, reason, None)

    def _abort_group(self, group: _Group, reason: AbortReason, error: BaseException | None) -> None:
        if group.aborting is not None:
            return
        group.aborting = reason
        group.abort_error = error
        now = self.now()
        group.abandon_at = now + self.spec.plan.timeouts.abort
        self.log.warning("group_aborting", group=group.name, reason=reason.value)
        self._emit(EventKind.GROUP_ABORTING, None, None, group=group.name, reason=reason.value)
        for n in group.nodes:
            if n.done:
                continue
            if n.cancelled_at is None:
                n.cancelled_at = now
            if n.scope is None or n.in_cut:
                continue  # not started, or running a cut that must finish
            n.scope.cancel()
            self._arm_rescue(n, now)
        # (b): what of the group still runs timeouts.abort from now is abandoned.
        self._timers.alarm(group.abandon_at, lambda: self._due_all(group.nodes))

    def _aborting(self, n: _Node) -> bool:
        return n.group.aborting is not None or self._abort_reason is not None

    def arm_budget(self, n: _Node, deadline: float) -> None:
        self._timers.arm_budget(n, deadline)

    def _fire(self, n: _Node, kind: _Interrupt) -> None:
        """The watcher saw a deadline pass: interrupt the node if it is still there."""
        if n.done or n.scope is None or n.interrupt is not None:
            return
        if kind is _Interrupt.TIMEOUT:
            if n.current is None:
                return
            n.interrupt_hook = n.current
        elif not n.frozen or n.pf_started:
            return
        n.interrupt = kind
        n.scope.cancel()
        if kind is _Interrupt.BUDGET:
            # Before its thaw starts: the quiesce no longer holds for any cut from now on,
            # and without the fallback no cut of the group starts at all.
            n.holding = False
            self.log.warning(
                "quiesce_budget_exceeded",
                resource=str(n.resource),
                budget=n.budget,
                group=n.group.name,
            )
            if not self.spec.plan.crash_consistent_fallback:
                self._abort_group(n.group, AbortReason.BUDGET, None)
        # (c): a call the engine cancelled that has not ended timeouts.abort later is abandoned.
        now = self.now()
        if n.cancelled_at is None:
            n.cancelled_at = now
        token = n.token
        self._timers.alarm(now + self.spec.plan.timeouts.abort, lambda: self._due_call(n, token))
        self._arm_rescue(n, now)
        if kind is _Interrupt.TIMEOUT:
            # The hook failed now, whenever it ends: a prepare hook aborts its group at once.
            hook = n.interrupt_hook
            assert hook is not None
            note, n.timeout_note = n.timeout_note, None
            err = HookTimeoutError(n.resource, hook, note or f"timed out after {n.timeout} s")
            self._emit(EventKind.FAILED, n, hook, error=str(err), timeout=True)
            self._fail(n, hook, err)
            if hook in (Hook.PREPARE_BEGIN, Hook.PREPARE_FINISH):
                self._abort_group(n.group, AbortReason.FAILURE, err)

    # -- a quiesce that does not end: its thaw beside it ------------------------------------
    def _arm_rescue(self, n: _Node, now: float) -> None:
        """A quiescing on_prepare_begin was cancelled: if it has not ended half the abort
        deadline later, its thaw is called beside it, so the resource is not left frozen
        while the engine waits (the thaw must be safe on a resource never frozen)."""
        if n.rescue_armed or not n.quiesces or n.current is not Hook.PREPARE_BEGIN:
            return
        n.rescue_armed = True
        token = n.token

        def due() -> None:
            if n.token == token and not n.done and not n.thaw_done and n.pf is not None:
                self._tasks.start_soon(self._rescue_thaw, _Rescue(n))

        self._timers.alarm(now + self.spec.plan.timeouts.abort / 2, due)

    async def _rescue_thaw(self, rescue: _Rescue) -> None:
        n = rescue.node
        g = n.group
        deadline = g.abandon_at if g.abandon_at is not None else math.inf
        self.log.warning(
            "rescue_thaw",
            resource=str(n.resource),
            note="on_prepare_begin did not end once cancelled: its thaw is called beside it",
        )
        try:
            with anyio.CancelScope(shield=True), anyio.CancelScope(deadline=deadline) as scope:
                rescue.scope = scope
                reason = await self._thaw_beside(n, scope, "rescue_thaw_failed")
                n.thaw_done = n.rescued = True
                if n.thawed_at is None:
                    n.thawed_at = self.now()
                # (rescue: recovery still thaws it, the quiesce may freeze after this)
                self._emit(
                    EventKind.THAWED, n, None, at=n.thawed_at, reason=reason.value, rescue=True
                )
        finally:
            self._tasks.ended(rescue)

    async def _thaw_beside(self, n: _Node, scope: anyio.CancelScope, failed: str) -> AbortReason:
        """Call ``n``'s aborting on_prepare_finish outside its walk (beside a quiesce that
        does not end, or late, after it was abandoned) until one succeeds; retried with
        backoff until ``scope`` ends it. Returns the reason the calls were given."""
        assert n.pf is not None
        g = n.group
        reason = g.aborting or self._abort_reason or AbortReason.FAILURE
        delay = _THAW_FIRST_DELAY
        while True:
            try:
                params = n.params.values
                if n.params.secrets:
                    params = await resolve_secrets(n.params, self._secrets)
                ctx = HookContext(n.resource, Hook.PREPARE_FINISH, params, n, reason, g.abort_error)
                await n.pf(ctx)
            except BaseException as exc:  # nothing may escape a task the engine owns
                if _only_cancellation(exc) and scope.cancel_called:
                    raise
                self.log.warning(
                    failed, resource=str(n.resource), error=self._scrub.text(repr(exc))
                )
            else:
                return reason
            await anyio.sleep(delay)
            delay = min(delay * 2, _THAW_MAX_DELAY)

    # -- abandoning what does not end ----------------------------------------------------
    def mark_refused(self, n: _Node, hook: Hook, what: str, at: float | None, rule: str) -> None:
        """An aborting call's mark broke a rule: warn; the engine's default instant stands."""
        self.log.warning(
            "mark_refused", resource=str(n.resource), hook=hook.value, mark=what, rule=rule
        )
        self._emit(EventKind.MARK_REFUSED, n, hook, mark=what, at=at, rule=rule)

    def _due_all(self, nodes: Sequence[_Node]) -> None:
        due = self._timers.due
        due.extend(n for n in nodes if not n.done and not n.abandoned)

    def _due_call(self, n: _Node, token: int) -> None:
        if n.token == token and not n.done and not n.abandoned:
            self._timers.due.append(n)  # no call of it has ended since it was cancelled

    async def _abandon_due(self, nodes: list[_Node]) -> None:
        """Abandon the nodes still running, after giving those just cancelled a moment."""
        live = [n for n in nodes if not n.done and not n.abandoned]
        if not live:
            return
        # Deadlines that fall together (a thaw's own and the group's) let the hook end first.
        await anyio.lowlevel.checkpoint()
        await anyio.lowlevel.checkpoint()
        for n in live:
            if not n.done and not n.abandoned:
                self._abandon(n)

    def _abandon(self, n: _Node) -> None:
        """Stop waiting for ``n``: record it, release what waits on it, count it done.

        Its task stays in the engine's task group; when its hook ends it does only
        its late chores (:meth:`_after_abandoned`).
        """
        now = self.now()
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
        self._emit(
            EventKind.HOOK_ABANDONED,
            n,
            hook,
            seconds=round(since, 6),
            aborting=n.calling_aborting,
        )
        self.log.warning(
            "hook_abandoned",
            resource=str(n.resource),
            hook=hook.value if hook is not None else None,
            seconds=round(since, 6),
        )
        if n.quiesces and n.pb_started and not n.thaw_done:
            # Its thaw is what hangs, or could not be called: never pretend.
            self._thaw_failed(n, cause)
        else:
            self._record_error(
                n,
                hook or Hook.PREPARE_FINISH,
                n.group.aborting if n.calling_aborting else None,
                cause,
            )
            n.status = ResourceStatus.ABANDONED
        self._tasks.abandon(
            n,
            AbandonedHook(self.run_id, n.resource, hook, n.calling_aborting, now),
        )
        self._settle(n)
        self._account(n)

    def _account(self, n: _Node) -> None:
        """``n`` will not hold the run any longer (it ended, or was abandoned)."""
        if n.accounted:
            return
        n.accounted = True
        self._pending -= 1
        if self._pending == 0 and self._settled is not None:
            self._settled.set()

    async def _after_abandoned(self, n: _Node) -> None:
        """An abandoned hook ended: log it; thaw late what may still be frozen."""
        hook, aborting, exc = n.late or (None, False, None)
        late = self.now() - (n.abandoned_at or self.now())
        self.log.warning(
            "abandoned_hook_ended",
            resource=str(n.resource),
            hook=hook.value if hook is not None else None,
            aborting=aborting,
            seconds_after_abandoned=round(late, 6),
            error=self._scrub.text(repr(exc)) if exc is not None else None,
        )
        if not (n.quiesces and n.pb_started) or n.pf is None:
            return
        if hook is Hook.PREPARE_BEGIN:
            await self._late_thaw(n)  # it may have frozen after a rescue thaw, or not thawed
        elif not n.thaw_done:
            if hook is Hook.PREPARE_FINISH and exc is None:
                await self._thawed_late(n)  # the thaw that was abandoned did thaw, late
            else:
                await self._late_thaw(n)

    async def _late_thaw(self, n: _Node) -> None:
        """Thaw a resource whose quiesce or thaw ended after it was abandoned (bounded by
        the abort deadline; run from the node's own task, which closing cancels)."""
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self.spec.plan.timeouts.abort) as scope:
                n.hook_scope = scope
                try:
                    await self._thaw_beside(n, scope, "late_thaw_failed")
                finally:
                    n.hook_scope = None
                await self._thawed_late(n)

    async def _thawed_late(self, n: _Node) -> None:
        """Record a thaw that succeeded after its resource was reported ``thaw_failed``."""
        n.thaw_done = True
        at = n.thawed_late_at = self.now()
        self.log.warning("thawed_late", resource=str(n.resource), at=at)
        if not self._outcome_built:
            return  # the outcome, still to be built, carries it
        stored = self._outcome_stored
        with anyio.CancelScope(shield=True):
            if stored is not None:
                await stored.wait()
            try:
                await self._store.record_late_thaw(self.run_id, n.resource.key, at)
            except Exception as exc:  # a closed store, a lost lease: say so, do not crash
                self.log.warning(
                    "late_thaw_not_recorded", resource=str(n.resource), error=repr(exc)
                )

    # -- running -------------------------------------------------------------------------
    async def execute(self) -> RunOutcome:
        """Run every hook under the ordering rules; return the outcome or raise RunError.

        The run is shielded from the caller's cancellation: a guard task turns it
        into :meth:`cancel`, the run thaws and records itself ``cancelled``, and
        then the caller's cancellation propagates as usual.
        """
        if self._started:
            raise RuntimeError("a Run executes once; build a new one with the engine")
        self._started = True
        result: list[tuple[RunOutcome, list[Exception]]] = []

        async def guard() -> None:
            self._caller_probe = _cancel_probe()
            try:
                await anyio.sleep_forever()
            except anyio.get_cancelled_exc_class():
                if not self._finished:
                    self._on_caller_cancel()
                raise

        async with anyio.create_task_group() as guard_tg:
            guard_tg.start_soon(guard)
            with anyio.CancelScope(shield=True):
                result.append(await self._execute_shielded())
            self._finished = True
            guard_tg.cancel_scope.cancel()
        if self._caller_cancelled:
            # Everything is thawed and recorded: now let the caller's cancellation through.
            await anyio.lowlevel.checkpoint()
        outcome, errors = result[0]
        if outcome.status is RunStatus.SUCCEEDED:
            return outcome
        word = "was cancelled" if outcome.status is RunStatus.CANCELLED else "failed"
        error = RunError(
            f"{self.operation.value} run {self.run_id} {word}: {outcome.error}", errors, outcome
        )
        fatal = self._fatal
        if fatal is not None:
            # A hook's KeyboardInterrupt/SystemExit reaches the caller, everything thawed.
            fatal.__cause__ = error
            raise fatal
        raise error

    async def _execute_shielded(self) -> tuple[RunOutcome, list[Exception]]:
        self.now = self._timers.now = _fast_clock()
        # Per-event logs only for an application that configured structlog (an
        # unconfigured one would print every hook transition) and lets debug
        # through: building each call costs microseconds even when filtered.
        self._log_events = structlog.is_configured() and _debug_enabled(self.log)
        started_wall = time.time()
        started = self._t0 = self.now()
        self.log.info("run_started", resources=len(self.nodes), groups=len(self.groups))
        self._emit(EventKind.RUN_STARTED, None, None, resources=len(self.nodes))
        await self._drive(self._run_node, self.nodes, self.spec.plan.timeouts.run)
        return await self._finish(started_wall, started)

    async def _drive(
        self,
        walk: Callable[[_Node], Coroutine[Any, Any, None]],
        nodes: Sequence[_Node],
        run_limit: float | None,
    ) -> None:
        """Start ``walk`` for each node in the engine's task group and wait until each
        one ended or was abandoned; the watcher keeps deadlines meanwhile."""
        monitor = self._tasks.monitor
        self._timers.catch_up = monitor.catch_up if monitor is not None else None
        self._tasks.runs.add(self)
        try:
            async with anyio.create_task_group() as tg:
                self._watching = True
                tg.start_soon(self._timers.watch)
                if run_limit is not None:
                    tg.start_soon(self._watchdog, run_limit)
                self._pending = len(nodes)
                if nodes:
                    self._settled = anyio.Event()
                    spawn = self._tasks.start_soon
                    for node in nodes:
                        spawn(walk, node)
                    await self._settled.wait()
                tg.cancel_scope.cancel()  # stops the watcher and the watchdog
        finally:
            self._tasks.runs.discard(self)
            self._watching = False
            self._gc_give_all()  # whatever is still held (a thaw that failed, a cancelled task)
            self._hold_writes(False)

    async def abort_after_crash(self, maybe_frozen: list[ResourceKey]) -> RunOutcome:
        """Recovery of a run whose cuts were not all committed: thaw, then end it failed.

        Each resource that may still be frozen gets its ``on_prepare_finish`` with
        ``ctx.aborting`` set to ``recovery`` (retried like any thaw); nothing else runs.
        """
        if self._started:
            raise RuntimeError("a Run executes once; build a new one with the engine")
        self._started = True
        self.now = self._timers.now = _fast_clock()
        started_wall = time.time()
        started = self._t0 = self.now()
        self._abort_reason = AbortReason.RECOVERY
        for group in self.groups.values():
            self._abort_group(group, AbortReason.RECOVERY, None)
        by_key = {n.resource.key: n for n in self.nodes}
        thaws: list[_Node] = []
        for key in maybe_frozen:
            n = by_key.get(key)
            if n is None or n.pf is None:
                continue
            n.pb_started = True
            n.quiesces = n.binding.spec.quiesces
            self._set_frozen(n, n.quiesces)
            thaws.append(n)
        with anyio.CancelScope(shield=True):
            await self._drive(self._recovery_thaw, thaws, None)
            outcome, _errors = await self._finish(started_wall, started)
        self._finished = True
        return outcome

    async def _recovery_thaw(self, n: _Node) -> None:
        try:
            await self._thaw(n, AbortReason.RECOVERY, None)
        except _Abandoned:
            await self._after_abandoned(n)
        finally:
            self._node_ended(n)

    async def _watchdog(self, limit: float) -> None:
        await anyio.sleep(limit)
        self.log.warning("run_timeout", limit=limit)
        self._abort_all(AbortReason.TIMEOUT)

    async def _run_node(self, n: _Node) -> None:
        """Walk one resource's hooks; a cancelled scope hands over to _interrupted.

        The walk itself runs inline (no coroutine of its own: one less per
        resource); what ``_interrupted`` hands back runs as the next stage. The
        task lives in the engine's task group: nothing may escape it.
        """
        stage: Callable[[_Node], Awaitable[None]] | None = None
        try:
            while True:
                finished = False
                try:
                    with anyio.CancelScope() as scope:
                        n.scope = scope
                        if stage is None:
                            if await self._prepare(n):
                                await self._main_and_complete(n)
                        else:
                            await stage(n)
                        finished = True
                except _Aborted:
                    n.scope = None
                    await self._stop_aborted(n)
                    return
                n.scope = None
                if finished:
                    return
                stage = await self._interrupted(n)
                if stage is None:
                    return
        except _Abandoned:
            await self._after_abandoned(n)
        except Exception as exc:  # an engine bug: it must not take the engine's tasks down
            self.log.exception("engine_error", resource=str(n.resource))
            if not n.abandoned and n.error is None:
                n.error = exc
                n.status = ResourceStatus.FAILED
        finally:
            self._node_ended(n)

    def _node_ended(self, n: _Node) -> None:
        n.done = True
        if not n.abandoned:
            self._settle(n)
        self._account(n)
        self._tasks.ended(n)

    async def _interrupted(self, n: _Node) -> Callable[[_Node], Awaitable[None]] | None:
        """The node's scope was cancelled: a hook timed out, its budget ran out, or an abort."""
        g = n.group
        kind, n.interrupt = n.interrupt, None
        with anyio.CancelScope(shield=True):
            if kind is _Interrupt.TIMEOUT:
                hook = n.interrupt_hook
                assert hook is not None
                if hook in (Hook.PREPARE_BEGIN, Hook.PREPARE_FINISH):
                    # _fire recorded the failure and aborted the group.
                    await self._thaw(
                        n,
                        g.aborting or AbortReason.FAILURE,
                        g.abort_error,
                        after_failed_finish=hook is Hook.PREPARE_FINISH,
                    )
                else:
                    if hook is Hook.MAIN:
                        self._emit(EventKind.SKIPPED, n, Hook.COMPLETE, because="own_main_failed")
                    self._signal_cp(n, failed=True)
                return None
            if kind is _Interrupt.BUDGET:
                return await self._budget_exceeded(n)
            await self._on_cancelled(n)
        return None

    async def _stop_aborted(self, n: _Node) -> None:
        with anyio.CancelScope(shield=True):
            await self._on_cancelled(n)

    # -- prepare: begin, barriers, finish -----------------------------------------------
    async def _prepare(self, n: _Node) -> bool:
        g = n.group
        if n.wait_pb:
            n.ev_pb = anyio.Event()
            await n.ev_pb.wait()
            n.ev_pb = None  # set once: let it go (an event with its waiter queue is ~0.8 KB)
        if self._aborting(n):
            raise _Aborted
        if n.pb is not None:
            n.status = ResourceStatus.RUNNING
            if n.quiesces:
                # Commit point 1: recovery must know this resource may be frozen.
                self._check_caller()
                if self._aborting(n):
                    raise _Aborted
                self._emit(EventKind.STARTED, n, Hook.PREPARE_BEGIN)
                await self._store.commit()
                if self._aborting(n):
                    raise _Aborted
                await self._deliver_pending(n)
                n.pb_started = True
                err = await self._call(n, Hook.PREPARE_BEGIN, n.pb, started=True)
            else:
                await self._deliver_pending(n)
                n.pb_started = True
                err = await self._call(n, Hook.PREPARE_BEGIN, n.pb)
            if err is not None:
                self._fail(n, Hook.PREPARE_BEGIN, err)
                self._abort_group(g, AbortReason.FAILURE, err)
                with anyio.CancelScope(shield=True):
                    await self._thaw(n, g.aborting or AbortReason.FAILURE, err)
                return False
            if n.quiesces:
                self._set_frozen(n, True)
                n.holding = True
                if n.quiesced_at is None:
                    n.quiesced_at = self.now()
                    if n.budget is not None:
                        self._timers.arm_budget(n, n.quiesced_at + n.budget)
                self._emit(EventKind.QUIESCED, n, None, at=n.quiesced_at)
        self._signal_pb(n)
        if g.policy is BarrierPolicy.CUT:
            barrier = g.cut_released if n.cuts else g.cut_released_rest
            if not barrier.is_set():
                await barrier.wait()
        if n.wait_pf:
            n.ev_pf = anyio.Event()
            await n.ev_pf.wait()
            n.ev_pf = None  # set once: let it go (an event with its waiter queue is ~0.8 KB)
        if self._aborting(n):
            # Woken just before the abort reached it: cuts not yet started are not started.
            raise _Aborted
        if n.pf is not None and not await self._finish_prepare(n):
            return False
        if self._signal_pf_edges(n):
            await self._release_main(g)
        return True

    async def _finish_prepare(self, n: _Node) -> bool:
        """Call the non-aborting on_prepare_finish (the cut; a server's thaw).

        From here on, aborts leave this node alone until the call returns; only
        its own time limit interrupts it.
        """
        assert n.pf is not None
        g = n.group
        probe = self._caller_probe  # (before in_cut: a cancelled caller starts no cut)
        if probe is not None and probe():
            self._on_caller_cancel()
        if n.scope is not None and n.scope.cancel_called:
            await self._deliver_pending(n)
        n.pf_started = True
        n.budget_token += 1  # the budget no longer applies: the thaw is under way
        n.status = ResourceStatus.RUNNING
        if n.cuts:
            n.crash_consistent = not self._quiesce_held(n)
        n.holding = False  # (a quiescing resource's own pf is its thaw: it starts now)
        n.in_cut = True
        try:
            err = await self._call(n, Hook.PREPARE_FINISH, n.pf)
        finally:
            n.in_cut = False
        if err is not None:
            self._fail(n, Hook.PREPARE_FINISH, err)
            self._abort_group(g, AbortReason.FAILURE, err)
            if n.quiesces:
                reason = g.aborting or AbortReason.FAILURE
                with anyio.CancelScope(shield=True):
                    await self._thaw(n, reason, err, after_failed_finish=True)
            return False
        if n.cuts:
            if n.cut_at is None:
                n.cut_at = n.call_start  # the default cut: the start of the call
            if self._record:
                self._emit(EventKind.CUT, n, None, at=n.cut_at, crash_consistent=n.crash_consistent)
        if n.quiesces:
            self._set_frozen(n, False)
            n.thaw_done = True
            if n.thawed_at is None:
                n.thawed_at = self.now()
            self._emit(EventKind.THAWED, n, None, at=n.thawed_at)
        return True

    @staticmethod
    def _quiesce_held(n: _Node) -> bool:
        """Whether some ancestor-or-self quiesced and every quiescing one is still frozen."""
        guards = n.guards
        return bool(guards) and all(g.holding for g in guards)

    async def _budget_exceeded(self, n: _Node) -> Callable[[_Node], Awaitable[None]] | None:
        """The resource was frozen past its quiesce budget: thaw it now (guarantee 2)."""
        n.thawed_early = True
        await self._thaw(n, AbortReason.BUDGET, None)
        if not self.spec.plan.crash_consistent_fallback:
            await self._on_cancelled(n)  # _fire aborted the group when the budget fired
            return None
        self._signal_pb(n)
        await self._signal_pf(n)
        return self._main_and_complete

    async def _thaw(
        self,
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
        elif n.pf_started and not after_failed_finish:
            return
        n.pf_started = True
        n.budget_token += 1
        n.holding = False
        deadline = self.now() + self.spec.plan.timeouts.abort
        if n.group.abandon_at is not None:
            deadline = min(deadline, n.group.abandon_at)
        delay = _THAW_FIRST_DELAY
        last: HookError | None = None
        with anyio.CancelScope(deadline=deadline) as bounded:
            while True:
                limit = math.inf if n.timeout is None else self.now() + n.timeout
                with anyio.CancelScope(deadline=limit) as attempt:
                    n.hook_scope = attempt
                    try:
                        last = await self._call(
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
                    self._emit(EventKind.FAILED, n, Hook.PREPARE_FINISH, error=str(last))
                if last is None:
                    n.thaw_done = True
                    if n.quiesces:
                        self._set_frozen(n, False)
                        if n.thawed_at is None:
                            n.thawed_at = self.now()
                        self._emit(EventKind.THAWED, n, None, at=n.thawed_at, reason=reason.value)
                    return
                if not n.quiesces:
                    break  # not retried: nothing of it is frozen
                await anyio.sleep(delay)
                delay = min(delay * 2, _THAW_MAX_DELAY)
        if not n.quiesces:
            # A failed aborting call is never lost: it joins the outcome and RunError.
            if last is None:
                last = HookTimeoutError(
                    n.resource,
                    Hook.PREPARE_FINISH,
                    "aborting call did not finish before the abort deadline",
                )
                self._emit(EventKind.FAILED, n, Hook.PREPARE_FINISH, error=str(last))
            self._record_error(n, Hook.PREPARE_FINISH, reason, last)
            return
        # Every thaw attempt failed or the abort deadline passed: never pretend.
        self._thaw_failed(
            n,
            last
            or HookTimeoutError(
                n.resource, Hook.PREPARE_FINISH, "thaw did not finish before the abort deadline"
            ),
        )

    @staticmethod
    def _record_error(
        n: _Node, hook: Hook, aborting: AbortReason | None, err: BaseException
    ) -> None:
        """Keep every failure of ``n`` in order; ``error``/``failed_hook`` keep the first."""
        if any(e is err for _h, _a, e in n.errors):
            return
        n.errors.append((hook, aborting, err))
        if n.error is None:
            n.error = err
            n.failed_hook = hook

    def _format(self, exc: BaseException) -> str:
        return self._scrub.text(format_error(exc))

    def _thaw_failed(self, n: _Node, cause: BaseException) -> None:
        """The alert: ``n`` may still be frozen (DESIGN.md guarantee 1)."""
        if n.status is ResourceStatus.THAW_FAILED:
            return
        exc = ThawFailedError(
            n.resource, Hook.PREPARE_FINISH, "every thaw attempt failed; it may still be frozen"
        )
        exc.__cause__ = cause
        n.status = ResourceStatus.THAW_FAILED
        self._record_error(n, Hook.PREPARE_FINISH, n.group.aborting or self._abort_reason, exc)
        self.log.error("thaw_failed", resource=str(n.resource), error=repr(cause))
        self._emit(EventKind.THAW_FAILED, n, Hook.PREPARE_FINISH, error=format_error(exc))

    # -- main and complete ------------------------------------------------------------
    async def _main_and_complete(self, n: _Node) -> None:
        g = n.group
        if self._aborting(n):
            raise _Aborted
        if g.policy is not BarrierPolicy.NONE and not g.main_released.is_set():
            await g.main_released.wait()
        if n.main is not None:
            err = await self._call_limited(n, Hook.MAIN, n.main)
            if err is not None:
                self._fail(n, Hook.MAIN, err)
                self._emit(EventKind.SKIPPED, n, Hook.COMPLETE, because="own_main_failed")
                self._signal_cp(n, failed=True)
                return
        if n.wait_cp:
            n.ev_cp = anyio.Event()
            await n.ev_cp.wait()
            n.ev_cp = None  # set once: let it go (an event with its waiter queue is ~0.8 KB)
            if self._aborting(n):
                raise _Aborted  # cancelled or timed out: ``cancelled``, not ``skipped``
        if n.child_failed:
            if n.status is not ResourceStatus.THAW_FAILED:
                n.status = ResourceStatus.SKIPPED
            self._emit(EventKind.SKIPPED, n, Hook.COMPLETE, because="dependent_failed")
            self._signal_cp(n, failed=True)
            return
        if n.complete is not None:
            err = await self._call_limited(n, Hook.COMPLETE, n.complete)
            if err is not None:
                self._fail(n, Hook.COMPLETE, err)
                self._signal_cp(n, failed=True)
                return
        if n.status is not ResourceStatus.THAW_FAILED:
            n.status = ResourceStatus.SUCCEEDED
        self._signal_cp(n, failed=False)

    async def _call_limited(self, n: _Node, hook: Hook, fn: HookFn) -> HookError | None:
        """Call on_main/on_complete under the node's limits, unless its group is aborting.

        A task woken just before an abort may resume before the cancellation reaches
        it, so the abort is checked right before the hook starts, after every wait.
        """
        if not n.limiters:
            if self._aborting(n):
                raise _Aborted
            n.status = ResourceStatus.RUNNING
            return await self._call(n, hook, fn)
        taken: list[anyio.CapacityLimiter] = []
        try:
            for limiter in n.limiters:  # always in name order, so limits cannot deadlock
                await limiter.acquire()
                taken.append(limiter)
            if self._aborting(n):
                raise _Aborted
            n.status = ResourceStatus.RUNNING
            return await self._call(n, hook, fn)
        finally:
            for limiter in reversed(taken):
                limiter.release()

    # -- calling one hook ---------------------------------------------------------------
    async def _call(
        self,
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
        ``SystemExit`` also abort the whole run (:meth:`_fatal_raised`). If the run
        abandoned the call meanwhile, :class:`_Abandoned` unwinds the node's task.
        """
        if aborting is None:
            probe = self._caller_probe
            if probe is not None and probe():
                self._on_caller_cancel()
            if n.scope is not None and n.scope.cancel_called:
                await self._deliver_pending(n)
        params = n.params.values
        if n.params.secrets:
            params = await resolve_secrets(n.params, self._secrets)
            self._scrub.add(params[k] for k in n.params.secrets)
        ctx = HookContext(n.resource, hook, params, n, aborting, abort_error)
        now = n.call_start = self.now()
        if not started and self._record:
            self._emit(
                EventKind.STARTED, n, hook, now, aborting=aborting.value if aborting else None
            )
        if aborting is None and n.timeout is not None:
            self._timers.arm_hook(n, n.timeout, now)
        n.current = hook
        n.calling_aborting = aborting is not None
        if n.call_marks:
            n.call_marks = 0
        n.call_stalled = self._timers.stalled
        token = n.token
        try:
            await fn(ctx)
        except Exception as exc:
            if n.abandoned:
                n.late = (hook, aborting is not None, exc)
                raise _Abandoned from None
            if n.interrupt is _Interrupt.TIMEOUT:
                # The plugin turned our cancellation into its own error: deliver the timeout.
                await anyio.lowlevel.checkpoint()
            err = self._hook_error(n, hook, exc)
            self._emit(EventKind.FAILED, n, hook, error=format_error(err))
            return err
        except BaseException as exc:
            if n.abandoned:
                n.late = (hook, aborting is not None, exc)
                raise _Abandoned from None
            if _only_cancellation(exc) and self._cancel_requested(n, aborting, scopes):
                raise
            # Not a cancellation the engine asked for: the hook's own failure.
            err = self._hook_error(n, hook, exc)
            self._emit(EventKind.FAILED, n, hook, error=format_error(err))
            fatal = _fatal_in(exc)
            if fatal is not None:
                self._fatal_raised(n, fatal, err)
            elif n.interrupt is _Interrupt.TIMEOUT:
                await anyio.lowlevel.checkpoint()  # deliver the timeout it swallowed
            return err
        finally:
            n.current = None
            n.token += 1  # the watcher's entry for this call is now stale
        if n.abandoned:
            n.late = (hook, aborting is not None, None)
            raise _Abandoned
        monitor = self._monitor
        if monitor is not None and monitor.stalling and aborting is None and n.timeout is not None:
            held = self._held_too_long(n, hook, token)
            if held is not None:
                return held
        if n.interrupt is _Interrupt.TIMEOUT:
            # The hook returned after its deadline passed; the cancellation is pending.
            await anyio.lowlevel.checkpoint()
        if aborting is None:
            n.hooks_done |= _HOOK_BITS[hook]
        if self._record:
            self._emit(EventKind.FINISHED, n, hook)
        return None

    # -- the event loop held by a hook ------------------------------------------------------
    @staticmethod
    def hook_call_code() -> Any:
        """The code object of the frame that calls hooks (the stall monitor looks for it)."""
        return Run._call.__code__

    def _run_time(self, n: _Node) -> float:
        """The running call's time so far, other resources' stalls left out."""
        return (self.now() - n.call_start) - (self._timers.stalled - n.call_stalled)

    def _held_too_long(self, n: _Node, hook: Hook, token: int) -> HookError | None:
        """A hook that returned inside the stall it caused: charged, it may have timed out."""
        monitor = self._monitor
        blame = monitor.blamed() if monitor is not None else None
        if blame is None or blame[0] is not n or blame[1] != token:
            return None
        assert n.timeout is not None
        if self._run_time(n) <= n.timeout:
            return None
        held = time.monotonic() - blame[2]
        err = HookTimeoutError(
            n.resource, hook, f"held the event loop for {held:.1f} s; limit {n.timeout:g} s"
        )
        self._emit(EventKind.FAILED, n, hook, error=str(err), timeout=True)
        return err

    def stalled(self, stall: Stall) -> None:
        """The loop was stalled (settled on the loop thread): push back the hook limits,
        and name and charge the hook that held it if it is one of ours."""
        timers = self._timers
        timers.stalled += stall.seconds
        n = stall.node
        if stall.culprit != "hook" or not isinstance(n, _Node) or n.run is not self:
            return
        if stall.hook is None or n.abandoned or self._closed:
            return
        n.blocked_loop_s += stall.seconds
        n.call_stalled += stall.seconds  # its own stall is charged to it, not pushed back
        self.log.warning(
            "loop_blocked",
            resource=str(n.resource),
            hook=stall.hook.value,
            seconds=round(stall.seconds, 3),
            frame=stall.frame,
        )
        self._emit(
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
        remaining = n.timeout - self._run_time(n)
        if remaining <= 0:
            n.timeout_note = note
            self._fire(n, _Interrupt.TIMEOUT)
            return
        # Its deadline was pushed back with everyone's: bring its own back in.
        token = n.token

        def charge() -> None:
            if n.token == token and n.current is stall.hook and not n.done:
                n.timeout_note = note
                self._fire(n, _Interrupt.TIMEOUT)

        timers.alarm(self.now() + remaining, charge)

    def _hook_error(self, n: _Node, hook: Hook, exc: BaseException) -> HookError:
        """Wrap a plugin's exception (``raise ... from``), keeping resolved secrets out."""
        scrub = self._scrub
        err = HookError(n.resource, hook, scrub.text(f"{type(exc).__name__}: {exc}"))
        err.__cause__ = scrub.exception(exc)
        return err

    def _cancel_requested(
        self, n: _Node, aborting: AbortReason | None, scopes: tuple[anyio.CancelScope, ...]
    ) -> bool:
        """Whether a cancellation a hook raised is one the engine (or its closing) asked for."""
        if self._tasks.closing:
            return True
        if aborting is None:
            return n.scope is not None and n.scope.cancel_called
        return any(scope.cancel_called for scope in scopes)

    def _fatal_raised(self, n: _Node, exc: BaseException, err: HookError) -> None:
        """A hook raised KeyboardInterrupt or SystemExit: abort the whole run at once.

        It is that hook's failure first (everything is thawed, the outcome is
        recorded); :meth:`execute` then re-raises the same object.
        """
        self.log.error("hook_raised_fatal", resource=str(n.resource), error=type(exc).__name__)
        if self._fatal is None:
            self._fatal = exc
        self._fail(n, err.hook, err)
        self._abort_group(n.group, AbortReason.FAILURE, err)
        self._abort_all(AbortReason.FAILURE)

    @staticmethod
    async def _deliver_pending(n: _Node) -> None:
        """Raise a cancellation requested while the node was being woken, before a hook starts.

        anyio delivers a cancel at the task's next wait; a task already woken can
        run on past it. A cut must never start under a pending interrupt.
        """
        scope = n.scope
        if scope is not None and scope.cancel_called:
            await anyio.lowlevel.checkpoint()

    def _fail(self, n: _Node, hook: Hook, err: HookError) -> None:
        self._record_error(n, hook, None, err)
        n.status = ResourceStatus.FAILED
        self.log.warning("hook_failed", resource=str(n.resource), hook=hook.value, error=str(err))

    # -- signalling the edges ---------------------------------------------------------------
    def _signal_pb(self, n: _Node) -> None:
        """``n``'s prepare_begin is done: count it off its children and its group.

        A child without a prepare_begin hook is done as soon as its parents are:
        it is counted off here and then, without waiting for its own task to
        wake, so the last quiesce releases the cut barrier in the same step.
        """
        todo = [n]
        while todo:
            n = todo.pop()
            if n.signalled_pb:
                continue
            n.signalled_pb = True
            for c in n.children:
                c.wait_pb -= 1
                if c.wait_pb == 0:
                    if c.ev_pb is not None:
                        c.ev_pb.set()
                    if c.pb is None:
                        todo.append(c)
            g = n.group
            g.pending_pb -= 1
            if g.pending_pb == 0 and g.policy is BarrierPolicy.CUT and g.aborting is None:
                self._release_cut(g)

    def _release_cut(self, g: _Group) -> None:
        # Waiters wake in the order their events are set: the cuts go first.
        g.cut_released.set()
        g.cut_released_rest.set()
        if self._gc_take():
            # No collection until every woken resource has taken its first step
            # (its cut begun): the watcher, woken now, runs after all of them.
            self._timers.soon(self._gc_give)
        self._emit(EventKind.BARRIER_RELEASED, None, None, group=g.name, barrier="cut")

    # -- keeping the garbage collector out of quiesce windows and cut waves ------------------
    def _set_frozen(self, n: _Node, frozen: bool) -> None:
        """Track what is frozen: the collector is held off while anything is."""
        if n.frozen is frozen:
            return
        n.frozen = frozen
        if frozen:
            self._frozen_now += 1
            if self._frozen_now == 1:
                self._gc_for_frozen = self._gc_take()
                self._hold_writes(True)
        else:
            self._frozen_now -= 1
            if self._frozen_now == 0:
                self._hold_writes(False)
                if self._gc_for_frozen:
                    self._gc_for_frozen = False
                    self._gc_give()

    def _hold_writes(self, hold: bool) -> None:
        """Ask the store (if it can) to keep write-behind records back while things are frozen.

        Commit points still commit; everything else is written at the next commit or
        when the last thaw releases the hold.
        """
        if hold is self._writes_held:
            return
        hint = getattr(self._store, "hold_background_writes", None)
        if hint is not None:
            self._writes_held = hold
            hint(hold)

    def _gc_take(self) -> bool:
        if self._quiet_gc <= 0 or self._gc_capped or not self._watching:
            return False
        _QuietGc.take()
        self._gc_holds += 1
        if not self._gc_cap_armed:
            self._gc_cap_armed = True
            self._timers.alarm(self.now() + self._quiet_gc, self._gc_cap)
        return True

    def _gc_give(self) -> None:
        if self._gc_holds:
            self._gc_holds -= 1
            _QuietGc.give()

    def _gc_give_all(self) -> None:
        while self._gc_holds:
            self._gc_give()

    def _gc_cap(self) -> None:
        """However long things stay frozen, the collector is held off this long at most."""
        self._gc_capped = True
        self._gc_give_all()

    async def _signal_pf(self, n: _Node) -> None:
        if not n.signalled_pf and self._signal_pf_edges(n):
            await self._release_main(n.group)

    def _signal_pf_edges(self, n: _Node) -> bool:
        """Release the parents' waits; True when this was the group's last cut."""
        n.signalled_pf = True
        for p in n.parents:
            p.wait_pf -= 1
            if p.wait_pf == 0 and p.ev_pf is not None:
                p.ev_pf.set()
        g = n.group
        g.pending_pf -= 1
        return g.pending_pf == 0 and g.aborting is None

    async def _release_main(self, g: _Group) -> None:
        """The group's last cut finished: commit (point 2), then open its main barrier."""
        if self.operation is OperationKind.PROTECT:
            with anyio.CancelScope(shield=True):
                await self._store.commit()
        if g.policy is not BarrierPolicy.NONE:
            g.main_released.set()
            self._emit(EventKind.BARRIER_RELEASED, None, None, group=g.name, barrier="main")

    def _signal_cp(self, n: _Node, *, failed: bool) -> None:
        if n.signalled_cp:
            return
        n.signalled_cp = True
        for p in n.parents:
            p.wait_cp -= 1
            if failed:
                p.child_failed = True
            if p.wait_cp == 0 and p.ev_cp is not None:
                p.ev_cp.set()

    def _settle(self, n: _Node) -> None:
        """A node that leaves early still releases what others wait on (never a hang)."""
        self._signal_pb(n)
        if not n.signalled_pf:
            self._signal_pf_edges(n)  # its group is aborting: no main barrier to open
        self._signal_cp(n, failed=True)

    async def _on_cancelled(self, n: _Node) -> None:
        g = n.group
        reason = g.aborting or self._abort_reason or AbortReason.CANCELLED
        self._abort_group(g, reason, None)
        if n.pb_started and not n.pf_started:
            await self._thaw(n, g.aborting or reason, g.abort_error)
        if n.status in (ResourceStatus.PENDING, ResourceStatus.RUNNING, ResourceStatus.SUCCEEDED):
            if reason in (AbortReason.CANCELLED, AbortReason.TIMEOUT):
                n.status = ResourceStatus.CANCELLED
            else:
                n.status = ResourceStatus.ABORTED
            self._emit(EventKind.ABORTED, n, None, reason=reason.value)

    # -- the end ---------------------------------------------------------------------------
    async def _finish(
        self, started_wall: float, started: float
    ) -> tuple[RunOutcome, list[Exception]]:
        # A resource whose thaw failed stays frozen; the run is over all the same.
        self._hold_writes(False)
        self._outcome_built = True  # a late thaw from now on is recorded on the stored outcome
        self._outcome_stored = anyio.Event()
        errors: list[Exception] = []
        resources: dict[ResourceKey, ResourceOutcome] = {}
        for n in self.nodes:
            if n.status in (ResourceStatus.PENDING, ResourceStatus.RUNNING):
                n.status = (
                    ResourceStatus.CANCELLED
                    if self._abort_reason in (AbortReason.CANCELLED, AbortReason.TIMEOUT)
                    else ResourceStatus.ABORTED
                )
            errors.extend(e for _h, _a, e in n.errors if isinstance(e, Exception))
            resources[n.resource.key] = ResourceOutcome(
                resource=n.resource,
                group=n.group.name,
                status=n.status,
                hooks_run=tuple(n.hooks_run),
                failed_hook=n.failed_hook,
                error=self._format(n.error) if n.error is not None else None,
                errors=tuple((h, a, self._format(e)) for h, a, e in n.errors),
                cut_at=n.cut_at,
                quiesced_at=n.quiesced_at,
                thawed_at=n.thawed_at,
                crash_consistent=n.crash_consistent and n.cut_at is not None,
                thawed_early=n.thawed_early,
                attempt=n.attempt,
                abandoned_hook=n.abandoned_hook,
                thawed_late_at=n.thawed_late_at,
                blocked_loop_s=n.blocked_loop_s,
            )
        groups: dict[str, GroupOutcome] = {}
        for g in self.groups.values():
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
        if self._abort_reason is AbortReason.CANCELLED:
            status = RunStatus.CANCELLED
            errors.append(RunCancelledError(f"run {self.run_id} was cancelled"))
        elif self._abort_reason is AbortReason.TIMEOUT:
            status = RunStatus.FAILED
            errors.append(
                RunCancelledError(
                    f"run {self.run_id} exceeded its time limit of {self.spec.plan.timeouts.run} s"
                )
            )
        elif errors or any(n.status is not ResourceStatus.SUCCEEDED for n in self.nodes):
            status = RunStatus.FAILED
        else:
            status = RunStatus.SUCCEEDED
        if status is RunStatus.FAILED and not errors:
            errors.append(RunCancelledError(f"run {self.run_id} aborted"))
        summary = None
        if status is not RunStatus.SUCCEEDED:
            counts: dict[str, int] = {}
            for r in resources.values():
                counts[r.status.value] = counts.get(r.status.value, 0) + 1
            summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
            if errors:
                summary = f"{summary}; first error: {errors[0]}"
        outcome = RunOutcome(
            run_id=self.run_id,
            checkpoint_id=self.checkpoint_id,
            operation=self.operation,
            status=status,
            started_wall=started_wall,
            ended_wall=time.time(),
            duration=self.now() - started,
            resources=resources,
            groups=groups,
            restored=dict(self.restored),
            error=summary,
        )
        self._emit(EventKind.RUN_FINISHED, None, None, status=status.value)
        self._closed = True  # after run_finished a run emits no lifecycle event
        try:
            await self._store.finish_run(outcome)
        finally:
            self._outcome_stored.set()
        if self._after_finish is not None:
            await self._after_finish(outcome)
        self.log.info(
            "run_finished",
            status=status.value,
            duration=round(outcome.duration, 6),
            skew=outcome.skew,
        )
        return outcome, errors
