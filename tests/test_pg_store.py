"""The PostgreSQL store beyond the contract: refusals, secrets, seq numbering, leases.

Each test makes its own database in the session's ``pg_cluster`` (skipped without
the server, except under CI).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
from anyio.streams.text import TextReceiveStream

from helpers import SERVER, TYPES
from karbor_async import Engine, Plan, Resource, Timeouts
from karbor_async._pg_schema import schema_version, scrub_dsn
from karbor_async._pg_store import PostgresStore
from karbor_async._types import OperationKind, RunStatus
from karbor_async.events import Event, EventKind
from karbor_async.exceptions import (
    ForeignFileError,
    LeaseHeldError,
    LeaseLostError,
    NewerSchemaError,
    StoreError,
    StoreFileError,
)
from karbor_async.store import RunRecord
from karbor_async.testing import RecordingPlugin, protectables_for
from pgcluster import PgCluster

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {})


def _dsn(cluster: PgCluster) -> str:
    return cluster.dsn(cluster.create_database("pgstore"))


def run_record(run_id: str) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        operation=OperationKind.PROTECT,
        checkpoint_id=run_id,
        plan={"name": "nightly"},
        graph={"nodes": [], "edges": []},
        status=RunStatus.RUNNING,
        started_wall=time.time(),
    )


def event(run_id: str, seq: int) -> Event:
    return Event(
        run_id=run_id,
        seq=seq,
        kind=EventKind.STARTED,
        operation=OperationKind.PROTECT,
        wall=1.0,
        mono=2.0,
        resource=("OS::Nova::Server", "s1"),
    )


async def test_a_database_of_another_application_is_refused_untouched(
    pg_cluster: PgCluster,
) -> None:
    name = pg_cluster.create_database("foreign")
    pg_cluster.psql("CREATE TABLE invoices (id int)", dbname=name)
    with pytest.raises(ForeignFileError, match=r"not a karbor-async store.*invoices"):
        async with PostgresStore.open(pg_cluster.dsn(name), password=pg_cluster.password):
            pass
    tables = pg_cluster.psql("SELECT tablename FROM pg_tables WHERE schemaname='public'", name)
    assert tables.split() == ["invoices"]


async def test_a_newer_store_is_refused_untouched(pg_cluster: PgCluster) -> None:
    dsn = _dsn(pg_cluster)
    async with PostgresStore.open(dsn, password=pg_cluster.password):
        pass
    name = dsn.rsplit("/", 1)[1]
    newer = schema_version() + 1
    pg_cluster.psql(f"UPDATE karbor_meta SET value = '{newer}' WHERE key = 'schema_version'", name)
    with pytest.raises(NewerSchemaError, match=f"version {newer}.*upgrade karbor-async"):
        async with PostgresStore.open(dsn, password=pg_cluster.password):
            pass


async def test_reopening_keeps_what_was_stored(pg_cluster: PgCluster) -> None:
    dsn = _dsn(pg_cluster)
    async with PostgresStore.open(dsn, password=pg_cluster.password) as store:
        await store.create_run(run_record("cp-1"))
    async with PostgresStore.open(dsn, password=pg_cluster.password) as store:
        assert (await store.get_run("cp-1")).status is RunStatus.RUNNING


async def test_a_wrong_password_is_one_clear_error_without_the_password(
    pg_cluster: PgCluster,
) -> None:
    dsn = pg_cluster.dsn().replace("postgres@", "postgres:hunter2-secret@")
    with pytest.raises(StoreError, match="cannot connect to the PostgreSQL store") as info:
        async with PostgresStore.open(dsn):
            pass
    assert "hunter2-secret" not in str(info.value)
    assert "***" in str(info.value)


def test_scrub_dsn_hides_passwords_in_every_form() -> None:
    assert scrub_dsn("postgresql://u:pw@h:5/db") == "postgresql://u:***@h:5/db"
    assert scrub_dsn("host=h password=pw dbname=d") == "host=h password=*** dbname=d"
    assert (
        scrub_dsn("postgresql://u@h/db?password=pw&x=1") == "postgresql://u@h/db?password=***&x=1"
    )


async def test_seq_comes_from_the_run_counter_in_commit_order_with_two_writers(
    pg_cluster: PgCluster,
) -> None:
    """Two stores writing one run's events get consecutive seqs, whatever the engine said."""
    dsn = _dsn(pg_cluster)
    async with (
        PostgresStore.open(dsn, password=pg_cluster.password) as a,
        PostgresStore.open(dsn, password=pg_cluster.password) as b,
    ):
        await a.create_run(run_record("cp-1"))
        for _ in range(5):
            a.append(event("cp-1", 1))
            b.append(event("cp-1", 1))
            await a.commit()
            await b.commit()
        seqs = [e.seq for e in await a.read_events("cp-1")]
        assert seqs == list(range(1, 11))
        assert await b.last_seq("cp-1") == 10


