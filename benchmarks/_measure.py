"""One measured run of each contender, and the statistics the report needs.

Every run starts from a collected, frozen heap (``gc.collect(); gc.freeze()``)
so that the generated cloud and earlier runs do not weigh on the collector's
full scans during the run; the same for every contender. The collector
treatment during the run (on, or disabled around it) is a parameter
(:mod:`benchmarks._gc`); each sample records it and the collections seen.
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs

import karbor_async
from benchmarks import floor_anyio, floor_asyncio, floor_realistic
from benchmarks._gc import GcWatch, Treatment, treated
from benchmarks._workload import NoopProtection, Workload, make_plan
from karbor_async import (
    BarrierPolicy,
    Engine,
    Hook,
    MemoryBank,
    MemoryStore,
    OperationKind,
    SqliteStore,
)
from karbor_async.events import Event, Progress
from karbor_async.store import Store
from karbor_simcloud import (
    VOLUME,
    LatencyProfile,
    SimCloud,
    all_protectables,
    all_protections,
)
from karbor_simcloud.direct import DirectGraph, DirectRunner

__all__ = [
    "REALISTIC_COPY_SLOTS",
    "REALISTIC_VOLUME_SIZE",
    "realistic_cloud",
    "ZERO_LATENCY",
    "KarborResult",
    "MemProbe",
    "RealisticSample",
    "SQLITE_CONTENDER",
    "TARGET_CONTENDERS",
    "Sample",
    "analyse",
    "engine_once",
    "events_bytes",
    "fresh_heap",
    "rss_probe",
    "has_subscribe",
    "measure",
    "peak_memory",
    "pct",
    "realistic_engine",
    "realistic_floor",
    "realistic_one_at_a_time",
    "run_karbor",
    "spread",
    "sqlite_store_class",
]

REALISTIC_VOLUME_SIZE = 1024
REALISTIC_COPY_SLOTS = 64


# -- statistics ----------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of repeated measurements."""
    if not values:
        return (math.nan, math.nan, math.nan)
    return (statistics.median(values), min(values), max(values))


# -- zero-latency runs (overhead and cut dispatch skew) ------------------------------------


@attrs.frozen
class Sample:
    """One zero-latency run: total seconds, cut dispatch skew, engine build time."""

    contender: str
    n: int
    seconds: float
    skew: float | None
    build_seconds: float = 0.0
    treatment: Treatment = Treatment.ON
    collections: int = 0
    """Collections (any generation) during the measured call (build and run)."""
    full_collections: int = 0
    gc_seconds: float = 0.0
    """Time spent inside those collections."""
    run_collections: int | None = None
    """Engines: the collections during ``execute`` alone (the engine's ``quiet_gc`` covers
    its run, not its discovery); None for contenders with no discovery."""


def fresh_heap() -> None:
    gc.collect()
    gc.freeze()


async def _timed(fn: Callable[[], Awaitable[Sample]], treatment: Treatment) -> Sample:
    with treated(treatment) as watch:
        sample = await fn()
    return attrs.evolve(
        sample,
        treatment=treatment,
        collections=watch.total,
        full_collections=watch.full,
        gc_seconds=watch.seconds,
    )


def _skew(cuts: Sequence[float]) -> float | None:
    return max(cuts) - min(cuts) if cuts else None


async def floor_asyncio_run(w: Workload) -> Sample:
    seconds, cuts = await floor_asyncio.run(w.levels)
    return Sample("floor-asyncio", w.n, seconds, _skew(cuts))


async def floor_anyio_run(w: Workload) -> Sample:
    seconds, cuts = await floor_anyio.run(w.levels)
    return Sample("floor-anyio", w.n, seconds, _skew(cuts))


@attrs.frozen
class EngineRun:
    """One engine run over a workload: its sample, and the store it recorded into."""

    sample: Sample
    store: Store
    run_id: str


