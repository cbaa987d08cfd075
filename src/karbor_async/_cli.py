"""The ``karbor-async`` command line (``docs/cli.md`` is its manual).

Every command opens the embedded defaults (a SQLite store, ``--db``, and a
file-system bank, ``--bank``) on asyncio, the only backend the SQLite store
supports. Commands that run hooks (protect, restore, delete, prune, recover)
show live progress and cancel cleanly on Ctrl-C; the others only read the store.
A user's mistake (a bad plan file, an unknown id, an unusable store file) ends in
one message and exit code 2, never a traceback.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import anyio
import attrs
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer._click import exceptions as click  # typer's own click (vendored since 0.26)
from typer.core import TyperGroup

from karbor_async._cli_output import (
    cancel_summary,
    explain_consistency,
    failure_line,
    frozen_when_cancelled,
    ledger_verdict,
    resource_name,
)
from karbor_async._engine import Engine
from karbor_async._fsbank import FsBank
from karbor_async._log import configure as configure_logging
from karbor_async._pg_schema import scrub_dsn
from karbor_async._pg_store import PostgresStore
from karbor_async._plan import ConsistencyGroup, Plan, Timeouts
from karbor_async._planfile import PlanFileError, load_plan_file
from karbor_async._progress import Display, Notices, follow_run, outcome_tables, phase_table
from karbor_async._report import write_report
from karbor_async._scheduler import Run
from karbor_async._secrets_cli import CliSecrets
from karbor_async._sqlite import SqliteStore
from karbor_async._sqlite_file import remove_store_files
from karbor_async._tasks import AbandonedHook, what_runs
from karbor_async._types import BarrierPolicy, OperationKind, ResourceStatus, RunStatus
from karbor_async.events import Event, EventKind
from karbor_async.exceptions import (
    BankKeyError,
    CheckpointBusyError,
    CheckpointNotFoundError,
    GraphError,
    IllegalTransitionError,
    KarborError,
    LeaseHeldError,
    PlanError,
    PluginError,
    ResourceBusyError,
    RunError,
    SecretError,
    StoreBusyError,
    StoreFileError,
)
from karbor_async.plugin import Param, SecretResolver
from karbor_async.store import CheckpointRecord, CheckpointStatus, RunOutcome, RunRecord

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_CANCELLED",
    "EXIT_FAILED",
    "EXIT_OK",
    "EXIT_BUSY",
    "app",
    "main",
]

EXIT_OK = 0
"""The command did what was asked."""
EXIT_FAILED = 1
"""A run failed (its checkpoint or run record says why), or a prune/recover step failed."""
EXIT_BAD_INPUT = 2
"""Bad input: plan file, options, unknown id, secrets, or a store file that cannot be used."""
EXIT_CANCELLED = 3
"""Cancelled (Ctrl-C): the run was stopped and everything it froze was thawed."""
EXIT_BUSY = 4
"""Busy: a run is held by a live engine (or the store stayed locked); retry after."""

_EPILOG = (
    "Exit codes: 0 success; 1 a run failed; 2 bad input (plan file, options, unknown id, "
    "secrets, unusable store file); 3 cancelled by Ctrl-C (everything frozen was thawed); "
    "4 busy (a run held by a live engine: retry after). Manual: docs/cli.md."
)


class _Commands(TyperGroup):
    """The root command: a mistake on the command line (a bad option value, an unknown
    option, a missing argument) is one ``error: ...`` line and exit 2, as every other
    user mistake, not Click's usage block (docs/cli.md, "Exit codes")."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        def run() -> Any:
            return super(_Commands, self).main(
                args, prog_name, complete_var, False, windows_expand_args, **extra
            )

        if not standalone_mode:
            return run()
        argv = list(args if args is not None else sys.argv[1:])
        try:
            code = run()
        except click.NoArgsIsHelpError as exc:
            exc.show()
            sys.exit(EXIT_BAD_INPUT)
        except click.UsageError as exc:
            _usage_error(exc, as_json="--json" in argv)
        except click.ClickException as exc:
            Console(stderr=True, highlight=False).print(
                f"[red]error:[/red] {escape(exc.format_message())}"
            )
            sys.exit(exc.exit_code)
        except typer.Abort:
            Console(stderr=True).print("interrupted")
            sys.exit(EXIT_CANCELLED)
        sys.exit(code if isinstance(code, int) else EXIT_OK)


def _usage_error(exc: Any, *, as_json: bool) -> NoReturn:
    message = exc.format_message().strip().replace("\n", " ")
    if message.endswith("."):
        message = message[:-1]
    path = exc.ctx.command_path if exc.ctx is not None else "karbor-async"
    message = f"{message} (see `{path} --help`)"
    Console(stderr=True, highlight=False, soft_wrap=True).print(
        f"[red]error:[/red] {escape(message)}"
    )
    if as_json:
        sys.stdout.write(json.dumps({"error": message, "exit_code": EXIT_BAD_INPUT}) + "\n")
    sys.exit(EXIT_BAD_INPUT)


