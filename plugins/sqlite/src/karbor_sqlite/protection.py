"""The protection plugin for ``SQLite::Database`` (and the ``SQLite::Directory`` parent).

Protect: the cut (``on_prepare_finish``) opens a read transaction on the plugin's
own connection (WAL mode: writers go on); ``on_main`` runs the online backup from
that same connection, in steps, with progress, into a scratch file, then streams
it into the bank and closes the transaction. The cut lives in this process
(``cut_outlives_process=False``): recovery after a crash fails the checkpoint
instead of copying a later state, and a run that stops short closes it.

Restore writes a new file (``target``, ``target_dir`` or beside the original),
checks it with ``PRAGMA integrity_check`` and reports its path as the new id.
Delete removes the bank data and any scratch file.
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.from_thread
import anyio.to_thread

from karbor_async import HookContext, ProtectionPlugin, ResourceType
from karbor_async.plugin import CheckContext, Param
from karbor_sqlite import _sync
from karbor_sqlite._sync import Cut

__all__ = [
    "DATABASE",
    "DIRECTORY",
    "PARAMETERS",
    "SqliteProtection",
    "backup_key",
    "restore_target",
    "scratch_path",
]

DATABASE = "SQLite::Database"
"""An SQLite database file; its id is the file's absolute path."""
DIRECTORY = "SQLite::Directory"
"""A directory; its dependents are the SQLite databases directly in it."""

CHUNK = 1 << 20
"""Bytes per chunk streamed into the bank or out of it."""

PARAMETERS: dict[str, Param] = {
    "set_wal": Param(
        bool,
        default=False,
        operations={"protect"},
        description="switch a database that is not in WAL mode to WAL (persistent) "
        "instead of refusing it",
    ),
    "busy_timeout": Param(
        float,
        default=5.0,
        operations={"protect"},
        description="seconds the plugin's connection waits on a locked database",
    ),
    "step_pages": Param(
        int,
        default=1024,
        operations={"protect"},
        description="pages copied per online-backup step (one progress report each)",
    ),
    "step_pause": Param(
        float,
        default=0.0,
        operations={"protect"},
        description="seconds to pause between backup steps (throttles the copy's I/O; "
        "the read transaction stays open longer)",
    ),
    "cut_query": Param(
        str,
        default=None,
        operations={"protect"},
        description="a read-only query run inside the cut's transaction; its first row "
        "is saved as cut_query_result (for example SELECT max(id) FROM orders)",
    ),
    "scratch_dir": Param(
        str,
        default=None,
        operations={"protect", "delete"},
        description="where the backup is written before it is streamed into the bank "
        "(default: the system's temporary directory)",
    ),
    "target": Param(
        str,
        default=None,
        operations={"restore"},
        description="the path of the restored database (it must not exist)",
    ),
    "target_dir": Param(
        str,
        default=None,
        operations={"restore"},
        description="a directory to restore into, keeping the file's name",
    ),
}


def _param(parameters: Any, name: str) -> Any:
    """A parameter's value, or its declared default when the plan does not set it."""
    value = parameters.get(name)
    return PARAMETERS[name].default if value is None else value


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def backup_key(checkpoint_id: str) -> str:
    """The bank object of a database's backup, in its resource's section."""
    return f"{checkpoint_id}.sqlite3"


def scratch_path(parameters: Any, checkpoint_id: str, resource_id: str) -> Path:
    """The scratch file of one database's backup in one checkpoint.

    Named from the checkpoint and the resource, so a re-run (``attempt`` + 1) writes
    the same file and a delete after a crash finds and removes it.
    """
    base = parameters.get("scratch_dir") or tempfile.gettempdir()
    return Path(base) / f"karbor-sqlite-{checkpoint_id}-{_digest(resource_id)}.part"


def restore_target(parameters: Any, resource_id: str, run_id: str) -> Path:
    """Where a restore writes: ``target``, else ``target_dir``/name, else beside the
    original as ``STEM.restored-RUN_ID.SUFFIX`` (a re-run of the same restore run
    writes the same path)."""
    if parameters.get("target"):
        return Path(parameters["target"]).absolute()
    original = Path(resource_id)
    if parameters.get("target_dir"):
        return Path(parameters["target_dir"]).absolute() / original.name
    return original.with_name(f"{original.stem}.restored-{run_id}{original.suffix}")


