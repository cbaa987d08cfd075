"""The plain anyio floor: the raw asyncio floor's program on anyio (the runtime we chose).

Same waves, stages and barrier as ``floor_asyncio.py``: one task per resource
in one task group, one ``anyio.Event`` per stage, no-op hooks, cut instants
from ``anyio.current_time()`` at the start of a cutting resource's
prepare_finish. Input: (depth, height, cuts) per resource.
"""

from __future__ import annotations

from collections.abc import Sequence

import anyio


async def _hook() -> None:
    """A hook that does nothing (awaited like a plugin's coroutine)."""


async def run(levels: Sequence[tuple[int, int, bool]]) -> tuple[float, list[float]]:
    """Run the waves; return (seconds, cut instants on the anyio clock)."""
    max_d = max(d for d, _, _ in levels)
    max_h = max(h for _, h, _ in levels)
    finish0 = max_d + 1
    main = finish0 + max_h + 1
    complete0 = main + 1

    def stages(d: int, h: int) -> tuple[int, int, int, int]:
        return (d, finish0 + h, main, complete0 + h)

    counts = [0] * (complete0 + max_h + 1)
    for d, h, _ in levels:
        for s in stages(d, h):
            counts[s] += 1
    events = [anyio.Event() for _ in counts]
    done = [0] * len(counts)
    cuts: list[float] = []

    def advance(s: int) -> None:
        s += 1  # open the next stage, skipping empty ones
        while s < len(counts):
            events[s].set()
            if counts[s]:
                return
            s += 1

    async def resource(d: int, h: int, cut: bool) -> None:
        for s in stages(d, h):
            await events[s].wait()
            if cut and s == finish0 + h:
                cuts.append(anyio.current_time())
            await _hook()
            done[s] += 1
            if done[s] == counts[s]:
                advance(s)

    start = anyio.current_time()
    async with anyio.create_task_group() as tg:
        for d, h, cut in levels:
            tg.start_soon(resource, d, h, cut)
        events[0].set()
    return anyio.current_time() - start, cuts


if __name__ == "__main__":
    demo = [(0, 2, False)] + [(1, 1, False)] * 100 + [(2, 0, True)] * 300
    seconds, cut_instants = anyio.run(run, demo)
    skew = max(cut_instants) - min(cut_instants)
    print(f"{len(demo)} resources in {seconds * 1e3:.2f} ms, cut skew {skew * 1e3:.3f} ms")