async def engine_once(
    w: Workload, barrier: BarrierPolicy, events: bool, store: Store | None = None
) -> EngineRun:
    """``build_protect`` then ``execute``, timed apart, default settings but the sink.

    The engine is entered before the clock starts: the timings are the run's.
    """
    label = f"engine-{barrier.value}" + ("+events" if events else "")
    if store is not None:
        label += "/sqlite"
    store = store if store is not None else MemoryStore()
    engine = Engine(
        [NoopProtection()],
        all_protectables(w.cloud),
        discover=False,
        record_events=events,
        store=store,
        bank=MemoryBank(),
    )
    async with engine:
        t0 = time.perf_counter()
        built = await engine.build_protect(make_plan(w.roots, barrier))
        watch = GcWatch()
        watch.start()
        t1 = time.perf_counter()
        try:
            outcome = await engine.execute(built)
            t2 = time.perf_counter()
        finally:
            watch.stop()
    sample = Sample(
        label, w.n, t2 - t1, outcome.skew, build_seconds=t1 - t0, run_collections=watch.total
    )
    return EngineRun(sample, store, outcome.run_id)


def engine_runner(barrier: BarrierPolicy, events: bool) -> Callable[[Workload], Awaitable[Sample]]:
    async def run(w: Workload) -> Sample:
        return (await engine_once(w, barrier, events)).sample

    return run


async def engine_sqlite_run(w: Workload) -> Sample:
    """Barrier cut, events recorded in an SQLite store on a temporary file (opened untimed)."""
    with tempfile.TemporaryDirectory() as tmp:
        async with SqliteStore.open(Path(tmp) / "bench.db") as store:
            return (await engine_once(w, BarrierPolicy.CUT, True, store)).sample


async def one_at_a_time_run(w: Workload) -> Sample:
    runner = DirectRunner([NoopProtection()], MemoryBank(), record_starts=True)
    t0 = time.perf_counter()
    await runner.run_one_at_a_time(OperationKind.PROTECT, w.graph)
    seconds = time.perf_counter() - t0
    cuts = [
        t
        for (key, hook), t in runner.starts.items()
        if hook is Hook.PREPARE_FINISH and key[0] == VOLUME
    ]
    return Sample("one-at-a-time", w.n, seconds, _skew(cuts))


SQLITE_CONTENDER = "engine-cut+events/sqlite"

ZERO_LATENCY: dict[str, Callable[[Workload], Awaitable[Sample]]] = {
    "floor-asyncio": floor_asyncio_run,
    "floor-anyio": floor_anyio_run,
    "engine-none": engine_runner(BarrierPolicy.NONE, False),
    "engine-main": engine_runner(BarrierPolicy.MAIN, False),
    "engine-cut": engine_runner(BarrierPolicy.CUT, False),
    "engine-cut+events": engine_runner(BarrierPolicy.CUT, True),
    "one-at-a-time": one_at_a_time_run,
    SQLITE_CONTENDER: engine_sqlite_run,
}

TARGET_CONTENDERS = ("floor-asyncio", "floor-anyio", "engine-cut", "engine-cut+events")
"""What issue 19's targets compare (the second collector treatment runs only these)."""


async def measure(contender: str, w: Workload, treatment: Treatment = Treatment.ON) -> Sample:
    fn = ZERO_LATENCY[contender]
    return await _timed(lambda: fn(w), treatment)


async def peak_memory(contender: str, w: Workload) -> float:
    """Peak bytes allocated per resource during one run (tracemalloc; not timed)."""
    fn = ZERO_LATENCY[contender]
    fresh_heap()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        await fn(w)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        gc.unfreeze()
    return (peak - base) / w.n


_OWNED = (Event, Progress, dict, list, tuple, float, int)


