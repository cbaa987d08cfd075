"""The ``karbor-async`` command line against the embedded defaults (SQLite file, file bank).

Commands run in-process through typer's CliRunner (asyncio only: the SQLite store
needs it), except Ctrl-C, which is a real SIGINT sent to a subprocess.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import structlog
from typer.testing import CliRunner

from karbor_async import Engine, MemoryStore, Param, Plan, Resource, ResourceType, SqliteStore
from karbor_async._cli import EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_FAILED, EXIT_OK, app
from karbor_async._secrets_cli import CliSecrets, SecretsFileError, env_name
from karbor_async.exceptions import SecretError
from karbor_async.plugin import HookContext, ProtectionPlugin

pytest.importorskip("karbor_simcloud")

PROJECT = "OS::Keystone::Project"
PLAN = f"""\
name = "app"
barrier = "cut"
resources = [{{ type = "{PROJECT}", id = "prj-0000001" }}]

[timeouts]
hook = 30
"""
SIM = "12:3:zero"


@pytest.fixture(autouse=True)
def _keep_structlog() -> Iterator[None]:
    """The CLI configures structlog (it is an application); give the suite its own back."""
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


class Cli:
    """Invokes the app in-process with the store and bank in a temporary directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.env = {
            "KARBOR_DB": str(root / "karbor.db"),
            "KARBOR_BANK": str(root / "bank"),
            "KARBOR_SIMCLOUD": None,
            "KARBOR_SECRETS_FILE": None,
            "COLUMNS": "200",
        }
        self.runner = CliRunner()
        self.plan = root / "plan.toml"
        self.plan.write_text(PLAN)

    def __call__(self, *args: str, code: int | None = EXIT_OK, **env: str) -> Any:
        result = self.runner.invoke(app, list(args), env={**self.env, **env})
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        assert "Traceback" not in result.output
        if code is not None:
            assert result.exit_code == code, (result.exit_code, result.output)
        return result

    def json(self, *args: str, code: int = EXIT_OK) -> Any:
        return json.loads(self(*args, "--json", code=code).stdout)

    def protect(self, sim: str = SIM) -> str:
        doc = self.json("protect", str(self.plan), "--simcloud", sim)
        assert doc["outcome"]["status"] == "succeeded"
        return str(doc["outcome"]["checkpoint_id"])


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


def test_help_documents_commands_and_exit_codes(cli: Cli) -> None:
    """--help lists every command and the exit codes."""
    out = cli("--help").output
    for command in (
        "protect",
        "restore",
        "delete",
        "checkpoints",
        "runs",
        "events",
        "recover",
        "report",
        "plugins",
        "demo",
    ):
        assert command in out
    assert "Exit codes: 0 success; 1 a run failed; 2 bad input" in " ".join(out.split())
    assert "3 cancelled" in " ".join(out.split())


def test_protect_restore_delete_round_trip(cli: Cli) -> None:
    """Protect a plan file on the simulated cloud, inspect it, restore it, delete it."""
    result = cli("protect", str(cli.plan), "--simcloud", SIM, "--plain")
    assert "SIMULATED cloud" in result.output
    assert "protect succeeded" in result.output
    [cp] = cli.json("checkpoints", "list")["checkpoints"]
    assert cp["status"] == "available" and cp["resources"] == 12 and cp["plan_name"] == "app"
    shown = cli.json("checkpoints", "show", cp["id"])["checkpoint"]
    assert shown["outcome"]["status"] == "succeeded" and len(shown["runs"]) == 1
    assert "checkpoint " + cp["id"] in cli("checkpoints", "show", cp["id"]).output

    doc = cli.json("restore", cp["id"], "--simcloud", SIM, "--param", "*.target_project=prj-new")
    assert doc["exit_code"] == EXIT_OK and doc["outcome"]["operation"] == "restore"
    restored = {(t, i): new for t, i, new in doc["outcome"]["restored"]}
    assert restored[(PROJECT, "prj-0000001")] == "prj-new"
    assert len(restored) == 12

    runs = cli.json("runs", "list")["runs"]
    assert [r["operation"] for r in runs] == ["restore", "protect"]
    run_doc = cli.json("runs", "show", runs[0]["run_id"])["run"]
    assert run_doc["status"] == "succeeded" and run_doc["events"] > 0
    assert "What each phase did" in cli("runs", "show", cp["id"]).output

    deleted = cli.json("delete", cp["id"], "--simcloud", SIM)
    assert deleted["outcome"]["status"] == "succeeded"
    assert cli.json("checkpoints", "show", cp["id"])["checkpoint"]["status"] == "deleted"
    assert not (cli.root / "bank" / cp["id"]).exists()
    # a deleted checkpoint cannot be restored: bad input, not a traceback
    gone = cli("restore", cp["id"], "--simcloud", SIM, code=EXIT_BAD_INPUT)
    assert "only an available checkpoint can be restored" in gone.output


