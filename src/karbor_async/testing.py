"""Helpers for testing plugins and the engine: recording plugins, scripted faults, fakes.

A vendor tests a plugin by running its hooks the way the engine does::

    outcome = await run_hooks(MyPlugin(), Resource("OS::Cinder::Volume", "v1"))

and tests ordering with :class:`RecordingPlugin`, whose ``trace`` has every
hook's resource, start, end and outcome, with scripted delays, raises, hangs
and run cancellations (:class:`Fault`).
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeAlias, TypeVar

import anyio
import attrs

from karbor_async._engine import Engine
from karbor_async._log import PLUGINS, get_logger, ref
from karbor_async._memory import MemoryBank, MemoryStore
from karbor_async._node import not_restoring
from karbor_async._plan import Plan, Timeouts
from karbor_async._stall import Stall
from karbor_async._tasks import STALL_LISTENERS
from karbor_async._types import (
    AbortReason,
    Hook,
    OperationKind,
    Resource,
    ResourceKey,
    coerce_enum,
    coerce_optional,
)
from karbor_async.exceptions import PluginError
from karbor_async.plugin import Bank, HookContext, ProtectionPlugin, ResourceType
from karbor_async.store import RunOutcome

__all__ = [
    "Fault",
    "HookRun",
    "HookRecorder",
    "InjectedError",
    "MapProtectable",
    "RecordingPlugin",
    "ScriptKey",
    "TraceEntry",
    "LoopBlockedError",
    "make_context",
    "no_loop_stalls",
    "protectables_for",
    "run_hooks",
]


class Fault(enum.StrEnum):
    """What a scripted hook does instead of returning."""

    RAISE = "raise"
    """Raise :class:`InjectedError`."""
    HANG = "hang"
    """Sleep forever (until its timeout or a cancellation stops it)."""
    CANCEL_RUN = "cancel_run"
    """Call the plugin's ``cancel_run`` callback (tests set it to ``run.cancel``), then wait."""


class InjectedError(RuntimeError):
    """The exception a :attr:`Fault.RAISE` hook raises."""


@attrs.define
class TraceEntry:
    """One hook call as a :class:`RecordingPlugin` saw it (times on the engine clock)."""

    resource: ResourceKey
    hook: Hook
    operation: OperationKind
    start: float
    end: float | None = None
    outcome: str = "running"
    """``ok``, ``error``, ``cancelled`` (stopped by cancellation or its timeout) or ``running``."""
    aborting: AbortReason | None = None
    attempt: int = 1


_log = get_logger(PLUGINS, test_context=True)

V = TypeVar("V")
ScriptTable: TypeAlias = Mapping[tuple[str, Hook], V] | Mapping[tuple[str, str], V]
"""What ``delays=``/``faults=`` take: keys with the hook as a :class:`Hook` or its name."""
ScriptKey = tuple[str, Hook]
"""``("OS::Nova::Server#s1", hook)`` for one resource, ``("OS::Nova::Server", hook)`` for a type."""


def _script(
    table: ScriptTable[Any] | None, types: frozenset[str], what: str
) -> dict[ScriptKey, Any]:
    """A ``delays``/``faults`` table with its keys checked and hooks as :class:`Hook`.

    A key is ``(TARGET, HOOK)``: TARGET one of the plugin's types or ``TYPE#ID`` of one,
    HOOK a :class:`Hook` or its name (``"on_main"``). A key that could never match
    would inject nothing, so it is refused here rather than ignored.
    """
    out: dict[ScriptKey, Any] = {}
    known = ", ".join(sorted(types)) or "none"
    for key, value in (table or {}).items():
        if not isinstance(key, tuple) or len(key) != 2 or not isinstance(key[0], str):
            raise ValueError(
                f"{what} key {key!r} must be a pair (TYPE or TYPE#ID, hook), "
                "for example ('OS::Nova::Server#s1', 'on_main')"
            )
        target, hook = key
        rtype, sep, rid = target.partition("#")
        if rtype not in types or (sep and not rid):
            raise ValueError(
                f"{what} key {key!r}: {target!r} is neither one of this plugin's types "
                f"({known}) nor TYPE#ID of one"
            )
        out[(target, coerce_enum(Hook, hook, f"{what} key {key!r}: the hook"))] = value
    return out