def events_bytes(events: Sequence[Event]) -> int:
    """Bytes held by stored events: each ``Event`` and what only events hold.

    A walk of ``gc.get_referents`` from every event, counting each object once
    (``sys.getsizeof``) if it is an event, a progress record, a float, an int
    (beyond the interpreter's cached small ints), or a dict, list or tuple (whose
    items are walked too): the resource key tuple is counted, though the engine
    may share it with the graph. Anything else (strings: run ids, resource ids;
    enums, types, ``None``, plugin objects) is taken as shared and not counted.
    An estimate, so the report gives it beside the measured RSS difference
    between recording events and not.
    """
    seen: set[int] = set()
    total = 0
    stack: list[object] = list(events)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or not isinstance(obj, _OWNED) or isinstance(obj, bool):
            continue
        if isinstance(obj, int) and -5 <= obj <= 256:
            continue
        seen.add(id(obj))
        total += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return total + sys.getsizeof(list(events))


@attrs.frozen
class MemProbe:
    """Peak RSS of one run in a fresh subprocess (``benchmarks/_memprobe.py``)."""

    kb_per_resource: float
    """Growth of the peak RSS over the RSS before the run, per resource."""
    peak_kb: float
    """The subprocess's whole peak RSS (interpreter and workload included)."""
    events: int = 0
    """Lifecycle events the run stored (engine contenders that record them)."""
    events_kb_per_resource: float = 0.0
    """:func:`events_bytes` of those events, per resource."""


@attrs.define
class Overhead:
    """The zero-latency measurements of one report, by (N, contender, treatment)."""

    samples: dict[tuple[int, str, Treatment], list[Sample]] = attrs.field(factory=dict)
    """In repetition order: the i-th samples of two contenders ran in the same repetition."""
    memory: dict[tuple[int, str], float] = attrs.field(factory=dict)
    """tracemalloc peak bytes per resource (collector on)."""
    rss: dict[tuple[int, str, Treatment], MemProbe | None] = attrs.field(factory=dict)

    def get(self, n: int, contender: str, treatment: Treatment = Treatment.ON) -> list[Sample]:
        return self.samples.get((n, contender, treatment), [])

    def ratio(
        self,
        n: int,
        contender: str,
        floor: str,
        treatment: Treatment = Treatment.ON,
        *,
        with_build: bool = False,
    ) -> float:
        """Median over repetitions of contender's seconds / floor's seconds (same repetition).

        ``with_build``: the contender's discovery (``build_protect``) counts too.
        """
        mine, base = self.get(n, contender, treatment), self.get(n, floor, treatment)
        ratios = [
            (a.seconds + (a.build_seconds if with_build else 0.0)) / b.seconds
            for a, b in zip(mine, base, strict=False)
            if b.seconds
        ]
        return statistics.median(ratios) if ratios else math.nan

    def skew_ratio(
        self, n: int, contender: str, floor: str, treatment: Treatment = Treatment.ON
    ) -> float:
        """Median over repetitions of the contender's cut skew / the floor's (same repetition)."""
        mine, base = self.get(n, contender, treatment), self.get(n, floor, treatment)
        ratios = [
            a.skew / b.skew
            for a, b in zip(mine, base, strict=False)
            if a.skew is not None and b.skew
        ]
        return statistics.median(ratios) if ratios else math.nan


# -- realistic latencies: instants from the simulated storage -------------------------------


@attrs.frozen
class RealisticSample:
    """One run with latencies; every instant comes from the simulated cloud's own records."""

    contender: str
    n: int
    seconds: float
    skew: float
    """max - min of SnapshotRecord.taken_at (the storage's instant of each snapshot)."""
    jitter: float
    """max - min of the storage's sampled request-to-instant delays in this run."""
    windows: tuple[float, ...]
    """Per server: SimServer.thawed_at - frozen_at."""
    share_thaw: tuple[float, ...] = ()
    """Per server: its thaw starting minus its last volume snapshot call returning."""
    share_cut: tuple[float, ...] = ()
    """Per server: its first volume snapshot call starting minus the moment it could start."""
    treatment: Treatment = Treatment.ON


