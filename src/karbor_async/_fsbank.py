"""The file-system bank: one directory per checkpoint, per resource, per object key.

Layout: ``<root>/<checkpoint>/<type>/<id>/<key>``. The checkpoint id, resource
type and resource id are each escaped into one safe path component
(:func:`escape_component`: every byte outside ``A-Z a-z 0-9 - _ .`` becomes
``%XX``, a leading ``.`` too, and the empty string becomes ``%``), so
``OS::Nova::Server`` or an id holding ``/`` or ``..`` can neither nest nor
escape, and :func:`unescape_component` gives the original back. Object keys are
validated by :func:`~karbor_async._bankkeys.validate_key` and kept as they are
(so the bank stays readable with ``ls``); names starting with ``.~karbor-`` are
reserved for the bank's own temporary files.

Every write goes to a temporary file in the target's directory, is flushed and
fsynced, then renamed over the final name (``os.replace``), so a crash never
leaves half an object under its name. Directory entries are not fsynced: the
store's durability target is a killed process, not power loss. All file I/O runs
in worker threads (``anyio.to_thread``); streams move one chunk at a time.

On a case-insensitive file system (macOS by default) two resource ids that
differ only in case share a directory; use a case-sensitive volume for banks.
"""

from __future__ import annotations

import builtins
import functools
import os
import shutil
import string
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterable, Callable
from pathlib import Path
from typing import BinaryIO, TypeVar
from urllib.parse import unquote

import anyio
import attrs

from karbor_async._bankkeys import validate_key
from karbor_async._liveness import owner_gone, this_process
from karbor_async._log import get_logger
from karbor_async._types import ResourceKey
from karbor_async.exceptions import BankKeyError

__all__ = ["FsBank", "FsBankSection", "escape_component", "unescape_component"]

_log = get_logger(__name__)

_T = TypeVar("_T")

_SAFE = frozenset(string.ascii_letters + string.digits + "-_.")
_RESERVED = ".~karbor-"
_TMP = ".~karbor-tmp."
_DELETING = ".~karbor-deleting."
_NAME_MAX = 255
_WRITE_BUFFER = 1 << 20
"""put_stream gathers small chunks up to this size before each write (one thread hop)."""


def _temp_is_dead(name: str, mtime: float, cutoff: float) -> bool:
    """Whether a temporary file's writer cannot still be writing it: its process (named in
    the file's name) is gone, or, for a name without a writer, it is older than ``cutoff``."""
    writer = name[len(_TMP) :].rpartition(".")[0]
    if writer.count(":") == 3:
        return owner_gone(writer)
    return mtime < cutoff


_STALE_AFTER = 3600.0
"""cleanup() removes temporary files older than this (a live writer may own younger ones)."""


def escape_component(text: str) -> str:
    """Escape ``text`` into one path component that cannot nest or climb, reversibly."""
    out: list[str] = []
    for ch in text:
        if ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    name = "".join(out)
    if not name:
        return "%"
    if name[0] == ".":
        name = "%2E" + name[1:]
    if len(name.encode()) > _NAME_MAX:
        raise BankKeyError(
            f"{text[:40]!r}... is too long for a bank directory name once escaped "
            f"({len(name)} > {_NAME_MAX} bytes)"
        )
    return name


def unescape_component(name: str) -> str:
    """The inverse of :func:`escape_component`."""
    if name == "%":
        return ""
    return unquote(name, errors="strict")


async def _run(fn: Callable[[], _T]) -> _T:
    return await anyio.to_thread.run_sync(fn)


