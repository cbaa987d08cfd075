"""SQLite-only behaviour: file format and refusal, migrations, leases and fencing,
durability across SIGKILL, hook records, group commit, and scale (asyncio only).

``measure_transitions_per_second`` and ``measure_commit_latency`` at the end are
the store's benchmark probes; ``python tests/test_sqlite_store.py`` prints them.
"""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from helpers import TYPES, res, sk
from karbor_async import (
    Engine,
    HookContext,
    Plan,
    ProtectionPlugin,
    Resource,
    ResourceType,
    RunError,
    Timeouts,
)
from karbor_async import _sqlite_schema as schema
from karbor_async._sqlite import HookStatus, SqliteStore
from karbor_async._sqlite_schema import APPLICATION_ID
from karbor_async._types import (
    BarrierPolicy,
    Hook,
    OperationKind,
    ResourceKey,
    RunStatus,
)
from karbor_async.events import Event, EventKind, Progress
from karbor_async.exceptions import (
    CorruptStoreError,
    ForeignFileError,
    IllegalTransitionError,
    LeaseHeldError,
    LeaseLostError,
    NewerSchemaError,
    StoreError,
    StoreFileError,
)
from karbor_async.store import (
    CheckpointRecord,
    CheckpointStatus,
    GroupOutcome,
    RunOutcome,
    RunRecord,
)
from karbor_async.testing import Fault, MapProtectable, RecordingPlugin, protectables_for

VOLUME: ResourceKey = ("OS::Cinder::Volume", "v1")
SERVER: ResourceKey = ("OS::Nova::Server", "s1")


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {})


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "karbor.db"


@pytest.fixture
async def store(db: Path) -> AsyncIterator[SqliteStore]:
    async with SqliteStore.open(db) as s:
        yield s


def run_record(
    run_id: str, *, operation: OperationKind = OperationKind.PROTECT, plan_name: str = "p"
) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        operation=operation,
        checkpoint_id=run_id,
        plan={"name": plan_name},
        graph={"nodes": []},
        status=RunStatus.RUNNING,
        started_wall=time.time(),
    )


def outcome(run_id: str, status: RunStatus = RunStatus.SUCCEEDED) -> RunOutcome:
    now = time.time()
    return RunOutcome(
        run_id=run_id,
        checkpoint_id=run_id,
        operation=OperationKind.PROTECT,
        status=status,
        started_wall=now - 1,
        ended_wall=now,
        duration=1.0,
        resources={},
        groups={"default": GroupOutcome("default", BarrierPolicy.MAIN, 0, 0, None)},
    )


def event(
    run_id: str,
    seq: int,
    kind: EventKind = EventKind.STARTED,
    *,
    resource: ResourceKey | None = VOLUME,
    hook: Hook | None = Hook.MAIN,
    attempt: int = 1,
    data: dict[str, Any] | None = None,
) -> Event:
    return Event(
        run_id=run_id,
        seq=seq,
        kind=kind,
        operation=OperationKind.PROTECT,
        wall=1000.0 + seq,
        mono=float(seq),
        resource=resource,
        hook=hook,
        group="g",
        attempt=attempt,
        data=data or {},
    )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def wal_size(db: Path) -> int:
    wal = Path(f"{db}-wal")
    return wal.stat().st_size if wal.exists() else 0


def _exists(path: Path) -> bool:
    return path.exists()


_SRC = str(Path(__file__).resolve().parents[1] / "src")

_FOREIGN: dict[str, Callable[[Path], object]] = {
    "empty": lambda p: p.write_bytes(b""),
    "text": lambda p: p.write_text("name,size\nvol,10\n" * 100),
    "random-bytes": lambda p: p.write_bytes(os.urandom(8192)),
    "short": lambda p: p.write_bytes(b"SQLite"),
    "foreign-sqlite": lambda p: _foreign_sqlite(p),
}


async def wait_until(probe: Callable[[], Awaitable[object]], expected: object) -> None:
    """Poll ``probe`` until it returns ``expected`` (another process or task gets there)."""
    with anyio.fail_after(10):
        while True:
            if await probe() == expected:
                return
            await anyio.sleep(0.02)


# -- file format -------------------------------------------------------------------------


async def test_new_file_is_a_marked_wal_database(db: Path) -> None:
    """A new store is one SQLite file in WAL mode, marked with our application id and version."""
    async with SqliteStore.open(db) as store:
        await store.create_run(run_record("cp-1"))
        raw = sqlite3.connect(db)
        try:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert raw.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
            meta = dict(raw.execute("SELECT key, value FROM meta").fetchall())
        finally:
            raw.close()
        assert meta["magic"] == schema.MAGIC
        assert meta["schema_version"] == str(schema.schema_version())
        row = await store._writer.execute_fetchall("PRAGMA synchronous")
        assert [r[0] for r in row] == [1]  # NORMAL


