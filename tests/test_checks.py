"""An operation object's optional ``check(ctx)``: bad input refused before anything runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from karbor_async import (
    Engine,
    MemoryStore,
    Plan,
    ProtectionPlugin,
    Resource,
    ResourceType,
    Timeouts,
)
from karbor_async._cli import EXIT_BAD_INPUT
from karbor_async.exceptions import PlanError
from karbor_async.plugin import CheckContext, HookContext, Param

DISK = "Test::Disk"


class _Op:
    def __init__(self, calls: list[str], refuse: set[str], hang: bool = False) -> None:
        self.calls = calls
        self.refuse = refuse
        self.hang = hang
        self.seen: list[CheckContext] = []

    async def check(self, ctx: CheckContext) -> None:
        self.seen.append(ctx)
        if self.hang:
            await anyio.sleep_forever()
        if ctx.resource.id in self.refuse:
            raise ValueError(f"{ctx.parameters.get('token')} is not a mount point")

    async def on_prepare_begin(self, ctx: HookContext) -> None:
        self.calls.append(f"pb {ctx.resource.id}")

    async def on_main(self, ctx: HookContext) -> None:
        self.calls.append(f"main {ctx.resource.id}")


class _Plugin(ProtectionPlugin):
    name = "checked"
    types = (
        ResourceType(
            DISK, quiesces=True, parameters={"token": Param(str, secret=True, required=True)}
        ),
    )

    def __init__(self, refuse: frozenset[str] = frozenset(), hang: bool = False) -> None:
        self.calls: list[str] = []
        self.op = _Op(self.calls, set(refuse), hang)

    def get_protect_operation(self, resource_type: str) -> object | None:
        return self.op

    def get_delete_operation(self, resource_type: str) -> object | None:
        return self.op


def _plan(*ids: str, **timeouts: Any) -> Plan:
    return Plan(
        name="p",
        resources=[Resource(DISK, i) for i in ids],
        parameters={DISK: {"token": "tok-ref"}},
        timeouts=Timeouts(hook=30, **timeouts),
    )


async def _secret(name: str) -> str:
    return "s3cr3t-value"


async def test_a_refusing_check_is_a_plan_error_naming_the_resource_and_nothing_runs() -> None:
    """check() raising becomes a PlanError naming the resource, its message free of the
    resolved secret; no hook ran and nothing was stored."""
    plugin = _Plugin(refuse=frozenset({"d2"}))
    store = MemoryStore()
    async with Engine([plugin], store=store, discover=False, secrets=_secret) as engine:
        with pytest.raises(PlanError) as info:
            await engine.build_protect(_plan("d1", "d2", "d3"))
        assert plugin.calls == []
        assert await store.list_checkpoints() == []
    message = str(info.value)
    assert f"{DISK}#d2" in message and "not a mount point" in message
    assert "s3cr3t-value" not in message
    # Every resource was checked, each with its secret resolved and the run's ids.
    seen = {c.resource.id: c for c in plugin.op.seen}
    assert set(seen) == {"d1", "d2", "d3"}
    assert seen["d1"].parameters["token"] == "s3cr3t-value"
    assert seen["d1"].operation.value == "protect"


async def test_checks_that_pass_let_the_run_go_and_run_for_delete_too() -> None:
    plugin = _Plugin()
    async with Engine([plugin], discover=False, secrets=_secret) as engine:
        outcome = await engine.protect(_plan("d1", "d2"))
        assert sorted(plugin.calls) == ["main d1", "main d2", "pb d1", "pb d2"]
        checked = len(plugin.op.seen)
        await engine.delete(outcome.checkpoint_id)
    assert checked == 2
    assert len(plugin.op.seen) == 4
    assert plugin.op.seen[-1].checkpoint_id == outcome.checkpoint_id


async def test_a_check_that_hangs_is_bounded_by_the_discovery_limit(virtual_time: bool) -> None:
    plugin = _Plugin(hang=True)
    async with Engine([plugin], discover=False, secrets=_secret) as engine:
        with anyio.fail_after(5), pytest.raises(PlanError, match=r"timeouts\.discovery"):
            await engine.build_protect(_plan("d1", discovery=0.2))
    assert plugin.calls == []


def test_the_cli_shows_a_refusal_as_one_line_with_exit_2(tmp_path: Path) -> None:
    """Through `karbor-async protect`, a check's refusal is `error: ...` on one line, exit 2."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "refusing_plugin.py").write_text(
        "from karbor_async import ProtectionPlugin, ResourceType\n"
        "class Op:\n"
        "    async def check(self, ctx):\n"
        "        raise ValueError(f'{ctx.resource.id} cannot be frozen')\n"
        "    async def on_main(self, ctx):\n"
        "        raise AssertionError('must not run')\n"
        "class Refusing(ProtectionPlugin):\n"
        "    types = (ResourceType('Test::Disk', quiesces=True),)\n"
        "    def get_protect_operation(self, t):\n"
        "        return Op()\n"
    )
    dist = site / "refusing-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: refusing\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[karbor_async.protections]\nrefusing = refusing_plugin:Refusing\n"
    )
    (tmp_path / "plan.toml").write_text('name = "p"\nresources = ["Test::Disk#d9"]\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("KARBOR_")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [str(Path(sys.executable).parent / "karbor-async"), "protect", "plan.toml"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == EXIT_BAD_INPUT, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ") and "Test::Disk#d9" in lines[0]
    assert "cannot be frozen" in lines[0]
