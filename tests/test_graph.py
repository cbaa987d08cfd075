"""Graph discovery, cycles, groups, plugin lookup and the stored JSON form."""

from __future__ import annotations

import json

import pytest

from helpers import PROJECT, SERVER, TYPES, VOLUME, key, res, setup
from karbor_async import (
    BarrierPolicy,
    ConsistencyGroup,
    Engine,
    Plan,
    Resource,
    ResourceGraph,
    ResourceType,
)
from karbor_async._graph import assign_groups
from karbor_async.exceptions import GraphError, PluginConflictError, PluginError
from karbor_async.testing import MapProtectable, RecordingPlugin, protectables_for


async def test_dependents_expand_and_dedupe() -> None:
    """Dependents are found through protectables; a resource reached twice is one node."""
    engine, _plugin, plan = setup(
        [("p1", "s1"), ("p1", "s2"), ("s1", "v1"), ("s2", "v1"), ("s2", "v2")], ["p1"]
    )
    async with engine:
        run = await engine.build_protect(plan)
        graph = run.spec.graph
        assert [r.id for r in graph.resources] == ["p1", "s1", "s2", "v1", "v2"]
        assert len(graph.edges) == 5
        assert [r.id for r in graph.roots] == ["p1"]


async def test_cycle_is_an_error_naming_the_cycle() -> None:
    """A -> B -> C -> A is a GraphError that spells the cycle out."""
    a, b, c = (Resource(VOLUME, x) for x in "abc")
    finder = MapProtectable(VOLUME, [VOLUME], {a.key: [b], b.key: [c], c.key: [a]})
    engine = Engine([RecordingPlugin(TYPES)], [finder], discover=False)
    async with engine:
        with pytest.raises(GraphError, match=r"cycle: .*#a -> .*#b -> .*#c -> .*#a"):
            await engine.build_protect(Plan(name="cyc", resources=[a]))


async def test_unknown_type_fails_before_any_hook() -> None:
    """A resource type no plugin handles is named, with the installed types."""
    plugin = RecordingPlugin([SERVER])
    engine = Engine([plugin], protectables_for([(res("s1"), res("v1"))]), discover=False)
    async with engine:
        with pytest.raises(GraphError, match="no protection plugin handles 'OS::Cinder::Volume'"):
            await engine.protect(Plan(name="x", resources=[res("s1")]))
        assert plugin.trace == []


async def test_failing_protectable_is_a_clear_error() -> None:
    """A protectable that raises names itself and the parent; no hook runs."""
    plugin = RecordingPlugin(TYPES)
    finder = MapProtectable(VOLUME, [SERVER], {}, fail_on=key("s1"))
    engine = Engine([plugin], [finder], discover=False)
    async with engine:
        with pytest.raises(
            GraphError, match="failed listing the dependents of OS::Nova::Server#s1"
        ):
            await engine.protect(Plan(name="x", resources=[res("s1")]))
        assert plugin.trace == []


def test_two_plugins_claiming_a_type_conflict_unless_preferred() -> None:
    """Two plugins for one type is an error naming both, unless prefer= chooses."""
    one = RecordingPlugin([VOLUME], name="one")
    two = RecordingPlugin([VOLUME], name="two")
    with pytest.raises(PluginConflictError, match="'one' and 'two' both handle"):
        Engine([one, two], discover=False)
    engine = Engine([one, two], discover=False, prefer={VOLUME: "two"})
    binding = engine.registry.binding(VOLUME)
    assert binding is not None and binding.plugin is two


def test_non_plugin_objects_are_refused() -> None:
    """Passing something that is not a plugin says what a plugin must be."""
    with pytest.raises(PluginError, match="not a ProtectionPlugin"):
        Engine([object()], discover=False)  # type: ignore[list-item]
    with pytest.raises(PluginError, match="not a protectable"):
        Engine([], [object()], discover=False)  # type: ignore[list-item]


