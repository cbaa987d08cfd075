"""Per-resource and per-group state of a run, and the handle a HookContext acts through.

Data, not behaviour: the rooms of the scheduler (``_calls``, ``_thaw``,
``_abort``, ``_abandon``, ``_guards``, ``_walk``) are functions over it. A
:class:`_Node` extends the ordering core's :class:`~karbor_async._ordering.Slot`
(its edge counters) and a :class:`_Group` its :class:`~karbor_async._ordering.Gate`
(its barrier counters), so the counters cost no extra object. What a node
needs of its run, to serve its hooks' contexts, is the :class:`NodeRun`
protocol (``_record.Recorder`` implements it), so this module depends on no
room.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import anyio
import attrs

from karbor_async._log import ref
from karbor_async._ordering import Gate, Slot
from karbor_async._params import NodeParams
from karbor_async._registry import TypeBinding
from karbor_async._scrub import Scrubber, ScrubbingLogger
from karbor_async._types import (
    AbortReason,
    Hook,
    OperationKind,
    Resource,
    ResourceKey,
    ResourceStatus,
)
from karbor_async.events import Progress
from karbor_async.exceptions import MarkError, PluginError
from karbor_async.plugin import Bank, BankSection

__all__ = [
    "HOOK_BITS",
    "HookFn",
    "Interrupt",
    "NodeRun",
    "Rescue",
    "_Abandoned",
    "_Aborted",
    "_Group",
    "_Node",
    "not_restoring",
]

HookFn = Callable[[Any], Awaitable[None]]
"""A plugin's hook: ``async def on_main(ctx: HookContext) -> None``."""

HOOK_BITS = {Hook.PREPARE_BEGIN: 1, Hook.PREPARE_FINISH: 2, Hook.MAIN: 4, Hook.COMPLETE: 8}
_HOOKS_OF_BITS = tuple(tuple(h for h, bit in HOOK_BITS.items() if bits & bit) for bits in range(16))
"""The hooks of each bit set of ``HOOK_BITS``, in protocol order (built once)."""
_MARK_BITS = {"quiesced": 1, "cut": 2, "thawed": 4}


class _Aborted(Exception):
    """The node's group began aborting before its next hook could start."""


class _Abandoned(BaseException):
    """The run stopped waiting for this node's hook; the hook has now ended (late).

    A BaseException so that no ``except Exception`` on the way turns it into a
    failure: it unwinds the node's task, which then does only its late chores.
    """


class Interrupt(enum.Enum):
    """Why the watcher cancelled a node's scope."""

    TIMEOUT = "timeout"
    BUDGET = "budget"


class NodeRun(Protocol):
    """What a node needs of its run to serve its hooks' contexts."""

    run_id: str
    checkpoint_id: str
    operation: OperationKind
    bank: Bank
    restored: dict[ResourceKey, str]
    log: Any
    plugin_log: Any
    """What ``ctx.log`` binds: the ``karbor_async.plugins`` logger, bound to the run."""

    @property
    def scrubber(self) -> Scrubber: ...
    def now(self) -> float: ...
    def saved_info(self, key: ResourceKey) -> Mapping[str, Any]: ...
    def save_info(self, key: ResourceKey, info: Mapping[str, Any]) -> None: ...
    def progress_tick(self, n: _Node, progress: Progress) -> None: ...
    async def report_restored(self, n: _Node, new_id: str) -> None: ...
    def mark_refused(
        self, n: _Node, hook: Hook, what: str, at: float | None, rule: str
    ) -> None: ...
    def arm_budget(self, n: _Node, deadline: float) -> None: ...
    async def arm_safety_thaw(
        self,
        n: _Node,
        hook: Hook,
        aborting: bool,
        command: Sequence[str] | None,
        function: str | None,
        args: Mapping[str, Any] | None,
    ) -> None: ...


