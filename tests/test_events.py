"""Events: fan-out to many subscribers, replay from N, slow subscribers, progress, logs."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import anyio
import attrs
import pytest

from helpers import VOLUME, res, setup
from karbor_async import (
    BarrierPolicy,
    Engine,
    Event,
    EventKind,
    Hook,
    HookContext,
    MemoryStore,
    OperationKind,
    Plan,
    ProtectionPlugin,
    Resource,
    ResourceType,
    SqliteStore,
)
from karbor_async.events import Progress, new_event
from karbor_async.testing import MapProtectable


async def _drain(sub: Any, into: list[Event]) -> None:
    async for event in sub:
        into.append(event)


def _lifecycle(events: list[Event]) -> list[tuple[str, int, EventKind]]:
    return [
        (e.run_id, e.seq, e.kind)
        for e in events
        if e.is_lifecycle and e.kind.value != "ticks_dropped"
    ]


async def test_every_subscriber_gets_every_lifecycle_event_in_order() -> None:
    """Ten subscribers (and one for the run) see exactly the store's log, in order."""
    engine, _plugin, plan = setup([("s1", "v1"), ("s1", "v2"), ("s2", "v3")], ["s1", "s2"])
    async with engine:
        run = await engine.build_protect(plan)
        got: list[list[Event]] = [[] for _ in range(11)]
        async with anyio.create_task_group() as tg:
            subs = []
            for i in range(10):
                cm = engine.subscribe()
                subs.append(cm)
                tg.start_soon(_consume_until, cm, run.run_id, got[i])
            tg.start_soon(_consume_run, engine, run.run_id, got[10])
            await anyio.sleep(0.01)
            await engine.execute(run)
        stored = [(e.run_id, e.seq, e.kind) for e in await engine.store.read_events(run.run_id)]
        assert stored[-1][2] is EventKind.RUN_FINISHED
        for events in got:
            assert _lifecycle(events) == stored


async def _consume_until(cm: Any, run_id: str, into: list[Event]) -> None:
    async with cm as sub:
        async for event in sub:
            into.append(event)
            if event.run_id == run_id and event.kind is EventKind.RUN_FINISHED:
                return


async def _consume_run(engine: Engine, run_id: str, into: list[Event]) -> None:
    async with engine.subscribe(run_id) as sub:
        await _drain(sub, into)


async def test_replay_from_n_then_stop_at_the_end() -> None:
    """A subscriber asking for a finished run from sequence N gets N+1 to the end."""
    engine, _plugin, plan = setup([("s1", "v1")], ["s1"], barrier=BarrierPolicy.CUT)
    async with engine:
        outcome = await engine.protect(plan)
        got: list[Event] = []
        async with engine.subscribe(outcome.run_id, since=5) as sub:
            await _drain(sub, got)
        stored = await engine.store.read_events(outcome.run_id)
        assert [e.seq for e in got] == [e.seq for e in stored if e.seq > 5]
        assert got[-1].kind is EventKind.RUN_FINISHED


class _Copy:
    async def on_main(self, ctx: HookContext) -> None:
        for i in range(4):
            ctx.report_progress(done=i + 1, total=4)
            await anyio.lowlevel.checkpoint()


class _CopyPlugin(ProtectionPlugin):
    name = "copy"
    types: ClassVar[tuple[ResourceType, ...]] = (
        ResourceType("OS::Nova::Server", quiesces=True, snapshots=False),
        ResourceType(VOLUME),
    )

    def get_protect_operation(self, resource_type: str) -> object:
        return _Copy()


def _big_engine(n_servers: int, store: Any = None, buffer: int = 256) -> tuple[Engine, Plan]:
    servers = [Resource("OS::Nova::Server", f"s{i}") for i in range(n_servers)]
    children = {
        s.key: [Resource(VOLUME, f"v{i}-{j}") for j in range(3)] for i, s in enumerate(servers)
    }
    engine = Engine(
        [_CopyPlugin()],
        [MapProtectable(VOLUME, ["OS::Nova::Server"], children)],
        store=store or MemoryStore(),
        discover=False,
        event_buffer=buffer,
    )
    return engine, Plan(name="big", resources=servers)