app = typer.Typer(
    name="karbor-async",
    cls=_Commands,
    help="Application-consistent protection of resource graphs (Karbor's hooks on anyio).",
    epilog=_EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
checkpoints_app = typer.Typer(
    help="List, show and prune checkpoints.", no_args_is_help=True, epilog=_EPILOG
)
runs_app = typer.Typer(
    help="List and show protect, restore and delete runs.", no_args_is_help=True, epilog=_EPILOG
)
simcloud_app = typer.Typer(
    help="Show the SIMULATED cloud's shared state; store fault rules in it.",
    no_args_is_help=True,
    epilog=_EPILOG,
)
fault_app = typer.Typer(
    help="Fault rules stored in the SIMULATED cloud's state (every process obeys them).",
    no_args_is_help=True,
    epilog=_EPILOG,
)
app.add_typer(checkpoints_app, name="checkpoints")
app.add_typer(runs_app, name="runs")
app.add_typer(simcloud_app, name="simcloud")
simcloud_app.add_typer(fault_app, name="fault")

T = TypeVar("T")

# -- options shared by commands ---------------------------------------------------------

DbOption = Annotated[
    Path, typer.Option("--db", envvar="KARBOR_DB", help="SQLite checkpoint store file.")
]
BankOption = Annotated[
    Path, typer.Option("--bank", envvar="KARBOR_BANK", help="File-system bank directory.")
]
JsonOption = Annotated[
    bool,
    typer.Option("--json", help="Machine-readable output on stdout (see docs/cli.md)."),
]
PlainOption = Annotated[
    bool, typer.Option("--plain", help="Plain progress lines even on a terminal.")
]
SimcloudOption = Annotated[
    str | None,
    typer.Option(
        "--simcloud",
        envvar="KARBOR_SIMCLOUD",
        metavar="N[:SEED[:LATENCY]]",
        help=(
            "Bind a SIMULATED cloud of N resources (karbor_simcloud plugins): for demos and "
            "tests; LATENCY is realistic (default), zero or slow. Its project is prj-0000001. "
            "Its state (frozen servers, snapshots, restored resources) is shared by every "
            "process through --simcloud-state, created there if absent."
        ),
    ),
]
SimcloudStateOption = Annotated[
    Path | None,
    typer.Option(
        "--simcloud-state",
        envvar="KARBOR_SIMCLOUD_STATE",
        metavar="DIR",
        help="Directory of the SIMULATED cloud's shared state (default: simcloud/ beside --db).",
    ),
]
SimcloudFaultOption = Annotated[
    list[str] | None,
    typer.Option(
        "--simcloud-fault",
        metavar="OPERATION:HOOK:TYPE[#ID]:raise|hang[:PROBABILITY]",
        help=(
            "Inject a fault into the SIMULATED plugins' hooks for this process (repeatable; "
            "* for any operation, hook or type), e.g. protect:on_main:OS::Cinder::Volume:raise."
        ),
    ),
]
SecretsOption = Annotated[
    Path | None,
    typer.Option(
        "--secrets-file",
        envvar="KARBOR_SECRETS_FILE",
        help="Private file of secret values (mode 600; TOML or NAME=value lines).",
    ),
]

BackendOption = Annotated[
    str,
    typer.Option(
        "--backend",
        envvar="KARBOR_BACKEND",
        help=(
            "local (this process runs the hooks) or temporal (a Temporal workflow drives "
            "the run and `karbor-async worker` processes run the hooks; needs --store "
            "postgresql://...). See docs/temporal.md."
        ),
    ),
]
TemporalOption = Annotated[
    str,
    typer.Option("--temporal", envvar="KARBOR_TEMPORAL", help="The Temporal server (HOST:PORT)."),
]
NamespaceOption = Annotated[
    str,
    typer.Option("--namespace", envvar="KARBOR_TEMPORAL_NAMESPACE", help="Temporal namespace."),
]
TaskQueueOption = Annotated[
    str,
    typer.Option(
        "--task-queue", envvar="KARBOR_TASK_QUEUE", help="The Temporal task queue of the workers."
    ),
]
DEFAULT_TEMPORAL = "127.0.0.1:7233"

DEFAULT_DB = Path("karbor.db")
_SETTINGS: dict[str, float] = {"lease_seconds": 30.0}
"""Global options that reach the store (set by the app's callback)."""
_STORE_URL: dict[str, str | None] = {"url": None, "password_secret": None}
"""``--store``: the PostgreSQL store's URL, when one was chosen over ``--db``, and the
name of the secret holding its password (``--store-password-secret``)."""
STORE_PASSWORD_SECRET = "store-password"
"""The secret the CLI asks its resolver for a PostgreSQL store's password when
``--store-password-secret`` names none (``KARBOR_SECRET_STORE_PASSWORD``, or
``store-password`` in the secrets file); absent, libpq's ``PGPASSFILE``/``PGPASSWORD``."""
DEFAULT_BANK = Path("bank")


class CliUsageError(KarborError):
    """The command line itself is wrong (an option, a missing store file)."""


_BAD_INPUT: tuple[type[BaseException], ...] = (
    PlanError,
    GraphError,
    PluginError,
    SecretError,
    StoreFileError,
    CheckpointNotFoundError,
    IllegalTransitionError,
    BankKeyError,
    CliUsageError,
)


@attrs.frozen
class _Out:
    """Where a command writes: results on stdout, notices and errors on stderr."""

    console: Console
    err: Console
    json: bool
    display: Display
    notices: Notices
    frozen_at_cancel: dict[str, int] = attrs.Factory(dict)
    """Per run id: how many resources were frozen when Ctrl-C cancelled it."""

    def note(self, message: str) -> None:
        """A human notice: on stdout normally, on stderr under ``--json`` (stdout stays JSON)."""
        (self.err if self.json else self.console).print(message)

    def emit(self, document: Mapping[str, Any]) -> None:
        """One JSON document on a line of its own."""
        sys.stdout.write(json.dumps(document, default=str, sort_keys=True) + "\n")
        sys.stdout.flush()


def _consoles() -> tuple[Console, Console]:
    def width(stream: Any) -> int | None:
        # Pipes and logs get wide lines rather than rich's 80-column default.
        return None if stream.isatty() or os.environ.get("COLUMNS") else 120

    return (
        Console(highlight=False, width=width(sys.stdout)),
        Console(stderr=True, highlight=False, width=width(sys.stderr)),
    )


def _out(as_json: bool = False, plain: bool = False) -> _Out:
    console, err = _consoles()
    if as_json:
        display = Display.QUIET
    elif console.is_terminal and not plain:
        display = Display.LIVE
    else:
        display = Display.PLAIN
    return _Out(console, err, as_json, display, Notices(err))


def _unwrap(exc: BaseException) -> BaseException:
    """The one error inside task-group wrappers (a RunError is itself a group: keep it)."""
    while (
        isinstance(exc, BaseExceptionGroup)
        and not isinstance(exc, RunError)
        and len(exc.exceptions) == 1
    ):
        exc = exc.exceptions[0]
    return exc


def _exit_with(out: _Out, message: str, code: int) -> NoReturn:
    out.err.print(f"[red]error:[/red] {escape(message)}")
    if out.json:
        out.emit({"error": message, "exit_code": code})
    raise typer.Exit(code)


def _exit_with_all(out: _Out, messages: Sequence[str], code: int) -> NoReturn:
    """Several mistakes (a plan file's): an ``error:`` line each."""
    for message in messages:
        out.err.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    if out.json:
        out.emit({"error": "\n".join(messages), "errors": list(messages), "exit_code": code})
    raise typer.Exit(code)


def _guard(out: _Out, action: Callable[[], T]) -> T:
    """Run ``action``; turn a user's mistake into a message and its exit code."""
    try:
        return action()
    except KeyboardInterrupt:
        out.err.print("interrupted (nothing was left running)")
        raise typer.Exit(EXIT_CANCELLED) from None
    except Exception as raised:
        exc = _unwrap(raised)
        if isinstance(exc, CheckpointNotFoundError):
            _exit_with(out, _not_found(str(exc)), EXIT_BAD_INPUT)
        if isinstance(exc, PlanFileError) and len(exc.problems) > 1:
            _exit_with_all(out, exc.problems, EXIT_BAD_INPUT)
        if isinstance(exc, _BAD_INPUT):
            _exit_with(out, str(exc), EXIT_BAD_INPUT)
        if isinstance(exc, sqlite3.Error):
            _exit_with(out, f"the checkpoint store cannot be used: {exc}", EXIT_BAD_INPUT)
        if isinstance(exc, OSError):
            where = f" ({exc.filename})" if exc.filename else ""
            _exit_with(out, f"{exc.strerror or exc}{where}", EXIT_BAD_INPUT)
        if isinstance(
            exc, ResourceBusyError | LeaseHeldError | CheckpointBusyError | StoreBusyError
        ):
            _exit_with(out, str(exc), EXIT_BUSY)
        if isinstance(exc, KarborError):
            _exit_with(out, str(exc), EXIT_FAILED)
        raise


def _not_found(message: str) -> str:
    """Where to find the ids that exist."""
    if message.startswith("no run with id"):
        return (
            f"{message}: `karbor-async runs list` shows the runs (a checkpoint's id is also "
            "its protect run's id)"
        )
    if message.startswith("no checkpoint with id"):
        return f"{message}: `karbor-async checkpoints list` shows the checkpoints"
    return message


def _run_async(out: _Out, func: Callable[..., Awaitable[int]], *args: Any) -> NoReturn:
    """Run a command's coroutine on asyncio (the SQLite store needs it) and exit with its code."""
    code = _guard(out, lambda: anyio.run(func, *args, backend="asyncio"))
    raise typer.Exit(code)


# -- the simulated cloud ---------------------------------------------------------------


@attrs.frozen
class SimcloudSpec:
    """``--simcloud N[:SEED[:LATENCY]]``."""

    resources: int
    seed: int = 7
    latency: str = "realistic"

    @classmethod
    def parse(cls, text: str) -> SimcloudSpec:
        parts = text.split(":")
        usage = CliUsageError(
            f"--simcloud {text!r}: expected N[:SEED[:LATENCY]], e.g. 40:7 or 40:7:slow"
        )
        if not 1 <= len(parts) <= 3:
            raise usage
        try:
            n = int(parts[0])
            seed = int(parts[1]) if len(parts) > 1 and parts[1] else 7
        except ValueError:
            raise usage from None
        latency = parts[2] if len(parts) > 2 else "realistic"
        if n < 3:
            raise CliUsageError(
                "--simcloud needs at least 3 resources (a project, a server, a disk)"
            )
        if latency not in ("realistic", "zero", "slow"):
            raise CliUsageError(f"--simcloud latency {latency!r}: expected realistic, zero or slow")
        return cls(n, seed, latency)


def _simcloud_module() -> Any:
    return _plugin_module("karbor_simcloud", "the SIMULATED cloud plugins", "simcloud")


def _plugin_module(name: str, what: str, folder: str) -> Any:
    """Import one of the packages under plugins/, or say how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError:
        raise CliUsageError(
            f"{what} ({name}) cannot be imported: run `make demo` (it installs every package "
            f"under plugins/) or `pip install -e ./plugins/{folder}`"
        ) from None


def _latency_profiles(sim: Any) -> dict[str, Any]:
    return {
        # A real cloud's pace (LatencyProfile.realistic() is it sped up for benchmarks):
        # a 40-resource protect lasts a few seconds, long enough to watch.
        "realistic": sim.LatencyProfile.real_time(),
        "zero": sim.LatencyProfile.zero(),
        # Long enough to interrupt by hand: servers stay frozen while the cuts are taken.
        "slow": sim.LatencyProfile(
            quiesce=sim.Latency.fixed(0.2),
            thaw=sim.Latency.fixed(0.02),
            snapshot=sim.Latency.fixed(1.5),
            snapshot_return=sim.Latency.fixed(0.01),
            copy_chunk=sim.Latency.fixed(0.2),
            create=sim.Latency.fixed(0.05),
        ),
    }


def _generate_cloud(spec: SimcloudSpec | None, out: _Out, state: Path | None) -> Any:
    """The cloud of ``spec``: in this process (``state`` None: the demo), or in the shared
    state directory, created there if absent (``spec`` None: an existing one)."""
    sim = _simcloud_module()
    profiles = _latency_profiles(sim)
    if state is None:
        assert spec is not None
        cloud = sim.SimCloud.generate(
            spec.resources, seed=spec.seed, latency=profiles[spec.latency]
        )
        where = ""
    else:
        if spec is None:
            spec = _stored_spec(sim, state)
        try:
            cloud, created = sim.SimCloud.shared(
                state,
                spec.resources,
                spec.seed,
                latency=profiles[spec.latency],
                latency_name=spec.latency,
            )
        except sim.SharedStateError as exc:
            raise CliUsageError(str(exc)) from None
        for text in cloud.state.fault_rules():
            cloud.faults.add(sim.FaultRule.parse(text))
        where = f", state {state} ({'created' if created else 'shared'})"
    project = cloud.project_resources()[0]
    out.err.print(
        f"[bold]SIMULATED cloud[/bold] (no real cloud is touched): {spec.resources} resources, "
        f"seed {spec.seed}, latency {spec.latency}, project {project.id}{escape(where)}"
    )
    return cloud


def _stored_spec(sim: Any, state: Path) -> SimcloudSpec:
    """What application an existing state directory holds (``--simcloud-state`` alone)."""
    try:
        shared, _created = sim.SharedState.open(state)
    except sim.SharedStateError as exc:
        raise CliUsageError(str(exc)) from None
    try:
        meta = shared.meta
    finally:
        shared.close()
    return SimcloudSpec(int(meta["resources"]), int(meta["seed"]), meta.get("latency", "zero"))


def _needs_simcloud(engine: Engine, types: Sequence[str]) -> list[str]:
    """The resource types handled by the simulated cloud's plugins."""
    found = []
    for rtype in sorted(set(types)):
        binding = engine.registry.binding(rtype)
        if binding is not None and type(binding.plugin).__module__.startswith("karbor_simcloud"):
            found.append(rtype)
    return found


def _check_sim_params(plan: Plan, cloud: Any) -> None:
    """A plan's ``sim_faults`` parse before anything runs (their syntax named if not)."""
    if cloud is None:
        return
    sim = _simcloud_module()
    for key, values in plan.parameters.items():
        if "sim_faults" in values:
            try:
                sim.plan_faults(key.partition("#")[0], values["sim_faults"])
            except (TypeError, ValueError) as exc:
                raise CliUsageError(f"plan {plan.name!r} parameters of {key}: {exc}") from None


def _check_cloud(engine: Engine, types: Sequence[str], cloud: Any) -> None:
    simulated = _needs_simcloud(engine, types)
    if simulated and cloud is None:
        raise CliUsageError(
            f"the resource types {', '.join(simulated)} are handled by the SIMULATED cloud plugins "
            "(karbor_simcloud), which act on a SIMULATED cloud: pass --simcloud N[:SEED] "
            "(or set KARBOR_SIMCLOUD), or --simcloud-state DIR of an existing one"
        )


# -- sessions: store, bank, engine ---------------------------------------------------------


@asynccontextmanager
async def _store(
    db: Path, *, must_exist: bool, read_only: bool = False, secrets: CliSecrets | None = None
) -> AsyncIterator[SqliteStore | PostgresStore]:
    """The command's store; one this command created and left with no run in it (a plan
    rejected before anything ran, a failure while creating it) is removed again.
    ``read_only``: a command that only reads, which never writes the file (it works on
    read-only media). With ``--store postgresql://...`` the PostgreSQL store instead
    (``--db`` is then not used), opened read-only by commands that only read; its
    password comes from ``secrets`` (:func:`_store_password`)."""
    url = _STORE_URL.get("url")
    if url is not None:
        password = await _store_password(secrets)
        async with PostgresStore.open(
            url, password=password, lease_seconds=_SETTINGS["lease_seconds"], read_only=read_only
        ) as pg:
            yield pg
        return
    path = anyio.Path(db)
    exists = await path.exists()
    if must_exist and not exists:
        raise CliUsageError(
            f"no checkpoint store at {db}: protect something first, or point --db "
            "(or KARBOR_DB) at an existing store"
        )
    _check_store_dir(db)
    if must_exist and (await path.stat()).st_size == 0:
        raise CliUsageError(
            f"{db} is an empty file, not a checkpoint store (left untouched): a command that "
            "writes (protect) makes it one, or point --db at an existing store"
        )
    if read_only:
        try:
            async with SqliteStore.open(db, read_only=True) as store:
                yield store
        except sqlite3.Error as exc:
            raise StoreFileError(_store_advice(db, exc, False)) from None
        return
    created = not exists
    ran = opened = False
    try:
        async with SqliteStore.open(db, lease_seconds=_SETTINGS["lease_seconds"]) as store:
            opened = True
            try:
                yield store
            finally:
                if created:
                    with anyio.CancelScope(shield=True):
                        ran = bool(await store.list_runs(limit=1))
    except sqlite3.Error as exc:
        if opened:
            raise
        raise StoreFileError(_store_advice(db, exc, created)) from None
    finally:
        if created and not ran:
            await remove_store_files(db)


async def _store_password(secrets: CliSecrets | None) -> str | None:
    """The PostgreSQL store's password from the CLI's secret resolver: the secret that
    ``--store-password-secret`` names (it must exist), else ``store-password`` if the
    resolver has it, else None (libpq's ``PGPASSFILE`` or ``PGPASSWORD``). Commands
    without ``--secrets-file`` use ``KARBOR_SECRETS_FILE``."""
    if secrets is None:
        file = os.environ.get("KARBOR_SECRETS_FILE")
        secrets = CliSecrets.from_options(Path(file) if file else None)
    name = _STORE_URL.get("password_secret")
    if name is not None:
        try:
            return await secrets(name)
        except SecretError as exc:
            raise SecretError(f"--store-password-secret {name}: {exc}") from None
    try:
        return await secrets(STORE_PASSWORD_SECRET)
    except SecretError:
        return None


def _store_advice(db: Path, exc: sqlite3.Error, created: bool) -> str:
    """What SQLite's refusal to open or create ``db`` means, and what to do."""
    text = str(exc)
    if "full" in text:
        fix = f"free space on the file system of {db.parent}, or point --db elsewhere"
    elif "unable to open" in text or "readonly" in text or "read-only" in text:
        fix = f"check that {db.parent} is writable by this user, or point --db elsewhere"
    else:
        fix = "point --db at another file"
    what = "created" if created else "opened"
    left = " (nothing was left behind)" if created else ""
    return f"the checkpoint store {db} cannot be {what}: {text}; {fix}{left}"


def _check_store_dir(db: Path) -> None:
    parent = db.parent
    if not parent.is_dir():
        raise CliUsageError(
            f"the directory {parent} of the checkpoint store {db} does not exist: create it "
            f"(mkdir -p {parent}) or point --db (or KARBOR_DB) elsewhere"
        )


@asynccontextmanager
async def _session(
    out: _Out,
    db: Path,
    bank: Path,
    *,
    secrets: SecretResolver | None = None,
    cloud: Any = None,
    must_exist: bool = False,
) -> AsyncIterator[Engine]:
    """Open the store and bank, bind the simulated cloud if any, and enter the engine.

    Leaving it, hooks the engine abandoned are cancelled and waited for up to the
    engine's ``close_timeout``; a command does not wait longer: it commits the
    store, names what it leaves running and exits 1 (the process ending is what
    stops a hook that swallows its cancellation).
    """
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(
            _store(
                db,
                must_exist=must_exist,
                secrets=secrets if isinstance(secrets, CliSecrets) else None,
            )
        )
        if cloud is not None:
            stack.enter_context(_simcloud_module().use_cloud(cloud))
        engine = Engine(store=store, bank=FsBank(bank), secrets=secrets, discover=True)
        async with engine:
            try:
                yield engine
            finally:
                with anyio.CancelScope(shield=True):
                    left = await engine.drain(_CLOSE_TIMEOUT)
                    if left:
                        await _exit_leaving(out, store, left)


_CLOSE_TIMEOUT = 10.0
"""How long a command waits, at its end, for abandoned hooks that it cancelled."""


async def _exit_leaving(
    out: _Out, store: SqliteStore | PostgresStore, left: Sequence[AbandonedHook]
) -> NoReturn:
    """Hooks ignore their cancellation: commit, say what is left running, exit 1 now."""
    try:
        await store.commit()
    except Exception as exc:  # the process ends anyway: say so, then end it
        out.err.print(f"[red]error:[/red] the store could not be committed: {escape(str(exc))}")
    names = "; ".join(a.describe() for a in left)
    message = (
        f"{len(left)} abandoned hooks still run after being cancelled for "
        f"{_CLOSE_TIMEOUT:g} s: {names}. Exiting with them running (a plugin bug: they "
        "swallow cancellation); check what they act on"
    )
    out.err.print(f"[red]error:[/red] {escape(message)}")
    if out.json:
        out.emit({"error": message, "exit_code": EXIT_FAILED, "left_running": names})
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_FAILED)


