"""Hostile hooks: BaseExceptions, swallowed cancellation and hangs never hold a run or leave
anything frozen (DESIGN.md guarantee 1; the engine owns its tasks).

Every behaviour runs in every hook of protect (a quiescing and a non-quiescing
``on_prepare_begin``, the cut, a server's normal thaw, ``on_main``,
``on_complete``), of restore and delete, and in the aborting thaw. After each
run: every started quiesce is thawed or recorded ``thaw_failed`` with an alert,
the outcome equals the store's record, every hook in ``hooks_run`` has its
STARTED and FINISHED events, and ``execute()`` returned within the bound. Cases
that swallow cancellation run on real clocks (a spinning hook stops trio's
virtual clock); the others also run on trio's virtual clock, where the bound
is exact.
"""

from __future__ import annotations

from typing import Any

import anyio
import attrs
import pytest

from helpers import SERVER
from hostile import Behaviour, HostilePlugin, Key, graph_edges, resource
from karbor_async import (
    ConsistencyGroup,
    Engine,
    EventKind,
    Hook,
    MemoryStore,
    OperationKind,
    Plan,
    ResourceStatus,
    RunError,
    RunOutcome,
    RunStatus,
    Timeouts,
)
from karbor_async.exceptions import ResourceBusyError
from karbor_async.testing import protectables_for

P, R, D = OperationKind.PROTECT, OperationKind.RESTORE, OperationKind.DELETE
HOOK_LIMIT = 0.5
ABORT = 0.5

TARGETS: dict[str, Key] = {
    "quiescing prepare_begin": (P, "s1", Hook.PREPARE_BEGIN, False),
    "non-quiescing prepare_begin": (P, "v1", Hook.PREPARE_BEGIN, False),
    "cut": (P, "v1", Hook.PREPARE_FINISH, False),
    "normal thaw": (P, "s1", Hook.PREPARE_FINISH, False),
    "main": (P, "v1", Hook.MAIN, False),
    "complete": (P, "s1", Hook.COMPLETE, False),
    "aborting thaw": (P, "s1", Hook.PREPARE_FINISH, True),
    **{f"restore {h.value}": (R, "v1", h, False) for h in Hook},
    **{f"delete {h.value}": (D, "v1", h, False) for h in Hook},
}
SWALLOWING = [Behaviour.SWALLOW_1_5, Behaviour.SWALLOW_FOREVER]  # spin: real clocks
FAST = [b for b in Behaviour if b is not Behaviour.RAISE and b not in SWALLOWING]
REAL_CLOCK = {Behaviour.HANG, Behaviour.SWALLOW_ONCE}  # of FAST: waits out a limit


def _plan() -> Plan:
    return Plan(
        name="hostile",
        resources=[resource("p1")],
        timeouts=Timeouts(hook=HOOK_LIMIT, abort=ABORT),
    )


async def _execute(engine: Engine, op: OperationKind, checkpoint: str | None) -> Any:
    """Run ``op``; return (outcome, what it raised, seconds it took)."""
    if op is P:
        run = await engine.build_protect(_plan())
    elif op is R:
        assert checkpoint is not None
        run = await engine.build_restore(checkpoint)
    else:
        assert checkpoint is not None
        run = await engine.build_delete(checkpoint)
    start = anyio.current_time()
    raised: BaseException | None = None
    outcome: RunOutcome | None = None
    try:
        outcome = await engine.execute(run)
    except RunError as exc:
        raised, outcome = exc, exc.outcome
    except (KeyboardInterrupt, SystemExit) as exc:
        raised = exc
    if isinstance(raised, KeyboardInterrupt | SystemExit):
        cause = raised.__cause__
        assert isinstance(cause, RunError), "a hook's fatal error carries the RunError"
        outcome = cause.outcome
    return outcome, raised, anyio.current_time() - start


