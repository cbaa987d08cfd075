"""Restore into a new database with ``pg_restore``; delete what protect saved."""

from __future__ import annotations

import re
import subprocess

import anyio
import anyio.abc

from karbor_async import HookContext
from karbor_async.plugin import CheckContext
from karbor_postgres import _exports
from karbor_postgres._protect import DumpFailedError, _drain, _message, dump_key, unwrap_single
from karbor_postgres._settings import (
    PostgresError,
    Settings,
    app_name,
    child_env,
    conninfo_quote,
    find_tool,
    passfile,
    quote_ident,
)

__all__ = ["DeleteDatabase", "RestoreDatabase", "restore_target"]

_NAMEDATALEN = 63
_DONE = "karbor-async: restored from checkpoint {checkpoint} ({resource})"


def restore_target(checkpoint_id: str, dbname: str, given: str | None = None) -> str:
    """The new database's name: the ``restore_dbname`` parameter, else
    ``<dbname>_<checkpoint id>`` (lower case, ``-`` as ``_``, 63 bytes at most)."""
    if given:
        return given
    suffix = "_" + re.sub(r"[^a-z0-9_]", "_", checkpoint_id.lower())
    head = dbname.encode()[: _NAMEDATALEN - len(suffix.encode())].decode(errors="ignore")
    return head + suffix


def _target(ctx: HookContext | CheckContext, settings: Settings) -> str:
    given = ctx.parameters.get("restore_dbname")
    source = str(ctx.saved.get("dbname") or settings.dbname)
    return restore_target(ctx.checkpoint_id, source, given)


class RestoreDatabase:
    """The restore operation: ``CREATE DATABASE`` (from ``template0``), then
    ``pg_restore --single-transaction`` fed from the bank; reports the new name."""

    async def check(self, ctx: CheckContext) -> None:
        """Refuse a wrong password, a checkpoint with no dump, or a target that exists."""
        settings = Settings.from_parameters(ctx.resource, ctx.parameters)
        await find_tool("pg_restore", settings)
        if not ctx.saved.get("dump_bytes"):
            raise PostgresError("the checkpoint holds no dump of this database")
        target = _target(ctx, settings)
        conn = await settings.connect(
            settings.maintenance_db, application_name=app_name("check", ctx.run_id, ctx.resource)
        )
        try:
            exists = await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", target)
        finally:
            await _exports.close_connection(conn)
        if exists:
            raise PostgresError(
                f"database {target!r} already exists on {settings.where}; restore into "
                "another name (parameter restore_dbname)"
            )

    async def on_main(self, ctx: HookContext) -> None:
        settings = Settings.from_parameters(ctx.resource, ctx.parameters)
        target = _target(ctx, settings)
        done_mark = _DONE.format(checkpoint=ctx.checkpoint_id, resource=ctx.resource.id)
        application = app_name("restore", ctx.run_id, ctx.resource)
        conn = await settings.connect(settings.maintenance_db, application_name=application)
        try:
            row = await conn.fetchrow(
                "SELECT shobj_description(oid, 'pg_database') AS mark FROM pg_database "
                "WHERE datname = $1",
                target,
            )
            if row is not None:
                if ctx.restored_id(ctx.resource) != target:
                    raise PostgresError(
                        f"database {target!r} already exists on {settings.where} and is not "
                        "this restore's; restore into another name (parameter restore_dbname)"
                    )
                if row["mark"] == done_mark:
                    return  # an earlier attempt finished it: adopt
                # An earlier attempt created it and died mid-load (a single transaction,
                # so it is empty): start it again.
                await conn.execute(f"DROP DATABASE {quote_ident(target)} WITH (FORCE)")
            await conn.execute(f"CREATE DATABASE {quote_ident(target)} TEMPLATE template0")
        finally:
            await _exports.close_connection(conn)
        await ctx.report_restored(target)
        await self._load(ctx, settings, target, application)
        conn = await settings.connect(settings.maintenance_db, application_name=application)
        try:
            await conn.execute(
                f"COMMENT ON DATABASE {quote_ident(target)} IS "
                + "'"
                + done_mark.replace("'", "''")
                + "'"
            )
        finally:
            await _exports.close_connection(conn)

    async def _load(
        self, ctx: HookContext, settings: Settings, target: str, application: str
    ) -> None:
        pg_restore = await find_tool("pg_restore", settings)
        key = str(ctx.saved.get("dump_key") or dump_key(ctx.checkpoint_id, ctx.resource))
        total = ctx.saved.get("dump_bytes")
        command = [
            pg_restore,
            "-w",
            "--single-transaction",
            "-d",
            "dbname=" + conninfo_quote(target),
        ]
        if ctx.parameters.get("no_owner"):
            command.append("--no-owner")
        stderr = bytearray()
        size = total if isinstance(total, int) else None
        async with passfile(settings.password) as (path, fds):
            process = await anyio.open_process(
                command,
                stdout=subprocess.DEVNULL,
                env=child_env(settings, application, path),
                pass_fds=fds,
            )
            async with process:
                try:
                    with unwrap_single():
                        async with anyio.create_task_group() as tg:
                            tg.start_soon(_drain, process.stderr, stderr)
                            await self._feed(ctx, process, key, size)
                    code = await process.wait()
                except BaseException:
                    if process.returncode is None:
                        process.kill()
                    raise
        if code != 0:
            raise DumpFailedError(f"pg_restore exited with {code}: {_message(stderr)}")

    async def _feed(
        self, ctx: HookContext, process: anyio.abc.Process, key: str, total: int | None
    ) -> None:
        assert process.stdin is not None
        done = 0
        try:
            async for chunk in ctx.bank.get_stream(key):
                await process.stdin.send(chunk)
                done += len(chunk)
                ctx.report_progress(done=done, total=total, message="pg_restore")
        except (anyio.BrokenResourceError, BrokenPipeError):
            pass  # pg_restore stopped reading: it failed, and its exit code says why
        finally:
            await process.stdin.aclose()


class DeleteDatabase:
    """The delete operation: closes a cut this process still holds, removes the dump."""

    async def on_main(self, ctx: HookContext) -> None:
        await _exports.close((ctx.checkpoint_id, ctx.resource.key))
        for key in await ctx.bank.list():
            await ctx.bank.delete(key)
