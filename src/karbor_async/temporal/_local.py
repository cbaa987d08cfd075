"""The parts of a Temporal-driven run that execute on one worker, with the local engine.

No Temporal here (the activities in ``_activities`` wrap these): each part is a
local :class:`~karbor_async._scheduler.Run` over a slice of the run's graph, so
every hook still gets the local engine's context, limits, events, progress,
scrubbing and guarantees:

- a group's prepare: the group's resources with their ``on_main`` and
  ``on_complete`` left out, under the group's barrier (quiesce, cuts, thaw,
  budgets, the sentinel, thaw on failure: all local);
- one ``on_main`` or ``on_complete``: a one-resource run with only that hook;
- the compensation of a group whose prepare worker was lost: the thaw of what
  its committed events say may still be frozen (``Run.abort_after_crash``);
- the start (discover, check, record the run under the workflow's lease) and the
  finish (one outcome from the parts' outcomes, stored under the lease).

Every part writes to the run's own records, under the workflow's fencing token
(``PostgresStore.fence``); only the start and the finish write ``RUN_STARTED``
and ``RUN_FINISHED`` and the outcome (:class:`RunView` drops the parts' own).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Mapping, Sequence
from typing import Any

import anyio
import attrs

from karbor_async._checks import run_checks
from karbor_async._engine import Engine, _spec
from karbor_async._graph import ResourceGraph, discover
from karbor_async._ordering import limit_order
from karbor_async._pg_store import PostgresStore
from karbor_async._plan import Plan
from karbor_async._recovery import replay
from karbor_async._runstate import RunSpec
from karbor_async._scheduler import Run
from karbor_async._sqlite_records import _loads_mapping
from karbor_async._types import (
    AbortReason,
    Hook,
    OperationKind,
    ResourceKey,
    ResourceStatus,
    RunStatus,
)
from karbor_async.events import Event, EventKind
from karbor_async.exceptions import LeaseLostError, ResourceBusyError, RunError, StoreError
from karbor_async.store import (
    CheckpointRecord,
    CheckpointStatus,
    GroupOutcome,
    ResourceOutcome,
    RunOutcome,
    RunRecord,
    key_from_str,
    key_to_str,
)
from karbor_async.temporal import _lease
from karbor_async.temporal._wire import DRIVER_PREFIX, NodeShape, RunShape

__all__ = ["Parts", "RunView", "compact", "merge_outcome"]

_RUN_EVENTS = (EventKind.RUN_STARTED, EventKind.RUN_FINISHED)
_ALL_HOOKS = frozenset(Hook)


class RunView:
    """The store as one part of a run sees it: the run's records, under its lease token.

    ``whole=False`` (a part): the part's ``RUN_STARTED``/``RUN_FINISHED`` and its
    outcome are kept back (:attr:`outcome`): the workflow's start and finish write
    the run's. Commits are the run's: one that finds the lease moved on raises
    :class:`~karbor_async.exceptions.LeaseLostError`.
    """

    def __init__(self, inner: PostgresStore, run_id: str, *, whole: bool = False) -> None:
        self._inner = inner
        self._run_id = run_id
        self._whole = whole
        self.outcome: RunOutcome | None = None
        self.lost: LeaseLostError | None = None
        """The run's token moved on: every later write is dropped, commits raise this."""

    # -- writes ---------------------------------------------------------------------------
    async def create_run(self, record: RunRecord) -> None:
        raise StoreError("a part of a Temporal-driven run does not create runs")

    def append(self, event: Event) -> None:
        if not self._whole and event.kind in _RUN_EVENTS:
            return
        if self.lost is None:
            try:
                self._inner.append(event)
            except LeaseLostError as exc:
                self.lost = exc  # (the engine learns it at its next commit)

    def save_info(self, checkpoint_id: str, key: ResourceKey, info: Mapping[str, Any]) -> None:
        if self.lost is None:
            try:
                self._inner.save_info(checkpoint_id, key, info)
            except LeaseLostError as exc:
                self.lost = exc

    def record_restored(self, run_id: str, key: ResourceKey, new_id: str) -> None:
        self._inner.record_restored(run_id, key, new_id)

    def release_resource(self, run_id: str, key: ResourceKey) -> None:
        self._inner.release_resource(run_id, key)

    def hold_background_writes(self, hold: bool) -> None:
        self._inner.hold_background_writes(hold)

    async def commit(self) -> None:
        if self.lost is not None:
            raise self.lost
        await self._inner.commit(run_id=self._run_id)

    async def finish_run(self, outcome: RunOutcome) -> None:
        if self._whole:
            await self._inner.finish_run(outcome)
        else:
            self.outcome = outcome
            await self.commit()

    async def set_checkpoint_status(
        self, checkpoint_id: str, status: CheckpointStatus | str
    ) -> None:
        await self._inner.set_checkpoint_status(checkpoint_id, status)

    async def record_late_thaw(self, run_id: str, key: ResourceKey, at: float) -> None:
        await self._inner.record_late_thaw(run_id, key, at)

    # -- reads ----------------------------------------------------------------------------
    async def get_run(self, run_id: str) -> RunRecord:
        return await self._inner.get_run(run_id)

    async def get_checkpoint(self, checkpoint_id: str) -> CheckpointRecord:
        return await self._inner.get_checkpoint(checkpoint_id)

    async def list_checkpoints(self, **kw: Any) -> Sequence[CheckpointRecord]:
        return await self._inner.list_checkpoints(**kw)

    async def list_runs(
        self, *, checkpoint_id: str | None = None, limit: int = 100
    ) -> Sequence[RunRecord]:
        return await self._inner.list_runs(checkpoint_id=checkpoint_id, limit=limit)

    async def load_saved_info(self, checkpoint_id: str) -> dict[ResourceKey, dict[str, Any]]:
        return await self._inner.load_saved_info(checkpoint_id)

    async def load_restored(self, run_id: str) -> dict[ResourceKey, str]:
        return await self._inner.load_restored(run_id)

    async def read_events(self, run_id: str, since: int = 0) -> Sequence[Event]:
        return await self._inner.read_events(run_id, since)


