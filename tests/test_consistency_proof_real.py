"""The consistency proof on the real-world store set: PostgreSQL plus a frozen file system.

The same two proofs as ``test_consistency_proof.py``, with shard A's store a
PostgreSQL database (``accounts`` and ``transfers`` tables, written with asyncpg;
cut by an exported snapshot, copied by ``pg_dump``, restored into a new database)
and shard B's an SQLite file on an ext4 file system mounted from an image on a
loop device (``Linux::FileSystem``: frozen; its image cut by reflink, copied,
restored as a new image, from which the file is read without mounting it).

- Under barrier ``cut`` with the shards quiesced, every one of 30 restored pairs
  holds.
- With quiesce off (the shards' pause; the file system is still frozen around its
  cut, which keeps the image clean but not the application consistent), 30
  protects catch a transfer in flight at least once; the catch rate is printed.

Root, PostgreSQL 15 and the file-system tools are needed (``pg_cluster``,
``fs_stack``): skipped without them, failed under CI.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.to_thread
import pytest

from helpers import need_root
from karbor_async import Engine, FsBank, SqliteStore
from karbor_fs.testing import Stack
from karbor_ledger import (
    FileOnFileSystem,
    LedgerApp,
    PostgresDatabase,
    ShardDatabaseProtectable,
    ShardFileSystemProtectable,
    ShardProtection,
    running_ledger,
)
from karbor_ledger.proof import ProofSample, protect_restore_check
from pgcluster import PgCluster
from proofchecks import assert_all_consistent, assert_caught

pytest.importorskip("asyncpg")
karbor_postgres = pytest.importorskip("karbor_postgres")
karbor_fs = pytest.importorskip("karbor_fs")

_LABEL = " (PostgreSQL + file on a frozen ext4)"

PROTECTS = 30


@pytest.fixture
def anyio_backend() -> str:
    """asyncpg is asyncio's; real processes, sockets and file systems: real time."""
    return "asyncio"


@pytest.fixture
def shard_db(pg_cluster: PgCluster) -> Iterator[str]:
    """An empty database for shard A; it and every database restored from it are
    dropped afterwards."""
    name = pg_cluster.create_database("ledger")
    yield name
    for other in pg_cluster.databases():
        if other.startswith(name):
            pg_cluster.drop_database(other)


@asynccontextmanager
async def _real_ledger(
    tmp_path: Path, cluster: PgCluster, dbname: str, stack: Stack
) -> AsyncIterator[tuple[LedgerApp, Engine]]:
    need_root("reading a restored image", ("debugfs",))
    stores = (
        PostgresDatabase(dbname, cluster.host, cluster.port, cluster.user, cluster.password),
        FileOnFileSystem(stack.mnt, "b.db"),
    )
    async with (
        running_ledger(tmp_path / "app", stores=stores) as app,
        SqliteStore.open(tmp_path / "karbor.db") as store,
    ):
        # (explicit plugins: the ledger's protectables as this tree has them, whatever
        # entry points an installed copy of the package declares)
        engine = Engine(
            [ShardProtection(), karbor_postgres.PostgresPlugin(), karbor_fs.FsProtection()],
            [
                ShardDatabaseProtectable(),
                ShardFileSystemProtectable(),
                karbor_fs.ImageProtectable(),
            ],
            store=store,
            bank=FsBank(tmp_path / "bank"),
            discover=False,
            secrets=app.resolve_secret,
        )
        async with engine:
            yield app, engine


async def _samples(
    tmp_path: Path, cluster: PgCluster, dbname: str, stack: Stack, *, quiesce: bool
) -> list[ProofSample]:
    samples: list[ProofSample] = []
    started = time.monotonic()
    async with _real_ledger(tmp_path, cluster, dbname, stack) as (app, engine):
        for i in range(PROTECTS):
            restore_dir = tmp_path / f"restored-{i}"
            sample = await protect_restore_check(
                engine, app, restore_dir, barrier="cut", quiesce=quiesce
            )
            samples.append(sample)
            # what the check read is all a sample keeps: free the room and the server
            shutil.rmtree(restore_dir, ignore_errors=True)
            await anyio.to_thread.run_sync(cluster.drop_database, str(sample.restored[0]))
            await engine.delete(sample.protect.checkpoint_id)
        stats = await app.stats()
    print(f"{PROTECTS} protect/restore/check cycles in {time.monotonic() - started:.1f} s")
    assert stats["A"]["transfers"] > 100, "the application hardly wrote while protected"
    return samples


async def test_every_restored_pair_is_consistent_under_barrier_cut_with_quiesce(
    tmp_path: Path, pg_cluster: PgCluster, shard_db: str, fs_stack: Stack
) -> None:
    samples = await _samples(tmp_path, pg_cluster, shard_db, fs_stack, quiesce=True)
    assert_all_consistent(samples, _LABEL)


async def test_without_quiesce_a_restored_pair_is_caught_inconsistent(
    tmp_path: Path, pg_cluster: PgCluster, shard_db: str, fs_stack: Stack
) -> None:
    samples = await _samples(tmp_path, pg_cluster, shard_db, fs_stack, quiesce=False)
    assert_caught(samples, _LABEL)
