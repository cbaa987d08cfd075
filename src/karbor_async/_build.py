"""Building a run's nodes: the hooks of each resource, its limits and time limits, its edges."""

from __future__ import annotations

from typing import Any

import anyio

from karbor_async._node import HOOK_BITS, HookFn, _Group, _Node
from karbor_async._ordering import hold_thaws, limit_order, link
from karbor_async._plan import Plan
from karbor_async._record import Recorder
from karbor_async._registry import TypeBinding
from karbor_async._runstate import RunSpec
from karbor_async._types import Hook, OperationKind, Resource

__all__ = ["build_nodes"]


def hook_timeout(plan: Plan, binding: TypeBinding, res: Resource) -> float | None:
    """A hook's time limit: per type, else per plugin, else the plugin's own, else the plan's."""
    t = plan.timeouts
    if res.type in t.per_type:
        return t.per_type[res.type]
    name = binding.plugin.plugin_name()
    if name in t.per_plugin:
        return t.per_plugin[name]
    if binding.plugin.hook_timeout is not None:
        return binding.plugin.hook_timeout
    return t.hook


def quiesce_budget(plan: Plan, res: Resource) -> float | None:
    """How long the resource may stay quiesced: per ``TYPE#ID``, else per type, else the plan's."""
    t = plan.timeouts
    per = t.quiesce_budget_per_type
    return per.get(f"{res.type}#{res.id}", per.get(res.type, t.quiesce_budget))


def build_nodes(spec: RunSpec, groups: dict[str, _Group], rec: Recorder) -> list[_Node]:
    """One node per resource of the graph, linked by the ordering core, in graph order."""
    plan = spec.plan
    op = spec.operation
    limiters: dict[str, anyio.CapacityLimiter] = {
        name: anyio.CapacityLimiter(n) for name, n in sorted(plan.limits.items())
    }
    nodes: list[_Node] = []
    ops_cache: dict[str, tuple[HookFn | None, ...]] = {}
    # What depends only on the type and its plugin, worked out once per type: the hook
    # limit, the limiters and, unless some budget names single resources, the budget.
    per_type: dict[tuple[str, int], tuple[float | None, tuple[anyio.CapacityLimiter, ...]]] = {}
    budget_by_id = any("#" in k for k in plan.timeouts.quiesce_budget_per_type)
    budgets: dict[str, float | None] = {}
    for i, res in enumerate(spec.graph.resources):
        binding = spec.bindings[i]
        hooks = ops_cache.get(res.type)
        if hooks is None:
            opobj = binding.plugin.get_operation(op, res.type)
            hooks = tuple(
                getattr(opobj, h.value, None) if opobj is not None else None for h in Hook
            )
            ops_cache[res.type] = hooks
        pb, pf, main, complete = hooks
        done = spec.done_hooks.get(res.key, frozenset())
        if done:
            # Recovery: hooks whose finish was committed are not run again.
            pb = None if Hook.PREPARE_BEGIN in done else pb
            pf = None if Hook.PREPARE_FINISH in done else pf
            main = None if Hook.MAIN in done else main
            complete = None if Hook.COMPLETE in done else complete
        typed = per_type.get((res.type, id(binding)))
        if typed is None:
            typed = per_type[res.type, id(binding)] = (
                hook_timeout(plan, binding, res),
                tuple(
                    limiters[name]
                    for name in limit_order((binding.plugin.plugin_name(), res.type), limiters)
                ),
            )
        if budget_by_id:
            budget = quiesce_budget(plan, res)
        elif res.type in budgets:
            budget = budgets[res.type]
        else:
            budget = budgets[res.type] = quiesce_budget(plan, res)
        quiesces = op is OperationKind.PROTECT and binding.spec.quiesces and pb is not None
        cuts = op is OperationKind.PROTECT and binding.spec.snapshots
        node = _Node(
            gate=groups[spec.group_of[i]],
            has_pb=pb is not None,
            run=rec,
            resource=res,
            binding=binding,
            params=spec.params[i],
            pb=pb,
            pf=pf,
            main=main,
            complete=complete,
            timeout=typed[0],
            budget=budget,
            quiesces=quiesces,
            cuts=cuts,
            leased=quiesces or (cuts and pf is not None),
            limiters=typed[1],
            attempt=spec.attempts.get(res.key, 1) if spec.attempts else 1,
        )
        if spec.resumed is not None:
            _resume(node, spec.resumed.get(res.key), done)
        nodes.append(node)
        node.gate.nodes.append(node)
    link(nodes, spec.graph.edges)
    if op is OperationKind.PROTECT:
        hold_thaws(nodes, [n.cuts and n.pf is not None for n in nodes], [n.quiesces for n in nodes])
        for i in spec.graph.topological_order():  # parents before children
            node = nodes[i]
            own = (node,) if node.quiesces else ()
            if len(node.parents) == 1:
                node.guards = node.parents[0].guards + own
            elif node.parents:
                merged = [g for p in node.parents for g in p.guards]
                node.guards = tuple(dict.fromkeys(merged)) + own
            else:
                node.guards = own
    return nodes


def _resume(n: _Node, marks: Any, done: frozenset[Hook]) -> None:
    """A recovered run's node starts from what earlier attempts committed: the hooks
    that finished and the instants they marked (their engine clock)."""
    for hook in done:
        n.hooks_done |= HOOK_BITS[hook]
    if marks is None:
        return
    n.quiesced_at, n.quiesced_wall = marks.quiesced_at, marks.quiesced_wall
    n.cut_at, n.crash_consistent = marks.cut_at, marks.crash_consistent
    n.thawed_at = marks.thawed_at
    if n.thawed_at is not None:
        n.quiesced_wall = None  # the window closed in that attempt: nothing to estimate
