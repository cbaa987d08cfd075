"""What the CLI shows (issue 15): the demo's pace and its explained figures, the status
line, barrier lines, failure lines, checkpoint listings, plugin parameters, option and
plan-file errors. Commands run in-process on the SIMULATED cloud with zero latency.
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import attrs
import pytest
import structlog
from typer.testing import CliRunner

from karbor_async import (
    Engine,
    HookContext,
    MemoryStore,
    Plan,
    ProtectionPlugin,
    Resource,
    ResourceType,
)
from karbor_async._cli import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    EXIT_OK,
    _consistency,
    _latency_profiles,
    app,
    demo_plan,
)
from karbor_async._cli_output import FIGURES_DOC, cancel_summary, failure_line
from karbor_async._progress import _stats_line
from karbor_async._types import Hook, OperationKind, ResourceStatus
from karbor_async.store import CheckpointStatus

sim = pytest.importorskip("karbor_simcloud")

ROOT = Path(__file__).resolve().parent.parent
PROJECT = "OS::Keystone::Project"
SIM = "12:3:zero"
PLAN = f'name = "app"\nbarrier = "cut"\nresources = ["{PROJECT}#prj-0000001"]\n'


@pytest.fixture(autouse=True)
def _keep_structlog() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


class Cli:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.env: dict[str, str | None] = {
            "KARBOR_DB": str(root / "karbor.db"),
            "KARBOR_BANK": str(root / "bank"),
            "KARBOR_SIMCLOUD": None,
            "KARBOR_SECRETS_FILE": None,
            "COLUMNS": "250",
        }
        self.plan = root / "plan.toml"
        self.plan.write_text(PLAN)

    def __call__(self, *args: str, code: int = EXIT_OK) -> Any:
        result = CliRunner().invoke(app, list(args), env=self.env)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        assert "Traceback" not in result.stderr
        assert result.exit_code == code, (result.exit_code, result.output)
        return result

    def json(self, *args: str, code: int = EXIT_OK) -> Any:
        return json.loads(self(*args, "--json", code=code).stdout)


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


def _flat(text: str) -> str:
    return " ".join(text.split())


# -- 1. the demo ----------------------------------------------------------------------------


def _virtual_trio() -> Any:
    from trio.testing import MockClock

    return ("trio", {"clock": MockClock(autojump_threshold=0)})


@pytest.mark.parametrize("anyio_backend", [_virtual_trio()])
async def test_the_demos_default_latency_makes_its_protect_last_3_to_10_seconds() -> None:
    """The demo's default latency (the CLI's `realistic`) at a real cloud's pace: its protect
    of the 40-resource application lasts 3-10 s (virtual time: the test takes no time)."""
    cloud = sim.SimCloud.generate(40, seed=7, latency=_latency_profiles(sim)["realistic"])
    engine = Engine(sim.all_protections(cloud), sim.all_protectables(cloud), discover=False)
    async with engine:
        start = anyio.current_time()
        outcome = await engine.protect(demo_plan(cloud))
        took = anyio.current_time() - start
    assert outcome.status.value == "succeeded"
    assert 3.0 <= took <= 10.0, took
    [group] = outcome.groups.values()
    assert not group.crash_consistent  # the quiesce windows stay inside the demo's budget


@pytest.mark.slow
def test_the_demo_explains_each_figure_and_takes_a_latency(cli: Cli) -> None:
    """demo --latency zero: each figure of the summary gets a line of what it means and what
    is good, then a pointer to the docs section, which exists."""
    out = _flat(cli("demo", "--latency", "zero", "--plain", "--resources", "12").output)
    assert "latency zero" in out
    for figure in ("barrier cut:", "cuts ", "skew ", "quiesce windows ", "mode "):
        assert re.search(re.escape(figure) + r"[^.]*(: | means )", out), figure
    assert "Good: every resource of a snapshotting type has one" in out
    assert re.search(r"cuts (\d+) of 12: ", out)
    assert f"More on each figure: {FIGURES_DOC}" in out
    doc, _, anchor = FIGURES_DOC.partition("#")
    headings = [
        re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.+)$", (ROOT / doc).read_text(), re.M)
    ]
    assert anchor in headings
    # the live application was protected, restored and checked, beside the store
    assert "Verdict on the restored stores of the live application: consistent:" in out
    assert (cli.root / "demo-app" / "a.db").is_file()
    assert list((cli.root / "demo-app").glob("restored-*/a.db"))
    bad = cli("demo", "--latency", "warp", code=EXIT_BAD_INPUT)
    assert "expected realistic, zero or slow" in bad.output


async def test_simulated_plugins_report_progress_in_every_hook_that_works(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each simulated resource reports progress from each hook that does work."""
    seen: set[tuple[str, Hook]] = set()
    original = HookContext.report_progress

    def spy(self: HookContext, *args: Any, **kwargs: Any) -> None:
        seen.add((self.resource.type, self.hook))
        original(self, *args, **kwargs)

    monkeypatch.setattr(HookContext, "report_progress", spy)
    cloud = sim.SimCloud.generate(12, seed=3, latency=sim.LatencyProfile.zero())
    engine = Engine(sim.all_protections(cloud), sim.all_protectables(cloud), discover=False)
    async with engine:
        await engine.protect(demo_plan(cloud))
    pb, pf, main, complete = Hook.PREPARE_BEGIN, Hook.PREPARE_FINISH, Hook.MAIN, Hook.COMPLETE
    expected = {
        ("OS::Nova::Server", pb),
        ("OS::Nova::Server", pf),
        ("OS::Nova::Server", main),
        ("OS::Cinder::Volume", pf),
        ("OS::Cinder::Volume", main),
        ("OS::Cinder::Volume", complete),
        ("OS::Glance::Image", main),
        ("OS::Keystone::Project", main),
        ("OS::Neutron::Network", main),
    }
    types = {r.type for r in cloud.project_resources()} | {t for t, _ in seen}
    assert {e for e in expected if e[0] in types} <= seen


