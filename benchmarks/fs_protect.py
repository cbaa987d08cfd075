"""Real file systems: the freeze-to-thaw window, the cut's own duration, and copy
throughput against ``cp`` of the same image (``karbor_fs``; root only).

Each size builds a stack on loop devices (btrfs holding an ext4 image, mounted),
fills half of the image with random data, protects it (freeze, ``FICLONE``,
thaw, streamed copy into an ``FsBank`` on the host's file system) and then
copies the same image with ``cp --sparse=always`` plus an fsync into the same
directory, so both copies are durable and read a warm page cache alike.
``python -m benchmarks.fs_protect [--quick]`` runs this section alone.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import anyio.to_thread

from benchmarks._report import table
from benchmarks._workload import quiet_logging
from karbor_async import Engine, FsBank, MemoryStore, Plan, Resource
from karbor_fs import FILESYSTEM, IMAGE, FsProtection, ImageProtectable, _sys
from karbor_fs import testing as stacks

__all__ = ["fs_section", "fs_skip_reason"]

_MIB = 1 << 20


def fs_skip_reason() -> str | None:
    """Why this section cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (freezing, loop devices)"
    missing = [t for t in ("mount", "losetup", "mkfs.btrfs", "mkfs.ext4") if not shutil.which(t)]
    if missing:
        return f"needs {', '.join(missing)}"
    return None


def _fill(mnt: Path, nbytes: int) -> None:
    with (mnt / "data.bin").open("wb") as f:
        left = nbytes
        while left:
            n = min(left, 8 * _MIB)
            f.write(os.urandom(n))
            left -= n  # (not synced: the freeze flushes it, as on a busy file system)


def _cp(image: Path, target: Path) -> float:
    """``cp`` of a fresh reflink of the image, as the engine copies one (a new inode, so
    its page cache is as cold as the engine's clone's), plus an fsync."""
    clone = image.with_name(".bench-cp.clone")
    _sys.clone(str(image), str(clone))
    start = time.perf_counter()
    subprocess.run(["cp", "--sparse=always", str(clone), str(target)], check=True)
    fd = os.open(target, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    target.unlink()
    clone.unlink()
    return seconds


async def _one(size_mib: int, work: Path) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix=f"{stacks.MARK}bench-{size_mib}-", dir=work))
    stack = await anyio.to_thread.run_sync(
        lambda: stacks.build(root, outer_mb=size_mib * 2 + 300, inner_mb=size_mib)
    )
    try:
        data = size_mib * _MIB // 2
        await anyio.to_thread.run_sync(_fill, stack.mnt, data)
        bank = root.with_name(root.name + "-bank")
        store = MemoryStore()
        async with Engine(
            [FsProtection()], [ImageProtectable()], store=store, bank=FsBank(bank), discover=False
        ) as engine:
            plan = Plan(name="bench-fs", resources=[Resource(FILESYSTEM, str(stack.mnt))])
            outcome = await engine.protect(plan)
            saved = await store.load_saved_info(outcome.checkpoint_id)
            await engine.delete(outcome.checkpoint_id)
        window = outcome.resources[(FILESYSTEM, str(stack.mnt))].quiesce_window
        info = saved[(IMAGE, str(stack.image))]
        copied = float(info["bytes"])
        cp_seconds = await anyio.to_thread.run_sync(_cp, stack.image, work / "cp.img")
        return {
            "window": float(window or 0.0),
            "cut": float(info["cut_seconds"]),
            "copy_mbs": copied / _MIB / float(info["copy_seconds"]),
            "cp_mbs": copied / _MIB / cp_seconds,
            "copied": copied,
        }
    finally:
        await anyio.to_thread.run_sync(stacks.teardown, stack)


async def fs_section(sizes_mib: tuple[int, ...], reps: int) -> list[str]:
    head = ["## Real file systems (karbor_fs): freeze, reflink cut, copy", ""]
    reason = fs_skip_reason()
    if reason is not None:
        return [*head, f"Skipped: {reason}.", ""]
    rows = []
    with tempfile.TemporaryDirectory(prefix="karbor-bench-fs-") as tmp:
        for size in sizes_mib:
            samples = [await _one(size, Path(tmp)) for _ in range(reps)]

            def med(key: str, samples: list[dict[str, float]] = samples) -> float:
                return statistics.median(s[key] for s in samples)

            rows.append(
                [
                    f"{size} MiB ({med('copied') / _MIB:.0f} MiB data)",
                    f"{med('window') * 1e3:.1f}",
                    f"{med('cut') * 1e3:.2f}",
                    f"{med('copy_mbs'):.0f}",
                    f"{med('cp_mbs'):.0f}",
                    f"{med('copy_mbs') / med('cp_mbs'):.2f}x",
                ]
            )
    return [
        *head,
        "An ext4 image on btrfs, both on loop devices; half of the image is random data, the "
        "rest holes. The window is the file system's quiesce window as the engine records it "
        "(freeze to thaw: `FIFREEZE` flushing the dirty data, the `FICLONE` cut, `FITHAW`); "
        "the cut is the `FICLONE` call alone; the copy streams the clone's data extents into "
        "an `FsBank` on the host file system (sha256 in the same worker thread, fsynced), "
        f"against `cp --sparse=always` + fsync of a fresh reflink of the same image (a new "
        f"inode, as cold in the page cache as the engine's clone; median of {reps}).",
        "",
        *table(
            ["image", "freeze-to-thaw ms", "cut ms", "copy MB/s", "cp MB/s", "copy / cp"],
            rows,
        ),
        "",
    ]


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    quiet_logging()
    sizes = (8,) if quick else (64, 512)
    lines = anyio.run(fs_section, sizes, 1 if quick else 3, backend="asyncio")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