async def _recover_first(out: _Out, engine: Engine) -> None:
    """Finish or clean up what an earlier process left, when this engine knows how;
    name the runs live engines hold, and go on."""
    report = await engine.recover_report()
    for outcome in report.outcomes:
        out.note(
            f"recovered {outcome.operation.value} run {outcome.run_id} left unfinished "
            f"by an earlier process: {outcome.status.value}"
        )
    for held in report.held:
        out.note(f"left to its engine: {_held_line(held)}")


def _held_json(held: Any) -> dict[str, Any]:
    """A held run in ``recover --json``: ``driver`` is ``temporal`` for a run a Temporal
    workflow drives (never recovered here), else ``engine``."""
    driver = "temporal" if str(held.owner).startswith("temporal:") else "engine"
    return {**held.to_json(), "driver": driver}


def _held_line(held: Any) -> str:
    if str(held.owner).startswith("temporal:"):
        return (
            f"{held.operation.value} run {held.run_id} is driven by temporal (workflow "
            f"{str(held.owner).removeprefix('temporal:')}); recovery leaves it to its workflow"
        )
    until = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(held.expires))
    return (
        f"{held.operation.value} run {held.run_id} is held by {held.owner} (lease until "
        f"{until}, renewed while it lives)"
    )


def _watch_interrupts(out: _Out, run: Run) -> Callable[[], Coroutine[Any, Any, None]] | None:
    """A task that turns Ctrl-C into :meth:`Run.cancel` (signals reach the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    async def watch() -> None:
        with anyio.open_signal_receiver(signal.SIGINT) as signals:
            count = 0
            async for _ in signals:
                count += 1
                if count == 1:
                    frozen = run.statistics(limit=0).frozen
                    out.frozen_at_cancel[run.run_id] = frozen
                    out.notices.say(
                        f"[yellow]Ctrl-C: cancelling {run.operation.value} run {run.run_id}; "
                        + (
                            f"thawing the {frozen} frozen resources"
                            if frozen
                            else "nothing is frozen"
                        )
                        + " (Ctrl-C again to stop waiting)...[/yellow]"
                    )
                    run.cancel()
                elif count == 2:
                    out.notices.say(
                        "[yellow]Ctrl-C again: abandoning every hook still running; "
                        "thaws not finished are recorded thaw_failed[/yellow]"
                    )
                    run.abandon()

    return watch


async def _drive(out: _Out, engine: Engine, run: Run) -> tuple[RunOutcome, int]:
    """Execute ``run`` with progress and Ctrl-C handling; return its outcome and exit code."""
    watcher = _watch_interrupts(out, run)
    try:
        outcome = await follow_run(
            run,
            lambda: engine.execute(run),
            out.console,
            display=out.display,
            beside=watcher,
            notices=out.notices,
            events=lambda: engine.subscribe(run.run_id),
        )
    except RunError as exc:
        outcome = exc.outcome
    except (KeyboardInterrupt, SystemExit) as exc:
        # A hook raised it: a failure of that hook (the run thawed and recorded itself).
        if not isinstance(exc.__cause__, RunError):
            raise
        outcome = exc.__cause__.outcome
    if outcome.status is RunStatus.SUCCEEDED:
        return outcome, EXIT_OK
    if outcome.status is RunStatus.CANCELLED:
        return outcome, EXIT_CANCELLED
    return outcome, EXIT_FAILED


def _frozen_summary(outcome: RunOutcome) -> str:
    frozen = [
        r
        for r in outcome.resources.values()
        if r.quiesced_at is not None or r.thawed_at is not None  # (recovery thaws only)
    ]
    stuck = [r for r in outcome.resources.values() if r.status is ResourceStatus.THAW_FAILED]
    if stuck:
        names = ", ".join(resource_name(r.resource) for r in stuck[:10])
        return (
            f"ALERT: {len(stuck)} resources may still be frozen (every thaw failed): {names}; "
            "see `karbor-async events` for the errors"
        )
    if not frozen:
        return "nothing had been frozen"
    thawed = sum(1 for r in frozen if r.thawed_at is not None)
    return f"every resource it froze was thawed ({thawed} of {len(frozen)})"


def _report_abandoned(out: _Out, outcome: RunOutcome) -> None:
    """Name the hooks the run stopped waiting for (they may still be running)."""
    left = [r for r in outcome.resources.values() if r.abandoned_hook is not None]
    if not left:
        return
    parts = []
    for r in left[:10]:
        assert r.abandoned_hook is not None
        what = what_runs(r.abandoned_hook, thaw=r.status is ResourceStatus.THAW_FAILED)
        parts.append(f"{what} ({resource_name(r.resource)} {r.abandoned_hook.value})")
    more = f" and {len(left) - 10} more" if len(left) > 10 else ""
    out.err.print(
        f"[yellow]left running (abandoned, not waited for): {escape('; '.join(parts))}{more}"
        "[/yellow]"
    )


def _report_outcome(out: _Out, outcome: RunOutcome, code: int) -> None:
    if out.json:
        out.emit({"exit_code": code, "outcome": outcome.to_json()})
        return
    for table in outcome_tables(outcome):
        out.console.print(table)
    _report_abandoned(out, outcome)
    op = outcome.operation.value
    failed = [r for r in outcome.resources.values() if r.failed_hook is not None]
    for r in failed[:10]:
        out.console.print(f"  [red]{escape(failure_line(r))}[/red]", soft_wrap=True)
    if len(failed) > 10:
        out.console.print(
            f"  ... and {len(failed) - 10} more (karbor-async runs show {outcome.run_id})"
        )
    run = f"{op} run {outcome.run_id}"
    if code == EXIT_OK:
        out.console.print(f"[green]{op} succeeded[/green] ({run})")
    elif code == EXIT_CANCELLED:
        frozen = out.frozen_at_cancel.get(outcome.run_id)
        summary = _frozen_summary(outcome) if frozen is None else cancel_summary(outcome, frozen)
        out.console.print(f"[yellow]{op} cancelled[/yellow] ({run}): {escape(summary)}")
    else:
        out.console.print(f"[red]{op} failed[/red] ({run}): {escape(outcome.error or '')}")
        if any(r.status is ResourceStatus.THAW_FAILED for r in outcome.resources.values()):
            out.console.print(f"[red]{_frozen_summary(outcome)}[/red]")


# -- global options --------------------------------------------------------------------


@app.callback()
def _configure(
    ctx: typer.Context,
    log_level: Annotated[
        str, typer.Option(help="Log level of the engine's structured logs (to stderr).")
    ] = "warning",
    log_json: Annotated[bool, typer.Option(help="Write logs as JSON lines.")] = False,
    lease_seconds: Annotated[
        float,
        typer.Option(
            envvar="KARBOR_LEASE_SECONDS",
            help=(
                "How long a run's lease outlives its engine on another host (renewed every "
                "third of it; on this host a dead engine's runs are taken over at once)."
            ),
        ),
    ] = 30.0,
    store: Annotated[
        str | None,
        typer.Option(
            "--store",
            envvar="KARBOR_STORE",
            help=(
                "A PostgreSQL checkpoint store shared by several engines "
                "(postgresql://USER@HOST:PORT/DB) instead of the SQLite file of --db. The "
                "password: the secret --store-password-secret names (default "
                "store-password, if there is one), else PGPASSFILE or PGPASSWORD."
            ),
        ),
    ] = None,
    store_password_secret: Annotated[
        str | None,
        typer.Option(
            "--store-password-secret",
            envvar="KARBOR_STORE_PASSWORD_SECRET",
            metavar="NAME",
            help=(
                "The secret holding the PostgreSQL store's password, resolved as plans' "
                "secrets are: KARBOR_SECRET_<NAME> or the secrets file."
            ),
        ),
    ] = None,
) -> None:
    """The CLI is an application, so it (not the library) configures logging: one
    stderr handler on the ``karbor_async`` logger, console lines or JSON lines."""
    if store is not None and not store.startswith(("postgresql://", "postgres://")):
        raise typer.BadParameter(
            f"a PostgreSQL URL (postgresql://USER@HOST:PORT/DB), not {scrub_dsn(store)!r}; "
            "a SQLite store is chosen with --db",
            param_hint="--store",
        )
    if store is not None and scrub_dsn(store) != store and _from_command_line(ctx, "store"):
        raise typer.BadParameter(
            f"{scrub_dsn(store)} holds a password, which every user of this machine can "
            "read in the process list: give it as a secret (--store-password-secret, or "
            f"KARBOR_SECRET_{STORE_PASSWORD_SECRET.upper().replace('-', '_')}), in PGPASSFILE "
            "or in PGPASSWORD",
            param_hint="--store",
        )
    _STORE_URL["url"] = store
    _STORE_URL["password_secret"] = store_password_secret
    if not lease_seconds > 0:
        raise typer.BadParameter(
            f"must be a positive number of seconds, not {lease_seconds!r}",
            param_hint="--lease-seconds",
        )
    _SETTINGS["lease_seconds"] = lease_seconds
    level = logging.getLevelNamesMapping().get(log_level.upper())
    if level is None:
        raise typer.BadParameter(
            f"unknown log level {log_level!r}; use debug, info, warning or error",
            param_hint="--log-level",
        )
    configure_logging(level, json=log_json)


def _from_command_line(ctx: typer.Context | None, name: str) -> bool:
    """Whether option ``name`` was given in the arguments (not its environment variable)."""
    source = None if ctx is None else ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


# -- formatting helpers ------------------------------------------------------------------


def _when(wall: float | None) -> str:
    if wall is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(wall))


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.3f} s" if seconds >= 1 else f"{seconds * 1000:.2f} ms"


_NOT_A_CHECKPOINT = (CheckpointStatus.ERROR, CheckpointStatus.CANCELLED)
"""A protect that failed or was cancelled: it guarantees no consistency at all."""


def _consistency(cp: CheckpointRecord) -> str:
    o = cp.outcome
    if o is None or cp.status in _NOT_A_CHECKPOINT:
        return "-"
    return "crash" if o.crash_consistent else "application"


def _checkpoint_json(cp: CheckpointRecord) -> dict[str, Any]:
    usable = cp.outcome is not None and cp.status not in _NOT_A_CHECKPOINT
    return {
        "id": cp.id,
        "plan_name": cp.plan_name,
        "status": cp.status.value,
        "created_wall": cp.created_wall,
        "resources": len(cp.graph.get("resources", ())),
        "skew": cp.outcome.skew if cp.outcome else None,
        "crash_consistent": cp.outcome.crash_consistent if usable and cp.outcome else None,
    }


def _run_json(run: RunRecord) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "operation": run.operation.value,
        "checkpoint_id": run.checkpoint_id,
        "status": run.status.value,
        "started_wall": run.started_wall,
        "duration": run.outcome.duration if run.outcome else None,
        "resources": len(run.graph.get("resources", ())),
    }


# -- protect, restore, delete ----------------------------------------------------------------


def _secrets(out: _Out, secrets_file: Path | None) -> CliSecrets:
    return _guard(out, lambda: CliSecrets.from_options(secrets_file))


def _cloud(
    out: _Out,
    simcloud: str | None,
    db: Path,
    state: Path | None = None,
    faults: Sequence[str] | None = None,
) -> Any:
    """The SIMULATED cloud of a command: ``--simcloud`` opens (or creates) its shared state;
    ``--simcloud-state`` alone opens an existing one; neither: no simulated cloud."""
    if simcloud is None and state is None:
        if faults:
            _exit_with(out, "--simcloud-fault needs a SIMULATED cloud: pass --simcloud N[:SEED]", 2)
        return None

    def make() -> Any:
        directory = state if state is not None else _default_state(db)
        spec = SimcloudSpec.parse(simcloud) if simcloud is not None else None
        cloud = _generate_cloud(spec, out, directory)
        _add_faults(cloud, faults or ())
        return cloud

    return _guard(out, make)


def _default_state(db: Path) -> Path:
    _check_store_dir(db)  # (the state goes beside the store: never create its directory)
    return db.parent / "simcloud"


def _add_faults(cloud: Any, texts: Sequence[str]) -> None:
    sim = _simcloud_module()
    for text in texts:
        try:
            rule = sim.FaultRule.parse(text)
        except ValueError as exc:
            raise CliUsageError(f"--simcloud-fault: {exc}") from None
        cloud.faults.add(rule)


@app.command()
def protect(
    plan_file: Annotated[Path, typer.Argument(help="The plan: a .toml, .yaml or .yml file.")],
    db: DbOption = DEFAULT_DB,
    bank: BankOption = DEFAULT_BANK,
    simcloud: SimcloudOption = None,
    simcloud_state: SimcloudStateOption = None,
    simcloud_fault: SimcloudFaultOption = None,
    secrets_file: SecretsOption = None,
    report: Annotated[
        Path | None, typer.Option("--report", help="Also write the timeline HTML here.")
    ] = None,
    as_json: JsonOption = False,
    plain: PlainOption = False,
    backend: BackendOption = "local",
    temporal: TemporalOption = DEFAULT_TEMPORAL,
    namespace: NamespaceOption = "default",
    task_queue: TaskQueueOption = "karbor",
    heartbeat_timeout: Annotated[
        float,
        typer.Option(
            help="With --backend temporal: seconds without a heartbeat after which a "
            "worker is taken as lost (its copies retried elsewhere, its prepare compensated)."
        ),
    ] = 10.0,
) -> None:
    """Protect the resources of a plan file into a new checkpoint."""
    out = _out(as_json, plain)
    if backend not in ("local", "temporal"):
        _exit_with(out, f"--backend is local or temporal, not {backend!r}", EXIT_BAD_INPUT)
    plan = _guard(out, lambda: load_plan_file(plan_file))
    if backend == "temporal":
        from karbor_async import _cli_temporal

        _require_shared_store(out)
        args = (
            _guard(out, _temporal_cli),
            out,
            plan,
            temporal,
            namespace,
            task_queue,
            heartbeat_timeout,
        )
        _run_temporal(out, _cli_temporal.protect, *args)
    resolver = _secrets(out, secrets_file)
    cloud = _cloud(out, simcloud, db, simcloud_state, simcloud_fault)
    _run_async(out, _protect, out, plan, db, bank, resolver, cloud, report)


@app.command()
def worker(
    bank: BankOption = DEFAULT_BANK,
    simcloud: SimcloudOption = None,
    simcloud_state: SimcloudStateOption = None,
    simcloud_fault: SimcloudFaultOption = None,
    secrets_file: SecretsOption = None,
    temporal: TemporalOption = DEFAULT_TEMPORAL,
    namespace: NamespaceOption = "default",
    task_queue: TaskQueueOption = "karbor",
    max_activities: Annotated[
        int, typer.Option(help="Activities this worker runs at once.")
    ] = 1000,
) -> None:
    """Run a Temporal worker: the hooks of runs started with --backend temporal.

    Needs --store postgresql://... (shared with the workflow's other workers); runs
    until SIGINT or SIGTERM. See docs/temporal.md.
    """
    from karbor_async import _cli_temporal

    out = _out(False, True)
    _require_shared_store(out)
    resolver = _secrets(out, secrets_file)
    db = DEFAULT_DB  # (not used: the store is --store's)
    cloud = _cloud(out, simcloud, db, simcloud_state, simcloud_fault)
    args = (out, db, bank, resolver, cloud, temporal, namespace, task_queue, max_activities)
    _run_temporal(out, _cli_temporal.worker, _guard(out, _temporal_cli), *args)


def _run_temporal(out: _Out, func: Callable[..., Awaitable[int]], *args: Any) -> NoReturn:
    """:func:`_run_async` for the Temporal commands, which end the process with
    ``os._exit`` once output is flushed: the Temporal SDK's runtime threads outlive the
    event loop, and letting the interpreter finalize under them can abort it (a fatal
    ``PyGILState_Release`` error) after the command's work was done and reported."""
    try:
        code = _guard(out, lambda: anyio.run(func, *args, backend="asyncio"))
    except typer.Exit as exc:
        code = exc.exit_code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _require_shared_store(out: _Out) -> None:
    if _STORE_URL.get("url") is None:
        _exit_with(
            out,
            "the Temporal backend needs the PostgreSQL store (--store postgresql://... or "
            "KARBOR_STORE): its workers, on other hosts, cannot share an SQLite file",
            EXIT_BAD_INPUT,
        )