async def test_data_survives_reopening(db: Path) -> None:
    async with SqliteStore.open(db) as store:
        await store.create_run(run_record("cp-1", plan_name="web"))
        store.append(event("cp-1", 1))
        store.save_info("cp-1", VOLUME, {"snap": "s1"})
        await store.finish_run(outcome("cp-1"))
    async with SqliteStore.open(db) as store:
        cp = await store.get_checkpoint("cp-1")
        assert (cp.plan_name, cp.status) == ("web", CheckpointStatus.AVAILABLE)
        assert [e.seq for e in await store.read_events("cp-1")] == [1]
        assert await store.load_saved_info("cp-1") == {VOLUME: {"snap": "s1"}}


async def _make_store_file(db: Path) -> None:
    async with SqliteStore.open(db) as store:
        for i in range(200):
            await store.create_run(run_record(f"cp-{i}"))
            store.append(event(f"cp-{i}", 1, data={"pad": "x" * 200}))
        await store.commit()


def _foreign_sqlite(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO customers (name) VALUES ('ada')")
    conn.commit()
    conn.close()


def _set_meta(path: Path, version: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (version,))
    conn.commit()
    conn.close()


def _scribble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    page = 4096
    assert len(data) > 6 * page
    for p in range(2, len(data) // page - 1, 2):
        data[p * page + 8 : p * page + 600] = b"\xa5" * 592
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("text", ForeignFileError),
        ("random-bytes", ForeignFileError),
        ("short", ForeignFileError),
        ("foreign-sqlite", ForeignFileError),
        ("newer-schema", NewerSchemaError),
        ("damaged-meta", CorruptStoreError),
        ("scribbled", CorruptStoreError),
        ("truncated", CorruptStoreError),
    ],
)
async def test_refused_files_are_left_untouched(
    db: Path, case: str, error: type[StoreFileError]
) -> None:
    """A file that is not ours, newer, or corrupt is refused with a clear error naming the
    path and what to do, and stays byte-for-byte the same (no WAL is created beside it)."""
    if case in _FOREIGN:
        _FOREIGN[case](db)
    else:
        await _make_store_file(db)
        if case == "newer-schema":
            _set_meta(db, str(schema.schema_version() + 1))
        elif case == "damaged-meta":
            _set_meta(db, "garbage")
        elif case == "scribbled":
            _scribble(db)
        else:
            _truncate(db)
    assert wal_size(db) == 0
    before = digest(db)
    with pytest.raises(error) as info:
        async with SqliteStore.open(db):
            pytest.fail("a refused file was opened")
    message = str(info.value)
    assert str(db) in message
    assert "untouched" in message
    assert digest(db) == before
    assert wal_size(db) == 0


async def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreFileError, match="not a regular file"):
        async with SqliteStore.open(tmp_path):
            pass


async def test_an_empty_file_becomes_a_store(db: Path) -> None:
    _FOREIGN["empty"](db)
    async with SqliteStore.open(db) as store:
        await store.create_run(run_record("cp-1"))
    async with SqliteStore.open(db) as store:
        assert (await store.get_run("cp-1")).run_id == "cp-1"


