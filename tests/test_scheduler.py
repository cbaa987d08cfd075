"""The scheduler: Karbor's ordering rules, barriers, failures, timeouts, budgets, cancellation."""

from __future__ import annotations

import anyio
import pytest

from helpers import QUIESCING, SERVER, VOLUME, key, res, setup, sk
from invariants import check_run
from karbor_async import (
    AbortReason,
    BarrierPolicy,
    CheckpointStatus,
    Engine,
    Hook,
    Plan,
    ResourceGraph,
    ResourceStatus,
    RunError,
    RunOutcome,
    RunStatus,
    Timeouts,
)
from karbor_async.events import EventKind
from karbor_async.exceptions import HookError, HookTimeoutError, RunCancelledError, ThawFailedError
from karbor_async.testing import Fault, RecordingPlugin

PB, PF, MAIN, CP = Hook.PREPARE_BEGIN, Hook.PREPARE_FINISH, Hook.MAIN, Hook.COMPLETE

KARBOR_CASES = {
    "chain": ([("a", "b"), ("b", "c")], ["a"]),
    "shared": ([("a", "c"), ("b", "c"), ("c", "d"), ("c", "e")], ["a", "b"]),
    "independent": ([("s1", "v1"), ("s2", "v2")], ["s1", "s2"]),
    "diamond": ([("p1", "s1"), ("p1", "s2"), ("s1", "v1"), ("s2", "v1")], ["p1"]),
    "server-volumes": ([("s1", "v1"), ("s1", "v2"), ("s1", "v3")], ["s1"]),
}


async def graph_of(engine: Engine, plan: Plan) -> ResourceGraph:
    run = await engine.build_protect(plan)
    return run.spec.graph


async def verify(
    engine: Engine, plugin: RecordingPlugin, outcome: RunOutcome, graph: ResourceGraph
) -> None:
    """Check every rule on the recorded trace, with the run's stored events."""
    events = await engine.store.read_events(outcome.run_id)
    check_run(plugin.trace, graph, outcome, QUIESCING, events)


@pytest.mark.parametrize("policy", list(BarrierPolicy))
@pytest.mark.parametrize("case", sorted(KARBOR_CASES))
async def test_karbor_cases_follow_every_ordering_rule(case: str, policy: BarrierPolicy) -> None:
    """The chain, shared, independent-roots and diamond graphs run each hook once, in order."""
    edges, roots = KARBOR_CASES[case]
    delays = {(VOLUME, PF): 0.002, (SERVER, PB): 0.001}
    engine, plugin, plan = setup(edges, roots, barrier=policy, delays=delays)
    async with engine:
        outcome = await engine.protect(plan)
        assert outcome.status is RunStatus.SUCCEEDED
        await verify(engine, plugin, outcome, await graph_of(engine, plan))
        assert len(plugin.trace) == 4 * len(outcome.resources)


async def test_shared_child_is_one_node_and_waits_for_both_parents() -> None:
    """A volume on two servers is protected once; its prepare_begin follows both servers'."""
    engine, plugin, plan = setup([("s1", "v1"), ("s2", "v1")], ["s1", "s2"])
    async with engine:
        outcome = await engine.protect(plan)
        assert len(outcome.resources) == 3
        v_pb = plugin.calls(key("v1"), PB)[0]
        for s in ("s1", "s2"):
            end = plugin.calls(key(s), PB)[0].end
            assert end is not None and end <= v_pb.start


async def test_plan_resource_found_as_dependent_is_not_a_root() -> None:
    """Naming both a server and its volume protects the volume once, under the server."""
    engine, _plugin, plan = setup([("s1", "v1")], ["s1", "v1"])
    async with engine:
        graph = await graph_of(engine, plan)
        assert [r.id for r in graph.roots] == ["s1"]


