"""Crash recovery: finish or clean up the runs a dead engine left (DESIGN.md guarantee 5).

Everything is derived from the committed event log of the run, so it works with
any store that keeps one and hands out leases. Recovery does not import the
engine: the engine passes itself as a :class:`RecoveryHost`, the operations
recovery calls, and builds resumed runs from a :class:`Resume`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import anyio
import attrs

from karbor_async._graph import ResourceGraph
from karbor_async._log import get_logger
from karbor_async._plan import Plan
from karbor_async._safety import forget_firings, recorded_firings
from karbor_async._types import Hook, OperationKind, ResourceKey
from karbor_async.events import Event, EventKind
from karbor_async.exceptions import LeaseHeldError, RunError
from karbor_async.store import RunOutcome, RunRecord, Store

if TYPE_CHECKING:
    from karbor_async._registry import PluginRegistry
    from karbor_async._scheduler import Run

__all__ = [
    "HeldRun",
    "Marks",
    "RecoverableStore",
    "RecoveryHost",
    "RecoveryReport",
    "Resume",
    "recover_all",
    "replay",
]

_log = get_logger(__name__)


@runtime_checkable
class RecoverableStore(Protocol):
    """A store that can find unfinished runs and hand their lease to a new owner."""

    async def unfinished_runs(self) -> list[RunRecord]: ...

    async def acquire_lease(
        self, run_id: str, owner: str | None = None, ttl: float | None = None
    ) -> int: ...

    async def last_seq(self, run_id: str) -> int: ...

    async def release_lease(self, run_id: str) -> None: ...


@attrs.frozen
class HeldRun:
    """An unfinished run recovery left alone: a live engine holds its lease."""

    run_id: str
    operation: OperationKind
    owner: str
    expires: float
    """Until when (wall clock) the lease holds unless that engine renews it."""

    def to_json(self) -> dict[str, object]:
        return {
            "run_id": self.run_id,
            "operation": self.operation.value,
            "owner": self.owner,
            "expires": self.expires,
        }


@attrs.frozen
class RecoveryReport:
    """What one recovery did: the runs it finished or cleaned up, and those it left."""

    outcomes: tuple[RunOutcome, ...]
    held: tuple[HeldRun, ...]


@attrs.frozen
class Marks:
    """A resource's instants as an earlier attempt committed them (its engine clock)."""

    quiesced_at: float | None = None
    quiesced_wall: float | None = None
    cut_at: float | None = None
    crash_consistent: bool = False
    thawed_at: float | None = None


@attrs.frozen
class Resume:
    """What a recovered run carries over from the attempt that crashed."""

    done_hooks: Mapping[ResourceKey, frozenset[Hook]]
    attempts: Mapping[ResourceKey, int]
    restored: Mapping[ResourceKey, str]
    first_seq: int
    marks: Mapping[ResourceKey, Marks] = attrs.Factory(dict)
    started_wall: float | None = None
    """When the run first started (the recovered outcome keeps it)."""
    sentinel: Mapping[ResourceKey, Mapping[str, Any]] = attrs.Factory(dict)
    """The safety thaws the dead engine's sentinel ran, per resource (its journal)."""


class RecoveryHost(Protocol):
    """The engine operations recovery calls (the engine passes itself)."""

    @property
    def store(self) -> Store: ...

    @property
    def registry(self) -> PluginRegistry: ...

    async def _build(
        self,
        op: OperationKind,
        plan: Plan,
        graph: ResourceGraph,
        run_id: str,
        checkpoint_id: str | None,
        resume: Resume | None = None,
    ) -> Run:
        """A validated run over a stored plan and graph (``resume`` given: a resumed one)."""

    async def delete(self, checkpoint_id: str) -> RunOutcome:
        """Delete a checkpoint through the plugins' delete operation."""