# -- 3. the status line and the barrier lines ---------------------------------------------------


def _stats(**changes: Any) -> Any:
    from karbor_async._summary import RunStatistics

    base = RunStatistics(
        run_id="r",
        operation=OperationKind.PROTECT,
        elapsed=2.0,
        resources=2000,
        by_status={ResourceStatus.RUNNING: 1000, ResourceStatus.SUCCEEDED: 1000},
        running={Hook.MAIN: 1000},
        hooks_finished=0,
        cuts=1000,
        frozen=0,
        skew=0.002,
        barriers_released=("default:cut", "default:main"),
        bytes_done=4096 * 10,
        bytes_total=4096 * 10,
        active=(),
        mains_done=10,
        mains_running=1000,
        mains_waiting=990,
        reporting=10,
    )
    return attrs.evolve(base, **changes)


def test_the_status_line_never_says_100_percent_while_copies_run() -> None:
    """Data is 'X of Y' over the copies that reported a total; copies done/running/waiting;
    the barriers are always named."""
    line = _stats_line(_stats())
    assert "%" not in line
    assert "data 41.0k of 41.0k (over the 10 that reported a total)" in line
    assert "copies: 10 done, 1000 running, 990 waiting" in line
    assert "barriers: default:cut released, default:main released" in line
    waiting = _stats_line(_stats(barriers_released=(), barriers_pending=("db:cut", "db:main")))
    assert "barriers: db:cut waiting, db:main waiting" in waiting


class _SlowCut:
    def __init__(self, started: anyio.Event, go: anyio.Event) -> None:
        self.started, self.go = started, go

    async def on_prepare_finish(self, ctx: HookContext) -> None:
        ctx.mark_cut()
        self.started.set()
        await self.go.wait()


class _CutPlugin(ProtectionPlugin):
    name = "slow-cut"
    types = (ResourceType("T::Disk"),)

    def __init__(self) -> None:
        self.op = _SlowCut(anyio.Event(), anyio.Event())

    def get_protect_operation(self, resource_type: str) -> object:
        return self.op


async def test_cuts_are_counted_when_they_return() -> None:
    """A cut marked inside a still-running on_prepare_finish is not counted yet."""
    plugin = _CutPlugin()
    engine = Engine([plugin], store=MemoryStore(), discover=False)
    async with engine:
        run = await engine.build_protect(Plan(name="p", resources=[Resource("T::Disk", "d1")]))
        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.execute, run)
            await plugin.op.started.wait()
            assert run.statistics().cuts == 0 and run.statistics().skew is None
            plugin.op.go.set()
        assert run.statistics().cuts == 1