async def test_cut_barrier_releases_cuts_after_every_quiesce() -> None:
    """Under `cut`, no volume snapshots before every server of the group is quiesced."""
    edges = [("s1", "v1"), ("s1", "v2"), ("s2", "v3")]
    delays = {(sk("s2"), PB): 0.02}
    engine, plugin, plan = setup(edges, ["s1", "s2"], barrier=BarrierPolicy.CUT, delays=delays)
    async with engine:
        outcome = await engine.protect(plan)
        last_quiesce = max(e.end for e in plugin.calls(hook=PB) if e.end is not None)
        first_cut = min(e.start for e in plugin.calls(hook=PF))
        assert last_quiesce <= first_cut
        assert outcome.skew is not None and outcome.skew < 0.02
        await verify(engine, plugin, outcome, await graph_of(engine, plan))


async def test_under_cut_no_server_thaws_before_every_cut_of_its_group() -> None:
    """Quiesce everything, cut, then thaw: a server whose own volume was cut fast still
    waits for the slow cut of another server's volume, so no application of the group
    runs again while a store of the group is still to be cut (a transfer from one shard
    to another could otherwise land in the later cut and not the earlier one)."""
    delays = {(sk("v2"), PF): 0.2}
    engine, plugin, plan = setup(
        [("s1", "v1"), ("s2", "v2")], ["s1", "s2"], barrier=BarrierPolicy.CUT, delays=delays
    )
    async with engine:
        outcome = await engine.protect(plan)
    (slow_cut,) = plugin.calls(key("v2"), PF)
    assert slow_cut.end is not None
    for server in ("s1", "s2"):
        (thaw,) = plugin.calls(key(server), PF)
        assert thaw.start >= slow_cut.end, f"{server} thawed before v2 was cut"
    window = outcome.resources[key("s1")].quiesce_window
    assert window is not None and window >= 0.2  # the price: the slowest cut of the group


async def test_under_main_a_server_thaws_after_its_own_cuts_only() -> None:
    """Barrier `main` keeps Karbor's edges for thaws: a server thaws once its own volumes
    are cut, whatever another server's volume does."""
    delays = {(sk("v2"), PF): 0.2}
    engine, plugin, plan = setup(
        [("s1", "v1"), ("s2", "v2")], ["s1", "s2"], barrier=BarrierPolicy.MAIN, delays=delays
    )
    async with engine:
        await engine.protect(plan)
    (slow_cut,) = plugin.calls(key("v2"), PF)
    (thaw,) = plugin.calls(key("s1"), PF)
    assert slow_cut.end is not None and thaw.start < slow_cut.end


async def test_skew_and_quiesce_windows_are_recorded() -> None:
    """Cuts default to the start of on_prepare_finish; windows span quiesce to thaw."""
    engine, _plugin, plan = setup(
        [("s1", "v1"), ("s1", "v2")],
        ["s1"],
        barrier=BarrierPolicy.CUT,
        delays={(VOLUME, PF): 0.001},
    )
    async with engine:
        outcome = await engine.protect(plan)
        v1, v2 = outcome.resources[key("v1")], outcome.resources[key("v2")]
        assert v1.cut_at is not None and v2.cut_at is not None
        assert outcome.groups["default"].skew == abs(v1.cut_at - v2.cut_at)
        assert outcome.groups["default"].cuts == 2
        server = outcome.resources[key("s1")]
        assert server.cut_at is None  # a server that only quiesces does not cut
        assert server.quiesce_window is not None and server.quiesce_window > 0
        assert not v1.crash_consistent and not outcome.crash_consistent


async def test_volume_without_quiesce_is_crash_consistent() -> None:
    """A resource captured with no quiescing ancestor is marked crash-consistent."""
    engine, _plugin, plan = setup([], ["v1"])
    async with engine:
        outcome = await engine.protect(plan)
        assert outcome.resources[key("v1")].crash_consistent
        assert outcome.crash_consistent