def _temporal_cli() -> Any:
    from karbor_async._cli_temporal import Cli

    try:
        import karbor_async.temporal  # noqa: F401  (the SDK is there, or say how to get it)
    except ImportError as exc:
        raise CliUsageError(str(exc)) from None
    return Cli(
        session=_session,
        report=_report_outcome,
        code_of=_code_of,
        usage_error=CliUsageError,
        ok=EXIT_OK,
    )


async def _protect(
    out: _Out,
    plan: Plan,
    db: Path,
    bank: Path,
    secrets: CliSecrets,
    cloud: Any,
    report: Path | None,
) -> int:
    async with _session(out, db, bank, secrets=secrets, cloud=cloud) as engine:
        _check_cloud(engine, [r.type for r in plan.resources], cloud)
        _check_sim_params(plan, cloud)
        await _recover_first(out, engine)
        run = await engine.build_protect(plan)
        out.note(
            f"Protecting {len(run.nodes)} resources of plan {plan.name!r} "
            f"as checkpoint {run.checkpoint_id}"
        )
        outcome, code = await _drive(out, engine, run)
        _report_outcome(out, outcome, code)
        if code == EXIT_OK:
            out.note(f"checkpoint {outcome.checkpoint_id} is available")
        elif plan.delete_on_failure:
            cp = await engine.store.get_checkpoint(outcome.checkpoint_id)
            out.note(f"the plan asks for cleanup: checkpoint {cp.id} is now {cp.status.value}")
        if report is not None:
            await _write_report(out, engine, outcome.run_id, report)
    return code


