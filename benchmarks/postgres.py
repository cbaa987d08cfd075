"""The PostgreSQL plugin on a real server: its cut, the writers' stall, its copy against pg_dump.

A throwaway PostgreSQL 15 cluster (the tests' ``tests/pgcluster.py``, started here
for the section) holds one table of rows of about 200 bytes. Per size:

- **connect** / **cut**: the ``on_prepare_begin`` hook (logging in) and the
  ``on_prepare_finish`` hook (begin a REPEATABLE READ transaction,
  ``pg_export_snapshot()``) from the engine's events, with three writers (pgbench)
  inserting one row per transaction as fast as they can all through the protect;
  **stall**: the slowest of their commits that overlapped the cut, next to their
  median commit outside it (a cut that blocked writers would show there);
- **copy**: the dump's size over ``on_main`` (``pg_dump --snapshot -Fc`` streamed
  into the file-system bank, plus waiting for it to take the snapshot), with no
  writers, against ``pg_dump -Fc`` alone into a file on the same file system,
  interleaved repetition after repetition; medians.

Without the server binaries (``/usr/lib/postgresql/15/bin``) or root the section
says so and is skipped.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import attrs

from benchmarks._report import fmt_ms, table
from karbor_async import Engine, EventKind, Hook, MemoryStore, Plan, Resource, RunStatus
from karbor_async._fsbank import FsBank

__all__ = ["postgres_section"]

_TESTS = Path(__file__).resolve().parent.parent / "tests"
# ~200 bytes of hex per row, no two rows sharing a piece (compresses about 2:1)
_ROWS = (
    "SELECT 0, md5(g || 'a') || md5(g || 'b') || md5(g || 'c') || md5(g || 'd') "
    "|| md5(g || 'e') || md5(g || 'f') FROM generate_series(1, {n}) g"
)
_SCHEMA = """
CREATE TABLE orders (
  id bigserial PRIMARY KEY,
  xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
  writer int NOT NULL,
  pad text NOT NULL
)
"""


@attrs.frozen
class _Size:
    label: str
    rows: int


@attrs.define
class _Result:
    size: _Size
    db_mb: float = 0.0
    table_mb: float = 0.0
    dump_mb: float = 0.0
    connect: list[float] = attrs.Factory(list)
    cut: list[float] = attrs.Factory(list)
    stall: list[float] = attrs.Factory(list)
    commits_in_cut: list[int] = attrs.Factory(list)
    commit_median: list[float] = attrs.Factory(list)
    commit_p99: list[float] = attrs.Factory(list)
    commit_max: list[float] = attrs.Factory(list)
    copy: list[float] = attrs.Factory(list)
    alone: list[float] = attrs.Factory(list)


def _cluster_module() -> Any:
    if str(_TESTS) not in sys.path:
        sys.path.insert(0, str(_TESTS))
    import pgcluster

    return pgcluster


async def postgres_section(quick: bool, reps: int) -> list[str]:
    head = ["## 6. PostgreSQL plugin: the cut, the writers' stall, the copy against pg_dump", ""]
    try:
        import asyncpg  # noqa: F401

        import karbor_postgres  # noqa: F401
    except ImportError as exc:
        return [*head, f"Skipped: {exc} (pip install -e plugins/postgres).", ""]
    pgcluster = _cluster_module()
    reason = pgcluster.unavailable()
    if reason is not None:
        return [*head, f"Skipped: this machine {reason}.", ""]
    sizes = [_Size("small", 50_000)] + ([] if quick else [_Size("large", 1_000_000)])
    with pgcluster.session_cluster() as cluster:
        server = await anyio.to_thread.run_sync(cluster.psql, "SHOW server_version")
        results = [await _measure(cluster, size, reps) for size in sizes]
    versions = (
        f"- PostgreSQL {server} (server, pg_dump, pgbench), asyncpg "
        f"{metadata.version('asyncpg')}, karbor-async-postgres "
        f"{metadata.version('karbor-async-postgres')}"
    )
    return [*head, versions, "", *_report(results, reps)]


async def _hook_span(
    store: MemoryStore, run_id: str, hook: Hook, *, wall: bool = False
) -> tuple[float, float]:
    """When the run's ``hook`` started and finished (engine clock, or epoch seconds)."""
    events = await store.read_events(run_id)
    ours = [
        e for e in events if e.hook is hook and e.kind in (EventKind.STARTED, EventKind.FINISHED)
    ]
    [start, end] = [(e.wall if wall else e.mono) for e in ours]
    return start, end


