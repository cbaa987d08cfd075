"""The raw asyncio floor: the least any Python engine can spend running Karbor's waves.

One task per resource walks the four waves (prepare_begin, prepare_finish, main,
complete). Waves are split into stages by graph level, so every Karbor edge
holds: prepare_begin by depth from the roots, prepare_finish and complete by
height above the leaves (children first), main in one stage. One event per
stage is the barrier: the last resource to finish a stage sets the next
stage's event. Hooks do nothing; a cutting resource records the loop time at
the start of its prepare_finish. Input: (depth, height, cuts) per resource.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence


async def _hook() -> None:
    """A hook that does nothing (awaited like a plugin's coroutine)."""


async def run(levels: Sequence[tuple[int, int, bool]]) -> tuple[float, list[float]]:
    """Run the waves; return (seconds, cut instants on the loop clock)."""
    loop = asyncio.get_running_loop()
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
    events = [asyncio.Event() for _ in counts]
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
                cuts.append(loop.time())
            await _hook()
            done[s] += 1
            if done[s] == counts[s]:
                advance(s)

    start = loop.time()
    async with asyncio.TaskGroup() as tg:
        for d, h, cut in levels:
            tg.create_task(resource(d, h, cut))
        events[0].set()
    return loop.time() - start, cuts


if __name__ == "__main__":
    demo = [(0, 2, False)] + [(1, 1, False)] * 100 + [(2, 0, True)] * 300
    seconds, cut_instants = asyncio.run(run(demo))
    skew = max(cut_instants) - min(cut_instants)
    print(f"{len(demo)} resources in {seconds * 1e3:.2f} ms, cut skew {skew * 1e3:.3f} ms")
