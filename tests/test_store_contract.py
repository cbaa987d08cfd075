"""The store contract: every Store implementation passes these (DESIGN.md section 5).

Parametrised over ``MemoryStore`` (asyncio and trio), ``SqliteStore``
(asyncio only: aiosqlite) and ``PostgresStore`` (asyncio only: asyncpg; a database
of its own per test in the session's ``pg_cluster``, skipped without the server
except under CI). Reads are made after ``commit()``: the SQLite store
reads what is committed, the memory store what was written.
"""

from __future__ import annotations

import itertools
import tempfile
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from karbor_async._memory import MemoryStore
from karbor_async._pg_store import PostgresStore
from karbor_async._sqlite import SqliteStore
from karbor_async._types import (
    BarrierPolicy,
    Hook,
    OperationKind,
    Resource,
    ResourceKey,
    ResourceStatus,
    RunStatus,
)
from karbor_async.events import Event, EventKind
from karbor_async.exceptions import (
    CheckpointBusyError,
    CheckpointNotFoundError,
    IllegalTransitionError,
    ResourceBusyError,
    StoreError,
)
from karbor_async.store import (
    CheckpointRecord,
    CheckpointStatus,
    GroupOutcome,
    ResourceOutcome,
    RunOutcome,
    RunRecord,
    Store,
)

CS = CheckpointStatus

# DESIGN.md section 5, written out again here so the test also checks store.py.
LEGAL: Mapping[CheckpointStatus, frozenset[CheckpointStatus]] = {
    CS.PROTECTING: frozenset({CS.AVAILABLE, CS.ERROR, CS.CANCELLED}),
    CS.AVAILABLE: frozenset({CS.DELETING}),
    CS.ERROR: frozenset({CS.DELETING}),
    CS.CANCELLED: frozenset({CS.DELETING}),
    CS.ERROR_DELETING: frozenset({CS.DELETING}),
    CS.DELETING: frozenset({CS.DELETED, CS.ERROR_DELETING}),
    CS.DELETED: frozenset(),
}

IMPLS = [
    ("memory", "asyncio"),
    ("memory", "trio"),
    ("sqlite", "asyncio"),
    # the session's pg_cluster, taken by getfixturevalue: marked service by hand
    pytest.param(("postgresql", "asyncio"), marks=pytest.mark.service),
]


@pytest.fixture(params=IMPLS, ids="-".join)
def impl(request: pytest.FixtureRequest) -> tuple[str, str]:
    param: tuple[str, str] = request.param
    return param


@pytest.fixture
def anyio_backend(impl: tuple[str, str]) -> Any:
    return (impl[1], {})


@pytest.fixture
async def store(
    impl: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Store]:
    if impl[0] == "memory":
        yield MemoryStore()
    elif impl[0] == "postgresql":
        cluster = request.getfixturevalue("pg_cluster")
        dsn = cluster.dsn(cluster.create_database("contract"))
        async with PostgresStore.open(dsn, password=cluster.password) as pg_store:
            yield pg_store
    else:
        async with SqliteStore.open(tmp_path / "karbor.db") as sqlite_store:
            yield sqlite_store


@pytest.fixture
async def durable(
    impl: tuple[str, str], tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[Any, Any]]:
    """A durable store (SQLite or PostgreSQL; the memory store has no such methods), and a
    function opening the same store read-only."""
    if impl[0] == "memory":
        pytest.skip("the memory store keeps nothing to import into or reopen read-only")
    if impl[0] == "postgresql":
        cluster = request.getfixturevalue("pg_cluster")
        dsn = cluster.dsn(cluster.create_database("contract"))
        async with PostgresStore.open(dsn, password=cluster.password) as pg_store:
            yield (
                pg_store,
                lambda: PostgresStore.open(dsn, password=cluster.password, read_only=True),
            )
    else:
        path = tmp_path / "karbor.db"
        async with SqliteStore.open(path) as sqlite_store:
            yield sqlite_store, lambda: SqliteStore.open(path, read_only=True)


# -- builders ------------------------------------------------------------------------


def run_record(
    run_id: str,
    *,
    operation: OperationKind = OperationKind.PROTECT,
    checkpoint_id: str | None = None,
    plan_name: str = "nightly",
    started: float = 1_700_000_000.0,
) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        operation=operation,
        checkpoint_id=checkpoint_id or run_id,
        plan={"name": plan_name, "resources": [{"type": "OS::Nova::Server", "id": "s1"}]},
        graph={
            "nodes": [["OS::Nova::Server", "s1"], ["OS::Cinder::Volume", "v1"]],
            "edges": [[["OS::Nova::Server", "s1"], ["OS::Cinder::Volume", "v1"]]],
        },
        status=RunStatus.RUNNING,
        started_wall=started,
    )