def _delay(key: ScriptKey, value: Any) -> float | Callable[[], float]:
    if callable(value) or (isinstance(value, int | float) and not isinstance(value, bool)):
        return value  # type: ignore[no-any-return]
    raise TypeError(
        f"delays[{key!r}] must be a number of seconds or a callable returning one, not {value!r}"
    )


class _RecordingOp:
    def __init__(self, plugin: RecordingPlugin) -> None:
        self._plugin = plugin

    async def on_prepare_begin(self, ctx: HookContext) -> None:
        await self._plugin.record(ctx)

    async def on_prepare_finish(self, ctx: HookContext) -> None:
        await self._plugin.record(ctx)

    async def on_main(self, ctx: HookContext) -> None:
        await self._plugin.record(ctx)

    async def on_complete(self, ctx: HookContext) -> None:
        await self._plugin.record(ctx)


class RecordingPlugin(ProtectionPlugin):
    """Implements all four hooks of every operation for the given types, recording each call.

    ``delays`` and ``faults`` are keyed by ``(TYPE#ID or TYPE, hook)``; a delay may be
    a number of seconds or a callable returning one. Types that quiesce mark
    ``quiesced`` in ``on_prepare_begin`` and ``thawed`` in ``on_prepare_finish``.
    Faults apply to non-aborting calls of ``fault_operations`` (protect by default),
    and to aborting calls too when ``fault_thaws`` is set.
    """

    name = "recording"

    def __init__(
        self,
        types: Iterable[ResourceType | str],
        *,
        name: str | None = None,
        delays: ScriptTable[float | Callable[[], float]] | None = None,
        faults: ScriptTable[Fault] | ScriptTable[str] | None = None,
        fault_thaws: bool = False,
        cancel_run: Callable[[], None] | None = None,
        restore_ids: bool = True,
        fault_operations: Iterable[OperationKind | str] = (OperationKind.PROTECT,),
    ) -> None:
        self.types = tuple(  # type: ignore[misc]
            t if isinstance(t, ResourceType) else ResourceType(t) for t in types
        )
        if name is not None:
            self.name = name  # type: ignore[misc]
        names = frozenset(t.name for t in self.types)
        self.delays = {k: _delay(k, v) for k, v in _script(delays, names, "delays").items()}
        self.faults = {
            k: coerce_enum(Fault, v, f"faults[{k!r}]")
            for k, v in _script(faults, names, "faults").items()
        }
        self.fault_thaws = fault_thaws
        self.cancel_run = cancel_run
        self.restore_ids = restore_ids
        self.fault_operations = frozenset(
            coerce_enum(OperationKind, op, "fault_operations") for op in fault_operations
        )
        self.trace: list[TraceEntry] = []
        self._op = _RecordingOp(self)
        self._quiesces = {t.name for t in self.types if t.quiesces}

    def get_protect_operation(self, resource_type: str) -> object:
        return self._op

    def get_restore_operation(self, resource_type: str) -> object:
        return self._op

    def get_delete_operation(self, resource_type: str) -> object:
        return self._op

    def _lookup(self, table: Mapping[ScriptKey, Any], res: Resource, hook: Hook) -> Any:
        found = table.get((f"{res.type}#{res.id}", hook))
        return found if found is not None else table.get((res.type, hook))

    async def record(self, ctx: HookContext) -> None:
        res = ctx.resource
        entry = TraceEntry(
            resource=res.key,
            hook=ctx.hook,
            operation=ctx.operation,
            start=anyio.current_time(),
            aborting=ctx.aborting,
            attempt=ctx.attempt,
        )
        self.trace.append(entry)
        try:
            await self._behave(ctx)
        except anyio.get_cancelled_exc_class():
            entry.outcome = "cancelled"
            entry.end = anyio.current_time()
            raise
        except BaseException:
            entry.outcome = "error"
            entry.end = anyio.current_time()
            raise
        entry.outcome = "ok"
        entry.end = anyio.current_time()

    async def _behave(self, ctx: HookContext) -> None:
        res, hook = ctx.resource, ctx.hook
        delay = self._lookup(self.delays, res, hook)
        if callable(delay):
            delay = delay()
        fault = None
        if ctx.operation in self.fault_operations and (ctx.aborting is None or self.fault_thaws):
            fault = self._lookup(self.faults, res, hook)
        quiescing = ctx.operation is OperationKind.PROTECT and res.type in self._quiesces
        if quiescing and hook is Hook.PREPARE_BEGIN and delay:
            await anyio.sleep(delay / 2)
            ctx.mark_quiesced()
            delay /= 2
        if delay:
            await anyio.sleep(delay)
        if fault is Fault.RAISE:
            raise InjectedError(f"injected failure in {hook.value} of {res}")
        if fault is Fault.HANG:
            await anyio.sleep_forever()
        if fault is Fault.CANCEL_RUN:
            if self.cancel_run is None:
                raise RuntimeError("Fault.CANCEL_RUN needs cancel_run= (for example run.cancel)")
            self.cancel_run()
            await anyio.sleep_forever()
        if ctx.operation is OperationKind.PROTECT and hook is Hook.MAIN:
            await ctx.bank.put("data", f"{res.type}:{res.id}".encode())
            ctx.save(copied=True, attempt=ctx.attempt)
        restoring = ctx.operation is OperationKind.RESTORE and hook is Hook.MAIN
        if restoring and self.restore_ids and ctx.restored_id(res) is None:
            await ctx.report_restored(f"restored-{res.id}")

    # -- trace queries ---------------------------------------------------------------------
    def calls(
        self, resource: ResourceKey | None = None, hook: Hook | str | None = None
    ) -> list[TraceEntry]:
        """The trace entries of one resource and/or one hook (``Hook.MAIN`` or ``"on_main"``)."""
        hook = coerce_optional(Hook, hook, "hook")
        return [
            e
            for e in self.trace
            if (resource is None or e.resource == resource) and (hook is None or e.hook is hook)
        ]