async def test_graph_json_round_trips_exactly() -> None:
    """The stored graph serialises to stable JSON and reads back identical."""
    engine, _plugin, plan = setup([("p1", "s1"), ("s1", "v1"), ("s1", "v2")], ["p1"])
    async with engine:
        graph = (await engine.build_protect(plan)).spec.graph
        text = json.dumps(graph.to_json(), sort_keys=True)
        again = ResourceGraph.from_json(json.loads(text))
        assert again.resources == graph.resources
        assert again.edges == graph.edges
        assert json.dumps(again.to_json(), sort_keys=True) == text


def test_stored_graph_with_a_cycle_is_refused() -> None:
    data = {
        "format": 1,
        "resources": [{"type": VOLUME, "id": "a"}, {"type": VOLUME, "id": "b"}],
        "edges": [[0, 1], [1, 0]],
    }
    with pytest.raises(GraphError, match="cycle"):
        ResourceGraph.from_json(data)


def _graph(edges: list[tuple[str, str]], nodes: list[str]) -> ResourceGraph:
    return ResourceGraph.from_edges([res(n) for n in nodes], [(key(a), key(b)) for a, b in edges])


def test_dependents_join_the_group_of_their_root() -> None:
    graph = _graph([("s1", "v1"), ("s2", "v2")], ["s1", "s2", "v1", "v2"])
    plan = Plan(
        name="g",
        resources=[res("s1"), res("s2")],
        groups=[ConsistencyGroup("db", [res("s1")], barrier=BarrierPolicy.CUT)],
    )
    got = assign_groups(graph, plan, BarrierPolicy.MAIN)
    assert got.group_of == ("db", "default", "db", "default")
    assert got.barriers == {"db": BarrierPolicy.CUT, "default": BarrierPolicy.MAIN}


def test_resource_reached_from_two_groups_is_an_error_naming_both() -> None:
    graph = _graph([("s1", "v1"), ("s2", "v1")], ["s1", "s2", "v1"])
    plan = Plan(
        name="g",
        resources=[res("s1"), res("s2")],
        groups=[ConsistencyGroup("a", [res("s1")]), ConsistencyGroup("b", [res("s2")])],
    )
    with pytest.raises(GraphError, match=r"OS::Cinder::Volume#v1 is reached from .*'a' and 'b'"):
        assign_groups(graph, plan, BarrierPolicy.MAIN)


def test_merged_groups_take_the_stricter_barrier() -> None:
    graph = _graph([("s1", "v1"), ("s2", "v1")], ["s1", "s2", "v1"])
    plan = Plan(
        name="g",
        resources=[res("s1"), res("s2")],
        groups=[
            ConsistencyGroup("a", [res("s1")], barrier=BarrierPolicy.NONE),
            ConsistencyGroup("b", [res("s2")], barrier=BarrierPolicy.CUT),
        ],
        merge_groups=True,
    )
    got = assign_groups(graph, plan, BarrierPolicy.MAIN)
    assert set(got.group_of) == {"a+b"}
    assert got.barriers == {"a+b": BarrierPolicy.CUT}


def test_named_dependent_in_another_group_conflicts() -> None:
    """A resource named in one group and found under another group's root is an error."""
    graph = _graph([("s1", "v1")], ["s1", "v1"])
    plan = Plan(
        name="g",
        resources=[res("s1"), res("v1")],
        groups=[ConsistencyGroup("a", [res("s1")]), ConsistencyGroup("b", [res("v1")])],
    )
    with pytest.raises(GraphError, match="'a' and 'b'"):
        assign_groups(graph, plan, BarrierPolicy.MAIN)


async def test_entry_point_discovery_finds_installed_plugins() -> None:
    """With discover=True, plugins installed under the entry-point groups are loaded."""
    engine = Engine(discover=True)
    # Whatever is installed must load cleanly and claim disjoint types.
    for rtype, binding in engine.registry.types.items():
        assert rtype in {t.name for t in binding.plugin.types}


def test_project_type_is_declared() -> None:
    assert any(t.name == PROJECT for t in TYPES)
    assert isinstance(TYPES[0], ResourceType)
