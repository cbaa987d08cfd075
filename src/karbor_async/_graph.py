"""The resource graph: discovery through protectables, cycle check, groups, JSON form."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import anyio
import attrs

from karbor_async._plan import DEFAULT_GROUP, Plan
from karbor_async._registry import PluginRegistry
from karbor_async._types import BarrierPolicy, Resource, ResourceKey
from karbor_async.exceptions import GraphError

__all__ = ["GRAPH_FORMAT", "ResourceGraph", "assign_groups", "discover"]

GRAPH_FORMAT = 1


@attrs.frozen(eq=False)
class ResourceGraph:
    """A DAG of resources; ``edges`` are ``(parent, child)`` index pairs (parent depends on child).

    Node order is deterministic: plan resources first in plan order, then
    dependents breadth-first with siblings sorted by key.
    """

    resources: tuple[Resource, ...]
    edges: tuple[tuple[int, int], ...]
    _topo: list[int] | None = attrs.field(init=False, default=None, repr=False)

    def topological_order(self) -> list[int]:
        """Node indices, parents before children (computed once; raises on a cycle)."""
        if self._topo is None:
            object.__setattr__(self, "_topo", check_acyclic(self))
        assert self._topo is not None
        return self._topo

    @property
    def index(self) -> dict[ResourceKey, int]:
        return {r.key: i for i, r in enumerate(self.resources)}

    def children_of(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.resources]
        for p, c in self.edges:
            out[p].append(c)
        return out

    def parents_of(self) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in self.resources]
        for p, c in self.edges:
            out[c].append(p)
        return out

    @property
    def roots(self) -> list[Resource]:
        has_parent = {c for _, c in self.edges}
        return [r for i, r in enumerate(self.resources) if i not in has_parent]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": GRAPH_FORMAT,
            "resources": [r.to_json() for r in self.resources],
            "edges": [[p, c] for p, c in self.edges],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ResourceGraph:
        if data.get("format") != GRAPH_FORMAT:
            raise GraphError(
                f"stored graph has format {data.get('format')!r}; this engine reads {GRAPH_FORMAT}"
            )
        resources = tuple(Resource.from_json(r) for r in data["resources"])
        edges = tuple((int(p), int(c)) for p, c in data["edges"])
        graph = cls(resources, edges)
        graph.topological_order()
        return graph

    @classmethod
    def from_edges(
        cls, resources: Sequence[Resource], edges: Iterable[tuple[ResourceKey, ResourceKey]]
    ) -> ResourceGraph:
        """Build a graph directly (tests, stored graphs); checks for cycles."""
        index = {r.key: i for i, r in enumerate(resources)}
        pairs = []
        for p, c in edges:
            if p not in index or c not in index:
                raise GraphError(f"edge {p} -> {c} names a resource that is not in the graph")
            pairs.append((index[p], index[c]))
        graph = cls(tuple(resources), tuple(dict.fromkeys(pairs)))
        graph.topological_order()
        return graph


def _fmt(r: Resource) -> str:
    return f"{r.type}#{r.id}"


def check_acyclic(graph: ResourceGraph) -> list[int]:
    """Return a topological order (parents first) or raise GraphError naming a cycle."""
    children = graph.children_of()
    white, grey, black = 0, 1, 2
    colour = [white] * len(graph.resources)
    order: list[int] = []
    for start in range(len(graph.resources)):
        if colour[start] != white:
            continue
        stack: list[tuple[int, int]] = [(start, 0)]
        path: list[int] = [start]
        colour[start] = grey
        while stack:
            node, i = stack[-1]
            if i < len(children[node]):
                stack[-1] = (node, i + 1)
                child = children[node][i]
                if colour[child] == grey:
                    cycle = [*path[path.index(child) :], child]
                    text = " -> ".join(_fmt(graph.resources[n]) for n in cycle)
                    raise GraphError(f"the resource graph has a cycle: {text}")
                if colour[child] == white:
                    colour[child] = grey
                    stack.append((child, 0))
                    path.append(child)
            else:
                stack.pop()
                path.pop()
                colour[node] = black
                order.append(node)
    order.reverse()
    return order


async def discover(plan: Plan, registry: PluginRegistry) -> ResourceGraph:
    """Expand the plan's resources through the protectables into a checked graph.

    A pool of ``plan.discovery_concurrency`` workers drains a queue of resources
    to expand (one task per worker, not per resource).
    """
    found: dict[ResourceKey, Resource] = {}
    reported_by: dict[ResourceKey, str] = {r.key: "the plan" for r in plan.resources}
    in_flight: dict[tuple[str, ResourceKey], Resource] = {}
    edges: dict[ResourceKey, set[ResourceKey]] = {}
    errors: list[GraphError] = []
    queue: deque[Resource] = deque()
    busy = 0
    waiting = 0
    moved = anyio.Event()

    def announce() -> None:
        nonlocal moved
        if waiting:  # only then is anyone parked on the event
            moved.set()
            moved = anyio.Event()

    async def expand(res: Resource) -> None:
        kids = edges.setdefault(res.key, set())
        for finder in registry.finders_under(res.type):
            flight = (finder.resource_type, res.key)
            in_flight[flight] = res
            try:
                deps = list(await finder.dependents(res))
            except Exception as exc:
                err = GraphError(
                    f"protectable for {finder.resource_type!r} failed listing the dependents "
                    f"of {_fmt(res)}: {exc!r}"
                )
                err.__cause__ = exc
                errors.append(err)
                return
            in_flight.pop(flight, None)  # (kept when cancelled: the timeout names it)
            for dep in deps:
                if not isinstance(dep, Resource):
                    errors.append(
                        GraphError(
                            f"protectable for {finder.resource_type!r} returned {dep!r} under "
                            f"{_fmt(res)}; dependents() must return Resource objects"
                        )
                    )
                    return
                kids.add(dep.key)
                known = found.get(dep.key)
                if known is None:
                    found[dep.key] = dep
                    reported_by[dep.key] = _fmt(res)
                    queue.append(dep)
                elif known.name != dep.name:
                    # One identity, two names: which is the resource? (A different
                    # ``extra`` is allowed; the first one reported is kept.)
                    errors.append(
                        GraphError(
                            f"{_fmt(dep)} is reported with two names: {known.name!r} by "
                            f"{reported_by[dep.key]} and {dep.name!r} by {_fmt(res)} (protectable "
                            f"for {finder.resource_type!r}); a resource's (type, id) must name "
                            "one resource: fix the protectable"
                        )
                    )
                    return

    async def worker(tg: anyio.abc.TaskGroup) -> None:
        nonlocal busy, waiting
        while not errors:
            if not queue:
                if not busy:
                    announce()  # nothing queued, nothing in flight: discovery is done
                    return
                waiting += 1
                try:
                    await moved.wait()
                finally:
                    waiting -= 1
                continue
            res = queue.popleft()
            busy += 1
            try:
                await expand(res)
            finally:
                busy -= 1
                announce()
        tg.cancel_scope.cancel()

    for res in plan.resources:
        found[res.key] = res
        queue.append(res)
    limit = plan.timeouts.discovery
    with anyio.move_on_after(limit) as scope:
        async with anyio.create_task_group() as tg:
            for _ in range(max(1, min(plan.discovery_concurrency, len(queue) * 8))):
                tg.start_soon(worker, tg)
    if scope.cancelled_caught and not errors:
        waiting_on = ", ".join(
            f"the protectable for {ftype!r} listing the dependents of {_fmt(parent)}"
            for (ftype, _key), parent in list(in_flight.items())[:5]
        )
        raise GraphError(
            f"discovery did not finish within timeouts.discovery ({limit:g} s): still waiting "
            f"on {waiting_on or 'no protectable'}; fix that protectable or raise the limit"
        )
    if errors:
        raise errors[0]

    # Deterministic order: plan resources, then breadth-first with sorted siblings.
    order: list[ResourceKey] = [r.key for r in plan.resources]
    seen = set(order)
    i = 0
    while i < len(order):
        for kid in sorted(edges.get(order[i], ())):
            if kid not in seen:
                seen.add(kid)
                order.append(kid)
        i += 1
    index = {k: n for n, k in enumerate(order)}
    pairs = tuple((index[p], index[c]) for p in order for c in sorted(edges.get(p, ())) if p != c)
    for p in order:
        if p in edges.get(p, ()):
            raise GraphError(f"the resource graph has a cycle: {p[0]}#{p[1]} -> {p[0]}#{p[1]}")
    graph = ResourceGraph(tuple(found[k] for k in order), pairs)
    graph.topological_order()
    return graph


def check_types(graph: ResourceGraph, registry: PluginRegistry) -> None:
    missing: dict[str, Resource] = {}
    for res in graph.resources:
        if registry.binding(res.type) is None and res.type not in missing:
            missing[res.type] = res
    if missing:
        lines = ", ".join(f"{t!r} (e.g. {_fmt(r)})" for t, r in missing.items())
        known = ", ".join(sorted(registry.types)) or "none"
        raise GraphError(
            f"no protection plugin handles {lines}; installed types: {known}. "
            "Install a plugin for it or remove it from the plan"
        )


@attrs.frozen
class GroupAssignment:
    """Each node's consistency group and each group's barrier."""

    group_of: tuple[str, ...]
    barriers: Mapping[str, BarrierPolicy]


def assign_groups(
    graph: ResourceGraph, plan: Plan, default_barrier: BarrierPolicy
) -> GroupAssignment:
    """Put every node in the group of the root(s) it is reached from (DESIGN.md section 4)."""
    index = graph.index
    plan_barrier = plan.barrier or default_barrier
    seeds: dict[int, str] = {}
    barriers: dict[str, BarrierPolicy] = {DEFAULT_GROUP: plan_barrier}
    for group in plan.groups:
        barriers[group.name] = group.barrier or plan_barrier
        for key in group.resources:
            seeds[index[key]] = group.name
    parents = graph.parents_of()
    for root in graph.roots:
        seeds.setdefault(index[root.key], DEFAULT_GROUP)
    order = graph.topological_order()
    reach: list[frozenset[str]] = [frozenset()] * len(graph.resources)
    for node in order:
        got: set[str] = set()
        if node in seeds:
            got.add(seeds[node])
        for p in parents[node]:
            got |= reach[p]
        reach[node] = frozenset(got)

    # Union-find over group names for merging.
    boss: dict[str, str] = {g: g for g in barriers}

    def find(g: str) -> str:
        while boss[g] != g:
            boss[g] = boss[boss[g]]
            g = boss[g]
        return g

    for node, groups in enumerate(reach):
        if len(groups) > 1:
            if not plan.merge_groups:
                a, b = sorted(groups)[:2]
                raise GraphError(
                    f"{_fmt(graph.resources[node])} is reached from consistency groups "
                    f"{a!r} and {b!r}; give it to one group or set merge_groups to merge them"
                )
            first, *rest = sorted(groups)
            for other in rest:
                ra, rb = find(first), find(other)
                if ra != rb:
                    boss[max(ra, rb)] = min(ra, rb)
    members: dict[str, list[str]] = {}
    for g in barriers:
        members.setdefault(find(g), []).append(g)
    final_name = {g: "+".join(sorted(members[find(g)])) for g in barriers}
    final_barrier: dict[str, BarrierPolicy] = {}
    for g, policy in barriers.items():
        name = final_name[g]
        final_barrier[name] = BarrierPolicy.stricter(final_barrier.get(name, policy), policy)
    group_of = tuple(
        final_name[next(iter(sorted(r)))] if r else final_name[DEFAULT_GROUP] for r in reach
    )
    used = set(group_of)
    return GroupAssignment(group_of, {g: b for g, b in final_barrier.items() if g in used})