@attrs.frozen
class _Known:
    """What a worker keeps of a run it serves (the stored plan and graph, the spec)."""

    spec: RunSpec
    index: Mapping[ResourceKey, int]


def _leaf(group: BaseExceptionGroup[Any], kind: type[LeaseLostError]) -> LeaseLostError | None:
    for exc in group.exceptions:
        if isinstance(exc, kind):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _leaf(exc, kind)
            if found is not None:
                return found
    return None


def _place(spec: RunSpec, i: int) -> str:
    binding = spec.bindings[i]
    if not binding.spec.cut_outlives_process:
        return "process"
    if binding.spec.host_bound:
        return "host"
    return "any"


def _slice(
    spec: RunSpec,
    keep: Sequence[int],
    *,
    done: Mapping[ResourceKey, frozenset[Hook]],
    saved: Mapping[ResourceKey, Mapping[str, Any]] | None = None,
    attempts: Mapping[ResourceKey, int] | None = None,
) -> RunSpec:
    """The spec of a run over ``keep``'s resources only (edges among them kept)."""
    where = {old: new for new, old in enumerate(keep)}
    graph = ResourceGraph(
        resources=tuple(spec.graph.resources[i] for i in keep),
        edges=tuple((where[p], where[c]) for p, c in spec.graph.edges if p in where and c in where),
    )
    group_of = tuple(spec.group_of[i] for i in keep)
    return attrs.evolve(
        spec,
        graph=graph,
        group_of=group_of,
        groups={g: spec.groups[g] for g in dict.fromkeys(group_of)},
        bindings=tuple(spec.bindings[i] for i in keep),
        params=tuple(spec.params[i] for i in keep),
        saved=spec.saved if saved is None else saved,
        attempts=spec.attempts if attempts is None else attempts,
        done_hooks=done,
    )