def test_events_since_and_json_lines(cli: Cli) -> None:
    """`events` prints the numbered log; --since N starts after N; --json is one event a line."""
    cp = cli.protect()
    lines = [json.loads(line) for line in cli("events", cp, "--json").stdout.splitlines()]
    seqs = [e["seq"] for e in lines]
    assert seqs == list(range(1, len(seqs) + 1))
    assert lines[0]["kind"] == "run_started" and lines[-1]["kind"] == "run_finished"
    later = [
        json.loads(x) for x in cli("events", cp, "--since", "10", "--json").stdout.split("\n") if x
    ]
    assert [e["seq"] for e in later] == seqs[10:]
    text = cli("events", cp, "--since", str(seqs[-2])).output.splitlines()
    assert len(text) == 1 and "run_finished" in text[0]
    # --follow on a finished run prints what is there and ends
    assert "run_finished" in cli("events", cp, "--follow").output


def test_report_writes_a_self_contained_timeline(cli: Cli) -> None:
    """`report RUN -o FILE` writes one HTML file with a row per resource in its data."""
    cp = cli.protect()
    target = cli.root / "timeline.html"
    doc = cli.json("report", cp, "-o", str(target))
    assert doc["resources"] == 12 and doc["path"] == str(target)
    page = target.read_text()
    assert page.startswith("<!DOCTYPE html>") and 'id="timeline-data"' in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")


def test_prune_keeps_the_newest_available_checkpoints(cli: Cli) -> None:
    """prune --keep 1 deletes the older available checkpoints through the delete operation."""
    made = [cli.protect() for _ in range(3)]
    dry = cli.json("checkpoints", "prune", "--plan", "app", "--keep", "1", "--dry-run")
    assert dry["would_delete"] == made[1::-1] and dry["deleted"] == []
    doc = cli.json("checkpoints", "prune", "--plan", "app", "--keep", "1", "--simcloud", SIM)
    assert doc["kept"] == [made[2]] and sorted(doc["deleted"]) == sorted(made[:2])
    listed = cli.json("checkpoints", "list", "--all")["checkpoints"]
    status = {c["id"]: c["status"] for c in listed}
    assert status == {made[2]: "available", made[1]: "deleted", made[0]: "deleted"}
    runs = cli.json("runs", "list")["runs"]
    assert sum(r["operation"] == "delete" for r in runs) == 2
    again = cli("checkpoints", "prune", "--plan", "app", "--keep", "1", "--simcloud", SIM)
    assert "deleted 0" in again.output


def test_a_failed_run_exits_1_and_can_clean_up(cli: Cli) -> None:
    """A hook failure: exit 1, the resource and error shown; delete_on_failure cleans up."""
    broken = cli.root / "broken.toml"
    broken.write_text(
        'name = "broken"\ndelete_on_failure = true\nresources = '
        '["OS::Keystone::Project#prj-0000001", "OS::Neutron::Network#net-missing"]\n'
    )
    result = cli("protect", str(broken), "--simcloud", SIM, code=EXIT_FAILED)
    assert "protect failed" in result.output
    assert "SimCloudError: the simulated cloud has no network 'net-missing'" in result.output
    assert "the plan asks for cleanup" in result.output
    [cp] = cli.json("checkpoints", "list", "--status", "deleted")["checkpoints"]
    assert cp["status"] == "deleted"


def test_read_only_commands_run_no_hooks(cli: Cli) -> None:
    """Listing, showing, events, report and plugins add no run and no event to the store."""
    cp = cli.protect()
    before = cli.json("runs", "list")["runs"]
    events_before = len(cli("events", cp, "--json").stdout.splitlines())
    for args in (
        ("checkpoints", "list"),
        ("checkpoints", "show", cp),
        ("runs", "list"),
        ("runs", "show", cp),
        ("events", cp),
        ("report", cp, "-o", str(cli.root / "r.html")),
        ("plugins",),
    ):
        cli(*args)
    assert cli.json("runs", "list")["runs"] == before
    assert len(cli("events", cp, "--json").stdout.splitlines()) == events_before
    plugins = cli.json("plugins")
    assert PROJECT in {p["type"] for p in plugins["protections"]}


