"""Real file systems for tests and benchmarks: btrfs on a loop device, ext4 inside it (root).

``build(root)`` makes ``outer.img`` (btrfs, reflink-capable) on a loop device
mounted at ``root/outer``, ``outer/inner.img`` (ext4) on a second loop device
mounted at ``root/mnt``: the mount point is the ``Linux::FileSystem`` and
``outer/inner.img`` its image. ``teardown`` thaws before it unmounts and
detaches only the loop devices it created; ``sweep(base)`` removes what a
killed earlier run left under ``base`` (its stacks live in ``kfs-*``
directories): mounts (thawed first) and loop devices backed by files there.
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import time
from pathlib import Path

import attrs

__all__ = ["MARK", "Stack", "build", "loops_under", "mounts_under", "sweep", "teardown", "thaw"]

FITHAW = 0xC0045878
MARK = "kfs-"
"""Every stack lives in a directory whose name starts with this (sweep looks for it)."""


@attrs.define
class Stack:
    root: Path
    outer_loop: str = ""
    inner_loop: str = ""
    mounted: list[Path] = attrs.Factory(list)

    @property
    def outer(self) -> Path:
        return self.root / "outer"

    @property
    def mnt(self) -> Path:
        return self.root / "mnt"

    @property
    def image(self) -> Path:
        return self.outer / "inner.img"


def _run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")
    return done.stdout.strip()


def thaw(path: Path) -> None:
    """FITHAW, ignoring "not frozen" and a path that is not there."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        fcntl.ioctl(fd, FITHAW, 0)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def build(root: Path, *, outer_mb: int = 320, inner_mb: int = 64) -> Stack:
    assert root.name.startswith(MARK), root
    root.mkdir(parents=True, exist_ok=True)
    (root / "owner").write_text(_this_process())
    stack = Stack(root)
    try:
        outer_img = root / "outer.img"
        with outer_img.open("wb") as f:
            f.truncate(outer_mb << 20)
        _run("mkfs.btrfs", "-q", str(outer_img))
        stack.outer_loop = _run("losetup", "--find", "--show", str(outer_img))
        stack.outer.mkdir()
        _run("mount", stack.outer_loop, str(stack.outer))
        stack.mounted.append(stack.outer)
        with stack.image.open("wb") as f:
            f.truncate(inner_mb << 20)
        _run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", str(stack.image))
        stack.inner_loop = _run("losetup", "--find", "--show", str(stack.image))
        stack.mnt.mkdir()
        _run("mount", stack.inner_loop, str(stack.mnt))
        stack.mounted.append(stack.mnt)
    except BaseException:
        teardown(stack)
        raise
    return stack


def _backing(device: str) -> str | None:
    name = os.path.basename(device)
    try:
        return Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    except OSError:
        return None


def _umount(path: Path) -> None:
    for _ in range(50):
        done = subprocess.run(["umount", str(path)], capture_output=True, check=False)
        if done.returncode == 0 or not os.path.ismount(path):
            return
        time.sleep(0.1)  # (busy: a writer that just resumed is finishing)
    # Never lazily: a file system detached but alive would hide its loop devices.
    raise RuntimeError(f"{path} stays busy; the next session's sweep will retry")


def teardown(stack: Stack) -> None:
    """Thaw, unmount, detach the loop devices this stack created, innermost first."""
    for path, device, image in (
        (stack.mnt, stack.inner_loop, stack.image),
        (stack.outer, stack.outer_loop, stack.root / "outer.img"),
    ):
        if path in stack.mounted:
            thaw(path)
            _umount(path)
            stack.mounted.remove(path)
        if device and _backing(device) == str(image):  # ours, not a reused number
            subprocess.run(["losetup", "-d", device], capture_output=True, check=False)
    stack.inner_loop = stack.outer_loop = ""


def loops_under(base: Path) -> list[tuple[str, str]]:
    """(device, backing file) of the loop devices backed by files under ``base``."""
    found = []
    for entry in sorted(Path("/sys/block").glob("loop*")):
        backing = _backing(entry.name)
        if backing and backing.startswith(str(base).rstrip("/") + "/"):
            found.append((f"/dev/{entry.name}", backing))
    return found


def mounts_under(base: Path) -> list[str]:
    prefix = str(base).rstrip("/") + "/"
    paths = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        path = line.split()[4].replace("\\040", " ")
        if path.startswith(prefix):
            paths.append(path)
    return paths


def _this_process() -> str:
    return f"{os.getpid()} {_start_time(os.getpid())}"


def _start_time(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22: start time in clock ticks


def _owner_gone(path: str) -> bool:
    """Whether the test process that made the ``kfs-*`` stack holding ``path`` is gone
    (a concurrent test session's live stack is never touched)."""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if part.startswith(MARK):
            try:
                pid, started = (Path(*parts[: i + 1]) / "owner").read_text().split()
            except (OSError, ValueError):
                return True
            return _start_time(int(pid)) != started
    return False


def _leftover(path: str) -> bool:
    return f"/{MARK}" in path and _owner_gone(path)


def sweep(base: Path) -> list[str]:
    """Remove what a killed earlier run left under ``base`` in ``kfs-*`` directories
    whose test process is gone: thaw and unmount its mounts, detach its loop devices
    (in rounds: an inner image's loop device keeps the outer file system busy)."""
    removed: list[str] = []
    for _round in range(3):
        for path in sorted(mounts_under(base), key=len, reverse=True):
            if _leftover(path):
                thaw(Path(path))
                done = subprocess.run(["umount", path], capture_output=True, check=False)
                if done.returncode == 0:
                    removed.append(path)
        for device, backing in loops_under(base):
            if _leftover(backing):
                done = subprocess.run(["losetup", "-d", device], capture_output=True, check=False)
                if done.returncode == 0:
                    removed.append(device)
        if not any(_leftover(p) for p in mounts_under(base)):
            break
    return removed