SERVER = Resource("OS::Nova::Server", "s1", "web")
VOLUME = Resource("OS::Cinder::Volume", "v1", "data", {"size": 10})


def outcome(
    run: RunRecord, status: RunStatus = RunStatus.SUCCEEDED, *, error: str | None = None
) -> RunOutcome:
    resources = {
        SERVER.key: ResourceOutcome(
            resource=SERVER,
            group="default",
            status=ResourceStatus.SUCCEEDED,
            hooks_run=tuple(Hook),
            quiesced_at=10.0,
            thawed_at=10.25,
        ),
        VOLUME.key: ResourceOutcome(
            resource=VOLUME,
            group="default",
            status=ResourceStatus.FAILED
            if status is RunStatus.FAILED
            else ResourceStatus.SUCCEEDED,
            hooks_run=(Hook.PREPARE_BEGIN, Hook.PREPARE_FINISH),
            failed_hook=Hook.MAIN if status is RunStatus.FAILED else None,
            error="HookError: boom" if status is RunStatus.FAILED else None,
            cut_at=10.1,
            attempt=2,
        ),
    }
    return RunOutcome(
        run_id=run.run_id,
        checkpoint_id=run.checkpoint_id,
        operation=run.operation,
        status=status,
        started_wall=run.started_wall,
        ended_wall=run.started_wall + 5.0,
        duration=5.0,
        resources=resources,
        groups={"default": GroupOutcome("default", BarrierPolicy.MAIN, 2, 1, 0.0)},
        restored={VOLUME.key: "v-new"} if run.operation is OperationKind.RESTORE else {},
        error=error,
    )


def event(
    run_id: str,
    seq: int,
    kind: EventKind = EventKind.STARTED,
    *,
    resource: ResourceKey | None = VOLUME.key,
    hook: Hook | None = Hook.MAIN,
    data: Mapping[str, Any] | None = None,
) -> Event:
    return Event(
        run_id=run_id,
        seq=seq,
        kind=kind,
        operation=OperationKind.PROTECT,
        wall=1_700_000_000.0 + seq,
        mono=100.0 + seq / 8,
        resource=resource,
        hook=hook,
        group="default",
        attempt=1,
        data=data or {},
    )


async def drive_to(store: Store, run: RunRecord, status: CheckpointStatus) -> None:
    """Create ``run``'s checkpoint and move it to ``status`` along legal transitions."""
    await store.create_run(run)
    if status is CS.PROTECTING:
        return
    if status in (CS.AVAILABLE, CS.ERROR, CS.CANCELLED):
        run_status = {
            CS.AVAILABLE: RunStatus.SUCCEEDED,
            CS.ERROR: RunStatus.FAILED,
            CS.CANCELLED: RunStatus.CANCELLED,
        }[status]
        await store.finish_run(outcome(run, run_status))
        return
    await store.finish_run(outcome(run))
    await store.set_checkpoint_status(run.run_id, CS.DELETING)
    if status is CS.DELETED:
        await store.set_checkpoint_status(run.run_id, CS.DELETED)
    elif status is CS.ERROR_DELETING:
        await store.set_checkpoint_status(run.run_id, CS.ERROR_DELETING)


# -- runs and checkpoints ------------------------------------------------------------


async def test_protect_run_creates_a_protecting_checkpoint(store: Store) -> None:
    """A protect run creates its checkpoint (same id), protecting, with the plan and graph."""
    run = run_record("cp-1", plan_name="web-tier")
    await store.create_run(run)
    assert await store.get_run("cp-1") == run
    cp = await store.get_checkpoint("cp-1")
    assert cp.id == "cp-1"
    assert cp.plan_name == "web-tier"
    assert cp.status is CS.PROTECTING
    assert cp.created_wall == run.started_wall
    assert cp.plan == run.plan
    assert cp.graph == run.graph
    assert cp.outcome is None


async def test_restore_and_delete_runs_create_no_checkpoint(store: Store) -> None:
    """Restore and delete are runs with their own ids, recorded against the checkpoint."""
    protect = run_record("cp-1")
    await store.create_run(protect)
    await store.finish_run(outcome(protect))
    restore = run_record("rs-1", operation=OperationKind.RESTORE, checkpoint_id="cp-1")
    delete = run_record("dl-1", operation=OperationKind.DELETE, checkpoint_id="cp-1")
    await store.create_run(restore)
    await store.create_run(delete)
    assert await store.get_run("rs-1") == restore
    assert (await store.get_run("dl-1")).operation is OperationKind.DELETE
    with pytest.raises(CheckpointNotFoundError):
        await store.get_checkpoint("rs-1")
    assert [c.id for c in await store.list_checkpoints()] == ["cp-1"]