class _Protect:
    def __init__(self, plugin: SqliteProtection) -> None:
        self._plugin = plugin

    async def check(self, ctx: CheckContext) -> None:
        p = ctx.parameters
        path = Path(ctx.resource.id)
        info = await anyio.to_thread.run_sync(
            functools.partial(
                _sync.inspect,
                path,
                set_wal=bool(_param(p, "set_wal")),
                timeout=float(_param(p, "busy_timeout")),
            )
        )
        free = getattr(ctx.bank, "free_bytes", None)
        if free is not None:
            room = int(await free())
            if room < info.size:
                raise ValueError(
                    f"the bank has {room} bytes free; {path} needs about {info.size} "
                    f"({info.page_count} pages of {info.page_size} bytes)"
                )
        scratch = scratch_path(p, ctx.checkpoint_id, ctx.resource.id).parent
        usage = await anyio.to_thread.run_sync(shutil.disk_usage, scratch)
        if usage.free < info.size:
            raise ValueError(
                f"the scratch directory {scratch} has {usage.free} bytes free; "
                f"{path} needs about {info.size}"
            )

    async def on_prepare_finish(self, ctx: HookContext) -> None:
        """The cut: a read transaction on this plugin's own connection (aborting: close it)."""
        key = (ctx.checkpoint_id, ctx.resource.id)
        await self._plugin.release(key)  # an earlier attempt's, if any: idempotent
        if ctx.aborting is not None:
            return
        p = ctx.parameters
        cut = Cut()
        limiter = anyio.CapacityLimiter(1)
        self._plugin.held[key] = (cut, limiter)
        try:
            await anyio.to_thread.run_sync(
                functools.partial(
                    _sync.open_cut,
                    cut,
                    Path(ctx.resource.id),
                    timeout=float(_param(p, "busy_timeout")),
                    cut_query=_param(p, "cut_query"),
                ),
                limiter=limiter,
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._plugin.release(key)
            raise
        ctx.mark_cut()
        ctx.save(
            path=ctx.resource.id,
            cut_wall=time.time(),
            page_size=cut.page_size,
            page_count=cut.page_count,
            cut_query_result=cut.query_result,
        )
        ctx.log.info("sqlite_cut", pages=cut.page_count, page_size=cut.page_size)

    async def on_main(self, ctx: HookContext) -> None:
        """The copy: the online backup from the cut's connection, then into the bank."""
        key = (ctx.checkpoint_id, ctx.resource.id)
        held = self._plugin.held.get(key)
        if held is None or held[0].conn is None:
            raise RuntimeError(
                f"no cut of {ctx.resource.id} is held by this process: its read transaction "
                "ended before its copy (a cut of this type lives only in the process that took it)"
            )
        cut, limiter = held
        scratch = scratch_path(ctx.parameters, ctx.checkpoint_id, ctx.resource.id)
        total = cut.page_count * cut.page_size
        report = ctx.report_progress
        pause = float(_param(ctx.parameters, "step_pause"))

        def progress(pages: int, of: int) -> None:  # in the worker thread, after each step
            anyio.from_thread.check_cancelled()
            if pause > 0 and pages < of:
                time.sleep(pause)
                anyio.from_thread.check_cancelled()
            done = pages * cut.page_size
            anyio.from_thread.run_sync(
                functools.partial(
                    report, 0.5 * pages / max(1, of), done=done, total=2 * total, message="backup"
                )
            )

        try:
            try:
                await anyio.to_thread.run_sync(
                    functools.partial(
                        _sync.backup_into,
                        cut,
                        scratch,
                        step_pages=int(_param(ctx.parameters, "step_pages")),
                        progress=progress,
                    ),
                    limiter=limiter,
                )
            finally:
                # The snapshot is copied (or the copy failed): let the WAL be checkpointed.
                with anyio.CancelScope(shield=True):
                    await self._plugin.release(key)
            digest = hashlib.sha256()
            size = await anyio.to_thread.run_sync(lambda: scratch.stat().st_size)

            async def chunks() -> AsyncIterator[bytes]:
                f = await anyio.to_thread.run_sync(scratch.open, "rb")
                sent = 0
                try:
                    while data := await anyio.to_thread.run_sync(
                        _sync.read_chunk, f, CHUNK, digest
                    ):
                        sent += len(data)
                        report(
                            0.5 + 0.5 * sent / max(1, size),
                            done=size + sent,
                            total=2 * size,
                            message="upload",
                        )
                        yield data
                finally:
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(f.close)

            stored = await ctx.bank.put_stream(backup_key(ctx.checkpoint_id), chunks())
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_sync.remove_db_files, scratch)
        ctx.save(key=backup_key(ctx.checkpoint_id), size=stored, sha256=digest.hexdigest())
        ctx.log.info("sqlite_copied", bytes=stored)