def _parse_params(
    items: Sequence[str], engine: Engine, types: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """``TYPE[#ID].KEY=VALUE`` (``*.KEY=VALUE``: every type that accepts KEY)."""
    params: dict[str, dict[str, Any]] = {}
    for item in items:
        target_key, sep, raw = item.partition("=")
        target, dot, key = target_key.rpartition(".")
        if not sep or not dot or not target or not key:
            raise CliUsageError(
                f"--param {item!r}: expected TYPE[#ID].KEY=VALUE, "
                "e.g. OS::Nova::Server.flavor=m1.small"
            )
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        if target == "*":
            matched = []
            for rtype in sorted(set(types)):
                binding = engine.registry.binding(rtype)
                declared = binding.spec.parameters if binding else None
                if declared is None or key in declared:
                    matched.append(rtype)
            if not matched:
                raise CliUsageError(f"--param {item!r}: no resource type here accepts {key!r}")
            for rtype in matched:
                params.setdefault(rtype, {})[key] = value
        else:
            params.setdefault(target, {})[key] = value
    return params


@app.command()
def restore(
    checkpoint: Annotated[str, typer.Argument(help="The checkpoint id.")],
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            metavar="TYPE[#ID].KEY=VALUE",
            help="A restore parameter (repeatable; VALUE is JSON or a plain string; "
            "TYPE * means every type accepting KEY, e.g. '*.target_project=prj-9').",
        ),
    ] = None,
    barrier: Annotated[
        BarrierPolicy | None, typer.Option(help="Barrier policy of the restore (default none).")
    ] = None,
    db: DbOption = DEFAULT_DB,
    bank: BankOption = DEFAULT_BANK,
    simcloud: SimcloudOption = None,
    simcloud_state: SimcloudStateOption = None,
    simcloud_fault: SimcloudFaultOption = None,
    secrets_file: SecretsOption = None,
    as_json: JsonOption = False,
    plain: PlainOption = False,
) -> None:
    """Restore an available checkpoint (its stored graph) with optional parameters."""
    out = _out(as_json, plain)
    resolver = _secrets(out, secrets_file)
    cloud = _cloud(out, simcloud, db, simcloud_state, simcloud_fault)
    _run_async(out, _restore, out, checkpoint, param or [], barrier, db, bank, resolver, cloud)


async def _restore(
    out: _Out,
    checkpoint_id: str,
    param: list[str],
    barrier: BarrierPolicy | None,
    db: Path,
    bank: Path,
    secrets: CliSecrets,
    cloud: Any,
) -> int:
    async with _session(out, db, bank, secrets=secrets, cloud=cloud, must_exist=True) as engine:
        cp = await engine.store.get_checkpoint(checkpoint_id)
        types = [str(r["type"]) for r in cp.graph.get("resources", ())]
        _check_cloud(engine, types, cloud)
        params = _parse_params(param, engine, types)
        await _recover_first(out, engine)
        run = await engine.build_restore(checkpoint_id, parameters=params, barrier=barrier)
        out.note(
            f"Restoring checkpoint {checkpoint_id} ({len(run.nodes)} resources) "
            f"as restore run {run.run_id}"
        )
        outcome, code = await _drive(out, engine, run)
        _report_outcome(out, outcome, code)
        if code == EXIT_OK and not out.json:
            table = Table(title="Restored resources (original -> new id)")
            for col in ("resource", "new id"):
                table.add_column(col)
            for (rtype, rid), new_id in list(outcome.restored.items())[:50]:
                table.add_row(f"{rtype}#{rid}", new_id)
            out.console.print(table)
    return code


@app.command()
def delete(
    checkpoint: Annotated[str, typer.Argument(help="The checkpoint id.")],
    db: DbOption = DEFAULT_DB,
    bank: BankOption = DEFAULT_BANK,
    simcloud: SimcloudOption = None,
    simcloud_state: SimcloudStateOption = None,
    simcloud_fault: SimcloudFaultOption = None,
    secrets_file: SecretsOption = None,
    as_json: JsonOption = False,
    plain: PlainOption = False,
) -> None:
    """Delete a checkpoint: the plugins remove what they saved, then its bank data goes."""
    out = _out(as_json, plain)
    resolver = _secrets(out, secrets_file)
    cloud = _cloud(out, simcloud, db, simcloud_state, simcloud_fault)
    _run_async(out, _delete, out, checkpoint, db, bank, resolver, cloud)


async def _delete(
    out: _Out, checkpoint_id: str, db: Path, bank: Path, secrets: CliSecrets, cloud: Any
) -> int:
    async with _session(out, db, bank, secrets=secrets, cloud=cloud, must_exist=True) as engine:
        cp = await engine.store.get_checkpoint(checkpoint_id)
        _check_cloud(engine, [str(r["type"]) for r in cp.graph.get("resources", ())], cloud)
        await _recover_first(out, engine)
        other = await _deleting_run(engine, checkpoint_id)
        if other is not None:
            out.note(f"checkpoint {checkpoint_id} is being deleted by run {other}: waiting for it")
            outcome = await _wait_for_run(engine, other)
            code = _code_of(outcome)
            _report_outcome(out, outcome, code)
            return code
        run = await engine.build_delete(checkpoint_id)
        out.note(
            f"Deleting checkpoint {checkpoint_id} ({len(run.nodes)} resources) "
            f"as delete run {run.run_id}"
        )
        outcome, code = await _drive(out, engine, run)
        _report_outcome(out, outcome, code)
    return code


async def _deleting_run(engine: Engine, checkpoint_id: str) -> str | None:
    """The delete run under way on a ``deleting`` checkpoint (another live engine's)."""
    cp = await engine.store.get_checkpoint(checkpoint_id)
    if cp.status is not CheckpointStatus.DELETING:
        return None
    runs = await engine.store.list_runs(checkpoint_id=checkpoint_id)
    live = [
        r for r in runs if r.operation is OperationKind.DELETE and r.status is RunStatus.RUNNING
    ]
    return live[0].run_id if live else None


async def _wait_for_run(engine: Engine, run_id: str) -> RunOutcome:
    """Wait for another engine's run to end (recovering it if its engine dies meanwhile)."""
    while True:
        record = await engine.store.get_run(run_id)
        if record.status is not RunStatus.RUNNING and record.outcome is not None:
            return record.outcome
        for outcome in await engine.recover():
            if outcome.run_id == run_id:
                return outcome
        await anyio.sleep(0.5)


# -- checkpoints -------------------------------------------------------------------------------


@checkpoints_app.command("list")
def checkpoints_list(
    plan: Annotated[str | None, typer.Option(help="Only this plan's checkpoints.")] = None,
    status: Annotated[
        CheckpointStatus | None, typer.Option(help="Only checkpoints in this state.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many (newest first).")] = 50,
    show_all: Annotated[
        bool, typer.Option("--all", help="Also deleted checkpoints (hidden by default).")
    ] = False,
    db: DbOption = DEFAULT_DB,
    as_json: JsonOption = False,
) -> None:
    """List checkpoints, newest first (deleted ones only with --all or --status deleted)."""
    out = _out(as_json)
    _run_async(out, _checkpoints_list, out, plan, status, limit, show_all, db)


async def _visible_checkpoints(
    store: SqliteStore | PostgresStore,
    plan: str | None,
    status: CheckpointStatus | None,
    limit: int,
    show_all: bool,
) -> list[CheckpointRecord]:
    """The newest ``limit`` checkpoints, deleted ones left out unless asked for."""
    if show_all or status is not None:
        return list(await store.list_checkpoints(plan_name=plan, status=status, limit=limit))
    found: list[CheckpointRecord] = []
    before: str | None = None
    while len(found) < limit:
        page = await store.list_checkpoints(plan_name=plan, limit=limit, before_id=before)
        found += [cp for cp in page if cp.status is not CheckpointStatus.DELETED]
        if len(page) < limit:
            break
        before = page[-1].id
    return found[:limit]