@attrs.frozen
class FsBankSection:
    """One resource's part of a checkpoint in an :class:`FsBank` (a directory)."""

    bank_root: Path
    directory: Path
    read_only: bool = False

    # -- paths -------------------------------------------------------------------------

    def _target(self, key: str) -> tuple[str, Path]:
        norm = validate_key(key)
        parts = norm.split("/")
        for part in parts:
            if part.startswith(_RESERVED):
                raise BankKeyError(
                    f"bank key {key!r}: names starting with {_RESERVED!r} are reserved"
                )
            if len(part.encode()) > _NAME_MAX:
                raise BankKeyError(f"bank key {key!r} has a part longer than {_NAME_MAX} bytes")
        return norm, self.directory.joinpath(*parts)

    def _confine(self, key: str, target: Path) -> None:
        """Refuse a target that a symbolic link leads out of the section (runs in a thread)."""
        base = self.directory.resolve()
        if not base.is_relative_to(self.bank_root.resolve()):
            raise BankKeyError(f"this bank section resolves outside the bank root ({base})")
        if not target.resolve().is_relative_to(base):
            raise BankKeyError(f"bank key {key!r} resolves outside its section (a symbolic link?)")

    def _check_writable(self) -> None:
        if self.read_only:
            raise BankKeyError("this bank section is read-only (restore sections cannot write)")

    # -- writes --------------------------------------------------------------------------

    def _open_temp(self, key: str, target: Path) -> tuple[BinaryIO, Path]:
        self._confine(key, target)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as exc:
            raise BankKeyError(
                f"bank key {key!r} needs a directory where an object already is"
            ) from exc
        self._confine(key, target)
        temp = target.parent / f"{_TMP}{this_process()}.{uuid.uuid4().hex}"
        return temp.open("xb"), temp

    @staticmethod
    def _discard(f: BinaryIO, temp: Path) -> None:
        f.close()
        temp.unlink(missing_ok=True)

    def _finish(self, key: str, f: BinaryIO, temp: Path, target: Path) -> None:
        try:
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(temp, target)
        except IsADirectoryError as exc:
            self._discard(f, temp)
            raise BankKeyError(
                f"bank key {key!r} names a directory of other objects, not an object"
            ) from exc
        except BaseException:
            self._discard(f, temp)
            raise

    def _put_sync(self, key: str, target: Path, data: bytes) -> None:
        f, temp = self._open_temp(key, target)
        try:
            f.write(data)
        except BaseException:
            self._discard(f, temp)
            raise
        self._finish(key, f, temp, target)

    async def put(self, key: str, data: bytes) -> None:
        """Write an object atomically (replacing any object of that key)."""
        self._check_writable()
        norm, target = self._target(key)
        await _run(functools.partial(self._put_sync, norm, target, bytes(data)))

    async def put_stream(self, key: str, chunks: AsyncIterable[bytes]) -> int:
        """Write an object from an async iterable of chunks; returns its size.

        Holds at most about one megabyte in memory. The object appears under its
        name only once complete; if the iterable raises or the task is cancelled,
        nothing is left behind and an older object of that key is kept.
        """
        self._check_writable()
        norm, target = self._target(key)
        f, temp = await _run(functools.partial(self._open_temp, norm, target))
        total = 0
        buffer = bytearray()
        try:
            async for chunk in chunks:
                buffer += chunk
                if len(buffer) >= _WRITE_BUFFER:
                    data, buffer = bytes(buffer), bytearray()
                    await _run(functools.partial(f.write, data))
                    total += len(data)
            if buffer:
                await _run(functools.partial(f.write, bytes(buffer)))
                total += len(buffer)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await _run(functools.partial(self._discard, f, temp))
            raise
        with anyio.CancelScope(shield=True):
            await _run(functools.partial(self._finish, norm, f, temp, target))
        return total

    async def delete(self, key: str) -> None:
        """Remove an object (no error if it does not exist) and its emptied directories."""
        self._check_writable()
        norm, target = self._target(key)
        await _run(functools.partial(self._delete_sync, norm, target))

    def _delete_sync(self, key: str, target: Path) -> None:
        self._confine(key, target)
        if target.is_dir() and not target.is_symlink():
            return  # a "directory" of other objects is not an object
        target.unlink(missing_ok=True)
        parent = target.parent
        while parent != self.directory and parent.is_relative_to(self.directory):
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent

    # -- reads -------------------------------------------------------------------------

    def _open_read(self, key: str, target: Path) -> BinaryIO:
        self._confine(key, target)
        try:
            return target.open("rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyError(f"no object {key!r} in this bank section") from None

    def _get_sync(self, key: str, target: Path) -> bytes:
        with self._open_read(key, target) as f:
            return f.read()

    async def get(self, key: str) -> bytes:
        """Read a whole object; :class:`KeyError` if there is none."""
        norm, target = self._target(key)
        return await _run(functools.partial(self._get_sync, norm, target))

    async def get_stream(self, key: str, chunk_size: int = 1 << 20) -> AsyncGenerator[bytes, None]:
        """Read an object in chunks of at most ``chunk_size`` bytes (never all at once).

        Close the iterator (``contextlib.aclosing``) if you stop early.
        """
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, not {chunk_size!r}")
        norm, target = self._target(key)
        f = await _run(functools.partial(self._open_read, norm, target))
        try:
            while chunk := await _run(functools.partial(f.read, chunk_size)):
                yield chunk
        finally:
            f.close()

    async def list(self, prefix: str = "") -> list[str]:
        """Keys of this section's objects that start with ``prefix``, sorted."""
        return await _run(functools.partial(self._list_sync, prefix))

    def _list_sync(self, prefix: str) -> builtins.list[str]:
        if not self.directory.is_dir():
            return []
        self._confine(".", self.directory)
        keys: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.directory):
            dirnames[:] = [d for d in dirnames if not d.startswith(_RESERVED)]
            rel = Path(dirpath).relative_to(self.directory).as_posix()
            for name in filenames:
                if name.startswith(_RESERVED) or os.path.islink(os.path.join(dirpath, name)):
                    continue  # (a planted link is no object: get() refuses it too)
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)


