"""The SQLite plugin (``plugins/sqlite``): its cut, the writers' stall, its copy's throughput.

A database of S MB (1 KB rows, WAL mode) is protected while a writer thread commits
one row at a time. Measured, per size, median of the repetitions:

- the cut: the duration of ``on_prepare_finish`` (open a connection, ``BEGIN``, the
  first read: the snapshot);
- the writers' stall: the longest insert (commit) that overlapped the cut, against
  the longest and the median insert in the 0.3 s before the run, and the longest
  during the copy;
- the copy: ``on_main`` (the online backup from the cut's connection in steps of
  1024 pages, then the stream into a file-system bank), in MB/s, with the writer on
  and off; against Python's ``sqlite3.Connection.backup`` alone (one step, a fresh
  connection, into a local file) and the ``sqlite3`` shell's ``.backup`` when it is
  installed, with the writer off (a backup from a fresh connection restarts whenever
  another connection writes).
"""

from __future__ import annotations

import shutil
import sqlite3
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import anyio.to_thread

from benchmarks._report import table
from karbor_async import Engine, FsBank, HookContext, MemoryStore, Plan, Resource
from karbor_sqlite import DATABASE, SqliteProtection

__all__ = ["sqlite_plugin_section"]

ROW = 1000


def _make_db(path: Path, mb: int) -> int:
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v BLOB NOT NULL)")
        rows = mb * (1 << 20) // (ROW + 40)
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO t (v) VALUES (randomblob(?))", [(ROW,)] * rows)
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    return path.stat().st_size