async def _check_invariants(
    plugin: HostilePlugin, store: MemoryStore, outcome: RunOutcome, *, ended: bool
) -> None:
    events = await store.read_events(outcome.run_id)
    kinds = [e.kind for e in events]
    assert kinds[-1] is EventKind.RUN_FINISHED, "after run_finished a run emits nothing"
    assert kinds.count(EventKind.RUN_FINISHED) == 1
    # The outcome equals the store's record (a late thaw may only add thawed_late_at).
    record = await store.get_run(outcome.run_id)
    assert record.outcome is not None

    def plain(o: RunOutcome) -> dict[Any, Any]:
        return {k: attrs.evolve(r, thawed_late_at=None) for k, r in o.resources.items()}

    assert plain(record.outcome) == plain(outcome)
    assert record.status is outcome.status
    # Every hook in hooks_run has its STARTED and FINISHED events.
    for key, r in outcome.resources.items():
        for hook in r.hooks_run:
            mine = [e for e in events if e.resource == key and e.hook is hook]
            assert any(e.kind is EventKind.STARTED for e in mine), (key, hook)
            assert any(e.kind is EventKind.FINISHED for e in mine), (key, hook)
        if r.abandoned_hook is not None:
            assert any(e.kind is EventKind.HOOK_ABANDONED and e.resource == key for e in events), (
                key
            )
    if outcome.operation is not P:
        return
    # Every started quiesce is thawed, or thaw_failed with an alert.
    for name in ("s1", "s2"):
        began = plugin.calls_of(name, Hook.PREPARE_BEGIN)
        if not began:
            continue
        r = outcome.resources[resource(name).key]
        thaws = [c for c in plugin.calls_of(name, Hook.PREPARE_FINISH) if c.outcome == "ok"]
        if r.status is ResourceStatus.THAW_FAILED:
            assert any(
                e.kind is EventKind.THAW_FAILED and e.resource == r.resource.key for e in events
            ), "a thaw_failed resource has its alert"
        else:
            assert thaws, f"{name} was quiesced and never thawed"
            assert r.thawed_at is not None or r.status is not ResourceStatus.SUCCEEDED
        if ended and r.status is ResourceStatus.THAW_FAILED and thaws:
            stored = record.outcome.resources[r.resource.key]
            assert r.thawed_late_at is not None or stored.thawed_late_at is not None


async def _scenario(target: str, behaviour: Behaviour, virtual: bool) -> None:
    key = TARGETS[target]
    op = key[0]
    behaviours = {key: behaviour}
    if key[3]:  # the aborting thaw: a sibling's prepare fails, so the group aborts
        behaviours[(P, "v2", Hook.PREPARE_BEGIN, False)] = Behaviour.RAISE
    plugin = HostilePlugin(behaviours)
    store = MemoryStore()
    engine = Engine([plugin], protectables_for(graph_edges()), store=store, discover=False)
    async with engine:
        checkpoint = None
        if op is not P:
            protected = await engine.protect(_plan())
            checkpoint = protected.checkpoint_id
        outcome, raised, took = await _execute(engine, op, checkpoint)
        assert outcome is not None
        # The bound: the hook's limit, then at most timeouts.abort (0.5 s more on real clocks).
        assert took <= HOOK_LIMIT + ABORT + (0 if virtual else 0.5) + 1e-6, took
        assert outcome.status is RunStatus.FAILED
        r = outcome.resources[resource(key[1]).key]
        own = [x for x in plugin.raised if str(x) != "injected"]  # not the sibling's failure
        if behaviour in (Behaviour.KEYBOARD_INTERRUPT, Behaviour.SYSTEM_EXIT):
            assert raised is own[0], "the hook's own exception reaches the caller"
        else:
            assert isinstance(raised, RunError)
        if behaviour.raises:
            assert r.failed_hook is not None
            assert r.error is not None and type(own[0]).__name__ in r.error
        if behaviour is Behaviour.SWALLOW_FOREVER:
            assert r.abandoned_hook is key[2]
            assert any(a.resource.key == r.resource.key for a in engine.statistics().abandoned)
            left = await engine.drain(0.2)
            assert [a.resource.id for a in left] == [key[1]]
        await _check_invariants(plugin, store, outcome, ended=False)
        plugin.release = True
    assert engine.statistics().tasks == 0
    await _check_invariants(plugin, store, outcome, ended=True)


@pytest.mark.parametrize(
    ("target", "behaviour"),
    [
        pytest.param(
            target,
            behaviour,
            id=f"{target}-{behaviour.value}",
            # on asyncio these wait on real clocks, half a second a case and 15 s in all:
            # the cut keeps them in the quick runs, the other targets are slow
            marks=pytest.mark.slow if behaviour in REAL_CLOCK and target != "cut" else (),
        )
        for behaviour in FAST
        for target in TARGETS
    ],
)
async def test_hostile_hook_never_holds_the_run(
    target: str, behaviour: Behaviour, virtual_time: bool
) -> None:
    """A hook raising any BaseException, or hanging, fails itself; the run ends, thawed."""
    await _scenario(target, behaviour, virtual_time)


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])  # real clocks
@pytest.mark.parametrize("behaviour", SWALLOWING, ids=lambda b: b.value)
@pytest.mark.parametrize(
    "target",
    # 1 to 4 s a case: the cut stays in the quick runs, the other targets are slow
    [t if t == "cut" else pytest.param(t, marks=pytest.mark.slow) for t in TARGETS],
)
async def test_a_hook_swallowing_cancellation_is_abandoned_in_time(
    target: str, behaviour: Behaviour
) -> None:
    """Swallowing the cancellation once, for 1.5 s or for ever: the run ends on time."""
    await _scenario(target, behaviour, False)