def realistic_cloud(n: int, seed: int) -> SimCloud:
    return SimCloud.generate(
        n,
        seed,
        latency=LatencyProfile.realistic(),
        max_concurrent_copies=REALISTIC_COPY_SLOTS,
        volume_size=REALISTIC_VOLUME_SIZE,
        image_size=REALISTIC_VOLUME_SIZE,
    )


def analyse(
    contender: str, cloud: SimCloud, seconds: float, barrier: BarrierPolicy
) -> RealisticSample:
    snaps = {s.volume_id: s for s in cloud.storage.snapshots.values()}
    taken = [s.taken_at for s in snaps.values()]
    delays = [s.delay for s in snaps.values()]
    windows: list[float] = []
    share_thaw: list[float] = []
    share_cut: list[float] = []
    frozen = [s.frozen_at for s in cloud.servers.values() if s.frozen_at is not None]
    group_release = max(frozen) if frozen else 0.0
    for server in cloud.servers.values():
        if server.frozen_at is None or server.thawed_at is None:
            continue
        windows.append(server.thawed_at - server.frozen_at)
        mine = [snaps[v] for v in server.volume_ids if v in snaps]
        # Only the cuts this freeze waited for (a baseline may cut a shared volume earlier,
        # under another server).
        returned = [
            s.returned_at
            for s in mine
            if s.returned_at is not None and s.requested_at >= server.frozen_at
        ]
        if returned and server.thaw_started_at is not None:
            share_thaw.append(server.thaw_started_at - max(returned))
        waits = []
        for snap in mine:
            if barrier is BarrierPolicy.CUT:
                release = group_release
            else:
                parents = cloud.volume(snap.volume_id).attached_to
                release = max((cloud.server(p).frozen_at or 0.0) for p in parents)
            waits.append(snap.requested_at - release)
        if waits:
            share_cut.append(min(waits))
    return RealisticSample(
        contender,
        cloud.stats()["total"],
        seconds,
        (max(taken) - min(taken)) if taken else math.nan,
        (max(delays) - min(delays)) if delays else math.nan,
        tuple(windows),
        tuple(share_thaw),
        tuple(share_cut),
    )


async def realistic_engine(
    n: int, seed: int, barrier: BarrierPolicy, treatment: Treatment = Treatment.ON
) -> RealisticSample:
    cloud = realistic_cloud(n, seed)
    engine = Engine(
        all_protections(cloud), all_protectables(cloud), discover=False, store=MemoryStore()
    )
    plan = make_plan(
        cloud.project_resources(),
        barrier,
        parameters={"OS::Cinder::Volume": {"chunk_size": REALISTIC_VOLUME_SIZE}},
    )
    async with engine:  # entered (and left) outside the timed protect
        with treated(treatment):
            t0 = time.perf_counter()
            await engine.protect(plan)
            seconds = time.perf_counter() - t0
    sample = analyse(f"engine-{barrier.value}", cloud, seconds, barrier)
    return attrs.evolve(sample, treatment=treatment)


async def realistic_floor(
    n: int, seed: int, treatment: Treatment = Treatment.ON
) -> RealisticSample:
    """The same cloud's quiesce, cut and thaw calls in Karbor's order, no engine."""
    cloud = realistic_cloud(n, seed)
    with treated(treatment):
        seconds = await floor_realistic.run(cloud)
    sample = analyse("floor-realistic", cloud, seconds, BarrierPolicy.CUT)
    return attrs.evolve(sample, treatment=treatment)


async def realistic_one_at_a_time(n: int, seed: int) -> RealisticSample:
    cloud = realistic_cloud(n, seed)
    graph = await DirectGraph.discover(cloud.project_resources(), all_protectables(cloud))
    runner = DirectRunner(all_protections(cloud), MemoryBank())
    t0 = time.perf_counter()
    await runner.run_one_at_a_time(OperationKind.PROTECT, graph)
    return analyse("one-at-a-time", cloud, time.perf_counter() - t0, BarrierPolicy.NONE)


