"""The guarantees under misbehaving hooks, second half: the quiesce budget is exact,
failed aborting calls are recorded, marks are checked, and the smaller rules."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import anyio
import pytest

from helpers import TYPES, key, res, setup, sk
from karbor_async import (
    AbortReason,
    BarrierPolicy,
    Engine,
    EventKind,
    Hook,
    HookContext,
    MemoryStore,
    Plan,
    ProtectionPlugin,
    Resource,
    ResourceStatus,
    RunError,
    Timeouts,
)
from karbor_async.exceptions import GraphError, HookError, HookTimeoutError, ThawFailedError
from karbor_async.testing import Fault, MapProtectable, protectables_for

PB, PF = Hook.PREPARE_BEGIN, Hook.PREPARE_FINISH


def _slow_thaw_budget(fallback: bool) -> tuple:  # type: ignore[type-arg]
    """s1's budget fires at 0.5 and its thaw takes 1 s; the cut barrier opens at 1.0
    (s2's quiesce), during that thaw, so v1 is woken to cut while s1 is thawing."""
    return setup(
        [("s1", "v1"), ("s2", "v2")],
        ["s1", "s2"],
        barrier=BarrierPolicy.CUT,
        delays={(sk("s2"), PB): 1.0, (sk("s1"), PF): 1.0},
        timeouts=Timeouts(hook=100, quiesce_budget_per_type={sk("s1"): 0.5}),
        crash_consistent_fallback=fallback,
    )


@pytest.mark.slow
@pytest.mark.parametrize("anyio_backend", ["trio"])  # virtual time: exact instants
async def test_budget_without_fallback_aborts_before_the_thaw_so_no_cut_starts(
    anyio_backend: object,
) -> None:
    """The budget fires: the group aborts at that instant, not when the slow thaw ends."""
    engine, plugin, plan = _slow_thaw_budget(False)
    async with engine:
        with pytest.raises(RunError) as info:
            await engine.protect(plan)
    outcome = info.value.outcome
    assert outcome.groups["default"].aborted is AbortReason.BUDGET
    cuts = [c for n in ("v1", "v2") for c in plugin.calls(key(n), PF) if c.aborting is None]
    assert cuts == [], "no cut of the group starts once the budget fired"
    assert outcome.resources[key("v1")].cut_at is None


@pytest.mark.slow
@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_budget_with_fallback_a_cut_during_the_thaw_is_crash_consistent(
    anyio_backend: object,
) -> None:
    """A cut that starts after its server's budget fired is crash-consistent, even while
    the server's thaw still runs; the checkpoint says so."""
    engine, plugin, plan = _slow_thaw_budget(True)
    async with engine:
        outcome = await engine.protect(plan)
    v1 = outcome.resources[key("v1")]
    s1_thaw = plugin.calls(key("s1"), PF)[0]
    assert s1_thaw.aborting is AbortReason.BUDGET
    assert v1.cut_at is not None and v1.crash_consistent
    assert outcome.crash_consistent and outcome.groups["default"].crash_consistent
    assert not outcome.resources[key("v2")].crash_consistent, "v2 is not under s1"
    assert outcome.resources[key("s1")].status is ResourceStatus.SUCCEEDED


# -- failed aborting calls are never lost -------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [Fault.RAISE, pytest.param(Fault.HANG, marks=pytest.mark.slow)],  # 2 s on asyncio
)
async def test_a_failed_aborting_call_of_a_non_quiescing_resource_is_recorded(
    fault: Fault,
) -> None:
    """v1's aborting on_prepare_finish raises or hangs to the deadline: it is in the
    outcome's errors, in order after nothing, and its HookError joins RunError."""
    engine, plugin, plan = setup(
        [("s1", "v1"), ("s1", "v2")],
        ["s1"],
        barrier=BarrierPolicy.CUT,  # v1 waits at the barrier until v2's prepare fails
        delays={(sk("v2"), PB): 0.05},
        faults={(sk("v1"), PF): fault, (sk("v2"), PB): Fault.RAISE},
        fault_thaws=True,
        timeouts=Timeouts(hook=30, abort=2),
    )
    async with engine:
        with pytest.raises(RunError) as info:
            await engine.protect(plan)
    v1 = info.value.outcome.resources[key("v1")]
    [(hook, reason, text)] = v1.errors
    assert hook is PF and reason is AbortReason.FAILURE
    assert ("InjectedError" if fault is Fault.RAISE else "before the abort deadline") in text
    assert v1.error == text and v1.failed_hook is PF
    assert len([c for c in plugin.calls(key("v1"), PF) if c.aborting]) == 1, "not retried"
    grouped = [e for e in info.value.exceptions if isinstance(e, HookError)]
    assert any(e.resource.id == "v1" and e.hook is PF for e in grouped)
    if fault is Fault.HANG:
        assert any(isinstance(e, HookTimeoutError) and e.resource.id == "v1" for e in grouped)


