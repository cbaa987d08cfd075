"""Vocabulary shared by every module: resources and the enums of DESIGN.md section 2."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, TypeVar

import attrs

__all__ = [
    "AbortReason",
    "BarrierPolicy",
    "Hook",
    "OperationKind",
    "Resource",
    "ResourceKey",
    "ResourceStatus",
    "RunStatus",
    "coerce_enum",
    "coerce_optional",
]

ResourceKey = tuple[str, str]
"""A resource's identity: ``(type, id)``."""


_EMPTY: Mapping[str, Any] = MappingProxyType({})


def _freeze_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if not value:
        return _EMPTY  # read-only, so one is enough (graphs hold many resources)
    if isinstance(value, MappingProxyType):
        return value
    return MappingProxyType(dict(value))


@attrs.frozen(order=False)
class Resource:
    """A thing to protect. Identity is ``(type, id)``; ``name`` and ``extra`` are descriptive."""

    type: str
    id: str
    name: str = ""
    extra: Mapping[str, Any] = attrs.field(
        factory=dict, converter=_freeze_mapping, eq=False, hash=False
    )
    key: ResourceKey = attrs.field(init=False, eq=False, hash=False, repr=False)
    """``(type, id)``: built once, shared by every map the resource is a key of."""

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "key", (self.type, self.id))

    def __str__(self) -> str:
        return f"{self.type}#{self.id}"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type, "id": self.id, "name": self.name}
        if self.extra:  # absent when empty: stored graphs hold one of these per resource
            out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Resource:
        return cls(
            type=str(data["type"]),
            id=str(data["id"]),
            name=str(data.get("name", "")),
            extra=data.get("extra") or {},
        )


E = TypeVar("E", bound=enum.StrEnum)


def coerce_enum(cls: type[E], value: object, what: str, error: type[Exception] = ValueError) -> E:
    """``value`` as a member of ``cls``: a member as is, or its documented string.

    Anything else raises ``error`` (``PlanError`` for plans, ``ValueError``
    elsewhere) naming ``what`` and listing the allowed values.
    """
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        try:
            return cls(value)
        except ValueError:
            pass
    allowed = ", ".join(repr(m.value) for m in cls)
    raise error(f"{what} must be one of {allowed}, not {value!r}")


def coerce_optional(
    cls: type[E], value: object, what: str, error: type[Exception] = ValueError
) -> E | None:
    """As :func:`coerce_enum`, with ``None`` kept as ``None``."""
    return None if value is None else coerce_enum(cls, value, what, error)


class OperationKind(enum.StrEnum):
    """What a run does to its resources. All use the same hooks and ordering rules."""

    PROTECT = "protect"
    RESTORE = "restore"
    DELETE = "delete"


class Hook(enum.StrEnum):
    """The four hooks of Karbor's protocol, in per-resource order."""

    PREPARE_BEGIN = "on_prepare_begin"
    PREPARE_FINISH = "on_prepare_finish"
    MAIN = "on_main"
    COMPLETE = "on_complete"


class BarrierPolicy(enum.StrEnum):
    """How strictly a consistency group's phases are separated (DESIGN.md section 4)."""

    NONE = "none"
    MAIN = "main"
    CUT = "cut"

    @property
    def strictness(self) -> int:
        return _STRICTNESS[self]

    @classmethod
    def stricter(cls, a: BarrierPolicy, b: BarrierPolicy) -> BarrierPolicy:
        return a if a.strictness >= b.strictness else b


_STRICTNESS = {BarrierPolicy.NONE: 0, BarrierPolicy.MAIN: 1, BarrierPolicy.CUT: 2}


class AbortReason(enum.StrEnum):
    """Why an ``on_prepare_finish`` is being called to thaw rather than cut."""

    FAILURE = "failure"
    """Another hook of the consistency group failed during prepare."""
    CANCELLED = "cancelled"
    """The run was cancelled."""
    TIMEOUT = "timeout"
    """The run exceeded its time limit."""
    BUDGET = "budget"
    """This resource was frozen longer than its quiesce budget."""
    RECOVERY = "recovery"
    """An engine restarted after a crash and thaws what may still be frozen."""


class RunStatus(enum.StrEnum):
    """How a run (protect, restore or delete) ended, or that it is still running."""

    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class ResourceStatus(enum.StrEnum):
    """Where one resource of a run stands."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    """A hook could not run because a resource it depends on failed."""
    ABORTED = "aborted"
    """Its consistency group aborted during prepare; it was thawed if it had been frozen."""
    CANCELLED = "cancelled"
    THAW_FAILED = "thaw_failed"
    """It may still be frozen: every thaw attempt failed. An alert was raised."""
    ABANDONED = "abandoned"
    """A hook of it did not end when the engine stopped it; the run stopped waiting for it."""