async def test_unknown_ids_raise_not_found(store: Store) -> None:
    """Reading a run or checkpoint that does not exist raises CheckpointNotFoundError."""
    with pytest.raises(CheckpointNotFoundError):
        await store.get_run("nope")
    with pytest.raises(CheckpointNotFoundError):
        await store.get_checkpoint("nope")
    with pytest.raises(CheckpointNotFoundError):
        await store.set_checkpoint_status("nope", CS.DELETING)
    with pytest.raises(CheckpointNotFoundError):
        await store.finish_run(outcome(run_record("nope")))


async def test_duplicate_run_id_is_refused(store: Store) -> None:
    """Creating a run whose id exists raises and keeps the first run."""
    first = run_record("cp-1", plan_name="first")
    await store.create_run(first)
    with pytest.raises(StoreError):
        await store.create_run(run_record("cp-1", plan_name="second"))
    assert await store.get_run("cp-1") == first


@pytest.mark.parametrize(
    ("run_status", "cp_status"),
    [
        (RunStatus.SUCCEEDED, CS.AVAILABLE),
        (RunStatus.FAILED, CS.ERROR),
        (RunStatus.CANCELLED, CS.CANCELLED),
    ],
)
async def test_finish_run_stores_outcome_and_ends_checkpoint(
    store: Store, run_status: RunStatus, cp_status: CheckpointStatus
) -> None:
    """finish_run stores the outcome on run and checkpoint and moves the checkpoint to its end."""
    run = run_record("cp-1")
    await store.create_run(run)
    result = outcome(run, run_status, error=None if run_status is RunStatus.SUCCEEDED else "x")
    await store.finish_run(result)
    stored_run = await store.get_run("cp-1")
    assert stored_run.status is run_status
    assert stored_run.outcome == result
    cp = await store.get_checkpoint("cp-1")
    assert cp.status is cp_status
    assert cp.outcome == result


async def test_outcome_round_trips_exactly(store: Store) -> None:
    """Every field of a run outcome survives the store: resources, groups, restored ids, skew."""
    await store.create_run(run_record("cp-1"))
    restore = run_record("rs-1", operation=OperationKind.RESTORE, checkpoint_id="cp-1")
    await store.create_run(restore)
    result = outcome(restore, RunStatus.FAILED, error="one resource failed")
    await store.finish_run(result)
    stored = (await store.get_run("rs-1")).outcome
    assert stored is not None
    assert stored == result
    assert stored.restored == {VOLUME.key: "v-new"}
    assert stored.resources[VOLUME.key].attempt == 2
    assert stored.resources[VOLUME.key].failed_hook is Hook.MAIN
    assert stored.quiesce_windows == {SERVER.key: 0.25}
    assert stored.resources[VOLUME.key].resource.extra == {"size": 10}


async def test_finishing_a_finished_protect_run_raises(store: Store) -> None:
    """A protect run ends once: finishing it again raises and changes nothing."""
    run = run_record("cp-1")
    await store.create_run(run)
    first = outcome(run)
    await store.finish_run(first)
    with pytest.raises(IllegalTransitionError):
        await store.finish_run(outcome(run, RunStatus.FAILED))
    assert (await store.get_checkpoint("cp-1")).status is CS.AVAILABLE
    assert (await store.get_run("cp-1")).outcome == first


async def test_finishing_a_finished_restore_run_raises(store: Store) -> None:
    """Restore records go in_progress -> succeeded | failed | cancelled, once."""
    await store.create_run(run_record("cp-1"))
    restore = run_record("rs-1", operation=OperationKind.RESTORE, checkpoint_id="cp-1")
    await store.create_run(restore)
    await store.finish_run(outcome(restore, RunStatus.CANCELLED))
    with pytest.raises(IllegalTransitionError):
        await store.finish_run(outcome(restore, RunStatus.SUCCEEDED))
    assert (await store.get_run("rs-1")).status is RunStatus.CANCELLED


async def test_finishing_as_running_raises(store: Store) -> None:
    """A run cannot 'finish' with status running."""
    run = run_record("cp-1")
    await store.create_run(run)
    with pytest.raises(IllegalTransitionError):
        await store.finish_run(outcome(run, RunStatus.RUNNING))
    assert (await store.get_checkpoint("cp-1")).status is CS.PROTECTING


