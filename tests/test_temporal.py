"""The Temporal backend with workers in the test's process: rules, lease, secrets, cancel.

A real Temporal dev server (``temporal_server``) and PostgreSQL (``pg_cluster``);
the worker serves the test's own engine (its recording plugin), so the trace of
every hook call is checked against the ordering rules as for the local engine.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from typer.testing import CliRunner

from helpers import QUIESCING, SERVER, TYPES, VOLUME, key, res
from invariants import check_run
from karbor_async import (
    BarrierPolicy,
    Engine,
    Hook,
    Plan,
    PostgresStore,
    Resource,
    RunError,
    RunStatus,
    Timeouts,
)
from karbor_async._graph import ResourceGraph
from karbor_async.events import EventKind
from karbor_async.exceptions import LeaseLostError
from karbor_async.testing import RecordingPlugin, protectables_for
from pgcluster import PgCluster

temporal = pytest.importorskip("karbor_async.temporal")
from temporalio.client import Client  # noqa: E402
from temporalio.worker import Replayer  # noqa: E402

from karbor_async.temporal import Options, TemporalBackend, serve  # noqa: E402
from karbor_async.temporal._local import Parts  # noqa: E402

V3 = ("OS::Cinder::Volume", "v3")
EDGES = [("p1", "s1"), ("s1", "v1"), ("s1", "v2"), ("p1", "s2"), ("s2", "v3"), ("s2", "v1")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # (asyncpg and the Temporal SDK are asyncio only)


@pytest.fixture
def dsn(pg_cluster: PgCluster) -> str:
    return pg_cluster.dsn(pg_cluster.create_database("temporal"))


@asynccontextmanager
async def on_temporal(
    address: str,
    dsn: str,
    pg: PgCluster,
    plugins: list[Any],
    protectables: list[Any],
    *,
    queue: str,
    secrets: Callable[[str], Any] | None = None,
) -> AsyncIterator[tuple[TemporalBackend, PostgresStore, Client]]:
    """A worker in this process over an engine of ``plugins``; the backend to start runs."""
    client = await Client.connect(address)
    async with PostgresStore.open(dsn, password=pg.password) as store:
        engine = Engine(plugins, protectables, store=store, secrets=secrets, discover=False)
        async with engine, serve(engine, client, task_queue=queue):
            options = Options(heartbeat_timeout=5, compensate_wait=3)
            yield TemporalBackend(client, task_queue=queue, options=options), store, client


def _plan(barrier: BarrierPolicy = BarrierPolicy.CUT, **kw: Any) -> Plan:
    return Plan(name="t", resources=[res("p1")], barrier=barrier, timeouts=Timeouts(hook=30), **kw)


@pytest.mark.parametrize("barrier", list(BarrierPolicy))
async def test_a_plan_runs_on_temporal_under_every_rule(
    temporal_server: str, dsn: str, pg_cluster: PgCluster, barrier: BarrierPolicy
) -> None:
    """Every hook once, Karbor's edges, the group's barrier (``none`` as ``main``), the
    thaw invariant; the run is recorded as a local one is (events numbered, the
    checkpoint available, RUN_STARTED naming the backend); the workflow's history
    replays deterministically."""
    plugin = RecordingPlugin(TYPES)
    pairs = [(res(a), res(b)) for a, b in EDGES]
    queue = f"rules-{barrier.value}"
    async with on_temporal(
        temporal_server, dsn, pg_cluster, [plugin], protectables_for(pairs), queue=queue
    ) as (backend, store, _client):
        outcome = await backend.protect(_plan(barrier))
        events = await store.read_events(outcome.run_id)
        record = await store.get_run(outcome.run_id)
        cp = await store.get_checkpoint(outcome.run_id)
        history = await backend.handle(outcome.run_id).fetch_history()
    # Deterministic: the workflow replays its own history to the same decisions.
    from karbor_async.temporal._worker import _runner
    from karbor_async.temporal._workflow import RunWorkflow

    await Replayer(workflows=[RunWorkflow], workflow_runner=_runner()).replay_workflow(history)
    assert outcome.status is RunStatus.SUCCEEDED
    check_run(plugin.trace, ResourceGraph.from_json(record.graph), outcome, QUIESCING, events)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[0].kind is EventKind.RUN_STARTED and events[0].data["backend"] == "temporal"
    assert events[-1].kind is EventKind.RUN_FINISHED
    assert cp.status.value == "available" and record.status is RunStatus.SUCCEEDED
    assert outcome.skew is not None and len(outcome.quiesce_windows) == 2
    # Barrier none behaves like main here: every on_main after every on_prepare_finish.
    mains = [e.start for e in plugin.trace if e.hook is Hook.MAIN]
    finishes = [e.end or 0.0 for e in plugin.trace if e.hook is Hook.PREPARE_FINISH]
    assert min(mains) >= max(finishes)


async def test_a_failed_copy_fails_the_run_and_skips_its_parents_complete(
    temporal_server: str, dsn: str, pg_cluster: PgCluster
) -> None:
    """A raise in a volume's on_main: it fails, its ancestors' on_complete are skipped,
    the unrelated subtree finishes; the checkpoint ends ``error``."""
    plugin = RecordingPlugin(TYPES, faults={(f"{VOLUME}#v3", Hook.MAIN): "raise"})
    pairs = [(res(a), res(b)) for a, b in EDGES]
    async with on_temporal(
        temporal_server, dsn, pg_cluster, [plugin], protectables_for(pairs), queue="fail"
    ) as (backend, store, _client):
        with pytest.raises(RunError) as info:
            await backend.protect(_plan())
        outcome = info.value.outcome
        events = await store.read_events(outcome.run_id)
        record = await store.get_run(outcome.run_id)
    status = {k[1]: r.status.value for k, r in outcome.resources.items()}
    assert status["v3"] == "failed" and status["s2"] == "skipped" and status["p1"] == "skipped"
    assert status["v1"] == status["v2"] == status["s1"] == "succeeded"
    assert outcome.resources[key("v3")].failed_hook is Hook.MAIN
    assert record.status is RunStatus.FAILED
    check_run(plugin.trace, ResourceGraph.from_json(record.graph), outcome, QUIESCING, events)


async def test_the_workflow_history_holds_no_secret_value(
    temporal_server: str, dsn: str, pg_cluster: PgCluster
) -> None:
    """Activity inputs carry the plan's reference, never the value (Temporal keeps inputs
    and results in its history): the worker resolves it; the hook that failed with the
    value in its message is scrubbed before its result goes back to the workflow."""
    from test_secrets_scrubbed import DB, SECRET, SPELLINGS, Leaky

    async def resolver(name: str) -> str:
        assert name == "db-password"
        return SECRET

    plan = Plan(
        name="db", resources=[Resource(DB, "d1")], parameters={DB: {"password": "db-password"}}
    )
    async with on_temporal(
        temporal_server, dsn, pg_cluster, [Leaky()], [], queue="secrets", secrets=resolver
    ) as (backend, _store, _client):
        run_id = await backend.start_protect(plan)
        with pytest.raises(RunError) as info:
            await backend.outcome(run_id)
        history = await backend.handle(run_id).fetch_history()
    text = _history_text(history.to_json_dict())
    assert "db-password" in text  # (the reference is there: the history was read)
    assert "login failed" in (info.value.outcome.resources[(DB, "d1")].error or "")
    for name, spelling in SPELLINGS.items():
        assert spelling not in text, f"the secret's {name} is in the workflow history"


def _history_text(doc: Any) -> str:
    """The history as text, with every payload's data decoded (it is base64 JSON)."""
    parts: list[str] = []

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                if k == "data" and isinstance(v, str):
                    parts.append(base64.b64decode(v).decode(errors="replace"))
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(doc)
    return json.dumps(doc) + "\n".join(parts)