async def _checkpoints_list(
    out: _Out,
    plan: str | None,
    status: CheckpointStatus | None,
    limit: int,
    show_all: bool,
    db: Path,
) -> int:
    async with _store(db, must_exist=True, read_only=True) as store:
        found = await _visible_checkpoints(store, plan, status, limit, show_all)
        hidden = not show_all and status is None
        if hidden:
            deleted = CheckpointStatus.DELETED
            hidden = bool(await store.list_checkpoints(plan_name=plan, status=deleted, limit=1))
    if out.json:
        out.emit({"checkpoints": [_checkpoint_json(cp) for cp in found]})
        return EXIT_OK
    note = "deleted checkpoints are hidden: --all shows them" if hidden else None
    if not found:
        out.console.print("no checkpoints" + (f" ({note})" if note else ""))
        return EXIT_OK
    table = Table(title=f"Checkpoints in {db} (newest first)", caption=note)
    for col in ("checkpoint", "plan", "status", "created", "resources", "skew", "consistency"):
        table.add_column(col)
    for cp in found:
        o = cp.outcome
        table.add_row(
            cp.id,
            escape(cp.plan_name),
            cp.status.value,
            _when(cp.created_wall),
            str(len(cp.graph.get("resources", ()))),
            _ms(o.skew if o else None),
            _consistency(cp),
        )
    out.console.print(table)
    return EXIT_OK


@checkpoints_app.command("show")
def checkpoints_show(
    checkpoint: Annotated[str, typer.Argument(help="The checkpoint id.")],
    db: DbOption = DEFAULT_DB,
    as_json: JsonOption = False,
) -> None:
    """Show a checkpoint: status, plan, consistency, and its runs."""
    out = _out(as_json)
    _run_async(out, _checkpoints_show, out, checkpoint, db)


async def _checkpoints_show(out: _Out, checkpoint_id: str, db: Path) -> int:
    async with _store(db, must_exist=True, read_only=True) as store:
        cp = await store.get_checkpoint(checkpoint_id)
        runs = await store.list_runs(checkpoint_id=checkpoint_id)
    if out.json:
        doc = _checkpoint_json(cp)
        doc["plan"] = dict(cp.plan)
        doc["outcome"] = cp.outcome.to_json() if cp.outcome else None
        doc["runs"] = [_run_json(r) for r in runs]
        out.emit({"checkpoint": doc})
        return EXIT_OK
    out.console.print(
        f"[bold]checkpoint {cp.id}[/bold]: {cp.status.value}; plan {escape(cp.plan_name)!r}; "
        f"created {_when(cp.created_wall)}; {len(cp.graph.get('resources', ()))} resources"
    )
    if cp.outcome is not None:
        for table in outcome_tables(cp.outcome):
            out.console.print(table)
        if cp.outcome.error:
            out.console.print(f"[red]error:[/red] {escape(cp.outcome.error)}")
    _print_runs(out, runs, f"Runs of {cp.id}")
    return EXIT_OK


