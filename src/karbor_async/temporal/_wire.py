"""What the workflow and its activities pass each other (Temporal keeps it in its history).

Plain frozen dataclasses of JSON values: the SDK's default converter handles them
without a converter of ours, and the workflow's sandbox imports nothing but the
standard library for them (attrs classes would need one). Nothing here holds a
secret value: a plan's secret parameters hold references, and each worker
resolves them with its own resolver just before the hook runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DRIVER_PREFIX",
    "GroupInput",
    "GroupResult",
    "HookInput",
    "HookResult",
    "LeaseInput",
    "NodeShape",
    "Options",
    "RunShape",
    "StartInput",
    "FinishInput",
    "CompensateInput",
    "WORKFLOW_NAME",
]

WORKFLOW_NAME = "karbor-run"
DRIVER_PREFIX = "temporal:"
"""A run's lease owner when a Temporal workflow drives it: ``temporal:<workflow id>``.
Recovery never takes such a lease over (expired or not): the workflow owns the run."""


@dataclass(frozen=True)
class Options:
    """How the workflow schedules its activities (seconds)."""

    heartbeat_timeout: float = 10.0
    """An activity that does not heartbeat for this long is taken as lost (its worker
    died): a copy is retried on another worker, a group's prepare is compensated."""
    compensate_wait: float = 10.0
    """How long the compensation waits to be picked up by the prepare's worker (alive?)
    before the workflow leaves the thaw to that host's sentinel."""
    hook_attempts: int = 5
    """Attempts of one on_main / on_complete (a lost worker counts as one)."""
    lease_seconds: float = 30.0


@dataclass(frozen=True)
class StartInput:
    run_id: str
    workflow_id: str
    plan: dict[str, Any]
    options: Options = field(default_factory=Options)


@dataclass(frozen=True)
class NodeShape:
    """One resource as the workflow's ordering core needs it."""

    type: str
    id: str
    group: str
    hooks: list[str]
    """The hooks its plugin has for this operation (``Hook`` values)."""
    quiesces: bool
    cuts: bool
    place: str
    """``any`` (spread over workers), ``host`` (host-bound) or ``process`` (its cut
    lives in the process that took it): the last two run where the group prepared."""
    limits: list[str]
    """The concurrency limits its on_main / on_complete take, in the one order."""
    timeout: float | None


@dataclass(frozen=True)
class RunShape:
    run_id: str
    checkpoint_id: str
    operation: str
    token: int
    started_wall: float
    nodes: list[NodeShape]
    edges: list[list[int]]
    groups: dict[str, str]
    """Group name -> barrier policy value."""
    limits: dict[str, int]
    run_timeout: float | None
    abort_timeout: float


@dataclass(frozen=True)
class GroupInput:
    run_id: str
    token: int
    group: str
    workflow_id: str
    hold: bool = False
    """The group has a resource whose cut lives in this process: after its prepare, the
    activity signals its result and stays open (heartbeating) until the workflow is
    done with those resources."""


@dataclass(frozen=True)
class GroupResult:
    group: str
    resources: dict[str, dict[str, Any]]
    """``TYPE#ID`` -> ResourceOutcome JSON of the prepare hooks."""
    outcome: dict[str, Any]
    """GroupOutcome JSON (skew, barrier, aborted)."""
    aborted: str | None
    queue: str
    """The task queue of the worker that ran it."""


@dataclass(frozen=True)
class HookInput:
    run_id: str
    token: int
    type: str
    id: str
    hook: str
    heartbeat: float = 1.0


@dataclass(frozen=True)
class HookResult:
    resource: dict[str, Any]
    """ResourceOutcome JSON of this one hook call."""
    ok: bool


@dataclass(frozen=True)
class CompensateInput:
    run_id: str
    token: int
    group: str
    why: str


@dataclass(frozen=True)
class LeaseInput:
    run_id: str
    token: int
    seconds: float


@dataclass(frozen=True)
class FinishInput:
    run_id: str
    token: int
    started_wall: float
    parts: dict[str, list[dict[str, Any]]]
    """``TYPE#ID`` -> the ResourceOutcome JSON of each part (prepare, main, complete)."""
    groups: dict[str, dict[str, Any]]
    skipped: list[str]
    """Resources whose on_complete was skipped because a dependent failed."""
    abort: str | None
    """``cancelled`` or ``timeout`` when the run as a whole was stopped."""
    notes: dict[str, str] = field(default_factory=dict)
    """Group -> who thawed it when its prepare worker was lost (``compensation`` or
    ``sentinel``)."""