def test_recover_reports_what_it_can(cli: Cli) -> None:
    """With nothing unfinished, recover says so and succeeds."""
    cli.protect()
    assert "nothing to recover" in cli("recover").output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("checkpoints", "show", "nope"), "no checkpoint with id 'nope'"),
        (("runs", "show", "nope"), "no run with id 'nope'"),
        (("events", "nope"), "no run with id 'nope'"),
        (("report", "nope"), "no run with id 'nope'"),
        (("restore", "nope", "--simcloud", SIM), "no checkpoint with id 'nope'"),
        (("delete", "nope", "--simcloud", SIM), "no checkpoint with id 'nope'"),
        (("runs", "list", "--checkpoint", "nope"), "no checkpoint with id 'nope'"),
    ],
)
def test_unknown_ids_are_bad_input(cli: Cli, args: tuple[str, ...], needle: str) -> None:
    """An unknown checkpoint or run id is exit 2 with a message, never a traceback."""
    cli.protect()
    assert needle in cli(*args, code=EXIT_BAD_INPUT).output


def test_json_errors_are_json(cli: Cli) -> None:
    """Under --json an error is also a JSON document on stdout."""
    cli.protect()
    result = cli("checkpoints", "show", "nope", "--json", code=EXIT_BAD_INPUT)
    doc = json.loads(result.stdout)
    assert doc["exit_code"] == EXIT_BAD_INPUT and "nope" in doc["error"]


def test_store_files_that_cannot_be_used(cli: Cli) -> None:
    """A missing store for a read-only command, or a foreign file, is bad input."""
    missing = cli("checkpoints", "list", "--db", str(cli.root / "none.db"), code=EXIT_BAD_INPUT)
    assert "no checkpoint store at" in missing.output
    assert not (cli.root / "none.db").exists()
    foreign = cli.root / "notes.db"
    foreign.write_text("shopping list\n")
    result = cli("checkpoints", "list", "--db", str(foreign), code=EXIT_BAD_INPUT)
    assert "not a karbor-async store" in result.output
    assert foreign.read_text() == "shopping list\n"


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("bad.toml", 'name = "x"\nresources = [\n', "bad.toml:2: invalid TOML"),
        (
            "bad.yaml",
            "name: x\nresources:\n  - {type: A}\n",
            "bad.yaml:3: resources[0]: the resource is missing the key 'id'",
        ),
        (
            "hook.toml",
            'name = "x"\nresources = ["A#1"]\n[timeouts]\nhook = -1\n',
            "hook.toml:4: timeouts.hook: expected a positive number of seconds",
        ),
        ("plan.txt", "", "expected .toml, .yaml or .yml"),
    ],
)
def test_bad_plan_files_are_bad_input(cli: Cli, name: str, text: str, needle: str) -> None:
    """A bad plan file: exit 2, the file, line and key in the message, no traceback."""
    path = cli.root / name
    path.write_text(text)
    result = cli("protect", str(path), "--simcloud", SIM, code=EXIT_BAD_INPUT)
    assert needle in " ".join(result.output.split())
    assert not (cli.root / "karbor.db").exists()  # nothing was opened or stored


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--simcloud", "many"), "expected N[:SEED[:LATENCY]]"),
        (("--simcloud", "12:3:warp"), "expected realistic, zero or slow"),
        ((), "pass --simcloud N[:SEED]"),
    ],
)
def test_simcloud_option_errors(cli: Cli, args: tuple[str, ...], needle: str) -> None:
    """The simulated cloud is opt-in and its option is checked."""
    result = cli("protect", str(cli.plan), *args, code=EXIT_BAD_INPUT)
    assert needle in " ".join(result.output.split())


def test_bad_restore_parameters(cli: Cli) -> None:
    """--param needs TYPE[#ID].KEY=VALUE; an unknown parameter names the resource and key."""
    cp = cli.protect()
    bad = cli("restore", cp, "--simcloud", SIM, "--param", "flavor", code=EXIT_BAD_INPUT)
    assert "expected TYPE[#ID].KEY=VALUE" in bad.output
    unknown = cli(
        "restore", cp, "--simcloud", SIM, "--param", f"{PROJECT}.colour=red", code=EXIT_BAD_INPUT
    )
    assert "unknown parameter 'colour'" in unknown.output


# -- secrets -----------------------------------------------------------------------------


