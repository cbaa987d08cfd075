"""Starting, following and cancelling runs that Temporal drives (the application's side)."""

from __future__ import annotations

from typing import Any

from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.exceptions import ActivityError, ApplicationError

from karbor_async import exceptions as _exc
from karbor_async._engine import new_run_id
from karbor_async._plan import Plan
from karbor_async._types import RunStatus
from karbor_async.exceptions import KarborError, RunCancelledError, RunError
from karbor_async.store import RunOutcome
from karbor_async.temporal._wire import WORKFLOW_NAME, Options, StartInput
from karbor_async.temporal._worker import TASK_QUEUE

__all__ = ["TemporalBackend", "workflow_id"]

_SIMPLE = ("PlanError", "GraphError", "PluginError", "SecretError", "StoreError", "LeaseLostError")
"""Refusals raised again under their own class (one message argument)."""


def workflow_id(run_id: str) -> str:
    """The workflow that drives run ``run_id``."""
    return f"karbor-{run_id}"


def _refusal(exc: WorkflowFailureError) -> KarborError:
    cause: BaseException | None = exc.cause
    while isinstance(cause, ActivityError) and cause.cause is not None:
        cause = cause.cause
    if isinstance(cause, ApplicationError):
        name = cause.type or ""
        cls = getattr(_exc, name, None) if name in _SIMPLE else None
        if name == "LeaseLost":
            cls = _exc.LeaseLostError
        if cls is not None:
            return cls(cause.message)  # type: ignore[no-any-return]
        return KarborError(f"{name}: {cause.message}" if name else cause.message)
    return KarborError(f"the Temporal workflow failed: {exc.cause or exc}")


class TemporalBackend:
    """Runs plans on Temporal: a workflow per run, its hooks on the workers.

    ``client``: a connected :class:`temporalio.client.Client`; ``task_queue``: the
    queue the workers poll (``karbor-async worker --task-queue``). The workers share
    the PostgreSQL store the run is recorded in: read its checkpoints and events there.
    """

    def __init__(
        self, client: Client, *, task_queue: str = TASK_QUEUE, options: Options | None = None
    ) -> None:
        self.client = client
        self.task_queue = task_queue
        self.options = options or Options()

    @classmethod
    async def connect(
        cls,
        address: str,
        *,
        namespace: str = "default",
        task_queue: str = TASK_QUEUE,
        options: Options | None = None,
    ) -> TemporalBackend:
        client = await Client.connect(address, namespace=namespace)
        return cls(client, task_queue=task_queue, options=options)

    async def start_protect(self, plan: Plan, *, run_id: str | None = None) -> str:
        """Start a protect of ``plan``; returns its run id (also its checkpoint's id).

        The workflow's input is the plan as stored with a checkpoint: secret parameters
        hold references, which each worker resolves with its own resolver."""
        run_id = run_id or new_run_id()
        wid = workflow_id(run_id)
        await self.client.start_workflow(
            WORKFLOW_NAME,
            StartInput(run_id=run_id, workflow_id=wid, plan=plan.to_json(), options=self.options),
            id=wid,
            task_queue=self.task_queue,
        )
        return run_id

    def handle(self, run_id: str) -> WorkflowHandle[Any, Any]:
        return self.client.get_workflow_handle(workflow_id(run_id))

    async def outcome(self, run_id: str) -> RunOutcome:
        """Wait for the run to end; its outcome, or RunError as :meth:`Engine.execute`."""
        try:
            data = await self.handle(run_id).result()
        except WorkflowFailureError as exc:
            raise _refusal(exc) from None
        outcome = RunOutcome.from_json(data)
        if outcome.status is RunStatus.SUCCEEDED:
            return outcome
        word = "was cancelled" if outcome.status is RunStatus.CANCELLED else "failed"
        errors: list[Exception] = [
            RunCancelledError(f"{r.resource}: {r.error}")
            for r in outcome.resources.values()
            if r.error
        ] or [RunCancelledError(outcome.error or word)]
        raise RunError(f"protect run {run_id} {word}: {outcome.error}", errors, outcome)

    async def protect(self, plan: Plan) -> RunOutcome:
        """Protect ``plan`` on Temporal and wait for the outcome (RunError if it fails)."""
        return await self.outcome(await self.start_protect(plan))

    async def cancel(self, run_id: str) -> None:
        """Cancel the run: what is frozen is thawed, the run ends ``cancelled``."""
        await self.handle(run_id).cancel()
