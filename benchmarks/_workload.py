"""The workload every contender runs: a generated application graph on the SIMULATED cloud."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import attrs

from karbor_async import (
    BarrierPolicy,
    HookContext,
    Plan,
    ProtectionPlugin,
    Resource,
    ResourceKey,
    ResourceType,
)
from karbor_simcloud import IMAGE, NETWORK, PROJECT, SERVER, VOLUME, SimCloud, all_protectables
from karbor_simcloud.direct import DirectGraph

__all__ = [
    "NOOP_TYPES",
    "NoopProtection",
    "Workload",
    "make_plan",
    "quiet_logging",
]

NOOP_TYPES = (
    ResourceType(PROJECT, snapshots=False),
    ResourceType(SERVER, quiesces=True, snapshots=False),
    ResourceType(VOLUME, snapshots=True),
    ResourceType(IMAGE, snapshots=False),
    ResourceType(NETWORK, snapshots=False),
)


class _NoopOperation:
    """Four hooks that do nothing, as in the floors (the engine stamps the cut itself)."""

    async def on_prepare_begin(self, ctx: HookContext) -> None:
        pass

    async def on_prepare_finish(self, ctx: HookContext) -> None:
        pass

    async def on_main(self, ctx: HookContext) -> None:
        pass

    async def on_complete(self, ctx: HookContext) -> None:
        pass


_NOOP = _NoopOperation()


class NoopProtection(ProtectionPlugin):
    """Every simulated type, every operation: four no-op hooks (engine overhead runs)."""

    name = "bench-noop"
    types = NOOP_TYPES

    def get_protect_operation(self, resource_type: str) -> object | None:
        return _NOOP

    def get_restore_operation(self, resource_type: str) -> object | None:
        return _NOOP

    def get_delete_operation(self, resource_type: str) -> object | None:
        return _NOOP


def make_plan(
    resources: Sequence[Resource],
    barrier: BarrierPolicy,
    parameters: dict[str, dict[str, Any]] | None = None,
    limits: dict[str, int] | None = None,
) -> Plan:
    # Keyword arguments through a dict: mypy cannot solve the attrs converters of Plan.
    args: dict[str, Any] = {
        "resources": tuple(resources),
        "barrier": barrier,
        "parameters": parameters or {},
        "limits": limits or {},
    }
    return Plan(name="bench-app", **args)


def quiet_logging() -> None:
    """Benchmarks are an application: the engine's logs at WARNING, debug off (the library
    never sets a level; with no handler configured its lines go nowhere anyway)."""
    logging.getLogger("karbor_async").setLevel(logging.WARNING)


@attrs.define
class Workload:
    """One generated application: the cloud, its graph, and the floors' level form."""

    n: int
    seed: int
    cloud: SimCloud
    graph: DirectGraph
    levels: list[tuple[int, int, bool]]
    """(depth from the roots, height above the leaves, cuts) per resource."""

    @classmethod
    async def build(cls, n: int, seed: int, cloud: SimCloud | None = None) -> Workload:
        cloud = cloud or SimCloud.generate(n, seed)
        graph = await DirectGraph.discover(cloud.project_resources(), all_protectables(cloud))
        if len(graph.resources) != n:
            raise AssertionError(f"generated {len(graph.resources)} resources, wanted {n}")
        return cls(n, seed, cloud, graph, levels_of(graph))

    @property
    def roots(self) -> list[Resource]:
        return self.cloud.project_resources()

    @property
    def cutting(self) -> int:
        return sum(1 for _, _, c in self.levels if c)


def levels_of(graph: DirectGraph) -> list[tuple[int, int, bool]]:
    """Depth (longest path from a root) and height (longest path to a leaf) of each node."""
    order = _topological(graph)
    depth: dict[ResourceKey, int] = {}
    for res in order:
        parents = graph.parents.get(res.key, ())
        depth[res.key] = 1 + max((depth[p.key] for p in parents), default=-1)
    height: dict[ResourceKey, int] = {}
    for res in reversed(order):
        kids = graph.children.get(res.key, ())
        height[res.key] = 1 + max((height[c.key] for c in kids), default=-1)
    return [(depth[r.key], height[r.key], r.type == VOLUME) for r in graph.resources]


def _topological(graph: DirectGraph) -> list[Resource]:
    indegree = {r.key: len(graph.parents.get(r.key, ())) for r in graph.resources}
    ready = [r for r in graph.resources if indegree[r.key] == 0]
    out: list[Resource] = []
    while ready:
        node = ready.pop()
        out.append(node)
        for child in graph.children.get(node.key, ()):
            indegree[child.key] -= 1
            if indegree[child.key] == 0:
                ready.append(child)
    return out