class _Restore:
    async def check(self, ctx: CheckContext) -> None:
        if not ctx.saved.get("key"):
            raise ValueError("nothing was saved for it in this checkpoint")
        target = restore_target(ctx.parameters, ctx.resource.id, ctx.run_id)

        def look() -> None:
            if target.exists():
                raise ValueError(f"the restore target {target} exists; give another target")
            if not target.parent.is_dir():
                raise ValueError(f"the restore target's directory {target.parent} does not exist")
            free = shutil.disk_usage(target.parent).free
            if free < int(ctx.saved.get("size", 0)):
                raise ValueError(f"{target.parent} has {free} bytes free; the database needs more")

        await anyio.to_thread.run_sync(look)

    async def on_main(self, ctx: HookContext) -> None:
        if ctx.restored_id(ctx.resource) is not None:
            return  # restored and reported before a crash: adopt it
        saved = ctx.saved
        target = restore_target(ctx.parameters, ctx.resource.id, ctx.run_id)
        want = str(saved["sha256"])
        if await anyio.to_thread.run_sync(target.exists):
            same = await anyio.to_thread.run_sync(_sync.file_sha256, target)
            if ctx.attempt > 1 and same == want:
                await ctx.report_restored(str(target))  # written before a crash: adopt it
                return
            raise FileExistsError(f"the restore target {target} exists")
        part = target.with_name(f"{target.name}.part-{ctx.run_id}")
        size = int(saved["size"])
        digest = hashlib.sha256()
        try:
            await anyio.to_thread.run_sync(_sync.remove_db_files, part)
            f = await anyio.to_thread.run_sync(part.open, "xb")
            written = 0
            try:
                async for chunk in ctx.bank.get_stream(str(saved["key"]), CHUNK):
                    await anyio.to_thread.run_sync(f.write, chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    ctx.report_progress(
                        0.9 * written / max(1, size), done=written, total=size, message="download"
                    )
                await anyio.to_thread.run_sync(f.flush)
            finally:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(f.close)
            _same_digest(digest.hexdigest(), want)
            await anyio.to_thread.run_sync(_sync.integrity_check, part)
            await anyio.to_thread.run_sync(_finish_restore, part, target)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_sync.remove_db_files, part)
            raise
        await ctx.report_restored(str(target))
        ctx.report_progress(1.0, done=size, total=size, message="restored")


def _same_digest(got: str, want: str) -> None:
    if got != want:
        raise RuntimeError(f"the backup in the bank has sha256 {got}, not the saved {want}")


def _finish_restore(part: Path, target: Path) -> None:
    if target.exists():
        raise FileExistsError(f"the restore target {target} appeared meanwhile")
    part.replace(target)
    _sync.remove_db_files(part)  # (side files the check's connection may have left)


class _Delete:
    def __init__(self, plugin: SqliteProtection) -> None:
        self._plugin = plugin

    async def on_main(self, ctx: HookContext) -> None:
        """Remove the bank data, any scratch file, and a cut this process still holds."""
        await self._plugin.release((ctx.checkpoint_id, ctx.resource.id))
        scratch = scratch_path(ctx.parameters, ctx.checkpoint_id, ctx.resource.id)
        await anyio.to_thread.run_sync(_sync.remove_db_files, scratch)
        bank = ctx.bank
        for key in await bank.list():
            await bank.delete(key)


class SqliteProtection(ProtectionPlugin):
    """Protects, restores and deletes SQLite databases (see the package's README)."""

    name = "sqlite"
    types: ClassVar[tuple[ResourceType, ...]] = (
        ResourceType(DATABASE, cut_outlives_process=False, parameters=PARAMETERS),
        ResourceType(DIRECTORY, snapshots=False, parameters={}),
    )

    def __init__(self) -> None:
        self.held: dict[tuple[str, str], tuple[Cut, anyio.CapacityLimiter]] = {}
        """The cuts this process holds, by (checkpoint id, database path)."""
        self._protect = _Protect(self)
        self._restore = _Restore()
        self._delete = _Delete(self)

    def get_protect_operation(self, resource_type: str) -> object | None:
        return self._protect if resource_type == DATABASE else None

    def get_restore_operation(self, resource_type: str) -> object | None:
        return self._restore if resource_type == DATABASE else None

    def get_delete_operation(self, resource_type: str) -> object | None:
        return self._delete if resource_type == DATABASE else None

    async def release(self, key: tuple[str, str]) -> None:
        """Close the read transaction of a held cut (none held: nothing to do)."""
        held = self.held.pop(key, None)
        if held is not None:
            cut, limiter = held
            await anyio.to_thread.run_sync(_sync.close_cut, cut, limiter=limiter)