async def test_failure_in_prepare_aborts_group_and_thaws_servers() -> None:
    """A volume whose prepare_begin raises aborts the group; the frozen server is thawed."""
    faults = {(sk("v2"), PB): Fault.RAISE}
    engine, plugin, plan = setup([("s1", "v1"), ("s1", "v2")], ["s1"], faults=faults)
    async with engine:
        with pytest.raises(RunError) as info:
            await engine.protect(plan)
        outcome = info.value.outcome
        assert outcome.status is RunStatus.FAILED
        assert outcome.groups["default"].aborted is AbortReason.FAILURE
        assert info.value.checkpoint_id == outcome.checkpoint_id
        hook_errors = [e for e in info.value.exceptions if isinstance(e, HookError)]
        assert hook_errors and hook_errors[0].hook is PB
        assert "injected failure" in str(hook_errors[0].__cause__)
        thaws = plugin.calls(key("s1"), PF)
        assert thaws and thaws[-1].aborting is AbortReason.FAILURE and thaws[-1].outcome == "ok"
        assert not plugin.calls(hook=MAIN)
        assert outcome.resources[key("v2")].status is ResourceStatus.FAILED
        assert outcome.resources[key("v2")].failed_hook is PB
        assert "InjectedError" in (outcome.resources[key("v2")].error or "")
        cp = await engine.store.get_checkpoint(outcome.checkpoint_id)
        assert cp.status is CheckpointStatus.ERROR
        await verify(engine, plugin, outcome, await graph_of(engine, plan))


async def test_hook_hanging_past_its_timeout_fails_and_thaws(virtual_time: bool) -> None:
    """A hang past the hook timeout is a HookTimeoutError; the group aborts and thaws."""
    limit = 30.0 if virtual_time else 0.05
    faults = {(sk("v1"), PB): Fault.HANG}
    engine, plugin, plan = setup(
        [("s1", "v1")], ["s1"], faults=faults, timeouts=Timeouts(hook=limit)
    )
    async with engine:
        with pytest.raises(RunError) as info:
            await engine.protect(plan)
        assert any(isinstance(e, HookTimeoutError) for e in info.value.exceptions)
        assert plugin.calls(key("s1"), PF)[-1].aborting is AbortReason.FAILURE
        await verify(engine, plugin, info.value.outcome, await graph_of(engine, plan))


async def test_running_cut_is_not_cancelled_by_another_failure(virtual_time: bool) -> None:
    """An on_prepare_finish already running finishes even when a sibling's cut fails."""
    slow = 5.0 if virtual_time else 0.05
    delays = {(sk("v1"), PF): slow, (sk("v2"), PF): slow / 10}
    faults = {(sk("v2"), PF): Fault.RAISE}
    engine, plugin, plan = setup([("s1", "v1"), ("s1", "v2")], ["s1"], delays=delays, faults=faults)
    async with engine:
        with pytest.raises(RunError) as info:
            await engine.protect(plan)
        (v1_cut,) = plugin.calls(key("v1"), PF)
        assert v1_cut.outcome == "ok" and v1_cut.aborting is None
        server_pf = plugin.calls(key("s1"), PF)
        assert server_pf[-1].aborting is AbortReason.FAILURE
        # The aborting thaw does not wait for the children's prepare_finish.
        assert server_pf[-1].start < (v1_cut.end or 0)
        await verify(engine, plugin, info.value.outcome, await graph_of(engine, plan))


async def test_failure_in_main_lets_unrelated_resources_finish() -> None:
    """A failing on_main fails its resource; ancestors skip complete; others succeed."""
    faults = {(sk("v1"), MAIN): Fault.RAISE}
    edges = [("p1", "s1"), ("p1", "s2"), ("s1", "v1"), ("s2", "v2")]
    engine, plugin, plan = setup(edges, ["p1"], faults=faults)
    async with engine:
        with pytest.raises(RunError) as info:
            await engine.protect(plan)
        outcome = info.value.outcome
        status = {k[1]: r.status for k, r in outcome.resources.items()}
        assert status == {
            "p1": ResourceStatus.SKIPPED,
            "s1": ResourceStatus.SKIPPED,
            "s2": ResourceStatus.SUCCEEDED,
            "v1": ResourceStatus.FAILED,
            "v2": ResourceStatus.SUCCEEDED,
        }
        assert plugin.calls(key("s1"), MAIN), "a parent's on_main does not wait for its children"
        assert not plugin.calls(key("s1"), CP) and not plugin.calls(key("p1"), CP)
        assert plugin.calls(key("s2"), CP)
        assert outcome.groups["default"].aborted is None
        cp = await engine.store.get_checkpoint(outcome.checkpoint_id)
        assert cp.status is CheckpointStatus.ERROR
        await verify(engine, plugin, outcome, await graph_of(engine, plan))


