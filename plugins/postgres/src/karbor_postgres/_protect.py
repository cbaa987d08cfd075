"""Protect: the cut exports a snapshot; ``on_main`` streams ``pg_dump --snapshot`` into the bank."""

from __future__ import annotations

import re
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import anyio
import anyio.abc
import asyncpg

from karbor_async import HookContext, Resource
from karbor_async.plugin import CheckContext
from karbor_postgres import _exports
from karbor_postgres._settings import (
    PostgresError,
    Settings,
    app_name,
    child_env,
    conninfo_quote,
    find_tool,
    passfile,
    tool_major,
)

__all__ = ["DumpFailedError", "ProtectDatabase", "SnapshotLostError", "dump_key"]

_CHUNK = 1 << 16
_STDERR_KEEP = 8192

# The database's size on disk (pg_database_size sums its files and takes no lock, so
# a check never waits behind DDL): a custom-format dump is smaller (compressed, no
# index data), so a bank with less room is refused; one with more fits the dump.
_SIZE = "SELECT pg_database_size(current_database())"

# pg_dump holds the snapshot once it ran SET TRANSACTION SNAPSHOT, the first statement
# of its transaction block to take a snapshot (any earlier one would make the import
# fail): its backend then has an xmin, the snapshot's, which is also the exporting
# transaction's own, in a statement after the block's first. Before the block it runs
# single SELECTs (pg_is_in_recovery(), set_config()) that hold a momentary snapshot of
# their own, maybe with the same xmin; those are their transaction's first statement.
_TAKEN = """
SELECT EXISTS (
  SELECT 1 FROM pg_stat_activity d
  WHERE d.application_name = $1
    AND d.backend_xmin IS NOT NULL
    AND d.backend_xmin = (SELECT backend_xmin FROM pg_stat_activity WHERE pid = pg_backend_pid())
    AND d.query_start > d.xact_start
)
"""


class SnapshotLostError(PostgresError):
    """The exported snapshot of this checkpoint's cut is gone; a copy now would be of a
    later state, so the checkpoint cannot be completed."""


class DumpFailedError(PostgresError):
    """``pg_dump`` or ``pg_restore`` exited with an error (its message is included)."""


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


def dump_key(checkpoint_id: str, resource: Resource) -> str:
    """The bank object of a database's dump, named after the checkpoint and the resource."""
    return f"{_safe(checkpoint_id)}-{_safe(resource.id)}.pgdump"


def _export_key(ctx: HookContext | CheckContext) -> _exports.ExportKey:
    return (ctx.checkpoint_id, ctx.resource.key)


async def _drain(stream: anyio.abc.ByteReceiveStream | None, keep: bytearray) -> None:
    """Read a child's stderr to its end, keeping the last few kilobytes."""
    if stream is None:
        return
    async for chunk in stream:
        keep += chunk
        del keep[:-_STDERR_KEEP]


@contextmanager
def unwrap_single() -> Iterator[None]:
    """A task group's lone failure raised as itself, so the hook's error names it (pg_dump's
    message) rather than "unhandled errors in a TaskGroup"."""
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
            raise group.exceptions[0] from None
        raise


def _message(stderr: bytearray) -> str:
    return stderr.decode(errors="replace").strip() or "(no message)"


