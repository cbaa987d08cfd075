"""Where a shard keeps its store, seen from outside the shard: three kinds.

Each kind says how the shard process is told about its store, what the shard's
resource carries (``extra``) for the protectables to find the store's resource,
what parameters the plan and the restore need, where the restore put the store,
and how to read a store (live or restored) into a :class:`~karbor_ledger._store.Tally`.

- :class:`SqliteFile`: an SQLite file, protected by the SQLite plugin
  (``SQLite::Database``, a live backup); restored as a new file.
- :class:`PostgresDatabase`: a PostgreSQL database, protected by the PostgreSQL
  plugin (``PostgreSQL::Database``, an exported snapshot and ``pg_dump``);
  restored into a new database, whose name the restore reports.
- :class:`FileOnFileSystem`: an SQLite file on a freezable, loop-mounted file
  system, protected by the fs plugin: the shard's dependent is the
  ``Linux::FileSystem`` (its mount point, frozen), whose own dependent, the
  ``Linux::DiskImage``, is cut by reflink; restored as a new image, from which
  the file is read without mounting it (``debugfs``).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.to_thread
import attrs

from karbor_async import Resource, RunOutcome
from karbor_ledger._store import Tally, read_sqlite

__all__ = [
    "DATABASE",
    "FILESYSTEM",
    "IMAGE",
    "SQLITE",
    "FileOnFileSystem",
    "PostgresDatabase",
    "SqliteFile",
    "Store",
    "read_file_in_image",
    "read_located",
    "read_postgres",
]

SQLITE = "SQLite::Database"
"""The resource type of an SQLite store (protected by the karbor-async-sqlite plugin)."""
DATABASE = "PostgreSQL::Database"
"""The resource type of a PostgreSQL store (the karbor-async-postgres plugin)."""
FILESYSTEM = "Linux::FileSystem"
"""The resource type of a mounted file system (the karbor-async-fs plugin)."""
IMAGE = "Linux::DiskImage"
"""The image file a loop-mounted file system lives in (the karbor-async-fs plugin)."""

Restored = Path | str
"""Where a restore put a store: a file's path, or a database's name."""


class Store(Protocol):
    @property
    def kind(self) -> str:
        """``sqlite``, ``postgres`` or ``fs`` (the shard resource's ``extra['store']``)."""
        ...

    def shard_args(self) -> list[str]:
        """The shard process's store arguments."""
        ...

    def shard_env(self) -> dict[str, str]:
        """Environment the shard process needs for its store (a password)."""
        ...

    def extra(self) -> dict[str, str]:
        """What the shard's resource carries for the protectables."""
        ...

    def plan_parameters(self) -> dict[str, dict[str, Any]]: ...

    def restore_parameters(self, restore_dir: Path) -> dict[str, dict[str, Any]]: ...

    async def restored(self, outcome: RunOutcome) -> Restored:
        """Where the restore run ``outcome`` put this store."""
        ...

    async def read(self, where: Restored | None = None) -> Tally:
        """Read the store restored at ``where`` (``None``: the live one)."""
        ...

    async def resolve_secret(self, name: str) -> str | None:
        """The value of a secret reference this store's parameters name, else None."""
        ...


@attrs.frozen
class SqliteFile:
    """An SQLite file (the default: every machine has one)."""

    path: Path
    kind: str = "sqlite"

    def shard_args(self) -> list[str]:
        return ["--db", str(self.path)]

    def shard_env(self) -> dict[str, str]:
        return {}

    def extra(self) -> dict[str, str]:
        return {"store": self.kind, "db": str(self.path)}

    def plan_parameters(self) -> dict[str, dict[str, Any]]:
        return {}

    def restore_parameters(self, restore_dir: Path) -> dict[str, dict[str, Any]]:
        return {SQLITE: {"target_dir": str(restore_dir)}}

    async def restored(self, outcome: RunOutcome) -> Restored:
        return Path(outcome.restored[(SQLITE, str(self.path))])

    async def read(self, where: Restored | None = None) -> Tally:
        return await anyio.to_thread.run_sync(read_sqlite, Path(where or self.path))

    async def resolve_secret(self, name: str) -> str | None:
        return None


@attrs.frozen
class PostgresDatabase:
    """A PostgreSQL database (it exists, empty or a shard's from before), reached over
    TCP with a password: the plan names it by a secret reference (``secret``), which
    :meth:`resolve_secret` answers; the shard gets it in ``PGPASSWORD``."""

    dbname: str
    host: str
    port: int
    user: str
    password: str = attrs.field(repr=False)
    secret: str = "ledger-pg-password"
    kind: str = "postgres"

    def url(self, dbname: str | None = None) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname or self.dbname}"

    def shard_args(self) -> list[str]:
        return ["--pg", self.url()]

    def shard_env(self) -> dict[str, str]:
        return {"PGPASSWORD": self.password}

    def extra(self) -> dict[str, str]:
        return {"store": self.kind, "dbname": self.dbname}

    def plan_parameters(self) -> dict[str, dict[str, Any]]:
        # per resource (TYPE#ID): two shards may keep their databases on two servers
        return {
            f"{DATABASE}#{self.dbname}": {
                "host": self.host,
                "port": self.port,
                "user": self.user,
                "password": self.secret,
            }
        }

    def restore_parameters(self, restore_dir: Path) -> dict[str, dict[str, Any]]:
        return {}  # a new database, named <dbname>_<checkpoint> by the plugin

    async def restored(self, outcome: RunOutcome) -> Restored:
        return outcome.restored[(DATABASE, self.dbname)]

    async def read(self, where: Restored | None = None) -> Tally:
        return await read_postgres(self.url(str(where or self.dbname)), self.password)

    async def resolve_secret(self, name: str) -> str | None:
        return self.password if name == self.secret else None