async def test_recover_never_resumes_a_run_temporal_drives(dsn: str, pg_cluster: PgCluster) -> None:
    """A run whose lease a workflow owns (``temporal:<workflow id>``) is listed as held by
    recovery of any engine, even once its lease expired, and left alone."""
    from karbor_async._types import OperationKind
    from karbor_async.store import RunRecord
    from karbor_async.temporal import _lease

    plan = _plan()
    record = RunRecord(
        run_id="20260101T000000-abcdef",
        operation=OperationKind.PROTECT,
        checkpoint_id="20260101T000000-abcdef",
        plan=plan.to_json(),
        graph=ResourceGraph((res("p1"),), ()).to_json(),
        status=RunStatus.RUNNING,
        started_wall=0.0,
    )
    async with PostgresStore.open(dsn, password=pg_cluster.password) as store:
        await _lease.create(store, record, "temporal:karbor-x", 0.05)
        await anyio.sleep(0.2)  # expired
        async with Engine([], store=store, discover=False) as engine:
            report = await engine.recover_report()
        assert report.outcomes == ()
        [held] = report.held
        assert held.run_id == record.run_id and held.owner == "temporal:karbor-x"
        assert (await store.get_run(record.run_id)).status is RunStatus.RUNNING


async def test_a_part_with_a_stale_fencing_token_writes_nothing(
    dsn: str, pg_cluster: PgCluster
) -> None:
    """Once the run's token moved on (the workflow took the lease again), a worker still
    writing with the old one is refused: its writes are dropped and it is told."""
    plugin = RecordingPlugin(TYPES)
    pairs = [(res(a), res(b)) for a, b in EDGES]
    async with PostgresStore.open(dsn, password=pg_cluster.password) as store:
        engine = Engine([plugin], protectables_for(pairs), store=store, discover=False)
        async with engine:
            parts = Parts(engine, store)
            shape = await parts.start("20260101T000000-fenced", "karbor-f", _plan().to_json(), 30)
            token = await store.acquire_lease(shape.run_id, owner="temporal:karbor-f")
            assert token == shape.token + 1
            before = len(await store.read_events(shape.run_id))
            with pytest.raises(LeaseLostError, match="stale"):
                await parts.group_run(shape.run_id, shape.token, "default")
            # A part that started before the token moved: its writes are dropped, and the
            # engine is told at its next commit.
            run, view = await parts.group_run(shape.run_id, token, "default")
            await store.acquire_lease(shape.run_id, owner="temporal:karbor-f")
            with pytest.raises(LeaseLostError):
                await parts.prepare(run, view)
            assert len(await store.read_events(shape.run_id)) == before
            assert not any(e.hook is Hook.PREPARE_FINISH for e in plugin.trace if not e.aborting)


