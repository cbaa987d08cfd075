"""The engine: builds validated runs and executes them (the package's front door)."""

from __future__ import annotations

import secrets as _secrets
import time
from collections.abc import Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Self

import anyio
import attrs
import sniffio

from karbor_async._checks import run_checks
from karbor_async._graph import ResourceGraph, assign_groups, check_types, discover
from karbor_async._hub import EventHub, Subscription
from karbor_async._log import get_logger, ref
from karbor_async._memory import MemoryBank, MemoryStore
from karbor_async._params import check_secrets, merge_parameters
from karbor_async._plan import Plan, Timeouts
from karbor_async._recovery import RecoveryReport, Resume, recover_all
from karbor_async._registry import PluginRegistry, TypeBinding
from karbor_async._safety import SafetyThaws, journal_for
from karbor_async._scheduler import Run, RunSpec
from karbor_async._stall import StallMonitor
from karbor_async._tasks import AbandonedHook, EngineTasks
from karbor_async._types import BarrierPolicy, OperationKind, ResourceKey, RunStatus
from karbor_async.exceptions import PlanError, ResourceBusyError, RunError
from karbor_async.plugin import Bank, Protectable, ProtectionPlugin, SecretResolver
from karbor_async.store import CheckpointRecord, CheckpointStatus, RunOutcome, RunRecord, Store

__all__ = ["Engine", "EngineStatistics", "new_run_id"]

_log = get_logger(__name__)

_RECOVERING: ContextVar[bool] = ContextVar("karbor_async_recovering", default=False)
"""Set while a recovery runs, in it and in every task it starts: what recovery starts
(its clean-up deletes) must not wait for the recovery itself to end."""

_DEFAULT_BARRIER = {
    OperationKind.PROTECT: BarrierPolicy.MAIN,
    OperationKind.RESTORE: BarrierPolicy.NONE,
    OperationKind.DELETE: BarrierPolicy.NONE,
}


def new_run_id() -> str:
    """A sortable, readable id: UTC time plus random hex (``20261125T003012-9f2c1a``)."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + _secrets.token_hex(3)


@attrs.frozen
class EngineStatistics:
    """A frozen snapshot of the engine's own tasks."""

    tasks: int
    """Resource tasks alive in the engine: those of running runs and abandoned ones."""
    abandoned: tuple[AbandonedHook, ...]
    """Hooks the engine stopped waiting for that have not ended yet."""


