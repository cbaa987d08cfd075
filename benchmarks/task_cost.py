"""Per-task cost of a task group: microseconds and bytes per task, anyio against raw asyncio.

``python benchmarks/task_cost.py [--n N] [--reps R]`` prints one JSON line. It
imports only the standard library and anyio, so that the same file runs in
another virtualenv with another anyio (``benchmarks/_taskcost.py`` runs it on the
installed anyio and on anyio 4.13, each in a subprocess).

- **us per task**: ``N`` no-op tasks started in one task group
  (``anyio.create_task_group().start_soon`` / ``asyncio.TaskGroup.create_task``)
  and run to their end, divided by ``N``: start, one step, finish, the group's
  bookkeeping. Median of ``R`` repetitions, each from a collected, frozen heap
  with the collector disabled (so that no collection lands in one and not in
  another).
- **bytes per task**: tracemalloc's traced memory with ``N`` tasks started and
  parked on one event (each task a started coroutine awaiting
  ``Event.wait()``), minus the traced memory before they were started, divided
  by ``N``; one repetition (the figure does not vary).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from importlib import metadata

import anyio
import anyio.lowlevel


async def _noop() -> None:
    """A task that does nothing."""


async def _asyncio_run(n: int) -> float:
    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for _ in range(n):
            tg.create_task(_noop())
    return time.perf_counter() - t0


async def _anyio_run(n: int) -> float:
    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(_noop)
    return time.perf_counter() - t0


async def _asyncio_parked(n: int) -> int:
    event = asyncio.Event()
    base = tracemalloc.get_traced_memory()[0]
    async with asyncio.TaskGroup() as tg:
        for _ in range(n):
            tg.create_task(event.wait())
        await asyncio.sleep(0)  # every task steps once: started, parked on the event
        await asyncio.sleep(0)
        live = tracemalloc.get_traced_memory()[0] - base
        event.set()
    return live


async def _anyio_parked(n: int) -> int:
    event = anyio.Event()
    base = tracemalloc.get_traced_memory()[0]
    async with anyio.create_task_group() as tg:
        for _ in range(n):
            tg.start_soon(event.wait)
        await anyio.lowlevel.checkpoint()
        await anyio.lowlevel.checkpoint()
        live = tracemalloc.get_traced_memory()[0] - base
        event.set()
    return live


async def _timed(fn: Callable[[int], Awaitable[float]], n: int, reps: int) -> float:
    await fn(min(n, 1000))  # warm-up
    times = []
    for _ in range(reps):
        gc.collect()
        gc.freeze()
        gc.disable()
        try:
            times.append(await fn(n))
        finally:
            gc.enable()
            gc.unfreeze()
    return statistics.median(times) / n


async def _bytes(fn: Callable[[int], Awaitable[int]], n: int) -> float:
    gc.collect()
    gc.disable()
    tracemalloc.start()
    try:
        return await fn(n) / n
    finally:
        tracemalloc.stop()
        gc.enable()


async def measure(n: int, reps: int) -> dict[str, object]:
    return {
        "anyio": metadata.version("anyio"),
        "python": platform.python_version(),
        "n": n,
        "reps": reps,
        "asyncio_us": await _timed(_asyncio_run, n, reps) * 1e6,
        "anyio_us": await _timed(_anyio_run, n, reps) * 1e6,
        "asyncio_bytes": await _bytes(_asyncio_parked, n),
        "anyio_bytes": await _bytes(_anyio_parked, n),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="task_cost.py", description=__doc__)
    ap.add_argument("--n", type=int, default=20_000, help="tasks per measurement")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of the timing")
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    result = anyio.run(measure, args.n, args.reps, backend="asyncio")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