class Parts:
    """Runs the parts of Temporal-driven runs on this worker's engine and store."""

    def __init__(self, engine: Engine, store: PostgresStore, *, cache: int = 16) -> None:
        self.engine = engine
        self.store = store
        self._cache: collections.OrderedDict[str, _Known] = collections.OrderedDict()
        self._size = cache
        self._memo: dict[str, dict[ResourceKey, tuple[str, dict[str, Any]]]] = {}
        """Per checkpoint: each resource's saved info as stored text and decoded."""

    # -- the run ----------------------------------------------------------------------------
    async def _known(self, run_id: str, token: int) -> _Known:
        """The run (cached), once its lease is checked: a stale ``token`` is refused."""
        current = await _lease.driven(self.store, run_id)
        if current is None or current[1] != token:
            raise LeaseLostError(
                f"run {run_id!r}: fencing token {token} is stale (the run ended, or its "
                "lease moved on); nothing is written with it"
            )
        self.store.fence(run_id, token, run_id)
        known = self._cache.get(run_id)
        if known is not None:
            self._cache.move_to_end(run_id)
            return known
        record = await self.store.get_run(run_id)
        plan = Plan.from_json(record.plan)
        graph = ResourceGraph.from_json(record.graph)
        spec = await self._spec(record.operation, plan, graph, run_id)
        known = _Known(spec, graph.index)
        self._cache[run_id] = known
        while len(self._cache) > self._size:
            gone, _known = self._cache.popitem(last=False)
            self._memo.pop(gone, None)
        return known

    async def _spec(
        self, op: OperationKind, plan: Plan, graph: ResourceGraph, run_id: str
    ) -> RunSpec:
        e = self.engine
        return await _spec(e.registry, self.store, e._secrets, op, plan, graph, run_id, None, None)

    def _run(self, spec: RunSpec, view: RunView) -> Run:
        e = self.engine
        return Run(
            spec,
            tasks=e._open_tasks(),
            store=view,
            bank=e.bank,
            secrets=e._secrets,
            record_events=True,
            hub=e.hub,
            quiet_gc=e._quiet_gc,
        )

    async def _execute(self, run: Run, view: RunView) -> RunOutcome:
        try:
            await run.execute()
        except RunError:
            pass  # (its outcome is the part's result; the finish tells the run's)
        except BaseExceptionGroup as group:
            lost = _leaf(group, LeaseLostError)
            if lost is None:
                raise
            raise lost from None  # the token moved on: the part is refused
        if view.lost is not None:
            raise view.lost
        assert view.outcome is not None
        return view.outcome

    async def _saved(self, checkpoint_id: str) -> dict[ResourceKey, Mapping[str, Any]]:
        """The checkpoint's saved info as stored now; each entry decoded once per worker
        while its text is unchanged (a hook activity reads them all: a parent's hooks read
        their children's, and each decode costs more than the read). Entries are shared
        between this worker's runs: hooks read saved info, they never change it in place
        (``ctx.save_info`` replaces it)."""
        rows = await self.store._queries.pool.fetch(
            "SELECT rtype, rid, info FROM saved_info WHERE checkpoint_id = $1", checkpoint_id
        )
        memo = self._memo.setdefault(checkpoint_id, {})
        out: dict[ResourceKey, Mapping[str, Any]] = {}
        for rtype, rid, text in rows:
            key = (str(rtype), str(rid))
            hit = memo.get(key)
            if hit is None or hit[0] != text:
                hit = memo[key] = (text, _loads_mapping(str(text)))
            out[key] = hit[1]
        return out

    # -- start --------------------------------------------------------------------------
    async def start(
        self, run_id: str, workflow_id: str, plan_json: Mapping[str, Any], lease_seconds: float
    ) -> RunShape:
        """Discover and check the plan, record the run under the workflow's lease (again
        after a retried start: the same run), and say what the workflow needs of it."""
        e = self.engine
        plan = Plan.from_json(plan_json)
        owner = DRIVER_PREFIX + workflow_id
        existing = await _lease.driven(self.store, run_id)
        if existing is not None and existing[0] == owner:
            record = await self.store.get_run(run_id)
            graph = ResourceGraph.from_json(record.graph)
            spec = await self._spec(OperationKind.PROTECT, plan, graph, run_id)
            token, started_wall = existing[1], record.started_wall
            fresh = False
        else:
            graph = await discover(plan, e.registry)
            spec = await self._spec(OperationKind.PROTECT, plan, graph, run_id)
            await run_checks(spec, e._secrets, e.bank)
            started_wall = time.time()
            fresh = True
        view = RunView(self.store, run_id, whole=True)
        run = self._run(spec, view)
        if fresh:
            record = RunRecord(
                run_id=run_id,
                operation=OperationKind.PROTECT,
                checkpoint_id=run_id,
                plan=plan.to_json(),
                graph=graph.to_json(),
                status=RunStatus.RUNNING,
                started_wall=started_wall,
                leases=tuple(n.resource.key for n in run.nodes if n.leased),
            )
            token = await _create(self.store, record, owner, lease_seconds, plan)
        self.store.fence(run_id, token, run_id)
        if fresh:
            run.rec.emit(
                EventKind.RUN_STARTED,
                None,
                None,
                resources=len(run.nodes),
                backend="temporal",
                workflow_id=workflow_id,
            )
            await view.commit()
        self._cache[run_id] = _Known(spec, graph.index)
        limits = plan.limits
        nodes = [
            NodeShape(
                type=n.resource.type,
                id=n.resource.id,
                group=n.gate.name,
                hooks=[
                    h.value
                    for h, fn in zip(Hook, (n.pb, n.pf, n.main, n.complete), strict=True)
                    if fn is not None
                ],
                quiesces=n.quiesces,
                cuts=n.cuts and n.pf is not None,
                place=_place(spec, i),
                limits=list(limit_order((n.binding.plugin.plugin_name(), n.resource.type), limits)),
                timeout=n.timeout,
            )
            for i, n in enumerate(run.nodes)
        ]
        return RunShape(
            run_id=run_id,
            checkpoint_id=run_id,
            operation=OperationKind.PROTECT.value,
            token=token,
            started_wall=started_wall,
            nodes=nodes,
            edges=[[p, c] for p, c in graph.edges],
            groups={g: p.value for g, p in spec.groups.items()},
            limits=dict(limits),
            run_timeout=plan.timeouts.run,
            abort_timeout=plan.timeouts.abort,
        )

    # -- a group's prepare ----------------------------------------------------------------
    async def group_run(self, run_id: str, token: int, group: str) -> tuple[Run, RunView]:
        """The local run of ``group``'s prepare waves (its main and complete left out)."""
        known = await self._known(run_id, token)
        spec = known.spec
        keep = [i for i, g in enumerate(spec.group_of) if g == group]
        later = frozenset({Hook.MAIN, Hook.COMPLETE})
        done = {spec.graph.resources[i].key: later for i in keep}
        view = RunView(self.store, run_id)
        return self._run(_slice(spec, keep, done=done), view), view

    async def prepare(self, run: Run, view: RunView) -> tuple[dict[str, Any], GroupOutcome]:
        """Execute a group's prepare run: its resources' outcomes and the group's."""
        outcome = await self._execute(run, view)
        [group] = outcome.groups.values()
        return {key_to_str(k): compact(r) for k, r in outcome.resources.items()}, group

    # -- one on_main or on_complete -----------------------------------------------------------
    async def hook_run(
        self, run_id: str, token: int, key: ResourceKey, hook: Hook, attempt: int
    ) -> tuple[Run, RunView]:
        """A one-resource run of ``hook`` alone, as ``attempt``, with the saved info now
        stored (what the prepare, or a killed attempt of this hook, saved)."""
        known = await self._known(run_id, token)
        spec = known.spec
        i = known.index[key]
        saved = await self._saved(spec.checkpoint_id)
        sliced = _slice(
            spec,
            [i],
            done={key: _ALL_HOOKS - {hook}},
            saved=saved,
            attempts={key: attempt},
        )
        # One resource: its group's barrier was the prepare's (the workflow holds it).
        from karbor_async._types import BarrierPolicy

        sliced = attrs.evolve(sliced, groups={g: BarrierPolicy.NONE for g in sliced.groups})
        view = RunView(self.store, run_id)
        return self._run(sliced, view), view

    async def hook(self, run: Run, view: RunView) -> ResourceOutcome:
        outcome = await self._execute(run, view)
        [resource] = outcome.resources.values()
        return resource

    # -- compensation -------------------------------------------------------------------
    async def compensate(self, run_id: str, token: int, group: str) -> dict[str, Any]:
        """Thaw what ``group``'s committed events say may be frozen (its prepare's worker
        was lost, or its activity failed): each such resource's aborting
        ``on_prepare_finish``, reason ``recovery``. Safe on what was never frozen."""
        known = await self._known(run_id, token)
        spec = known.spec
        keep = [i for i, g in enumerate(spec.group_of) if g == group]
        keys = {spec.graph.resources[i].key for i in keep}
        r = replay(await self.store.read_events(run_id))
        frozen = sorted(k for k in r.maybe_frozen if k in keys)
        view = RunView(self.store, run_id)
        later = frozenset({Hook.MAIN, Hook.COMPLETE})
        run = self._run(
            _slice(spec, keep, done={spec.graph.resources[i].key: later for i in keep}), view
        )
        outcome = await run.abort_after_crash(frozen)
        return {key_to_str(k): compact(x) for k, x in outcome.resources.items()}

    # -- finish ---------------------------------------------------------------------------
    async def finish(
        self,
        run_id: str,
        token: int,
        started_wall: float,
        parts: Mapping[str, Sequence[Mapping[str, Any]]],
        groups: Mapping[str, Mapping[str, Any]],
        skipped: Sequence[str],
        abort: str | None,
        notes: Mapping[str, str],
    ) -> RunOutcome:
        """One outcome from the parts; ``RUN_FINISHED`` and the outcome stored, the
        checkpoint moved to its end state, the lease given back (all under the token)."""
        record = await self.store.get_run(run_id)
        if record.outcome is not None:
            return record.outcome  # a retried finish: already stored
        known = await self._known(run_id, token)
        spec = known.spec
        view = RunView(self.store, run_id, whole=True)
        run = self._run(spec, view)
        for name, how in sorted(notes.items()):
            run.rec.emit(
                EventKind.GROUP_ABORTING,
                None,
                None,
                group=name,
                reason="worker_lost",
                thawed_by=how,
            )
        outcome = merge_outcome(spec, started_wall, parts, groups, skipped, abort, notes)
        for key in skipped:
            n = run.nodes[known.index[key_from_str(key)]]
            run.rec.emit(EventKind.SKIPPED, n, Hook.COMPLETE, because="dependent_failed")
        run.rec.emit(EventKind.RUN_FINISHED, None, None, status=outcome.status.value)
        await view.finish_run(outcome)
        self._cache.pop(run_id, None)
        self._memo.pop(run_id, None)
        return outcome


