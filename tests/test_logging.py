"""The library is quiet unless asked: stdlib ``logging`` under ``karbor_async``, nothing else.

Subprocesses run the README's example as an application would, with no logging
set up, with its own ``structlog.configure()``, with ``logging.basicConfig``;
the CLI's ``--log-json`` writes JSON lines on stderr; a filtered call builds
nothing, and with debug off the engine makes no per-event debug call at all.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import setup, sk
from karbor_async import (
    Engine,
    Hook,
    HookContext,
    Plan,
    ProtectionPlugin,
    Resource,
    ResourceType,
    RunError,
    _log,
)
from karbor_async.plugin import get_logger
from karbor_async.testing import Fault
from test_docs import _examples

ROOT = Path(__file__).resolve().parent.parent
README_LINE = "succeeded 0.0\n"
"""What the README's example prints: its own line, nothing else."""


def _readme_example() -> str:
    (code,) = _examples(ROOT / "README.md")
    return code


def _logs_section_blocks() -> list[str]:
    """The README's "Logs" section's python blocks: plain lines, then JSON lines."""
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Logs\n")
    section = text[start : text.index("\n## ", start + 1)]
    return re.findall(r"```python\n(.*?)```", section, re.DOTALL)


def _python(code: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "app.py"
    script.write_text(code)
    return subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_readme_example_prints_only_its_own_line(tmp_path: Path) -> None:
    """An application that never configured logging gets its own output and nothing
    else: no run_started/run_finished on stdout, nothing on stderr."""
    done = _python(_readme_example(), tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == README_LINE
    assert done.stderr == ""


def test_an_applications_structlog_configuration_does_not_print_engine_logs(
    tmp_path: Path,
) -> None:
    """The application configures structlog to print everything to stdout: its own
    lines print, the engine's do not (they go to stdlib logging, still unconfigured)."""
    app = (
        "import sys, structlog\n"
        "structlog.configure(\n"
        "    processors=[structlog.processors.JSONRenderer()],\n"
        "    logger_factory=structlog.PrintLoggerFactory(sys.stdout),\n"
        ")\n"
        'structlog.get_logger("app").info("app_started")\n'
    )
    done = _python(app + _readme_example(), tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == '{"event": "app_started"}\n' + README_LINE
    assert done.stderr == ""


def test_basic_config_shows_engine_lines_on_stderr(tmp_path: Path) -> None:
    """The README's ``logging.basicConfig(level=logging.INFO)`` turns the logs on, on
    stderr, as ``event key=value`` lines; with ``karbor_async`` at debug, one line per
    lifecycle event, resources written ``TYPE#ID``; stdout keeps only the app's line."""
    plain, _json = _logs_section_blocks()
    debug = 'logging.getLogger("karbor_async").setLevel(logging.DEBUG)\n'
    done = _python(plain + debug + _readme_example(), tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == README_LINE
    lines = done.stderr.splitlines()
    assert any(line.startswith("INFO:karbor_async.run:run_started run_id=") for line in lines)
    started = [line for line in lines if line.startswith("DEBUG:karbor_async.run:started ")]
    assert started and all("resource=OS::Cinder::Volume#v1 " in line for line in started)
    assert "Volume:v1" not in done.stderr


def test_the_readme_json_logging_example_writes_json_lines(tmp_path: Path) -> None:
    """The README's ProcessorFormatter example: one JSON object per engine line on
    stderr (no debug lines at INFO), stdout untouched."""
    _plain, json_block = _logs_section_blocks()
    done = _python(json_block + _readme_example(), tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == README_LINE
    lines = [json.loads(line) for line in done.stderr.splitlines()]
    assert [(x["event"], x["level"], x["logger"]) for x in lines] == [
        ("run_started", "info", "karbor_async.run"),
        ("run_finished", "info", "karbor_async.run"),
    ]


class _Chatty:
    async def on_main(self, ctx: HookContext) -> None:
        ctx.log.info("copying", chunks=3)


class _ChattyPlugin(ProtectionPlugin):
    name = "chatty"
    types = (ResourceType("Test::Vol"),)

    def get_protect_operation(self, resource_type: str) -> object:
        return _Chatty()


async def test_ctx_log_and_failures_write_type_hash_id(caplog: pytest.LogCaptureFixture) -> None:
    """``ctx.log`` lines go to ``karbor_async.plugins``, bound to the run, the resource
    (``TYPE#ID``) and the hook; a failing hook's warning names its resource the same way."""
    caplog.set_level(logging.INFO, logger="karbor_async")
    plan = Plan(name="p", resources=[Resource("Test::Vol", "v1")])
    async with Engine([_ChattyPlugin()], discover=False) as engine:
        outcome = await engine.protect(plan)
    [line] = [r for r in caplog.records if r.name == "karbor_async.plugins"]
    assert line.msg == {
        "run_id": outcome.run_id,
        "operation": "protect",
        "resource": "Test::Vol#v1",
        "hook": "on_main",
        "chunks": 3,
        "event": "copying",
    }
    assert line.getMessage() == (
        f"copying run_id={outcome.run_id} operation=protect resource=Test::Vol#v1 "
        "hook=on_main chunks=3"
    )

    caplog.clear()
    engine, _plugin, plan = setup([], ["v1"], faults={(sk("v1"), Hook.MAIN): Fault.RAISE})
    async with engine:
        with pytest.raises(RunError):
            await engine.protect(plan)
    [failed] = [
        r.msg
        for r in caplog.records
        if isinstance(r.msg, dict) and r.msg.get("event") == "hook_failed"
    ]
    assert failed["resource"] == sk("v1") and failed["hook"] == "on_main"


@pytest.fixture
def spy() -> Iterator[list[str]]:
    """Every event that got past a library logger's level check, in order."""
    seen: list[str] = []

    def record(_logger: Any, _method: str, event_dict: Any) -> Any:
        seen.append(str(event_dict.get("event")))
        return event_dict

    _log._PROCESSORS.insert(0, record)
    try:
        yield seen
    finally:
        _log._PROCESSORS.remove(record)


def test_a_call_below_the_level_builds_nothing(spy: list[str]) -> None:
    """Below the stdlib logger's level a call returns before any processor runs (the
    event dict is never built); at the level, it goes through. ``get_logger`` puts a
    plugin module's logger under ``karbor_async.plugins``."""
    log = get_logger("vendor_plugin.volumes")
    assert log.name == "karbor_async.plugins.vendor_plugin.volumes"
    assert get_logger("karbor_async._engine").name == "karbor_async._engine"
    log.bind(resource="T#1").debug("filtered", n=1)
    log.info("filtered_too")  # the root's WARNING applies: nothing configured
    assert spy == []
    logging.getLogger("karbor_async.plugins.vendor_plugin").setLevel(logging.DEBUG)
    try:
        log.debug("kept")
    finally:
        logging.getLogger("karbor_async.plugins.vendor_plugin").setLevel(logging.NOTSET)
    assert spy == ["kept"]


async def test_debug_off_makes_no_per_event_debug_call(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With debug off the engine never calls a logger's debug per event (it asks the
    stdlib logger once per run); with debug on, once per lifecycle event."""
    calls: list[str] = []
    original = _log.Logger.debug

    def counting(self: _log.Logger, event: str | None = None, *args: Any, **kw: Any) -> Any:
        calls.append(str(event))
        return original(self, event, *args, **kw)

    monkeypatch.setattr(_log.Logger, "debug", counting)
    engine, _plugin, plan = setup([("s1", "v1"), ("s1", "v2")], ["s1"])
    async with engine:
        caplog.set_level(logging.INFO, logger="karbor_async")
        await engine.protect(plan)
        assert calls == []
        caplog.set_level(logging.DEBUG, logger="karbor_async")
        outcome = await engine.protect(plan)
        events = await engine.store.read_events(outcome.run_id)
    assert len(calls) == len([e for e in events if e.is_lifecycle]) > 10


@pytest.mark.slow
def test_cli_log_json_writes_json_lines_on_stderr(tmp_path: Path) -> None:
    """``--log-level debug --log-json``: every engine line is one JSON object on stderr
    (level, logger, time stamp, resources as ``TYPE#ID``); stdout holds only the
    command's own ``--json`` document."""
    plan = tmp_path / "plan.toml"
    plan.write_text(
        'name = "app"\nbarrier = "cut"\n'
        'resources = [{ type = "OS::Keystone::Project", id = "prj-0000001" }]\n'
    )
    env = {
        **os.environ,
        "KARBOR_DB": str(tmp_path / "karbor.db"),
        "KARBOR_BANK": str(tmp_path / "bank"),
        "KARBOR_SIMCLOUD_STATE": str(tmp_path / "sim"),
    }
    env.pop("KARBOR_SIMCLOUD", None)
    cli = [sys.executable, "-c", "from karbor_async._cli import main; main()"]
    args = ["--log-level", "debug", "--log-json", "protect", str(plan), "--simcloud", "12:3:zero"]
    done = subprocess.run(
        [*cli, *args, "--json"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    [document] = done.stdout.splitlines()
    assert json.loads(document)["outcome"]["status"] == "succeeded"
    lines = [json.loads(x) for x in done.stderr.splitlines() if x.startswith("{")]
    assert all({"event", "level", "logger", "timestamp"} <= line.keys() for line in lines)
    assert all(line["logger"].startswith("karbor_async") for line in lines)
    seen = {(line["event"], line["level"]) for line in lines}
    assert {("run_started", "info"), ("started", "debug"), ("sqlite_store_opened", "info")} <= seen
    resources = {line["resource"] for line in lines if line.get("resource")}
    assert resources and all(re.fullmatch(r"[\w:]+#[\w-]+", r) for r in resources)
    assert ("guest_frozen", "debug") in seen  # the reference plugin's ctx.log


def test_the_package_adds_a_null_handler_and_never_configures_structlog() -> None:
    """``karbor_async`` has a ``NullHandler``; no module of the library or of the
    reference plugins takes a logger from structlog's global configuration."""
    handlers = logging.getLogger("karbor_async").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)
    sources = [*(ROOT / "src").rglob("*.py"), *(ROOT / "plugins").rglob("*.py")]
    offenders = [
        str(path.relative_to(ROOT))
        for path in sources
        if re.search(r"structlog\.(get_logger|configure|wrap_logger)\(", path.read_text())
    ]
    assert offenders == []


def test_the_cli_handler_follows_stderr_and_keeps_locals_out(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``_log.configure`` (the CLI's) writes to whatever ``sys.stderr`` is at each line,
    replaces its own handler when called again, and renders tracebacks without local
    variables (a hook's locals may hold a resolved secret), as JSON and as console."""
    log = get_logger("karbor_async._engine")
    for as_json in (True, False):
        _log.configure(logging.INFO, json=as_json)
        secret = "s3cr3t-value"
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("engine_error", resource="T#1")
        assert secret  # (a local of this frame while the traceback is rendered)
    ours = [h for h in logging.getLogger("karbor_async").handlers if h.formatter is not None]
    assert len(ours) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    json_line, console = captured.err.split("\n", 1)
    assert json.loads(json_line)["exception"][0]["exc_value"] == "boom"
    assert "engine_error" in console and "ValueError: boom" in console
    assert "s3cr3t-value" not in captured.err
