"""Recording a run: lifecycle events, progress ticks, saved info, the restore mapping, errors.

One :class:`Recorder` per run. It is also what each node's hook context acts
through for run-wide facts (it implements ``_node.NodeRun``), and it keeps
every resolved secret out of what it writes.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Any

import anyio

from karbor_async._hub import EventHub
from karbor_async._log import ref
from karbor_async._node import _Node
from karbor_async._safety import SafetyThaws
from karbor_async._scrub import Scrubber
from karbor_async._timers import Timers
from karbor_async._types import AbortReason, Hook, OperationKind, ResourceKey, ResourceStatus
from karbor_async.events import Event, EventKind, Progress, new_event
from karbor_async.exceptions import HookError, LeaseLostError, PluginError, ThawFailedError
from karbor_async.plugin import Bank
from karbor_async.store import Store

__all__ = ["Recorder", "format_error", "record_error"]

_LIFECYCLE, _TICK_LIVE, _TICK_STORED = 0, 1, 2
"""How an event is handed on: a lifecycle event, or a progress tick live and/or stored."""

_NO_DATA: Mapping[str, Any] = MappingProxyType({})
"""The data of an event that has none (progress ticks, most lifecycle events): one
shared, read-only, empty mapping instead of an empty dict each (64 bytes)."""


def format_error(exc: BaseException) -> str:
    """The exception chain, outermost first, with the tracebacks."""
    return "".join(traceback.format_exception(exc)).rstrip()


def record_error(n: _Node, hook: Hook, aborting: AbortReason | None, err: BaseException) -> None:
    """Keep every failure of ``n`` in order; ``error``/``failed_hook`` keep the first."""
    if any(e is err for _h, _a, e in n.errors):
        return
    n.errors.append((hook, aborting, err))
    if n.error is None:
        n.error = err
        n.failed_hook = hook


class Recorder:
    """The run's event log writer and its hooks' window on run-wide facts."""

    _PROGRESS_STORE_INTERVAL = 0.1
    """Progress is stored coalesced: at most ten ticks a second per resource."""

    def __init__(
        self,
        *,
        run_id: str,
        checkpoint_id: str,
        operation: OperationKind,
        store: Store,
        bank: Bank,
        hub: EventHub | None,
        record: bool,
        first_seq: int,
        saved: Mapping[ResourceKey, Mapping[str, Any]],
        restored: Mapping[ResourceKey, str],
        timers: Timers,
        log: Any,
        plugin_log: Any,
    ) -> None:
        self.run_id = run_id
        self.checkpoint_id = checkpoint_id
        self.operation = operation
        self.store = store
        self.bank = bank
        self.hub = hub
        self.record = record
        self.closed = False
        """RUN_FINISHED was emitted: the run's log is closed (late hooks emit nothing)."""
        self.log_events = False
        self.seq = first_seq
        self.scrub = Scrubber()
        """The secret values this run resolved, kept out of all it writes."""
        self.log = log
        self.plugin_log = plugin_log
        self.now: Callable[[], float] = anyio.current_time
        self.timers = timers
        self._saved: dict[ResourceKey, dict[str, Any]] = {k: dict(v) for k, v in saved.items()}
        self._own_saved: dict[ResourceKey, dict[str, Any]] = {}
        self.restored: dict[ResourceKey, str] = dict(restored)
        self.safety: SafetyThaws | None = None
        """The engine's sentinel (safety thaws of quiescing hooks)."""
        self._deferred: list[tuple[tuple[Any, ...], int]] | None = None
        """Events of a cut wave, numbered and stamped, not built yet (see ``defer``)."""
        self.fenced = False
        """Another engine took the run over (its store refused this one's writes): the
        log is that engine's now; this one still thaws, and its next commit fails."""

    @property
    def scrubber(self) -> Scrubber:
        return self.scrub

    # -- events --------------------------------------------------------------------------
    def emit(
        self,
        kind: EventKind,
        node: _Node | None,
        hook: Hook | None,
        _mono: float | None = None,
        **data: Any,
    ) -> None:
        """Record a lifecycle event (``_mono``: its engine-clock time, if already read)."""
        if not self.record or self.closed:
            return
        if data and self.scrub.active:
            data = self.scrub.data(data)
        seq = self.seq = self.seq + 1
        if node is not None:
            resource: ResourceKey | None = node.resource.key
            group = node.gate.name
            attempt = node.attempt
        else:
            resource, group, attempt = None, data.pop("group", None), 1
        mono = self.now() if _mono is None else _mono
        payload = data if data else _NO_DATA  # (most events: one shared, empty mapping)
        fields = (
            self.run_id,
            seq,
            kind,
            self.operation,
            time.time(),
            mono,
            resource,
            hook,
            group,
            attempt,
            None,
            0,
            payload,
        )
        deferred = self._deferred
        if deferred is not None:  # numbered and stamped now, built after the wave
            deferred.append((fields, _LIFECYCLE))
        else:
            self._publish(fields, _LIFECYCLE)

    def _append(self, event: Event) -> None:
        try:
            self.store.append(event)
        except LeaseLostError:
            self.fenced = True  # (its log is the new owner's; the next commit aborts)

    def _publish(self, fields: tuple[Any, ...], how: int) -> None:
        # Every field, positional: half the cost of Event(...) (a hot path).
        event = new_event(*fields)
        if how != _LIFECYCLE:  # a progress tick: live, stored, or both
            if how & _TICK_LIVE and self.hub is not None:
                self.hub.tick(event)
            if how & _TICK_STORED:
                self._append(event)
            return
        self._append(event)
        if self.hub is not None:
            self.hub.lifecycle(event)
        if self.log_events:
            self._log_event(event)

    def _log_event(self, event: Event) -> None:
        hook = event.hook
        self.log.debug(
            event.kind.value,
            seq=event.seq,
            resource=f"{event.resource[0]}#{event.resource[1]}" if event.resource else None,
            hook=hook.value if hook else None,
            group=event.group,
            **event.data,
        )

    def defer(self) -> None:
        """A cut wave starts: until :meth:`flush`, events are numbered and stamped when
        they happen but built and handed to the store and subscribers only then.

        Building an event and handing it on costs about 2 us; three per cut, inside the
        wave, added them to the skew of every later cut. The wave's events wait one loop
        step (the watcher flushes them after every resource the release woke has taken
        its first step), and every commit flushes first (``commit``).
        """
        if self.record and self._deferred is None:
            self._deferred = []

    def flush(self) -> None:
        """Build and hand on the events :meth:`defer` kept, in their order."""
        deferred = self._deferred
        if deferred is None:
            return
        self._deferred = None
        for fields, how in deferred:
            self._publish(fields, how)

    async def commit(self) -> None:
        """A commit point: every event emitted so far is in the store, then committed."""
        self.flush()
        await self.store.commit()

    def progress_tick(self, n: _Node, progress: Progress) -> None:
        """A plugin reported progress: live to subscribers, stored at most 10 times a second."""
        if not self.record or n.abandoned:
            return
        hub = self.hub
        live = hub is not None and hub.active
        now = self.now()
        due = now - n.progress_stored_at >= self._PROGRESS_STORE_INTERVAL
        if not live and not due:
            return
        if due:
            n.progress_stored_at = now
        fields = (
            self.run_id,
            self.seq,
            EventKind.PROGRESS,
            self.operation,
            time.time(),
            now,
            n.resource.key,
            n.current,
            n.gate.name,
            n.attempt,
            progress,
            n.ticks,
            _NO_DATA,
        )
        how = (_TICK_LIVE if live else 0) | (_TICK_STORED if due else 0)
        deferred = self._deferred
        if deferred is not None:
            deferred.append((fields, how))  # (in order with the wave's lifecycle events)
            return
        self._publish(fields, how)

    def mark_refused(self, n: _Node, hook: Hook, what: str, at: float | None, rule: str) -> None:
        """An aborting call's mark broke a rule: warn; the engine's default instant stands."""
        self.log.warning(
            "mark_refused", resource=ref(n.resource), hook=hook.value, mark=what, rule=rule
        )
        self.emit(EventKind.MARK_REFUSED, n, hook, mark=what, at=at, rule=rule)

    def release(self, n: _Node) -> None:
        """``n``'s prepare is over and nothing of it is frozen: give its lease back."""
        if n.leased:
            n.leased = False
            self.store.release_resource(self.run_id, n.resource.key)

    def arm_budget(self, n: _Node, deadline: float) -> None:
        self.timers.arm_budget(n, deadline)

    # -- the dead-man thaw -------------------------------------------------------------
    async def arm_safety_thaw(
        self,
        n: _Node,
        hook: Hook,
        aborting: bool,
        command: Sequence[str] | None,
        function: str | None,
        args: Mapping[str, Any] | None,
    ) -> None:
        """A quiescing hook hands its safety thaw to the engine's sentinel (before it freezes)."""
        if not (
            self.operation is OperationKind.PROTECT
            and hook is Hook.PREPARE_BEGIN
            and n.binding.spec.quiesces
            and not aborting
        ):
            raise PluginError(
                f"{n.resource} {hook.value}: arm_safety_thaw is for protect's on_prepare_begin "
                "of a type that quiesces"
            )
        safety = self.safety
        if safety is None:
            raise RuntimeError("this run has no engine sentinel (it is not run by an Engine)")
        if n.safety is not None:
            n.disarm_safety()  # armed again in the same call: the latest thaw stands
        limit = None if n.budget is None else n.budget + safety.margin
        n.safety = await safety.arm(
            run_id=self.run_id,
            resource=n.resource.key,
            command=command,
            function=function,
            args=args,
            limit=limit,
            on_fired=lambda result, at: self.sentinel_fired(n, result, at),
        )

    def sentinel_fired(self, n: _Node, result: Mapping[str, Any], at: float) -> None:
        """The sentinel thawed ``n`` while this engine lives (frozen past budget + margin):
        it is recorded budget-thawed; the engine's own thaw still runs (idempotent)."""
        n.safety = None
        ok = bool(result.get("ok"))
        self.log.error(
            "safety_thaw_fired", resource=str(n.resource), ok=ok, error=result.get("error")
        )
        if not ok or (n.thaw_done and not n.rescued):
            return  # (a thaw it could not do is not one; a thawed resource stays thawed)
        n.thawed_early = True
        n.holding = False  # what cuts after this is crash-consistent
        self.emit(
            EventKind.THAWED,
            n,
            None,
            at=self.now(),
            reason=AbortReason.BUDGET.value,
            by="sentinel",
            wall_at=at,
        )

    # -- saved info and restore mapping -----------------------------------------------------
    def saved_info(self, key: ResourceKey) -> Mapping[str, Any]:
        own = self._own_saved.get(key)
        base = self._saved.get(key, {})
        return {**base, **own} if own else base

    def save_info(self, key: ResourceKey, info: Mapping[str, Any]) -> None:
        if self.scrub.active:
            info = self.scrub.data(info)
        if self.operation is OperationKind.PROTECT:
            merged = self._saved.setdefault(key, {})
            merged.update(info)
            self.store.save_info(self.checkpoint_id, key, merged)
        else:
            merged = self._own_saved.setdefault(key, {})
            merged.update(info)
            self.store.save_info(self.run_id, key, merged)

    async def report_restored(self, n: _Node, new_id: str) -> None:
        key = n.resource.key
        self.restored[key] = new_id
        self.store.record_restored(self.run_id, key, new_id)
        self.emit(EventKind.RESTORED, n, None, new_id=new_id)
        await self.commit()

    # -- failures --------------------------------------------------------------------------
    def format(self, exc: BaseException) -> str:
        return self.scrub.text(format_error(exc))

    def hook_error(self, n: _Node, hook: Hook, exc: BaseException) -> HookError:
        """Wrap a plugin's exception (``raise ... from``), keeping resolved secrets out."""
        scrub = self.scrub
        err = HookError(n.resource, hook, scrub.text(f"{type(exc).__name__}: {exc}"))
        err.__cause__ = scrub.exception(exc)
        return err

    def fail(self, n: _Node, hook: Hook, err: HookError) -> None:
        record_error(n, hook, None, err)
        n.status = ResourceStatus.FAILED
        self.log.warning("hook_failed", resource=ref(n.resource), hook=hook.value, error=str(err))

    def thaw_failed(self, n: _Node, cause: BaseException, reason: AbortReason | None) -> None:
        """The alert: ``n`` may still be frozen (DESIGN.md guarantee 1)."""
        if n.status is ResourceStatus.THAW_FAILED:
            return
        exc = ThawFailedError(
            n.resource, Hook.PREPARE_FINISH, "every thaw attempt failed; it may still be frozen"
        )
        exc.__cause__ = cause
        n.status = ResourceStatus.THAW_FAILED
        record_error(n, Hook.PREPARE_FINISH, n.gate.aborting or reason, exc)
        self.log.error("thaw_failed", resource=ref(n.resource), error=repr(cause))
        self.emit(EventKind.THAW_FAILED, n, Hook.PREPARE_FINISH, error=format_error(exc))