@pytest.mark.slow
async def test_errors_keep_every_failure_in_order_and_error_the_first() -> None:
    """A server whose quiesce fails and whose thaws all fail: both failures, in order."""
    engine, _plugin, plan = setup(
        [("s1", "v1")],
        ["s1"],
        faults={(sk("s1"), PB): Fault.RAISE, (sk("s1"), PF): Fault.RAISE},
        fault_thaws=True,
        timeouts=Timeouts(hook=30, abort=1),
    )
    async with engine:
        with pytest.raises(RunError) as info:
            await engine.protect(plan)
    s1 = info.value.outcome.resources[key("s1")]
    assert s1.status is ResourceStatus.THAW_FAILED
    assert [(h, a) for h, a, _t in s1.errors] == [(PB, None), (PF, AbortReason.FAILURE)]
    assert s1.failed_hook is PB and s1.error == s1.errors[0][2]
    assert "ThawFailedError" in s1.errors[1][2]
    assert any(isinstance(e, ThawFailedError) for e in info.value.exceptions)


# -- marks are checked ----------------------------------------------------------------------

Marker = Callable[[HookContext], None]


class _MarkOp:
    def __init__(self, plugin: MarkPlugin) -> None:
        self._plugin = plugin

    async def _hook(self, ctx: HookContext) -> None:
        await anyio.sleep(0.01)
        for marker in self._plugin.marks.get(
            (ctx.resource.id, ctx.hook, ctx.aborting is not None), ()
        ):
            marker(ctx)

    on_prepare_begin = on_prepare_finish = on_main = on_complete = _hook


class MarkPlugin(ProtectionPlugin):
    name = "marks"
    types = TYPES

    def __init__(self, marks: Mapping[tuple[str, Hook, bool], Sequence[Marker]]) -> None:
        self.marks = dict(marks)

    def get_protect_operation(self, resource_type: str) -> object:
        return _MarkOp(self)


def _cut(at: float | None = None) -> Marker:
    return lambda ctx: ctx.mark_cut(at)


def _quiesced(at: float | None = None) -> Marker:
    return lambda ctx: ctx.mark_quiesced(at)


def _thawed(at: float | None = None) -> Marker:
    return lambda ctx: ctx.mark_thawed(at)


