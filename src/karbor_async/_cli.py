"""The ``karbor-async`` command line."""

from __future__ import annotations

import importlib
import logging
import sys
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Annotated, Any

import anyio
import structlog
import typer
from rich.console import Console
from rich.table import Table

from karbor_async._engine import Engine
from karbor_async._fsbank import FsBank
from karbor_async._plan import Plan, Timeouts
from karbor_async._progress import follow_run, outcome_tables, phase_table
from karbor_async._sqlite import SqliteStore
from karbor_async._types import BarrierPolicy
from karbor_async.exceptions import KarborError, RunError
from karbor_async.store import RunOutcome, Store

__all__ = ["app", "main"]

app = typer.Typer(
    name="karbor-async",
    help="Application-consistent protection of resource graphs (Karbor's hooks on anyio).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_CANCELLED = 3


@app.callback()
def _configure(
    log_level: Annotated[
        str, typer.Option(help="Log level of the engine's structured logs (to stderr).")
    ] = "warning",
    log_json: Annotated[bool, typer.Option(help="Write logs as JSON lines.")] = False,
) -> None:
    """The CLI is an application, so it (not the library) configures structlog."""
    level = logging.getLevelNamesMapping().get(log_level.upper())
    if level is None:
        raise typer.BadParameter(
            f"unknown log level {log_level!r}; use debug, info, warning or error",
            param_hint="--log-level",
        )
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if log_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def _console() -> Console:
    return Console(highlight=False)


def _fail(console: Console, message: str, code: int = EXIT_BAD_INPUT) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


@app.command()
def plugins() -> None:
    """List the installed protection plugins and the resource types each handles."""
    console = _console()
    try:
        engine = Engine(discover=True)
    except KarborError as exc:
        raise _fail(console, str(exc)) from None
    table = Table(title="Protection plugins")
    for col in ("plugin", "resource type", "quiesces", "snapshots", "parameters"):
        table.add_column(col)
    for rtype, binding in sorted(engine.registry.types.items()):
        params = binding.spec.parameters
        table.add_row(
            binding.plugin.plugin_name(),
            rtype,
            "yes" if binding.spec.quiesces else "no",
            "yes" if binding.spec.snapshots else "no",
            "any" if params is None else ", ".join(sorted(params)) or "none",
        )
    console.print(table)
    finders = Table(title="Protectables (dependency discovery)")
    finders.add_column("finds")
    finders.add_column("under")
    seen: set[str] = set()
    for parent, found in sorted(engine.registry.protectables.items()):
        for f in found:
            finders.add_row(f.resource_type, parent)
            seen.add(f.resource_type)
    console.print(finders)


@app.command()
def demo(
    resources: Annotated[int, typer.Option(help="Size of the sample application.")] = 40,
    seed: Annotated[int, typer.Option(help="Seed of the generated application.")] = 7,
    db: Annotated[Path, typer.Option(help="SQLite checkpoint store.")] = Path("karbor.db"),
    bank: Annotated[Path, typer.Option(help="File-system bank directory.")] = Path("bank"),
    plain: Annotated[bool, typer.Option(help="Plain lines instead of a live view.")] = False,
) -> None:
    """Protect a generated sample application on the SIMULATED cloud, then restore it."""
    console = _console()
    if resources < 3:
        raise _fail(console, "--resources must be at least 3 (a project, a server, a volume)")
    live = console.is_terminal and not plain
    try:
        code = anyio.run(_demo, resources, seed, db, bank, console, live)
    except KarborError as exc:
        raise _fail(console, str(exc)) from None
    raise typer.Exit(code)


async def _demo(n: int, seed: int, db: Path, bank_dir: Path, console: Console, live: bool) -> int:
    try:
        sim: Any = importlib.import_module("karbor_simcloud")
    except ImportError:
        console.print(
            "[red]error:[/red] the reference plugins are not installed; "
            "run `make demo` (it installs ./plugins) or `pip install -e ./plugins`"
        )
        return EXIT_BAD_INPUT
    async with AsyncExitStack() as stack:
        store: Store = await stack.enter_async_context(SqliteStore.open(db))
        bank = FsBank(bank_dir)
        earlier = await store.list_checkpoints(limit=10)
        if earlier:
            table = Table(title=f"Checkpoints already in {db} (newest first)")
            for col in ("checkpoint", "plan", "status", "resources", "skew"):
                table.add_column(col)
            for cp in earlier:
                out = cp.outcome
                skew = f"{out.skew * 1000:.2f} ms" if out and out.skew is not None else "-"
                table.add_row(
                    cp.id,
                    cp.plan_name,
                    cp.status.value,
                    str(len(out.resources) if out else "-"),
                    skew,
                )
            console.print(table)
        cloud = sim.SimCloud.generate(n, seed=seed, latency=sim.LatencyProfile.realistic())
        console.print(f"[bold]SIMULATED cloud[/bold] (no real cloud is touched): {cloud.stats()}")
        engine = Engine(store=store, bank=bank, discover=True)
        with sim.use_cloud(cloud):
            plan = Plan(
                name="sample-app",
                resources=cloud.project_resources(),
                barrier=BarrierPolicy.CUT,
                timeouts=Timeouts(hook=60, quiesce_budget=5.0),
            )
            protect_run = await engine.build_protect(plan)
            console.print(
                f"Protecting {len(protect_run.nodes)} resources "
                f"(barrier: cut) as checkpoint {protect_run.checkpoint_id}"
            )
            protected = await _run(engine, protect_run, console, live)
            if protected is None:
                return EXIT_FAILED
            console.print(phase_table(await store.read_events(protected.run_id)))
            for table in outcome_tables(protected):
                console.print(table)
            restore_run = await engine.build_restore(protected.checkpoint_id)
            console.print(f"Restoring checkpoint {protected.checkpoint_id} into the simulation")
            restored = await _run(engine, restore_run, console, live)
            if restored is None:
                return EXIT_FAILED
            for table in outcome_tables(restored):
                console.print(table)
            console.print(
                f"Restored {len(restored.restored)} resources; the store is {db}, "
                f"the bank is {bank_dir}/. Run `make demo` again to see this checkpoint listed."
            )
    return EXIT_OK


async def _run(engine: Engine, run: Any, console: Console, live: bool) -> RunOutcome | None:
    try:
        outcome: RunOutcome = await follow_run(run, lambda: engine.execute(run), console, live=live)
    except RunError as exc:
        for table in outcome_tables(exc.outcome):
            console.print(table)
        console.print(
            f"[red]{exc.outcome.operation.value} {exc.outcome.status.value}:[/red] {exc.outcome.error}"
        )
        return None
    return outcome


def main() -> None:
    """Entry point of the ``karbor-async`` script."""
    try:
        app()
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        sys.exit(EXIT_CANCELLED)