@pytest.mark.parametrize(
    ("old", "new"),
    list(itertools.product(CheckpointStatus, CheckpointStatus)),
    ids=lambda s: s.value,
)
async def test_checkpoint_lifecycle(
    store: Store, old: CheckpointStatus, new: CheckpointStatus
) -> None:
    """Legal transitions apply; illegal ones raise IllegalTransitionError and change nothing."""
    run = run_record("cp-1")
    await drive_to(store, run, old)
    assert (await store.get_checkpoint("cp-1")).status is old
    if new in LEGAL[old]:
        await store.set_checkpoint_status("cp-1", new)
        assert (await store.get_checkpoint("cp-1")).status is new
    else:
        with pytest.raises(IllegalTransitionError):
            await store.set_checkpoint_status("cp-1", new)
        assert (await store.get_checkpoint("cp-1")).status is old


async def test_cancelled_delete_can_be_retried(store: Store) -> None:
    """deleting -> error_deleting -> deleting -> deleted (a cancelled delete is retried)."""
    run = run_record("cp-1")
    await drive_to(store, run, CS.ERROR_DELETING)
    await store.set_checkpoint_status("cp-1", CS.DELETING)
    await store.set_checkpoint_status("cp-1", CS.DELETED)
    assert (await store.get_checkpoint("cp-1")).status is CS.DELETED


# -- listing -------------------------------------------------------------------------