async def test_forward_migration_then_old_code_refuses(
    db: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new migration step upgrades an old file in place, keeping its rows; the old code then
    refuses the upgraded file as newer and leaves it untouched."""
    async with SqliteStore.open(db) as store:
        await store.create_run(run_record("cp-1"))
    old = list(schema.MIGRATIONS)
    step = ("ALTER TABLE checkpoints ADD COLUMN label TEXT", "UPDATE checkpoints SET label = 'x'")
    monkeypatch.setattr(schema, "MIGRATIONS", [*old, step])
    async with SqliteStore.open(db) as store:
        assert (await store.get_checkpoint("cp-1")).id == "cp-1"
        rows = await store._reader.execute_fetchall("SELECT label FROM checkpoints")
        assert [r[0] for r in rows] == ["x"]
    raw = sqlite3.connect(db)
    assert raw.execute("PRAGMA user_version").fetchone()[0] == len(old) + 1
    raw.close()
    monkeypatch.setattr(schema, "MIGRATIONS", old)
    before = digest(db)
    with pytest.raises(NewerSchemaError, match="upgrade karbor-async"):
        async with SqliteStore.open(db):
            pass
    assert digest(db) == before


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_asyncio_only(db: Path) -> None:
    """aiosqlite needs asyncio: opening under trio says so and creates nothing."""
    with pytest.raises(StoreError, match="asyncio only"):
        async with SqliteStore.open(db):
            pass
    assert not _exists(db)


async def test_errors_of_the_block_come_out_unwrapped(db: Path) -> None:
    """What the caller's block raises leaves the store as it is, not in an exception group,
    and what was written before is flushed."""

    async def block_that_fails() -> None:
        async with SqliteStore.open(db) as store:
            await store.create_run(run_record("cp-1"))
            store.append(event("cp-1", 1))
            raise KeyError("boom")

    with pytest.raises(KeyError, match="boom"):
        await block_that_fails()
    async with SqliteStore.open(db) as store:
        assert await store.last_seq("cp-1") == 1
        assert [r.run_id for r in await store.unfinished_runs()] == ["cp-1"]


async def test_closed_store_refuses_writes(db: Path) -> None:
    async with SqliteStore.open(db) as store:
        pass
    with pytest.raises(StoreError, match="closed"):
        store.append(event("cp-1", 1))
    with pytest.raises(StoreError, match="closed"):
        await store.commit()


# -- writer, events, hook records ---------------------------------------------------------


async def test_concurrent_commits_share_a_transaction(store: SqliteStore) -> None:
    """Twenty tasks committing at once after 1000 appends cost at most two transactions."""
    await store.create_run(run_record("cp-1"))
    for seq in range(1, 1001):
        store.append(event("cp-1", seq))
    before = store.statistics().transactions
    async with anyio.create_task_group() as tg:
        for _ in range(20):
            tg.start_soon(store.commit)
    stats = store.statistics()
    assert stats.transactions - before <= 2
    assert stats.pending_writes == 0
    assert await store.last_seq("cp-1") == 1000


async def test_writes_are_behind_without_commit(store: SqliteStore) -> None:
    """Appended records reach the file without anyone awaiting commit (write-behind)."""
    await store.create_run(run_record("cp-1"))
    store.append(event("cp-1", 1))
    await wait_until(lambda: store.last_seq("cp-1"), 1)


async def test_hook_records_follow_the_lifecycle_events(store: SqliteStore) -> None:
    """Per resource, hook and attempt: started, finished or failed, with times and error."""
    await store.create_run(run_record("cp-1"))
    seq = iter(range(1, 100))
    for e in [
        event("cp-1", next(seq), EventKind.RUN_STARTED, resource=None, hook=None),
        event("cp-1", next(seq), EventKind.STARTED, resource=SERVER, hook=Hook.PREPARE_BEGIN),
        event("cp-1", next(seq), EventKind.QUIESCED, resource=SERVER, hook=Hook.PREPARE_BEGIN),
        event("cp-1", next(seq), EventKind.FINISHED, resource=SERVER, hook=Hook.PREPARE_BEGIN),
        event("cp-1", next(seq), EventKind.STARTED, hook=Hook.MAIN),
        event("cp-1", next(seq), EventKind.FAILED, hook=Hook.MAIN, data={"error": "IOError"}),
        event("cp-1", next(seq), EventKind.STARTED, hook=Hook.MAIN, attempt=2),
        event("cp-1", next(seq), EventKind.SKIPPED, resource=SERVER, hook=Hook.COMPLETE),
    ]:
        store.append(e)
    await store.commit()
    records = await store.load_hook_records("cp-1")
    summary = [(r.resource, r.hook, r.attempt, r.status, r.error) for r in records]
    assert summary == [
        (SERVER, Hook.PREPARE_BEGIN, 1, HookStatus.FINISHED, None),
        (VOLUME, Hook.MAIN, 1, HookStatus.FAILED, "IOError"),
        (VOLUME, Hook.MAIN, 2, HookStatus.STARTED, None),
        (SERVER, Hook.COMPLETE, 1, HookStatus.SKIPPED, None),
    ]
    begin = records[0]
    assert (begin.started_wall, begin.ended_wall) == (1002.0, 1004.0)
    assert (begin.first_seq, begin.last_seq, begin.group) == (2, 4, "g")
    assert records[2].ended_wall is None
    assert records[3].started_wall is None
    assert await store.last_seq("cp-1") == 8
    assert await store.last_seq("other") == 0


async def test_read_events_pages_with_limit(store: SqliteStore) -> None:
    await store.create_run(run_record("cp-1"))
    for seq in range(1, 11):
        store.append(event("cp-1", seq))
    await store.commit()
    assert [e.seq for e in await store.read_events("cp-1", since=3, limit=4)] == [4, 5, 6, 7]


async def test_progress_ticks_are_coalesced(store: SqliteStore) -> None:
    """Progress ticks are not in the lifecycle log; the latest per resource is kept."""
    await store.create_run(run_record("cp-1"))
    store.append(event("cp-1", 1))
    for tick in range(1, 6):
        store.append(
            Event(
                run_id="cp-1",
                seq=1,
                kind=EventKind.PROGRESS,
                operation=OperationKind.PROTECT,
                wall=2000.0 + tick,
                mono=float(tick),
                resource=VOLUME,
                hook=Hook.MAIN,
                progress=Progress(fraction=tick / 5, done=tick, total=5),
                tick=tick,
            )
        )
    await store.commit()
    assert [e.kind for e in await store.read_events("cp-1")] == [EventKind.STARTED]
    (latest,) = await store.load_progress("cp-1")
    assert latest.tick == 5
    assert latest.progress == Progress(fraction=1.0, done=5, total=5)


async def test_a_bad_record_is_reported_and_the_rest_written(store: SqliteStore) -> None:
    """A duplicate seq fails its own write: commit raises naming it, the batch's other
    records are written, and the store keeps working."""
    await store.create_run(run_record("cp-1"))
    store.append(event("cp-1", 1))
    await store.commit()
    store.append(event("cp-1", 2))
    store.append(event("cp-1", 1, EventKind.FINISHED))
    store.save_info("cp-1", VOLUME, {"ok": True})
    with pytest.raises(StoreError, match="cp-1#1"):
        await store.commit()
    assert [e.seq for e in await store.read_events("cp-1")] == [1, 2]
    assert await store.load_saved_info("cp-1") == {VOLUME: {"ok": True}}
    store.append(event("cp-1", 3))
    await store.commit()
    assert await store.last_seq("cp-1") == 3


async def test_saved_info_must_be_json(store: SqliteStore) -> None:
    with pytest.raises(TypeError, match="not JSON serialisable"):
        store.save_info("cp-1", VOLUME, {"when": object()})


# -- leases and fencing -------------------------------------------------------------------


async def test_two_stores_never_both_own_a_run(db: Path) -> None:
    """The creator holds the run's lease; a second engine on the same file cannot take it
    and does not see it as unfinished while the lease is live (renewed in the background)."""
    async with (
        SqliteStore.open(db, owner="engine-a", lease_seconds=0.3) as a,
        SqliteStore.open(db, owner="engine-b", lease_seconds=0.3) as b,
    ):
        await a.create_run(run_record("cp-1"))
        assert a.fencing_token("cp-1") == 1
        await anyio.sleep(0.8)  # well past one lease: A's renewer keeps it
        assert await b.unfinished_runs() == []
        with pytest.raises(LeaseHeldError, match="engine-a"):
            await b.acquire_lease("cp-1")
        assert b.fencing_token("cp-1") is None


async def test_takeover_fences_the_presumed_dead_owner(db: Path) -> None:
    """A stops renewing; once its lease expires B takes the run over with a new token, and
    every later write of A to that run is refused with LeaseLostError and changes nothing."""
    async with (
        SqliteStore.open(db, owner="engine-a", lease_seconds=0.2, auto_renew=False) as a,
        SqliteStore.open(db, owner="engine-b", lease_seconds=5.0) as b,
    ):
        await a.create_run(run_record("cp-1"))
        await a.create_run(run_record("cp-2"))
        a.append(event("cp-1", 1))
        await a.commit()
        await anyio.sleep(0.3)
        assert sorted(r.run_id for r in await b.unfinished_runs()) == ["cp-1", "cp-2"]
        assert await b.acquire_lease("cp-1") == 2

        a.append(event("cp-1", 2, data={"from": "a"}))
        a.save_info("cp-1", VOLUME, {"from": "a"})
        a.append(event("cp-2", 1))  # another run of A's, not taken over
        with pytest.raises(LeaseLostError, match="cp-1"):
            await a.commit()
        assert await a.last_seq("cp-2") == 1
        with pytest.raises(LeaseLostError):
            a.append(event("cp-1", 3))
        with pytest.raises(LeaseLostError):
            a.save_info("cp-1", VOLUME, {"from": "a"})
        with pytest.raises(LeaseLostError):
            await a.finish_run(outcome("cp-1"))
        with pytest.raises(LeaseLostError):
            await a.renew_lease("cp-1")
        await a.commit(run_id="cp-2")  # A's other run is unaffected

        b.append(event("cp-1", 2, data={"from": "b"}))
        await b.finish_run(outcome("cp-1"))
        assert [e.data.get("from") for e in await b.read_events("cp-1")] == [None, "b"]
        assert await b.load_saved_info("cp-1") == {}
        assert (await b.get_checkpoint("cp-1")).status is CheckpointStatus.AVAILABLE


async def test_finish_run_of_a_taken_over_run_is_refused(db: Path) -> None:
    async with (
        SqliteStore.open(db, owner="a", lease_seconds=0.1, auto_renew=False) as a,
        SqliteStore.open(db, owner="b") as b,
    ):
        await a.create_run(run_record("cp-1"))
        await anyio.sleep(0.2)
        await b.acquire_lease("cp-1")
        with pytest.raises(LeaseLostError):
            await a.finish_run(outcome("cp-1", RunStatus.FAILED))
        assert (await b.get_run("cp-1")).status is RunStatus.RUNNING


async def test_racing_takeovers_have_one_winner(db: Path) -> None:
    """Two engines recovering the same expired run at once: exactly one gets it."""
    async with SqliteStore.open(db, owner="dead", lease_seconds=0.1, auto_renew=False) as dead:
        await dead.create_run(run_record("cp-1"))
        dead._held.clear()  # it "crashes": the close must not release the lease
    await anyio.sleep(0.2)
    results: dict[str, object] = {}
    async with (
        SqliteStore.open(db, owner="b") as b,
        SqliteStore.open(db, owner="c") as c,
    ):

        async def take(name: str, s: SqliteStore) -> None:
            try:
                results[name] = await s.acquire_lease("cp-1")
            except LeaseHeldError as exc:
                results[name] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(take, "b", b)
            tg.start_soon(take, "c", c)
        tokens = [v for v in results.values() if isinstance(v, int)]
        assert tokens == [2]
        assert sum(isinstance(v, LeaseHeldError) for v in results.values()) == 1


async def test_release_and_clean_close_make_runs_recoverable_at_once(db: Path) -> None:
    async with SqliteStore.open(db, owner="b") as b:
        async with SqliteStore.open(db, owner="a") as a:
            await a.create_run(run_record("cp-1"))
            await a.create_run(run_record("cp-2"))
            assert await b.unfinished_runs() == []
            await a.release_lease("cp-1")
            assert [r.run_id for r in await b.unfinished_runs()] == ["cp-1"]
        assert sorted(r.run_id for r in await b.unfinished_runs()) == ["cp-1", "cp-2"]
        assert await b.acquire_lease("cp-2") == 2


async def test_finished_runs_are_not_unfinished_nor_leasable(store: SqliteStore) -> None:
    await store.create_run(run_record("cp-1"))
    await store.finish_run(outcome("cp-1"))
    assert store.fencing_token("cp-1") is None
    assert await store.unfinished_runs() == []
    with pytest.raises(IllegalTransitionError, match="has ended"):
        await store.acquire_lease("cp-1")


# -- durability across SIGKILL ------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import sys, time, anyio
    from karbor_async._sqlite import SqliteStore
    from karbor_async._types import Hook, OperationKind, RunStatus
    from karbor_async.events import Event, EventKind
    from karbor_async.exceptions import LeaseLostError
    from karbor_async.store import RunRecord

    def ev(seq):
        return Event(run_id="cp-1", seq=seq, kind=EventKind.STARTED,
                     operation=OperationKind.PROTECT, wall=time.time(), mono=0.0,
                     resource=("OS::Cinder::Volume", str(seq)), hook=Hook.MAIN)

    async def main(path, mode):
        async with SqliteStore.open(path, owner="child", lease_seconds=0.5) as s:
            await s.create_run(RunRecord(run_id="cp-1", operation=OperationKind.PROTECT,
                checkpoint_id="cp-1", plan={"name": "p"}, graph={}, status=RunStatus.RUNNING,
                started_wall=time.time()))
            for seq in range(1, 1001):
                s.append(ev(seq))
            s.save_info("cp-1", ("OS::Cinder::Volume", "1"), {"snapshot": "snap-1"})
            s.record_restored("cp-1", ("OS::Cinder::Volume", "1"), "new-1")
            await s.commit()
            print("COMMITTED", flush=True)
            if mode == "kill":
                seq = 1001
                while True:  # keep writing behind until killed
                    s.append(ev(seq))
                    seq += 1
                    await anyio.sleep(0.001)
            await anyio.to_thread.run_sync(sys.stdin.readline)
            try:
                s.append(ev(1001))
                await s.commit()
                print("WROTE", flush=True)
            except LeaseLostError:
                print("LOST", flush=True)

    anyio.run(main, sys.argv[1], sys.argv[2])
    """
)