async def _create(
    store: PostgresStore, record: RunRecord, owner: str, lease_seconds: float, plan: Plan
) -> int:
    """Record the run with its resource leases under the workflow's lease, retrying while
    another live run holds one, up to the plan's ``lease_wait``."""
    deadline = time.monotonic() + plan.timeouts.lease_wait
    while True:
        try:
            return await _lease.create(store, record, owner, lease_seconds)
        except ResourceBusyError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            await anyio.sleep(min(0.5, left))


_DEFAULTS: dict[str, Any] = {
    "failed_hook": None,
    "error": None,
    "cut_at": None,
    "quiesced_at": None,
    "thawed_at": None,
    "crash_consistent": False,
    "thawed_early": False,
    "attempt": 1,
    "abandoned_hook": None,
    "thawed_late_at": None,
    "blocked_loop_s": 0.0,
    "errors": [],
    "window_approximate": False,
}


def compact(outcome: ResourceOutcome) -> dict[str, Any]:
    """A part's outcome of one resource as it travels through Temporal's history: only
    what differs from the defaults, without the resource and group (the finish has
    them). Payloads are limited (2 MB each by default): a 1,000-resource group's
    prepare result is about a tenth of its full JSON this way."""
    data = outcome.to_json()
    del data["resource"], data["group"]
    return {k: v for k, v in data.items() if k not in _DEFAULTS or v != _DEFAULTS[k]}