@pytest.mark.slow
async def test_stalled_subscriber_loses_only_ticks_and_catches_up(virtual_time: bool) -> None:
    """A subscriber that reads nothing for a 10,000-resource run leaves memory bounded,
    then receives every lifecycle event in order and is told how many ticks it lost."""
    engine, plan = _big_engine(2500)
    async with engine:
        run = await engine.build_protect(plan)
        assert len(run.nodes) == 10_000
        got: list[Event] = []
        async with engine.subscribe(run.run_id) as sub:
            await engine.execute(run)  # nobody reads meanwhile
            hub = engine.hub
            assert len(hub._ring) <= hub.capacity and len(hub._pending) <= hub.capacity
            await _drain(sub, got)
            stats = sub.statistics()
        stored = await engine.store.read_events(run.run_id)
        assert _lifecycle(got) == [(e.run_id, e.seq, e.kind) for e in stored]
        dropped = [e for e in got if e.kind is EventKind.TICKS_DROPPED]
        assert dropped and sum(e.data["count"] for e in dropped) == stats.ticks_dropped > 0
        assert stats.caught_up_from_store > 0


async def test_live_progress_ticks_carry_the_last_lifecycle_seq() -> None:
    """Ticks reach a live subscriber at once, numbered, after the hook's own start."""
    engine, plan = _big_engine(2, buffer=4096)
    async with engine:
        run = await engine.build_protect(plan)
        got: list[Event] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(_consume_run, engine, run.run_id, got)
            await anyio.sleep(0.01)
            await engine.execute(run)
        ticks = [e for e in got if e.kind is EventKind.PROGRESS]
        assert len(ticks) == 4 * 8  # four ticks from each of the eight resources' on_main
        started = {
            e.resource: e.seq
            for e in got
            if e.kind is EventKind.STARTED and e.hook is not None and e.hook.value == "on_main"
        }
        per_resource: dict[Any, list[int]] = {}
        for e in ticks:
            # A tick goes out at once; it carries the seq of the last lifecycle event
            # before it, which may still be on its way (lifecycle waits for the commit).
            assert e.progress is not None and e.seq >= started[e.resource]
            per_resource.setdefault(e.resource, []).append(e.tick)
        assert all(t == [1, 2, 3, 4] for t in per_resource.values())
        latest = await engine.store.load_progress(run.run_id)  # type: ignore[attr-defined]
        assert {e.progress.done for e in latest if e.progress} <= {1, 2, 3, 4}


@pytest.mark.parametrize("anyio_backend", [("asyncio", {})], indirect=True)
async def test_replay_across_an_engine_restart(tmp_path: Path) -> None:
    """Sequence numbers survive the engine: a new engine replays a run from N."""
    db = tmp_path / "karbor.db"
    async with SqliteStore.open(db) as store:
        engine, _plugin, plan = setup([("s1", "v1"), ("s1", "v2")], ["s1"], store=None)
        engine = Engine(
            list(engine.registry.plugins.values()),
            [f for fs in engine.registry.protectables.values() for f in fs],
            store=store,
            discover=False,
        )
        async with engine:
            outcome = await engine.protect(plan)
            before = [e.seq for e in await store.read_events(outcome.run_id)]
    async with SqliteStore.open(db) as store:
        engine2 = Engine(store=store, discover=False)
        async with engine2:
            got: list[Event] = []
            async with engine2.subscribe(outcome.run_id, since=3) as sub:
                await _drain(sub, got)
    assert [e.seq for e in got] == [s for s in before if s > 3]
    assert len(set(before)) == len(before) == before[-1]


async def test_events_are_logged_at_debug_when_logging_lets_debug_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the ``karbor_async`` logger at debug, every lifecycle event is a log line
    of the run's logger, carrying the run id and the resource as ``TYPE#ID``."""
    engine, _plugin, plan = setup([("s1", "v1")], ["s1"])
    async with engine:
        caplog.set_level(logging.DEBUG, logger="karbor_async")
        outcome = await engine.protect(plan)
    logs: list[dict[str, Any]] = [
        r.msg for r in caplog.records if r.name == "karbor_async.run" and isinstance(r.msg, dict)
    ]
    kinds = [entry["event"] for entry in logs if entry.get("seq")]
    assert "started" in kinds and "finished" in kinds and "run_finished" in kinds
    assert all(entry.get("run_id") == outcome.run_id for entry in logs)
    assert any(entry.get("resource") == f"{res('v1').type}#v1" for entry in logs)