async def _start_child(db: Path, mode: str) -> tuple[Process, BufferedByteReceiveStream]:
    env = dict(os.environ)
    src = _SRC
    env["PYTHONPATH"] = os.pathsep.join([src, env.get("PYTHONPATH", "")])
    proc = await anyio.open_process(
        [sys.executable, "-c", _CHILD, str(db), mode], env=env, stderr=None
    )
    assert proc.stdout is not None
    return proc, BufferedByteReceiveStream(proc.stdout)


async def _read_line(stream: BufferedByteReceiveStream) -> str:
    """The child's next marker line (structlog's default output also goes to stdout)."""
    with anyio.fail_after(30):
        while True:
            line = (await stream.receive_until(b"\n", 1 << 16)).decode()
            if line in ("COMMITTED", "WROTE", "LOST"):
                return line


@pytest.mark.slow
async def test_committed_rows_survive_sigkill(db: Path) -> None:
    """A child commits, keeps writing behind, and is killed with SIGKILL: a new store on the
    file has every committed row, the log has no gap, and the run is recoverable once the
    dead child's lease expires."""
    proc, out = await _start_child(db, "kill")
    try:
        assert await _read_line(out) == "COMMITTED"
        await anyio.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await proc.aclose()
    assert proc.returncode == -signal.SIGKILL
    async with SqliteStore.open(db, owner="survivor") as store:
        seqs = [e.seq for e in await store.read_events("cp-1")]
        assert seqs[:1000] == list(range(1, 1001))
        assert seqs == list(range(1, len(seqs) + 1))  # write-behind left a prefix, no gap
        assert await store.last_seq("cp-1") == len(seqs)
        assert await store.load_saved_info("cp-1") == {
            ("OS::Cinder::Volume", "1"): {"snapshot": "snap-1"}
        }
        assert await store.load_restored("cp-1") == {("OS::Cinder::Volume", "1"): "new-1"}
        assert (await store.get_run("cp-1")).status is RunStatus.RUNNING
        await wait_until(lambda: store.unfinished_runs(), [await store.get_run("cp-1")])
        assert await store.acquire_lease("cp-1") == 2