async def test_cancel_from_another_task_thaws_and_ends_cancelled() -> None:
    """Run.cancel() during the cut: frozen servers are thawed; the run ends cancelled."""
    engine, plugin, plan = setup(
        [("s1", "v1"), ("s2", "v2")],
        ["s1", "s2"],
        barrier=BarrierPolicy.CUT,
        faults={(sk("v1"), PB): Fault.CANCEL_RUN},
    )
    async with engine:
        run = await engine.build_protect(plan)
        plugin.cancel_run = run.cancel
        with pytest.raises(RunError) as info:
            await engine.execute(run)
        outcome = info.value.outcome
        assert outcome.status is RunStatus.CANCELLED
        assert any(isinstance(e, RunCancelledError) for e in info.value.exceptions)
        for s in ("s1", "s2"):
            if plugin.calls(key(s), PB):
                assert plugin.calls(key(s), PF)[-1].aborting is AbortReason.CANCELLED
        assert all(r.status is not ResourceStatus.SUCCEEDED for r in outcome.resources.values())
        cp = await engine.store.get_checkpoint(outcome.checkpoint_id)
        assert cp.status is CheckpointStatus.CANCELLED
        await verify(engine, plugin, outcome, run.spec.graph)


async def test_callers_cancellation_propagates_after_cleanup(virtual_time: bool) -> None:
    """Cancelling the caller's scope thaws, records `cancelled`, then propagates."""
    slow = 10.0 if virtual_time else 0.05
    engine, plugin, plan = setup([("s1", "v1")], ["s1"], delays={(sk("v1"), PB): slow})
    async with engine:
        run = await engine.build_protect(plan)
        with anyio.move_on_after(slow / 2) as scope:
            await engine.execute(run)
        assert scope.cancelled_caught
        assert plugin.calls(key("s1"), PF)[-1].aborting is AbortReason.CANCELLED
        record = await engine.store.get_run(run.run_id)
        assert record.status is RunStatus.CANCELLED
        cp = await engine.store.get_checkpoint(run.checkpoint_id)
        assert cp.status is CheckpointStatus.CANCELLED


async def test_run_time_limit_aborts_with_timeout(virtual_time: bool) -> None:
    """A run past its time limit aborts every group with reason `timeout` and fails."""
    slow = 100.0 if virtual_time else 0.2
    limit = slow / 4
    engine, plugin, plan = setup(
        [("s1", "v1")],
        ["s1"],
        delays={(sk("v1"), PB): slow},
        timeouts=Timeouts(hook=slow * 10, run=limit),
    )
    async with engine:
        with pytest.raises(RunError) as info:
            await engine.protect(plan)
        assert info.value.outcome.status is RunStatus.FAILED
        assert info.value.outcome.groups["default"].aborted is AbortReason.TIMEOUT
        assert plugin.calls(key("s1"), PF)[-1].aborting is AbortReason.TIMEOUT


async def test_quiesce_budget_aborts_group_without_fallback(virtual_time: bool) -> None:
    """A server frozen past its budget is thawed at once and the group aborts."""
    unit = 1.0 if virtual_time else 0.02
    engine, plugin, plan = setup(
        [("s1", "v1"), ("s2", "v2")],
        ["s1", "s2"],
        barrier=BarrierPolicy.CUT,
        delays={(sk("s2"), PB): 10 * unit},
        timeouts=Timeouts(hook=100 * unit, quiesce_budget=2 * unit),
    )
    async with engine:
        with pytest.raises(RunError) as info:
            await engine.protect(plan)
        outcome = info.value.outcome
        assert outcome.groups["default"].aborted is AbortReason.BUDGET
        s1_thaw = plugin.calls(key("s1"), PF)[-1]
        assert s1_thaw.aborting is AbortReason.BUDGET
        assert outcome.resources[key("s1")].thawed_early
        window = outcome.resources[key("s1")].quiesce_window
        assert window is not None and window < 5 * unit
        assert not [e for e in plugin.calls(key("v1"), PF) if e.aborting is None]
        await verify(engine, plugin, outcome, await graph_of(engine, plan))