async def test_batches_deliver_the_same_stream_in_lists() -> None:
    """Subscription.batches() yields every lifecycle event in order, a wake-up's worth at once."""
    engine, _plugin, plan = setup([("s1", "v1"), ("s1", "v2")], ["s1"])
    async with engine:
        run = await engine.build_protect(plan)
        got: list[Event] = []
        sizes: list[int] = []

        async def consume() -> None:
            async with engine.subscribe(run.run_id) as sub:
                async for batch in sub.batches():
                    sizes.append(len(batch))
                    got.extend(batch)

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await anyio.sleep(0.01)
            await engine.execute(run)
        stored = await engine.store.read_events(run.run_id)
        assert _lifecycle(got) == [(e.run_id, e.seq, e.kind) for e in stored]
        assert max(sizes) > 1


async def test_batch_readers_woken_together_share_one_batch() -> None:
    """Twenty batch readers (all runs, and one run) get the whole stream; batches are shared."""
    chains = [(f"s{i}", f"v{i}") for i in range(30)]
    engine, _plugin, plan = setup(chains, [s for s, _v in chains])
    async with engine:
        run = await engine.build_protect(plan)
        got: list[list[Sequence[Event]]] = [[] for _ in range(20)]

        async def consume(i: int) -> None:
            async with engine.subscribe(run.run_id if i % 2 else None) as sub:
                async for batch in sub.batches():
                    got[i].append(batch)
                    if any(e.kind is EventKind.RUN_FINISHED for e in batch):
                        return

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(consume, i)
            await anyio.sleep(0.01)
            await engine.execute(run)
        stored = [(e.run_id, e.seq, e.kind) for e in await engine.store.read_events(run.run_id)]
        for batches in got:
            assert _lifecycle([e for batch in batches for e in batch]) == stored
        # Readers of the same stream woken together were handed the very same object.
        for parity in (0, 1):
            holders: dict[int, int] = {}
            for i in range(parity, 20, 2):
                for batch in got[i]:
                    holders[id(batch)] = holders.get(id(batch), 0) + 1
            assert max(holders.values()) == 10


async def test_batch_readers_join_late_fall_behind_and_still_get_everything() -> None:
    """Batch readers that join mid-run (since=N) or overrun a small ring miss nothing."""
    engine, plan = _big_engine(300, buffer=64)
    async with engine:
        run = await engine.build_protect(plan)
        results: dict[str, list[Event]] = {"early": [], "late": [], "slow": []}
        caught_up: dict[str, int] = {}

        async def read(name: str, since: int, pause: float) -> None:
            async with engine.subscribe(run.run_id, since=since) as sub:
                async for batch in sub.batches():
                    results[name].extend(batch)
                    if pause:
                        await anyio.sleep(pause)
                caught_up[name] = sub.statistics().caught_up_from_store

        async def execute() -> None:
            await engine.execute(run)

        async with anyio.create_task_group() as tg:
            tg.start_soon(read, "early", 0, 0.0)
            tg.start_soon(read, "slow", 0, 0.05)
            await anyio.sleep(0.01)
            tg.start_soon(execute)
            await anyio.sleep(0.02)
            tg.start_soon(read, "late", 3, 0.0)
        stored = [(e.run_id, e.seq, e.kind) for e in await engine.store.read_events(run.run_id)]
        assert _lifecycle(results["early"]) == stored
        assert _lifecycle(results["slow"]) == stored
        assert _lifecycle(results["late"]) == [s for s in stored if s[1] > 3]
        assert caught_up["slow"] > 0  # it did fall off the ring and read back from the store
        assert caught_up["late"] > 0  # its replay came from the store


def test_new_event_is_an_ordinary_frozen_event() -> None:
    """The engine's fast constructor builds exactly what ``Event(...)`` builds."""
    args = (
        "run-1",
        7,
        EventKind.FINISHED,
        OperationKind.PROTECT,
        1.5,
        2.5,
        ("OS::Cinder::Volume", "v1"),
        Hook.MAIN,
        "g",
        2,
        Progress(0.5),
        3,
        {"k": "v"},
    )
    fast, slow = new_event(*args), Event(*args)
    assert fast == slow
    assert attrs.astuple(fast, recurse=False) == attrs.astuple(slow, recurse=False)
    assert fast.to_json() == slow.to_json()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        fast.seq = 8  # type: ignore[misc]