def test_plain_barrier_lines_print_the_released_events_instant(cli: Cli) -> None:
    """--plain: a line per barrier with its BARRIER_RELEASED instant from the run's start."""
    out = cli("protect", str(cli.plan), "--simcloud", SIM, "--plain").output
    [cp] = cli.json("checkpoints", "list")["checkpoints"]
    events = [json.loads(line) for line in cli("events", cp["id"], "--json").stdout.splitlines()]
    t0 = next(e["mono"] for e in events if e["kind"] == "run_started")
    for e in events:
        if e["kind"] == "barrier_released":
            which = e["data"]["barrier"]
            at = f"{(e['mono'] - t0) * 1000:.2f} ms"
            assert f"{which} barrier of group default released at {at} (" in out, out
    assert "main barrier of group default released at" in out and "cuts returned" in out


def test_a_cancel_with_nothing_frozen_says_so(cli: Cli) -> None:
    """Cancelled during main (every server already thawed): not 'every frozen resource was
    thawed (N of N)' but that nothing was frozen."""
    cp = _protected(cli)
    outcome = _outcome(cli, cp)
    said = cancel_summary(outcome, 0)
    assert said.startswith("nothing was frozen when it was cancelled") and "thawed (" not in said
    assert "were already thawed" in said
    assert cancel_summary(outcome, 4) == (
        "every resource frozen when it was cancelled was thawed (4)"
    )


def _protected(cli: Cli) -> str:
    doc = cli.json("protect", str(cli.plan), "--simcloud", SIM)
    return str(doc["outcome"]["checkpoint_id"])


def _outcome(cli: Cli, cp: str) -> Any:
    from karbor_async.store import RunOutcome

    return RunOutcome.from_json(cli.json("checkpoints", "show", cp)["checkpoint"]["outcome"])


# -- 4. checkpoints list -------------------------------------------------------------------------


def test_checkpoints_list_hides_deleted_and_claims_no_consistency_for_failures(cli: Cli) -> None:
    """error/cancelled checkpoints show consistency '-'; deleted ones need --all or
    --status deleted; a restore's run id is labelled 'restore run'."""
    kept = _protected(cli)
    gone = _protected(cli)
    cli("delete", gone, "--simcloud", SIM)
    fault = "protect:on_main:OS::Cinder::Volume:raise"
    args = ("protect", str(cli.plan), "--simcloud", SIM, "--simcloud-fault", fault)
    failed = cli.json(*args, code=EXIT_FAILED)["outcome"]["checkpoint_id"]
    listed = {c["id"]: c for c in cli.json("checkpoints", "list")["checkpoints"]}
    assert set(listed) == {kept, failed}
    assert listed[failed]["crash_consistent"] is None
    assert listed[kept]["crash_consistent"] is False
    table = cli("checkpoints", "list").output
    rows = {line.split()[1]: line for line in table.splitlines() if "│" in line and "-" in line}
    assert rows[failed].rstrip(" │").endswith("-") and "application" in rows[kept]
    assert gone not in table and "--all shows them" in table
    assert gone in cli("checkpoints", "list", "--all").output
    deleted = cli.json("checkpoints", "list", "--status", "deleted")["checkpoints"]
    assert [c["id"] for c in deleted] == [gone]
    record = _record(cli, failed)
    assert _consistency(attrs.evolve(record, status=CheckpointStatus.CANCELLED)) == "-"
    restored = cli("restore", kept, "--simcloud", SIM, "--plain").output
    assert re.search(r"as restore run \S+", restored) and "(restore run " in restored


def _record(cli: Cli, cp: str) -> Any:
    from karbor_async import SqliteStore

    async def read() -> Any:
        async with SqliteStore.open(cli.root / "karbor.db") as store:
            return await store.get_checkpoint(cp)

    return anyio.run(read, backend="asyncio")


# -- 5. failure lines ---------------------------------------------------------------------------


def test_one_failure_line_per_failed_resource(cli: Cli) -> None:
    """TYPE#ID HOOK: ExceptionType: message, the resource and hook said once."""
    fault = "protect:on_main:OS::Cinder::Volume:raise"
    args = ("protect", str(cli.plan), "--simcloud", SIM, "--simcloud-fault", fault, "--plain")
    out = cli(*args, code=EXIT_FAILED).output
    lines = [line.strip() for line in out.splitlines() if "SimulatedFault" in line]
    failures = [line for line in lines if line.startswith("OS::")]
    assert failures
    for line in failures:
        m = re.fullmatch(
            r"(OS::Cinder::Volume#vol-\d+) on_main: SimulatedFault: simulated fault in protect "
            r"on_main of (\S+) \(injected by karbor_simcloud\)",
            line,
        )
        assert m, line
        assert line.count("on_main:") == 1 and "HookError" not in line