async def test_quiesce_budget_with_fallback_cuts_crash_consistent(virtual_time: bool) -> None:
    """With the fallback, the thawed server's volumes still cut, marked crash-consistent."""
    unit = 1.0 if virtual_time else 0.02
    engine, plugin, plan = setup(
        [("s1", "v1"), ("s2", "v2")],
        ["s1", "s2"],
        barrier=BarrierPolicy.CUT,
        delays={(sk("s2"), PB): 10 * unit},
        timeouts=Timeouts(hook=100 * unit, quiesce_budget=2 * unit),
        crash_consistent_fallback=True,
    )
    async with engine:
        outcome = await engine.protect(plan)
        assert outcome.status is RunStatus.SUCCEEDED
        assert outcome.resources[key("s1")].thawed_early
        assert outcome.resources[key("v1")].crash_consistent
        assert outcome.crash_consistent
        s1_pf = plugin.calls(key("s1"), PF)[0]
        v1_pf = plugin.calls(key("v1"), PF)[0]
        assert s1_pf.aborting is AbortReason.BUDGET and s1_pf.start < v1_pf.start
        await verify(engine, plugin, outcome, await graph_of(engine, plan))


async def test_thaw_that_keeps_failing_is_recorded_never_silent(virtual_time: bool) -> None:
    """Every thaw attempt failing ends in a thaw_failed record and an alert event."""
    unit = 1.0 if virtual_time else 0.01
    engine, plugin, plan = setup(
        [("s1", "v1")],
        ["s1"],
        faults={(sk("v1"), PB): Fault.RAISE, (sk("s1"), PF): Fault.RAISE},
        fault_thaws=True,
        timeouts=Timeouts(hook=10 * unit, abort=30 * unit),
    )
    async with engine:
        with pytest.raises(RunError) as info:
            await engine.protect(plan)
        outcome = info.value.outcome
        assert outcome.resources[key("s1")].status is ResourceStatus.THAW_FAILED
        assert any(isinstance(e, ThawFailedError) for e in info.value.exceptions)
        assert len(plugin.calls(key("s1"), PF)) > 1, "the thaw is retried"
        events = await engine.store.read_events(outcome.run_id)
        assert any(e.kind is EventKind.THAW_FAILED for e in events)
        await verify(engine, plugin, outcome, await graph_of(engine, plan))


async def test_main_limit_bounds_concurrency(virtual_time: bool) -> None:
    """A limit of 2 on volumes' on_main never lets a third copy run."""
    unit = 1.0 if virtual_time else 0.005
    edges = [("s1", f"v{i}") for i in range(6)]
    engine, plugin, plan = setup(edges, ["s1"], delays={(VOLUME, MAIN): unit}, limits={VOLUME: 2})
    async with engine:
        await engine.protect(plan)
        mains = plugin.calls(hook=MAIN)
        points = sorted(
            [(e.start, 1) for e in mains if e.resource[0] == VOLUME]
            + [(e.end or 0, -1) for e in mains if e.resource[0] == VOLUME],
            key=lambda p: (p[0], p[1]),
        )
        running = peak = 0
        for _, d in points:
            running += d
            peak = max(peak, running)
        assert peak == 2


async def test_restore_hooks_see_the_new_ids_of_children() -> None:
    """A server restored in on_complete finds the ids its restored volumes reported."""
    engine, plugin, plan = setup([("s1", "v1"), ("s1", "v2")], ["s1"])
    async with engine:
        outcome = await engine.protect(plan)
        restored = await engine.restore(outcome.checkpoint_id)
        assert restored.restored == {
            key("s1"): "restored-s1",
            key("v1"): "restored-v1",
            key("v2"): "restored-v2",
        }
        assert await engine.store.load_restored(restored.run_id) == dict(restored.restored)
        server_complete = plugin.calls(key("s1"), CP)[-1]
        for v in ("v1", "v2"):
            assert (plugin.calls(key(v), MAIN)[-1].end or 0) <= server_complete.start


