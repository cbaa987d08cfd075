"""The two-shard sample application: its pause is session-bound, its invariant is checked.

These run the real shard processes (SQLite stores, Unix sockets); the proof that
restored pairs are consistent is in ``test_consistency_proof.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import pytest

from helpers import need_tools
from karbor_async import Resource
from karbor_async.exceptions import PlanError
from karbor_async.plugin import Protectable
from karbor_ledger import (
    ACCOUNTS,
    DATABASE,
    FILESYSTEM,
    IMAGE,
    OPENING_BALANCE,
    SHARD,
    SQLITE,
    FileOnFileSystem,
    LedgerApp,
    PostgresDatabase,
    ShardDatabaseProtectable,
    ShardFileSystemProtectable,
    ShardSpec,
    ShardStoreProtectable,
    SqliteFile,
    check_pair,
    running_ledger,
)
from karbor_ledger._shard import _Lines


@pytest.fixture
def anyio_backend() -> str:
    """Real processes and sockets: real time (trio's virtual clock would race them)."""
    return "asyncio"


async def _paused(app: LedgerApp) -> bool:
    return bool((await app.stats())["A"]["paused"])


async def _wait_for(app: LedgerApp, paused: bool, within: float) -> float:
    """Seconds until shard A's paused state is ``paused``; fails after ``within``."""
    start = time.monotonic()
    with anyio.fail_after(within):
        while await _paused(app) is not paused:  # noqa: ASYNC110 - another process's state
            await anyio.sleep(0.01)
    return time.monotonic() - start


@pytest.mark.slow
async def test_a_pause_stops_transfers_at_a_safe_point_and_resume_restarts_them(
    tmp_path: Path,
) -> None:
    async with running_ledger(tmp_path / "app") as app:
        await anyio.sleep(0.3)
        assert (await app.stats())["A"]["transfers"] > 0
        async with await anyio.connect_unix(app.a.socket) as stream:
            lines = _Lines(stream)
            await lines.write("PAUSE")
            assert await lines.read() == "PAUSED"
            before = await app.stats()
            await anyio.sleep(0.3)
            during = await app.stats()
            assert during["A"]["transfers"] == before["A"]["transfers"]
            assert during["A"]["missed_while_paused"] > before["A"]["missed_while_paused"]
            # paused at a safe point: copies of the two stores now form a consistent pair
            copies = [tmp_path / "a.copy", tmp_path / "b.copy"]
            for src, dst in zip((app.a.db, app.b.db), copies, strict=True):
                _copy_store(src, dst)
            await lines.write("RESUME")
            assert await lines.read() == "RESUMED"
        assert check_pair(*copies).holds
        await anyio.sleep(0.3)
        after = await app.stats()
        assert after["A"]["transfers"] > during["A"]["transfers"]
        assert after["A"]["pauses"] == 1 and after["A"]["longest_pause_s"] >= 0.3


@pytest.mark.slow
async def test_a_pause_whose_connection_ends_resumes_at_once(tmp_path: Path) -> None:
    async with running_ledger(tmp_path / "app") as app:
        stream = await anyio.connect_unix(app.a.socket)
        lines = _Lines(stream)
        await lines.write("PAUSE")
        assert await lines.read() == "PAUSED"
        assert await _paused(app)
        await stream.aclose()  # the holder goes away without a word
        assert await _wait_for(app, paused=False, within=1.0) < 1.0


def test_the_invariant_names_how_far_a_half_done_pair_is_off(tmp_path: Path) -> None:
    from karbor_ledger._store import connect, create

    a, b = tmp_path / "a.db", tmp_path / "b.db"
    create(a)
    create(b)
    assert check_pair(a, b).holds
    db = connect(a)
    db.execute("UPDATE accounts SET balance = balance - 42 WHERE id = 3")
    db.execute("INSERT INTO transfers (id, account, amount) VALUES (1, 3, -42)")
    db.close()
    result = check_pair(a, b)
    assert not result.holds and result.off_by == -42 and result.half_done == 1
    assert "off by -42" in result.describe()
    done = subprocess.run(
        [sys.executable, "-m", "karbor_ledger", "check", str(a), str(b)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1 and "INCONSISTENT" in done.stdout and "off by -42" in done.stdout


_ENGINE_HOLDING_THE_PAUSE = textwrap.dedent(
    """
    import sys, anyio
    from karbor_async import Engine, MemoryStore, Plan, ResourceType, Timeouts
    from karbor_async.testing import RecordingPlugin
    from karbor_ledger import SQLITE, ShardProtection, ShardStoreProtectable, LedgerApp, ShardSpec
    from karbor_ledger._app import SHARD
    from karbor_async import ConsistencyGroup, Resource

    a = Resource(SHARD, "A", extra={"socket": sys.argv[1], "db": sys.argv[2]})
    b = Resource(SHARD, "B", extra={"socket": sys.argv[3], "db": sys.argv[4]})
    # the store's cut hangs: the engine sits inside the pause until it is killed
    stores = RecordingPlugin([ResourceType(SQLITE)], faults={(SQLITE, "on_prepare_finish"): "hang"})

    async def main() -> None:
        engine = Engine([ShardProtection(), stores], [ShardStoreProtectable()], discover=False,
                        store=MemoryStore())
        async with engine:
            plan = Plan(name="ledger", resources=[a, b], barrier="cut",
                        groups=[ConsistencyGroup("ledger", [a.key, b.key])])
            await engine.protect(plan)

    anyio.run(main)
    """
)


@pytest.mark.slow
async def test_killing_the_engine_inside_the_pause_resumes_the_shards_within_a_second(
    tmp_path: Path,
) -> None:
    async with running_ledger(tmp_path / "app") as app:
        engine = await anyio.open_process(
            [sys.executable, "-c", _ENGINE_HOLDING_THE_PAUSE, str(app.a.socket), str(app.a.db),
             str(app.b.socket), str(app.b.db)],
            stdout=None,
            stderr=None,
        )  # fmt: skip
        try:
            await _wait_for(app, paused=True, within=30)
            stats = await app.stats()
            assert stats["B"]["paused"]  # under `cut`, both pause before either store cuts
            os.kill(engine.pid, signal.SIGKILL)
            with anyio.fail_after(10):
                await engine.wait()
            resumed_in = await _wait_for(app, paused=False, within=1.0)
            assert not (await app.stats())["B"]["paused"]
        finally:
            if engine.returncode is None:
                engine.kill()
                await engine.wait()
        before = (await app.stats())["A"]["transfers"]
        await anyio.sleep(0.2)
        assert (await app.stats())["A"]["transfers"] > before
        print(f"shards resumed {resumed_in * 1000:.0f} ms after the engine was killed")


def test_the_types_are_named_as_the_sqlite_plugin_names_its_databases() -> None:
    assert SHARD == "Ledger::Shard" and SQLITE == "SQLite::Database"


def test_the_other_store_types_are_named_as_their_plugins_name_them() -> None:
    karbor_postgres = pytest.importorskip("karbor_postgres")
    karbor_fs = pytest.importorskip("karbor_fs")
    assert DATABASE == karbor_postgres.DATABASE
    assert (FILESYSTEM, IMAGE) == (karbor_fs.FILESYSTEM, karbor_fs.IMAGE)


async def test_each_kind_of_store_is_found_by_its_own_protectable(tmp_path: Path) -> None:
    pg = PostgresDatabase("ledger_a", "127.0.0.1", 5432, "postgres", "s3cret", secret="pw")
    on_fs = FileOnFileSystem(tmp_path / "mnt", "dir/b.db")
    sqlite = SqliteFile(tmp_path / "a.db")
    finders: list[Protectable] = [
        ShardStoreProtectable(),
        ShardDatabaseProtectable(),
        ShardFileSystemProtectable(),
    ]
    found = {}
    for store in (pg, on_fs, sqlite):
        shard = ShardSpec("A", store, tmp_path / "a.sock", 0.0).resource
        found[store.kind] = [r for f in finders for r in await f.dependents(shard)]
    assert [r.key for r in found["sqlite"]] == [(SQLITE, str(tmp_path / "a.db"))]
    assert [r.key for r in found["postgres"]] == [(DATABASE, "ledger_a")]
    assert [r.key for r in found["fs"]] == [(FILESYSTEM, str(tmp_path / "mnt"))]
    # a shard resource of before (no extra['store']) keeps its SQLite store
    old = Resource(SHARD, "B", extra={"socket": "/x.sock", "db": "/x.db"})
    assert [r.key for r in await ShardStoreProtectable().dependents(old)] == [(SQLITE, "/x.db")]
    with pytest.raises(PlanError, match="unknown store kind"):
        await ShardStoreProtectable().dependents(Resource(SHARD, "C", extra={"store": "nfs"}))
    # the password is the plan's secret reference, never its value
    app = LedgerApp(
        tmp_path,
        ShardSpec("A", pg, tmp_path / "a.sock", 0.0),
        ShardSpec("B", on_fs, tmp_path / "b.sock", 0.0),
    )
    plan = app.plan(barrier="cut")
    assert plan.parameters[f"{DATABASE}#ledger_a"]["password"] == "pw"
    assert "s3cret" not in repr(plan) and "s3cret" not in repr(pg)
    assert await app.resolve_secret("pw") == "s3cret"
    assert app.restore_parameters(tmp_path / "r") == {IMAGE: {"restore_dir": str(tmp_path / "r")}}
    assert app.b.db == tmp_path / "mnt" / "dir" / "b.db"
    assert ShardSpec("A", tmp_path / "a.db", tmp_path / "a.sock", 0.0).store == sqlite
    with pytest.raises(AttributeError, match="postgres database"):
        _ = app.a.db


@pytest.mark.service
def test_a_store_is_read_out_of_an_ext4_image_with_the_commits_still_in_its_log(
    tmp_path: Path,
) -> None:
    """The file and its write-ahead log come out of the image (debugfs, no mount, no
    root): the commits not yet checkpointed into the file count."""
    from karbor_ledger._store import connect, create
    from karbor_ledger._stores import read_file_in_image

    need_tools("reading a file out of an image (e2fsprogs)", ("mkfs.ext4", "debugfs"))
    content = tmp_path / "content"
    (content / "dir").mkdir(parents=True)
    a, b = content / "dir" / "a.db", tmp_path / "b.db"
    create(a)
    create(b)
    db = connect(a)
    try:
        db.execute("PRAGMA wal_autocheckpoint=0")  # the debit stays in a.db-wal
        db.execute("UPDATE accounts SET balance = balance - 42 WHERE id = 3")
        db.execute("INSERT INTO transfers (id, account, amount) VALUES (1, 3, -42)")
        assert (content / "dir" / "a.db-wal").stat().st_size > 0
        image = tmp_path / "fs.img"
        with image.open("wb") as f:
            f.truncate(8 << 20)
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-d", str(content), str(image)],
            check=True,
            capture_output=True,
        )
    finally:
        db.close()
    tally = read_file_in_image(image, "dir/a.db")
    assert tally.ids == {1} and tally.total == ACCOUNTS * OPENING_BALANCE - 42
    with pytest.raises(FileNotFoundError, match=r"no store /dir/nothing\.db"):
        read_file_in_image(image, "dir/nothing.db")
    done = subprocess.run(
        [sys.executable, "-m", "karbor_ledger", "check", f"{image}:/dir/a.db", str(b)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 1 and "off by -42" in done.stdout, done.stderr


def _copy_store(src: Path, dst: Path) -> None:
    """A consistent copy of a live WAL store (SQLite's backup API)."""
    import sqlite3

    source = sqlite3.connect(src)
    target = sqlite3.connect(dst)
    try:
        source.backup(target)
    finally:
        source.close()
        target.close()


@pytest.mark.slow
async def test_a_transfer_cut_short_by_a_stop_is_finished_when_the_shards_start(
    tmp_path: Path,
) -> None:
    """A shard killed between a debit and its credit leaves the live pair off; starting
    again asks B once more for that credit (applied once however often it is asked)."""
    from karbor_ledger._store import connect, create

    root = tmp_path / "app"
    root.mkdir()
    create(root / "a.db")
    create(root / "b.db")
    db = connect(root / "a.db")
    db.execute("UPDATE accounts SET balance = balance - 42 WHERE id = 3")
    db.execute("INSERT INTO transfers (id, account, amount) VALUES (1, 3, -42)")
    db.close()
    assert check_pair(root / "a.db", root / "b.db").off_by == -42
    for _ in range(2):  # the second start asks again for a credit B already has
        async with (
            running_ledger(root, rate=1.0) as app,
            await anyio.connect_unix(app.a.socket) as stream,
        ):
            lines = _Lines(stream)
            await lines.write("PAUSE")
            assert await lines.read() == "PAUSED"
            assert (await app.check()).holds


@pytest.mark.slow
async def test_a_deep_or_relative_root_still_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Unix socket's path is limited to 107 bytes: under a deep root the sockets go to
    a short directory of their own (removed afterwards). A relative root is the
    caller's, although the shards run in /."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    async with running_ledger(deep) as app:
        assert app.a.socket.parent != deep and len(os.fsencode(app.a.socket)) <= 100
        assert (deep / "a.db").is_file() and (await app.stats())["B"]["role"] == "b"
        sockets = app.a.socket.parent
    assert not sockets.exists()
    monkeypatch.chdir(tmp_path)
    async with running_ledger(Path("rel")) as app:
        assert app.root == tmp_path / "rel" and (tmp_path / "rel" / "a.db").is_file()


_HOLDER = textwrap.dedent(
    """
    import sys, anyio
    from pathlib import Path
    from karbor_ledger import running_ledger

    async def main() -> None:
        async with running_ledger(Path(sys.argv[1])) as app:
            print(" ".join(str(p.pid) for p in app.processes), flush=True)
            await anyio.sleep_forever()

    anyio.run(main)
    """
)


@pytest.mark.slow
async def test_shards_end_when_the_process_that_started_them_is_killed(tmp_path: Path) -> None:
    """No orphan shard keeps writing after kill -9 of whoever ran the application (a later
    start would otherwise have two shards A writing one store)."""
    holder = await anyio.open_process(
        [sys.executable, "-c", _HOLDER, str(tmp_path / "app")], stderr=None
    )
    assert holder.stdout is not None
    with anyio.fail_after(30):
        line = b""
        while not line.endswith(b"\n"):
            line += await holder.stdout.receive()
    pids = [int(p) for p in line.split()]
    assert len(pids) == 2
    os.kill(holder.pid, signal.SIGKILL)
    await holder.wait()
    await holder.stdout.aclose()
    start = time.monotonic()
    with anyio.fail_after(5):
        while any(_alive(p) for p in pids):  # noqa: ASYNC110 - other processes' lives
            await anyio.sleep(0.02)
    print(f"shards ended {1000 * (time.monotonic() - start):.0f} ms after their parent")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