@pytest.mark.slow
async def test_a_frozen_owner_that_wakes_up_cannot_write(db: Path) -> None:
    """The owner process is stopped (SIGSTOP) past its lease, another engine takes the run
    over, and when the owner resumes its next write fails with LeaseLostError."""
    proc, out = await _start_child(db, "stop")
    try:
        assert await _read_line(out) == "COMMITTED"
        proc.send_signal(signal.SIGSTOP)
        async with SqliteStore.open(db, owner="successor") as store:
            await anyio.sleep(0.7)
            assert [r.run_id for r in await store.unfinished_runs()] == ["cp-1"]
            assert await store.acquire_lease("cp-1") == 2
            proc.send_signal(signal.SIGCONT)
            assert proc.stdin is not None
            await proc.stdin.send(b"go\n")
            assert await _read_line(out) == "LOST"
            with anyio.fail_after(30):
                await proc.wait()
            assert await store.last_seq("cp-1") == 1000
            assert store.fencing_token("cp-1") == 2
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            await proc.wait()
        await proc.aclose()


# -- scale ---------------------------------------------------------------------------------


def _checkpoints(n: int) -> Iterator[CheckpointRecord]:
    statuses = [CheckpointStatus.AVAILABLE] * 6 + [CheckpointStatus.ERROR, CheckpointStatus.DELETED]
    for i in range(n):
        yield CheckpointRecord(
            id=f"cp-{i:07d}",
            plan_name=f"plan-{i % 20}",
            status=statuses[i % len(statuses)],
            created_wall=1_600_000_000.0 + i * 30.0,
            plan={"name": f"plan-{i % 20}"},
            graph={"nodes": [["OS::Nova::Server", f"s{i}"]]},
        )