@attrs.define
class _Replay:
    """What the committed events say about each resource."""

    done: dict[ResourceKey, set[Hook]] = attrs.Factory(dict)
    attempt: dict[ResourceKey, int] = attrs.Factory(dict)
    maybe_frozen: set[ResourceKey] = attrs.Factory(set)
    calling: dict[ResourceKey, tuple[Hook, bool]] = attrs.Factory(dict)
    """The last call started per resource: (hook, aborting)."""
    marks: dict[ResourceKey, Marks] = attrs.Factory(dict)
    """The instants committed by earlier attempts (their own engine clock)."""


def replay(events: Sequence[Event]) -> _Replay:
    r = _Replay()
    for e in events:
        key = e.resource
        if key is None:
            continue
        r.attempt[key] = max(r.attempt.get(key, 1), e.attempt)
        if e.kind is EventKind.STARTED and e.hook is not None:
            aborting = e.data.get("aborting") is not None
            r.calling[key] = (e.hook, aborting)
            if e.hook is Hook.PREPARE_BEGIN and e.operation is OperationKind.PROTECT:
                # Committed before a quiescing on_prepare_begin: it may have frozen (from
                # about then, if its QUIESCED was not committed).
                r.maybe_frozen.add(key)
                if not aborting:
                    r.marks[key] = Marks(quiesced_at=e.mono, quiesced_wall=e.wall)
        elif e.kind is EventKind.FINISHED and e.hook is not None:
            _hook, aborting = r.calling.get(key, (e.hook, False))
            if not aborting:
                r.done.setdefault(key, set()).add(e.hook)
            if e.hook is Hook.PREPARE_FINISH:
                r.maybe_frozen.discard(key)
        elif e.kind is EventKind.THAWED and not e.data.get("rescue"):
            # (a rescue thaw ran beside a quiesce that may have frozen after it)
            r.maybe_frozen.discard(key)
        if e.kind in (EventKind.QUIESCED, EventKind.CUT, EventKind.THAWED):
            at = e.data.get("at", e.mono)
            m = r.marks.get(key) or Marks()
            if e.kind is EventKind.QUIESCED:
                m = attrs.evolve(m, quiesced_at=at, quiesced_wall=e.wall, thawed_at=None)
            elif e.kind is EventKind.CUT:
                m = attrs.evolve(
                    m, cut_at=at, crash_consistent=bool(e.data.get("crash_consistent"))
                )
            elif not e.data.get("rescue"):
                m = attrs.evolve(m, thawed_at=at)
            r.marks[key] = m
    return r


async def recover_all(engine: RecoveryHost) -> RecoveryReport:
    store = engine.store
    if not isinstance(store, RecoverableStore):
        return RecoveryReport((), ())  # an in-memory store dies with its process
    outcomes: list[RunOutcome] = []
    held: list[HeldRun] = []
    held_runs = getattr(store, "held_runs", None)
    if held_runs is not None:
        for record, owner, expires in await held_runs():
            held.append(HeldRun(record.run_id, record.operation, owner, expires))
    for record in await store.unfinished_runs():
        try:
            await store.acquire_lease(record.run_id)
        except LeaseHeldError as exc:  # a live engine runs it (or took it first)
            held.append(HeldRun(record.run_id, record.operation, exc.owner, exc.expires))
            _log.info("recovery_left_held_run", run_id=record.run_id, owner=exc.owner)
            continue
        _log.warning("recovering_run", run_id=record.run_id, operation=record.operation.value)
        try:
            outcomes.append(await _recover_one(engine, store, record))
        except BaseException:
            # Leave the run recoverable by the next attempt (a resolver given, a fix made).
            with anyio.CancelScope(shield=True):
                await store.release_lease(record.run_id)
            raise
    return RecoveryReport(tuple(outcomes), tuple(held))