# -- the bound, case by case -------------------------------------------------------------


def _engine(plugin: HostilePlugin, store: MemoryStore | None = None) -> Engine:
    return Engine(
        [plugin], protectables_for(graph_edges()), store=store or MemoryStore(), discover=False
    )


@pytest.mark.slow
async def test_a_hung_cut_is_abandoned_at_the_run_limit_plus_the_abort_deadline() -> None:
    """run = 2, a cut that never returns (hook limit an hour): execute() returns at 2 + abort."""
    plugin = HostilePlugin({(P, "v1", Hook.PREPARE_FINISH, False): Behaviour.HANG})
    async with _engine(plugin) as engine:
        plan = Plan(name="h", resources=[resource("p1")], timeouts=Timeouts(run=2, abort=1))
        start = anyio.current_time()
        with pytest.raises(RunError) as info:
            await engine.protect(plan)
        assert anyio.current_time() - start == pytest.approx(3.0, abs=0.5)
        r = info.value.outcome.resources[resource("v1").key]
        assert r.status is ResourceStatus.ABANDONED and r.abandoned_hook is Hook.PREPARE_FINISH
        s1 = info.value.outcome.resources[resource("s1").key]
        assert s1.thawed_at is not None, "the server was thawed all the same"
    assert engine.statistics().tasks == 0, "closing cancelled the hung cut"


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
async def test_cancel_returns_within_the_abort_deadline_despite_a_swallowing_copy() -> None:
    """Run.cancel() with an on_main that swallows cancellation: cancelled within abort."""
    plugin = HostilePlugin({(P, "v1", Hook.MAIN, False): Behaviour.SWALLOW_FOREVER})
    async with _engine(plugin) as engine:
        plan = Plan(name="c", resources=[resource("p1")], timeouts=Timeouts(abort=0.5))
        run = await engine.build_protect(plan)
        result: list[BaseException] = []

        async def go() -> None:
            try:
                await engine.execute(run)
            except RunError as exc:
                result.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(go)
            while not plugin.calls_of("v1", Hook.MAIN):  # noqa: ASYNC110 - polls a plugin's trace
                await anyio.sleep(0.01)
            start = anyio.current_time()
            run.cancel()
        assert anyio.current_time() - start < 0.5 + 0.5
        [exc] = result
        assert isinstance(exc, RunError)
        assert exc.outcome.status is RunStatus.CANCELLED
        assert exc.outcome.resources[resource("v1").key].status is ResourceStatus.ABANDONED
        plugin.release = True


@pytest.mark.slow
async def test_the_caller_cancelling_a_hung_cut_gets_control_back_within_abort() -> None:
    """The caller's scope is cancelled while a cut hangs: thawed, recorded, returned."""
    plugin = HostilePlugin({(P, "v1", Hook.PREPARE_FINISH, False): Behaviour.HANG})
    store = MemoryStore()
    async with _engine(plugin, store) as engine:
        plan = Plan(name="c", resources=[resource("p1")], timeouts=Timeouts(abort=1))
        start = anyio.current_time()
        with anyio.move_on_after(2) as scope:
            await engine.protect(plan)
        assert scope.cancelled_caught
        assert anyio.current_time() - start == pytest.approx(3.0, abs=0.5)
        [cp] = await store.list_checkpoints()
        assert cp.status.value == "cancelled"
        assert cp.outcome is not None
        assert cp.outcome.resources[resource("s1").key].thawed_at is not None