def _private(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


async def test_secrets_come_from_the_environment_then_the_file(tmp_path: Path) -> None:
    """KARBOR_SECRET_<NAME> wins; then the file, by exact or environment spelling."""
    assert env_name("db-password.main") == "KARBOR_SECRET_DB_PASSWORD_MAIN"
    lines = _private(tmp_path / "secrets", "# comment\ndb-password=from-file\nTOKEN = 'abc'\n")
    resolver = CliSecrets.from_options(lines, environ={"KARBOR_SECRET_API_KEY": "from-env"})
    assert await resolver("api-key") == "from-env"
    assert await resolver("db-password") == "from-file"
    assert await resolver("TOKEN") == "abc"
    toml = _private(tmp_path / "secrets.toml", '"db-password" = "t1"\n')
    assert await CliSecrets.from_options(toml, environ={})("db-password") == "t1"
    with pytest.raises(SecretError, match="no environment variable KARBOR_SECRET_NOPE") as info:
        await resolver("nope")
    assert "from-file" not in str(info.value)


def test_a_secrets_file_others_can_read_is_refused(tmp_path: Path) -> None:
    """Group- or world-accessible secrets files are refused with the fix."""
    loose = _private(tmp_path / "secrets", "a=b\n", mode=0o644)
    with pytest.raises(SecretsFileError, match="chmod 600"):
        CliSecrets.from_options(loose)
    with pytest.raises(SecretsFileError, match="no such file"):
        CliSecrets.from_options(tmp_path / "absent")
    with pytest.raises(SecretsFileError, match=r":2: expected NAME=value"):
        CliSecrets.from_options(_private(tmp_path / "broken", "a=b\njunk\n"))


def test_cli_refuses_a_loose_secrets_file(cli: Cli) -> None:
    """protect --secrets-file with mode 644: exit 2 before anything runs."""
    loose = _private(cli.root / "secrets", "a=b\n", mode=0o644)
    result = cli(
        "protect",
        str(cli.plan),
        "--simcloud",
        SIM,
        "--secrets-file",
        str(loose),
        code=EXIT_BAD_INPUT,
    )
    assert "readable only by its owner" in " ".join(result.output.split())
    assert not (cli.root / "karbor.db").exists()


class _Vault(ProtectionPlugin):
    """A plugin with a secret parameter; it records what its hook saw."""

    name = "vault"
    types = (
        ResourceType("Test::Db", snapshots=False, parameters={"password": Param(str, secret=True)}),
    )

    def __init__(self) -> None:
        self.seen: list[str] = []

    def get_protect_operation(self, resource_type: str) -> object:
        plugin = self

        class Op:
            async def on_main(self, ctx: HookContext) -> None:
                plugin.seen.append(str(ctx.parameters["password"]))

        return Op()


async def test_the_cli_resolver_feeds_secret_parameters(tmp_path: Path) -> None:
    """A hook gets the value from the secrets file; the stored plan keeps the reference."""
    secrets = _private(tmp_path / "s.toml", '"db-password" = "hunter2"\n')
    store = MemoryStore()
    plugin = _Vault()
    engine = Engine(
        [plugin], store=store, secrets=CliSecrets.from_options(secrets, {}), discover=False
    )
    async with engine:
        plan = Plan(
            name="db",
            resources=[Resource("Test::Db", "d1")],
            parameters={"Test::Db": {"password": "db-password"}},
        )
        outcome = await engine.protect(plan)
        assert plugin.seen == ["hunter2"]
        stored = await store.get_checkpoint(outcome.checkpoint_id)
        assert stored.plan["parameters"]["Test::Db"]["password"] == "db-password"
        missing = Engine([plugin], store=MemoryStore(), secrets=CliSecrets({}, {}), discover=False)
        async with missing:
            with pytest.raises(
                SecretError, match="Test::Db#d1: cannot resolve secret parameter 'password'"
            ):
                await missing.build_protect(plan)


# -- Ctrl-C ------------------------------------------------------------------------------


@pytest.mark.slow
def test_ctrl_c_cancels_the_run_and_thaws_everything(tmp_path: Path) -> None:
    """SIGINT during a slow protect: exit 3, says so, checkpoint cancelled, nothing frozen."""
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN)
    db = tmp_path / "karbor.db"
    env = {
        **os.environ,
        "KARBOR_DB": str(db),
        "KARBOR_BANK": str(tmp_path / "bank"),
        "COLUMNS": "200",
    }
    env.pop("KARBOR_SIMCLOUD", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from karbor_async._cli import main; main()",
            "protect",
            str(plan),
            "--simcloud",
            "20:3:slow",
            "--plain",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 30
        for line in proc.stdout:  # plain lines: wait until servers are frozen
            if " frozen " in line and " frozen 0 " not in line:
                break
            assert time.monotonic() < deadline, "the run never froze anything"
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == EXIT_CANCELLED, err
    assert "Ctrl-C: cancelling protect run" in err
    assert "protect cancelled" in rest
    assert "every resource frozen when it was cancelled was thawed" in rest
    assert "Traceback" not in err

    async def check() -> None:
        async with SqliteStore.open(db) as store:
            [cp] = await store.list_checkpoints()
            assert cp.status.value == "cancelled"
            assert cp.outcome is not None
            frozen = [r for r in cp.outcome.resources.values() if r.quiesced_at is not None]
            assert frozen and all(r.thawed_at is not None for r in frozen)
            events = await store.read_events(cp.id)
            kinds = [e.kind.value for e in events]
            assert kinds.count("quiesced") == kinds.count("thawed") and "thaw_failed" not in kinds

    anyio.run(check, backend="asyncio")