@checkpoints_app.command("prune")
def checkpoints_prune(
    plan: Annotated[str, typer.Option(help="The plan whose checkpoints are pruned.")],
    keep: Annotated[int, typer.Option(min=0, help="How many of the newest to keep.")],
    dry_run: Annotated[bool, typer.Option(help="Only say what would be deleted.")] = False,
    db: DbOption = DEFAULT_DB,
    bank: BankOption = DEFAULT_BANK,
    simcloud: SimcloudOption = None,
    simcloud_state: SimcloudStateOption = None,
    simcloud_fault: SimcloudFaultOption = None,
    secrets_file: SecretsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Delete all but the newest KEEP available checkpoints of a plan (plugins clean up)."""
    out = _out(as_json, plain=True)
    resolver = _secrets(out, secrets_file)
    cloud = _cloud(out, simcloud, db, simcloud_state, simcloud_fault)
    _run_async(out, _prune, out, plan, keep, dry_run, db, bank, resolver, cloud)


async def _prune(
    out: _Out,
    plan: str,
    keep: int,
    dry_run: bool,
    db: Path,
    bank: Path,
    secrets: CliSecrets,
    cloud: Any,
) -> int:
    async with _session(out, db, bank, secrets=secrets, cloud=cloud, must_exist=True) as engine:
        kept, doomed = await engine.retention(plan, keep)
        deleted: list[str] = []
        failed: list[dict[str, str]] = []
        code = EXIT_OK
        if doomed and not dry_run:
            types = [str(r["type"]) for cp in doomed for r in cp.graph.get("resources", ())]
            _check_cloud(engine, types, cloud)
            await _recover_first(out, engine)
        quiet = attrs.evolve(out, display=Display.QUIET)
        in_progress: list[str] = []
        for cp in doomed:
            if dry_run:
                out.note(f"would delete {cp.id} (created {_when(cp.created_wall)})")
                continue
            try:
                run = await engine.build_delete(cp.id)
                outcome, run_code = await _drive(quiet, engine, run)
            except (CheckpointBusyError, PlanError) as exc:
                if (await engine.store.get_checkpoint(cp.id)).status is not (
                    CheckpointStatus.DELETING
                ):
                    raise
                in_progress.append(cp.id)  # another run is deleting it
                out.note(f"{cp.id} is being deleted by another run: {escape(str(exc))}")
                continue
            if run_code == EXIT_OK:
                deleted.append(cp.id)
                out.note(f"deleted {cp.id} (created {_when(cp.created_wall)})")
            else:
                failed.append({"checkpoint": cp.id, "error": outcome.error or outcome.status.value})
                out.note(f"[red]could not delete {cp.id}:[/red] {escape(outcome.error or '')}")
                code = run_code
                if run_code == EXIT_CANCELLED:
                    break
        if out.json:
            out.emit(
                {
                    "plan": plan,
                    "kept": [cp.id for cp in kept],
                    "deleted": deleted,
                    "would_delete": [cp.id for cp in doomed] if dry_run else [],
                    "failed": failed,
                    "in_progress": in_progress,
                    "exit_code": code,
                }
            )
        else:
            verb = "would delete" if dry_run else "deleted"
            count = len(doomed) if dry_run else len(deleted)
            out.console.print(
                f"plan {escape(plan)!r}: kept {len(kept)} available checkpoints, {verb} {count}"
                + (f", {len(failed)} failed" if failed else "")
                + (f", {len(in_progress)} being deleted by another run" if in_progress else "")
            )
    return code


# -- runs and events -----------------------------------------------------------------------


def _print_runs(out: _Out, runs: Sequence[RunRecord], title: str) -> None:
    table = Table(title=title)
    for col in ("run", "operation", "checkpoint", "status", "started", "duration", "resources"):
        table.add_column(col, no_wrap=col in ("run", "checkpoint", "started"))
    for r in runs:
        table.add_row(
            r.run_id,
            r.operation.value,
            r.checkpoint_id,
            r.status.value,
            _when(r.started_wall),
            _ms(r.outcome.duration if r.outcome else None),
            str(len(r.graph.get("resources", ()))),
        )
    out.console.print(table)


@runs_app.command("list")
def runs_list(
    checkpoint: Annotated[
        str | None, typer.Option(help="Only the runs of this checkpoint.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many (newest first).")] = 50,
    db: DbOption = DEFAULT_DB,
    as_json: JsonOption = False,
) -> None:
    """List protect, restore and delete runs, newest first."""
    out = _out(as_json)
    _run_async(out, _runs_list, out, checkpoint, limit, db)


async def _runs_list(out: _Out, checkpoint: str | None, limit: int, db: Path) -> int:
    async with _store(db, must_exist=True, read_only=True) as store:
        if checkpoint is not None:
            await store.get_checkpoint(checkpoint)
        runs = await store.list_runs(checkpoint_id=checkpoint, limit=limit)
    if out.json:
        out.emit({"runs": [_run_json(r) for r in runs]})
    elif not runs:
        out.console.print("no runs")
    else:
        _print_runs(out, runs, f"Runs in {db} (newest first)")
    return EXIT_OK


@runs_app.command("show")
def runs_show(
    run: Annotated[str, typer.Argument(help="The run id (a checkpoint's id is its protect run).")],
    db: DbOption = DEFAULT_DB,
    as_json: JsonOption = False,
) -> None:
    """Show a run: status, per-type outcome, consistency, phases, failures."""
    out = _out(as_json)
    _run_async(out, _runs_show, out, run, db)


async def _runs_show(out: _Out, run_id: str, db: Path) -> int:
    async with _store(db, must_exist=True, read_only=True) as store:
        run = await store.get_run(run_id)
        events = await store.read_events(run_id, 0)
    if out.json:
        doc = _run_json(run)
        doc["outcome"] = run.outcome.to_json() if run.outcome else None
        doc["events"] = len(events)
        out.emit({"run": doc})
        return EXIT_OK
    out.console.print(
        f"[bold]{run.operation.value} run {run.run_id}[/bold] of checkpoint {run.checkpoint_id}: "
        f"{run.status.value}; started {_when(run.started_wall)}"
    )
    if events:
        out.console.print(phase_table(events))
    if run.outcome is not None:
        frozen = frozen_when_cancelled(events)
        if frozen is not None:
            out.frozen_at_cancel[run.run_id] = frozen
        _report_outcome(out, run.outcome, _code_of(run.outcome))
    else:
        out.console.print("the run has not finished (or its process died: see `recover`)")
    return EXIT_OK


def _code_of(outcome: RunOutcome) -> int:
    return {RunStatus.SUCCEEDED: EXIT_OK, RunStatus.CANCELLED: EXIT_CANCELLED}.get(
        outcome.status, EXIT_FAILED
    )


def _event_line(e: Event, t0: float | None) -> str:
    rel = f"+{e.mono - t0:9.4f}s" if t0 is not None else ""
    what = f"{e.resource[0]}#{e.resource[1]}" if e.resource else ""

    def value(k: str, v: Any) -> str:
        if k == "at" and isinstance(v, float) and t0 is not None:
            return f"+{v - t0:.4f}s"  # an instant on the engine clock, like e.mono
        return str(round(v, 6) if isinstance(v, float) else v)

    data = " ".join(f"{k}={value(k, v)}" for k, v in sorted(e.data.items()) if v is not None)
    parts = [f"{e.seq:6d}", rel, f"{e.kind.value:<16}", what]
    if e.hook is not None:
        parts.append(e.hook.value)
    if e.group:
        parts.append(f"group={e.group}")
    if e.attempt > 1:
        parts.append(f"attempt={e.attempt}")
    if data:
        parts.append(data)
    return " ".join(p for p in parts if p)


@app.command()
def events(
    run: Annotated[str, typer.Argument(help="The run id.")],
    since: Annotated[int, typer.Option(min=0, help="Only events after this sequence number.")] = 0,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing events until the run finishes.")
    ] = False,
    db: DbOption = DEFAULT_DB,
    as_json: JsonOption = False,
) -> None:
    """Print a run's lifecycle events (its numbered log); --json prints one event per line."""
    out = _out(as_json)
    _run_async(out, _events, out, run, since, follow, db)


async def _events(out: _Out, run_id: str, since: int, follow: bool, db: Path) -> int:
    async with _store(db, must_exist=True, read_only=True) as store:
        record = await store.get_run(run_id)
        t0: float | None = None
        if since > 0:
            first = await store.read_events(run_id, 0)
            t0 = first[0].mono if first else None
        finished = record.status is not RunStatus.RUNNING
        polls = 0
        while True:
            batch = await store.read_events(run_id, since)
            for e in batch:
                t0 = e.mono if t0 is None else t0
                if out.json:
                    out.emit(e.to_json())
                else:
                    out.console.print(escape(_event_line(e, t0)), soft_wrap=True)
                since = e.seq
                finished = finished or e.kind is EventKind.RUN_FINISHED
            if not follow or finished:
                break
            polls += 1
            if polls % 5 == 0 and await _owner_gone(store, run_id):
                message = (
                    f"run {run_id}'s engine stopped without finishing it (its process is "
                    "gone or its lease expired): run `karbor-async recover`"
                )
                if out.json:
                    out.emit({"follow_ended": "owner_gone", "run_id": run_id, "seq": since})
                out.err.print(f"[red]{escape(message)}[/red]")
                return EXIT_FAILED
            # The run belongs to another process: its live subscription (Engine.subscribe)
            # is in that process, so follow the committed log, which is the same stream.
            await anyio.sleep(0.2)
    return EXIT_OK


async def _owner_gone(store: SqliteStore | PostgresStore, run_id: str) -> bool:
    """The run is still ``running`` but nobody holds it: its engine died (or let it go)."""
    if (await store.get_run(run_id)).status is not RunStatus.RUNNING:
        return False
    return any(r.run_id == run_id for r in await store.unfinished_runs())


# -- recover and report --------------------------------------------------------------------


@app.command()
def recover(
    db: DbOption = DEFAULT_DB,
    bank: BankOption = DEFAULT_BANK,
    simcloud: SimcloudOption = None,
    simcloud_state: SimcloudStateOption = None,
    simcloud_fault: SimcloudFaultOption = None,
    secrets_file: SecretsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Finish or clean up runs that an earlier process left unfinished (thaws first)."""
    out = _out(as_json, plain=True)
    resolver = _secrets(out, secrets_file)
    cloud = _cloud(out, simcloud, db, simcloud_state, simcloud_fault)
    _run_async(out, _recover, out, db, bank, resolver, cloud)


async def _recover(out: _Out, db: Path, bank: Path, secrets: CliSecrets, cloud: Any) -> int:
    async with _session(out, db, bank, secrets=secrets, cloud=cloud, must_exist=True) as engine:
        store = engine.store
        unfinished: list[RunRecord] = []
        if isinstance(store, SqliteStore | PostgresStore):
            unfinished = await store.unfinished_runs()
        types = [str(r["type"]) for run in unfinished for r in run.graph.get("resources", ())]
        _check_cloud(engine, types, cloud)
        report = await engine.recover_report()
        outcomes = report.outcomes
        bad = [
            o
            for o in outcomes
            if o.status is not RunStatus.SUCCEEDED
            or any(r.status is ResourceStatus.THAW_FAILED for r in o.resources.values())
        ]
        code = EXIT_FAILED if bad else EXIT_BUSY if report.held else EXIT_OK
        if out.json:
            out.emit(
                {
                    "recovered": [o.to_json() for o in outcomes],
                    "held": [_held_json(h) for h in report.held],
                    "exit_code": code,
                }
            )
        else:
            if not outcomes and not report.held:
                out.console.print("nothing to recover: no unfinished runs")
            for o in outcomes:
                out.console.print(
                    f"{o.operation.value} run {o.run_id} (checkpoint {o.checkpoint_id}): "
                    f"{o.status.value}; {_frozen_summary(o)}"
                )
                if o.operation is OperationKind.PROTECT and o.status is not RunStatus.SUCCEEDED:
                    out.console.print(
                        f"  its cuts were not all committed: checkpoint {o.checkpoint_id} is "
                        "lost and what it saved was deleted; protect again"
                    )
            for held in report.held:
                out.console.print(f"{_held_line(held)}: retry after that, or leave it to it")
    return code


async def _write_report(out: _Out, engine: Engine, run_id: str, path: Path) -> dict[str, Any]:
    document, data = await write_report(engine.store, run_id)
    await anyio.Path(path).write_text(document, encoding="utf-8")
    meta = data["meta"]
    out.note(
        f"wrote {path}: timeline of {meta['operation']} run {run_id}, {meta['resources']} "
        f"resources, skew {_ms(meta['skew'])}, longest quiesce window "
        f"{_ms(meta['longest_quiesce'])}"
    )
    return data


@app.command()
def report(
    run: Annotated[str, typer.Argument(help="The run id (a checkpoint's id is its protect run).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="The HTML file to write.")] = Path(
        "timeline.html"
    ),
    db: DbOption = DEFAULT_DB,
    as_json: JsonOption = False,
) -> None:
    """Write a run's timeline: one self-contained HTML file with a Gantt chart of its hooks."""
    out = _out(as_json)
    _run_async(out, _report, out, run, output, db)


async def _report(out: _Out, run_id: str, output: Path, db: Path) -> int:
    async with _store(db, must_exist=True, read_only=True) as store:
        engine = Engine(store=store, discover=False)
        data = await _write_report(out, engine, run_id, output)
    if out.json:
        meta = data["meta"]
        out.emit(
            {
                "path": str(output),
                "run_id": run_id,
                "resources": meta["resources"],
                "skew": meta["skew"],
                "longest_quiesce": meta["longest_quiesce"],
            }
        )
    return EXIT_OK


# -- plugins and demo ------------------------------------------------------------------------


def _param_json(name: str, p: Param) -> dict[str, Any]:
    """A declared parameter as ``plugins`` shows it (required resolved from its rule)."""
    required: bool | None = p.required
    if required is None:  # (Param(required=None): required when secret with no default)
        required = p.secret and p.default is None
    operations: Any = getattr(p, "operations", None)
    ops = sorted(o.value if hasattr(o, "value") else str(o) for o in operations or ())
    if set(ops) >= {k.value for k in OperationKind}:
        ops = []  # every operation: shown as "all"
    return {
        "name": name,
        "type": p.kind.__name__,
        "default": p.default,
        "required": bool(required),
        "secret": p.secret,
        "operations": ops or None,
        "description": p.description,
    }


@app.command()
def plugins(as_json: JsonOption = False) -> None:
    """List the installed protection plugins and the resource types each handles."""
    out = _out(as_json)
    engine = _guard(out, lambda: Engine(discover=True))
    rows: list[dict[str, Any]] = []
    for rtype, binding in sorted(engine.registry.types.items()):
        params = binding.spec.parameters
        rows.append(
            {
                "plugin": binding.plugin.plugin_name(),
                "type": rtype,
                "quiesces": binding.spec.quiesces,
                "snapshots": binding.spec.snapshots,
                "parameters": None if params is None else sorted(params),
                "secret_parameters": sorted(k for k, p in (params or {}).items() if p.secret),
                "parameter_details": None
                if params is None
                else [_param_json(name, p) for name, p in sorted(params.items())],
            }
        )
    finders = [
        {"finds": f.resource_type, "under": parent}
        for parent, found in sorted(engine.registry.protectables.items())
        for f in found
    ]
    if out.json:
        out.emit({"protections": rows, "protectables": finders})
        return
    table = Table(title="Protection plugins")
    for col in ("plugin", "resource type", "quiesces", "snapshots", "parameters"):
        table.add_column(col)
    for row in rows:
        params = row["parameters"]
        table.add_row(
            row["plugin"],
            row["type"],
            "yes" if row["quiesces"] else "no",
            "yes" if row["snapshots"] else "no",
            "any (unchecked)" if params is None else ", ".join(params) or "none",
        )
    out.console.print(table)
    details = Table(title='Parameters (set in a plan\'s [parameters."TYPE"], or --param)')
    for col in ("resource type", "parameter", "type", "default", "required", "secret"):
        details.add_column(col, no_wrap=col != "resource type")
    details.add_column("operations")
    details.add_column("description")
    for row in rows:
        for d in row["parameter_details"] or ():
            details.add_row(
                row["type"],
                d["name"],
                d["type"],
                "-" if d["default"] is None else escape(json.dumps(d["default"])),
                "yes" if d["required"] else "no",
                "yes (a name, resolved at run time)" if d["secret"] else "no",
                ", ".join(d["operations"]) if d["operations"] else "all",
                escape(d["description"]) or "-",
            )
    if details.row_count:
        out.console.print(details)
    found_table = Table(title="Protectables (dependency discovery)")
    found_table.add_column("finds")
    found_table.add_column("under")
    for f in finders:
        found_table.add_row(f["finds"], f["under"])
    out.console.print(found_table)


@app.command()
def demo(
    resources: Annotated[int, typer.Option(help="Size of the sample application.")] = 40,
    seed: Annotated[int, typer.Option(help="Seed of the generated application.")] = 7,
    db: DbOption = DEFAULT_DB,
    bank: BankOption = DEFAULT_BANK,
    report: Annotated[
        Path, typer.Option("--report", help="Where to write the protect run's timeline.")
    ] = Path("timeline.html"),
    latency: Annotated[
        str,
        typer.Option(
            metavar="realistic|zero|slow",
            help=(
                "The SIMULATED cloud's latency, as in --simcloud N:SEED:LATENCY: realistic "
                "(a real cloud's pace: the protect lasts a few seconds), zero or slow."
            ),
        ),
    ] = "realistic",
    plain: PlainOption = False,
    app_dir: Annotated[
        Path | None,
        typer.Option(
            "--app-dir",
            help="Where the live two-shard application keeps its stores and sockets "
            "(kept between demos; restores go into restored-CHECKPOINT/ inside it). "
            "Default: demo-app/ beside --db.",
        ),
    ] = None,
) -> None:
    """Protect a live application (two shards writing to SQLite) with a generated sample
    of the SIMULATED cloud, restore it, and check that the restored stores are consistent."""
    out = _out(plain=plain)
    if resources < 3:
        _exit_with(out, "--resources must be at least 3 (a project, a server, a volume)", 2)
    spec = _guard(out, lambda: SimcloudSpec.parse(f"{resources}:{seed}:{latency}"))
    ledger = _guard(
        out, lambda: _plugin_module("karbor_ledger", "the sample application", "ledger")
    )
    _guard(out, lambda: _plugin_module("karbor_sqlite", "the SQLite plugin", "sqlite"))
    cloud = _guard(out, lambda: _generate_cloud(spec, out, None))
    where = app_dir if app_dir is not None else db.parent / "demo-app"  # (beside the store)
    _run_async(out, _demo, out, cloud, ledger, where.absolute(), db, bank, report)


def demo_plan(cloud: Any, app: Any = None) -> Plan:
    """What ``demo`` protects: the generated application's project and, given the live
    two-shard application ``app``, its shards as one consistency group; barrier cut."""
    resources = list(cloud.project_resources())
    groups = []
    if app is not None:
        resources += app.resources()
        groups.append(ConsistencyGroup("ledger", [r.key for r in app.resources()]))
    return Plan(
        name="sample-app",
        resources=resources,
        groups=groups,
        barrier=BarrierPolicy.CUT,
        timeouts=Timeouts(hook=60, quiesce_budget=5.0),
    )


async def _demo(
    out: _Out, cloud: Any, ledger: Any, app_dir: Path, db: Path, bank_dir: Path, report_path: Path
) -> int:
    console = out.console
    async with ledger.running_ledger(app_dir) as app:
        console.print(
            f"Started the live application in {app_dir}: shard A ({app.a.db.name}) moves money "
            f"to shard B ({app.b.db.name}), hundreds of transfers a second."
        )
        await anyio.sleep(1.0)  # let it write a while before it is protected
        return await _demo_protect(out, cloud, ledger, app, db, bank_dir, report_path)


async def _demo_protect(
    out: _Out, cloud: Any, ledger: Any, app: Any, db: Path, bank_dir: Path, report_path: Path
) -> int:
    console = out.console
    async with _session(out, db, bank_dir, cloud=cloud) as engine:
        earlier = await engine.store.list_checkpoints(limit=10)
        if earlier:
            table = Table(title=f"Checkpoints already in {db} (newest first)")
            for col in ("checkpoint", "plan", "status", "resources", "skew"):
                table.add_column(col)
            for cp in earlier:
                o = cp.outcome
                table.add_row(
                    cp.id,
                    cp.plan_name,
                    cp.status.value,
                    str(len(o.resources) if o else "-"),
                    _ms(o.skew if o else None),
                )
            console.print(table)
        await _recover_first(out, engine)
        plan = demo_plan(cloud, app)
        missed_before = (await app.stats())["A"]["missed_while_paused"]
        protect_run = await engine.build_protect(plan)
        console.print(
            f"Protecting {len(protect_run.nodes)} resources "
            f"(barrier: cut) as checkpoint {protect_run.checkpoint_id}"
        )
        protected, code = await _drive(out, engine, protect_run)
        if code != EXIT_OK:
            _report_outcome(out, protected, code)
            return code
        console.print(phase_table(await engine.store.read_events(protected.run_id)))
        for table in outcome_tables(protected):
            console.print(table)
        for line in explain_consistency(protected, plan.timeouts.quiesce_budget):
            console.print(f"  {escape(line)}", style="dim", highlight=False)
        missed = (await app.stats())["A"]["missed_while_paused"] - missed_before
        await _write_report(out, engine, protected.run_id, report_path)
        restore_dir = app.root / f"restored-{protected.checkpoint_id}"
        await anyio.Path(restore_dir).mkdir(parents=True, exist_ok=True)
        restore_run = await engine.build_restore(
            protected.checkpoint_id,
            parameters={ledger.SQLITE: {"target_dir": str(restore_dir)}},
        )
        console.print(
            f"Restoring checkpoint {protected.checkpoint_id} (the simulation, and the shards' "
            f"stores into {restore_dir}/) as restore run {restore_run.run_id}"
        )
        restored, code = await _drive(out, engine, restore_run)
        if code != EXIT_OK:
            _report_outcome(out, restored, code)
            return code
        for table in outcome_tables(restored):
            console.print(table)
        pair = [Path(restored.restored[(ledger.SQLITE, str(spec.db))]) for spec in (app.a, app.b)]
        invariant = await app.check(*pair)
        for line in ledger_verdict(invariant, protected, missed):
            console.print(escape(line), highlight=False)
        console.print(
            f"Restored {len(restored.restored)} resources; the store is {db}, the bank is "
            f"{bank_dir}/, the timeline is {report_path}. Run `make demo` again to see this "
            "checkpoint listed, or try `karbor-async checkpoints list`."
        )
    return EXIT_OK if invariant.holds else EXIT_FAILED


# -- the simulated cloud's shared state ----------------------------------------------------


def _open_state(out: _Out, state: Path | None, db: Path) -> Any:
    directory = state if state is not None else _default_state(db)
    sim = _simcloud_module()

    def opened() -> Any:
        try:
            return sim.SharedState.open(directory)[0]
        except sim.SharedStateError as exc:
            raise CliUsageError(str(exc)) from None

    return _guard(out, opened)


@simcloud_app.command("show")
def simcloud_show(
    simcloud_state: SimcloudStateOption = None,
    db: DbOption = DEFAULT_DB,
    as_json: JsonOption = False,
) -> None:
    """What is frozen and by whom, the snapshots and their checkpoints, what restores made."""
    out = _out(as_json, plain=True)
    shared = _open_state(out, simcloud_state, db)
    try:
        view = _guard(out, shared.view)
    finally:
        shared.close()
    if out.json:
        out.emit(
            {
                "state": str(view.path),
                "meta": view.meta,
                "frozen": [attrs.asdict(r) for r in view.frozen],
                "snapshots": [attrs.asdict(r) for r in view.snapshots],
                "created": [attrs.asdict(r) for r in view.created],
                "faults": list(view.faults),
                "fired": [attrs.asdict(r) for r in view.fired],
            }
        )
        raise typer.Exit(EXIT_OK)
    meta = view.meta
    console = out.console
    console.print(
        f"SIMULATED cloud state in {view.path}: {meta.get('resources')} resources, seed "
        f"{meta.get('seed')}, latency {meta.get('latency')}"
    )
    alive = {True: "running", False: "gone (no longer running)", None: "on another host"}
    _print_rows(
        out,
        f"Frozen servers ({len(view.frozen)})",
        ("server", "since", "by", "that process"),
        [(r.server_id, _when(r.since_wall), r.by or "-", alive[r.alive]) for r in view.frozen],
    )
    _print_rows(
        out,
        f"Snapshots ({len(view.snapshots)})",
        ("snapshot", "volume", "checkpoint", "taken", "by"),
        [
            (sn.id, sn.volume_id, sn.checkpoint_id or "-", _when(sn.taken_wall), sn.owner or "-")
            for sn in view.snapshots
        ],
    )
    _print_rows(
        out,
        f"Created by restores ({len(view.created)})",
        ("type", "id", "from checkpoint", "original", "by"),
        [
            (c.kind, c.id, c.origin_checkpoint or "-", c.origin_id or "-", c.by or "-")
            for c in view.created
        ],
    )
    _print_rows(
        out,
        f"Faults that fired (last {len(view.fired)})",
        ("when", "rule", "hook", "resource", "by"),
        [(_when(f.wall), f.rule, f"{f.operation} {f.hook}", f.resource, f.by) for f in view.fired],
    )
    console.print(
        f"Stored fault rules ({len(view.faults)}): "
        + (", ".join(escape(f) for f in view.faults) if view.faults else "none")
    )
    raise typer.Exit(EXIT_OK)


def _print_rows(
    out: _Out, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]]
) -> None:
    if not rows:
        out.console.print(f"{title}: none")
        return
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))
    out.console.print(table)


