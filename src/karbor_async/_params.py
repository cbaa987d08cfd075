"""Merging and checking plan parameters, and resolving secret references."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from karbor_async._graph import ResourceGraph
from karbor_async._plan import Plan
from karbor_async._registry import PluginRegistry
from karbor_async._types import OperationKind, Resource
from karbor_async.exceptions import PlanError, SecretError
from karbor_async.plugin import Param, SecretResolver

__all__ = ["NodeParams", "check_secrets", "merge_parameters", "resolve_secrets"]

_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _matches(param: Param, value: Any) -> bool:
    if param.kind is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if param.kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, param.kind)


class NodeParams:
    """A node's merged parameters and the names of its secret parameters."""

    __slots__ = ("secrets", "values")

    def __init__(self, values: Mapping[str, Any], secrets: tuple[str, ...]) -> None:
        self.values = values
        self.secrets = secrets


def merge_parameters(
    plan: Plan, graph: ResourceGraph, registry: PluginRegistry, op: OperationKind
) -> list[NodeParams]:
    """Each node's parameters for operation ``op``: declared defaults, then ``"Type"``,
    then ``"Type#id"``; a declared parameter whose ``operations`` leave ``op`` out is
    neither checked nor passed on."""
    keys = {f"{r.type}#{r.id}" for r in graph.resources}
    types = {r.type for r in graph.resources}
    for key in plan.parameters:
        rtype, sep, _ = key.partition("#")
        if sep and key not in keys:
            raise PlanError(
                f"parameters[{key!r}] names a resource that is not in the plan's graph; "
                "check the type and id (write TYPE#ID)"
            )
        if not sep and rtype not in types:
            raise PlanError(
                f"parameters[{key!r}] names a type with no resource in the plan's graph "
                f"(types present: {', '.join(sorted(types))})"
            )
    shared: dict[str, NodeParams] = {}
    out: list[NodeParams] = []
    for res in graph.resources:
        own = plan.parameters.get(f"{res.type}#{res.id}")
        if own is None and res.type in shared:
            out.append(shared[res.type])
            continue
        node = _merge_one(plan, res, registry, own, op)
        if own is None:
            shared[res.type] = node
        out.append(node)
    return out


def _merge_one(
    plan: Plan,
    res: Resource,
    registry: PluginRegistry,
    own: Mapping[str, Any] | None,
    op: OperationKind,
) -> NodeParams:
    binding = registry.binding(res.type)
    declared = binding.spec.parameters if binding else None
    merged: dict[str, Any] = {}
    if declared:
        merged.update({k: p.default for k, p in declared.items() if p.default is not None})
    merged.update(plan.parameters.get(res.type, _EMPTY))
    merged.update(own or _EMPTY)
    if declared is None:
        return NodeParams(MappingProxyType(merged) if merged else _EMPTY, ())
    where = f"{res.type}#{res.id}"
    for key in [k for k, p in declared.items() if op not in p.operations]:
        merged.pop(key, None)
    for key, value in merged.items():
        param = declared.get(key)
        if param is None:
            accepted = ", ".join(sorted(declared)) or "no parameters"
            owner = binding.plugin.plugin_name() if binding else "its plugin"
            raise PlanError(f"{where}: unknown parameter {key!r}; {owner} accepts {accepted}")
        if param.secret:
            if not isinstance(value, str) or not value:
                raise PlanError(
                    f"{where}: parameter {key!r} is secret; the plan must hold the secret's "
                    "name (a reference such as 'db-password'), never its value"
                )
        elif not _matches(param, value):
            raise PlanError(
                f"{where}: parameter {key!r} must be {param.kind.__name__}, "
                f"got {type(value).__name__} {value!r}"
            )
    for key, param in declared.items():
        if param.required and key not in merged and op in param.operations:
            what = "secret parameter" if param.secret else "parameter"
            about = f" ({param.description})" if param.description else ""
            raise PlanError(
                f"{where}: required {what} {key!r} is missing{about}; {op.value} needs it: "
                f"set it under parameters[{res.type!r}] or [{where!r}]"
            )
    secrets = tuple(k for k, p in declared.items() if p.secret and k in merged)
    return NodeParams(MappingProxyType(merged), secrets)


async def check_secrets(
    graph: ResourceGraph, params: list[NodeParams], resolver: SecretResolver | None
) -> None:
    """Fail before any hook runs if a secret reference cannot be resolved."""
    checked: set[str] = set()
    for res, node in zip(graph.resources, params, strict=True):
        for key in node.secrets:
            ref = str(node.values[key])
            if ref in checked:
                continue
            if resolver is None:
                raise SecretError(
                    f"{res.type}#{res.id}: parameter {key!r} is secret (reference {ref!r}) but "
                    "the engine has no secrets resolver; pass secrets= to Engine"
                )
            try:
                await resolver(ref)
            except Exception as exc:
                raise SecretError(
                    f"{res.type}#{res.id}: cannot resolve secret parameter {key!r} "
                    f"(reference {ref!r}): {exc}"
                ) from exc
            checked.add(ref)


async def resolve_secrets(node: NodeParams, resolver: SecretResolver | None) -> Mapping[str, Any]:
    """The parameters a hook sees: secret references replaced by their values."""
    if not node.secrets:
        return node.values
    if resolver is None:
        raise SecretError("secret parameters need a resolver; pass secrets= to Engine")
    values = dict(node.values)
    for key in node.secrets:
        values[key] = await resolver(str(node.values[key]))
    return MappingProxyType(values)
