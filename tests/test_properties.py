"""Hypothesis: random DAGs, delays and fault schedules keep every ordering rule and guarantee."""

from __future__ import annotations

from typing import Any

import anyio
import attrs
import pytest
import sniffio
from hypothesis import given
from hypothesis import strategies as st

from helpers import PROJECT, QUIESCING, SERVER, TYPES, VOLUME
from invariants import check_run
from karbor_async import (
    BarrierPolicy,
    ConsistencyGroup,
    Engine,
    Hook,
    OperationKind,
    Plan,
    Resource,
    RunError,
    RunOutcome,
    RunStatus,
    Timeouts,
)
from karbor_async.testing import Fault, RecordingPlugin, protectables_for

PREFIX = {SERVER: "s", VOLUME: "v", PROJECT: "p"}


@attrs.frozen
class Scenario:
    types: tuple[str, ...]
    edges: tuple[tuple[int, int], ...]
    named: tuple[int, ...]
    """Plan resources beyond the graph's roots (found again as dependents)."""
    groups: tuple[int, ...]
    """Group number per root (0 = no named group)."""
    policy: BarrierPolicy
    delays: tuple[tuple[int, Hook, int], ...]
    faults: tuple[tuple[int, Hook, Fault], ...]
    budget: int | None
    fallback: bool
    operation: OperationKind

    def resource(self, i: int) -> Resource:
        return Resource(self.types[i], f"{PREFIX[self.types[i]]}{i}")


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    big = draw(st.integers(0, 9)) == 0
    n = draw(st.integers(100, 250)) if big else draw(st.integers(1, 24))
    types = tuple(draw(st.sampled_from([SERVER, VOLUME, VOLUME, PROJECT])) for _ in range(n))
    edges: list[tuple[int, int]] = []
    for child in range(1, n):
        k = draw(st.sampled_from([0, 1, 1, 1, 2]))
        parents = {draw(st.integers(0, child - 1)) for _ in range(k)}
        edges += [(p, child) for p in sorted(parents)]
    has_parent = {c for _, c in edges}
    roots = [i for i in range(n) if i not in has_parent]
    named = (
        tuple(sorted(set(draw(st.lists(st.sampled_from(sorted(has_parent)), max_size=2)))))
        if has_parent
        else ()
    )
    groups = tuple(draw(st.integers(0, 2)) for _ in roots)
    hooks = list(Hook)
    n_delays = draw(st.integers(0, 12))
    delays = tuple(
        (draw(st.integers(0, n - 1)), draw(st.sampled_from(hooks)), draw(st.integers(1, 6)))
        for _ in range(n_delays)
    )
    n_faults = draw(st.sampled_from([0, 0, 1, 1, 2]))
    faults = tuple(
        (
            draw(st.integers(0, n - 1)),
            draw(st.sampled_from(hooks)),
            draw(st.sampled_from(list(Fault))),
        )
        for _ in range(n_faults)
    )
    budget = draw(st.sampled_from([None, None, 2, 4]))
    return Scenario(
        types=types,
        edges=tuple(edges),
        named=named,
        groups=groups,
        policy=draw(st.sampled_from(list(BarrierPolicy))),
        delays=delays,
        faults=faults,
        budget=budget,
        fallback=draw(st.booleans()),
        operation=draw(st.sampled_from([OperationKind.PROTECT] * 3 + [OperationKind.RESTORE])),
    )


def _hangs(s: Scenario) -> bool:
    # A cancel inside a running cut waits for the cut's own limit, like a hang.
    return any(fault in (Fault.HANG, Fault.CANCEL_RUN) for _, _, fault in s.faults)


def _script(s: Scenario, table: Any) -> dict[tuple[str, Hook], Any]:
    out: dict[tuple[str, Hook], Any] = {}
    for i, hook, value in table:
        r = s.resource(i)
        out[(f"{r.type}#{r.id}", hook)] = value
    return out


