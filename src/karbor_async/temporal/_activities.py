"""The activities a worker runs for the workflow: each one a part of a run on the local engine.

Each activity heartbeats at least every second while it runs (liveness; the
way Temporal delivers a cancellation; for a hook, its last progress, which a
retried attempt gets back). The part runs in a task of its own: a cancelled
activity cancels it the anyio way, so the local engine's rules for a cancelled
caller hold (frozen resources thawed, a started cut allowed to finish, the run
recorded ``cancelled``). A refusal (a stale fencing token, a bad plan, a busy
resource) is not retried: it fails the activity with the error's class name.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
from temporalio import activity
from temporalio.exceptions import ApplicationError

from karbor_async._log import get_logger
from karbor_async._types import Hook, ResourceStatus
from karbor_async.events import Progress
from karbor_async.exceptions import (
    CheckpointBusyError,
    IllegalTransitionError,
    KarborError,
    LeaseHeldError,
    LeaseLostError,
    ResourceBusyError,
    StoreError,
)
from karbor_async.store import key_to_str
from karbor_async.temporal import _lease
from karbor_async.temporal._local import Parts, compact
from karbor_async.temporal._wire import (
    CompensateInput,
    FinishInput,
    GroupInput,
    GroupResult,
    HookInput,
    HookResult,
    LeaseInput,
    RunShape,
    StartInput,
)

__all__ = ["Activities"]

_log = get_logger(__name__)
T = TypeVar("T")
_REFUSED = (
    LeaseLostError,
    ResourceBusyError,
    LeaseHeldError,
    CheckpointBusyError,
    IllegalTransitionError,
)
"""Store errors that are answers, not outages: retrying would get the same one."""
BEAT = 0.8
"""Seconds between heartbeats (at least one a second: liveness, cancellation, progress)."""


def _refusal(exc: BaseException) -> ApplicationError:
    name = "LeaseLost" if isinstance(exc, LeaseLostError) else type(exc).__name__
    return ApplicationError(str(exc), type=name, non_retryable=True)


async def _beating(work: Callable[[], Awaitable[T]], details: Callable[[], Any]) -> T:
    """Run ``work`` in a task of its own, heartbeating every BEAT seconds meanwhile."""
    out: list[T] = []

    async def body() -> None:
        out.append(await work())
        tg.cancel_scope.cancel()

    async def beat() -> None:
        while True:
            activity.heartbeat(details())
            await anyio.sleep(BEAT)

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(beat)
            tg.start_soon(body)
    except BaseExceptionGroup as group:
        first = group.exceptions[0] if len(group.exceptions) == 1 else None
        if isinstance(first, _REFUSED) or (
            isinstance(first, KarborError) and not isinstance(first, StoreError)
        ):
            raise _refusal(first) from None  # a refusal: not retried
        if first is not None:
            raise first from None  # (the store, an engine bug: retried by the policy)
        raise
    return out[0]


def _progress_json(p: Progress | None) -> dict[str, Any] | None:
    if p is None:
        return None
    return {"fraction": p.fraction, "done": p.done, "total": p.total, "message": p.message}


class Activities:
    """The activities of one worker (``queue``: the worker's own task queue)."""

    def __init__(self, parts: Parts, queue: str) -> None:
        self.parts = parts
        self.queue = queue

    @activity.defn(name="karbor-claim")
    async def claim(self) -> str:
        """A group's prepare will run here: this worker's own queue."""
        return self.queue

    @activity.defn(name="karbor-start")
    async def start(self, inp: StartInput) -> RunShape:
        return await _beating(
            lambda: self.parts.start(
                inp.run_id, inp.workflow_id, inp.plan, inp.options.lease_seconds
            ),
            lambda: {"queue": self.queue},
        )

    @activity.defn(name="karbor-prepare")
    async def prepare(self, inp: GroupInput) -> GroupResult:
        """The group's prepare waves in one local run on this worker."""
        run, view = await self.parts.group_run(inp.run_id, inp.token, inp.group)

        async def work() -> GroupResult:
            resources, group = await self.parts.prepare(run, view)
            result = GroupResult(
                group=inp.group,
                resources=resources,
                outcome=group.to_json(),
                aborted=group.aborted.value if group.aborted is not None else None,
                queue=self.queue,
            )
            if inp.hold and result.aborted is None:
                # A cut lives in this process: say the prepare is done, and stay open
                # (heartbeating) until the workflow is done with those resources, so that
                # the loss of this process is seen as the loss of their cuts.
                handle = activity.client().get_workflow_handle(inp.workflow_id)
                await handle.signal("prepared", result)
                await anyio.sleep_forever()  # (the workflow cancels the activity)
            return result

        return await _beating(
            work, lambda: {"queue": self.queue, "frozen": sum(n.frozen for n in run.nodes)}
        )

    @activity.defn(name="karbor-hook")
    async def hook(self, inp: HookInput) -> HookResult:
        """One on_main or on_complete, as attempt ``activity.info().attempt``."""
        info = activity.info()
        key = (inp.type, inp.id)
        run, view = await self.parts.hook_run(
            inp.run_id, inp.token, key, Hook(inp.hook), info.attempt
        )
        node = run.nodes[0]
        if info.attempt > 1 and info.heartbeat_details:
            last = info.heartbeat_details[0]
            if isinstance(last, dict) and last.get("progress"):
                p = last["progress"]
                node.last_progress = Progress(
                    p.get("fraction"), p.get("done"), p.get("total"), p.get("message")
                )
            _log.info(
                "hook_retried",
                run_id=inp.run_id,
                resource=key_to_str(key),
                hook=inp.hook,
                attempt=info.attempt,
                last=last,
            )

        async def work() -> HookResult:
            resource = await self.parts.hook(run, view)
            ok = Hook(inp.hook) in resource.hooks_run
            ok = ok and resource.status is ResourceStatus.SUCCEEDED
            return HookResult(resource=compact(resource), ok=ok)

        return await _beating(
            work,
            lambda: {
                "resource": key_to_str(key),
                "progress": _progress_json(node.last_progress),
                "queue": self.queue,
            },
        )

    @activity.defn(name="karbor-compensate")
    async def compensate(self, inp: CompensateInput) -> dict[str, Any]:
        return await _beating(
            lambda: self.parts.compensate(inp.run_id, inp.token, inp.group),
            lambda: {"queue": self.queue},
        )

    @activity.defn(name="karbor-lease")
    async def lease(self, inp: LeaseInput) -> None:
        """Renew the run's lease (every third of it) for as long as the workflow runs."""

        async def work() -> None:
            while True:
                await _lease.renew(self.parts.store, inp.run_id, inp.token, inp.seconds)
                await anyio.sleep(inp.seconds / 3)

        await _beating(work, lambda: None)

    @activity.defn(name="karbor-finish")
    async def finish(self, inp: FinishInput) -> dict[str, Any]:
        async def work() -> dict[str, Any]:
            outcome = await self.parts.finish(
                inp.run_id,
                inp.token,
                inp.started_wall,
                inp.parts,
                inp.groups,
                inp.skipped,
                inp.abort,
                inp.notes,
            )
            return outcome.to_json()

        return await _beating(work, lambda: {"queue": self.queue})

    def all(self) -> list[Callable[..., Any]]:
        return [
            self.claim,
            self.start,
            self.prepare,
            self.hook,
            self.compensate,
            self.lease,
            self.finish,
        ]