async def make_many(store: Store) -> list[tuple[float, str, str, CheckpointStatus]]:
    """30 checkpoints over two plans and three end states, some sharing a creation time."""
    made = []
    statuses = [CS.AVAILABLE, CS.ERROR, CS.PROTECTING]
    for i in range(30):
        created = 1_700_000_000.0 + (i // 3) * 60  # three per minute: ties broken by id
        plan = "db" if i % 2 else "web"
        cid = f"cp-{i:03d}"
        run = run_record(cid, plan_name=plan, started=created)
        status = statuses[i % 3]
        await drive_to(store, run, status)
        made.append((created, cid, plan, status))
    made.sort(reverse=True)
    return made


async def test_list_checkpoints_newest_first_with_filters(store: Store) -> None:
    """Newest first (ties by id, descending); filters by plan, status and [since, until)."""
    made = await make_many(store)
    assert [c.id for c in await store.list_checkpoints(limit=1000)] == [m[1] for m in made]
    got = await store.list_checkpoints(plan_name="db", limit=1000)
    assert [c.id for c in got] == [m[1] for m in made if m[2] == "db"]
    assert all(c.plan_name == "db" for c in got)
    got = await store.list_checkpoints(status=CS.ERROR, limit=1000)
    assert [c.id for c in got] == [m[1] for m in made if m[3] is CS.ERROR]
    got = await store.list_checkpoints(plan_name="web", status=CS.AVAILABLE, limit=1000)
    assert [c.id for c in got] == [m[1] for m in made if m[2] == "web" and m[3] is CS.AVAILABLE]
    since, until = 1_700_000_000.0 + 120, 1_700_000_000.0 + 300
    got = await store.list_checkpoints(since=since, until=until, limit=1000)
    assert [c.id for c in got] == [m[1] for m in made if since <= m[0] < until]
    assert len(await store.list_checkpoints(limit=4)) == 4
    assert await store.list_checkpoints(plan_name="nothing") == []


@pytest.mark.parametrize("page", [1, 4, 7, 30])
async def test_list_checkpoints_pages_with_before_id(store: Store, page: int) -> None:
    """Paging with before_id visits every checkpoint once, in order, for any page size."""
    made = await make_many(store)
    for filters in ({}, {"plan_name": "db"}, {"status": CS.AVAILABLE}):
        expected = [
            m[1]
            for m in made
            if filters.get("plan_name", m[2]) == m[2] and filters.get("status", m[3]) is m[3]
        ]
        seen: list[str] = []
        before: str | None = None
        while True:
            rows = await store.list_checkpoints(limit=page, before_id=before, **filters)
            assert len(rows) <= page
            if not rows:
                break
            seen += [c.id for c in rows]
            before = rows[-1].id
        assert seen == expected


async def test_unknown_before_id_gives_an_empty_page(store: Store) -> None:
    await make_many(store)
    assert await store.list_checkpoints(before_id="no-such-id") == []


async def test_list_runs_by_checkpoint(store: Store) -> None:
    """list_runs: newest first, all runs or one checkpoint's, limited."""
    protect = run_record("cp-1", started=1.0)
    await store.create_run(protect)
    await store.finish_run(outcome(protect))
    await store.create_run(run_record("cp-2", started=2.0))
    await store.create_run(
        run_record("rs-1", operation=OperationKind.RESTORE, checkpoint_id="cp-1", started=3.0)
    )
    await store.create_run(
        run_record("dl-1", operation=OperationKind.DELETE, checkpoint_id="cp-1", started=4.0)
    )
    assert [r.run_id for r in await store.list_runs()] == ["dl-1", "rs-1", "cp-2", "cp-1"]
    assert [r.run_id for r in await store.list_runs(checkpoint_id="cp-1")] == [
        "dl-1",
        "rs-1",
        "cp-1",
    ]
    assert [r.run_id for r in await store.list_runs(limit=2)] == ["dl-1", "rs-1"]
    assert await store.list_runs(checkpoint_id="none") == []


# -- events --------------------------------------------------------------------------


async def test_events_are_kept_in_order_per_run_and_replayed_since(store: Store) -> None:
    """Each run's lifecycle log comes back in seq order; since=N gives seq > N."""
    await store.create_run(run_record("cp-1"))
    await store.create_run(run_record("cp-2"))
    kinds = [EventKind.RUN_STARTED, EventKind.STARTED, EventKind.QUIESCED, EventKind.FINISHED]
    sent: dict[str, list[Event]] = {"cp-1": [], "cp-2": []}
    for seq in range(1, 41):
        for run_id in ("cp-1", "cp-2"):
            e = event(run_id, seq, kinds[seq % len(kinds)], data={"n": seq, "run": run_id})
            store.append(e)
            sent[run_id].append(e)
    await store.commit()
    for run_id, events in sent.items():
        assert list(await store.read_events(run_id)) == events
        assert list(await store.read_events(run_id, since=25)) == events[25:]
        assert list(await store.read_events(run_id, since=40)) == []
    assert list(await store.read_events("no-such-run")) == []


async def test_event_fields_round_trip(store: Store) -> None:
    """Every field of a lifecycle event survives: resource, hook, group, attempt, data."""
    await store.create_run(run_record("cp-1"))
    events = [
        event("cp-1", 1, EventKind.RUN_STARTED, resource=None, hook=None),
        event("cp-1", 2, EventKind.FAILED, data={"error": "Boom: x", "chain": ["a", "b"]}),
        Event(
            run_id="cp-1",
            seq=3,
            kind=EventKind.BARRIER_RELEASED,
            operation=OperationKind.RESTORE,
            wall=1.5,
            mono=2.25,
            group="g1",
            attempt=3,
            data={"nested": {"k": [1, 2.5, None, True]}},
        ),
    ]
    for e in events:
        store.append(e)
    await store.commit()
    assert list(await store.read_events("cp-1")) == events


async def test_events_appended_after_a_commit_follow_it(store: Store) -> None:
    """Replay from a seq seen earlier continues without gap or duplicate."""
    await store.create_run(run_record("cp-1"))
    for seq in range(1, 6):
        store.append(event("cp-1", seq))
    await store.commit()
    first = await store.read_events("cp-1")
    for seq in range(6, 11):
        store.append(event("cp-1", seq))
    await store.commit()
    rest = await store.read_events("cp-1", since=first[-1].seq)
    assert [e.seq for e in [*first, *rest]] == list(range(1, 11))


async def test_concurrent_commits_all_return(store: Store) -> None:
    """Many tasks appending and committing at once all return, with nothing lost."""
    await store.create_run(run_record("cp-1"))
    counter = itertools.count(1)

    async def worker() -> None:
        for _ in range(20):
            store.append(event("cp-1", next(counter)))
            await store.commit()

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(worker)
    assert [e.seq for e in await store.read_events("cp-1")] == list(range(1, 201))


# -- saved info and restored ids -----------------------------------------------------


async def test_saved_info_round_trip(store: Store) -> None:
    """save_info replaces a resource's info; each checkpoint keeps its own."""
    await store.create_run(run_record("cp-1"))
    await store.create_run(run_record("cp-2"))
    store.save_info("cp-1", VOLUME.key, {"snapshot": "snap-1", "chunks": [1, 2]})
    store.save_info("cp-1", SERVER.key, {"flavor": "m1", "meta": {"a": None}})
    store.save_info("cp-2", VOLUME.key, {"snapshot": "other"})
    store.save_info("cp-1", VOLUME.key, {"snapshot": "snap-2"})
    await store.commit()
    assert await store.load_saved_info("cp-1") == {
        VOLUME.key: {"snapshot": "snap-2"},
        SERVER.key: {"flavor": "m1", "meta": {"a": None}},
    }
    assert await store.load_saved_info("cp-2") == {VOLUME.key: {"snapshot": "other"}}
    assert await store.load_saved_info("none") == {}


async def test_saved_info_is_copied_both_ways(store: Store) -> None:
    """Mutating the dict given to save_info, or the one returned, does not change the store."""
    await store.create_run(run_record("cp-1"))
    info: dict[str, Any] = {"list": [1]}
    store.save_info("cp-1", VOLUME.key, info)
    info["list"].append(2)
    await store.commit()
    loaded = await store.load_saved_info("cp-1")
    assert loaded == {VOLUME.key: {"list": [1]}}
    loaded[VOLUME.key]["list"].append(3)
    assert await store.load_saved_info("cp-1") == {VOLUME.key: {"list": [1]}}


async def test_restored_ids_round_trip(store: Store) -> None:
    """record_restored maps original keys to new ids, per restore run."""
    await store.create_run(run_record("cp-1"))
    for rid in ("rs-1", "rs-2"):
        await store.create_run(
            run_record(rid, operation=OperationKind.RESTORE, checkpoint_id="cp-1")
        )
    store.record_restored("rs-1", VOLUME.key, "vol-new")
    store.record_restored("rs-1", SERVER.key, "srv-new")
    store.record_restored("rs-2", VOLUME.key, "vol-other")
    await store.commit()
    assert await store.load_restored("rs-1") == {VOLUME.key: "vol-new", SERVER.key: "srv-new"}
    assert await store.load_restored("rs-2") == {VOLUME.key: "vol-other"}
    assert await store.load_restored("none") == {}


async def test_finish_run_commits_what_was_written_before(store: Store) -> None:
    """finish_run commits: events and saved info written before it are readable after it."""
    run = run_record("cp-1")
    await store.create_run(run)
    store.append(event("cp-1", 1))
    store.save_info("cp-1", VOLUME.key, {"snap": "s"})
    await store.finish_run(outcome(run))
    assert [e.seq for e in await store.read_events("cp-1")] == [1]
    assert await store.load_saved_info("cp-1") == {VOLUME.key: {"snap": "s"}}


# -- model check: the SQLite store behaves as the memory store ---------------------------

_ID = st.integers(0, 6)
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("create"), _ID, st.sampled_from(["a", "b"]), st.integers(0, 4)),
        st.tuples(st.just("status"), _ID, st.sampled_from(list(CheckpointStatus))),
        st.tuples(
            st.just("finish"),
            _ID,
            st.sampled_from([RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED]),
        ),
        st.tuples(
            st.just("list"),
            st.sampled_from([None, "a", "b"]),
            st.sampled_from([None, *CheckpointStatus]),
            st.integers(1, 4),
            st.none() | _ID,
        ),
    ),
    max_size=40,
)