async def test_a_live_owners_run_is_left_to_it(pg_cluster: PgCluster) -> None:
    """A live owner's run is left alone: acquiring it raises, recovery does not list it."""
    dsn = _dsn(pg_cluster)
    async with (
        PostgresStore.open(dsn, password=pg_cluster.password, owner="otherhost:1:1:a") as old,
        PostgresStore.open(dsn, password=pg_cluster.password, owner="otherhost:2:2:b") as new,
    ):
        await old.create_run(run_record("cp-1"))
        with pytest.raises(LeaseHeldError, match="held by otherhost:1:1:a"):
            await new.acquire_lease("cp-1")
        assert await new.unfinished_runs() == []
        assert [r.run_id for r, _, _ in await new.held_runs()] == ["cp-1"]


async def test_an_expired_lease_is_recovered_and_the_loser_is_fenced(
    pg_cluster: PgCluster,
) -> None:
    dsn = _dsn(pg_cluster)
    async with (
        PostgresStore.open(
            dsn, password=pg_cluster.password, owner="otherhost:1:1:a", auto_renew=False
        ) as old,
        PostgresStore.open(dsn, password=pg_cluster.password, owner="otherhost:2:2:b") as new,
    ):
        await old.create_run(run_record("cp-1"))
        await old.renew_lease("cp-1", ttl=0.01)
        time.sleep(0.05)  # noqa: ASYNC251  (a real wall-clock expiry, 50 ms)
        assert [r.run_id for r in await new.unfinished_runs()] == ["cp-1"]
        assert await new.acquire_lease("cp-1") == 2
        old.append(event("cp-1", 1))
        with pytest.raises(LeaseLostError, match="cp-1"):
            await old.commit()
        assert await new.read_events("cp-1") == []
        with pytest.raises(LeaseLostError):
            old.append(event("cp-1", 2))


async def test_an_error_of_the_block_comes_out_as_it_was(pg_cluster: PgCluster) -> None:
    with pytest.raises(KeyError):
        async with PostgresStore.open(_dsn(pg_cluster), password=pg_cluster.password):
            raise KeyError("mine")


# -- live events across processes ------------------------------------------------------


def _env(cluster: PgCluster) -> dict[str, str]:
    paths = [str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PGPASSWORD": cluster.password, "PYTHONPATH": os.pathsep.join(paths)}


async def test_a_subscriber_in_another_process_sees_every_event_live_in_order(
    pg_cluster: PgCluster,
) -> None:
    """The other process prints each event as it is committed here, none missed or twice."""
    dsn = _dsn(pg_cluster)
    async with PostgresStore.open(dsn, password=pg_cluster.password) as store:
        await store.create_run(run_record("cp-1"))
        store.append(event("cp-1", 1))
        await store.commit()  # before the subscriber: replayed
        async with await anyio.open_process(
            [sys.executable, str(ROOT / "tests" / "pgsubscriber.py"), dsn, "cp-1"],
            env=_env(pg_cluster),
        ) as child:
            assert child.stdout is not None
            lines = TextReceiveStream(child.stdout)
            got = ""
            with anyio.fail_after(30):
                while "ready" not in got:
                    got += await lines.receive()
                for batch in range(5):  # live: five commits of three events
                    for _ in range(3):
                        store.append(event("cp-1", 0))
                    await store.commit()
                    await anyio.sleep(0.01 * batch)
                store.append(attrs.evolve(event("cp-1", 0), kind=EventKind.RUN_FINISHED))
                await store.commit()
                while "listener" not in got or not got.endswith("\n"):
                    got += await lines.receive()
                assert await child.wait() == 0
        seqs = [int(line.split()[0]) for line in got.splitlines()[1:-1]]
        assert seqs == list(range(1, 18))
        assert got.splitlines()[-2].endswith("run_finished")
        assert got.splitlines()[-1] == "listener 1"


async def test_subscribers_of_one_store_share_one_listen_connection(
    pg_cluster: PgCluster,
) -> None:
    """Two subscribers (two runs) and a replay from seq 2 share the store's one listener."""
    dsn = _dsn(pg_cluster)
    async with (
        PostgresStore.open(dsn, password=pg_cluster.password) as writer,
        PostgresStore.open(dsn, password=pg_cluster.password) as reader,
    ):
        for run_id in ("a", "b"):
            await writer.create_run(run_record(run_id))
        got: dict[str, list[int]] = {"a": [], "b": []}

        async def follow(run_id: str, since: int) -> None:
            async with reader.subscribe(run_id, since) as events:
                async for e in events:
                    got[run_id].append(e.seq)

        writer.append(event("a", 0))
        writer.append(event("a", 0))
        await writer.commit()
        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow, "a", 1)
                tg.start_soon(follow, "b", 0)
                await anyio.sleep(0.05)
                for run_id in ("a", "b"):
                    writer.append(event(run_id, 0))
                    writer.append(attrs.evolve(event(run_id, 0), kind=EventKind.RUN_FINISHED))
                await writer.commit()
        assert got == {"a": [2, 3, 4], "b": [1, 2]}
        assert reader.listener.connections == 1