class Engine:
    """Protects, restores and deletes checkpoints of resource graphs.

    Plugins come from entry points (``discover=True``) and/or are passed in.
    ``store`` and ``bank`` default to in-memory ones; ``secrets`` resolves the
    references that secret parameters hold. With ``recover`` (the default), the
    first operation first finishes or cleans up what a dead engine left in a
    durable store (see :meth:`recover`). ``quiet_gc`` keeps the cyclic garbage
    collector's pauses out of runs (quiesce windows, cut waves, and the run's
    time: a large run otherwise spends up to 40% of it in full collections): it
    is held off, process-wide and counted, from a run's first hook to its last,
    for at most ``quiet_gc`` seconds per run (default 10), and overlapping runs
    cannot keep it off much past that; 0 leaves the collector alone, for
    applications that manage it themselves.

    An engine is used inside ``async with Engine(...) as engine:``, which opens
    the engine's own task group in the caller's event loop (asyncio or trio):
    every hook runs there. A hook that does not end when the engine cancels it
    is *abandoned* (the run ends within its bound without it) and its task stays
    owned by the engine; leaving the block cancels such hooks and waits for them,
    logging what it waits for, at most ``close_timeout`` seconds for hooks that
    end once cancelled (a hook that swallows every cancellation is a plugin bug:
    its task lives until the process ends, and closing keeps waiting for it).

    ``stall_threshold`` (seconds of real time, default 0.1; 0 turns it off): a
    loop that does not run for longer is *stalled*; a monitor thread names who
    held it. A hook that blocked the loop gets a ``LOOP_BLOCKED`` event and is
    charged the time (it may fail with ``HookTimeoutError``); the other hooks'
    limits are pushed back by it.

    ``safety_margin``: a safety thaw armed by a quiescing hook
    (``ctx.arm_safety_thaw``) is run by the engine's sentinel process when this
    process dies, or when the resource stays frozen ``safety_margin`` seconds past
    its quiesce budget (with no budget: on the process's death only).
    """

    def __init__(
        self,
        protections: Iterable[ProtectionPlugin] = (),
        protectables: Iterable[Protectable] = (),
        *,
        store: Store | None = None,
        bank: Bank | None = None,
        secrets: SecretResolver | None = None,
        discover: bool = True,
        prefer: Mapping[str, str] | None = None,
        record_events: bool = True,
        recover: bool = True,
        event_buffer: int = 16384,
        event_coalesce: float = 0.01,
        quiet_gc: float = 10.0,
        close_timeout: float = 10.0,
        stall_threshold: float = 0.1,
        safety_margin: float = 5.0,
    ) -> None:
        _check_options(close_timeout, stall_threshold, safety_margin)
        self.registry = PluginRegistry(protections, protectables, discover=discover, prefer=prefer)
        self.store: Store = store if store is not None else MemoryStore()
        self.bank: Bank = bank if bank is not None else MemoryBank()
        self._secrets = secrets
        self._record_events = record_events
        self._quiet_gc = quiet_gc
        self.hub = EventHub(self.store, capacity=event_buffer, coalesce=event_coalesce)
        self._recover_first = recover
        self._recovered: anyio.Event | None = None
        self._close_timeout = close_timeout
        self._stall_threshold = stall_threshold
        self._safety_margin = safety_margin
        self._tasks: EngineTasks | None = None
        self._outer: anyio.abc.TaskGroup | None = None
        self._closing = anyio.Event()
        self._entered = False

    # -- lifecycle -------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        if self._entered:
            raise RuntimeError("an Engine is entered once: make a new Engine for a new block")
        self._entered = True
        outer = anyio.create_task_group()
        await outer.__aenter__()
        try:
            self._tasks = await outer.start(self._serve)
        except BaseException as exc:
            await outer.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self._outer = outer
        outer.start_soon(_clean_bank, self.bank, None)  # what killed writers left
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        outer = self._outer
        if outer is None:
            return
        self._closing.set()
        try:
            # The body's own exception propagates as it is, not wrapped in a group.
            await outer.__aexit__(None, None, None)
        finally:
            self._outer = None
            self._tasks = None

    async def _serve(self, *, task_status: anyio.abc.TaskStatus[EngineTasks]) -> None:
        """The engine's task group, shielded: the caller cancels runs through Run.cancel."""
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as tg:
                tasks = EngineTasks(tg, native=sniffio.current_async_library() == "asyncio")
                tasks.safety = SafetyThaws(tg, self._safety_margin, journal_for(self.store))
                if self._stall_threshold > 0:
                    tasks.monitor = StallMonitor(
                        self._stall_threshold, Run.hook_call_code(), tasks.stalled
                    )
                    tasks.monitor.start()
                try:
                    task_status.started(tasks)
                    await self._closing.wait()
                    tasks.closing = True
                    tg.cancel_scope.cancel()  # runs still executing end cancelled, then thaw
                    tasks.cancel_walks()  # (the walks that are the loop's own tasks too)
                    await tasks.drain(self._close_timeout, forever=True)
                    await tasks.safety.aclose()  # it thaws what is still armed (thaw_failed)
                finally:
                    if tasks.monitor is not None:
                        tasks.monitor.catch_up()  # a stall the last run ended inside of
                        tasks.monitor.stop()

    def _open_tasks(self) -> EngineTasks:
        tasks = self._tasks
        if tasks is None:
            if self._entered:
                raise RuntimeError("this Engine is closed: its async with block has ended")
            raise RuntimeError(
                "an Engine is used inside `async with Engine(...) as engine:`, which opens "
                "the task group its hooks run in; enter it before calling its operations"
            )
        return tasks

    def statistics(self) -> EngineStatistics:
        """Where the engine's own tasks stand (abandoned hooks included)."""
        tasks = self._tasks
        if tasks is None:
            return EngineStatistics(tasks=0, abandoned=())
        return EngineStatistics(tasks=tasks.running, abandoned=tasks.abandoned)

    async def drain(self, grace: float) -> tuple[AbandonedHook, ...]:
        """Cancel every abandoned hook and wait up to ``grace`` seconds for them to end.

        Returns the hooks still running after that (those that swallow their
        cancellation). Leaving ``async with`` does the same and keeps waiting;
        a command-line program that must exit calls this first.
        """
        return await self._open_tasks().drain(grace, forever=False)

    # -- building runs ------------------------------------------------------------------
    async def build_protect(self, plan: Plan) -> Run:
        """Discover the graph, validate plan, parameters and secrets; return a ready run.

        Nothing is stored and no hook runs until :meth:`Run.execute`.
        """
        tasks = self._open_tasks()
        await self._recover_once()
        async with tasks.quiet_collector(self._quiet_gc):
            graph = await discover(plan, self.registry)
            return await self._build(OperationKind.PROTECT, plan, graph, new_run_id(), None)

    async def build_restore(
        self,
        checkpoint_id: str,
        *,
        parameters: Mapping[str, Mapping[str, Any]] | None = None,
        barrier: BarrierPolicy | str | None = None,
        timeouts: Timeouts | None = None,
    ) -> Run:
        """A restore of an ``available`` checkpoint over its stored graph.

        ``parameters`` (``"Type"`` / ``"Type#id"``) are merged over the plan's.
        """
        self._open_tasks()
        await self._recover_once()
        cp = await self.store.get_checkpoint(checkpoint_id)
        if cp.status is not CheckpointStatus.AVAILABLE:
            raise PlanError(
                f"checkpoint {checkpoint_id} is {cp.status.value}; only an available "
                "checkpoint can be restored"
            )
        plan = Plan.from_json(cp.plan)
        merged: dict[str, dict[str, Any]] = {k: dict(v) for k, v in plan.parameters.items()}
        for key, values in (parameters or {}).items():
            merged.setdefault(key, {}).update(values)
        # The protect plan's barriers (its own and its groups') are protect's: a restore
        # runs with ``barrier`` over every group, ``none`` unless asked.
        plan = attrs.evolve(
            plan,
            parameters=merged,
            barrier=barrier,
            groups=tuple(attrs.evolve(g, barrier=None) for g in plan.groups),
            timeouts=timeouts or plan.timeouts,
        )
        graph = ResourceGraph.from_json(cp.graph)
        async with self._open_tasks().quiet_collector(self._quiet_gc):
            return await self._build(OperationKind.RESTORE, plan, graph, new_run_id(), cp.id)

    async def build_delete(self, checkpoint_id: str) -> Run:
        """A delete of a checkpoint over its stored graph (any end state but deleted)."""
        self._open_tasks()
        await self._recover_once()
        cp = await self.store.get_checkpoint(checkpoint_id)
        if cp.status in (
            CheckpointStatus.DELETED,
            CheckpointStatus.PROTECTING,
            CheckpointStatus.DELETING,
        ):
            raise PlanError(
                f"checkpoint {checkpoint_id} is {cp.status.value}; it cannot be deleted now"
            )
        plan = Plan.from_json(cp.plan)
        plan = attrs.evolve(
            plan, barrier=None, groups=tuple(attrs.evolve(g, barrier=None) for g in plan.groups)
        )
        graph = ResourceGraph.from_json(cp.graph)
        async with self._open_tasks().quiet_collector(self._quiet_gc):
            return await self._build(OperationKind.DELETE, plan, graph, new_run_id(), cp.id)

    async def _build(
        self,
        op: OperationKind,
        plan: Plan,
        graph: ResourceGraph,
        run_id: str,
        checkpoint_id: str | None,
        resume: Resume | None = None,
    ) -> Run:
        spec = await _spec(
            self.registry, self.store, self._secrets, op, plan, graph, run_id, checkpoint_id, resume
        )
        if resume is None:  # (recovery thaws and finishes what a dead engine left: no refusal)
            await run_checks(spec, self._secrets, self.bank)
        return Run(
            spec,
            tasks=self._open_tasks(),
            store=self.store,
            after_finish=self._after_delete if op is OperationKind.DELETE else None,
            bank=self.bank,
            secrets=self._secrets,
            record_events=self._record_events,
            hub=self.hub,
            quiet_gc=self._quiet_gc,
        )

    # -- one-call operations ------------------------------------------------------------
    async def protect(self, plan: Plan) -> RunOutcome:
        """Protect ``plan``'s resources into a new checkpoint; raise RunError if it fails."""
        return await self.execute(await self.build_protect(plan))

    async def restore(
        self,
        checkpoint_id: str,
        *,
        parameters: Mapping[str, Mapping[str, Any]] | None = None,
        barrier: BarrierPolicy | str | None = None,
        timeouts: Timeouts | None = None,
    ) -> RunOutcome:
        run = await self.build_restore(
            checkpoint_id, parameters=parameters, barrier=barrier, timeouts=timeouts
        )
        return await self.execute(run)

    async def delete(self, checkpoint_id: str) -> RunOutcome:
        run = await self.build_delete(checkpoint_id)
        return await self.execute(run)

    async def execute(self, run: Run) -> RunOutcome:
        """Record the run in the store and execute it (delete also moves the checkpoint).

        A failed or cancelled protect whose plan sets ``delete_on_failure`` is
        deleted (through the plugins' delete operation) before the error is raised.
        """
        tasks = self._open_tasks()
        spec = run.spec
        # (The run record holds the whole graph: built with the collector held, as the run.)
        async with tasks.quiet_collector(self._quiet_gc):
            record = RunRecord(
                run_id=spec.run_id,
                operation=spec.operation,
                checkpoint_id=spec.checkpoint_id,
                plan=spec.plan.to_json(),
                graph=spec.graph.to_json(),
                status=RunStatus.RUNNING,
                started_wall=time.time(),
                leases=tuple(n.resource.key for n in run.nodes if n.leased),
            )
            # (A delete run's creation also moves its checkpoint to deleting, compare-and-set.)
            await _create_run(self.store, record, spec.plan.timeouts.lease_wait)
        if spec.operation is OperationKind.DELETE:
            await _clean_bank(self.bank, spec.checkpoint_id)
        try:
            return await run.execute()
        except (RunError, KeyboardInterrupt, SystemExit) as exc:
            # (A hook's KeyboardInterrupt/SystemExit comes with the RunError as its cause.)
            failed = isinstance(exc, RunError) or isinstance(exc.__cause__, RunError)
            if failed and spec.operation is OperationKind.PROTECT and spec.plan.delete_on_failure:
                # The plan asks that nothing a failed or cancelled protect saved is kept.
                with anyio.CancelScope(shield=True):
                    await self._cleanup_failed(spec.checkpoint_id)
            raise

    async def _cleanup_failed(self, checkpoint_id: str) -> None:
        try:
            await self.delete(checkpoint_id)
        except RunError as exc:
            _log.error("cleanup_failed", checkpoint_id=checkpoint_id, error=str(exc))

    async def retention(
        self, plan: Plan | str, keep: int
    ) -> tuple[list[CheckpointRecord], list[CheckpointRecord]]:
        """The plan's (a :class:`Plan` or its name) available checkpoints, newest first,
        split into (kept, to delete)."""
        self._open_tasks()
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
            raise PlanError(f"keep must be a whole number, 0 or more, not {keep!r}")
        available = await _available(self.store, _plan_name(plan))
        return available[:keep], available[keep:]

    async def retain(self, plan: Plan | str, keep: int) -> list[RunOutcome]:
        """Keep the newest ``keep`` available checkpoints of a plan; delete the others.

        Deletion goes through the plugins' delete operation, so nothing is orphaned.
        A delete that fails leaves its checkpoint ``error_deleting`` and is reported
        in the returned outcomes; the others still run.
        """
        _kept, doomed = await self.retention(plan, keep)
        outcomes: list[RunOutcome] = []
        for cp in doomed:
            try:
                outcomes.append(await self.delete(cp.id))
            except RunError as exc:
                outcomes.append(exc.outcome)
        return outcomes

    async def _after_delete(self, outcome: RunOutcome) -> None:
        if outcome.status is RunStatus.SUCCEEDED:
            await self.bank.delete_checkpoint(outcome.checkpoint_id)
            status = CheckpointStatus.DELETED
        else:
            status = CheckpointStatus.ERROR_DELETING
        await self.store.set_checkpoint_status(outcome.checkpoint_id, status)

    def subscribe(
        self, run_id: str | None = None, since: int = 0
    ) -> AbstractAsyncContextManager[Subscription]:
        """Subscribe to events: ``async with engine.subscribe(run_id) as events:``.

        With ``run_id``, the run's committed events after ``since`` are replayed
        from the store, then live ones follow with no gap and no duplicate, and the
        iteration ends after the run's ``RUN_FINISHED`` (this works across engine
        restarts: numbering continues). Without, every run's events from now on.
        Lifecycle events are delivered once committed and never dropped; a
        subscriber that falls behind loses progress ticks only (a ``TICKS_DROPPED``
        event says how many). The engine's cost does not grow with subscribers.
        """
        self._open_tasks()
        return self.hub.subscribe(run_id, since)

    async def _recover_once(self) -> None:
        if not self._recover_first or _RECOVERING.get():
            return  # (inside a recovery: its own clean-up must not wait for it)
        if self._recovered is None:
            await self.recover()
        else:
            await self._recovered.wait()

    async def recover(self) -> list[RunOutcome]:
        """Finish or clean up the runs an engine that died left unfinished (guarantee 5).

        Everything that may still be frozen is thawed (``ctx.recovering``); a protect
        whose cuts were all committed resumes ``on_main``/``on_complete``; one whose
        cuts were not fails and its saved data is deleted; restores and deletes
        resume. Hooks whose finish was committed are not run again; the others run
        with ``attempt`` + 1. Returns the outcome of every run it handled; runs a
        live engine holds are left to it (:meth:`recover_report` names them).
        """
        return list((await self.recover_report()).outcomes)

    async def recover_report(self) -> RecoveryReport:
        """:meth:`recover`, also naming the unfinished runs it left to the live engines
        that hold them (run, owner, lease expiry)."""
        self._open_tasks()
        if self._recovered is None:
            self._recovered = anyio.Event()
        token = _RECOVERING.set(True)
        try:
            return await recover_all(self)
        finally:
            _RECOVERING.reset(token)
            self._recovered.set()