def test_a_slot_builder_refuses_what_it_would_skip() -> None:
    """A field that converts or validates cannot be set through its slot."""
    from karbor_async._slots import slot_builder

    @attrs.frozen
    class Checked:
        n: int = attrs.field(validator=attrs.validators.instance_of(int))

    with pytest.raises(TypeError, match="converts or validates"):
        slot_builder(Checked)


def test_hook_contexts_built_by_the_engine_are_ordinary() -> None:
    from karbor_async import HookContext, Resource
    from karbor_async._calls import _new_context

    res = Resource("OS::Cinder::Volume", "v1")
    handle: Any = object()
    fast = _new_context(res, Hook.MAIN, {"a": 1}, handle, None, None)
    slow = HookContext(res, Hook.MAIN, {"a": 1}, handle, None, None)
    assert repr(fast) == repr(slow)
    assert attrs.astuple(fast, recurse=False) == attrs.astuple(slow, recurse=False)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        fast.hook = Hook.COMPLETE  # type: ignore[misc]


class _WaveProbe:
    """Cuts that report progress; each copy reads the store's log as it starts."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self.seen_at_main: list[list[tuple[EventKind, tuple[str, str] | None]]] = []

    async def on_prepare_finish(self, ctx: HookContext) -> None:
        if ctx.resource.type == VOLUME and ctx.aborting is None:
            ctx.report_progress(0.0, message="taking snapshot")
            ctx.report_progress(1.0, message="snapshot taken")

    async def on_main(self, ctx: HookContext) -> None:
        events = await self.store.read_events(ctx.run_id)
        self.seen_at_main.append([(e.kind, e.resource) for e in events])


class _WavePlugin(ProtectionPlugin):
    name = "wave"
    types: ClassVar[tuple[ResourceType, ...]] = (
        ResourceType("OS::Nova::Server", quiesces=True, snapshots=False),
        ResourceType(VOLUME),
    )

    def __init__(self, probe: _WaveProbe) -> None:
        self.probe = probe

    def get_protect_operation(self, resource_type: str) -> object:
        return self.probe


async def test_a_cut_waves_events_keep_their_order_and_reach_the_store_before_main() -> None:
    """A cut wave's events are built after it (issue 19), but nothing else changes: the
    log is numbered without gaps in the order things happened, each cut's STARTED,
    progress and FINISHED stay in order, ticks carry the seq before them, subscribers
    see the store's log, and every cut is stored before the main barrier's commit."""
    server = Resource("OS::Nova::Server", "s1")
    volumes = [Resource(VOLUME, f"v{i}") for i in range(20)]
    store = MemoryStore()
    probe = _WaveProbe(store)
    engine = Engine(
        [_WavePlugin(probe)],
        [MapProtectable(VOLUME, ["OS::Nova::Server"], {server.key: volumes})],
        store=store,
        discover=False,
    )
    plan = Plan(name="wave", resources=[server], barrier=BarrierPolicy.CUT)
    async with engine:
        run = await engine.build_protect(plan)
        live: list[Event] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(_consume_run, engine, run.run_id, live)
            await anyio.sleep(0.01)
            await engine.execute(run)
    stored = await store.read_events(run.run_id)
    assert [e.seq for e in stored] == list(range(1, len(stored) + 1))
    assert _lifecycle(live) == [(e.run_id, e.seq, e.kind) for e in stored]
    monos = [e.mono for e in stored]
    assert monos == sorted(monos)  # numbered in the order they happened
    for v in volumes:
        mine = [e for e in stored if e.resource == v.key][:3]
        kinds = [(e.kind, e.hook) for e in mine]
        pf = Hook.PREPARE_FINISH
        assert kinds == [
            (EventKind.STARTED, pf),
            (EventKind.FINISHED, pf),
            (EventKind.CUT, None),
        ], (v, kinds)
        ticks = [e for e in live if e.resource == v.key and e.kind is EventKind.PROGRESS]
        assert [t.tick for t in ticks] == [1, 2]
        assert all(t.seq == mine[0].seq for t in ticks)  # the last lifecycle seq before it
    for seen in probe.seen_at_main:
        cut = {r for k, r in seen if k is EventKind.CUT}
        assert cut == {v.key for v in volumes}  # committed before main started
