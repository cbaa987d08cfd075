"""Operation objects' optional ``check(ctx)``: bad input refused while a run is built.

Not a fifth hook: the engine calls it once per resource, before anything is
stored or frozen, concurrently (``Plan.discovery_concurrency`` at a time), all
of them within ``Timeouts.discovery``. A check that raises (or does not end in
time) becomes a :class:`PlanError` naming the resource; resolved secrets are
kept out of its message.
"""

from __future__ import annotations

from typing import Any

import anyio

from karbor_async._params import resolve_secrets
from karbor_async._runstate import RunSpec
from karbor_async._scrub import Scrubber
from karbor_async.exceptions import PlanError
from karbor_async.plugin import Bank, CheckContext, SecretResolver

__all__ = ["run_checks"]


async def run_checks(spec: RunSpec, secrets: SecretResolver | None, bank: Bank) -> None:
    """Call ``check`` of every resource's operation object; raise the first refusal."""
    op, plan, graph, params = spec.operation, spec.plan, spec.graph, spec.params
    bindings, saved = spec.bindings, spec.saved
    checks: list[tuple[int, Any]] = []
    per_type: dict[str, Any] = {}
    for i, res in enumerate(graph.resources):
        if res.type not in per_type:
            opobj = bindings[i].plugin.get_operation(op, res.type)
            per_type[res.type] = getattr(opobj, "check", None) if opobj is not None else None
        check = per_type[res.type]
        if check is not None:
            checks.append((i, check))
    if not checks:
        return
    children = graph.children_of()
    parents: list[list[int]] = [[] for _ in graph.resources]
    for p, c in graph.edges:
        parents[c].append(p)
    scrub = Scrubber()
    failures: dict[int, str] = {}
    limiter = anyio.CapacityLimiter(max(1, plan.discovery_concurrency))
    resources = graph.resources

    async def one(i: int, check: Any) -> None:
        res = resources[i]
        async with limiter:
            try:
                values = await resolve_secrets(params[i], secrets)
                scrub.add(values[k] for k in params[i].secrets)
                ctx = CheckContext(
                    resource=res,
                    operation=op,
                    parameters=values,
                    bank=bank,
                    run_id=spec.run_id,
                    checkpoint_id=spec.checkpoint_id,
                    children=tuple(resources[c] for c in children[i]),
                    parents=tuple(resources[p] for p in parents[i]),
                    saved=saved.get(res.key, {}),
                )
                await check(ctx)
            except Exception as exc:
                failures[i] = scrub.text(str(exc) or type(exc).__name__)

    limit = plan.timeouts.discovery
    with anyio.move_on_after(limit) as scope:
        async with anyio.create_task_group() as tg:
            for i, check in checks:
                tg.start_soon(one, i, check)
    if scope.cancelled_caught:
        pending = [i for i, _c in checks if i not in failures]
        raise PlanError(
            f"{_name(resources[pending[0]])}: check did not finish within timeouts.discovery "
            f"({limit:g} s)"
            if pending
            else f"checks did not finish within timeouts.discovery ({limit:g} s)"
        )
    if failures:
        first = min(failures)
        more = f" (and {len(failures) - 1} more refused)" if len(failures) > 1 else ""
        raise PlanError(
            f"{_name(resources[first])}: {op.value} refused by its plugin's check: "
            f"{failures[first]}{more}"
        )


def _name(res: Any) -> str:
    return f"{res.type}#{res.id}"
