"""The PostgreSQL checkpoint store beside SQLite and memory: transitions, a durable record,
events to another process.

A throwaway PostgreSQL 15 cluster (the tests' ``tests/pgcluster.py``, ``fsync=off``:
a test cluster; a production server's fsync adds its own commit latency) on this
machine, over TCP to 127.0.0.1. Per store:

- **transitions/s**: a protect of N resources with no-op hooks (barrier cut), lifecycle
  events read back from the store over the protect's time (the engine's own time is in
  the denominator, so a lower bound on the store's rate);
- **durable record**: ``append`` one lifecycle event then ``await commit()``, what a
  quiesce window pays for each record the engine must have durable before going on
  (the cut intent); median and p99 of many;
- **events/s to another process**: a subscriber in a child process (PostgreSQL:
  ``PostgresStore.subscribe``, woken by NOTIFY; SQLite: polling ``read_events`` every
  5 ms, the only way another process can follow a file) while this one appends
  E events in commits of B; events over the time from the first commit to the child
  printing the last. The memory store has no other process to reach.

``python -m benchmarks.pg_store [--quick]`` runs it alone.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from benchmarks._report import table
from benchmarks._workload import NoopProtection, Workload, make_plan
from karbor_async import BarrierPolicy, Engine, MemoryStore, OperationKind, RunStatus
from karbor_async._sqlite import SqliteStore
from karbor_async.events import Event, EventKind
from karbor_async.store import RunRecord
from karbor_simcloud import all_protectables

__all__ = ["pg_store_section"]

_ROOT = Path(__file__).resolve().parent.parent
_TESTS = _ROOT / "tests"
SEED = 20161129

_CHILD = r"""
import sys, time, anyio
from karbor_async.events import EventKind

async def main(kind, where, run_id):
    if kind == "postgresql":
        from karbor_async._pg_store import PostgresStore
        async with PostgresStore.open(where) as store, store.subscribe(run_id) as events:
            print("ready", flush=True)
            async for e in events:
                if e.kind is EventKind.RUN_FINISHED:
                    break
    else:
        from karbor_async._sqlite import SqliteStore
        async with SqliteStore.open(where, read_only=True) as store:
            print("ready", flush=True)
            seen = 0
            while True:
                got = await store.read_events(run_id, seen)
                if got:
                    seen = got[-1].seq
                    if got[-1].kind is EventKind.RUN_FINISHED:
                        break
                else:
                    await anyio.sleep(0.005)
    print("done", time.time(), flush=True)