@attrs.frozen
class FileOnFileSystem:
    """An SQLite file at ``mount/name`` on a freezable file system mounted from an
    image on a loop device (the fs plugin's ``Linux::FileSystem``)."""

    mount: Path
    name: str = "store.db"
    kind: str = "fs"

    @property
    def path(self) -> Path:
        return self.mount / self.name

    def shard_args(self) -> list[str]:
        return ["--db", str(self.path)]

    def shard_env(self) -> dict[str, str]:
        return {}

    def extra(self) -> dict[str, str]:
        return {"store": self.kind, "db": str(self.path), "mount": str(self.mount)}

    def plan_parameters(self) -> dict[str, dict[str, Any]]:
        return {}

    def restore_parameters(self, restore_dir: Path) -> dict[str, dict[str, Any]]:
        return {IMAGE: {"restore_dir": str(restore_dir)}}

    async def image(self) -> str:
        """The image file behind the mount, found as the engine finds it (the fs
        plugin's protectable)."""
        from karbor_fs import ImageProtectable

        found = list(await ImageProtectable().dependents(Resource(FILESYSTEM, str(self.mount))))
        if not found:
            raise ValueError(f"{self.mount} is not a file system on a loop-attached image")
        return found[0].id

    async def restored(self, outcome: RunOutcome) -> Restored:
        return Path(outcome.restored[(IMAGE, await self.image())])

    async def read(self, where: Restored | None = None) -> Tally:
        if where is None:
            return await anyio.to_thread.run_sync(read_sqlite, self.path)
        return await anyio.to_thread.run_sync(read_file_in_image, Path(where), self.name)

    async def resolve_secret(self, name: str) -> str | None:
        return None


async def read_postgres(url: str, password: str | None = None) -> Tally:
    """Read one PostgreSQL store (``postgresql://USER@HOST:PORT/DBNAME``; no password:
    ``PGPASSWORD``'s) in one read-only snapshot."""
    import asyncpg  # (only a PostgreSQL store needs it)

    conn = await asyncpg.connect(url, password=password, timeout=30)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            total = await conn.fetchval("SELECT COALESCE(SUM(balance), 0) FROM accounts")
            ids = frozenset(r[0] for r in await conn.fetch("SELECT id FROM transfers"))
    finally:
        await conn.close()
    return Tally(int(total), ids)


async def read_located(where: str) -> Tally:
    """Read a store named on a command line: ``postgresql://...`` (a PostgreSQL
    database), ``IMAGE:/PATH`` (the SQLite file at PATH inside the ext4 image IMAGE, read
    without mounting it) or a path (an SQLite file)."""
    if where.startswith(("postgresql://", "postgres://")):
        return await read_postgres(where)
    image, sep, inside = where.partition(":/")
    if sep and await anyio.Path(image).is_file():
        return await anyio.to_thread.run_sync(read_file_in_image, Path(image), "/" + inside)
    return await anyio.to_thread.run_sync(read_sqlite, Path(where))


def _debugfs_dump(image: Path, inside: str, out: Path) -> bool:
    """Copy the file ``inside`` (a path in the file system) out of ``image``; False when
    the file system has no such file. ``-c`` opens the image read-only."""
    done = subprocess.run(
        ["debugfs", "-c", "-R", f"dump -p {inside} {out}", str(image)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if done.returncode != 0:
        raise RuntimeError(f"debugfs on {image}: {done.stderr.strip()}")
    if "File not found" in done.stderr:
        return False
    return out.is_file()


def read_file_in_image(image: Path, name: str) -> Tally:
    """Read the SQLite store ``name`` (a path inside the file system) out of an ext2/3/4
    ``image`` without mounting it: ``debugfs`` copies the file and its write-ahead log
    (the commits not yet checkpointed) into a temporary directory, SQLite folds the log
    in, and the copy is read. Blocking: run it in a worker thread."""
    if shutil.which("debugfs") is None:
        raise FileNotFoundError("debugfs (e2fsprogs) is needed to read a file out of an image")
    inside = "/" + name.lstrip("/")
    with tempfile.TemporaryDirectory(prefix="ledger-image-") as tmp:
        copy = Path(tmp) / os.path.basename(inside)
        if not _debugfs_dump(image, inside, copy):
            raise FileNotFoundError(f"no store {inside} in the image {image}")
        _debugfs_dump(image, inside + "-wal", Path(f"{copy}-wal"))
        db = sqlite3.connect(copy, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=DELETE")  # (replays and removes the log)
        finally:
            db.close()
        return read_sqlite(copy)
