"""The command line's Temporal side: ``protect --backend temporal`` and ``worker``.

Imported only when one of them runs, so the CLI works without the Temporal SDK.
"""

from __future__ import annotations

import signal
import sys
from typing import Any

import anyio

from karbor_async import _cli as cli
from karbor_async._plan import Plan
from karbor_async.exceptions import RunError
from karbor_async.plugin import SecretResolver

__all__ = ["SQLITE_REFUSED", "protect", "require_shared_store", "worker"]

SQLITE_REFUSED = (
    "the Temporal backend needs the PostgreSQL store (--store postgresql://... or "
    "KARBOR_STORE): its workers, on other hosts, cannot share an SQLite file"
)


def require_shared_store(out: Any) -> None:
    if cli._STORE_URL.get("url") is None:
        cli._exit_with(out, SQLITE_REFUSED, cli.EXIT_BAD_INPUT)


def _sdk(out: Any) -> Any:
    try:
        import karbor_async.temporal as temporal
    except ImportError as exc:
        cli._exit_with(out, str(exc), cli.EXIT_BAD_INPUT)
    return temporal


async def _client(out: Any, address: str, namespace: str) -> Any:
    from temporalio.client import Client

    try:
        return await Client.connect(address, namespace=namespace)
    except RuntimeError as exc:
        raise cli.CliUsageError(
            f"cannot reach the Temporal server at {address} (namespace {namespace}): {exc}; "
            "start one (temporal server start-dev) or point --temporal (KARBOR_TEMPORAL) at it"
        ) from None


async def protect(
    out: Any, plan: Plan, address: str, namespace: str, task_queue: str, heartbeat: float
) -> int:
    """Start the protect on Temporal, wait for it, report it as a local protect does."""
    temporal = _sdk(out)
    client = await _client(out, address, namespace)
    options = temporal.Options(heartbeat_timeout=heartbeat, compensate_wait=heartbeat)
    backend = temporal.TemporalBackend(client, task_queue=task_queue, options=options)
    run_id = await backend.start_protect(plan)
    out.note(
        f"Protecting plan {plan.name!r} as checkpoint {run_id} on Temporal "
        f"(workflow {temporal.workflow_id(run_id)}, task queue {task_queue})"
    )
    outcome = await _wait(backend, run_id)
    code = cli._code_of(outcome)
    cli._report_outcome(out, outcome, code)
    if code == cli.EXIT_OK:
        out.note(f"checkpoint {outcome.checkpoint_id} is available")
    return code


async def _wait(backend: Any, run_id: str) -> Any:
    """The outcome; Ctrl-C (or SIGTERM) cancels the workflow, which thaws and records the
    run ``cancelled``, and the outcome is still waited for."""
    async with anyio.create_task_group() as tg:

        async def on_signal() -> None:
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _sig in signals:
                    print("cancelling the run (the workflow thaws what is frozen)", file=sys.stderr)
                    await backend.cancel(run_id)

        tg.start_soon(on_signal)
        try:
            return await backend.outcome(run_id)
        except RunError as exc:
            return exc.outcome
        finally:
            tg.cancel_scope.cancel()


async def worker(
    out: Any,
    db: Any,
    bank: Any,
    secrets: SecretResolver,
    cloud: Any,
    address: str,
    namespace: str,
    task_queue: str,
    max_activities: int,
) -> int:
    """Serve the workflow and its activities until SIGINT or SIGTERM."""
    temporal = _sdk(out)
    client = await _client(out, address, namespace)
    async with cli._session(out, db, bank, secrets=secrets, cloud=cloud) as engine:
        async with temporal.serve(
            engine, client, task_queue=task_queue, max_activities=max_activities
        ) as info:
            print(f"worker ready on {info.task_queue} (own queue {info.own_queue})", flush=True)
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _sig in signals:
                    break
    return cli.EXIT_OK
