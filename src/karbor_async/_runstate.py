"""What one run shares between the scheduler's rooms: its spec, its nodes, its helpers, its flags.

:class:`RunState` is the state every room's functions take as ``run``
(``_calls``, ``_abort``, ``_thaw``, ``_abandon``, ``_guards``, ``_walk``);
``_scheduler.Run`` extends it with the public face. It holds no rule of its
own: those live in the rooms and in the ordering core.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import attrs

from karbor_async._graph import ResourceGraph
from karbor_async._holds import Holds
from karbor_async._hub import EventHub
from karbor_async._log import PLUGINS, RUN, get_logger
from karbor_async._node import _Group, _Node
from karbor_async._params import NodeParams
from karbor_async._plan import Plan
from karbor_async._record import Recorder
from karbor_async._registry import TypeBinding
from karbor_async._stall import StallMonitor
from karbor_async._tasks import EngineTasks
from karbor_async._timers import Timers
from karbor_async._types import AbortReason, BarrierPolicy, Hook, OperationKind, ResourceKey
from karbor_async.plugin import Bank, SecretResolver
from karbor_async.store import RunOutcome, Store

__all__ = ["RunSpec", "RunState"]

_log = get_logger(RUN)
_plugin_log = get_logger(PLUGINS)


@attrs.frozen
class RunSpec:
    """Everything a run needs, validated by the engine before the run exists."""

    run_id: str
    checkpoint_id: str
    operation: OperationKind
    plan: Plan
    graph: ResourceGraph
    group_of: tuple[str, ...]
    groups: Mapping[str, BarrierPolicy]
    bindings: tuple[TypeBinding, ...]
    params: tuple[NodeParams, ...]
    saved: Mapping[ResourceKey, Mapping[str, Any]]
    restored: Mapping[ResourceKey, str]
    attempts: Mapping[ResourceKey, int] = attrs.Factory(dict)
    done_hooks: Mapping[ResourceKey, frozenset[Hook]] = attrs.Factory(dict)
    """Hooks whose finish was committed by an earlier attempt (recovery skips them)."""
    first_seq: int = 0
    resumed: Mapping[ResourceKey, Any] | None = None
    """A recovered run: the instants earlier attempts committed per resource
    (``_recovery.Marks``); None for a first attempt."""
    started_wall: float | None = None
    """A recovered run: when it first started."""
    sentinel_thaws: Mapping[ResourceKey, Mapping[str, Any]] = attrs.Factory(dict)
    """A recovered run: the safety thaws the dead engine's sentinel ran (its journal)."""


class RunState:
    """The shared state of one run (see the module docstring)."""

    def __init__(
        self,
        spec: RunSpec,
        *,
        tasks: EngineTasks,
        store: Store,
        bank: Bank,
        secrets: SecretResolver | None,
        record_events: bool,
        after_finish: Callable[[RunOutcome], Awaitable[None]] | None,
        hub: EventHub | None,
        quiet_gc: float,
        timers: Timers,
    ) -> None:
        self.spec = spec
        self.run_id = spec.run_id
        self.checkpoint_id = spec.checkpoint_id
        self.operation = spec.operation
        self.plan = spec.plan
        self.abort_timeout = spec.plan.timeouts.abort
        self.tasks = tasks
        self.store = store
        self.bank = bank
        self.secrets = secrets
        self.after_finish = after_finish
        self.log = _log.bind(run_id=spec.run_id, operation=spec.operation.value)
        self.timers = timers
        self.monitor: StallMonitor | None = tasks.monitor
        self.holds = Holds(store, timers, quiet_gc)
        self.rec = Recorder(
            run_id=spec.run_id,
            checkpoint_id=spec.checkpoint_id,
            operation=spec.operation,
            store=store,
            bank=bank,
            hub=hub,
            record=record_events,
            first_seq=spec.first_seq,
            saved=spec.saved,
            restored=spec.restored,
            timers=timers,
            log=self.log,
            plugin_log=_plugin_log.bind(run_id=spec.run_id, operation=spec.operation.value),
        )
        self.scrub = self.rec.scrub
        self.rec.safety = tasks.safety
        self.now: Callable[[], float] = anyio.current_time
        """The engine clock: ``anyio.current_time``, read straight from the loop on asyncio."""
        self.abort_reason: AbortReason | None = None
        self.started = False
        self.finished = False
        self.outcome_built = False
        self.outcome_stored: anyio.Event | None = None
        self.fatal: BaseException | None = None
        """A KeyboardInterrupt or SystemExit a hook raised: re-raised once all is thawed."""
        self.pending = 0
        self.settled: anyio.Event | None = None
        self.caller_probe: Callable[[], object] | None = None
        """Asks whether the caller's task was cancelled (checked before each hook starts)."""
        self.caller_cancelled = False
        self.t0: float | None = None
        self.groups: dict[str, _Group] = {
            name: _Group(name, policy) for name, policy in spec.groups.items()
        }
        self.nodes: list[_Node] = []

    @property
    def closed(self) -> bool:
        """RUN_FINISHED was emitted: the run is over (late hooks record nothing)."""
        return self.rec.closed

    new_event: Callable[[], anyio.Event] = anyio.Event
    """Builds the per-node events (``_calls.fast_primitives`` once the run runs)."""
    new_scope: Callable[[], anyio.CancelScope] = anyio.CancelScope
    """Builds each node's cancel scope (``_calls.fast_primitives`` once the run runs)."""

    def set_clock(self, clock: Callable[[], float]) -> None:
        """One clock for the run and each of its rooms (read on every hook call)."""
        self.now = self.rec.now = self.timers.now = self.holds.now = clock

    def account(self, n: _Node) -> None:
        """``n`` will not hold the run any longer (it ended, or was abandoned)."""
        if n.accounted:
            return
        n.accounted = True
        self.pending -= 1
        if self.pending == 0 and self.settled is not None:
            self.settled.set()