async def test_delete_removes_bank_data_and_marks_deleted() -> None:
    """Deleting a checkpoint runs the delete hooks, empties its bank and marks it deleted."""
    engine, _plugin, plan = setup([("s1", "v1")], ["s1"])
    async with engine:
        outcome = await engine.protect(plan)
        bank = engine.bank
        assert any(k.startswith(outcome.checkpoint_id) for k in bank.objects)  # type: ignore[attr-defined]
        await engine.delete(outcome.checkpoint_id)
        assert not any(k.startswith(outcome.checkpoint_id) for k in bank.objects)  # type: ignore[attr-defined]
        cp = await engine.store.get_checkpoint(outcome.checkpoint_id)
        assert cp.status is CheckpointStatus.DELETED


async def test_commit_points_are_awaited() -> None:
    """The engine awaits commits before any cut (the cut intent), before quiescing,
    before main, and at the end only."""
    engine, _plugin, plan = setup([("s1", "v1"), ("s2", "v2")], ["s1", "s2"])
    async with engine:
        outcome = await engine.protect(plan)
        # the cut intent + two quiescing servers + one group's cuts; the end of run is
        # finish_run's own commit
        assert engine.store.commits == 4  # type: ignore[attr-defined]
        [intent] = [
            e
            for e in await engine.store.read_events(outcome.run_id)
            if e.kind is EventKind.CUT_INTENT
        ]
        assert sorted(map(tuple, intent.data["resources"])) == [key("v1"), key("v2")]


async def test_failed_run_is_cleaned_up_when_plan_asks() -> None:
    """delete_on_failure runs the delete operation over what a failed protect saved."""
    engine, _plugin, plan = setup(
        [("s1", "v1"), ("s1", "v2")],
        ["s1"],
        faults={(sk("v2"), MAIN): Fault.RAISE},
        delete_on_failure=True,
    )
    async with engine:
        with pytest.raises(RunError) as info:
            await engine.protect(plan)
        cp = await engine.store.get_checkpoint(info.value.checkpoint_id)
        assert cp.status is CheckpointStatus.DELETED


async def test_every_event_is_numbered_in_order() -> None:
    """Lifecycle events of a run carry consecutive sequence numbers from 1."""
    engine, _plugin, plan = setup([("s1", "v1")], ["s1"], barrier=BarrierPolicy.CUT)
    async with engine:
        outcome = await engine.protect(plan)
        events = await engine.store.read_events(outcome.run_id)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        kinds = [e.kind for e in events]
        assert kinds[0] is EventKind.RUN_STARTED and kinds[-1] is EventKind.RUN_FINISHED
        assert EventKind.CUT in kinds and EventKind.QUIESCED in kinds and EventKind.THAWED in kinds
        assert kinds.count(EventKind.BARRIER_RELEASED) == 2
        assert res("v1").key in {e.resource for e in events}


async def test_retention_keeps_the_newest_n_per_plan() -> None:
    """retain() deletes all but the newest N available checkpoints of a plan, through delete."""
    engine, _plugin, plan = setup([("s1", "v1")], ["s1"])
    async with engine:
        ids = [(await engine.protect(plan)).checkpoint_id for _ in range(4)]
        outcomes = await engine.retain("test", keep=2)
        assert len(outcomes) == 2 and all(o.status is RunStatus.SUCCEEDED for o in outcomes)
        statuses = [(await engine.store.get_checkpoint(i)).status for i in ids]
        kept = [i for i, s in zip(ids, statuses, strict=True) if s is CheckpointStatus.AVAILABLE]
        assert kept == ids[2:]
        assert statuses.count(CheckpointStatus.DELETED) == 2