anyio.run(main, *sys.argv[1:], backend="asyncio")
"""


def _cluster_module() -> Any:
    if str(_TESTS) not in sys.path:
        sys.path.insert(0, str(_TESTS))
    import pgcluster

    return pgcluster


def _record(run_id: str) -> RunRecord:
    return RunRecord(
        run_id=run_id,
        operation=OperationKind.PROTECT,
        checkpoint_id=run_id,
        plan={"name": "bench"},
        graph={},
        status=RunStatus.RUNNING,
        started_wall=time.time(),
    )


def _event(run_id: str, seq: int, kind: EventKind = EventKind.STARTED) -> Event:
    return Event(
        run_id=run_id,
        seq=seq,
        kind=kind,
        operation=OperationKind.PROTECT,
        wall=time.time(),
        mono=time.monotonic(),
        resource=("OS::Nova::Server", f"s{seq}"),
    )


async def _transitions(open_store: Any, w: Workload) -> float:
    async with open_store() as store:
        engine = Engine([NoopProtection()], all_protectables(w.cloud), discover=False, store=store)
        async with engine:
            t0 = time.perf_counter()
            outcome = await engine.protect(make_plan(w.roots, BarrierPolicy.CUT))
            secs = time.perf_counter() - t0
        return len(await store.read_events(outcome.run_id)) / secs


async def _durable_record(open_store: Any, n: int) -> tuple[float, float]:
    async with open_store() as store:
        await store.create_run(_record("rec"))
        times = []
        for seq in range(1, n + 1):
            t0 = time.perf_counter()
            store.append(_event("rec", seq))
            await store.commit()
            times.append(time.perf_counter() - t0)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.99) - 1]


async def _to_other_process(
    open_store: Any, kind: str, where: str, env: dict[str, str], events: int, batch: int
) -> float:
    async with open_store() as store:
        await store.create_run(_record("live"))
        await store.commit()
        async with await anyio.open_process(
            [sys.executable, "-c", _CHILD, kind, where, "live"], env=env
        ) as child:
            assert child.stdout is not None
            out = b""
            while b"ready" not in out:
                out += await child.stdout.receive()
            t0 = time.time()
            for seq in range(1, events + 1):
                last = seq == events
                store.append(
                    _event("live", seq, EventKind.RUN_FINISHED if last else EventKind.STARTED)
                )
                if seq % batch == 0 or last:
                    await store.commit()
            async for chunk in child.stdout:  # to its end: "done <wall>"
                out += chunk
            await child.wait()
        done_at = float(out.split(b"done", 1)[1].split()[0])
    return events / (done_at - t0)


async def pg_store_section(quick: bool) -> list[str]:
    head = ["## PostgreSQL checkpoint store beside SQLite and memory", ""]
    pgcluster = _cluster_module()
    reason = pgcluster.unavailable()
    if reason is not None:
        return [*head, f"Skipped: this machine {reason}.", ""]
    from karbor_async._pg_store import PostgresStore

    ns = [200] if quick else [200, 1000]
    records = 200 if quick else 1000
    events, batch = (2000, 20) if quick else (10000, 50)
    paths = [
        str(_ROOT / "src"),
        str(_ROOT / "plugins" / "simcloud" / "src"),
        os.environ.get("PYTHONPATH", ""),
    ]
    with tempfile.TemporaryDirectory() as tmp, pgcluster.session_cluster() as cluster:
        env = {**os.environ, "PGPASSWORD": cluster.password, "PYTHONPATH": os.pathsep.join(paths)}
        counter = iter(range(1_000_000))
        last: dict[str, str] = {}
        """The database and the file each opener made last (the live test reuses them)."""

        def pg_open() -> Any:
            dsn = cluster.dsn(cluster.create_database("bench"))
            last["dsn"] = dsn
            return PostgresStore.open(dsn, password=cluster.password)

        def sqlite_open() -> Any:
            path = Path(tmp) / f"bench-{next(counter)}.db"
            last["path"] = str(path)
            return SqliteStore.open(path)

        @asynccontextmanager
        async def memory_open() -> AsyncIterator[MemoryStore]:
            yield MemoryStore()

        stores = {"memory": memory_open, "sqlite": sqlite_open, "postgresql": pg_open}
        rows = []
        for n in ns:
            w = await Workload.build(n, SEED)
            rates = {name: await _transitions(opener, w) for name, opener in stores.items()}
            rows.append([f"{n:,}", *(f"{rates[s]:,.0f}" for s in stores)])
        rec_rows = []
        for name, opener in stores.items():
            med, p99 = await _durable_record(opener, records)
            rec_rows.append([name, f"{med * 1e3:.3f}", f"{p99 * 1e3:.3f}"])
        live_rows = [["memory", "n/a (one process)"]]
        sqlite_ctx = sqlite_open()
        async with sqlite_ctx as s:  # create the file the child reads
            await s.commit()
        spath = last["path"]

        @asynccontextmanager
        async def same_sqlite() -> AsyncIterator[SqliteStore]:
            async with SqliteStore.open(spath) as store:
                yield store

        rate = await _to_other_process(same_sqlite, "sqlite", spath, env, events, batch)
        live_rows.append(["sqlite (polling 5 ms)", f"{rate:,.0f}"])
        ctx = pg_open()
        rate = await _to_other_process(lambda: ctx, "postgresql", last["dsn"], env, events, batch)
        live_rows.append(["postgresql (LISTEN/NOTIFY)", f"{rate:,.0f}"])
        server = cluster.psql("SHOW server_version")
    return [
        *head,
        f"PostgreSQL {server} on 127.0.0.1 (fsync=off), SQLite WAL on a temporary file.",
        "",
        "Hook transitions per second (no-op hooks, barrier cut; events stored / protect time):",
        "",
        *table(["N", *stores], rows),
        "",
        f"A durable record (append one event, await commit), {records} in a row, ms:",
        "",
        *table(["store", "median", "p99"], rec_rows),
        "",
        f"Events per second to a subscriber in another process ({events:,} events, "
        f"commits of {batch}):",
        "",
        *table(["store", "events/s"], live_rows),
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.pg_store [--quick]``: this section alone."""
    import argparse

    from benchmarks._workload import quiet_logging

    ap = argparse.ArgumentParser(prog="python -m benchmarks.pg_store")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    quiet_logging()
    print("\n".join(anyio.run(pg_store_section, args.quick, backend="asyncio")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