class MapProtectable:
    """A protectable answering from a fixed map of parent key -> dependents of one type."""

    def __init__(
        self,
        resource_type: str,
        parent_types: Sequence[str],
        children: Mapping[ResourceKey, Sequence[Resource]],
        *,
        fail_on: ResourceKey | None = None,
    ) -> None:
        self.resource_type = resource_type
        self.parent_types = tuple(parent_types)
        self._children = {k: list(v) for k, v in children.items()}
        self._fail_on = fail_on

    async def dependents(self, parent: Resource) -> list[Resource]:
        await anyio.lowlevel.checkpoint()
        if parent.key == self._fail_on:
            raise InjectedError(f"injected discovery failure under {parent}")
        return self._children.get(parent.key, [])


def protectables_for(
    edges: Iterable[tuple[Resource, Resource]],
) -> list[MapProtectable]:
    """Protectables that reproduce the given ``(parent, child)`` edges, one per child type."""
    by_type: dict[str, dict[ResourceKey, list[Resource]]] = {}
    parents: dict[str, set[str]] = {}
    for parent, child in edges:
        by_type.setdefault(child.type, {}).setdefault(parent.key, []).append(child)
        parents.setdefault(child.type, set()).add(parent.type)
    return [MapProtectable(t, sorted(parents[t]), m) for t, m in by_type.items()]


class LoopBlockedError(AssertionError):
    """A hook held the event loop (raised by :func:`no_loop_stalls` and :func:`run_hooks`)."""


@contextlib.contextmanager
def no_loop_stalls() -> Iterator[list[str]]:
    """Fail the block, naming the hook, if a hook held the event loop past the engine's
    ``stall_threshold`` meanwhile (any engine in the process; asyncio and trio).

    On asyncio, with the ``karbor-async[testing]`` extra installed, blockbuster is
    also on inside the block, so the first blocking call fails at once even below
    the threshold (blockbuster does nothing on trio). Yields the list of what was
    seen (it fills as stalls are settled)::

        with no_loop_stalls():
            await engine.protect(plan)

    As a pytest fixture: ``@pytest.fixture`` wrapping ``with no_loop_stalls(): yield``.
    """
    seen: list[str] = []

    def listen(stall: Stall) -> None:
        if stall.culprit == "hook":
            node = stall.node
            hook = getattr(stall.hook, "value", stall.hook)
            where = f" at {stall.frame}" if stall.frame else ""
            seen.append(
                f"{getattr(node, 'resource', '?')} {hook} held the event loop for "
                f"{stall.seconds:.2f} s{where}"
            )

    STALL_LISTENERS.append(listen)
    try:
        with _blockbuster():
            yield seen
    except BaseException as exc:
        seen.extend(_blocking_calls(exc))
        if seen:  # the hook's failure came from holding the loop: say that first
            raise LoopBlockedError("; ".join(seen)) from exc
        raise
    finally:
        STALL_LISTENERS.remove(listen)
    if seen:
        raise LoopBlockedError("; ".join(seen))