async def test_cancelling_the_workflow_thaws_and_ends_the_run_cancelled(
    temporal_server: str, dsn: str, pg_cluster: PgCluster
) -> None:
    """Cancelled while servers are quiesced (a volume's quiesce-time hook is slow): the
    prepare activity is cancelled the anyio way, the local engine thaws both servers,
    and the run and its checkpoint end ``cancelled``."""
    plugin = RecordingPlugin(TYPES, delays={(f"{VOLUME}#v3", Hook.PREPARE_BEGIN): 30.0})
    pairs = [(res(a), res(b)) for a, b in EDGES]
    async with on_temporal(
        temporal_server, dsn, pg_cluster, [plugin], protectables_for(pairs), queue="cancel"
    ) as (backend, store, _client):
        run_id = await backend.start_protect(_plan())
        with anyio.fail_after(30):
            # (the plugin's trace has no event to wait on: poll it)
            while not any(e.hook is Hook.PREPARE_BEGIN and e.resource == V3 for e in plugin.trace):  # noqa: ASYNC110
                await anyio.sleep(0.05)
        await backend.cancel(run_id)
        with anyio.fail_after(60), pytest.raises(RunError) as info:
            await backend.outcome(run_id)
        outcome = info.value.outcome
        cp = await store.get_checkpoint(run_id)
        events = await store.read_events(run_id)
    assert outcome.status is RunStatus.CANCELLED and cp.status.value == "cancelled"
    thaws = {e.resource for e in plugin.trace if e.hook is Hook.PREPARE_FINISH and e.aborting}
    assert {key("s1"), key("s2")} <= thaws
    quiesced = {e.resource for e in events if e.kind is EventKind.QUIESCED}
    thawed = {e.resource for e in events if e.kind is EventKind.THAWED}
    assert quiesced and quiesced <= thawed
    assert not any(e.hook is Hook.MAIN for e in plugin.trace)


def test_protect_on_temporal_with_the_sqlite_store_exits_2(tmp_path: Any) -> None:
    """Workers on other hosts cannot share an SQLite file: the command says so."""
    from karbor_async._cli import app

    plan = tmp_path / "plan.toml"
    plan.write_text(f'name = "x"\nresources = [{{ type = "{SERVER}", id = "s1" }}]\n')
    result = CliRunner().invoke(
        app,
        ["protect", str(plan), "--backend", "temporal", "--db", str(tmp_path / "k.db")],
        env={"KARBOR_STORE": None},
    )
    assert result.exit_code == 2, result.output
    assert "PostgreSQL store" in result.output and "SQLite" in result.output


async def test_a_cut_that_lives_in_the_process_keeps_its_prepare_activity_open(
    temporal_server: str, dsn: str, pg_cluster: PgCluster
) -> None:
    """A type with ``cut_outlives_process=False`` (an open read transaction): its group's
    prepare activity signals its result and stays open until that resource's on_main
    and on_complete ended on the same worker; then the workflow lets it go."""
    from karbor_async import ResourceType

    types = (*TYPES[:2], ResourceType(VOLUME, cut_outlives_process=False))
    plugin = RecordingPlugin(types)
    pairs = [(res(a), res(b)) for a, b in EDGES]
    async with on_temporal(
        temporal_server, dsn, pg_cluster, [plugin], protectables_for(pairs), queue="held"
    ) as (backend, store, _client):
        run_id = await backend.start_protect(_plan())
        outcome = await backend.outcome(run_id)
        history = await backend.handle(run_id).fetch_history()
        events = await store.read_events(run_id)
        record = await store.get_run(run_id)
    assert outcome.status is RunStatus.SUCCEEDED
    check_run(plugin.trace, ResourceGraph.from_json(record.graph), outcome, QUIESCING, events)
    kinds = [e.WhichOneof("attributes") for e in history.events]
    assert "workflow_execution_signaled_event_attributes" in kinds
    cancel = kinds.index("activity_task_cancel_requested_event_attributes")
    volume_hooks = {  # scheduled event id of each hook activity of a volume
        e.event_id
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
        and e.activity_task_scheduled_event_attributes.activity_type.name == "karbor-hook"
        and VOLUME.encode() in e.activity_task_scheduled_event_attributes.input.SerializeToString()
    }
    done = [
        i
        for i, e in enumerate(history.events)
        if e.HasField("activity_task_completed_event_attributes")
        and e.activity_task_completed_event_attributes.scheduled_event_id in volume_hooks
    ]
    assert len(done) == 6 and cancel > max(done)  # held until their main and complete ended