REFUSED = {
    "mark_cut twice": (("v1", PF, False), [_cut(), _cut()], "once per call"),
    "mark_thawed in on_prepare_begin": (("s1", PB, False), [_thawed()], "mark_thawed is for"),
    "mark_quiesced from on_main": (("s1", Hook.MAIN, False), [_quiesced()], "mark_quiesced is for"),
    "mark_cut at -1e9": (("v1", PF, False), [_cut(-1e9)], "at must be between"),
    "mark_cut in the future": (("v1", PF, False), [_cut(1e12)], "at must be between"),
    "mark_cut on a type that takes no snapshot": (("s1", PF, False), [_cut()], "snapshots"),
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_a_refused_mark_fails_its_hook_naming_the_rule(case: str) -> None:
    """In a non-aborting call, a mark against the rules raises MarkError; the hook fails."""
    where, markers, rule = REFUSED[case]
    plugin = MarkPlugin({where: markers})
    store = MemoryStore()
    async with Engine(
        [plugin], protectables_for([(res("s1"), res("v1"))]), store=store, discover=False
    ) as engine:
        with pytest.raises(RunError) as info:
            await engine.protect(Plan(name="m", resources=[res("s1")]))
    r = info.value.outcome.resources[key(where[0])]
    assert r.failed_hook is where[1]
    assert r.error is not None and "MarkError" in r.error and rule in r.error
    assert str(res(where[0])) in r.error and where[1].value in r.error
    skews = [g.skew for g in info.value.outcome.groups.values() if g.skew is not None]
    assert all(abs(s) < 100 for s in skews), "no absurd skew from a refused mark"


async def test_an_aborting_call_never_raises_for_a_mark_it_warns() -> None:
    """A refused mark in an aborting thaw is a mark_refused event; the default instant stands;
    mark_thawed on a resource that never quiesced is ignored."""
    plugin = MarkPlugin(
        {
            ("s1", PF, True): [_thawed(-1e9)],
            ("v1", PF, True): [_cut(), _thawed()],
        }
    )

    class Failing(MarkPlugin):
        def get_protect_operation(self, resource_type: str) -> object:
            op = _MarkOp(self)

            async def fail(ctx: HookContext) -> None:
                if ctx.resource.id == "v2":
                    await anyio.sleep(0.05)  # v1 has prepared and waits at the cut barrier
                    raise RuntimeError("v2 cannot prepare")
                await _MarkOp._hook(op, ctx)

            op.on_prepare_begin = fail  # type: ignore[method-assign]
            return op

    failing = Failing(plugin.marks)
    store = MemoryStore()
    edges = [(res("s1"), res("v1")), (res("s1"), res("v2"))]
    async with Engine([failing], protectables_for(edges), store=store, discover=False) as engine:
        with pytest.raises(RunError) as info:
            await engine.protect(Plan(name="m", resources=[res("s1")], barrier=BarrierPolicy.CUT))
    outcome = info.value.outcome
    events = await store.read_events(outcome.run_id)
    refused = [(e.resource, e.data["mark"]) for e in events if e.kind is EventKind.MARK_REFUSED]
    assert (key("s1"), "thawed") in refused and (key("v1"), "cut") in refused
    assert (key("v1"), "thawed") not in refused, "ignored: v1 never quiesced"
    s1 = outcome.resources[key("s1")]
    assert s1.thawed_at is not None and s1.quiesced_at is not None
    assert s1.thawed_at >= s1.quiesced_at
    assert outcome.resources[key("v1")].cut_at is None


async def test_marked_instants_in_the_outcome_agree_with_the_stored_events() -> None:
    """Marks inside their windows are used, and the events carry the same instants."""
    plugin = MarkPlugin(
        {
            ("s1", PB, False): [_quiesced()],
            ("v1", PF, False): [_cut()],
            ("s1", PF, False): [_thawed()],
        }
    )
    store = MemoryStore()
    async with Engine(
        [plugin], protectables_for([(res("s1"), res("v1"))]), store=store, discover=False
    ) as engine:
        outcome = await engine.protect(Plan(name="m", resources=[res("s1")]))
    events = await store.read_events(outcome.run_id)
    at = {(e.resource, e.kind): e.data["at"] for e in events if "at" in e.data}
    s1, v1 = outcome.resources[key("s1")], outcome.resources[key("v1")]
    assert at[(key("s1"), EventKind.QUIESCED)] == s1.quiesced_at
    assert at[(key("s1"), EventKind.THAWED)] == s1.thawed_at
    assert at[(key("v1"), EventKind.CUT)] == v1.cut_at
    assert s1.quiesced_at is not None and v1.cut_at is not None and s1.thawed_at is not None
    assert s1.quiesced_at <= v1.cut_at <= s1.thawed_at


# -- smaller rules ----------------------------------------------------------------------------


async def test_cancel_on_a_finished_run_does_nothing() -> None:
    """Run.cancel() after the run ended appends nothing to its log."""
    engine, _plugin, plan = setup([("s1", "v1")], ["s1"])
    async with engine:
        run = await engine.build_protect(plan)
        outcome = await engine.execute(run)
        before = await engine.store.read_events(outcome.run_id)
        run.cancel()
        run.abandon()
        after = await engine.store.read_events(outcome.run_id)
    assert [e.seq for e in after] == [e.seq for e in before]
    assert after[-1].kind is EventKind.RUN_FINISHED


async def test_resources_a_cancelled_run_did_not_finish_are_cancelled_not_skipped() -> None:
    """Cancelling during the children's copies: their parents are cancelled, not skipped."""
    engine, plugin, plan = setup(
        [("p1", "s1"), ("s1", "v1"), ("s1", "v2")],
        ["p1"],
        delays={(sk("v1"), Hook.MAIN): 100},
        faults={(sk("v2"), Hook.MAIN): Fault.CANCEL_RUN},
    )
    async with engine:
        run = await engine.build_protect(plan)
        plugin.cancel_run = run.cancel
        with pytest.raises(RunError) as info:
            await engine.execute(run)
    statuses = {k[1]: r.status for k, r in info.value.outcome.resources.items()}
    assert statuses["s1"] is ResourceStatus.CANCELLED and statuses["p1"] is ResourceStatus.CANCELLED
    assert ResourceStatus.SKIPPED not in statuses.values()


@pytest.mark.slow
async def test_a_hanging_protectable_is_named_when_discovery_times_out() -> None:
    """timeouts.discovery: a protectable that never answers is named with its parent."""

    class Hanging:
        resource_type = "OS::Cinder::Volume"
        parent_types: tuple[str, ...] = ("OS::Nova::Server",)

        async def dependents(self, parent: Resource) -> list[Resource]:
            await anyio.sleep_forever()
            return []

    engine = Engine([MarkPlugin({})], [Hanging()], discover=False)
    plan = Plan(name="d", resources=[res("s1")], timeouts=Timeouts(discovery=5))
    async with engine:
        start = anyio.current_time()
        with pytest.raises(
            GraphError,
            match=r"timeouts.discovery \(5 s\).*'OS::Cinder::Volume'.*OS::Nova::Server#s1",
        ):
            await engine.build_protect(plan)
        assert anyio.current_time() - start < 6


async def test_one_identity_with_two_names_is_a_graph_error_naming_both() -> None:
    """Two parents report v1 under different names: an error names both and who said each."""
    a = Resource("OS::Cinder::Volume", "v1", name="data")
    b = Resource("OS::Cinder::Volume", "v1", name="logs")
    finder = MapProtectable(
        "OS::Cinder::Volume", ["OS::Nova::Server"], {res("s1").key: [a], res("s2").key: [b]}
    )
    engine = Engine([MarkPlugin({})], [finder], discover=False)
    async with engine:
        with pytest.raises(GraphError) as info:
            await engine.build_protect(Plan(name="n", resources=[res("s1"), res("s2")]))
    text = str(info.value)
    assert "OS::Cinder::Volume#v1" in text and "'data'" in text and "'logs'" in text
    assert "OS::Nova::Server#s1" in text and "OS::Nova::Server#s2" in text


async def test_one_identity_with_a_different_extra_keeps_the_first() -> None:
    """A different ``extra`` is allowed: the first one reported is kept."""

    class Later:
        resource_type = "OS::Cinder::Volume"
        parent_types: tuple[str, ...] = ("OS::Nova::Server",)

        async def dependents(self, parent: Resource) -> list[Resource]:
            if parent.id == "s2":
                await anyio.sleep(0.05)  # s2 reports it second
            size = 1 if parent.id == "s1" else 2
            return [Resource("OS::Cinder::Volume", "v1", name="v1", extra={"size": size})]

    engine = Engine([MarkPlugin({})], [Later()], discover=False)
    async with engine:
        run = await engine.build_protect(Plan(name="n", resources=[res("s1"), res("s2")]))
    [v1] = [r for r in run.spec.graph.resources if r.id == "v1"]
    assert v1.extra["size"] == 1


async def test_cancelling_the_callers_scope_starts_no_hook_after_it() -> None:
    """1,000 resources; a hook cancels the caller's scope: no non-aborting hook starts
    after that instant (the same as Run.cancel() then)."""
    starts: list[tuple[str, bool]] = []
    cancelled_at: list[int] = []
    scope = anyio.CancelScope()

    class Op:
        async def _hook(self, ctx: HookContext) -> None:
            starts.append((ctx.resource.id, ctx.aborting is not None))
            if ctx.resource.id == "v500" and ctx.hook is Hook.MAIN:
                cancelled_at.append(len(starts))
                scope.cancel()
            await anyio.lowlevel.checkpoint()

        on_prepare_begin = on_prepare_finish = on_main = on_complete = _hook

    class Many(ProtectionPlugin):
        name = "many"
        types = TYPES

        def get_protect_operation(self, resource_type: str) -> object:
            return Op()

    plan = Plan(name="c", resources=[Resource("OS::Cinder::Volume", f"v{i}") for i in range(1000)])
    async with Engine([Many()], discover=False) as engine:
        with scope:
            await engine.protect(plan)
        assert scope.cancelled_caught
        [cp] = await engine.store.list_checkpoints()
        assert cp.status.value == "cancelled"
    [at] = cancelled_at
    after = [s for s in starts[at:] if not s[1]]
    assert after == [], f"{len(after)} hooks started after the caller was cancelled"