async def _measure(cluster: Any, size: _Size, reps: int) -> _Result:
    from karbor_postgres import DATABASE, PostgresPlugin

    print(f"[bench] postgres {size.label}: {size.rows} rows", file=sys.stderr, flush=True)
    db = await anyio.to_thread.run_sync(cluster.create_database, "bench")

    async def psql(sql: str, dbname: str = db) -> str:
        return str(await anyio.to_thread.run_sync(cluster.psql, sql, dbname))

    await psql(_SCHEMA)
    await psql(f"INSERT INTO orders (writer, pad) {_ROWS.format(n=size.rows)}")
    await psql("VACUUM ANALYZE orders")
    result = _Result(size)
    result.db_mb = int(await psql(f"SELECT pg_database_size('{db}')")) / 1e6
    result.table_mb = int(await psql("SELECT pg_table_size('orders')")) / 1e6

    async def resolve(name: str) -> str:
        return str(cluster.password)

    params = {"host": cluster.host, "port": cluster.port, "password": "pw"}
    plan = Plan(name="bench", resources=[Resource(DATABASE, db)], parameters={DATABASE: params})
    root = Path(tempfile.mkdtemp(prefix="karbor-bench-pg-"))
    store = MemoryStore()
    try:
        async with Engine(
            [PostgresPlugin()],
            [],
            store=store,
            bank=FsBank(root / "bank"),
            discover=False,
            secrets=resolve,
        ) as engine:
            for rep in range(reps):
                await _with_writers(engine, store, plan, cluster, db, result)
                await _copy_and_alone(engine, store, plan, cluster, db, root, result, rep)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        await anyio.to_thread.run_sync(cluster.drop_database, db)
    return result


async def _with_writers(
    engine: Engine, store: MemoryStore, plan: Plan, cluster: Any, db: str, result: _Result
) -> None:
    """Protect while pgbench (another process, so its latencies are the server's, not
    this event loop's) runs three clients inserting one row per transaction."""
    logs = Path(tempfile.mkdtemp(prefix="karbor-bench-pgbench-"))
    script = logs / "insert.sql"
    script.write_text("INSERT INTO orders (writer, pad) VALUES (:client_id, 'w');\n")
    command = [
        str(cluster.bindir / "pgbench"),
        "-n",
        "-c",
        "3",
        "-T",
        "3",
        "-l",
        f"--log-prefix={logs / 'tx'}",
        "-f",
        str(script),
        "-h",
        cluster.host,
        "-p",
        str(cluster.port),
        "-U",
        cluster.user,
        db,
    ]
    env = {**os.environ, "PGPASSWORD": cluster.password}
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(anyio.run_process, command, env=env, cwd=logs))
            await anyio.sleep(0.7)
            outcome = await engine.protect(plan)
        assert outcome.status is RunStatus.SUCCEEDED, outcome
        start, end = await _hook_span(store, outcome.run_id, Hook.PREPARE_FINISH, wall=True)
        begun, connected = await _hook_span(store, outcome.run_id, Hook.PREPARE_BEGIN)
        commits = await anyio.to_thread.run_sync(_pgbench_commits, logs)
    finally:
        shutil.rmtree(logs, ignore_errors=True)
    during = [b - a for a, b in commits if a < end and b > start]
    outside = [b - a for a, b in commits if not (a < end and b > start)]
    result.connect.append(connected - begun)
    result.cut.append(end - start)
    result.stall.append(max(during, default=0.0))
    result.commits_in_cut.append(len(during))
    result.commit_median.append(statistics.median(outside))
    result.commit_p99.append(statistics.quantiles(outside, n=100)[98])
    result.commit_max.append(max(outside))
    await engine.delete(outcome.checkpoint_id)


def _pgbench_commits(logs: Path) -> list[tuple[float, float]]:
    """Each transaction of pgbench's logs as (start, end), epoch seconds."""
    commits = []
    for log in logs.glob("tx.*"):
        for line in log.read_text().splitlines():
            _client, _n, latency_us, _script, epoch, us = line.split()[:6]
            done = int(epoch) + int(us) / 1e6
            commits.append((done - int(latency_us) / 1e6, done))
    return commits


