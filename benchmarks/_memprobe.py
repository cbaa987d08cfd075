"""Peak RSS of one zero-latency run, measured in a fresh subprocess (large N).

``python -m benchmarks._memprobe CONTENDER N SEED`` builds the workload, reads
the resident set size, resets the peak (``clear_refs``), runs the contender once
and prints one JSON line with the growth of the peak RSS (``VmHWM``) over the
RSS before the run. The
workload's own memory is resident before the run, so the growth is what the
run itself needed. Page and arena granularity make this meaningful only for
large N; small N use tracemalloc in-process.
"""

from __future__ import annotations

import json
import os
import sys

import anyio

from benchmarks._measure import ZERO_LATENCY, fresh_heap
from benchmarks._workload import Workload, quiet_logging


def _status_kb(field: str) -> int:
    """A field of /proc/self/status in KB (VmRSS now, VmHWM peak of this program's memory).

    Not ``ru_maxrss``: on Linux it keeps the parent's RSS across fork and exec.
    """
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


async def probe(contender: str, n: int, seed: int) -> dict[str, float]:
    quiet_logging()
    w = await Workload.build(n, seed)
    fresh_heap()
    reset = _reset_peak()
    before = _status_kb("VmRSS")
    floor = before if reset else max(before, _status_kb("VmHWM"))
    await ZERO_LATENCY[contender](w)
    peak = _status_kb("VmHWM")
    return {"rss_before_kb": before, "peak_kb": peak, "kb_per_resource": max(0, peak - floor) / n}


if __name__ == "__main__":
    name, size, seed_arg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    print(json.dumps(anyio.run(probe, name, size, seed_arg, backend="asyncio")))