@attrs.define(eq=False, slots=True)
class _Group(Gate):
    """A consistency group: the core's barrier counters, and the events its tasks wait on."""

    nodes: list[_Node] = attrs.Factory(list)
    cut_released: anyio.Event = attrs.Factory(anyio.Event)
    """Wakes the resources that cut; set first, so their cuts are dispatched first."""
    cut_released_rest: anyio.Event = attrs.Factory(anyio.Event)
    """Wakes the others (servers waiting to thaw, images, ...) right after."""
    main_released: anyio.Event = attrs.Factory(anyio.Event)
    thaw_released: anyio.Event = attrs.Factory(anyio.Event)
    """Under ``cut``: wakes the thaws once every cut taken under a quiesce is done."""
    abort_error: BaseException | None = None
    abandon_at: float | None = None
    """When the group aborted, plus ``timeouts.abort``: hooks still running then are abandoned."""


@attrs.define(eq=False, slots=True, kw_only=True)
class _Node(Slot[_Group]):
    """Mutable per-resource state; also the handle a HookContext acts through."""

    run: NodeRun
    resource: Resource
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
    leased: bool = False
    """The run holds a store lease on it (a protect's quiescing or cutting resource) that
    it has not given back yet (given back once its prepare is over and it is thawed)."""
    limiters: tuple[anyio.CapacityLimiter, ...] = ()
    ev_pb: anyio.Event | None = None
    ev_pf: anyio.Event | None = None
    ev_cp: anyio.Event | None = None
    status: ResourceStatus = ResourceStatus.PENDING
    hooks_done: int = 0
    """Bit set of the hooks that returned (non-aborting calls)."""
    failed_hook: Hook | None = None
    error: BaseException | None = None
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
    quiesced_wall: float | None = None
    """Set when an earlier attempt (a dead engine) quiesced it: its thaw here is timed on
    the wall clock and the window marked approximate."""
    thawed_at: float | None = None
    window_approximate: bool = False
    attempt: int = 1
    section: BankSection | None = None
    ticks: int = 0
    current: Hook | None = None
    last_progress: Progress | None = None
    data_progress: Progress | None = None
    """The last progress that had a ``total`` (what the status line's data sums)."""
    scope: anyio.CancelScope | None = None
    interrupt: Interrupt | None = None
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
    safety: Any = None
    """Its armed safety thaw (``_safety.Armed``), until its thaw is recorded."""

    def disarm_safety(self) -> None:
        """Its thaw was recorded: the sentinel lets its safety thaw go."""
        if self.safety is not None:
            self.safety.disarm()
            self.safety = None

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
        scrub = self.run.scrubber
        if message is not None and scrub.active:
            message = scrub.text(message)
        progress = self.last_progress = Progress(fraction, done, total, message)
        if total:
            self.data_progress = progress
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
        if self.run.operation is not OperationKind.RESTORE:
            raise PluginError(not_restoring(self.resource, self.current, self.run.operation))
        await self.run.report_restored(self, new_id)

    async def arm_safety_thaw(
        self,
        hook: Hook,
        aborting: bool,
        command: Sequence[str] | None,
        function: str | None,
        args: Mapping[str, Any] | None,
    ) -> None:
        await self.run.arm_safety_thaw(self, hook, aborting, command, function, args)

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
        log = self.run.plugin_log.bind(resource=ref(self.resource), hook=hook.value)
        scrub = self.run.scrubber
        return ScrubbingLogger(log, scrub) if scrub.active else log

    @property
    def hooks_run(self) -> tuple[Hook, ...]:
        return _HOOKS_OF_BITS[self.hooks_done]


def not_restoring(resource: Resource, hook: Hook | None, op: OperationKind) -> str:
    """Why ``report_restored`` is refused outside a restore (it would record a mapping
    of new ids for a run that restores nothing)."""
    where = f"{resource} {hook.value}" if hook is not None else str(resource)
    return f"{where}: report_restored is for restore hooks; this is a {op.value}"


class Rescue:
    """The engine's handle on a rescue thaw's task (see ``_abort.rescue_thaw``)."""

    __slots__ = ("node", "scope")

    def __init__(self, node: _Node) -> None:
        self.node = node
        self.scope: anyio.CancelScope | None = None

    def cancel_hook(self) -> None:
        if self.scope is not None:
            self.scope.cancel()
