"""The SQLite plugin (``plugins/sqlite``): protect while a writer inserts, restore, delete.

A writer thread keeps committing rows while the database is protected; the cut's
own query (``cut_query``) records what the read transaction saw, and the restored
file must hold exactly those rows. Through the API and through the command line,
and with the CLI killed (SIGKILL) during the cut and during the copy, then
``recover``: the checkpoint ends ``error`` and is cleaned up, nothing is left.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from karbor_async import (
    Engine,
    EventKind,
    FsBank,
    Hook,
    Plan,
    Resource,
    ResourceStatus,
    RunStatus,
    SqliteStore,
)
from karbor_async.exceptions import PlanError, RunError

sq = pytest.importorskip("karbor_sqlite")

KARBOR = str(Path(sys.executable).parent / "karbor-async")
DB = sq.DATABASE
CUT_QUERY = "SELECT max(id), count(*) FROM t"


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {})  # the SQLite store runs on asyncio; the hooks use real threads


def make_db(path: Path, rows: int, *, wal: bool = True, blob: int = 400) -> Path:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        if wal:
            conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB NOT NULL, at REAL)")
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO t (v, at) VALUES (randomblob(?), 0)", [(blob,)] * rows)
        conn.execute("COMMIT")
    finally:
        conn.close()
    return path


class Writer:
    """Commits one row at a time, in a thread of its own, until stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.commits = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=10)
            try:
                while not self._stop.is_set():
                    conn.execute("INSERT INTO t (v, at) VALUES (randomblob(64), ?)", (time.time(),))
                    self.commits += 1
                    time.sleep(0.0005)
            finally:
                conn.close()
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Writer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        assert self.error is None, self.error