async def test_two_replicas_racing_for_a_dead_engines_run_never_both_take_it(
    pg_cluster: PgCluster,
) -> None:
    """The run's owner is a process of this host that no longer runs; two stores recover
    at once: one gets the next fencing token, the other is told a live engine holds it."""
    dsn = _dsn(pg_cluster)
    dead = f"{socket.gethostname()}:{2**22 + 17}:12345:deadbeef"  # no such pid
    async with (
        PostgresStore.open(dsn, password=pg_cluster.password, owner=dead) as gone,
        PostgresStore.open(dsn, password=pg_cluster.password) as a,
        PostgresStore.open(dsn, password=pg_cluster.password) as b,
    ):
        await gone.create_run(run_record("cp-1"))
        results: list[object] = []

        async def take(store: PostgresStore) -> None:
            try:
                results.append(await store.acquire_lease("cp-1"))
            except LeaseHeldError as exc:
                results.append(exc.owner)

        async with anyio.create_task_group() as tg:
            tg.start_soon(take, a)
            tg.start_soon(take, b)
        assert (a.fencing_token("cp-1"), b.fencing_token("cp-1")).count(2) == 1
        winner = a if a.fencing_token("cp-1") == 2 else b
        assert sorted(results, key=str) == sorted([2, winner.owner], key=str)


async def test_held_background_writes_wait_for_the_commit(pg_cluster: PgCluster) -> None:
    """While the engine holds background writes (something is frozen), an appended event
    is written by the next commit, not behind it; released, write-behind resumes."""
    dsn = _dsn(pg_cluster)
    async with PostgresStore.open(dsn, password=pg_cluster.password) as store:
        await store.create_run(run_record("cp-1"))
        store.hold_background_writes(True)
        store.append(event("cp-1", 1))
        await anyio.sleep(0.2)
        assert await store.read_events("cp-1") == []
        await store.commit()
        assert [e.seq for e in await store.read_events("cp-1")] == [1]
        async with store.subscribe("cp-1", since=1) as events:
            store.append(event("cp-1", 2))
            store.hold_background_writes(False)  # no commit: written behind, announced
            with anyio.fail_after(5):
                assert (await anext(events)).seq == 2


async def test_a_role_that_may_not_create_tables_is_one_clear_error(
    pg_cluster: PgCluster,
) -> None:
    name = pg_cluster.create_database("noright")
    role = f"reader_{name}"  # roles are the cluster's: one of this test's own
    pg_cluster.psql(f"CREATE ROLE {role} LOGIN PASSWORD 'pw-reader'")
    pg_cluster.psql("REVOKE CREATE ON SCHEMA public FROM PUBLIC", dbname=name)
    dsn = pg_cluster.dsn(name).replace(f"{pg_cluster.user}@", f"{role}@")
    with pytest.raises(StoreFileError, match="cannot be opened: permission denied") as info:
        async with PostgresStore.open(dsn, password="pw-reader"):
            pass
    assert "pw-reader" not in str(info.value)


# -- several writers, long run ids, fencing of a whole engine -----------------------------