async def _apply(store: Store, op: tuple[Any, ...]) -> object:
    """Apply one operation; return its result or the type of what it raised."""
    try:
        if op[0] == "create":
            await store.create_run(run_record(f"cp-{op[1]}", plan_name=op[2], started=op[3]))
            return None
        if op[0] == "status":
            await store.set_checkpoint_status(f"cp-{op[1]}", op[2])
            return None
        if op[0] == "finish":
            run = await store.get_run(f"cp-{op[1]}")
            await store.finish_run(outcome(run, op[2]))
            return None
        _, plan, status, limit, before = op
        rows = await store.list_checkpoints(
            plan_name=plan,
            status=status,
            limit=limit,
            before_id=None if before is None else f"cp-{before}",
        )
        return [(c.id, c.status, c.plan_name) for c in rows]
    except StoreError as exc:
        return type(exc)


async def _compare(ops: list[tuple[Any, ...]], durable: Store) -> None:
    memory = MemoryStore()
    created: set[str] = set()
    finished: set[str] = set()
    for op in ops:
        run_id = f"cp-{op[1]}" if op[0] != "list" else ""
        if op[0] == "create" and run_id in created:
            continue
        if op[0] == "finish" and (run_id in finished or run_id not in created):
            continue
        expected = await _apply(memory, op)
        got = await _apply(durable, op)
        assert got == expected, op
        if op[0] == "create":
            created.add(run_id)
        if op[0] == "finish" and expected is None:
            finished.add(run_id)
    everything = await durable.list_checkpoints(limit=1000)
    assert everything == await memory.list_checkpoints(limit=1000)


async def _compare_sqlite(ops: list[tuple[Any, ...]], path: Path) -> None:
    async with SqliteStore.open(path) as sqlite_store:
        await _compare(ops, sqlite_store)


@given(_OPS)
def test_sqlite_store_agrees_with_memory_store(ops: list[tuple[Any, ...]]) -> None:
    """Random lifecycles and listings give the same results and errors on both stores."""
    with tempfile.TemporaryDirectory() as tmp:
        anyio.run(_compare_sqlite, ops, Path(tmp) / "karbor.db", backend="asyncio")


_TABLES = (
    "runs, checkpoints, saved_info, restored, run_seq, events, progress, resource_leases,"
    " sentinel_firings"
)


