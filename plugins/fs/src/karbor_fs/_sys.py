"""The Linux calls the plugin makes, each blocking: callers run them in a worker thread
(``anyio.to_thread.run_sync``) or as subprocesses (``anyio.run_process``).

``FIFREEZE``/``FITHAW`` freeze and thaw a mounted file system (root only);
``FICLONE`` shares an image file's extents with a new file (a reflink: btrfs,
xfs with reflink, ...); ``SEEK_DATA``/``SEEK_HOLE`` find the extents that hold
data, so holes are neither read nor stored.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import tempfile
from pathlib import Path

import attrs

__all__ = [
    "FREEZABLE",
    "Mount",
    "backing_file",
    "clone",
    "data_extents",
    "freeze",
    "hash_extents",
    "mount_at",
    "mount_of",
    "reflink_refusal",
    "thaw",
]

FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)
FICLONE = 0x40049409  # _IOW(0x94, 9, int)

FREEZABLE = frozenset({"ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "nilfs2", "reiserfs"})
"""File system types whose kernel driver implements freezing (``freeze_fs``)."""


@attrs.frozen
class Mount:
    """One line of ``/proc/self/mountinfo``."""

    path: str
    source: str
    fstype: str
    options: tuple[str, ...]
    device: str
    """``major:minor`` of the mounted file system."""


def _unescape(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 3 < len(text) and text[i + 1 : i + 4].isdigit():
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def mounts() -> list[Mount]:
    found: list[Mount] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields = left.split()
        rest = right.split()
        if len(fields) < 6 or len(rest) < 2:
            continue
        found.append(
            Mount(
                path=_unescape(fields[4]),
                source=_unescape(rest[1]),
                fstype=rest[0],
                options=tuple(fields[5].split(",")),
                device=fields[2],
            )
        )
    return found


def mount_at(path: str) -> Mount | None:
    """The file system mounted exactly at ``path`` (the last one, if stacked), or None."""
    real = os.path.realpath(path)
    at = [m for m in mounts() if m.path == real]
    return at[-1] if at else None


def mount_of(path: str) -> Mount | None:
    """The file system that holds ``path`` (the longest mount point above it)."""
    real = os.path.realpath(path)
    best: Mount | None = None
    for m in mounts():
        above = real == m.path or real.startswith(m.path.rstrip("/") + "/")
        if above and (best is None or len(m.path) >= len(best.path)):
            best = m
    return best


def backing_file(source: str) -> str | None:
    """The image file behind a loop device (``/dev/loop3`` -> its backing file), or None."""
    name = os.path.basename(source)
    if not name.startswith("loop"):
        return None
    try:
        text = Path(f"/sys/block/{name}/loop/backing_file").read_text().strip()
    except OSError:
        return None
    return text.removesuffix(" (deleted)") or None


def freeze(path: str) -> None:
    """``FIFREEZE`` the file system mounted at ``path`` (writers block until the thaw)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
    finally:
        os.close(fd)


def thaw(path: str) -> bool:
    """``FITHAW`` it; False if it was not frozen (``EINVAL``): safe to call twice."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FITHAW, 0)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            return False
        raise
    finally:
        os.close(fd)
    return True


def clone(source: str, target: str) -> None:
    """``FICLONE`` ``source`` to ``target`` (replaced if it exists; mode 0600)."""
    src = os.open(source, os.O_RDONLY)
    try:
        dst = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            fcntl.ioctl(dst, FICLONE, src)
        except BaseException:
            os.close(dst)
            os.unlink(target)
            raise
        os.close(dst)
    finally:
        os.close(src)


def data_extents(fd: int) -> tuple[int, list[tuple[int, int]]]:
    """The file's size and its data extents ``(offset, length)`` (holes skipped)."""
    size = os.fstat(fd).st_size
    extents: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data after offset
                break
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        extents.append((start, end - start))
        offset = end
    return size, extents


def hash_extents(path: str, extents: list[tuple[int, int]], chunk: int = 4 << 20) -> str:
    """sha256 of the bytes at ``extents``, in order (what the bank holds)."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        for offset, length in extents:
            pos, end = offset, offset + length
            while pos < end:
                data = os.pread(fd, min(chunk, end - pos), pos)
                if not data:
                    raise OSError(f"{path} ends at {pos}, inside an extent that ends at {end}")
                h.update(data)
                pos += len(data)
    finally:
        os.close(fd)
    return h.hexdigest()


def reflink_refusal(directory: str) -> str | None:
    """Why a file in ``directory`` cannot be cloned (``FICLONE`` of a probe), or None."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".karbor-reflink-probe-", dir=directory)
    except OSError as exc:
        return f"cannot write in {directory}: {exc.strerror or exc}"
    try:
        os.write(fd, b"\0" * 4096)
        os.close(fd)
        try:
            clone(probe, probe + ".clone")
        except OSError as exc:
            return f"{directory} is not on a reflink-capable file system (FICLONE: {exc.strerror})"
        os.unlink(probe + ".clone")
        return None
    finally:
        os.unlink(probe)
