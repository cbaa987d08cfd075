"""kill -9 of an engine protecting a real file system, then recovery (root only).

The dead-man test: SIGKILL the engine while the file system is frozen with a
writer blocked on it; the writer resumes within one second with no operator
action (the sentinel thaws it). The same through the CLI. Then crash tests at
four points (during the freeze, between cuts, during the copy, mid-restore):
after ``recover`` nothing is frozen, no clone or loop device is leaked, and a
checkpoint whose copy was killed restores.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from helpers import install_plugin
from karbor_async import CheckpointStatus, RunStatus, SqliteStore
from karbor_async.events import EventKind
from karbor_fs import IMAGE
from karbor_fs.testing import Stack, loops_under
from test_fs_plugin import fill, mounted_hashes, writable

TESTS = Path(__file__).resolve().parent
CHILD = str(TESTS / "fschild.py")
KARBOR = str(Path(sys.executable).parent / "karbor-async")


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {})  # real processes, real file systems; SQLite runs on asyncio


def _env(root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KARBOR_", "HOLD_", "FS_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env.update(HOLD_MARK=str(root / "held"), **extra)
    return env


def _kill_when(cmd: list[str], env: dict[str, str], reached: Callable[[], bool]) -> float:
    """Start ``cmd``; SIGKILL it once ``reached()``; return the kill instant (monotonic)."""
    err = Path(env["HOLD_MARK"] + ".stderr")
    with err.open("wb") as errors:
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=errors)
    try:
        deadline = time.monotonic() + 60
        while not reached():
            if proc.poll() is not None:
                pytest.fail(f"{cmd[1:3]} ended ({proc.returncode}): {err.read_text()[-2000:]}")
            assert time.monotonic() < deadline, "the point was not reached in 60 s"
            time.sleep(0.002)
    finally:
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        proc.wait()
    return killed


def _writer(mnt: Path) -> subprocess.Popen[str]:
    """A process that writes and fsyncs a file on ``mnt``, then prints the instant."""
    code = (
        "import os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o600)\n"
        "os.write(fd, b'written while frozen' * 200)\n"
        "os.fsync(fd)\n"
        "print(time.monotonic(), flush=True)\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", code, str(mnt / "writer.txt")], stdout=subprocess.PIPE, text=True
    )


def _dead_man(stack: Stack, cmd: list[str], env: dict[str, str], held: Path) -> float:
    """Kill the engine once the file system is frozen and a writer blocks on it; return
    how long after the kill the writer's write and fsync completed."""
    writer: list[subprocess.Popen[str]] = []

    def blocked() -> bool:
        if not held.exists():
            return False
        if not writer:
            writer.append(_writer(stack.mnt))
            time.sleep(0.3)
            assert writer[0].poll() is None, "the writer was not blocked: not frozen"
        return True

    killed = _kill_when(cmd, env, blocked)
    out, _ = writer[0].communicate(timeout=10)
    assert writer[0].returncode == 0
    return float(out.strip()) - killed


def _clones(stack: Stack) -> list[Path]:
    return sorted(stack.outer.glob(".*.clone"))


async def _recover(root: Path) -> Any:
    from fschild import engine

    async with SqliteStore.open(root / "k.db", lease_seconds=2.0) as store:
        async with engine(store, root) as e:
            report = await e.recover_report()
        events = {o.run_id: await store.read_events(o.run_id) for o in report.outcomes}
        checkpoints = await store.list_checkpoints()
    return report, events, checkpoints


async def _nothing_left(stack: Stack) -> None:
    assert await anyio.to_thread.run_sync(writable, stack.mnt)
    assert _clones(stack) == []
    assert len(loops_under(stack.root)) == 2  # the stack's own two


async def test_a_killed_engine_never_leaves_a_file_system_frozen(
    fs_stack: Stack, tmp_path: Path
) -> None:
    """SIGKILL during the freeze with a writer blocked: the writer resumes within one
    second, no operator action; recover then records the sentinel's thaw, calls the
    aborting thaw, fails the protect (its cuts were not all committed) and leaves
    nothing frozen, no clone, no loop device."""
    await anyio.to_thread.run_sync(fill, fs_stack.mnt)
    env = _env(tmp_path, HOLD_AT="on_prepare_begin")
    cmd = [sys.executable, CHILD, "protect", str(tmp_path), str(fs_stack.mnt)]
    resumed = await anyio.to_thread.run_sync(_dead_man, fs_stack, cmd, env, tmp_path / "held")
    print(f"\nwriter resumed {resumed * 1000:.1f} ms after SIGKILL (engine API)")
    assert resumed < 1.0
    report, events, _cps = await _recover(tmp_path)
    (outcome,) = report.outcomes
    assert outcome.status is RunStatus.FAILED
    thawed = [e.data.get("reason") for e in events[outcome.run_id] if e.kind is EventKind.THAWED]
    assert thawed == ["sentinel", "recovery"]
    await _nothing_left(fs_stack)


