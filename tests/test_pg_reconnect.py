"""The PostgreSQL store across lost connections: killed backends, a server restart, an outage.

A run in progress continues once the store has reconnected, or, when the server
stays away past the reconnect window, fails with
:class:`~karbor_async.exceptions.StoreUnavailableError` with everything thawed;
the LISTEN connection LISTENs again and subscribers read what was committed
meanwhile from the rows, so none misses an event. Killing backends uses the
session's cluster (``pg_terminate_backend`` ends only this test's sessions);
stopping the server uses a cluster of this module's own.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.from_thread
import anyio.to_thread
import attrs
import pytest
from anyio.streams.text import TextReceiveStream

from helpers import QUIESCING, SERVER, TYPES, VOLUME
from invariants import check_run
from karbor_async import Engine, Plan, Resource, Timeouts
from karbor_async._pg_store import PostgresStore
from karbor_async.events import Event, EventKind
from karbor_async.exceptions import StoreUnavailableError
from karbor_async.testing import RecordingPlugin, protectables_for
from pgcluster import PgCluster, session_cluster
from test_pg_store import ROOT, _env, event, run_record

pytestmark = [pytest.mark.timeout(120), pytest.mark.service]  # clusters of its own too


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {})


@pytest.fixture(scope="module")
def private_cluster() -> Iterator[PgCluster]:
    """A cluster this module may stop and start (never the session's)."""
    with session_cluster() as cluster:
        yield cluster


def _app(store: PostgresStore, delays: dict[Any, Any]) -> tuple[Engine, RecordingPlugin, Plan]:
    """Three servers, each with a volume, under the cut barrier (servers quiesce)."""
    servers = [Resource(SERVER, f"s{i}") for i in range(3)]
    pairs = [(s, Resource(VOLUME, f"v{i}")) for i, s in enumerate(servers)]
    plugin = RecordingPlugin(TYPES, delays=delays)
    engine = Engine([plugin], protectables_for(pairs), store=store, discover=False)
    plan = Plan(name="app", resources=servers, barrier="cut", timeouts=Timeouts(hook=60))
    return engine, plugin, plan


def _consecutive(events: list[Event]) -> list[int]:
    seqs = [e.seq for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    return seqs


@attrs.define
class _Watch:
    """Fires ``action`` (in a thread) once ``when(trace)`` holds; records when."""

    plugin: RecordingPlugin
    when: Any
    action: Any
    fired_at: float | None = None
    took: float | None = None

    async def __call__(self) -> None:
        while not self.when(self.plugin.trace):  # noqa: ASYNC110 - polls a plugin's trace
            await anyio.sleep(0.005)
        self.fired_at = time.monotonic()
        await anyio.to_thread.run_sync(self.action)
        self.took = time.monotonic() - self.fired_at


@pytest.fixture
def killing(pg_cluster: PgCluster) -> tuple[str, PgCluster]:
    return pg_cluster.dsn(pg_cluster.create_database("reconnect")), pg_cluster


async def test_killed_backends_are_reconnected_and_the_run_carries_on(
    killing: tuple[str, PgCluster],
) -> None:
    """Every session of the store is terminated three times during a protect (in the
    quiesce, the cut wave and the copies): the run succeeds, with every ordering rule and
    the thaw invariant kept, and its log is consecutive, each event once."""
    dsn, cluster = killing
    name = dsn.rsplit("/", 1)[1]
    delays = {(SERVER, "on_prepare_begin"): 0.2, (VOLUME, "on_main"): 0.3}
    kills: list[int] = []

    def kill() -> None:
        deadline = time.monotonic() + 10  # (the writer reconnects once it has work)
        while not (ended := cluster.terminate(name)) and time.monotonic() < deadline:
            time.sleep(0.01)
        kills.append(ended)

    async with PostgresStore.open(dsn, password=cluster.password) as store:
        engine, plugin, plan = _app(store, delays)
        async with engine:
            run = await engine.build_protect(plan)
            async with anyio.create_task_group() as tg:
                for when in (
                    lambda t: any(e.hook.value == "on_prepare_begin" for e in t),
                    lambda t: any(e.hook.value == "on_prepare_finish" for e in t),
                    lambda t: any(e.hook.value == "on_main" for e in t),
                ):
                    tg.start_soon(_Watch(plugin, when, kill))
                outcome = await engine.execute(run)
                tg.cancel_scope.cancel()
            events = list(await store.read_events(run.run_id))
        stats = store.statistics()
    assert outcome.status.value == "succeeded"
    assert len(kills) == 3 and all(kills), kills
    check_run(plugin.trace, run.spec.graph, outcome, QUIESCING, events)
    seqs = _consecutive(events)
    assert events[-1].kind is EventKind.RUN_FINISHED
    assert stats.reconnects >= 1
    print(
        f"\n{len(seqs)} events over {sum(kills)} killed sessions: {stats.reconnects} reconnects,"
        f" {stats.retried} transactions run again, {stats.settled} settled"
    )


async def test_the_listener_listens_again_and_a_subscriber_misses_nothing(
    killing: tuple[str, PgCluster],
) -> None:
    """The subscriber's store loses its LISTEN connection three times while another store
    commits events: each time it LISTENs again and reads what it missed from the rows, so
    it sees every event once, in order."""
    dsn, cluster = killing
    name = dsn.rsplit("/", 1)[1]
    got: list[int] = []
    async with (
        PostgresStore.open(dsn, password=cluster.password) as writer,
        PostgresStore.open(dsn, password=cluster.password) as reader,
    ):
        await writer.create_run(run_record("cp-1"))

        async def follow() -> None:
            async with reader.subscribe("cp-1") as events:
                async for e in events:
                    got.append(e.seq)

        async def write(n: int) -> None:
            for _ in range(n):
                writer.append(event("cp-1", 0))
                await writer.commit()

        async def seen(n: int) -> None:
            while len(got) < n:  # noqa: ASYNC110 - polls what the subscriber appended
                await anyio.sleep(0.005)

        total = 0
        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(follow)
                for _ in range(3):
                    await write(5)
                    total += 5
                    await seen(total)
                    assert await anyio.to_thread.run_sync(cluster.terminate, name) >= 2
                    await write(3)  # committed while the reader's listener is gone
                    total += 3
                    await seen(total)
                writer.append(attrs.evolve(event("cp-1", 0), kind=EventKind.RUN_FINISHED))
                await writer.commit()
                total += 1
        assert reader.listener.connections == 4
    assert got == list(range(1, total + 1))


async def test_a_server_restart_mid_run_is_survived_by_the_run_and_a_subscriber_elsewhere(
    private_cluster: PgCluster,
) -> None:
    """The server stops (fast shutdown) and starts again while the copies run: the run
    succeeds, and a subscriber in another process, whose own LISTEN connection was lost
    too, prints every event of the run once, in order, as stored. A commit made while the
    server is down returns once it is back (the reconnect's latency is printed)."""
    cluster = private_cluster
    dsn = cluster.dsn(cluster.create_database("restart"))
    delays = {(SERVER, "on_prepare_begin"): 0.05, (VOLUME, "on_main"): 2.0}
    marks: dict[str, float] = {}
    down = anyio.Event()

    def restart() -> None:
        cluster.stop()
        anyio.from_thread.run_sync(down.set)  # (restart runs in a worker thread)
        time.sleep(0.5)
        cluster.start()
        marks["up"] = time.monotonic()

    async def commit_while_down(probe: PostgresStore) -> None:
        await down.wait()
        probe.append(event("probe", 0))
        await probe.commit()
        marks["committed"] = time.monotonic()

    async with (
        PostgresStore.open(dsn, password=cluster.password) as store,
        PostgresStore.open(dsn, password=cluster.password) as probe,
    ):
        await probe.create_run(run_record("probe"))
        engine, plugin, plan = _app(store, delays)
        watch = _Watch(plugin, lambda t: any(e.hook.value == "on_main" for e in t), restart)
        async with engine:
            run = await engine.build_protect(plan)
            async with await anyio.open_process(
                [sys.executable, str(ROOT / "tests" / "pgsubscriber.py"), dsn, run.run_id],
                env=_env(cluster),
            ) as child:
                assert child.stdout is not None
                lines = TextReceiveStream(child.stdout)
                printed = ""
                with anyio.fail_after(60):
                    while "ready" not in printed:
                        printed += await lines.receive()
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(watch)
                        tg.start_soon(commit_while_down, probe)
                        outcome = await engine.execute(run)
                    while "listener" not in printed or not printed.endswith("\n"):
                        printed += await lines.receive()
                    assert await child.wait() == 0
            events = list(await store.read_events(run.run_id))
        stats = store.statistics()
    assert outcome.status.value == "succeeded"
    assert watch.took is not None and watch.took > 0.5  # the server was down meanwhile
    seqs = _consecutive(events)
    rows = printed.splitlines()
    assert [int(r.split()[0]) for r in rows[1:-1]] == seqs
    assert rows[-1] == "listener 2"
    assert stats.reconnects >= 1
    assert marks["committed"] > marks["up"]
    print(
        f"\nserver down {watch.took:.2f} s (stop, 0.5 s, start); a commit made meanwhile "
        f"returned {marks['committed'] - marks['up']:.3f} s after the server was up; "
        f"{len(seqs)} events, the other process's subscriber saw each once"
    )


async def test_a_server_gone_past_the_window_fails_the_run_with_nothing_left_frozen(
    private_cluster: PgCluster,
) -> None:
    """The server stops while a server of the app is frozen and its child's quiesce waits
    for a commit: past the 1-second window the group aborts, the frozen server is thawed,
    and the run ends in StoreUnavailableError. Once the server is back, the store (still
    open) writes what it kept, the run's end included: failed, its log consecutive."""
    cluster = private_cluster
    dsn = cluster.dsn(cluster.create_database("outage"))
    parent, child = Resource(SERVER, "s0"), Resource(SERVER, "s1")  # both quiesce
    plugin = RecordingPlugin(TYPES, delays={(f"{SERVER}#s0", "on_prepare_begin"): 1.0})
    plan = Plan(name="app", resources=[parent], barrier="cut", timeouts=Timeouts(hook=60))
    watch = _Watch(
        plugin, lambda t: any(e.hook.value == "on_prepare_begin" for e in t), cluster.stop
    )
    try:
        async with PostgresStore.open(
            dsn, password=cluster.password, reconnect_seconds=1.0
        ) as store:
            engine = Engine(
                [plugin], protectables_for([(parent, child)]), store=store, discover=False
            )
            async with engine:
                run = await engine.build_protect(plan)
                started = time.monotonic()
                failure: StoreUnavailableError | None = None
                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch)
                    try:
                        await engine.execute(run)
                    except StoreUnavailableError as exc:
                        failure = exc
                took = time.monotonic() - started
                assert failure is not None, "the run did not fail"
                assert "could not reconnect within 1 s" in str(failure)
                calls = [(e.resource[1], e.hook.value, e.aborting) for e in plugin.trace]
                assert calls[0] == ("s0", "on_prepare_begin", None)
                assert [c for c in calls if c[1] == "on_prepare_finish"] == [
                    ("s0", "on_prepare_finish", "failure")
                ]  # thawed; s1 never froze (its quiesce waited for the commit)
                assert all(c[0] == "s0" for c in calls)
                await anyio.to_thread.run_sync(cluster.start)
                with anyio.fail_after(20):
                    while (await store.get_run(run.run_id)).status.value == "running":  # noqa: ASYNC110 - polls the store
                        await anyio.sleep(0.1)
                record = await store.get_run(run.run_id)
                events = list(await store.read_events(run.run_id))
    finally:
        if not (cluster.datadir / "postmaster.pid").exists():
            cluster.start()
    assert "left for recovery" in "".join(getattr(failure, "__notes__", []))
    assert record.status.value == "failed"
    assert record.outcome is not None and "could not reconnect" in (record.outcome.error or "")
    _consecutive(events)
    assert events[-1].kind is EventKind.RUN_FINISHED
    print(f"\nthe run failed {took:.2f} s after it started (1 s reconnect window)")


class _LosesCommit:
    """A transaction whose ``COMMIT`` is lost: on the way back (``committed``: the server
    did commit) or on the way there (it did not); the connection dies either way."""

    def __init__(self, tx: Any, conn: Any, committed: bool) -> None:
        self._tx, self._conn, self._committed = tx, conn, committed

    async def start(self) -> None:
        await self._tx.start()

    async def rollback(self) -> None:
        await self._tx.rollback()

    async def commit(self) -> None:
        asyncpg = pytest.importorskip("asyncpg")
        if self._committed:
            await self._tx.commit()
        self._conn.terminate()
        raise asyncpg.exceptions.ConnectionDoesNotExistError(
            "connection was closed in the middle of operation"
        )


@pytest.mark.parametrize("committed", [True, False], ids=["lost-after", "lost-before"])
async def test_a_commit_lost_on_its_way_is_settled_and_written_exactly_once(
    killing: tuple[str, PgCluster], monkeypatch: pytest.MonkeyPatch, committed: bool
) -> None:
    """The connection dies during COMMIT: the writer asks the server, by the transaction's
    id, whether it committed, and runs it again only if not: the run is created once
    (never "already exists"), and its events are written once each."""
    asyncpg = pytest.importorskip("asyncpg")
    dsn, cluster = killing
    async with PostgresStore.open(dsn, password=cluster.password) as store:
        assert store._w.conn is not None
        victim = store._w.conn._conn
        real = asyncpg.Connection.transaction
        calls = {"n": 0}

        def transaction(conn: Any, *args: Any, **kwargs: Any) -> Any:
            tx = real(conn, *args, **kwargs)
            if conn is victim and calls["n"] == 0:
                calls["n"] += 1
                return _LosesCommit(tx, conn, committed)
            return tx

        monkeypatch.setattr(asyncpg.Connection, "transaction", transaction)
        await store.create_run(run_record("cp-1"))
        monkeypatch.setattr(asyncpg.Connection, "transaction", real)
        store.append(event("cp-1", 0))
        await store.commit()
        stats = store.statistics()
        runs = [r.run_id for r in await store.list_runs()]
        seqs = [e.seq for e in await store.read_events("cp-1")]
    assert calls["n"] == 1
    assert runs == ["cp-1"] and seqs == [1]
    assert stats.settled == 1
    assert stats.retried == (0 if committed else 1)
