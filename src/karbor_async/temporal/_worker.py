"""A worker: the workflow and the activities, over this process's engine and store."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import attrs
from temporalio.client import Client
from temporalio.worker import Worker
from temporalio.worker.workflow_sandbox import SandboxedWorkflowRunner, SandboxRestrictions

from karbor_async._engine import Engine
from karbor_async._liveness import owner_name
from karbor_async._log import get_logger
from karbor_async._pg_store import PostgresStore
from karbor_async.exceptions import StoreError
from karbor_async.temporal._activities import Activities
from karbor_async.temporal._local import Parts
from karbor_async.temporal._workflow import RunWorkflow

__all__ = ["TASK_QUEUE", "WorkerInfo", "serve"]

TASK_QUEUE = "karbor"
_log = get_logger(__name__)


@attrs.frozen
class WorkerInfo:
    """A running worker: the shared queue it polls and its own."""

    task_queue: str
    own_queue: str


def _runner() -> SandboxedWorkflowRunner:
    # The workflow imports only the pure ordering core and the wire types of
    # karbor_async; passing the package through keeps the sandbox from importing the
    # whole engine again for every workflow run.
    return SandboxedWorkflowRunner(
        restrictions=SandboxRestrictions.default.with_passthrough_modules("karbor_async", "attrs")
    )


@asynccontextmanager
async def serve(
    engine: Engine,
    client: Client,
    *,
    task_queue: str = TASK_QUEUE,
    max_activities: int = 1000,
) -> AsyncIterator[WorkerInfo]:
    """Run a worker in this event loop for as long as the block lasts.

    ``engine`` (entered) runs the hooks, on its PostgreSQL store (every worker and the
    workflow share it). The worker polls ``task_queue`` (the workflow, the start, the
    claims, the copies) and a queue of its own, ``TASK_QUEUE@owner`` (a group's prepare,
    its compensation, and the hooks that must run where the group prepared).
    """
    store = engine.store
    if not isinstance(store, PostgresStore):
        raise StoreError(
            "a Temporal worker needs the PostgreSQL store (PostgresStore): workers on other "
            "hosts cannot share an SQLite file"
        )
    own = f"{task_queue}@{owner_name()}"
    acts = Activities(Parts(engine, store), own)
    shared = Worker(
        client,
        task_queue=task_queue,
        workflows=[RunWorkflow],
        activities=acts.all(),
        workflow_runner=_runner(),
        max_concurrent_activities=max_activities,
    )
    mine = Worker(
        client,
        task_queue=own,
        activities=[acts.prepare, acts.hook, acts.compensate],
        max_concurrent_activities=max_activities,
    )
    async with shared, mine:
        _log.info("temporal_worker_started", task_queue=task_queue, own_queue=own)
        yield WorkerInfo(task_queue, own)