def _blocking_calls(exc: BaseException) -> list[str]:
    """The hooks that blockbuster stopped, from a run's error (HookError causes)."""
    found: list[str] = []
    for inner in exc.exceptions if isinstance(exc, BaseExceptionGroup) else (exc,):
        cause = inner.__cause__
        if cause is not None and type(cause).__name__ == "BlockingError":
            found.append(f"{inner}: a blocking call in the event loop (blockbuster)")
    return found


@contextlib.contextmanager
def _blockbuster() -> Iterator[None]:
    try:
        import sniffio

        on_asyncio = sniffio.current_async_library() == "asyncio"
    except Exception:  # not in an event loop: nothing to patch for
        on_asyncio = False
    if not on_asyncio:
        yield
        return
    try:
        from blockbuster import BlockBuster
    except ImportError:  # the [testing] extra is not installed: the stall detector only
        yield
        return
    # not blockbuster_ctx(): before blockbuster 1.5.27 it left its patches on when the
    # block raised (a stall found), failing every later blocking call in the process
    buster = BlockBuster()
    buster.activate()
    try:
        yield
    finally:
        buster.deactivate()


@attrs.frozen
class HookRun:
    """What :func:`run_hooks` observed: the outcomes, the saved info and the bank's objects."""

    protect: RunOutcome
    restore: RunOutcome | None
    delete: RunOutcome | None
    saved: Mapping[ResourceKey, Mapping[str, Any]]
    bank_objects: Mapping[str, bytes]


async def run_hooks(
    plugin: ProtectionPlugin,
    resource: Resource,
    *,
    parameters: Mapping[str, Any] | None = None,
    restore: bool = False,
    delete: bool = False,
    secrets: Callable[[str], Any] | None = None,
    timeouts: Timeouts | None = None,
    fail_on_block: bool = True,
) -> HookRun:
    """Run one plugin's hooks for one resource exactly as the engine does.

    Protects the resource (all four hooks, in order, with the real engine, an
    in-memory store and bank), then optionally restores and deletes the
    checkpoint. Raises :class:`~karbor_async.exceptions.RunError` if a run fails,
    and, with ``fail_on_block``, :class:`LoopBlockedError` naming the hook if one
    held the event loop (see :func:`no_loop_stalls`).
    """
    if fail_on_block:
        with no_loop_stalls():
            return await _run_hooks(
                plugin, resource, parameters, restore, delete, secrets, timeouts
            )
    return await _run_hooks(plugin, resource, parameters, restore, delete, secrets, timeouts)


async def _run_hooks(
    plugin: ProtectionPlugin,
    resource: Resource,
    parameters: Mapping[str, Any] | None,
    restore: bool,
    delete: bool,
    secrets: Callable[[str], Any] | None,
    timeouts: Timeouts | None,
) -> HookRun:
    store = MemoryStore()
    bank = MemoryBank()
    plan = Plan(
        name=f"test-{plugin.plugin_name()}",
        resources=[resource],
        parameters={resource.type: dict(parameters or {})} if parameters else {},
        timeouts=timeouts or Timeouts(),
    )
    async with Engine([plugin], store=store, bank=bank, discover=False, secrets=secrets) as engine:
        protected = await engine.protect(plan)
        saved = await store.load_saved_info(protected.checkpoint_id)
        objects = dict(bank.objects)
        restored = await engine.restore(protected.checkpoint_id) if restore else None
        deleted = await engine.delete(protected.checkpoint_id) if delete else None
    return HookRun(protected, restored, deleted, saved, objects)


@attrs.define(eq=False)
class _Facts:
    operation: OperationKind
    run_id: str
    checkpoint_id: str