async def test_seqs_are_consecutive_and_in_commit_order_with_four_concurrent_writers(
    pg_cluster: PgCluster,
) -> None:
    """Four stores append to one run at once, 25 commits each: the stored seqs are 1..100,
    each writer's events keep its order, and a commit that returned before another began
    holds only lower seqs (commit order)."""
    dsn = _dsn(pg_cluster)
    spans: list[tuple[float, float, str]] = []
    async with contextlib.AsyncExitStack() as stack:
        stores = [
            await stack.enter_async_context(PostgresStore.open(dsn, password=pg_cluster.password))
            for _ in range(4)
        ]
        await stores[0].create_run(run_record("cp-1"))

        async def write(w: int, store: PostgresStore) -> None:
            for i in range(25):
                mark = f"{w}-{i}"
                store.append(attrs.evolve(event("cp-1", 0), data={"mark": mark}))
                began = time.monotonic()
                await store.commit()
                spans.append((began, time.monotonic(), mark))

        async with anyio.create_task_group() as tg:
            for w, store in enumerate(stores):
                tg.start_soon(write, w, store)
        events = await stores[0].read_events("cp-1")
    assert [e.seq for e in events] == list(range(1, 101))
    seq_of = {e.data["mark"]: e.seq for e in events}
    for w in range(4):
        mine = [seq_of[f"{w}-{i}"] for i in range(25)]
        assert mine == sorted(mine)
    ordered = 0
    for _, a_ended, a in spans:
        for b_began, _, b in spans:
            if a_ended < b_began:
                assert seq_of[a] < seq_of[b], (a, b)
                ordered += 1
    assert ordered > 1000  # (most pairs were ordered in time: the check has teeth)


@pytest.mark.parametrize("length", [900, 5000, 20000])
async def test_a_notification_fits_postgresqls_limit_whatever_the_run_id(
    pg_cluster: PgCluster, length: int
) -> None:
    """NOTIFY payloads stay under 8,000 bytes for any run id (a long one is announced by its
    digest), and a subscriber of a run with a long id sees its events live."""
    asyncpg = pytest.importorskip("asyncpg")
    dsn = _dsn(pg_cluster)
    run_id = ("r" * length)[:length]
    payloads: list[str] = []
    raw = await asyncpg.connect(dsn, password=pg_cluster.password)
    await raw.add_listener("karbor_events", lambda *args: payloads.append(args[-1]))
    try:
        async with PostgresStore.open(dsn, password=pg_cluster.password) as store:
            await store.create_run(run_record(run_id))
            got: list[int] = []
            with anyio.fail_after(10):
                async with store.subscribe(run_id) as events:
                    for _ in range(3):
                        store.append(event(run_id, 0))
                        await store.commit()
                        got.append((await anext(events)).seq)
        assert got == [1, 2, 3]
    finally:
        await raw.close()
    assert len(payloads) == 3
    assert all(len(p.encode()) < 8000 for p in payloads)
    assert all(len(p.encode()) <= 1100 for p in payloads)


async def test_an_engine_whose_run_was_taken_over_is_fenced_and_thaws(
    pg_cluster: PgCluster,
) -> None:
    """An engine stalls past its lease (no renewal) while a server is frozen; a replica
    takes the run over. The stalled engine's next commit is refused (its writes dropped,
    never the successor's log), its group aborts and thaws, and it stores no outcome."""
    dsn = _dsn(pg_cluster)
    parent, child = Resource(SERVER, "s0"), Resource(SERVER, "s1")
    plugin = RecordingPlugin(TYPES, delays={(f"{SERVER}#s0", "on_prepare_begin"): 0.6})
    async with (
        PostgresStore.open(
            dsn,
            password=pg_cluster.password,
            owner="stale:1:1:a",
            lease_seconds=0.3,
            auto_renew=False,
        ) as stale,
        PostgresStore.open(dsn, password=pg_cluster.password, owner="next:2:2:b") as successor,
    ):
        engine = Engine([plugin], protectables_for([(parent, child)]), store=stale, discover=False)
        plan = Plan(name="app", resources=[parent], barrier="cut", timeouts=Timeouts(hook=30))
        async with engine:
            run = await engine.build_protect(plan)

            async def take_over() -> None:
                while not plugin.calls(hook="on_prepare_begin"):  # noqa: ASYNC110 - the trace
                    await anyio.sleep(0.01)
                await anyio.sleep(0.35)  # the lease (0.3 s, never renewed) has expired
                assert await successor.acquire_lease(run.run_id) == 2
                successor.append(attrs.evolve(event(run.run_id, 0), data={"by": "successor"}))
                await successor.commit()

            failure: LeaseLostError | None = None
            async with anyio.create_task_group() as tg:
                tg.start_soon(take_over)
                try:
                    await engine.execute(run)
                except LeaseLostError as exc:
                    failure = exc
        assert failure is not None and "owned by another engine now" in str(failure)
        events = await successor.read_events(run.run_id)
        record = await successor.get_run(run.run_id)
    frozen = [e.resource for e in plugin.calls(hook="on_prepare_begin")]
    assert frozen == [parent.key]
    assert [(e.resource, e.aborting) for e in plugin.calls(hook="on_prepare_finish")] == [
        (parent.key, "failure")
    ]
    assert record.status is RunStatus.RUNNING and record.outcome is None  # left to it
    assert events[-1].data == {"by": "successor"}  # the stale engine wrote nothing after
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