class _Stuck:
    """A server whose quiesce then holds the worker's loop past the heartbeat timeout
    (as a hung driver call would): Temporal takes the prepare activity as lost while
    the worker is alive, so the workflow's compensation runs there."""

    def __init__(self, thaws: list[str]) -> None:
        self.thaws = thaws

    async def on_prepare_begin(self, ctx: Any) -> None:
        ctx.mark_quiesced()
        time.sleep(6.0)  # noqa: ASYNC251  (the point: the loop, so heartbeats, stop)

    async def on_prepare_finish(self, ctx: Any) -> None:
        self.thaws.append(ctx.aborting.value if ctx.aborting else "-")


async def test_a_prepare_lost_by_a_live_worker_is_compensated_there(
    temporal_server: str, dsn: str, pg_cluster: PgCluster
) -> None:
    """The prepare activity misses its heartbeats (the loop held 6 s, the timeout 2 s):
    the workflow sends the compensation to that worker's own queue, the worker (alive)
    takes it and thaws what the committed events say may be frozen, the workflow
    records ``compensation`` and fails the group (its cuts are not known)."""
    from karbor_async import ProtectionPlugin, ResourceType

    thaws: list[str] = []

    class StuckPlugin(ProtectionPlugin):
        name = "stuck"
        types = (ResourceType(SERVER, quiesces=True, snapshots=False),)

        def get_protect_operation(self, resource_type: str) -> object:
            return _Stuck(thaws)

    client = await Client.connect(temporal_server)
    plan = Plan(name="stuck", resources=[res("s1")], timeouts=Timeouts(hook=30))
    async with PostgresStore.open(dsn, password=pg_cluster.password) as store:
        engine = Engine([StuckPlugin()], [], store=store, discover=False, stall_threshold=0)
        async with engine, serve(engine, client, task_queue="stuck"):
            options = Options(heartbeat_timeout=2, compensate_wait=10)
            backend = TemporalBackend(client, task_queue="stuck", options=options)
            with anyio.fail_after(60), pytest.raises(RunError) as info:
                await backend.protect(plan)
            events = await store.read_events(info.value.outcome.run_id)
    lost = [e.data.get("thawed_by") for e in events if e.kind is EventKind.GROUP_ABORTING]
    assert "compensation" in lost
    # Thawed: by the prepare itself once the loop ran again (its finish committed, the
    # compensation then finds nothing frozen), or by the compensation (``recovery``).
    assert thaws and set(thaws) <= {"-", "recovery"}
    assert info.value.outcome.status is RunStatus.FAILED


async def test_the_run_limit_stops_a_run_on_temporal(
    temporal_server: str, dsn: str, pg_cluster: PgCluster
) -> None:
    """``timeouts.run`` is the workflow's: past it, the copies still running are
    cancelled (their activities, the anyio way) and the run ends failed, saying why."""
    plugin = RecordingPlugin(TYPES, delays={(VOLUME, Hook.MAIN): 60.0})
    pairs = [(res(a), res(b)) for a, b in EDGES]
    plan = Plan(name="t", resources=[res("p1")], timeouts=Timeouts(hook=120, run=3.0))
    async with on_temporal(
        temporal_server, dsn, pg_cluster, [plugin], protectables_for(pairs), queue="limit"
    ) as (backend, store, _client):
        with anyio.fail_after(60), pytest.raises(RunError) as info:
            await backend.protect(plan)
        record = await store.get_run(info.value.outcome.run_id)
    outcome = info.value.outcome
    assert outcome.status is RunStatus.FAILED and "time limit" in (outcome.error or "")
    assert record.status is RunStatus.FAILED
    mains = [e for e in plugin.trace if e.hook is Hook.MAIN and e.resource[0] == VOLUME]
    assert mains and all(e.outcome == "cancelled" for e in mains)
    assert {outcome.resources[key(v)].status.value for v in ("v1", "v2", "v3")} == {"cancelled"}