async def _compare_postgres(ops: list[tuple[Any, ...]], dsn: str, password: str) -> None:
    async with PostgresStore.open(dsn, password=password) as pg_store:
        try:
            await _compare(ops, pg_store)
        finally:  # (one database for every example: each starts from an empty store)
            await pg_store._w.submit(lambda c: c.execute(f"TRUNCATE {_TABLES}"))


@pytest.fixture
def model_dsn(request: pytest.FixtureRequest) -> tuple[str, str]:
    cluster = request.getfixturevalue("pg_cluster")
    return cluster.dsn(cluster.create_database("model")), cluster.password


@pytest.mark.service  # the session's pg_cluster, taken by getfixturevalue
@given(ops=_OPS)
def test_postgres_store_agrees_with_memory_store(
    model_dsn: tuple[str, str], ops: list[tuple[Any, ...]]
) -> None:
    """The same random lifecycles and listings, against PostgreSQL."""
    anyio.run(_compare_postgres, ops, *model_dsn, backend="asyncio")


async def test_resource_leases_are_taken_all_or_none_and_given_back(store: Store) -> None:
    """A run created with leases holds them: another run over one of them is refused with
    ResourceBusyError naming the resource and the holder, and takes none of its own; a
    released lease and a finished run's leases are free again."""
    first = attrs.evolve(run_record("cp-1"), leases=(SERVER.key, VOLUME.key))
    await store.create_run(first)
    other = Resource("OS::Cinder::Volume", "v2")
    second = attrs.evolve(run_record("cp-2"), leases=(other.key, VOLUME.key))
    with pytest.raises(ResourceBusyError) as busy:
        await store.create_run(second)
    assert busy.value.resource == VOLUME.key and busy.value.run_id == "cp-1"
    assert "OS::Cinder::Volume#v1 is held by run cp-1" in str(busy.value)
    with pytest.raises(CheckpointNotFoundError):
        await store.get_run("cp-2")  # refused whole: no run, no checkpoint
    third = attrs.evolve(run_record("cp-3"), leases=(other.key,))
    await store.create_run(third)  # (v2 was not taken by the refused run)

    store.release_resource("cp-1", VOLUME.key)
    await store.commit()
    await store.create_run(attrs.evolve(run_record("cp-4"), leases=(VOLUME.key,)))
    with pytest.raises(ResourceBusyError):
        await store.create_run(attrs.evolve(run_record("cp-5"), leases=(SERVER.key,)))
    await store.finish_run(outcome(first))
    await store.create_run(attrs.evolve(run_record("cp-5"), leases=(SERVER.key,)))


async def test_a_delete_run_takes_its_checkpoint_compare_and_set(store: Store) -> None:
    """Creating a delete run moves its checkpoint to deleting in the same step; a second
    delete of it is refused with CheckpointBusyError naming the first, and creates no run."""
    protect = run_record("cp-1")
    await store.create_run(protect)
    await store.finish_run(outcome(protect))
    await store.create_run(run_record("dl-1", operation=OperationKind.DELETE, checkpoint_id="cp-1"))
    assert (await store.get_checkpoint("cp-1")).status is CS.DELETING
    with pytest.raises(CheckpointBusyError) as busy:
        await store.create_run(
            run_record("dl-2", operation=OperationKind.DELETE, checkpoint_id="cp-1")
        )
    assert busy.value.run_id == "dl-1" and "is being deleted by run dl-1" in str(busy.value)
    with pytest.raises(CheckpointNotFoundError):
        await store.get_run("dl-2")


async def test_an_abandoned_resource_stays_leased_after_its_run_ends(store: Store) -> None:
    """A run that ends with a resource's hook abandoned (still running in its engine)
    keeps that resource's lease until the hook ends and gives it back; the others are
    free once the run ends."""
    first = attrs.evolve(run_record("cp-1"), leases=(SERVER.key, VOLUME.key))
    await store.create_run(first)
    ended = outcome(first, RunStatus.FAILED)
    volume = attrs.evolve(ended.resources[VOLUME.key], abandoned_hook=Hook.PREPARE_FINISH)
    await store.finish_run(attrs.evolve(ended, resources={**ended.resources, VOLUME.key: volume}))
    await store.create_run(attrs.evolve(run_record("cp-2"), leases=(SERVER.key,)))
    with pytest.raises(ResourceBusyError):
        await store.create_run(attrs.evolve(run_record("cp-3"), leases=(VOLUME.key,)))
    store.release_resource("cp-1", VOLUME.key)  # the abandoned hook ended
    await store.commit()
    await store.create_run(attrs.evolve(run_record("cp-3"), leases=(VOLUME.key,)))


# -- what the durable stores add: imports, hook records, read-only opening ---------------