async def _recover_one(
    engine: RecoveryHost, store: RecoverableStore, record: RunRecord
) -> RunOutcome:
    events = await engine.store.read_events(record.run_id)
    r = replay(events)
    plan = Plan.from_json(record.plan)
    graph = ResourceGraph.from_json(record.graph)
    first_seq = await store.last_seq(record.run_id)
    restored = await engine.store.load_restored(record.run_id)
    resumable = True
    lost: dict[ResourceKey, str] = {}
    if record.operation is OperationKind.PROTECT:
        resumable = _cuts_committed(engine, record, graph, r)
        if resumable:
            lost = _cuts_lost(engine, record, graph, r)
            resumable = not lost
    attempts = {k: a + 1 for k, a in r.attempt.items()}
    fired = await recorded_firings(engine.store, record.run_id)
    resume = Resume(
        done_hooks={k: frozenset(v) for k, v in r.done.items()},
        attempts=attempts,
        restored=restored,
        first_seq=first_seq,
        marks=r.marks,
        started_wall=record.started_wall,
        sentinel=fired,
    )
    outcome = await _resume_or_clean(engine, record, r, plan, graph, resumable, resume, lost)
    if fired:  # (recorded on the run: the journal lets them go)
        await forget_firings(engine.store, record.run_id)
    return outcome


async def _resume_or_clean(
    engine: RecoveryHost,
    record: RunRecord,
    r: _Replay,
    plan: Plan,
    graph: ResourceGraph,
    resumable: bool,
    resume: Resume,
    lost: dict[ResourceKey, str],
) -> RunOutcome:
    checkpoint = None if record.operation is OperationKind.PROTECT else record.checkpoint_id
    run = await engine._build(
        record.operation, plan, graph, record.run_id, checkpoint or record.run_id, resume
    )
    if resumable:
        try:
            return await run.execute()
        except RunError as exc:
            if record.operation is OperationKind.PROTECT and plan.delete_on_failure:
                await _delete_checkpoint(engine, record)  # as for a protect in one process
            return exc.outcome
    # The cuts were not all committed, or one died with the process: the checkpoint
    # would not be consistent.
    outcome = await run.abort_after_crash(sorted(r.maybe_frozen), lost)
    await _delete_checkpoint(engine, record)
    return outcome


async def _delete_checkpoint(engine: RecoveryHost, record: RunRecord) -> None:
    """Delete what a recovered protect saved, through the plugins; a failed delete is
    logged (its checkpoint stays ``error_deleting``, for a later delete or prune)."""
    try:
        await engine.delete(record.checkpoint_id)
    except RunError as exc:
        _log.error("recovery_cleanup_failed", run_id=record.run_id, error=str(exc))


def _cuts_committed(
    engine: RecoveryHost, record: RunRecord, graph: ResourceGraph, r: _Replay
) -> bool:
    """True when every resource that has an on_prepare_finish committed its finish."""
    for res in graph.resources:
        binding = engine.registry.binding(res.type)
        if binding is None:
            return False
        op = binding.plugin.get_operation(record.operation, res.type)
        if getattr(op, Hook.PREPARE_FINISH.value, None) is None:
            continue
        if Hook.PREPARE_FINISH not in r.done.get(res.key, set()):
            return False
    return True


CUT_LOST = (
    "not resumed: its cut lived in the killed process (its type sets "
    "cut_outlives_process=False) and its on_main had not finished, so a resumed copy "
    "would hold a later state"
)


def _cuts_lost(
    engine: RecoveryHost, record: RunRecord, graph: ResourceGraph, r: _Replay
) -> dict[ResourceKey, str]:
    """The resources whose cut died with the process before their copy ended.

    A type with ``cut_outlives_process=False`` (an open read transaction) whose
    ``on_main`` did not commit its finish: its copy cannot be resumed. Such a
    resource makes its group fail, and since a checkpoint with a failed group is
    never restorable, recovery fails the whole run and deletes the checkpoint (the
    path of uncommitted cuts) rather than finish copies that would be deleted.
    """
    lost: dict[ResourceKey, str] = {}
    for res in graph.resources:
        binding = engine.registry.binding(res.type)
        if binding is None or binding.spec.cut_outlives_process:
            continue
        op = binding.plugin.get_operation(record.operation, res.type)
        if getattr(op, Hook.MAIN.value, None) is None:
            continue
        if Hook.MAIN not in r.done.get(res.key, set()):
            lost[res.key] = CUT_LOST
    return lost
