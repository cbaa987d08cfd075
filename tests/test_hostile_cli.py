"""Hostile hooks through the CLI, as operators meet them: a hook's KeyboardInterrupt,
Ctrl-C twice on a hung cut, and a hook that outlives the engine's close.

The hostile plugin is installed for the child process the way a vendor's is:
an entry point in a ``.dist-info`` on its ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

from helpers import install_plugin
from karbor_async import SqliteStore
from karbor_async._cli import EXIT_CANCELLED, EXIT_FAILED

PLUGIN = """
import os, anyio
from karbor_async import HookContext, ProtectionPlugin, ResourceType, Resource

class _Op:
    async def _hook(self, ctx: HookContext) -> None:
        point = f"{ctx.resource.id}:{ctx.hook.value}:{'aborting' if ctx.aborting else 'normal'}"
        what = os.environ.get("HOSTILE_" + point.replace(":", "_").upper())
        if ctx.resource.id == "s1" and ctx.hook.value == "on_prepare_begin":
            ctx.mark_quiesced()
        if what == "keyboard_interrupt":
            raise KeyboardInterrupt
        if what == "hang":
            print("HANGING", point, flush=True)
            await anyio.sleep_forever()
        if what == "swallow":
            print("HANGING", point, flush=True)
            while True:
                try:
                    await anyio.sleep(3600)
                except anyio.get_cancelled_exc_class():
                    pass
    on_prepare_begin = on_prepare_finish = on_main = on_complete = _hook

class Hostile(ProtectionPlugin):
    name = "hostile-cli"
    types = (ResourceType("Hostile::Server", quiesces=True, snapshots=False),
             ResourceType("Hostile::Volume"))
    def get_protect_operation(self, resource_type): return _Op()
    def get_restore_operation(self, resource_type): return _Op()
    def get_delete_operation(self, resource_type): return _Op()

class Disks:
    resource_type = "Hostile::Volume"
    parent_types = ("Hostile::Server",)
    async def dependents(self, parent):
        return [Resource("Hostile::Volume", "v1"), Resource("Hostile::Volume", "v2")]

plugin = Hostile()
disks = Disks()
"""

PLAN = """\
name = "hostile"
barrier = "cut"
resources = [{ type = "Hostile::Server", id = "s1" }]

[timeouts]
abort = 1
"""


def _install(root: Path) -> Path:
    return install_plugin(
        root,
        "hostile_cli",
        PLUGIN,
        "[karbor_async.protections]\nhostile = hostile_cli_plugin:plugin\n\n"
        "[karbor_async.protectables]\nhostile-disks = hostile_cli_plugin:disks\n",
    )


def _start(root: Path, env_extra: dict[str, str]) -> subprocess.Popen[str]:
    plan = root / "plan.toml"
    plan.write_text(PLAN)
    env = {
        **os.environ,
        "KARBOR_DB": str(root / "karbor.db"),
        "KARBOR_BANK": str(root / "bank"),
        "COLUMNS": "200",
        "PYTHONPATH": os.pathsep.join([str(_install(root)), os.environ.get("PYTHONPATH", "")]),
        **env_extra,
    }
    env.pop("KARBOR_SIMCLOUD", None)
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from karbor_async._cli import main; main()",
            "protect",
            str(plan),
            "--plain",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 60) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _checkpoint_status(db: Path) -> tuple[str, dict[str, str]]:
    async def read() -> tuple[str, dict[str, str]]:
        async with SqliteStore.open(db) as store:
            [cp] = await store.list_checkpoints()
            assert cp.outcome is not None
            return cp.status.value, {k[1]: r.status.value for k, r in cp.outcome.resources.items()}

    return anyio.run(read, backend="asyncio")


def test_a_hooks_keyboard_interrupt_is_a_failure_exit_1(tmp_path: Path) -> None:
    """A hook raising KeyboardInterrupt: the run fails (exit 1, not 3), everything thawed."""
    proc = _start(tmp_path, {"HOSTILE_V1_ON_PREPARE_FINISH_NORMAL": "keyboard_interrupt"})
    out, err = _finish(proc)
    assert proc.returncode == EXIT_FAILED, err
    assert "Traceback" not in err
    assert "KeyboardInterrupt" in out
    status, resources = _checkpoint_status(tmp_path / "karbor.db")
    assert status == "error" and resources["v1"] == "failed"


@pytest.mark.slow
def test_ctrl_c_twice_abandons_a_hung_cut_names_it_and_exits_3(tmp_path: Path) -> None:
    """First Ctrl-C cancels (the cut is not interrupted); the second abandons it at once."""
    proc = _start(tmp_path, {"HOSTILE_V1_ON_PREPARE_FINISH_NORMAL": "hang"})
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    for line in proc.stdout:
        if line.startswith("HANGING"):
            break
        assert time.monotonic() < deadline, "the cut never started"
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    start = time.monotonic()
    _out, err = _finish(proc)
    assert time.monotonic() - start < 5, "the second Ctrl-C does not wait for the abort deadline"
    assert proc.returncode == EXIT_CANCELLED, err
    assert "Ctrl-C again: abandoning" in err
    assert (
        "left running (abandoned" in err and "a cut (Hostile::Volume#v1 on_prepare_finish)" in err
    )
    assert "Traceback" not in err
    status, resources = _checkpoint_status(tmp_path / "karbor.db")
    assert status == "cancelled" and resources["v1"] == "abandoned"
    assert resources["s1"] in ("cancelled", "aborted")


@pytest.mark.slow
def test_a_hook_that_outlives_close_timeout_is_named_and_the_cli_exits_1(tmp_path: Path) -> None:
    """A copy swallowing every cancellation: the run ends, the CLI commits, names it, exits 1."""
    proc = _start(tmp_path, {"HOSTILE_V1_ON_MAIN_NORMAL": "swallow"})
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("HANGING"):
            break
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)  # cancel: the copy swallows it, abandoned 1 s later
    _out, err = _finish(proc, timeout=60)
    assert proc.returncode == EXIT_FAILED, err
    assert "abandoned hooks still run after being cancelled" in err
    assert "a copy (Hostile::Volume#v1 on_main" in err
    status, resources = _checkpoint_status(tmp_path / "karbor.db")
    assert status == "cancelled" and resources["v1"] == "abandoned"
