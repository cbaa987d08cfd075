"""The fs plugin on real file systems: protect, restore and delete with data, and refusals.

Each test builds its stack on loop devices (``fs_stack``: btrfs with an ext4
image in it, mounted); root only: skipped with a one-line reason without it,
except under CI (``KARBOR_REQUIRE_SERVICES=1``), where it fails.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from helpers import need_root
from karbor_async import (
    BarrierPolicy,
    CheckpointStatus,
    Engine,
    FsBank,
    MemoryStore,
    Plan,
    Resource,
    RunStatus,
)
from karbor_async.exceptions import PlanError
from karbor_fs import FILESYSTEM, IMAGE, FsProtection, ImageProtectable, clone_path
from karbor_fs import testing as fsstack
from karbor_fs.testing import Stack, loops_under


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {})  # real file systems, real time


def fill(mnt: Path) -> dict[str, str]:
    """Files with data on the mounted file system: name -> sha256."""
    rnd = os.urandom(1 << 20)
    files = {
        "big.bin": rnd * 6,
        "dir/small.txt": b"hello, frozen world\n" * 100,
        "dir/empty": b"",
    }
    for name, data in files.items():
        path = mnt / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    with (mnt / "sparse.bin").open("wb") as f:
        f.seek(8 << 20)
        f.write(b"end")
    files["sparse.bin"] = (mnt / "sparse.bin").read_bytes()
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def mounted_hashes(image: str, where: Path) -> dict[str, str]:
    """Attach ``image`` read-only, mount it, hash every file, unmount, detach."""
    where.mkdir(exist_ok=True)
    device = subprocess.run(
        ["losetup", "--find", "--show", "--read-only", image],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        subprocess.run(["mount", "-o", "ro,noload", device, str(where)], check=True)
        try:
            out = {}
            for path in sorted(where.rglob("*")):
                if path.is_file():
                    rel = str(path.relative_to(where))
                    if not rel.startswith("lost+found"):
                        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            return out
        finally:
            subprocess.run(["umount", str(where)], check=True)
    finally:
        subprocess.run(["losetup", "-d", device], check=False)


def writable(mnt: Path) -> bool:
    """A write completes within 2 s (the file system is not frozen)."""
    done = subprocess.run(
        ["timeout", "2", "sh", "-c", f"echo x > {mnt}/.probe && sync -f {mnt}/.probe"],
        check=False,
    )
    return done.returncode == 0


def engine(stack: Stack, bank: Path, store: Any = None) -> Engine:
    return Engine(
        [FsProtection()],
        [ImageProtectable()],
        store=store or MemoryStore(),
        bank=FsBank(bank),
        discover=False,
    )


def plan(stack: Stack, **kw: Any) -> Plan:
    return Plan(name="fs", resources=[Resource(FILESYSTEM, str(stack.mnt))], **kw)


async def test_protect_restore_delete_a_real_file_system(fs_stack: Stack, tmp_path: Path) -> None:
    """Frozen, cut by reflink, thawed, copied without its holes; the clone is gone once
    the copy is durable; restore writes a new image that fsck passes and that holds the
    same files; delete removes the bank data."""
    hashes = await anyio.to_thread.run_sync(fill, fs_stack.mnt)
    bank = tmp_path / "bank"
    async with engine(fs_stack, bank) as e:
        protected = await e.protect(plan(fs_stack, barrier=BarrierPolicy.CUT))
        cp = protected.checkpoint_id
        assert protected.status is RunStatus.SUCCEEDED
        image_key = (IMAGE, str(fs_stack.image))
        fs_key = (FILESYSTEM, str(fs_stack.mnt))
        assert set(protected.resources) == {image_key, fs_key}
        window = protected.resources[fs_key].quiesce_window
        assert window is not None
        assert window < 2.0
        assert not await anyio.Path(clone_path(cp, str(fs_stack.image))).exists()
        stored = sum(f.stat().st_size for f in bank.rglob("*") if f.is_file())
        image_size = fs_stack.image.stat().st_size
        assert stored < image_size // 2  # holes were skipped (64 MiB image, ~7 MiB data)
        assert await anyio.to_thread.run_sync(writable, fs_stack.mnt)

        restored = await e.restore(cp)
        assert restored.status is RunStatus.SUCCEEDED
        new_image = (await e.store.load_restored(restored.run_id)).get(image_key)
        assert new_image is not None
        assert new_image != str(fs_stack.image)
        got = await anyio.to_thread.run_sync(mounted_hashes, new_image, tmp_path / "check")
        assert got == hashes

        deleted = await e.delete(cp)
        assert deleted.status is RunStatus.SUCCEEDED
        assert (await e.store.get_checkpoint(cp)).status is CheckpointStatus.DELETED
    assert not [f for f in bank.rglob("*") if f.is_file()]
    assert len(loops_under(fs_stack.root)) == 2  # the stack's own two: none leaked


async def test_check_refuses_before_anything_is_frozen(fs_stack: Stack, tmp_path: Path) -> None:
    """A path that is not a mount point, a file system that cannot be frozen, an image
    not on a reflink-capable file system and a bank without room are PlanErrors naming
    the resource, raised while the run is built: nothing is frozen or stored."""
    plain = tmp_path / "not-a-mount"
    plain.mkdir()
    image = tmp_path / "plain.img"  # /tmp's file system: no reflink
    image.write_bytes(b"\0" * 4096)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    await anyio.run_process(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(tiny)])
    try:
        store = MemoryStore()
        async with engine(fs_stack, tmp_path / "bank", store) as e:
            refusals = {
                "is not a mount point": Resource(FILESYSTEM, str(plain)),
                "cannot be frozen": Resource(FILESYSTEM, str(tiny)),
                "not on a reflink-capable": Resource(IMAGE, str(image)),
            }
            for words, resource in refusals.items():
                with pytest.raises(PlanError, match=words) as info:
                    await e.build_protect(Plan(name="x", resources=[resource]))
                assert resource.id in str(info.value)
        await anyio.to_thread.run_sync(fill, fs_stack.mnt)
        async with engine(fs_stack, tiny / "bank", store) as e:
            with pytest.raises(PlanError, match="bytes free") as info:
                await e.build_protect(plan(fs_stack))
            assert str(fs_stack.image) in str(info.value)
        assert await store.list_checkpoints() == []
        assert await anyio.to_thread.run_sync(writable, fs_stack.mnt)
    finally:
        with anyio.CancelScope(shield=True):
            await anyio.run_process(["umount", str(tiny)], check=False)


async def test_delete_of_a_cut_never_taken_is_a_no_op(fs_stack: Stack, tmp_path: Path) -> None:
    """A protect that fails before its cut (here: the freeze itself fails, someone else
    froze the file system) leaves nothing, and leaves the other party's freeze alone;
    its delete finds no clone and succeeds."""
    mnt = str(fs_stack.mnt)
    await anyio.to_thread.run_sync(subprocess.check_call, ["fsfreeze", "-f", mnt])
    try:
        async with engine(fs_stack, tmp_path / "bank") as e:
            run = await e.build_protect(plan(fs_stack, delete_on_failure=True))
            with pytest.raises(Exception, match="on_prepare_begin"):
                await e.execute(run)
            cp = await e.store.get_checkpoint(run.spec.checkpoint_id)
            assert cp.status is CheckpointStatus.DELETED
    finally:
        # Still frozen (the run did not thaw what it did not freeze): unfreezing works.
        unfrozen = await anyio.to_thread.run_sync(subprocess.call, ["fsfreeze", "-u", mnt])
    assert unfrozen == 0
    assert not list(fs_stack.outer.glob(".*.clone"))


def _killed_stack(root: Path) -> None:
    """A test process that built a stack, froze it and was killed (SIGKILL)."""
    code = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from karbor_fs import _sys, testing\n"
        "stack = testing.build(Path(sys.argv[1]), outer_mb=160, inner_mb=16)\n"
        "_sys.freeze(str(stack.mnt))\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(root)], check=False, timeout=60)
    assert done.returncode == -9


@pytest.mark.service
def test_the_session_sweep_removes_what_a_killed_run_left(
    tmp_path: Path, fs_leftovers: Any
) -> None:
    """A killed test process left its stack mounted, frozen and loop-attached: the sweep
    thaws, unmounts and detaches it, and leaves a live process's stack alone."""
    need_root("a file system on loop devices", ("mount", "losetup", "mkfs.btrfs", "mkfs.ext4"))
    _killed_stack(tmp_path / "kfs-killed")
    live = fsstack.build(tmp_path / "kfs-live", outer_mb=160, inner_mb=16)
    try:
        assert len(loops_under(tmp_path / "kfs-killed")) == 2
        removed = fsstack.sweep(tmp_path)
        assert len(removed) == 4  # two mounts, two loop devices
        assert loops_under(tmp_path / "kfs-killed") == []
        assert fsstack.mounts_under(tmp_path / "kfs-killed") == []
        assert len(loops_under(tmp_path / "kfs-live")) == 2  # ours, alive: untouched
        assert writable(live.mnt)
    finally:
        fsstack.teardown(live)