_PLAN_QUERY = (
    "SELECT c.id FROM checkpoints c JOIN runs r ON r.run_id = c.id {where}"
    " ORDER BY c.created_wall DESC, c.id DESC LIMIT 100"
)


@pytest.mark.slow
async def test_listing_stays_fast_at_100k_checkpoints(db: Path) -> None:
    """100,000 checkpoints: every listing filter pages by index seek (no sort, no scan),
    and paging deep with before_id returns the right rows. Times are printed, not asserted."""
    n = 100_000
    async with SqliteStore.open(db) as store:
        t0 = time.perf_counter()
        assert await store.import_checkpoints(_checkpoints(n)) == n
        print(f"\nimport {n} checkpoints: {time.perf_counter() - t0:.2f}s")
        cases: list[tuple[str, dict[str, Any]]] = [
            ("all", {}),
            ("plan", {"plan_name": "plan-7"}),
            ("status", {"status": CheckpointStatus.ERROR}),
            ("plan+status", {"plan_name": "plan-7", "status": CheckpointStatus.AVAILABLE}),
            (
                "dates",
                {
                    "since": 1_600_000_000.0 + 30.0 * 40_000,
                    "until": 1_600_000_000.0 + 30.0 * 60_000,
                },
            ),
        ]
        for name, filters in cases:
            before: str | None = None
            times = []
            seen: list[str] = []
            for _ in range(20):
                t = time.perf_counter()
                page = await store.list_checkpoints(limit=100, before_id=before, **filters)
                times.append(time.perf_counter() - t)
                seen += [c.id for c in page]
                before = page[-1].id
            assert seen == sorted(seen, reverse=True)
            assert len(seen) == len(set(seen)) == 2000
            print(
                f"list {name:12s}: first page {times[0] * 1e3:.2f} ms,"
                f" median page {statistics.median(times) * 1e3:.2f} ms"
            )
        # A page far down, reached in one call through its anchor.
        t = time.perf_counter()
        deep = await store.list_checkpoints(limit=100, before_id="cp-0000500")
        print(f"list deep page: {(time.perf_counter() - t) * 1e3:.2f} ms")
        assert [c.id for c in deep] == [f"cp-{i:07d}" for i in range(499, 399, -1)]
        for where in (
            "",
            "WHERE c.plan_name = 'p'",
            "WHERE c.status = 'error'",
            "WHERE c.plan_name = 'p' AND c.status = 'error'",
            "WHERE (c.created_wall, c.id) < (1.0, 'x') AND c.plan_name = 'p'",
        ):
            plan = await store._reader.execute_fetchall(
                "EXPLAIN QUERY PLAN " + _PLAN_QUERY.format(where=where)
            )
            text = " | ".join(str(r[3]) for r in plan)
            assert "TEMP B-TREE" not in text, text
            assert "USING" in text, text