# -- Karbor's engine (TaskFlow, in a subprocess) --------------------------------------------


@attrs.frozen
class KarborResult:
    n: int
    finished: bool
    timeout: float
    build_s: float = math.nan
    run_s: float = math.nan
    total_s: float = math.nan
    maxrss_mb: float = math.nan
    skew: float | None = None
    windows: tuple[float, ...] = ()
    error: str = ""


def _realistic_delays(w: Workload) -> dict[str, list[float]]:
    """Per-resource latencies drawn from the realistic profile (same distributions)."""
    profile = LatencyProfile.realistic()
    rng = random.Random(w.seed + 99)
    n = len(w.graph.resources)
    return {
        "quiesce": [profile.quiesce.sample(rng) for _ in range(n)],
        "thaw": [profile.thaw.sample(rng) for _ in range(n)],
        "snapshot": [profile.snapshot.sample(rng) for _ in range(n)],
        "snapshot_return": [profile.snapshot_return.sample(rng) for _ in range(n)],
        "copy": [profile.copy_chunk.sample(rng) for _ in range(n)],
    }


_ROOT = str(Path(__file__).resolve().parent.parent)


async def run_karbor(w: Workload, limit: float, *, realistic: bool = False) -> KarborResult:
    """Run Karbor's flow for ``w`` in a subprocess, killed after ``limit`` seconds."""
    index = {r.key: i for i, r in enumerate(w.graph.resources)}
    spec: dict[str, Any] = {
        "resources": [list(r.key) for r in w.graph.resources],
        "edges": [[index[p], index[c]] for p, c in w.graph.edges()],
    }
    if realistic:
        spec["delays"] = _realistic_delays(w)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "graph.json"
        await anyio.Path(path).write_text(json.dumps(spec))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "benchmarks.karbor_taskflow", str(path)]
        try:
            with anyio.fail_after(limit):
                proc = await anyio.run_process(cmd, env=env, check=False)
        except TimeoutError:
            return KarborResult(w.n, False, limit, error=f"did not finish within {limit:.0f} s")
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:]
        return KarborResult(w.n, False, limit, error=f"exit {proc.returncode}: {' '.join(tail)}")
    data = json.loads(proc.stdout)
    return KarborResult(
        w.n,
        True,
        limit,
        build_s=data["build_s"],
        run_s=data["run_s"],
        total_s=data["total_s"],
        maxrss_mb=data["maxrss_kb"] / 1024,
        skew=_skew(data["cuts"]),
        windows=tuple(data["windows"]),
    )


async def rss_probe(
    contender: str, n: int, seed: int, limit: float, treatment: Treatment = Treatment.ON
) -> MemProbe | None:
    """Peak RSS growth per resource (KB) of one run in a fresh subprocess; None on failure."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, env.get("PYTHONPATH")]))
    cmd = [
        sys.executable,
        "-m",
        "benchmarks._memprobe",
        contender,
        str(n),
        str(seed),
        treatment.value,
    ]
    try:
        with anyio.fail_after(limit):
            proc = await anyio.run_process(cmd, env=env, check=False)
    except TimeoutError:
        return None
    if proc.returncode != 0:
        return None
    data = json.loads(proc.stdout)
    return MemProbe(
        kb_per_resource=float(data["kb_per_resource"]),
        peak_kb=float(data["peak_kb"]),
        events=int(data.get("events", 0)),
        events_kb_per_resource=float(data.get("events_kb_per_resource", 0.0)),
    )


# -- features that arrive later (skipped with a note until they exist) -----------------------


def sqlite_store_class() -> Any | None:
    return getattr(karbor_async, "SqliteStore", None)


def has_subscribe() -> bool:
    return hasattr(Engine, "subscribe")
