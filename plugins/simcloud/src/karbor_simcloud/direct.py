"""Call plugin hooks directly, without the engine: a test harness and a one-at-a-time baseline.

:class:`DirectRunner` builds each :class:`HookContext` with the public
``karbor_async.testing.make_context`` (saved info, marks, progress and restored
ids live in plain dicts) and calls one hook at a time. It implements none of
the engine's guarantees (no barrier, no timeouts, no abort handling): it exists
to test plugins in isolation and to measure how hooks run "resource after
resource", as pre/post-hook tools run them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import attrs

from karbor_async.testing import HookRecorder, make_context
from karbor_simcloud._compat import (
    AbortReason,
    Bank,
    Hook,
    OperationKind,
    Protectable,
    ProtectionPlugin,
    Resource,
    ResourceKey,
)

if TYPE_CHECKING:
    pass

__all__ = ["DirectGraph", "DirectRunner", "HookCall"]


@attrs.define
class DirectGraph:
    """Resources and their parent -> child edges, found through protectables."""

    resources: list[Resource]
    children: dict[ResourceKey, list[Resource]]
    parents: dict[ResourceKey, list[Resource]]

    @classmethod
    async def discover(
        cls, roots: Iterable[Resource], protectables: Iterable[Protectable]
    ) -> DirectGraph:
        """Expand ``roots`` breadth-first through ``protectables`` (a node reached twice is one)."""
        finders: dict[str, list[Protectable]] = {}
        for finder in protectables:
            for parent_type in finder.parent_types:
                finders.setdefault(parent_type, []).append(finder)
        graph = cls([], {}, {})
        seen: set[ResourceKey] = set()
        queue: list[Resource] = []
        for root in roots:
            if root.key not in seen:
                seen.add(root.key)
                queue.append(root)
        index = 0
        while index < len(queue):
            node = queue[index]
            index += 1
            graph.resources.append(node)
            graph.children.setdefault(node.key, [])
            graph.parents.setdefault(node.key, [])
            for finder in finders.get(node.type, ()):
                for child in await finder.dependents(node):
                    graph.children[node.key].append(child)
                    graph.parents.setdefault(child.key, []).append(node)
                    if child.key not in seen:
                        seen.add(child.key)
                        queue.append(child)
        return graph

    @property
    def roots(self) -> list[Resource]:
        return [r for r in self.resources if not self.parents.get(r.key)]

    def edges(self) -> list[tuple[ResourceKey, ResourceKey]]:
        return [(p, c.key) for p, kids in self.children.items() for c in kids]


@attrs.frozen
class HookCall:
    """One hook the runner called (in call order)."""

    operation: OperationKind
    hook: Hook
    resource: ResourceKey
    aborting: AbortReason | None = None


@attrs.define
class DirectRunner:
    """Runs plugin hooks one at a time, keeping the checkpoint's state in dicts."""

    plugins: Sequence[ProtectionPlugin]
    bank: Bank
    checkpoint_id: str = "direct-checkpoint"
    run_id: str = "direct-run"
    parameters: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    saved: dict[ResourceKey, dict[str, Any]] = attrs.field(factory=dict)
    restored: dict[ResourceKey, str] = attrs.field(factory=dict)
    marks: dict[ResourceKey, dict[str, float]] = attrs.field(factory=dict)
    progress: dict[ResourceKey, list[float | None]] = attrs.field(factory=dict)
    calls: list[HookCall] = attrs.field(factory=list)
    record_starts: bool = False
    """Keep the clock time at which each hook was called in ``starts`` (benchmarks)."""
    starts: dict[tuple[ResourceKey, Hook], float] = attrs.field(factory=dict)
    _by_type: dict[str, ProtectionPlugin] = attrs.field(init=False, factory=dict)
    _recorder: HookRecorder = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        for plugin in self.plugins:
            for spec in plugin.types:
                self._by_type[spec.name] = plugin
        # Contexts come from karbor_async.testing.make_context; one recorder shares the
        # saved info and restored ids of every call, as a checkpoint would.
        _ctx, self._recorder = make_context(Resource("-", "-"))
        self._recorder.saved = self.saved
        self._recorder.restored = self.restored

    def params_for(self, resource: Resource) -> dict[str, Any]:
        """Defaults of the type's declared parameters, then ``Type``, then ``Type#id``."""
        merged: dict[str, Any] = {}
        plugin = self._by_type.get(resource.type)
        if plugin is not None:
            for spec in plugin.types:
                if spec.name == resource.type and spec.parameters:
                    merged.update({k: p.default for k, p in spec.parameters.items()})
        merged.update(self.parameters.get(resource.type, {}))
        merged.update(self.parameters.get(f"{resource.type}#{resource.id}", {}))
        return merged

    async def call(
        self,
        operation: OperationKind,
        hook: Hook,
        resource: Resource,
        graph: DirectGraph | None = None,
        *,
        attempt: int = 1,
        aborting: AbortReason | None = None,
        checkpoint_id: str | None = None,
    ) -> bool:
        """Call one hook; ``False`` if the plugin does not implement it."""
        plugin = self._by_type.get(resource.type)
        if plugin is None:
            raise LookupError(f"no plugin handles {resource.type!r}")
        op = plugin.get_operation(operation, resource.type)
        method = getattr(op, hook.value, None) if op is not None else None
        if method is None:
            return False
        children = tuple(graph.children.get(resource.key, ())) if graph else ()
        parents = tuple(graph.parents.get(resource.key, ())) if graph else ()
        cid = checkpoint_id or self.checkpoint_id
        ctx, rec = make_context(
            resource,
            hook,
            operation=operation,
            parameters=self.params_for(resource),
            bank=self.bank,
            run_id=self.run_id,
            checkpoint_id=cid,
            attempt=attempt,
            children=children,
            parents=parents,
            aborting=aborting,
            recorder=self._recorder,
        )
        self.calls.append(HookCall(operation, hook, resource.key, aborting))
        if self.record_starts:
            self.starts[(resource.key, hook)] = anyio.current_time()
        try:
            await method(ctx)
        finally:
            key = resource.key
            if rec.marks:
                self.marks.setdefault(key, {}).update(rec.marks)
            if rec.progress_reports:
                self.progress.setdefault(key, []).extend(p[0] for p in rec.progress_reports)
        return True

    async def run_one_at_a_time(self, operation: OperationKind, graph: DirectGraph) -> None:
        """Every hook, one at a time, subtree after subtree, as pre/post-hook tools do.

        Prepare walks the graph depth first: ``prepare_begin(P)``, then each
        child's prepare (recursively), then ``prepare_finish(P)``; so a server
        is quiesced only while its own volumes cut. Then ``main`` and
        ``complete`` walk it again, children first. A shared child is handled
        under the first parent that reaches it (so the rule "a shared child
        waits for all of its parents" is not kept: this is a baseline).
        """
        owned: dict[ResourceKey, list[Resource]] = {}
        claimed: set[ResourceKey] = set()

        async def prepare(node: Resource) -> None:
            await self.call(operation, Hook.PREPARE_BEGIN, node, graph)
            mine = [c for c in graph.children.get(node.key, ()) if c.key not in claimed]
            claimed.update(c.key for c in mine)
            owned[node.key] = mine
            for child in mine:
                await prepare(child)
            await self.call(operation, Hook.PREPARE_FINISH, node, graph)

        async def post(node: Resource) -> None:
            for child in owned.get(node.key, ()):
                await post(child)
            await self.call(operation, Hook.MAIN, node, graph)
            await self.call(operation, Hook.COMPLETE, node, graph)

        roots = graph.roots
        claimed.update(r.key for r in roots)
        for root in roots:
            await prepare(root)
        for root in roots:
            await post(root)
