"""Opening the SQLite store's file: connections, WAL mode and forward migration."""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosqlite
import anyio

from karbor_async._liveness import owner_name
from karbor_async._log import get_logger
from karbor_async._sqlite_schema import (
    APPLICATION_ID,
    MAGIC,
    migration_statements,
    schema_version,
)
from karbor_async.exceptions import ForeignFileError, NewerSchemaError, StoreError

_log = get_logger("karbor_async._sqlite")

_BUSY_TIMEOUT = 10.0
"""How long a connection waits for another process's lock before failing."""


async def remove_store_files(path: Path) -> None:
    """Remove a store file and its ``-wal`` and ``-shm`` (only ever one this code created
    and stored nothing in)."""
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            await anyio.Path(f"{path}{suffix}").unlink()


def _default_owner() -> str:
    return owner_name()


async def _connect(path: Path, *, read_only: bool) -> aiosqlite.Connection:
    conn = await aiosqlite.connect(path, isolation_level=None, timeout=_BUSY_TIMEOUT)
    conn.row_factory = sqlite3.Row
    try:
        await conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT * 1000)}")
        if read_only:
            await conn.execute("PRAGMA query_only = ON")
        else:
            # The checkpointer task copies the WAL back on its own connection, so a
            # commit never pays for a checkpoint (that kept commit p99 near p50).
            await conn.execute("PRAGMA wal_autocheckpoint = 0")
    except BaseException:
        with anyio.CancelScope(shield=True):
            await conn.close()
        raise
    return conn


async def _close(conn: aiosqlite.Connection) -> None:
    with anyio.CancelScope(shield=True):
        await conn.close()


async def _fetchone(conn: aiosqlite.Connection, sql: str, params: Sequence[object] = ()) -> Any:
    async with conn.execute(sql, params) as cur:
        return await cur.fetchone()


async def _version_under_lock(conn: aiosqlite.Connection, path: Path, target: int) -> int:
    """Read the file's schema version again under the write lock.

    Another process may have created or migrated the file since we inspected it.
    """
    app_id = int((await _fetchone(conn, "PRAGMA application_id"))[0])
    tables = {
        str(r[0])
        for r in await conn.execute_fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")
    }
    if app_id == 0 and not tables:
        return 0
    if app_id != APPLICATION_ID:
        raise ForeignFileError(
            f"{path} became another application's database while opening; left untouched"
        )
    found = await _fetchone(conn, "SELECT value FROM meta WHERE key = 'schema_version'")
    version = int(found[0])
    if version > target:
        raise NewerSchemaError(
            f"{path} has store schema version {version}, written by a newer karbor-async; "
            f"this one reads up to version {target}: upgrade karbor-async to open it"
        )
    return version


async def _prepare(conn: aiosqlite.Connection, path: Path, inspected: int) -> int:
    """Switch to WAL and migrate forward; return the schema version now in the file."""
    row = await _fetchone(conn, "PRAGMA journal_mode = WAL")
    if row is None or str(row[0]).lower() != "wal":
        raise StoreError(
            f"{path}: SQLite could not switch the store to WAL mode (got {row and row[0]!r}); "
            "put the store on a local file system"
        )
    await conn.execute("PRAGMA synchronous = NORMAL")
    target = schema_version()
    if inspected == target:
        return target
    await conn.execute("BEGIN IMMEDIATE")
    try:
        version = await _version_under_lock(conn, path, target)
        for produces, statements in migration_statements(version):
            for statement in statements:
                await conn.execute(statement)
            _log.info("sqlite_store_migrated", path=str(path), schema_version=produces)
        if version == 0:
            await conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
            await conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("magic", MAGIC), ("created_wall", repr(time.time()))],
            )
        await conn.execute(
            "INSERT INTO meta (key, value) VALUES ('schema_version', ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(target),),
        )
        await conn.execute(f"PRAGMA user_version = {target}")
        await conn.execute("COMMIT")
    except BaseException:
        with anyio.CancelScope(shield=True):
            await conn.execute("ROLLBACK")
        raise
    return target
