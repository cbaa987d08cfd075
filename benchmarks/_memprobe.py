"""Peak RSS of one zero-latency run, measured in a fresh subprocess (large N).

``python -m benchmarks._memprobe CONTENDER N SEED [on|off]`` builds the
workload, reads the resident set size, resets the peak (``clear_refs``), runs
the contender once under the collector treatment (``benchmarks/_gc.py``; default
``on``) and prints one JSON line with the growth of the peak RSS (``VmHWM``)
over the RSS before the run. The workload's own memory is resident before the
run, so the growth is what the run itself needed. For an engine contender that
records events, the line also has how many the store holds and their size
(``events_bytes``), measured after the peak was read. Page and arena
granularity make this meaningful only for large N; small N use tracemalloc
in-process.
"""

from __future__ import annotations

import json
import os
import sys

import anyio

from benchmarks._gc import Treatment, treated
from benchmarks._measure import ZERO_LATENCY, engine_once, events_bytes
from benchmarks._workload import Workload, quiet_logging
from karbor_async import BarrierPolicy


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


async def probe(contender: str, n: int, seed: int, treatment: Treatment) -> dict[str, float]:
    quiet_logging()
    w = await Workload.build(n, seed)
    out: dict[str, float] = {}
    with treated(treatment):
        reset = _reset_peak()
        before = _status_kb("VmRSS")
        floor = before if reset else max(before, _status_kb("VmHWM"))
        if contender == "engine-cut+events":  # the same run, keeping its store to weigh
            run = await engine_once(w, BarrierPolicy.CUT, True)
        else:
            await ZERO_LATENCY[contender](w)
            run = None
        peak = _status_kb("VmHWM")
    if run is not None:
        events = await run.store.read_events(run.run_id)
        out["events"] = len(events)
        out["events_kb_per_resource"] = events_bytes(events) / 1024 / n
    return {
        "rss_before_kb": before,
        "peak_kb": peak,
        "kb_per_resource": max(0, peak - floor) / n,
        **out,
    }


if __name__ == "__main__":
    name, size, seed_arg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    how = Treatment(sys.argv[4]) if len(sys.argv) > 4 else Treatment.ON
    print(json.dumps(anyio.run(probe, name, size, seed_arg, how, backend="asyncio")))