async def test_the_same_through_the_cli(fs_stack: Stack, tmp_path: Path) -> None:
    """`karbor-async protect plan.toml` killed while the file system is frozen: the
    writer resumes within one second; `karbor-async recover` then exits 1 (the protect's
    cuts were not all committed) and leaves nothing behind."""
    site = install_plugin(
        tmp_path,
        "hold",
        "from holdplugin import HoldPlugin, HoldProtectable\n",
        "[karbor_async.protections]\nhold = hold_plugin:HoldPlugin\n"
        "[karbor_async.protectables]\nhold = hold_plugin:HoldProtectable\n",
    )
    (tmp_path / "plan.toml").write_text(
        f'name = "fs"\nbarrier = "cut"\n'
        f'resources = [{{ type = "Linux::FileSystem", id = "{fs_stack.mnt}" }}]\n'
    )
    env = _env(
        tmp_path,
        HOLD_AT="on_prepare_begin",
        KARBOR_DB=str(tmp_path / "k.db"),
        KARBOR_BANK=str(tmp_path / "bank"),
    )
    env["PYTHONPATH"] = os.pathsep.join([str(site), env["PYTHONPATH"]])
    cmd = [KARBOR, "protect", str(tmp_path / "plan.toml")]
    resumed = await anyio.to_thread.run_sync(_dead_man, fs_stack, cmd, env, tmp_path / "held")
    print(f"\nwriter resumed {resumed * 1000:.1f} ms after SIGKILL (CLI)")
    assert resumed < 1.0
    env.pop("HOLD_AT")
    done = await anyio.run_process([KARBOR, "recover"], env=env, check=False)
    assert done.returncode == 1, done.stderr.decode()
    await _nothing_left(fs_stack)


async def test_kill_between_cuts_leaves_no_clone(fs_stack: Stack, tmp_path: Path) -> None:
    """Killed after the image's clone and before the other cut: recovery thaws, fails
    the protect and deletes through the plugin: the clone is removed."""
    env = _env(tmp_path, HOLD_AT="on_prepare_finish")
    cmd = [sys.executable, CHILD, "protect", str(tmp_path), str(fs_stack.mnt)]
    await anyio.to_thread.run_sync(
        _kill_when, cmd, env, lambda: (tmp_path / "held").exists() and bool(_clones(fs_stack))
    )
    report, _events, cps = await _recover(tmp_path)
    (outcome,) = report.outcomes
    assert outcome.status is RunStatus.FAILED
    assert [c.status for c in cps] == [CheckpointStatus.DELETED]
    await _nothing_left(fs_stack)


def _copying(bank: Path) -> Callable[[], bool]:
    return lambda: any(p.name.startswith(".~karbor-tmp.") for p in bank.rglob("*"))


async def test_kill_during_the_copy_resumes_from_the_clone_and_restores(
    fs_stack: Stack, tmp_path: Path
) -> None:
    """Killed while the clone streams into the bank: the clone outlives the process,
    recovery resumes the copy from it (attempt 2), the checkpoint is available, the
    clone is then deleted, and it restores the same files."""
    hashes = await anyio.to_thread.run_sync(fill, fs_stack.mnt)
    env = _env(tmp_path, FS_CHUNK=str(16 << 10))  # small reads: a copy long enough to hit
    cmd = [sys.executable, CHILD, "protect", str(tmp_path), str(fs_stack.mnt)]
    await anyio.to_thread.run_sync(_kill_when, cmd, env, _copying(tmp_path / "bank"))
    assert _clones(fs_stack), "the clone should outlive the killed engine"
    report, _events, cps = await _recover(tmp_path)
    (outcome,) = report.outcomes
    assert outcome.status is RunStatus.SUCCEEDED
    assert outcome.resources[(IMAGE, str(fs_stack.image))].attempt == 2
    (cp,) = cps
    assert cp.status is CheckpointStatus.AVAILABLE
    await _nothing_left(fs_stack)
    new_image = await _restore(tmp_path, cp.id)
    got = await anyio.to_thread.run_sync(mounted_hashes, new_image, tmp_path / "check")
    assert got == hashes


async def _restore(root: Path, checkpoint: str) -> str:
    from fschild import engine

    async with SqliteStore.open(root / "k.db", lease_seconds=2.0) as store:
        async with engine(store, root) as e:
            outcome = await e.restore(checkpoint)
        restored = await store.load_restored(outcome.run_id)
    return restored[(IMAGE, next(k[1] for k in restored if k[0] == IMAGE))]


async def test_kill_mid_restore_is_resumed_without_leaking_a_loop_device(
    fs_stack: Stack, tmp_path: Path
) -> None:
    """Killed while the restore writes the new image (its file exists; its events may not
    be committed yet): recovery resumes the restore, which writes that same image again,
    checks it and reports it; no other image, loop device or frozen file system is left."""
    hashes = await anyio.to_thread.run_sync(fill, fs_stack.mnt)
    from fschild import engine, plan

    async with (
        SqliteStore.open(tmp_path / "k.db", lease_seconds=2.0) as store,
        engine(store, tmp_path) as e,
    ):
        protected = await e.protect(plan(str(fs_stack.mnt)))
    env = _env(tmp_path)
    cmd = [sys.executable, CHILD, "restore", str(tmp_path), protected.checkpoint_id]

    def restoring() -> bool:
        return any(fs_stack.outer.glob("*.restored-*"))

    await anyio.to_thread.run_sync(_kill_when, cmd, env, restoring)
    report, _events, _cps = await _recover(tmp_path)
    (outcome,) = report.outcomes
    assert outcome.status is RunStatus.SUCCEEDED
    async with SqliteStore.open(tmp_path / "k.db", lease_seconds=2.0) as store:
        restored = await store.load_restored(outcome.run_id)
    (new_image,) = restored.values()
    # The image the killed attempt was writing is the one the resumed restore wrote: no
    # second image, no partial one left beside it.
    assert [str(p) for p in fs_stack.outer.glob("*.restored-*")] == [new_image]
    await _nothing_left(fs_stack)
    got = await anyio.to_thread.run_sync(mounted_hashes, new_image, tmp_path / "check")
    assert got == hashes
