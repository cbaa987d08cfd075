"""The command line's Temporal side: ``protect --backend temporal`` and ``worker``.

Imported only when one of them runs, so the CLI works without the Temporal SDK.
What it needs of ``_cli`` (the session, the outcome report, the usage error) comes
in a :class:`Cli` argument: this module does not import ``_cli``, which imports it.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from typing import Any

import anyio
import attrs

from karbor_async._plan import Plan
from karbor_async.exceptions import RunError
from karbor_async.plugin import SecretResolver

__all__ = ["Cli", "protect", "worker"]


@attrs.frozen
class Cli:
    """What the commands use of the command line's own module."""

    session: Callable[..., AbstractAsyncContextManager[Any]]
    report: Callable[[Any, Any, int], None]
    code_of: Callable[[Any], int]
    usage_error: type[Exception]
    ok: int


def _sdk() -> Any:
    import karbor_async.temporal as temporal  # (ImportError says to install the extra)

    return temporal


async def _client(cli: Cli, address: str, namespace: str) -> Any:
    from temporalio.client import Client

    try:
        return await Client.connect(address, namespace=namespace)
    except RuntimeError as exc:
        raise cli.usage_error(
            f"cannot reach the Temporal server at {address} (namespace {namespace}): {exc}; "
            "start one (temporal server start-dev) or point --temporal (KARBOR_TEMPORAL) at it"
        ) from None


async def protect(
    cli: Cli,
    out: Any,
    plan: Plan,
    address: str,
    namespace: str,
    task_queue: str,
    heartbeat: float,
) -> int:
    """Start the protect on Temporal, wait for it, report it as a local protect does."""
    temporal = _sdk()
    client = await _client(cli, address, namespace)
    options = temporal.Options(heartbeat_timeout=heartbeat, compensate_wait=heartbeat)
    backend = temporal.TemporalBackend(client, task_queue=task_queue, options=options)
    run_id = await backend.start_protect(plan)
    out.note(
        f"Protecting plan {plan.name!r} as checkpoint {run_id} on Temporal "
        f"(workflow {temporal.workflow_id(run_id)}, task queue {task_queue})"
    )
    outcome = await _wait(backend, run_id)
    code = cli.code_of(outcome)
    cli.report(out, outcome, code)
    if code == cli.ok:
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
    cli: Cli,
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
    temporal = _sdk()
    client = await _client(cli, address, namespace)
    async with AsyncExitStack() as stack:
        engine = await stack.enter_async_context(
            cli.session(out, db, bank, secrets=secrets, cloud=cloud)
        )
        info = await stack.enter_async_context(
            temporal.serve(engine, client, task_queue=task_queue, max_activities=max_activities)
        )
        print(f"worker ready on {info.task_queue} (own queue {info.own_queue})", flush=True)
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _sig in signals:
                break
    return cli.ok
