"""Plans: what to protect, with parameters, groups, barrier, timeouts and limits."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

import attrs

from karbor_async._types import BarrierPolicy, Resource, ResourceKey, coerce_optional
from karbor_async.exceptions import PlanError

__all__ = ["ConsistencyGroup", "Plan", "Timeouts"]

DEFAULT_GROUP = "default"


def _frozen_map(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(value or {}))


def _frozen_params(
    value: Mapping[str, Mapping[str, Any]] | None,
) -> Mapping[str, Mapping[str, Any]]:
    return MappingProxyType({k: MappingProxyType(dict(v)) for k, v in (value or {}).items()})


def _positive(name: str, value: float | None) -> None:
    if value is not None and (
        not isinstance(value, int | float) or value <= 0 or math.isnan(value)
    ):
        raise PlanError(f"timeouts.{name} must be a positive number of seconds, not {value!r}")


def _to_key(item: Resource | ResourceKey | str) -> ResourceKey:
    if isinstance(item, Resource):
        return item.key
    if isinstance(item, str):
        rtype, sep, rid = item.partition("#")
        if not sep or not rtype or not rid:
            raise PlanError(f"group member {item!r} must be written TYPE#ID")
        return (rtype, rid)
    return (str(item[0]), str(item[1]))


def _barrier(value: BarrierPolicy | str | None) -> BarrierPolicy | None:
    return coerce_optional(BarrierPolicy, value, "barrier", PlanError)


def _resources(items: Iterable[Resource]) -> tuple[Resource, ...]:
    return tuple(items)


def _groups(items: Iterable[ConsistencyGroup]) -> tuple[ConsistencyGroup, ...]:
    return tuple(items)


def _keys(items: Iterable[Resource | ResourceKey | str]) -> tuple[ResourceKey, ...]:
    return tuple(_to_key(i) for i in items)


@attrs.frozen
class ConsistencyGroup:
    """Root resources whose cuts are held together; their dependents join the group."""

    name: str
    resources: tuple[ResourceKey, ...] = attrs.field(converter=_keys)
    barrier: BarrierPolicy | None = attrs.field(default=None, converter=_barrier)
    """Overrides the plan's barrier for this group (a member or its string: ``"cut"``)."""


@attrs.frozen
class Timeouts:
    """Time limits, in seconds (``None`` means no limit)."""

    hook: float | None = 3600.0
    """Default limit for one hook call."""
    per_plugin: Mapping[str, float] = attrs.field(factory=dict, converter=_frozen_map)
    """Hook limit per plugin name (overrides the plugin's own ``hook_timeout``)."""
    per_type: Mapping[str, float] = attrs.field(factory=dict, converter=_frozen_map)
    """Hook limit per resource type (overrides per plugin)."""
    run: float | None = None
    """Limit for the whole run; past it the run aborts with reason ``timeout``."""
    quiesce_budget: float | None = None
    """How long a resource may stay frozen; past it the engine thaws it (reason ``budget``)."""
    quiesce_budget_per_type: Mapping[str, float] = attrs.field(factory=dict, converter=_frozen_map)
    """Budget per ``"Type"`` or ``"Type#id"``."""
    abort: float = 60.0
    """Deadline for aborting calls (thaws), including their retries."""
    discovery: float = 300.0
    """Limit for finding the graph's dependents through the protectables."""
    lease_wait: float = 0.0
    """How long a protect waits for another live run to release a resource it would
    quiesce or cut, before failing with ``ResourceBusyError`` (0: do not wait)."""

    def __attrs_post_init__(self) -> None:
        lw = self.lease_wait
        if not isinstance(lw, int | float) or isinstance(lw, bool) or not 0 <= lw < math.inf:
            raise PlanError(f"timeouts.lease_wait must be 0 or more seconds, not {lw!r}")
        _positive("hook", self.hook)
        _positive("run", self.run)
        _positive("quiesce_budget", self.quiesce_budget)
        _positive("abort", self.abort)
        _positive("discovery", self.discovery)
        for label, table in (
            ("per_plugin", self.per_plugin),
            ("per_type", self.per_type),
            ("quiesce_budget_per_type", self.quiesce_budget_per_type),
        ):
            for key, value in table.items():
                _positive(f"{label}[{key!r}]", value)

    def to_json(self) -> dict[str, Any]:
        return {
            "hook": self.hook,
            "per_plugin": dict(self.per_plugin),
            "per_type": dict(self.per_type),
            "run": self.run,
            "quiesce_budget": self.quiesce_budget,
            "quiesce_budget_per_type": dict(self.quiesce_budget_per_type),
            "abort": self.abort,
            "discovery": self.discovery,
            "lease_wait": self.lease_wait,
        }