async def _copy_and_alone(
    engine: Engine,
    store: MemoryStore,
    plan: Plan,
    cluster: Any,
    db: str,
    root: Path,
    result: _Result,
    rep: int,
) -> None:
    async def plugin() -> None:
        outcome = await engine.protect(plan)
        assert outcome.status is RunStatus.SUCCEEDED, outcome
        start, end = await _hook_span(store, outcome.run_id, Hook.MAIN)
        saved = (await store.load_saved_info(outcome.checkpoint_id))[(plan.resources[0].key)]
        result.dump_mb = saved["dump_bytes"] / 1e6
        result.copy.append(end - start)
        await engine.delete(outcome.checkpoint_id)

    async def alone() -> None:
        target = root / "alone.pgdump"
        command = [
            str(cluster.bindir / "pg_dump"),
            "-Fc",
            "-h",
            cluster.host,
            "-p",
            str(cluster.port),
            "-U",
            cluster.user,
            "-f",
            str(target),
            db,
        ]
        env = {**os.environ, "PGPASSWORD": cluster.password}  # (over TCP, as the plugin)
        t = time.perf_counter()
        await anyio.run_process(command, env=env)
        elapsed = time.perf_counter() - t
        result.alone.append(elapsed)
        target.unlink()

    for step in (plugin, alone) if rep % 2 == 0 else (alone, plugin):
        await step()


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _report(results: list[_Result], reps: int) -> list[str]:
    lines = [
        "A throwaway PostgreSQL 15 cluster on loopback (`fsync=off`), one table of ~200-byte "
        "rows. **connect**: the `on_prepare_begin` hook (log in with a password, before the "
        "cut); **cut**: the `on_prepare_finish` hook (begin REPEATABLE READ, "
        "`pg_export_snapshot()`), while three writers (pgbench) insert one row per "
        "transaction; **stall**: the slowest writer commit that overlapped the cut, beside "
        "their commits outside it (median, p99, slowest). **copy**: `on_main` "
        "(`pg_dump --snapshot -Fc` streamed into the file-system bank), no writers, as the "
        "table's MB (heap and TOAST) and the dump's MB per second; **pg_dump alone**: "
        "`pg_dump -Fc -f FILE` over TCP on the same data and file system, interleaved with "
        f"the copies. Medians of {reps} repetitions (the speed ratio: of each repetition's "
        "ratio). This machine is shared: a pg_dump of the same data varies by half from one "
        'run to the next, so read the ratio as "about the same" unless it is far from 1. '
        "Measured apart: pg_dump writing its file itself is slower here than writing a pipe "
        "another process drains (the writes then overlap its compression), which is what the "
        "plugin's stream into the bank does.",
        "",
    ]
    rows = []
    for r in results:
        copy, alone = _median(r.copy), _median(r.alone)
        commits = [float(c) for c in r.commits_in_cut]
        rows.append(
            [
                f"{r.size.label} ({r.size.rows:,} rows)",
                f"{r.db_mb:.0f} / {r.table_mb:.0f} / {r.dump_mb:.1f}",
                fmt_ms(_median(r.connect)),
                fmt_ms(_median(r.cut)),
                f"{fmt_ms(_median(r.stall))} ({_median(commits):.0f})",
                " / ".join(
                    fmt_ms(_median(v), 3) for v in (r.commit_median, r.commit_p99, r.commit_max)
                ),
                f"{r.table_mb / copy:.1f} / {r.dump_mb / copy:.1f}",
                f"{r.table_mb / alone:.1f} / {r.dump_mb / alone:.1f}",
                f"{_median([a / c for a, c in zip(r.alone, r.copy, strict=True)]):.2f}x",
            ]
        )
    lines += table(
        [
            "size",
            "MB: database / table / dump",
            "connect (ms)",
            "cut (ms)",
            "stall: slowest commit in the cut, ms (commits in it)",
            "commits outside, ms: median / p99 / slowest",
            "copy, MB/s: table / dump",
            "pg_dump alone, MB/s: table / dump",
            "copy speed / alone",
        ],
        rows,
    )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.postgres [--quick] [--reps N]``: this section alone, printed
    with its own date, machine and commit (for ``RESULTS.md``)."""
    import argparse
    import shlex

    from benchmarks._report import environment
    from benchmarks._workload import quiet_logging

    ap = argparse.ArgumentParser(prog="python -m benchmarks.postgres")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reps", type=int, default=None)
    args = ap.parse_args(argv)
    reps = args.reps or (3 if args.quick else 5)
    command = shlex.join(["python", "-m", "benchmarks.postgres", *(argv or sys.argv[1:])])
    header = environment(command, Path(__file__).resolve().parent.parent)
    quiet_logging()
    lines = anyio.run(postgres_section, args.quick, reps, backend="asyncio")
    print("\n".join([lines[0], "", *header, *lines[2:]]))  # (the versions join the list)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
