"""The ordering and barrier properties on the Temporal backend (workers in this process).

The scenarios of ``test_properties`` (random DAGs, groups, policies, delays, raises,
quiesce budgets with and without the crash-consistent fallback), at most 30 nodes
and 20 examples, protect only and asyncio only; every run is checked by the same
``invariants.check_run`` as the local engine's. One worker serves every example:
its plugin and protectables forward to the example's recording plugin and graph.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, ClassVar

import anyio
import attrs
import pytest
from hypothesis import given, settings

from helpers import PROJECT, QUIESCING, SERVER, TYPES, VOLUME
from invariants import check_run
from karbor_async import (
    BarrierPolicy,
    ConsistencyGroup,
    Engine,
    OperationKind,
    Plan,
    PostgresStore,
    ProtectionPlugin,
    Resource,
    ResourceType,
    RunError,
    RunOutcome,
    RunStatus,
    Timeouts,
)
from karbor_async._graph import ResourceGraph
from karbor_async.testing import Fault, RecordingPlugin
from pgcluster import PgCluster
from test_properties import Scenario, _script, scenarios

pytest.importorskip("karbor_async.temporal")
from temporalio.client import Client

from karbor_async.temporal import Options, TemporalBackend, serve

UNIT = 0.001
"""Seconds per delay unit (real time: the workflow runs on Temporal's clock)."""


def _small(s: Scenario) -> Scenario:
    """Protect only, raises only (a hang costs its real time limit; a hook's
    KeyboardInterrupt would end the worker, which is the kill tests' business)."""
    faults = tuple(f for f in s.faults if f[2] is Fault.RAISE)
    return attrs.evolve(s, faults=faults, operation=OperationKind.PROTECT)


SMALL = scenarios().filter(lambda s: len(s.types) <= 30).map(_small)


@attrs.define
class _Current:
    plugin: RecordingPlugin | None = None
    children: dict[tuple[str, str], list[Resource]] = attrs.Factory(dict)


class _Forward(ProtectionPlugin):
    """The example's recording plugin, behind one plugin the worker's engine knows."""

    name = "recording"
    types: ClassVar[tuple[ResourceType, ...]] = TYPES

    def __init__(self, current: _Current) -> None:
        self.current = current

    def get_protect_operation(self, resource_type: str) -> object | None:
        assert self.current.plugin is not None
        return self.current.plugin.get_protect_operation(resource_type)


class _ForwardDependents:
    """The example's graph, as a protectable of one child type under any parent."""

    def __init__(self, current: _Current, resource_type: str) -> None:
        self.current = current
        self.resource_type: str = resource_type
        self.parent_types: tuple[str, ...] = (PROJECT, SERVER, VOLUME)

    async def dependents(self, parent: Resource) -> Iterable[Resource]:
        await anyio.lowlevel.checkpoint()
        return [
            r for r in self.current.children.get(parent.key, []) if r.type == self.resource_type
        ]


@pytest.fixture(scope="module")
def world(temporal_server: str, pg_cluster: PgCluster) -> Iterator[Any]:
    """A portal into one event loop running one worker over the forwarding engine."""
    current = _Current()
    dsn = pg_cluster.dsn(pg_cluster.create_database("tprops"))
    with anyio.from_thread.start_blocking_portal("asyncio") as portal:
        ready = anyio.Event()
        stop = anyio.Event()
        box: list[Any] = []

        async def serve_all() -> None:
            client = await Client.connect(temporal_server)
            async with PostgresStore.open(dsn, password=pg_cluster.password) as store:
                protectables = [_ForwardDependents(current, t) for t in (SERVER, VOLUME)]
                engine = Engine([_Forward(current)], protectables, store=store, discover=False)
                async with engine, serve(engine, client, task_queue="props"):
                    options = Options(heartbeat_timeout=10)
                    box.append(
                        (TemporalBackend(client, task_queue="props", options=options), store)
                    )
                    ready.set()
                    await stop.wait()

        portal.start_task_soon(serve_all)
        portal.call(ready.wait)
        backend, store = box[0]
        yield portal, current, backend, store
        portal.call(stop.set)


async def run_on_temporal(s: Scenario, current: _Current, backend: Any, store: Any) -> None:
    delays = {k: v * UNIT for k, v in _script(s, s.delays).items()}
    plugin = RecordingPlugin(TYPES, delays=delays, faults=_script(s, s.faults))
    current.plugin = plugin
    current.children = {}
    for p, c in s.edges:
        current.children.setdefault(s.resource(p).key, []).append(s.resource(c))
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
            hook=30.0, abort=10.0, quiesce_budget=s.budget * UNIT if s.budget else None
        ),
        crash_consistent_fallback=s.fallback,
    )
    outcome: RunOutcome
    try:
        outcome = await backend.protect(plan)
    except RunError as exc:
        outcome = exc.outcome
        assert outcome.status is not RunStatus.SUCCEEDED
    events = await store.read_events(outcome.run_id)
    record = await store.get_run(outcome.run_id)
    graph = ResourceGraph.from_json(record.graph)
    try:
        check_run(plugin.trace, graph, outcome, QUIESCING, events)
    except AssertionError as exc:  # (name every call, with its attempt: a retry or not)
        calls = "\n".join(map(str, plugin.trace))
        raise AssertionError(f"{exc}\nrun {outcome.run_id}, calls:\n{calls}") from exc
    if not s.faults and s.budget is None:
        assert outcome.status is RunStatus.SUCCEEDED
    assert record.status is outcome.status
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    for r in outcome.resources.values():
        if r.status.value == "failed":
            assert r.failed_hook is not None and r.error


@settings(max_examples=20)
@given(scenario=SMALL)
def test_random_graphs_and_faults_keep_the_rules_on_temporal(
    world: Any, scenario: Scenario
) -> None:
    """Every ordering rule, barrier, exactly-once and the thaw invariant hold with the
    walk in a Temporal workflow and the hooks in its activities."""
    portal, current, backend, store = world
    portal.call(run_on_temporal, scenario, current, backend, store)


def test_a_30_node_graph_succeeds_under_each_policy_on_temporal(world: Any) -> None:
    """Shared children, several roots and groups, no faults: all succeed, once each."""
    portal, current, backend, store = world
    n = 30
    types = tuple([SERVER, VOLUME, VOLUME, PROJECT][i % 4] for i in range(n))
    edges = tuple((i // 3, i) for i in range(1, n)) + tuple((i // 5, i) for i in range(6, n, 7))
    for policy in BarrierPolicy:
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
        portal.call(run_on_temporal, s, current, backend, store)
