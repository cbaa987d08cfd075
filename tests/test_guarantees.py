"""The guarantees under misbehaving hooks, second half: the quiesce budget is exact,
failed aborting calls are recorded, marks are checked, and the smaller rules."""

from __future__ import annotations

import pytest

from helpers import key, setup, sk
from karbor_async import AbortReason, BarrierPolicy, Hook, ResourceStatus, RunError, Timeouts

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