class ProtectDatabase:
    """The protect operation of ``PostgreSQL::Database``."""

    def __init__(self, export_idle_timeout: float) -> None:
        self._default_idle = export_idle_timeout

    async def check(self, ctx: CheckContext) -> None:
        """Refuse a database that does not exist, a wrong password, a ``pg_dump`` older
        than the server, or a bank with less room than the database takes on disk."""
        settings = Settings.from_parameters(ctx.resource, ctx.parameters)
        pg_dump = await find_tool("pg_dump", settings)
        conn = await settings.connect(application_name=app_name("check", ctx.run_id, ctx.resource))
        try:
            server = int(await conn.fetchval("SHOW server_version_num")) // 10000
            size = int(await conn.fetchval(_SIZE))
        finally:
            await _exports.close_connection(conn)
        major = await tool_major(pg_dump)
        if major < server:
            raise PostgresError(
                f"{pg_dump} is version {major}, older than the server ({server}); "
                "set bin_dir to a newer pg_dump"
            )
        free_bytes = getattr(ctx.bank, "free_bytes", None)
        if free_bytes is not None:
            room = int(await free_bytes())
            if room < size:
                raise PostgresError(
                    f"the bank has {room} bytes free, but database {settings.dbname!r} "
                    f"takes {size} bytes; free some room or use another bank"
                )

    async def _connect_for_cut(self, ctx: HookContext) -> asyncpg.Connection:
        settings = Settings.from_parameters(ctx.resource, ctx.parameters)
        idle = float(ctx.parameters.get("export_idle_timeout") or self._default_idle)
        return await settings.connect(
            application_name=app_name("cut", ctx.run_id, ctx.resource),
            server_settings={"idle_in_transaction_session_timeout": str(int(idle * 1000))},
        )

    async def on_prepare_begin(self, ctx: HookContext) -> None:
        """Connect before the cut (log-in and authentication take milliseconds), so the
        cut itself is two round trips and the cuts of a group stay close together."""
        key = _export_key(ctx)
        await _exports.close(key)  # a re-run replaces what an earlier attempt held
        _exports.park(key, await self._connect_for_cut(ctx))

    async def on_prepare_finish(self, ctx: HookContext) -> None:
        """The cut: a REPEATABLE READ transaction exports its snapshot. No lock is taken
        and no writer waits; the transaction stays open for ``pg_dump`` to import it."""
        key = _export_key(ctx)
        conn = _exports.unpark(key)
        await _exports.close(key)  # a re-run cut replaces what an earlier attempt held
        if ctx.aborting is not None:  # never cut while aborting; hold nothing
            if conn is not None:
                await _exports.close_connection(conn)
            return
        if conn is None or conn.is_closed():  # (called without on_prepare_begin)
            conn = await self._connect_for_cut(ctx)
        settings = Settings.from_parameters(ctx.resource, ctx.parameters)
        try:
            await conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            sent = anyio.current_time()
            [row] = await conn.fetch(
                "SELECT pg_export_snapshot() AS id, pg_current_snapshot()::text AS seen, "
                "current_setting('server_version') AS version"
            )
            at = (sent + anyio.current_time()) / 2  # the server took it in between
            ctx.mark_cut(at)
        except BaseException:
            await _exports.close_connection(conn)
            raise
        _exports.hold(key, _exports.Export(conn, str(row["id"]), at))
        ctx.save(
            snapshot_id=str(row["id"]),
            snapshot=str(row["seen"]),
            server_version=str(row["version"]),
            dbname=settings.dbname,
            host=settings.host,
            port=settings.port,
            dump_key=dump_key(ctx.checkpoint_id, ctx.resource),
        )

    async def on_main(self, ctx: HookContext) -> None:
        """Stream ``pg_dump --snapshot=ID -Fc`` into the bank, with progress; close the
        exporting transaction as soon as pg_dump's session holds the snapshot."""
        key = _export_key(ctx)
        export = _exports.get(key)
        snapshot = ctx.saved.get("snapshot_id")
        if export is None or export.snapshot_id != snapshot or export.connection.is_closed():
            await _exports.close(key)
            raise SnapshotLostError(
                f"the snapshot exported at this checkpoint's cut ({snapshot}) is no longer "
                "open (the process that took it ended, or it waited longer than "
                "export_idle_timeout); a copy now would not be of the cut, so this "
                "checkpoint cannot be completed: protect again"
            )
        try:
            size = await self._dump(ctx, export)
        finally:
            await _exports.close(key)
        ctx.save(dump_bytes=size)

    async def _dump(self, ctx: HookContext, export: _exports.Export) -> int:
        settings = Settings.from_parameters(ctx.resource, ctx.parameters)
        pg_dump = await find_tool("pg_dump", settings)
        application = app_name("dump", ctx.run_id, ctx.resource)
        # (the database as a conninfo holding only its name: a name with "=" or a
        # leading "-" is then still a name)
        target = "dbname=" + conninfo_quote(settings.dbname)
        command = [pg_dump, f"--snapshot={export.snapshot_id}", "-Fc", "-w", "-d", target]
        stderr = bytearray()
        key = dump_key(ctx.checkpoint_id, ctx.resource)
        # (the password file lives as long as the child: it may read it at any time)
        async with passfile(settings.password) as (path, fds):
            process = await anyio.open_process(
                command,
                stdin=subprocess.DEVNULL,
                env=child_env(settings, application, path),
                pass_fds=fds,
            )
            async with process:
                try:
                    with unwrap_single():
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(_drain, process.stderr, stderr)
                            tg.start_soon(
                                self._release_when_taken, ctx, export, application, process
                            )
                            chunks = self._chunks(ctx, process, stderr)
                            size = await ctx.bank.put_stream(key, chunks)
                except BaseException:
                    if process.returncode is None:
                        process.kill()
                    raise
        return size

    async def _chunks(
        self, ctx: HookContext, process: anyio.abc.Process, stderr: bytearray
    ) -> AsyncIterator[bytes]:
        """pg_dump's output; raises at the end if it failed, so no partial object is kept."""
        assert process.stdout is not None
        done = 0
        async for chunk in process.stdout:
            done += len(chunk)
            ctx.report_progress(done=done, message="pg_dump")
            yield chunk
        code = await process.wait()
        if code != 0:
            raise DumpFailedError(f"pg_dump exited with {code}: {_message(stderr)}")

    async def _release_when_taken(
        self,
        ctx: HookContext,
        export: _exports.Export,
        application: str,
        process: anyio.abc.Process,
    ) -> None:
        """Close the exporting transaction once pg_dump's session holds the snapshot
        (``pg_stat_activity``: its ``backend_xmin``), or once pg_dump has ended."""
        conn = export.connection
        delay = 0.002
        while process.returncode is None:
            try:
                await conn.execute("SELECT pg_stat_clear_snapshot()")  # fresh activity rows
                if await conn.fetchval(_TAKEN, application):
                    break
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                break  # the export is gone: pg_dump's import fails and says so
            await anyio.sleep(delay)
            delay = min(delay * 2, 0.05)
        held_for = anyio.current_time() - export.cut_at
        await _exports.close(_export_key(ctx))
        ctx.save(export_held_s=round(held_for, 6))