async def _available(store: Store, plan_name: str) -> list[CheckpointRecord]:
    """Every available checkpoint of a plan, newest first (read in pages of 500)."""
    available: list[CheckpointRecord] = []
    before: str | None = None
    while True:
        page = await store.list_checkpoints(
            plan_name=plan_name, status=CheckpointStatus.AVAILABLE, limit=500, before_id=before
        )
        available.extend(page)
        if len(page) < 500:
            return available
        before = page[-1].id


def _plan_name(plan: Plan | str) -> str:
    if isinstance(plan, Plan):
        return plan.name
    if isinstance(plan, str):
        return plan
    raise TypeError(f"retain and retention take a Plan or a plan's name, not {type(plan).__name__}")


def _check_options(close_timeout: float, stall_threshold: float, safety_margin: float) -> None:
    if not safety_margin >= 0:
        raise ValueError(f"safety_margin must be 0 or more seconds, not {safety_margin!r}")
    if not close_timeout > 0:
        raise ValueError(
            f"close_timeout must be a positive number of seconds, not {close_timeout!r}"
        )
    if stall_threshold < 0:
        raise ValueError(
            f"stall_threshold must be 0 (off) or a number of seconds, not {stall_threshold!r}"
        )


async def _spec(
    registry: PluginRegistry,
    store: Store,
    secrets: SecretResolver | None,
    op: OperationKind,
    plan: Plan,
    graph: ResourceGraph,
    run_id: str,
    checkpoint_id: str | None,
    resume: Resume | None,
) -> RunSpec:
    """A validated run's spec: bindings, groups, parameters, secrets checked, saved info."""
    check_types(graph, registry)
    bindings: list[TypeBinding] = []
    for res in graph.resources:
        binding = registry.binding(res.type)
        assert binding is not None  # check_types guarantees it
        bindings.append(binding)
    assignment = assign_groups(graph, plan, _DEFAULT_BARRIER[op])
    params = merge_parameters(plan, graph, registry, op)
    await check_secrets(graph, params, secrets)
    saved: dict[ResourceKey, dict[str, Any]] = {}
    if checkpoint_id is not None:
        saved = await store.load_saved_info(checkpoint_id)
    if resume is not None and checkpoint_id != run_id:
        for key, info in (await store.load_saved_info(run_id)).items():
            saved.setdefault(key, {}).update(info)
    return RunSpec(
        run_id=run_id,
        checkpoint_id=checkpoint_id or run_id,
        operation=op,
        plan=plan,
        graph=graph,
        group_of=assignment.group_of,
        groups=assignment.barriers,
        bindings=tuple(bindings),
        params=tuple(params),
        saved=saved,
        restored=resume.restored if resume else {},
        attempts=resume.attempts if resume else {},
        done_hooks=resume.done_hooks if resume else {},
        first_seq=resume.first_seq if resume else 0,
        resumed=resume.marks if resume else None,
        started_wall=resume.started_wall if resume else None,
        sentinel_thaws=resume.sentinel if resume else {},
    )


async def _create_run(store: Store, record: RunRecord, wait: float) -> None:
    """Record the run with its resource leases, all or none, retrying while another live
    run holds one, up to ``wait`` seconds (then its ResourceBusyError is raised)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            await store.create_run(record)
        except ResourceBusyError as exc:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            _log.info("resource_busy_waiting", resource=ref(exc.resource), run_id=exc.run_id)
            await anyio.sleep(min(0.5, left))
        else:
            return


async def _clean_bank(bank: Bank, checkpoint_id: str | None) -> None:
    """Remove the temporary files of writers that are gone (a bank that can: ``cleanup``),
    of the whole bank or of one checkpoint; never a live writer's. Never fails the engine."""
    cleanup = getattr(bank, "cleanup", None)
    if cleanup is None:
        return
    try:
        if checkpoint_id is None:
            await cleanup()
        else:
            await cleanup(checkpoint_id=checkpoint_id)
    except Exception as exc:  # a bank it cannot read: its operations will say why
        _log.warning("bank_cleanup_failed", checkpoint_id=checkpoint_id, error=repr(exc))