def _imported(n: int) -> list[CheckpointRecord]:
    statuses = [CS.AVAILABLE, CS.ERROR, CS.DELETED]
    return [
        CheckpointRecord(
            id=f"imp-{i:03d}",
            plan_name=f"plan-{i % 2}",
            status=statuses[i % 3],
            created_wall=1_600_000_000.0 + i,
            plan={"name": f"plan-{i % 2}"},
            graph={"nodes": [["OS::Nova::Server", f"s{i}"]]},
        )
        for i in range(n)
    ]


async def test_import_checkpoints_inserts_them_whole_or_not_at_all(
    durable: tuple[Any, Any],
) -> None:
    """Imported checkpoints list, page and read like stored ones (their protect runs too);
    an import holding an id already stored is refused whole."""
    store, _ = durable
    assert await store.import_checkpoints(_imported(7)) == 7
    listed = await store.list_checkpoints(plan_name="plan-1", limit=10)
    assert [c.id for c in listed] == ["imp-005", "imp-003", "imp-001"]
    assert (await store.get_checkpoint("imp-002")).status is CS.DELETED
    run = await store.get_run("imp-001")
    assert (run.operation, run.status) == (OperationKind.PROTECT, RunStatus.FAILED)
    again = [*_imported(9)[7:], _imported(1)[0]]
    with pytest.raises(StoreError, match="cannot be imported again"):
        await store.import_checkpoints(again)
    assert len(await store.list_checkpoints(limit=100)) == 7
    with pytest.raises(CheckpointNotFoundError):
        await store.get_checkpoint("imp-007")


async def test_hook_records_follow_the_lifecycle_events(durable: tuple[Any, Any]) -> None:
    """Per resource, hook and attempt: the status of its latest event, times, the error."""
    store, _ = durable
    await store.create_run(run_record("cp-1"))
    seq = iter(range(1, 100))
    for e in [
        event("cp-1", next(seq), EventKind.RUN_STARTED, resource=None, hook=None),
        event("cp-1", next(seq), resource=SERVER.key, hook=Hook.PREPARE_BEGIN),
        event("cp-1", next(seq), EventKind.QUIESCED, resource=SERVER.key, hook=Hook.PREPARE_BEGIN),
        event("cp-1", next(seq), EventKind.FINISHED, resource=SERVER.key, hook=Hook.PREPARE_BEGIN),
        event("cp-1", next(seq)),
        event("cp-1", next(seq), EventKind.FAILED, data={"error": "IOError: disk"}),
        attrs.evolve(event("cp-1", next(seq)), attempt=2),
        event("cp-1", next(seq), EventKind.SKIPPED, resource=SERVER.key, hook=Hook.COMPLETE),
    ]:
        store.append(e)
    await store.commit()
    records = await store.load_hook_records("cp-1")
    summary = [(r.resource, r.hook, r.attempt, r.status.value, r.error) for r in records]
    assert summary == [
        (SERVER.key, Hook.PREPARE_BEGIN, 1, "finished", None),
        (VOLUME.key, Hook.MAIN, 1, "failed", "IOError: disk"),
        (VOLUME.key, Hook.MAIN, 2, "started", None),
        (SERVER.key, Hook.COMPLETE, 1, "skipped", None),
    ]
    begin = records[0]
    assert (begin.started_wall, begin.ended_wall) == (1_700_000_002.0, 1_700_000_004.0)
    assert (begin.first_seq, begin.last_seq, begin.group) == (2, 4, "default")
    assert records[2].ended_wall is None and records[3].started_wall is None
    assert await store.load_hook_records("other") == []


async def test_a_store_opened_read_only_reads_everything_and_refuses_every_write(
    durable: tuple[Any, Any],
) -> None:
    store, read_only = durable
    run = run_record("cp-1")
    await store.create_run(run)
    store.append(event("cp-1", 1))
    store.save_info("cp-1", VOLUME.key, {"snap": "s1"})
    await store.finish_run(outcome(run))
    async with read_only() as reader:
        assert (await reader.get_checkpoint("cp-1")).status is CS.AVAILABLE
        assert [c.id for c in await reader.list_checkpoints()] == ["cp-1"]
        assert [e.seq for e in await reader.read_events("cp-1")] == [1]
        assert await reader.load_saved_info("cp-1") == {VOLUME.key: {"snap": "s1"}}
        assert await reader.unfinished_runs() == []
        with pytest.raises(StoreError):
            reader.append(event("cp-1", 2))
        with pytest.raises(StoreError):
            await reader.create_run(run_record("cp-2"))
        with pytest.raises(StoreError):
            await reader.set_checkpoint_status("cp-1", CS.DELETING)
    assert (await store.get_checkpoint("cp-1")).status is CS.AVAILABLE
    assert [r.run_id for r in await store.list_runs()] == ["cp-1"]