@pytest.mark.slow
async def test_a_group_abandons_its_hung_hooks_and_other_groups_go_on() -> None:
    """(b): group A's cut hangs after A aborted; group B's resources still finish."""

    class LaterFailure(HostilePlugin):
        async def call(self, ctx: Any) -> None:
            if ctx.resource.id == "v2" and ctx.hook is Hook.PREPARE_FINISH:
                await anyio.sleep(0.1)  # v1's cut has started by then
            await super().call(ctx)

    plugin = LaterFailure(
        {
            (P, "v1", Hook.PREPARE_FINISH, False): Behaviour.HANG,
            (P, "v2", Hook.PREPARE_FINISH, False): Behaviour.RAISE,
        }
    )
    async with _engine(plugin) as engine:
        plan = Plan(
            name="g",
            resources=[resource("s1"), resource("s2")],
            groups=[
                ConsistencyGroup("a", [resource("s1")]),
                ConsistencyGroup("b", [resource("s2")]),
            ],
            timeouts=Timeouts(abort=1),
        )
        with pytest.raises(RunError) as info:
            await engine.protect(plan)
        out = info.value.outcome
        assert out.resources[resource("v1").key].status is ResourceStatus.ABANDONED
        assert out.resources[resource("v3").key].status is ResourceStatus.SUCCEEDED
        assert out.resources[resource("s2").key].status is ResourceStatus.SUCCEEDED
        assert out.groups["a"].aborted is not None and out.groups["b"].aborted is None


@pytest.mark.slow
async def test_an_abandoned_cut_that_returns_later_still_saves_its_snapshot() -> None:
    """A late cut's ctx.save() reaches the checkpoint, so a delete finds the snapshot; until
    the cut ends its volume stays leased to the run that abandoned it."""
    store = MemoryStore()

    class LateCut(HostilePlugin):
        async def call(self, ctx: Any) -> None:
            if ctx.resource.id == "v1" and ctx.hook is Hook.PREPARE_FINISH and not ctx.aborting:
                with anyio.CancelScope(shield=True):
                    await anyio.sleep(5)
                ctx.save(snapshot="late-snap")
                return
            await super().call(ctx)

    async with _engine(LateCut(), store) as engine:
        plan = Plan(name="l", resources=[resource("p1")], timeouts=Timeouts(run=1, abort=1))
        with pytest.raises(RunError) as info:
            await engine.protect(plan)
        cp_id = info.value.checkpoint_id
        assert [a.what for a in engine.statistics().abandoned] == ["a cut"]
        # While the abandoned cut still runs, its volume stays leased: no run may cut it.
        with pytest.raises(ResourceBusyError) as busy:
            await engine.protect(Plan(name="again", resources=[resource("p1")]))
        assert busy.value.resource == resource("v1").key
        await anyio.sleep(5)
        saved = await store.load_saved_info(cp_id)
        assert saved[resource("v1").key]["snapshot"] == "late-snap"
        assert engine.statistics().abandoned == ()
        assert resource("v1").key not in store._leases  # the cut ended: its lease went back


@pytest.mark.slow
async def test_a_thaw_that_succeeds_after_it_was_abandoned_is_recorded_late() -> None:
    """An abandoned thaw makes the resource thaw_failed; its late success sets thawed_late_at."""
    store = MemoryStore()

    class SlowThaw(HostilePlugin):
        async def call(self, ctx: Any) -> None:
            if ctx.resource.type == SERVER and ctx.hook is Hook.PREPARE_FINISH and ctx.aborting:
                with anyio.CancelScope(shield=True):
                    await anyio.sleep(3)
            await super().call(ctx)

    plugin = SlowThaw({(P, "v1", Hook.PREPARE_BEGIN, False): Behaviour.RAISE})
    async with _engine(plugin, store) as engine:
        plan = Plan(name="t", resources=[resource("p1")], timeouts=Timeouts(abort=1))
        with pytest.raises(RunError) as info:
            await engine.protect(plan)
        s1 = info.value.outcome.resources[resource("s1").key]
        assert s1.status is ResourceStatus.THAW_FAILED and s1.thawed_late_at is None
        await anyio.sleep(3)
        record = await store.get_run(info.value.outcome.run_id)
        assert record.outcome is not None
        late = record.outcome.resources[resource("s1").key]
        assert late.status is ResourceStatus.THAW_FAILED and late.thawed_late_at is not None


async def test_operations_need_the_engine_entered() -> None:
    """Outside `async with Engine(...)`, operations raise RuntimeError saying how to use it."""
    engine = _engine(HostilePlugin())
    with pytest.raises(RuntimeError, match="async with Engine"):
        await engine.protect(_plan())
    async with engine:
        await engine.protect(_plan())
    with pytest.raises(RuntimeError, match="closed"):
        await engine.protect(_plan())
    with pytest.raises(RuntimeError, match="entered once"):
        async with engine:
            pass