class _Writer:
    """Commits one small row at a time; keeps (start, duration) of every commit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.commits: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=30)
        conn.execute("PRAGMA synchronous = NORMAL")
        try:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                conn.execute("INSERT INTO t (v) VALUES (randomblob(100))")
                self.commits.append((t0, time.perf_counter() - t0))
                time.sleep(0.0002)
        finally:
            conn.close()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def worst(self, start: float, end: float) -> float | None:
        """The longest commit that overlapped [start, end] (None: none did)."""
        hit = [d for t0, d in self.commits if t0 < end and t0 + d > start]
        return max(hit) if hit else None

    def within(self, start: float, end: float) -> list[float]:
        return [d for t0, d in self.commits if start <= t0 and t0 + d <= end]


class _TimedOp:
    def __init__(self, inner: Any, times: dict[str, tuple[float, float]]) -> None:
        self._inner = inner
        self._times = times
        self.check = inner.check

    async def on_prepare_finish(self, ctx: HookContext) -> None:
        t0 = time.perf_counter()
        await self._inner.on_prepare_finish(ctx)
        if ctx.aborting is None:
            self._times["cut"] = (t0, time.perf_counter())

    async def on_main(self, ctx: HookContext) -> None:
        t0 = time.perf_counter()
        await self._inner.on_main(ctx)
        self._times["copy"] = (t0, time.perf_counter())


class _TimedSqlite(SqliteProtection):
    name = "bench-sqlite"

    def __init__(self) -> None:
        super().__init__()
        self.times: dict[str, tuple[float, float]] = {}

    def get_protect_operation(self, resource_type: str) -> object | None:
        op = super().get_protect_operation(resource_type)
        return None if op is None else _TimedOp(op, self.times)


async def _protect(db: Path, work: Path, writer: _Writer | None) -> dict[str, Any]:
    plugin = _TimedSqlite()
    bank = work / f"bank-{time.perf_counter_ns()}"
    async with Engine([plugin], [], store=MemoryStore(), bank=FsBank(bank), discover=False) as e:
        plan = Plan(
            name="bench",
            resources=[Resource(DATABASE, str(db))],
            parameters={DATABASE: {"scratch_dir": str(work)}},
        )
        if writer is not None:
            before_start = time.perf_counter()
            await anyio.sleep(0.3)
            before = writer.within(before_start, time.perf_counter())
        await e.protect(plan)
    await anyio.to_thread.run_sync(shutil.rmtree, bank)
    cut, copy = plugin.times["cut"], plugin.times["copy"]
    out: dict[str, Any] = {"cut": cut[1] - cut[0], "copy": copy[1] - copy[0]}
    if writer is not None:
        out.update(
            before_max=max(before) if before else None,
            before_p50=statistics.median(before) if before else None,
            stall=writer.worst(*cut),
            copy_max=writer.worst(*copy),
        )
    return out


def _python_backup(db: Path, out: Path) -> float:
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    src = sqlite3.connect(db)
    dst = sqlite3.connect(out)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()
    return time.perf_counter() - t0


def _shell_backup(shell: str, db: Path, out: Path) -> float:
    out.unlink(missing_ok=True)
    t0 = time.perf_counter()
    subprocess.run([shell, str(db), f".backup '{out}'"], check=True, capture_output=True)
    return time.perf_counter() - t0


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.2f}"


def _med(values: list[Any]) -> Any:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


async def sqlite_plugin_section(sizes_mb: tuple[int, ...], reps: int) -> list[str]:
    shell = shutil.which("sqlite3")
    cut_rows, copy_rows = [], []
    with tempfile.TemporaryDirectory(prefix="karbor-bench-sqlite-") as tmp:
        work = Path(tmp)
        for mb in sizes_mb:
            db = work / f"db-{mb}.sqlite3"
            size = await anyio.to_thread.run_sync(_make_db, db, mb)
            on: list[dict[str, Any]] = []
            off: list[dict[str, Any]] = []
            py: list[float] = []
            sh: list[float] = []
            for _ in range(reps):
                writer = _Writer(db)
                writer.start()
                try:
                    on.append(await _protect(db, work, writer))
                finally:
                    await anyio.to_thread.run_sync(writer.stop)
                off.append(await _protect(db, work, None))
                py.append(await anyio.to_thread.run_sync(_python_backup, db, work / "py.bak"))
                if shell is not None:
                    sh.append(
                        await anyio.to_thread.run_sync(_shell_backup, shell, db, work / "sh.bak")
                    )
            size = db.stat().st_size  # (grown by the writer's rows)
            mbs = size / (1 << 20)
            cut_rows.append(
                [
                    f"{mbs:.0f}",
                    _ms(_med([r["cut"] for r in on])),
                    _ms(_med([r["stall"] for r in on])),
                    _ms(_med([r["before_max"] for r in on])),
                    _ms(_med([r["before_p50"] for r in on])),
                    _ms(_med([r["copy_max"] for r in on])),
                ]
            )
            copy_rows.append(
                [
                    f"{mbs:.0f}",
                    f"{mbs / _med([r['copy'] for r in on]):.0f}",
                    f"{mbs / _med([r['copy'] for r in off]):.0f}",
                    f"{mbs / statistics.median(py):.0f}",
                    f"{mbs / statistics.median(sh):.0f}" if sh else "not installed",
                ]
            )
    return [
        "## The SQLite plugin: the cut, the writers' stall, the copy",
        "",
        "A WAL database of 1 KB rows is protected (`plugins/sqlite`, in-memory store, "
        "file-system bank in the same temporary directory) while a writer thread commits "
        f"one row at a time; median of {reps}. The cut is `on_prepare_finish` (a connection, "
        "`BEGIN`, the first read); a stall is the longest commit that overlapped the cut "
        "(against the longest and the median in the 0.3 s before, and the longest during "
        "the copy).",
        "",
        *table(
            [
                "MB",
                "cut ms",
                "writer's longest commit during the cut, ms",
                "longest before, ms",
                "median before, ms",
                "longest during the copy, ms",
            ],
            cut_rows,
        ),
        "",
        "The copy is `on_main`: the online backup from the cut's connection (1024 pages a "
        "step, a progress report each) into a scratch file, then streamed into the bank "
        "(so the data is written twice). Against a backup alone with the writer off: "
        "`sqlite3.Connection.backup` in one step from a fresh connection, and the `sqlite3` "
        "shell's `.backup`.",
        "",
        *table(
            [
                "MB",
                "plugin MB/s (writer on)",
                "plugin MB/s (writer off)",
                "Connection.backup MB/s",
                "sqlite3 .backup MB/s",
            ],
            copy_rows,
        ),
        "",
    ]
