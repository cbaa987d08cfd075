"""Abort latency: from the run limit firing to ``execute()`` returning, every hook in flight.

Every volume's ``on_main`` hangs (it waits for its cancellation); the run limit
fires while all of them run, so the engine must cancel every resource's scope,
let each end, record the outcome and return. Measured from the run's
``group_aborting`` event (the instant the limit fired) to the return.
"""

from __future__ import annotations

import contextlib
import statistics

import anyio

from benchmarks._measure import fresh_heap
from benchmarks._report import table
from benchmarks._workload import NOOP_TYPES, Workload, make_plan
from karbor_async import (
    BarrierPolicy,
    Engine,
    EventKind,
    HookContext,
    MemoryStore,
    ProtectionPlugin,
    RunError,
    Timeouts,
)
from karbor_simcloud import VOLUME, all_protectables

__all__ = ["abort_latency_section"]


class _HangingCopies:
    async def on_prepare_begin(self, ctx: HookContext) -> None:
        pass

    async def on_prepare_finish(self, ctx: HookContext) -> None:
        pass

    async def on_main(self, ctx: HookContext) -> None:
        if ctx.resource.type == VOLUME:
            await anyio.sleep_forever()

    async def on_complete(self, ctx: HookContext) -> None:
        pass


class HangingCopies(ProtectionPlugin):
    name = "bench-hanging-copies"
    types = NOOP_TYPES

    def get_protect_operation(self, resource_type: str) -> object:
        return _HangingCopies()


async def measure(n: int, seed: int, limit: float) -> tuple[float, int]:
    """(seconds from the limit firing to execute() returning, hooks in flight then)."""
    w = await Workload.build(n, seed)
    store = MemoryStore()
    plan = make_plan(w.roots, BarrierPolicy.CUT)
    plan = type(plan).from_json({**plan.to_json(), "timeouts": Timeouts(run=limit).to_json()})
    async with Engine(
        [HangingCopies()], all_protectables(w.cloud), store=store, discover=False
    ) as engine:
        run = await engine.build_protect(plan)
        fresh_heap()
        with contextlib.suppress(RunError):  # it fails by design: the run limit
            await engine.execute(run)
        returned = anyio.current_time()
        events = await store.read_events(run.run_id)
    fired = next(e.mono for e in events if e.kind is EventKind.GROUP_ABORTING)
    in_flight = sum(
        1
        for e in events
        if e.kind is EventKind.STARTED and e.hook is not None and e.hook.value == "on_main"
    ) - sum(
        1
        for e in events
        if e.kind is EventKind.FINISHED and e.hook is not None and e.hook.value == "on_main"
    )
    return returned - fired, in_flight


async def abort_latency_section(ns: tuple[int, ...], reps: int, seed: int) -> list[str]:
    rows = []
    for n in ns:
        # The limit leaves room for discovery-free start-up: every copy is in flight by then.
        limit = 1.0 + n / 2000
        samples = []
        flights = []
        for _ in range(reps):
            latency, in_flight = await measure(n, seed, limit)
            samples.append(latency)
            flights.append(in_flight)
        rows.append(
            [
                f"{n:,}",
                f"{min(flights):,}",
                f"{statistics.median(samples) * 1e3:.1f}",
                f"{min(samples) * 1e3:.1f}-{max(samples) * 1e3:.1f}",
                "50" if n == 2000 else "-",
            ]
        )
    return [
        "## Abort latency: run limit to execute() returned",
        "",
        "Every volume's `on_main` is in flight when the run limit fires; the engine cancels "
        "every resource's scope, records the outcome and returns (median of "
        f"{reps}, from the `group_aborting` event to the return).",
        "",
        *table(
            ["N resources", "copies in flight", "median ms", "range ms", "target ms"],
            rows,
        ),
        "",
    ]