@fault_app.command("add")
def simcloud_fault_add(
    rules: Annotated[
        list[str], typer.Argument(metavar="RULE...", help="OPERATION:HOOK:TYPE[#ID]:raise|hang[:P]")
    ],
    simcloud_state: SimcloudStateOption = None,
    db: DbOption = DEFAULT_DB,
) -> None:
    """Store fault rules: every process using the state injects them until cleared."""
    out = _out(plain=True)
    sim = _simcloud_module()
    parsed = []
    for text in rules:
        try:
            parsed.append(sim.FaultRule.parse(text).text())
        except ValueError as exc:
            _exit_with(out, str(exc), EXIT_BAD_INPUT)
    shared = _open_state(out, simcloud_state, db)
    try:
        _guard(out, lambda: shared.add_faults(parsed))
    finally:
        shared.close()
    out.console.print(f"stored {len(parsed)} fault rule(s) in {shared.directory}")
    raise typer.Exit(EXIT_OK)


@fault_app.command("clear")
def simcloud_fault_clear(
    simcloud_state: SimcloudStateOption = None, db: DbOption = DEFAULT_DB
) -> None:
    """Remove every stored fault rule."""
    out = _out(plain=True)
    shared = _open_state(out, simcloud_state, db)
    try:
        n = _guard(out, shared.clear_faults)
    finally:
        shared.close()
    out.console.print(f"cleared {n} stored fault rule(s) in {shared.directory}")
    raise typer.Exit(EXIT_OK)


def main() -> None:
    """Entry point of the ``karbor-async`` script."""
    try:
        app(prog_name="karbor-async")
    except KeyboardInterrupt:
        Console(stderr=True).print("interrupted")
        sys.exit(EXIT_CANCELLED)