class FsBank:
    """A :class:`~karbor_async.plugin.Bank` in a directory tree (the default bank).

    ``FsBank(root)`` does no I/O; directories are made on first write.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root)

    @property
    def root(self) -> Path:
        return self._root

    def checkpoint_dir(self, checkpoint_id: str) -> Path:
        return self._root / escape_component(checkpoint_id)

    def section(
        self, checkpoint_id: str, resource: ResourceKey, *, read_only: bool = False
    ) -> FsBankSection:
        directory = (
            self.checkpoint_dir(checkpoint_id)
            / escape_component(resource[0])
            / escape_component(resource[1])
        )
        return FsBankSection(bank_root=self._root, directory=directory, read_only=read_only)

    async def delete_checkpoint(self, checkpoint_id: str) -> None:
        """Remove everything saved for a checkpoint (no error if there is nothing).

        The checkpoint's directory is first renamed aside, so a crash part-way
        never leaves a half-deleted checkpoint under its name; :meth:`cleanup`
        finishes such leftovers.
        """
        await _run(functools.partial(self._delete_checkpoint_sync, checkpoint_id))

    def _delete_checkpoint_sync(self, checkpoint_id: str) -> None:
        directory = self.checkpoint_dir(checkpoint_id)
        if directory.is_symlink():
            raise BankKeyError(
                f"the bank directory of checkpoint {checkpoint_id} ({directory}) is a symbolic "
                "link; the bank deletes only what it wrote, so nothing was touched: remove the "
                "link by hand"
            )
        aside = self._root / f"{_DELETING}{uuid.uuid4().hex}"
        try:
            os.replace(directory, aside)
        except FileNotFoundError:
            return
        shutil.rmtree(aside)
        _log.info("bank_checkpoint_deleted", checkpoint_id=checkpoint_id, root=str(self._root))

    async def free_bytes(self) -> int:
        """Bytes free for writing on the bank's file system (``statvfs``): a plugin or
        the engine can refuse a copy that cannot fit before it starts."""
        return await _run(self._free_bytes_sync)

    def _free_bytes_sync(self) -> int:
        where = self._root
        while not where.exists() and where != where.parent:
            where = where.parent  # (the root is made on first write)
        st = os.statvfs(where)
        return st.f_bavail * st.f_frsize

    async def list_checkpoints(self) -> list[str]:
        """Ids of the checkpoints that have data in this bank, sorted."""
        return await _run(self._list_checkpoints_sync)

    def _list_checkpoints_sync(self) -> list[str]:
        try:
            names = os.listdir(self._root)
        except FileNotFoundError:
            return []
        return sorted(
            unescape_component(n)
            for n in names
            if not n.startswith(".") and (self._root / n).is_dir()
        )

    async def cleanup(
        self, *, stale_after: float = _STALE_AFTER, checkpoint_id: str | None = None
    ) -> int:
        """Remove what a crash left: half-deleted checkpoints, and temporary files whose
        writer is gone (its host, pid and start time are in the file's name; a live
        writer's are never touched; a name without a writer counts as gone once older
        than ``stale_after`` seconds). With ``checkpoint_id``, only that checkpoint's
        temporary files. Returns how many entries were removed."""
        return await _run(functools.partial(self._cleanup_sync, stale_after, checkpoint_id))

    def _cleanup_sync(self, stale_after: float, checkpoint_id: str | None) -> int:
        if not self._root.is_dir():
            return 0
        removed = 0
        cutoff = time.time() - stale_after
        top = self._root
        if checkpoint_id is None:
            for entry in os.scandir(self._root):
                if entry.name.startswith(_DELETING):
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed += 1
        else:
            top = self.checkpoint_dir(checkpoint_id)
            if top.is_symlink() or not top.is_dir():
                return 0
        for dirpath, _dirnames, filenames in os.walk(top):
            for name in filenames:
                if name.startswith(_TMP):
                    path = Path(dirpath) / name
                    try:
                        if _temp_is_dead(name, path.stat().st_mtime, cutoff):
                            path.unlink()
                            removed += 1
                    except FileNotFoundError:
                        continue
        if removed:
            _log.info("bank_leftovers_removed", root=str(self._root), removed=removed)
        return removed
