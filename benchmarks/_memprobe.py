"""Peak RSS of one zero-latency run, measured in a fresh subprocess (large N).

``python -m benchmarks._memprobe CONTENDER N SEED`` builds the workload, reads
the resident set size, runs the contender once and prints one JSON line with
the growth of the peak RSS (``ru_maxrss``) over the RSS before the run. The
workload's own memory is resident before the run, so the growth is what the
run itself needed. Page and arena granularity make this meaningful only for
large N; small N use tracemalloc in-process.
"""

from __future__ import annotations

import json
import os
import resource
import sys

import anyio

from benchmarks._measure import ZERO_LATENCY, fresh_heap
from benchmarks._workload import Workload, quiet_logging


def _rss_kb() -> int:
    with open("/proc/self/statm") as fh:
        pages = int(fh.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") // 1024


async def probe(contender: str, n: int, seed: int) -> dict[str, float]:
    quiet_logging()
    w = await Workload.build(n, seed)
    fresh_heap()
    before = _rss_kb()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    await ZERO_LATENCY[contender](w)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grown = max(0, peak - max(before, peak_before))
    return {"rss_before_kb": before, "peak_kb": peak, "kb_per_resource": grown / n}


if __name__ == "__main__":
    name, size, seed_arg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(anyio.run(probe, name, size, seed_arg, backend="asyncio")))