async def test_a_hook_keyboard_interrupt_aborts_every_group_and_reaches_the_caller() -> None:
    """KeyboardInterrupt in one group's hook: every group aborts, all thawed, then re-raised."""
    plugin = HostilePlugin({(P, "v1", Hook.PREPARE_BEGIN, False): Behaviour.KEYBOARD_INTERRUPT})
    store = MemoryStore()
    async with _engine(plugin, store) as engine:
        plan = Plan(
            name="k",
            resources=[resource("s1"), resource("s2")],
            groups=[
                ConsistencyGroup("a", [resource("s1")]),
                ConsistencyGroup("b", [resource("s2")]),
            ],
        )
        with pytest.raises(KeyboardInterrupt) as info:
            await engine.protect(plan)
        cause = info.value.__cause__
        assert isinstance(cause, RunError)
        out = cause.outcome
        assert out.status is RunStatus.FAILED
        assert {g.aborted.value for g in out.groups.values() if g.aborted} == {"failure"}
        assert len([g for g in out.groups.values() if g.aborted]) == 2
        for name in ("s1", "s2"):
            if plugin.calls_of(name, Hook.PREPARE_BEGIN):
                assert out.resources[resource(name).key].thawed_at is not None
        [cp] = await store.list_checkpoints()
        assert cp.status.value == "error"


@pytest.mark.slow
@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])  # real clocks: it spins
async def test_a_quiesce_that_ignores_cancellation_is_thawed_beside_it_then_again() -> None:
    """s1's on_prepare_begin swallows every cancellation: half the abort deadline after
    it was cancelled its thaw is called beside it (the resource is not left frozen);
    when the quiesce finally ends, it is thawed once more."""
    key: Key = (P, "s1", Hook.PREPARE_BEGIN, False)
    plugin = HostilePlugin({key: Behaviour.SWALLOW_FOREVER})
    store = MemoryStore()
    async with _engine(plugin, store) as engine:
        plan = Plan(name="r", resources=[resource("p1")], timeouts=Timeouts(hook=0.5, abort=1))
        with pytest.raises(RunError) as info:
            await engine.protect(plan)
        s1 = info.value.outcome.resources[resource("s1").key]
        assert s1.status is ResourceStatus.ABANDONED, "thawed by the rescue: not thaw_failed"
        assert s1.abandoned_hook is Hook.PREPARE_BEGIN and s1.thawed_at is not None
        rescue = [c for c in plugin.calls_of("s1", Hook.PREPARE_FINISH) if c.aborting]
        assert [c.outcome for c in rescue] == ["ok"]
        events = await store.read_events(info.value.outcome.run_id)
        assert any(e.kind is EventKind.THAWED and e.data.get("rescue") for e in events)
        plugin.release = True
        for _ in range(100):
            if len([c for c in plugin.calls_of("s1", Hook.PREPARE_FINISH) if c.aborting]) > 1:
                break
            await anyio.sleep(0.02)
    thaws = [c for c in plugin.calls_of("s1", Hook.PREPARE_FINISH) if c.aborting]
    assert len(thaws) == 2 and thaws[-1].outcome == "ok", "thawed again after the late quiesce"


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])  # real clocks: it spins
async def test_a_late_thaw_that_raises_keyboard_interrupt_does_not_break_the_engine() -> None:
    """The quiesce swallows cancellation and every thaw raises KeyboardInterrupt: the
    rescue and the late thaw both fail, the resource is thaw_failed with its alert, and
    the engine still closes cleanly (nothing escapes a task it owns)."""
    plugin = HostilePlugin(
        {
            (P, "s1", Hook.PREPARE_BEGIN, False): Behaviour.SWALLOW_FOREVER,
            (P, "s1", Hook.PREPARE_FINISH, True): Behaviour.KEYBOARD_INTERRUPT,
        }
    )
    async with _engine(plugin) as engine:
        plan = Plan(name="k", resources=[resource("p1")], timeouts=Timeouts(hook=0.3, abort=0.4))
        with pytest.raises(RunError) as info:
            await engine.protect(plan)
        s1 = info.value.outcome.resources[resource("s1").key]
        assert s1.status is ResourceStatus.THAW_FAILED
        plugin.release = True  # the quiesce ends: the late thaw runs, and raises too
        for _ in range(100):
            if len([c for c in plugin.calls_of("s1", Hook.PREPARE_FINISH) if c.aborting]) > 2:
                break
            await anyio.sleep(0.02)
    assert engine.statistics().tasks == 0
    late = [c for c in plugin.calls_of("s1", Hook.PREPARE_FINISH) if c.aborting]
    assert late and all(isinstance(c.raised, KeyboardInterrupt) for c in late)