async def run_scenario(s: Scenario, unit: float, *, virtual: bool = True) -> None:
    delays = {k: v * unit for k, v in _script(s, s.delays).items()}
    faults = _script(s, s.faults)
    plugin = RecordingPlugin(TYPES, delays=delays, faults=faults, fault_operations=(s.operation,))
    edges = [(s.resource(p), s.resource(c)) for p, c in s.edges]
    engine = Engine([plugin], protectables_for(edges), discover=False)
    has_parent = {c for _, c in s.edges}
    roots = [i for i in range(len(s.types)) if i not in has_parent]
    groups: dict[int, list[Resource]] = {}
    for root, g in zip(roots, s.groups, strict=True):
        if g:
            groups.setdefault(g, []).append(s.resource(root))
    plan = Plan(
        name="property",
        resources=[s.resource(i) for i in roots] + [s.resource(i) for i in s.named],
        barrier=s.policy,
        groups=[ConsistencyGroup(f"g{g}", members) for g, members in sorted(groups.items())],
        merge_groups=True,
        timeouts=Timeouts(
            # Real time on a shared machine: a hook only times out when it hangs.
            hook=40 * unit if virtual else (0.5 if _hangs(s) else 30.0),
            abort=100 * unit if virtual else 10.0,
            quiesce_budget=s.budget * unit if s.budget else None,
        ),
        crash_consistent_fallback=s.fallback,
    )
    async with engine:
        if s.operation is OperationKind.RESTORE:
            unfaulted = attrs.evolve(
                plan, timeouts=attrs.evolve(plan.timeouts, quiesce_budget=None)
            )
            protected = await engine.protect(unfaulted)
            plugin.trace.clear()
            run = await engine.build_restore(protected.checkpoint_id)
        else:
            run = await engine.build_protect(plan)
        plugin.cancel_run = run.cancel
        outcome: RunOutcome
        failure: RunError | None = None
        try:
            outcome = await engine.execute(run)
        except RunError as exc:
            failure = exc
            outcome = exc.outcome
        if failure is not None:
            assert outcome.status is not RunStatus.SUCCEEDED
            assert failure.checkpoint_id == outcome.checkpoint_id
        events = await engine.store.read_events(run.run_id)
        check_run(plugin.trace, run.spec.graph, outcome, QUIESCING, events)
        if not s.faults and s.budget is None:
            assert outcome.status is RunStatus.SUCCEEDED
        stored = await engine.store.get_run(run.run_id)
        assert stored.status is outcome.status
        for r in outcome.resources.values():
            if r.status.value == "failed":
                assert r.failed_hook is not None and r.error


@given(scenario=scenarios())
async def test_random_graphs_and_faults_keep_the_rules(
    scenario: Scenario, virtual_time: bool
) -> None:
    """Every ordering rule, barrier, exactly-once and the thaw invariant hold under faults."""
    unit = 1.0 if virtual_time else 0.001
    with anyio.fail_after(100_000 * unit):  # a hang is a failure hypothesis can shrink
        await run_scenario(scenario, unit, virtual=virtual_time)


@given(n=st.integers(0, 3))
async def test_each_backend_runs_its_own_examples(n: int, anyio_backend: Any) -> None:
    """The trio run of a ``@given`` test is on trio (it was not, on anyio before 4.14,
    without ``tests/conftest.py``'s ``pytest_pyfunc_call``)."""
    assert sniffio.current_async_library() == anyio_backend[0]


@pytest.mark.parametrize("policy", list(BarrierPolicy))
async def test_a_big_graph_succeeds_under_each_policy(policy: BarrierPolicy) -> None:
    """A few hundred nodes with shared children, several roots and groups, no faults."""
    n = 300
    types = tuple([SERVER, VOLUME, VOLUME, PROJECT][i % 4] for i in range(n))
    edges = tuple((i // 3, i) for i in range(1, n)) + tuple((i // 5, i) for i in range(6, n, 7))
    s = Scenario(
        types=types,
        edges=tuple(sorted(set(edges))),
        named=(),
        groups=(1,),
        policy=policy,
        delays=(),
        faults=(),
        budget=None,
        fallback=False,
        operation=OperationKind.PROTECT,
    )
    await run_scenario(s, 0.001, virtual=False)
