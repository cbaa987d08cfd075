"""Resolved secrets never leave through errors, events, logs, progress, saved info, the
store, the report, the CLI or what ``execute()`` raises (DESIGN.md section 7a)."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import traceback
from pathlib import Path
from urllib.parse import quote

import pytest

from helpers import install_plugin
from karbor_async import (
    Engine,
    FsBank,
    HookContext,
    MemoryStore,
    Param,
    Plan,
    ProtectionPlugin,
    Resource,
    ResourceType,
    RunError,
    SqliteStore,
)
from karbor_async._report import write_report
from karbor_async.exceptions import ScrubbedError

SECRET = "hunter2-Ü/+ &x"
"""Non-ASCII and URL-unsafe, so every spelling differs from the plain one."""
SPELLINGS = {
    "literal": SECRET,
    "repr body": repr(SECRET)[1:-1],
    "utf-8 bytes repr body": repr(SECRET.encode())[2:-1],
    "percent-encoded": quote(SECRET, safe=""),
}
DB = "Test::Db"


class _Leaky:
    """Every way a careless plugin could leak its password."""

    async def on_prepare_begin(self, ctx: HookContext) -> None:
        pw = str(ctx.parameters["password"])
        ctx.log.info("connecting", password=pw, url=f"db://u:{quote(pw, safe='')}@h")
        ctx.report_progress(0.5, message=f"logged in as {pw}")
        ctx.save(note=repr(pw))

    async def on_main(self, ctx: HookContext) -> None:
        pw = str(ctx.parameters["password"])
        try:
            raise KeyError(pw)
        except KeyError as inner:
            raise ValueError(f"login failed for {pw!r} ({pw.encode()!r})") from inner


class Leaky(ProtectionPlugin):
    name = "leaky"
    types = (ResourceType(DB, parameters={"password": Param(str, secret=True, required=True)}),)

    def get_protect_operation(self, resource_type: str) -> object:
        return _Leaky()


def _assert_clean(where: str, text: str) -> None:
    for name, spelling in SPELLINGS.items():
        assert spelling not in text, f"the secret's {name} leaked into {where}"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_leaky_plugin_leaks_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, anyio_backend: str
) -> None:
    caplog.set_level(logging.DEBUG)

    async def resolver(name: str) -> str:
        assert name == "db-password"
        return SECRET

    db = tmp_path / "karbor.db"
    plan = Plan(
        name="db",
        resources=[Resource(DB, "d1")],
        parameters={DB: {"password": "db-password"}},
    )
    async with (
        SqliteStore.open(db) as store,
        Engine(
            [Leaky()], store=store, bank=FsBank(tmp_path / "bank"), secrets=resolver, discover=False
        ) as engine,
    ):
        with pytest.raises(RunError) as info:
            await engine.protect(plan)
        run_id = info.value.outcome.run_id
        html, _data = await write_report(store, run_id)
        events = await store.read_events(run_id)
    raised = info.value
    _assert_clean("str() of the RunError", str(raised))
    _assert_clean("repr() of the RunError", repr(raised))
    _assert_clean("the RunError's traceback", "".join(traceback.format_exception(raised)))
    hook_error = raised.exceptions[0]
    assert isinstance(hook_error.__cause__, ScrubbedError)
    assert hook_error.__cause__.original_type == "ValueError"
    assert "***" in str(hook_error.__cause__)
    _assert_clean("the outcome", repr(raised.outcome))
    _assert_clean("the event log", repr([e.to_json() for e in events]))
    _assert_clean("the HTML report", html)
    _assert_clean("the captured logs", caplog.text)
    assert "login failed" in caplog.text or "ValueError" in caplog.text
    with sqlite3.connect(db) as conn:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            rows = conn.execute(f"SELECT * FROM {table}").fetchall()
            _assert_clean(f"the {table} table", repr(rows))


CLI_PLUGIN = """
from urllib.parse import quote
from karbor_async import HookContext, Param, ProtectionPlugin, ResourceType

class _Op:
    async def on_main(self, ctx: HookContext) -> None:
        pw = str(ctx.parameters["password"])
        ctx.report_progress(0.5, message=f"as {pw}")
        raise ValueError(f"login failed for {pw!r} {pw.encode()!r} {quote(pw, safe='')}")

class Leaky(ProtectionPlugin):
    name = "leaky-cli"
    types = (ResourceType("Test::Db", parameters={"password": Param(str, secret=True)}),)
    def get_protect_operation(self, resource_type): return _Op()

plugin = Leaky()
"""


@pytest.mark.slow
def test_the_cli_prints_no_secret(tmp_path: Path) -> None:
    """Through the CLI (secret from KARBOR_SECRET_*): stdout, stderr, --json, report."""
    site = install_plugin(
        tmp_path,
        "leaky_cli",
        CLI_PLUGIN,
        "[karbor_async.protections]\nleaky = leaky_cli_plugin:plugin\n",
    )
    plan = tmp_path / "plan.toml"
    plan.write_text(
        'name = "db"\nresources = [{ type = "Test::Db", id = "d1" }]\n\n'
        '[parameters."Test::Db"]\npassword = "db-password"\n'
    )
    env = {
        **os.environ,
        "KARBOR_DB": str(tmp_path / "karbor.db"),
        "KARBOR_BANK": str(tmp_path / "bank"),
        "KARBOR_SECRET_DB_PASSWORD": SECRET,
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("KARBOR_SIMCLOUD", None)
    cli = [sys.executable, "-c", "from karbor_async._cli import main; main()"]
    outputs = []
    for args in (
        ["protect", str(plan), "--plain"],
        ["--log-level", "debug", "protect", str(plan), "--json"],
    ):
        proc = subprocess.run([*cli, *args], capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 1, proc.stderr
        outputs.append(proc.stdout + proc.stderr)
    runs = subprocess.run(
        [*cli, "runs", "list", "--json"], capture_output=True, text=True, env=env, timeout=60
    )
    outputs.append(runs.stdout + runs.stderr)
    run_id = json.loads(runs.stdout)["runs"][0]["run_id"]
    show = subprocess.run(
        [*cli, "runs", "show", run_id], capture_output=True, text=True, env=env, timeout=60
    )
    outputs.append(show.stdout + show.stderr)
    report = tmp_path / "t.html"
    subprocess.run([*cli, "report", run_id, "-o", str(report)], env=env, timeout=60, check=True)
    outputs.append(report.read_text())
    for text in outputs:
        _assert_clean("the CLI output", text)
    assert "login failed" in outputs[0]


async def test_scrubbed_on_both_backends(caplog: pytest.LogCaptureFixture) -> None:
    """The same leaky plugin with the in-memory store, on asyncio and trio."""
    caplog.set_level(logging.DEBUG)

    async def resolver(name: str) -> str:
        return SECRET

    store = MemoryStore()
    plan = Plan(
        name="db", resources=[Resource(DB, "d1")], parameters={DB: {"password": "db-password"}}
    )
    async with Engine([Leaky()], store=store, secrets=resolver, discover=False) as engine:
        with pytest.raises(RunError) as info:
            await engine.protect(plan)
        events = await store.read_events(info.value.outcome.run_id)
        saved = await store.load_saved_info(info.value.outcome.run_id)
    _assert_clean("the RunError's traceback", "".join(traceback.format_exception(info.value)))
    _assert_clean("the event log", repr([e.to_json() for e in events]))
    _assert_clean("the saved info", repr(saved))
    _assert_clean("the captured logs", caplog.text)
    assert "***" in repr(saved)