def test_failure_line_of_a_timeout_names_the_engines_error() -> None:
    from karbor_async.store import ResourceOutcome

    r = ResourceOutcome(
        resource=Resource("T::Disk", "d1"),
        group="default",
        status=ResourceStatus.FAILED,
        failed_hook=Hook.MAIN,
        error="Traceback...\nkarbor_async.exceptions.HookTimeoutError: T::Disk:d1 on_main: "
        "exceeded its time limit of 5 s",
    )
    assert failure_line(r) == "T::Disk#d1 on_main: HookTimeoutError: exceeded its time limit of 5 s"
    # errors are written TYPE#ID now (str(Resource)); the older TYPE:ID above still reads once
    assert str(r.resource) == "T::Disk#d1"
    now = r.error.replace("T::Disk:d1", "T::Disk#d1")  # type: ignore[union-attr]
    assert failure_line(attrs.evolve(r, error=now)) == failure_line(r)


# -- 6. errors: plan files, unknown ids, options -------------------------------------------------


def test_every_plan_file_mistake_is_reported_with_its_line(cli: Cli) -> None:
    bad = cli.root / "bad.toml"
    bad.write_text(
        'name = "x"\nbarier = "cut"\nresources = ["A#1", "nohash"]\n'
        "[timeouts]\nhook = -1\n[limits]\nfoo = 0\n"
    )
    result = cli("protect", str(bad), "--simcloud", SIM, code=EXIT_BAD_INPUT)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert [e.split(": ")[1] for e in errors] == [
        f"{bad}:2",
        f"{bad}:3",
        f"{bad}:5",
        f"{bad}:7",
    ], result.output
    assert "barier: unknown key; did you mean 'barrier'?" in errors[0]
    assert "resources[1]: expected a resource written TYPE#ID" in errors[1]
    doc = cli.json("protect", str(bad), "--simcloud", SIM, code=EXIT_BAD_INPUT)
    assert len(doc["errors"]) == 4 and doc["exit_code"] == EXIT_BAD_INPUT


@pytest.mark.parametrize(
    ("args", "pointer"),
    [
        (("checkpoints", "show", "nope"), "`karbor-async checkpoints list` shows the checkpoints"),
        (("restore", "nope", "--simcloud", SIM), "`karbor-async checkpoints list`"),
        (("runs", "show", "nope"), "`karbor-async runs list` shows the runs"),
        (("events", "nope"), "`karbor-async runs list`"),
    ],
)
def test_unknown_ids_point_to_the_listing(cli: Cli, args: tuple[str, ...], pointer: str) -> None:
    _protected(cli)
    assert pointer in _flat(cli(*args, code=EXIT_BAD_INPUT).output)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("checkpoints", "list", "--limit", "x"), "Invalid value for '--limit'"),
        (("checkpoints", "list", "--status", "gone"), "Invalid value for '--status'"),
        (("protect", "--bogus"), "No such option: --bogus"),
        (("protect",), "Missing argument"),
        (("frobnicate",), "No such command 'frobnicate'"),
    ],
)
def test_option_errors_are_one_error_line(cli: Cli, args: tuple[str, ...], needle: str) -> None:
    """A bad option value, an unknown option or command, a missing argument: one
    `error: ...` line on stderr, exit 2, no usage block."""
    result = cli(*args, code=EXIT_BAD_INPUT)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert "Usage:" not in result.output and "--help`)" in lines[0]


# -- 7. plugins -----------------------------------------------------------------------------------


def test_plugins_show_each_parameters_type_default_required_secret_and_description(
    cli: Cli,
) -> None:
    doc = cli.json("plugins")
    [server] = [p for p in doc["protections"] if p["type"] == "OS::Nova::Server"]
    details = {d["name"]: d for d in server["parameter_details"]}
    assert details["quiesce"] == {
        "name": "quiesce",
        "type": "bool",
        "default": True,
        "required": False,
        "secret": False,
        "operations": None,
        "description": "freeze file systems first",
    }
    table = _flat(cli("plugins").output)
    assert "Parameters" in table
    assert re.search(r"OS::Nova::Server .*quiesce .*bool .*true .*no .*no .*all .*freeze", table)


# -- 9. README -----------------------------------------------------------------------------------


def test_the_readme_states_the_python_version() -> None:
    needed = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    version = needed.removeprefix(">=")
    assert f"Python {version} or newer" in (ROOT / "README.md").read_text()