def rows(path: Path, where: str = "", params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return list(conn.execute(f"SELECT id, v, at FROM t {where} ORDER BY id", params))
    finally:
        conn.close()


def reader_holds(path: Path) -> bool:
    """Whether some connection holds a read transaction: commit a row, then a passive
    checkpoint cannot copy every frame of the WAL into the database."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=5)
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS probe (at REAL)")
        conn.execute("INSERT INTO probe VALUES (?)", (time.time(),))
        _busy, log, done = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        return bool(done < log)
    finally:
        conn.close()


def _plan(db: Path, **params: Any) -> Plan:
    return Plan(
        name="db",
        resources=[Resource(DB, str(db))],
        parameters={DB: {"cut_query": CUT_QUERY, **params}},
    )


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    path = tmp_path / "scratch"
    path.mkdir()
    return path


async def test_protect_while_writing_restores_exactly_the_rows_at_the_cut(
    tmp_path: Path, scratch: Path, no_loop_stalls: list[str]
) -> None:
    """A writer commits all along; the restored file holds exactly the rows the cut's
    read transaction saw (not one more), passes integrity_check, and delete removes
    the bank data; nothing held the event loop, no scratch file is left."""
    db = make_db(tmp_path / "app.db", 6000)
    plugin = sq.SqliteProtection()
    async with (
        SqliteStore.open(tmp_path / "karbor.db") as store,
        Engine(
            [plugin],
            [sq.DirectoryProtectable()],
            store=store,
            bank=FsBank(tmp_path / "bank"),
            discover=False,
        ) as engine,
    ):
        progress: list[Any] = []

        async def watch() -> None:
            async with engine.subscribe() as events:
                async for e in events:
                    if e.kind is EventKind.PROGRESS and e.progress is not None:
                        progress.append(e.progress)
                    if e.kind is EventKind.RUN_FINISHED:
                        return

        with Writer(db) as writer:
            async with anyio.create_task_group() as tg:
                tg.start_soon(watch)
                await anyio.sleep(0.05)
                before = writer.commits
                outcome = await engine.protect(_plan(db, step_pages=16, scratch_dir=str(scratch)))
            during = writer.commits - before
        assert outcome.status is RunStatus.SUCCEEDED
        assert during > 0, "the writer made no commit while the database was protected"
        saved = (await store.load_saved_info(outcome.checkpoint_id))[(DB, str(db))]
        cut_max, cut_count = saved["cut_query_result"]
        assert rows(db, "WHERE id > ?", (cut_max,)), "no row was committed after the cut"
        assert plugin.held == {}
        assert os.listdir(scratch) == []
        assert {p.message for p in progress} >= {"backup", "upload"}
        assert outcome.resources[(DB, str(db))].cut_at is not None
        assert not reader_holds(db)  # no read transaction is left open

        restored = await engine.restore(outcome.checkpoint_id)
        new = Path(restored.restored[(DB, str(db))])
        assert new != db and new.parent == db.parent
        assert rows(new) == rows(db, "WHERE id <= ?", (cut_max,))
        assert len(rows(new)) == cut_count

        bank_dir = tmp_path / "bank" / outcome.checkpoint_id
        assert any(p.suffix == ".sqlite3" for p in bank_dir.rglob("*"))
        await engine.delete(outcome.checkpoint_id)
        assert not any(p.is_file() for p in bank_dir.rglob("*")) if bank_dir.exists() else True
    assert no_loop_stalls == []


async def test_a_directory_protects_the_databases_in_it(tmp_path: Path) -> None:
    """SQLite::Directory's dependents are the database files directly in it (side files
    and non-databases skipped); each is cut and copied."""
    data = tmp_path / "data"
    data.mkdir()
    make_db(data / "a.db", 10)
    make_db(data / "b.sqlite", 20)
    (data / "notes.txt").write_text("not a database")
    (data / "sub").mkdir()
    async with Engine(
        [sq.SqliteProtection()],
        [sq.DirectoryProtectable()],
        bank=FsBank(tmp_path / "bank"),
        discover=False,
    ) as engine:
        outcome = await engine.protect(
            Plan(name="dir", resources=[Resource(sq.DIRECTORY, str(data))])
        )
        got = sorted(rid for t, rid in outcome.resources if t == DB)
        assert got == [str(data / "a.db"), str(data / "b.sqlite")]
        assert all(r.status is ResourceStatus.SUCCEEDED for r in outcome.resources.values())


async def test_check_refuses_what_cannot_be_protected_before_anything_runs(
    tmp_path: Path,
) -> None:
    """Missing, not a database, a relative path, not in WAL mode (unless set_wal), or a
    bank without room: refused while the run is built (a PlanError naming the resource)."""
    (tmp_path / "text.db").write_text("hello")
    rollback = make_db(tmp_path / "rollback.db", 5, wal=False)
    big = make_db(tmp_path / "big.db", 300)

    class TinyBank(FsBank):
        async def free_bytes(self) -> int:
            return 1000

    async with Engine(
        [sq.SqliteProtection()], [], bank=FsBank(tmp_path / "bank"), discover=False
    ) as engine:
        for rid, needle in [
            (str(tmp_path / "missing.db"), "no such database file"),
            (str(tmp_path / "text.db"), "not an SQLite database"),
            ("relative.db", "absolute path"),
            (str(rollback), "not WAL"),
        ]:
            with pytest.raises(PlanError, match=needle) as info:
                await engine.build_protect(Plan(name="x", resources=[Resource(DB, rid)]))
            assert rid in str(info.value)
        await engine.build_protect(
            Plan(
                name="x",
                resources=[Resource(DB, str(rollback))],
                parameters={DB: {"set_wal": True}},
            )
        )
        conn = sqlite3.connect(rollback)
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
    async with Engine(
        [sq.SqliteProtection()], [], bank=TinyBank(tmp_path / "bank"), discover=False
    ) as engine:
        with pytest.raises(PlanError, match="bytes free"):
            await engine.build_protect(Plan(name="x", resources=[Resource(DB, str(big))]))


async def test_a_run_that_fails_after_the_cut_closes_its_transaction(
    tmp_path: Path, scratch: Path
) -> None:
    """Another database's cut fails after this one's (its cut_query fails at run time,
    late): the group aborts, this copy never runs, and its read transaction is closed
    by the aborting on_prepare_finish the engine calls once more."""
    good = make_db(tmp_path / "good.db", 50)
    bad = make_db(tmp_path / "bad.db", 5)
    late_failure = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 300000) "
        "SELECT json(CASE WHEN max(x) > 0 THEN 'not json' END) FROM c"
    )
    plugin = sq.SqliteProtection()
    async with Engine([plugin], [], bank=FsBank(tmp_path / "bank"), discover=False) as engine:
        plan = Plan(
            name="x",
            resources=[Resource(DB, str(good)), Resource(DB, str(bad))],
            parameters={
                DB: {"scratch_dir": str(scratch)},
                f"{DB}#{bad}": {"cut_query": late_failure},
            },
        )
        with pytest.raises(RunError) as info:
            await engine.protect(plan)
        outcome = info.value.outcome
    assert outcome.status is RunStatus.FAILED
    ok = outcome.resources[(DB, str(good))]
    assert ok.cut_at is not None and Hook.MAIN not in ok.hooks_run
    assert "malformed JSON" in (outcome.resources[(DB, str(bad))].error or "")
    assert plugin.held == {}
    assert not reader_holds(good) and not reader_holds(bad)
    assert os.listdir(scratch) == []


# -- the command line, and SIGKILL ------------------------------------------------------
def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KARBOR_")}
    env.update(KARBOR_DB=str(root / "karbor.db"), KARBOR_BANK=str(root / "bank"), COLUMNS="200")
    return env


def _cli(root: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KARBOR, *args],
        cwd=root,
        env=_env(root),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _plan_file(root: Path, db: Path, scratch: Path, **extra: Any) -> Path:
    lines = [
        'name = "db"',
        f'resources = ["{DB}#{db}"]',
        "",
        f'[parameters."{DB}"]',
        f'cut_query = "{CUT_QUERY}"',
        f'scratch_dir = "{scratch}"',
        *(f"{k} = {json.dumps(v)}" for k, v in extra.items()),
    ]
    path = root / "plan.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _saved(root: Path, checkpoint: str) -> dict[Any, Any]:
    async def read() -> dict[Any, Any]:
        async with SqliteStore.open(root / "karbor.db") as store:
            return dict(await store.load_saved_info(checkpoint))

    return anyio.run(read)


@pytest.mark.slow
def test_the_command_line_protects_and_restores_while_writing(
    tmp_path: Path, scratch: Path
) -> None:
    """``karbor-async protect PLAN`` finds the plugin by its entry point; the restored
    database holds exactly the rows at the cut."""
    db = make_db(tmp_path / "app.db", 3000)
    plan = _plan_file(tmp_path, db, scratch, step_pages=32)
    with Writer(db) as writer:
        time.sleep(0.05)
        done = _cli(tmp_path, "protect", str(plan), "--plain")
        assert done.returncode == 0, done.stdout + done.stderr
        assert writer.commits > 0
        time.sleep(0.05)
    listing = _cli(tmp_path, "checkpoints", "list", "--all", "--json")
    listed = json.loads(listing.stdout)["checkpoints"]
    [checkpoint] = [c["id"] for c in listed]
    cut_max, _count = _saved(tmp_path, checkpoint)[(DB, str(db))]["cut_query_result"]
    target = tmp_path / "restored.db"
    done = _cli(tmp_path, "restore", checkpoint, "--param", f"{DB}.target={target}", "--plain")
    assert done.returncode == 0, done.stdout + done.stderr
    assert rows(target) == rows(db, "WHERE id <= ?", (cut_max,))
    assert rows(db, "WHERE id > ?", (cut_max,)), "the writer committed nothing after the cut"
    assert list(scratch.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("point", ["cut", "copy"])
def test_a_protect_killed_during_the_cut_or_the_copy_recovers_to_error_and_cleans_up(
    tmp_path: Path, scratch: Path, point: str
) -> None:
    """SIGKILL during the cut (a cut_query that never ends holds it) or during the copy
    (a throttled backup), then ``recover``: the run fails (a copy is not resumed: its
    cut lived in the killed process, which the outcome says), the checkpoint is deleted,
    no scratch file or bank data is left, and no read transaction is open."""
    db = make_db(tmp_path / "app.db", 2000)
    plan = _plan_file(tmp_path, db, scratch, step_pages=1, step_pause=0.05)
    if point == "cut":
        forever = (
            "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT max(x) FROM c"
        )
        plan.write_text(plan.read_text().replace(CUT_QUERY, forever))
    proc = subprocess.Popen(
        [KARBOR, "protect", str(plan), "--plain"],
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "the command ended before the point"
            assert time.monotonic() < deadline, "the point was not reached in 30 s"
            time.sleep(0.05)
            copying = any(scratch.iterdir())
            if (copying if point == "copy" else not copying) and reader_holds(db):
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not reader_holds(db)  # the kill ended the read transaction with the process
    done = _cli(tmp_path, "recover", "--json", timeout=30)
    assert done.returncode == 1, done.stdout + done.stderr
    [outcome] = json.loads(done.stdout)["recovered"]
    assert outcome["status"] == "failed"
    if point == "copy":
        [res] = outcome["resources"]
        assert "its cut lived in the killed process" in (res["error"] or "")
        assert str(db) in outcome["error"]
    listing = _cli(tmp_path, "checkpoints", "list", "--all", "--json")
    listed = json.loads(listing.stdout)["checkpoints"]
    assert {c["id"]: c["status"] for c in listed} == {outcome["checkpoint_id"]: "deleted"}
    assert list(scratch.iterdir()) == []
    bank = tmp_path / "bank" / outcome["checkpoint_id"]
    assert not bank.exists() or not any(p.is_file() for p in bank.rglob("*"))
    assert not reader_holds(db)
    assert [p.name for p in tmp_path.iterdir() if ".part" in p.name] == []


async def test_hooks_are_idempotent_across_attempts(tmp_path: Path, scratch: Path) -> None:
    """Called the way the engine calls them: a second cut replaces the first (one held
    cut), the copy reports progress per step, a re-run restore adopts the file an
    earlier attempt wrote (same sha256) instead of failing, and a restore to an
    existing file of another content is refused."""
    from karbor_async import MemoryBank
    from karbor_async.testing import make_context

    db = make_db(tmp_path / "app.db", 500)
    res = Resource(DB, str(db))
    plugin = sq.SqliteProtection()
    op = plugin.get_protect_operation(DB)
    bank = MemoryBank()
    params = {"scratch_dir": str(scratch), "step_pages": 8, "cut_query": CUT_QUERY}
    ctx, rec = make_context(res, "on_prepare_finish", parameters=params, bank=bank)
    await op.on_prepare_finish(ctx)
    ctx, rec = make_context(
        res, "on_prepare_finish", parameters=params, bank=bank, attempt=2, recorder=rec
    )
    await op.on_prepare_finish(ctx)
    assert len(plugin.held) == 1
    ctx, rec = make_context(res, "on_main", parameters=params, bank=bank, recorder=rec)
    await op.on_main(ctx)
    assert plugin.held == {} and not reader_holds(db)
    steps = [p for p in rec.progress_reports if p[3] == "backup"]
    assert len(steps) > 3
    saved = rec.saved[res.key]

    restore = plugin.get_restore_operation(DB)
    target = tmp_path / "out.db"
    rparams = {"target": str(target)}
    ctx, rrec = make_context(
        res, "on_main", operation="restore", parameters=rparams, bank=bank, run_id="r1"
    )
    rrec.saved[res.key] = dict(saved)
    await restore.on_main(ctx)
    assert rrec.restored[res.key] == str(target)
    again, arec = make_context(
        res, "on_main", operation="restore", parameters=rparams, bank=bank, run_id="r1", attempt=2
    )
    arec.saved[res.key] = dict(saved)
    await restore.on_main(again)  # the restored file of the attempt that died: adopted
    assert arec.restored[res.key] == str(target)
    target.write_bytes(b"something else")
    other, orec = make_context(
        res, "on_main", operation="restore", parameters=rparams, bank=bank, run_id="r2", attempt=2
    )
    orec.saved[res.key] = dict(saved)
    with pytest.raises(FileExistsError):
        await restore.on_main(other)
    assert [n for n in os.listdir(tmp_path) if ".part-" in n] == []
