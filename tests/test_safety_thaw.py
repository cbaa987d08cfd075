"""The dead-man thaw: the engine's sentinel thaws what a dead or stuck engine left frozen.

No root needed: the plugin's "freeze" is a marker file (``tests/safetyplugin.py``);
``tests/test_fs_plugin.py`` does the same with a real frozen file system.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from karbor_async import Engine, MemoryStore, Plan, Resource, SqliteStore, Timeouts
from karbor_async.events import EventKind
from karbor_async.exceptions import PluginError, RunError
from safetyplugin import DB, SafetyPlugin

TESTS = Path(__file__).resolve().parent

CHILD = textwrap.dedent(
    """
    import sys
    import anyio
    sys.path.insert(0, {tests!r})
    from safetyplugin import DB, SafetyPlugin
    from karbor_async import Engine, Plan, Resource, SqliteStore

    async def main(db: str) -> None:
        async with SqliteStore.open(db, lease_seconds=1.0) as store:
            async with Engine([SafetyPlugin()], store=store, discover=False) as engine:
                await engine.protect(Plan(name="dm", resources=[Resource(DB, "db1")]))

    anyio.run(main, sys.argv[1])
    """
).format(tests=str(TESTS))


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {})  # real processes, real time; the SQLite store runs on asyncio


@pytest.fixture
def frozen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "FROZEN"
    monkeypatch.setenv("SAFETY_FROZEN", str(path))
    monkeypatch.setenv("SAFETY_JOURNAL", str(tmp_path / "calls.txt"))
    for name in ("SAFETY_HANG", "SAFETY_STUCK", "SAFETY_MODE"):
        monkeypatch.delenv(name, raising=False)
    return path


def _kill_while_frozen(tmp_path: Path, frozen: Path, mode: str) -> float:
    """Run the child engine, SIGKILL it once the resource is frozen; return how long the
    sentinel took to thaw it (seconds)."""
    env = dict(os.environ, SAFETY_HANG="1", SAFETY_MODE=mode)
    err = tmp_path / "child.err"
    with err.open("wb") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(tmp_path / "k.db")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
    try:
        deadline = time.monotonic() + 30
        while not frozen.exists():
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "never froze"
            time.sleep(0.005)
    finally:
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        proc.wait()
    while frozen.exists():
        assert time.monotonic() - killed < 5, "the sentinel did not thaw within 5 s"
        time.sleep(0.001)
    return time.monotonic() - killed


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["command", "function"])
async def test_a_killed_engine_is_thawed_by_its_sentinel_and_recovery_records_it(
    tmp_path: Path, frozen: Path, mode: str
) -> None:
    """SIGKILL while frozen: the sentinel runs the safety thaw at once (command or
    function), journals it beside the store; recovery records THAWED reason=sentinel,
    still calls the aborting thaw, and forgets the journal entry."""
    took = _kill_while_frozen(tmp_path, frozen, mode)
    assert took < 1.0
    journal = anyio.Path(str(tmp_path / "k.db") + ".sentinel.jsonl")
    deadline = time.monotonic() + 5
    while not await journal.exists() or not (await journal.read_text()).endswith("\n"):
        assert time.monotonic() < deadline, "the sentinel journaled nothing"
        await anyio.sleep(0.01)
    entries = [json.loads(line) for line in (await journal.read_text()).splitlines()]
    assert len(entries) == 1
    assert entries[0]["resource"] == [DB, "db1"]
    assert entries[0]["result"]["ok"] is True
    assert set(entries[0]) >= {"run", "resource", "at", "result"}
    if mode == "function":
        by = await anyio.Path(str(frozen) + ".thawed-by").read_text()
        assert by.startswith("function")
    async with SqliteStore.open(tmp_path / "k.db", lease_seconds=1.0) as store:
        async with Engine([SafetyPlugin()], store=store, discover=False) as engine:
            report = await engine.recover_report()
        (outcome,) = report.outcomes
        events = await store.read_events(outcome.run_id)
    thawed = [e for e in events if e.kind is EventKind.THAWED]
    assert [e.data.get("reason") for e in thawed] == ["sentinel", "recovery"]
    assert thawed[0].data["ok"] is True
    calls = (await anyio.Path(tmp_path / "calls.txt").read_text()).split("\n")
    assert "thaw recovery 2" in calls  # the aborting thaw still ran (idempotent)
    assert not await journal.exists()  # recorded on the run: the journal let it go
    print(f"\nsentinel thaw after SIGKILL ({mode}): {took * 1000:.1f} ms")


@pytest.mark.slow
async def test_a_live_engine_stuck_past_budget_and_margin_is_thawed_and_told(
    frozen: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine's thaw keeps failing: at budget + margin the sentinel thaws, and the
    live engine records the resource as budget-thawed (THAWED by the sentinel); the
    engine's retried thaw then succeeds."""
    monkeypatch.setenv("SAFETY_STUCK", "1")
    plan = Plan(
        name="stuck",
        resources=[Resource(DB, "db1")],
        timeouts=Timeouts(hook=10, quiesce_budget=0.2, abort=10),
    )
    store = MemoryStore()
    async with Engine([SafetyPlugin()], store=store, discover=False, safety_margin=0.3) as engine:
        with anyio.fail_after(10), pytest.raises(RunError) as info:
            await engine.protect(plan)
        events = await store.read_events(info.value.outcome.run_id)
    assert not await anyio.Path(frozen).exists()
    thawed = [e for e in events if e.kind is EventKind.THAWED]
    assert thawed[0].data["by"] == "sentinel"
    assert thawed[0].data["reason"] == "budget"
    assert len(thawed) == 2  # then the engine's own retried thaw
    assert "by" not in thawed[1].data
    (res,) = info.value.outcome.resources.values()
    assert res.status.value != "thaw_failed"


async def test_a_clean_run_disarms_and_closing_the_engine_thaws_nothing(
    tmp_path: Path, frozen: Path
) -> None:
    async with Engine([SafetyPlugin()], discover=False) as engine:
        await engine.protect(Plan(name="ok", resources=[Resource(DB, "db1")]))
        tasks = engine._tasks
        assert tasks is not None
        assert tasks.safety is not None
        assert tasks.safety.armed == 0
        pid = tasks.safety.pid
        assert pid is not None
        await anyio.Path(frozen).write_text("re-frozen by someone else after the run")
    calls = (await anyio.Path(tmp_path / "calls.txt").read_text()).splitlines()
    assert await anyio.Path(frozen).exists()  # nothing armed any more: nothing thawed
    assert calls == ["freeze 1", "thaw - 1"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the sentinel ended with the engine


async def test_arm_safety_thaw_is_refused_outside_a_quiescing_prepare_begin() -> None:
    from karbor_async import HookContext, ProtectionPlugin, ResourceType

    seen: list[BaseException] = []

    class _Op:
        async def on_main(self, ctx: HookContext) -> None:
            try:
                await ctx.arm_safety_thaw(command=["true"])
            except PluginError as exc:
                seen.append(exc)

    class _P(ProtectionPlugin):
        types = (ResourceType("Test::Vol"),)

        def get_protect_operation(self, resource_type: str) -> object:
            return _Op()

    async with Engine([_P()], discover=False) as engine:
        await engine.protect(Plan(name="x", resources=[Resource("Test::Vol", "v")]))
    assert len(seen) == 1
    assert "on_prepare_begin" in str(seen[0])