def _status_of(parts: Sequence[ResourceOutcome]) -> ResourceStatus:
    for p in parts:
        if p.status is not ResourceStatus.SUCCEEDED:
            return p.status
    return ResourceStatus.SUCCEEDED


def merge_outcome(
    spec: RunSpec,
    started_wall: float,
    parts: Mapping[str, Sequence[Mapping[str, Any]]],
    groups: Mapping[str, Mapping[str, Any]],
    skipped: Sequence[str],
    abort: str | None,
    notes: Mapping[str, str],
) -> RunOutcome:
    """The run's outcome from its parts' (prepare, then main, then complete), as the local
    engine would have built it in one process."""
    cancelled = abort in (AbortReason.CANCELLED.value, AbortReason.TIMEOUT.value)
    skip = set(skipped)
    resources: dict[ResourceKey, ResourceOutcome] = {}
    for i, res in enumerate(spec.graph.resources):
        name = key_to_str(res.key)
        whole = {"resource": res.to_json(), "group": spec.group_of[i]}
        got = [ResourceOutcome.from_json({**p, **whole}) for p in parts.get(name, ())]
        group = spec.group_of[i]
        if not got:
            status = ResourceStatus.CANCELLED if cancelled else ResourceStatus.ABORTED
            if group in notes:
                status = ResourceStatus.ABORTED
            resources[res.key] = ResourceOutcome(resource=res, group=group, status=status)
            continue
        first = got[0]
        hooks: list[Hook] = []
        errors: list[tuple[Hook, AbortReason | None, str]] = []
        for p in got:
            hooks.extend(h for h in p.hooks_run if h not in hooks)
            errors.extend(p.errors)
        status = _status_of(got)
        if status is ResourceStatus.SUCCEEDED:
            op_hooks = spec.bindings[i].plugin.get_operation(spec.operation, res.type)
            wants = {h for h in (Hook.MAIN, Hook.COMPLETE) if getattr(op_hooks, h.value, None)}
            if name in skip:
                status = ResourceStatus.SKIPPED
            elif not wants <= set(hooks):
                status = ResourceStatus.CANCELLED if cancelled else ResourceStatus.ABORTED
        failed = next((p for p in got if p.failed_hook is not None), None)
        resources[res.key] = attrs.evolve(
            first,
            status=status,
            hooks_run=tuple(h for h in Hook if h in hooks),
            failed_hook=failed.failed_hook if failed else None,
            error=failed.error if failed else None,
            errors=tuple(errors),
            attempt=max(p.attempt for p in got),
            blocked_loop_s=sum(p.blocked_loop_s for p in got),
        )
    group_outcomes = {name: GroupOutcome.from_json(g) for name, g in groups.items()}
    for name, policy in spec.groups.items():
        if name not in group_outcomes:
            members = [k for k, r in resources.items() if r.group == name]
            reason = AbortReason(abort) if abort else AbortReason.FAILURE
            group_outcomes[name] = GroupOutcome(
                name=name, barrier=policy, resources=len(members), cuts=0, skew=None, aborted=reason
            )
    if abort == AbortReason.CANCELLED.value:
        status_run = RunStatus.CANCELLED
        why: str | None = f"run {spec.run_id} was cancelled"
    elif abort == AbortReason.TIMEOUT.value:
        status_run = RunStatus.FAILED
        why = f"run {spec.run_id} exceeded its time limit of {spec.plan.timeouts.run} s"
    elif any(r.status is not ResourceStatus.SUCCEEDED for r in resources.values()):
        status_run = RunStatus.FAILED
        why = None
    else:
        status_run = RunStatus.SUCCEEDED
        why = None
    summary = None
    if status_run is not RunStatus.SUCCEEDED:
        counts: dict[str, int] = {}
        for r in resources.values():
            counts[r.status.value] = counts.get(r.status.value, 0) + 1
        summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        first_error = next((r.error for r in resources.values() if r.error), None)
        lost = sorted(notes)
        if why is not None:
            summary = f"{summary}; {why}"
        elif first_error is not None:
            summary = f"{summary}; first error: {first_error}"
        elif lost:
            summary = (
                f"{summary}; the worker preparing group(s) {', '.join(lost)} was lost "
                f"(thawed by {', '.join(notes[g] for g in lost)})"
            )
    ended = time.time()
    return RunOutcome(
        run_id=spec.run_id,
        checkpoint_id=spec.checkpoint_id,
        operation=spec.operation,
        status=status_run,
        started_wall=started_wall,
        ended_wall=ended,
        duration=ended - started_wall,
        recovered=False,
        resources=resources,
        groups=group_outcomes,
        restored={},
        error=summary,
    )