@attrs.frozen
class Plan:
    """What to protect and how.

    ``parameters`` maps ``"Type"`` (every resource of the type) and ``"Type#id"``
    (one resource, overriding the type's) to parameter dicts. ``limits`` maps a
    plugin name or resource type to how many ``on_main``/``on_complete`` hooks may
    run at once. ``barrier`` defaults to ``main`` for protect and ``none`` for
    restore and delete.
    """

    name: str
    resources: tuple[Resource, ...] = attrs.field(converter=_resources)
    parameters: Mapping[str, Mapping[str, Any]] = attrs.field(
        factory=dict, converter=_frozen_params
    )
    barrier: BarrierPolicy | None = attrs.field(default=None, converter=_barrier)
    """``"none"``, ``"main"`` or ``"cut"`` (or the :class:`BarrierPolicy` member)."""
    groups: tuple[ConsistencyGroup, ...] = attrs.field(default=(), converter=_groups)
    merge_groups: bool = False
    """Merge groups that share a resource (taking the stricter barrier) instead of failing."""
    timeouts: Timeouts = attrs.field(factory=Timeouts)
    limits: Mapping[str, int] = attrs.field(factory=dict, converter=_frozen_map)
    crash_consistent_fallback: bool = False
    """When a quiesce budget runs out, still cut the children (marked crash-consistent)."""
    delete_on_failure: bool = False
    """Run the delete operation over what a failed or cancelled protect saved."""
    discovery_concurrency: int = 32

    def __attrs_post_init__(self) -> None:
        if not self.name:
            raise PlanError("a plan needs a name")
        if not self.resources:
            raise PlanError(f"plan {self.name!r} names no resources")
        seen: set[ResourceKey] = set()
        for res in self.resources:
            if res.key in seen:
                raise PlanError(f"plan {self.name!r} names {res} twice")
            seen.add(res.key)
        names = [g.name for g in self.groups]
        for name in names:
            if names.count(name) > 1:
                raise PlanError(f"plan {self.name!r} has two consistency groups named {name!r}")
            if name == DEFAULT_GROUP:
                raise PlanError(f"{DEFAULT_GROUP!r} is reserved for resources in no group")
        members: dict[ResourceKey, str] = {}
        for group in self.groups:
            for key in group.resources:
                if key not in seen:
                    raise PlanError(
                        f"consistency group {group.name!r} names {key[0]}#{key[1]}, "
                        "which is not among the plan's resources"
                    )
                if key in members and not self.merge_groups:
                    raise PlanError(
                        f"{key[0]}#{key[1]} is in groups {members[key]!r} and {group.name!r}; "
                        "put it in one, or set merge_groups"
                    )
                members[key] = group.name
        for target, value in self.limits.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PlanError(f"limits[{target!r}] must be a whole number >= 1, not {value!r}")
        if self.discovery_concurrency < 1:
            raise PlanError("discovery_concurrency must be >= 1")

    def to_json(self) -> dict[str, Any]:
        """The plan as JSON (secret parameters hold references, never values)."""
        return {
            "name": self.name,
            "resources": [r.to_json() for r in self.resources],
            "parameters": {k: dict(v) for k, v in self.parameters.items()},
            "barrier": self.barrier.value if self.barrier else None,
            "groups": [
                {
                    "name": g.name,
                    "resources": [f"{t}#{i}" for t, i in g.resources],
                    "barrier": g.barrier.value if g.barrier else None,
                }
                for g in self.groups
            ],
            "merge_groups": self.merge_groups,
            "timeouts": self.timeouts.to_json(),
            "limits": dict(self.limits),
            "crash_consistent_fallback": self.crash_consistent_fallback,
            "delete_on_failure": self.delete_on_failure,
            "discovery_concurrency": self.discovery_concurrency,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        """Build a plan from JSON-like data (what :meth:`to_json` writes, or a plan file)."""
        try:
            timeouts = data.get("timeouts") or {}
            return cls(
                name=data["name"],
                resources=[Resource.from_json(r) for r in data["resources"]],
                parameters=data.get("parameters") or {},
                barrier=data.get("barrier") or None,
                groups=[
                    ConsistencyGroup(
                        name=g["name"],
                        resources=g.get("resources", []),
                        barrier=g.get("barrier") or None,
                    )
                    for g in data.get("groups") or []
                ],
                merge_groups=bool(data.get("merge_groups", False)),
                timeouts=Timeouts(**timeouts),
                limits=data.get("limits") or {},
                crash_consistent_fallback=bool(data.get("crash_consistent_fallback", False)),
                delete_on_failure=bool(data.get("delete_on_failure", False)),
                discovery_concurrency=int(data.get("discovery_concurrency", 32)),
            )
        except PlanError:
            raise
        except KeyError as exc:
            raise PlanError(f"plan is missing the key {exc.args[0]!r}") from exc
        except (TypeError, ValueError) as exc:
            raise PlanError(f"plan is malformed: {exc}") from exc