# -- benchmark probes ----------------------------------------------------------------------


def _hook_events(n: int) -> list[Event]:
    """``n`` lifecycle events: STARTED/FINISHED pairs over n/8 resources and four hooks."""
    hooks = list(Hook)
    now = time.time()
    out = []
    for i in range(n):
        call = i // 2
        out.append(
            Event(
                run_id="bench",
                seq=i + 1,
                kind=EventKind.STARTED if i % 2 == 0 else EventKind.FINISHED,
                operation=OperationKind.PROTECT,
                wall=now + i * 1e-6,
                mono=i * 1e-6,
                resource=("OS::Cinder::Volume", f"vol-{call // 4}"),
                hook=hooks[call % 4],
                group="default",
            )
        )
    return out


async def _transitions(path: Path, n: int) -> float:
    events = _hook_events(n)
    async with SqliteStore.open(path) as store:
        await store.create_run(run_record("bench"))
        t0 = time.perf_counter()
        for i, e in enumerate(events):
            store.append(e)
            if i % 64 == 63:
                await anyio.lowlevel.checkpoint()  # hooks yield to the loop between events
        await store.commit()
        elapsed = time.perf_counter() - t0
        assert await store.last_seq("bench") == n
    return n / elapsed


def measure_transitions_per_second(path: str | os.PathLike[str], n: int) -> float:
    """Hook transitions (lifecycle events) recorded and committed per second by SqliteStore.

    Appends ``n`` prebuilt STARTED/FINISHED events (yielding to the loop every 64,
    as an engine does), then awaits ``commit()``; the clock stops when they are
    durable. ``path`` must not exist.
    """
    return anyio.run(_transitions, Path(path), n, backend="asyncio")


async def _commit_latency(path: Path, samples: int, background: int) -> list[float]:
    events = _hook_events(samples * (background + 1) + 1)
    async with SqliteStore.open(path) as store:
        await store.create_run(run_record("bench"))
        it = iter(events)
        out = []
        for _ in range(samples):
            for _ in range(background):
                store.append(next(it))
            store.append(next(it))
            t = time.perf_counter()
            await store.commit()
            out.append(time.perf_counter() - t)
    return out


def measure_commit_latency(
    path: str | os.PathLike[str], samples: int = 1000, background: int = 0
) -> tuple[float, float]:
    """(median, p99) seconds that awaiting ``commit()`` adds for one durable record (the
    quiesce record of guarantee 5), with ``background`` write-behind events pending too."""
    times = sorted(anyio.run(_commit_latency, Path(path), samples, background, backend="asyncio"))
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def test_print_store_benchmark_probes(tmp_path: Path) -> None:
    """Prints the store's cost per hook transition and per durable commit (not asserted)."""
    rate = measure_transitions_per_second(tmp_path / "rate.db", 20_000)
    p50, p99 = measure_commit_latency(tmp_path / "commit.db", 300)
    print(
        f"\nsqlite: {rate:,.0f} transitions/s; commit p50 {p50 * 1e3:.2f} ms p99 {p99 * 1e3:.2f} ms"
    )


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        for n in (10_000, 100_000):
            rate = measure_transitions_per_second(Path(tmp) / f"rate-{n}.db", n)
            print(f"{n:>7} transitions: {rate:>10,.0f} per second")
        for background in (0, 100):
            p50, p99 = measure_commit_latency(Path(tmp) / f"c-{background}.db", 2000, background)
            print(
                f"commit latency with {background} pending events:"
                f" p50 {p50 * 1e3:.3f} ms, p99 {p99 * 1e3:.3f} ms"
            )