@attrs.define(eq=False)
class HookRecorder:
    """The engine's side of a context made by :func:`make_context`: records what a hook did."""

    resource: Resource
    run: _Facts
    attempt: int
    bank: Any
    children: tuple[Resource, ...] = ()
    parents: tuple[Resource, ...] = ()
    saved: dict[ResourceKey, dict[str, Any]] = attrs.Factory(dict)
    restored: dict[ResourceKey, str] = attrs.Factory(dict)
    marks: dict[str, float] = attrs.Factory(dict)
    progress_reports: list[tuple[float | None, int | None, int | None, str | None]] = attrs.Factory(
        list
    )
    safety_thaws: list[dict[str, Any]] = attrs.Factory(list)

    def saved_info(self, key: ResourceKey) -> Mapping[str, Any]:
        return self.saved.get(key, {})

    def save_info(self, info: Mapping[str, Any]) -> None:
        self.saved.setdefault(self.resource.key, {}).update(info)

    def progress(
        self, fraction: float | None, done: int | None, total: int | None, message: str | None
    ) -> None:
        self.progress_reports.append((fraction, done, total, message))

    def mark(
        self, what: str, at: float | None, hook: Hook | None = None, aborting: bool = False
    ) -> None:
        self.marks[what] = anyio.current_time() if at is None else at

    async def report_restored(self, new_id: str) -> None:
        if self.run.operation is not OperationKind.RESTORE:
            raise PluginError(not_restoring(self.resource, None, self.run.operation))
        self.restored[self.resource.key] = new_id

    def restored_id(self, key: ResourceKey) -> str | None:
        return self.restored.get(key)

    async def arm_safety_thaw(
        self,
        hook: Hook,
        aborting: bool,
        command: Any,
        function: str | None,
        args: Mapping[str, Any] | None,
    ) -> None:
        """Recorded, not armed: ``safety_thaws`` lists what the hook registered."""
        self.safety_thaws.append({"command": command, "function": function, "args": args})

    def neighbours(self, parents: bool) -> tuple[Resource, ...]:
        return self.parents if parents else self.children

    def logger(self, hook: Hook) -> Any:
        return _log.bind(resource=ref(self.resource), hook=hook.value)

    def bank_section(self) -> Any:
        return self.bank


def make_context(
    resource: Resource,
    hook: Hook | str = Hook.MAIN,
    *,
    operation: OperationKind | str = OperationKind.PROTECT,
    parameters: Mapping[str, Any] | None = None,
    bank: Bank | None = None,
    run_id: str = "test-run",
    checkpoint_id: str = "test-checkpoint",
    attempt: int = 1,
    children: Sequence[Resource] = (),
    parents: Sequence[Resource] = (),
    aborting: AbortReason | str | None = None,
    abort_error: BaseException | None = None,
    recorder: HookRecorder | None = None,
) -> tuple[HookContext, HookRecorder]:
    """A context for calling one hook directly, without an engine (unit tests, baselines).

    The returned :class:`HookRecorder` holds what the hook saved, marked,
    reported and restored; pass the same recorder again to share saved info
    and restored ids between calls. ``hook``, ``operation`` and ``aborting`` take the
    members or their strings (``"on_main"``, ``"restore"``, ``"failure"``).
    """
    hook = coerce_enum(Hook, hook, "hook")
    operation = coerce_enum(OperationKind, operation, "operation")
    aborting = coerce_optional(AbortReason, aborting, "aborting")
    if recorder is None:
        recorder = HookRecorder(
            resource=resource,
            run=_Facts(operation, run_id, checkpoint_id),
            attempt=attempt,
            bank=None,
            children=tuple(children),
            parents=tuple(parents),
        )
    else:
        recorder = attrs.evolve(
            recorder,
            resource=resource,
            run=_Facts(operation, run_id, checkpoint_id),
            attempt=attempt,
            children=tuple(children),
            parents=tuple(parents),
            saved=recorder.saved,
            restored=recorder.restored,
            marks={},
            progress_reports=[],
        )
    the_bank = bank if bank is not None else MemoryBank()
    recorder.bank = the_bank.section(
        checkpoint_id, resource.key, read_only=operation is OperationKind.RESTORE
    )
    ctx = HookContext(resource, hook, dict(parameters or {}), recorder, aborting, abort_error)
    return ctx, recorder