async def test_held_background_writes_wait_for_a_commit_or_the_release(
    store: SqliteStore,
) -> None:
    """While held (the engine holds them while anything is frozen), write-behind records
    stay queued; a commit still writes them; releasing the hold writes the rest."""
    await store.create_run(run_record("r1"))
    await store.commit()
    store.hold_background_writes(True)
    before = store.statistics().transactions
    store.append(event("r1", 1))
    await anyio.sleep(0.05)  # the writer would have run by now
    assert store.statistics().transactions == before
    assert await store.read_events("r1") == []
    await store.commit()  # commit points are never held
    assert [e.seq for e in await store.read_events("r1")] == [1]
    store.append(event("r1", 2))
    store.hold_background_writes(False)
    with anyio.fail_after(5):
        while store.statistics().events_written < 2:  # noqa: ASYNC110 - the writer is ours to watch
            await anyio.sleep(0.01)
    assert [e.seq for e in await store.read_events("r1")] == [1, 2]


async def test_holds_are_counted(store: SqliteStore) -> None:
    """Two runs holding at once: the writes wait until both let go."""
    await store.create_run(run_record("r1"))
    await store.commit()
    store.hold_background_writes(True)
    store.hold_background_writes(True)
    store.append(event("r1", 1))
    store.hold_background_writes(False)
    await anyio.sleep(0.05)
    assert await store.read_events("r1") == []
    store.hold_background_writes(False)
    with anyio.fail_after(5):
        while not await store.read_events("r1"):  # noqa: ASYNC110 - no event to wait on
            await anyio.sleep(0.01)


async def test_an_engine_run_writes_nothing_in_the_background_while_frozen(db: Path) -> None:
    """From the freeze to the thaw, the only transactions are the commit points."""
    seen: dict[str, int] = {}

    class Probe:
        async def on_prepare_begin(self, ctx: HookContext) -> None:
            await anyio.sleep(0.01)

        async def on_prepare_finish(self, ctx: HookContext) -> None:
            key = f"{ctx.resource.type}:{ctx.resource.id}"
            seen[key] = sq.statistics().transactions
            await anyio.sleep(0.02)  # long enough for a background write to happen

    class ProbePlugin(ProtectionPlugin):
        name = "probe"
        types = (ResourceType("Server", quiesces=True, snapshots=False), ResourceType("Volume"))

        def get_protect_operation(self, resource_type: str) -> object:
            return Probe()

    server = Resource("Server", "s1")
    volumes = [Resource("Volume", f"v{i}") for i in range(5)]
    async with SqliteStore.open(db) as sq:
        engine = Engine(
            [ProbePlugin()],
            [MapProtectable("Volume", ["Server"], {server.key: volumes})],
            store=sq,
            discover=False,
        )
        async with engine:
            await engine.protect(Plan(name="p", resources=[server]))
            cuts = {v for k, v in seen.items() if k.startswith("Volume")}
            assert cuts == {seen["Server:s1"]}  # no transaction between the cuts and the thaw
            assert len(await sq.read_events((await sq.list_runs())[0].run_id)) > 10


async def test_a_thaw_that_fails_does_not_leave_writes_held(db: Path) -> None:
    """A resource whose thaw failed stays frozen, but its run ending releases the hold."""
    plugin = RecordingPlugin(
        TYPES,
        faults={
            (sk("v1"), Hook.PREPARE_BEGIN): Fault.RAISE,
            (sk("s1"), Hook.PREPARE_FINISH): Fault.RAISE,
        },
        fault_thaws=True,
    )
    async with SqliteStore.open(db) as sq:
        engine = Engine(
            [plugin], protectables_for([(res("s1"), res("v1"))]), store=sq, discover=False
        )
        async with engine:
            plan = Plan(name="t", resources=[res("s1")], timeouts=Timeouts(hook=0.2, abort=0.5))
            with pytest.raises(RunError):
                await engine.protect(plan)
            run_id = (await sq.list_runs())[0].run_id
            written = sq.statistics().events_written
            sq.append(event(run_id, 10_000))  # no commit: only an unheld writer writes it
            with anyio.fail_after(5):
                while sq.statistics().events_written == written:  # noqa: ASYNC110 - watching the writer
                    await anyio.sleep(0.01)
