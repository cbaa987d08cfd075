"""``python -m benchmarks [--quick]``: every comparison, side by side, one command.

Writes ``RESULTS.md`` and PNG plots (``--out``; ``benchmarks/`` for a full run,
``benchmarks/quick/`` for ``--quick``, the CI smoke run); the issue-19 targets
table comes first. The zero-latency and realistic sections run on the SIMULATED
cloud of ``karbor_simcloud``. Contenders of one comparison run interleaved in
one process, repetition after repetition, so that the noise of a shared machine
hits them alike; ratios are medians of per-repetition ratios. Each comparison
runs under each collector treatment of ``--treatment`` (``benchmarks/_gc.py``).
A full run with the default sizes and output also writes the README's headline
block (``benchmarks/headline.py``); ``make bench-million`` is apart
(``benchmarks/million.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import attrs
from anyio.abc import TaskStatus

from benchmarks import headline
from benchmarks._gc import Treatment, parse_treatments
from benchmarks._issue19 import Issue19, load_million
from benchmarks._measure import (
    REALISTIC_COPY_SLOTS,
    REALISTIC_VOLUME_SIZE,
    SQLITE_CONTENDER,
    TARGET_CONTENDERS,
    ZERO_LATENCY,
    KarborResult,
    Overhead,
    RealisticSample,
    analyse,
    fresh_heap,
    has_subscribe,
    measure,
    pct,
    peak_memory,
    realistic_cloud,
    realistic_engine,
    realistic_floor,
    realistic_one_at_a_time,
    rss_probe,
    run_karbor,
    spread,
    sqlite_store_class,
)
from benchmarks._report import cpu_model, environment, fmt_ms, fmt_range_ms, plot_lines, table
from benchmarks._taskcost import task_cost_section
from benchmarks._workload import NoopProtection, Workload, make_plan, quiet_logging
from benchmarks.abort_latency import abort_latency_section
from benchmarks.consistency import consistency_section, run_consistency
from benchmarks.fs_protect import fs_section
from benchmarks.pg_store import pg_store_section
from benchmarks.postgres import postgres_section
from benchmarks.sqlite_plugin import sqlite_plugin_section
from karbor_async import BarrierPolicy, Engine, Plan
from karbor_simcloud import VOLUME, LatencyProfile, all_protectables, all_protections

HERE = Path(__file__).resolve().parent
SEED = 20161129  # the day Karbor's authors argued for the protocol


@attrs.frozen
class Config:
    quick: bool
    overhead_ns: tuple[int, ...]
    reps: int
    big_reps: int
    memory_ns: tuple[int, ...]
    rss_ns: tuple[int, ...]
    realistic_ns: tuple[int, ...]
    realistic_reps: int
    baseline_realistic_max: int
    karbor_ns: tuple[int, ...]
    karbor_realistic_ns: tuple[int, ...]
    karbor_timeout: float
    fanout_ns: tuple[int, ...]
    abort_ns: tuple[int, ...]
    out: Path
    sqlite_mbs: tuple[int, ...] = (64, 256)
    sqlite_reps: int = 3
    consistency_protects: int = 50
    """Protects of the live two-shard application per barrier and quiesce setting."""
    treatments: tuple[Treatment, ...] = (Treatment.ON, Treatment.OFF)
    """Collector treatments every issue-19 comparison runs under (``--treatment``)."""
    write_readme: bool = False
    """Write the README's headline block (a full run, default sizes and output)."""
    million_json: Path = HERE / "million.json"
    """The last ``make bench-million`` results, for the targets table."""

    @property
    def target_n(self) -> int | None:
        """Where the SQLite contender runs: 100,000, or the largest N below it."""
        ns = [n for n in self.overhead_ns if n <= 100_000]
        return max(ns) if ns else None


def parse(argv: list[str]) -> Config:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run (CI; under 2 minutes)")
    ap.add_argument("--max-n", type=int, default=None, help="skip graphs larger than this")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per measurement")
    ap.add_argument("--karbor-timeout", type=float, default=None, help="seconds per Karbor run")
    ap.add_argument("--out", type=Path, default=None, help="where RESULTS.md and plots go")
    ap.add_argument(
        "--treatment",
        choices=["on", "off", "both"],
        default="both",
        help="collector treatment(s): on (frozen heap, collector enabled), off (disabled "
        "around each run), both (default)",
    )
    ap.add_argument(
        "--no-readme",
        action="store_true",
        help="do not write README.md's headline block (a full run with the default sizes "
        "and output writes it)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        cfg = Config(
            quick=True,
            overhead_ns=(10, 100, 1000),
            reps=3,
            big_reps=3,
            memory_ns=(100, 1000),
            rss_ns=(1000,),
            realistic_ns=(10, 100),
            realistic_reps=2,
            baseline_realistic_max=100,
            karbor_ns=(10,),
            karbor_realistic_ns=(10,),
            karbor_timeout=30.0,
            fanout_ns=(100,),
            abort_ns=(200,),
            out=HERE / "quick",
            sqlite_mbs=(4, 16),
            sqlite_reps=2,
            consistency_protects=5,
        )
    else:
        cfg = Config(
            quick=False,
            overhead_ns=(10, 100, 1000, 10_000, 100_000),
            reps=5,
            big_reps=3,
            memory_ns=(100, 1000, 10_000),
            rss_ns=(10_000, 100_000),
            realistic_ns=(10, 100, 1000, 10_000),
            realistic_reps=5,
            baseline_realistic_max=1000,
            karbor_ns=(10, 100, 1000, 10_000),
            karbor_realistic_ns=(10, 100),
            karbor_timeout=120.0,
            fanout_ns=(1000,),
            abort_ns=(2000, 10_000),
            out=HERE,
        )
    changes: dict[str, Any] = {}
    if args.max_n is not None:
        cap = args.max_n
        for name in (
            "overhead_ns",
            "memory_ns",
            "rss_ns",
            "realistic_ns",
            "karbor_ns",
            "karbor_realistic_ns",
            "fanout_ns",
            "abort_ns",
        ):
            changes[name] = tuple(n for n in getattr(cfg, name) if n <= cap)
    if args.reps is not None:
        changes.update(reps=args.reps, big_reps=min(args.reps, cfg.big_reps))
        changes.update(realistic_reps=args.reps)
    if args.karbor_timeout is not None:
        changes["karbor_timeout"] = args.karbor_timeout
    if args.out is not None:
        changes["out"] = args.out
    changes["treatments"] = parse_treatments(args.treatment)
    changes["write_readme"] = (
        not (cfg.quick or args.no_readme or args.max_n is not None or args.out is not None)
        and args.treatment == "both"
    )
    return attrs.evolve(cfg, **changes)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- 1, 2: overhead and cut dispatch skew --------------------------------------------------


def contenders(cfg: Config, n: int, treatment: Treatment) -> list[str]:
    """Who runs at ``n`` under ``treatment``: everyone with the collector on below 100,000,
    issue 19's contenders with it off and from 100,000 up (to keep a full run near 40
    minutes); the SQLite contender at the discovery-plus-run target's N."""
    if treatment is Treatment.ON and n < 100_000:
        names = [name for name in ZERO_LATENCY if name != SQLITE_CONTENDER]
    else:
        names = list(TARGET_CONTENDERS)
    if n == cfg.target_n:
        names.append(SQLITE_CONTENDER)
    return names


def rss_contenders(cfg: Config, n: int, treatment: Treatment) -> list[str]:
    """Whose peak RSS is probed: issue 19's contenders; with the collector on in a full run
    below 100,000, everyone but the SQLite contender (its pages are not the engine's)."""
    if treatment is Treatment.ON and not cfg.quick and n < 100_000:
        return [name for name in ZERO_LATENCY if name != SQLITE_CONTENDER]
    return list(TARGET_CONTENDERS)


async def run_overhead(cfg: Config, workloads: dict[int, Workload]) -> Overhead:
    result = Overhead()
    for n in cfg.overhead_ns:
        w = workloads[n]
        reps = cfg.big_reps if n >= 100_000 else cfg.reps
        lineup = {t: contenders(cfg, n, t) for t in cfg.treatments}
        total = sum(len(names) for names in lineup.values())
        log(f"overhead N={n}: {reps} repetitions of {total} contender runs")
        if n < 100_000:
            for name in lineup[cfg.treatments[0]]:  # warm-up (imports, caches), not recorded
                await measure(name, w, cfg.treatments[0])
        for rep in range(reps):
            for t, names in lineup.items():  # treatments interleaved, repetition by repetition
                order = names[rep % len(names) :] + names[: rep % len(names)]  # rotated
                for name in order:
                    sample = await measure(name, w, t)
                    result.samples.setdefault((n, name, t), []).append(sample)
        if n in cfg.memory_ns:
            for name in lineup.get(Treatment.ON, []):
                if name != SQLITE_CONTENDER:
                    result.memory[(n, name)] = await peak_memory(name, w)
        if n in cfg.rss_ns:
            for t in cfg.treatments:
                log(f"peak RSS N={n} ({t.label}): one subprocess per contender")
                for name in rss_contenders(cfg, n, t):
                    result.rss[(n, name, t)] = await rss_probe(name, n, SEED, 900.0, t)
    return result


def overhead_section(cfg: Config, res: Overhead) -> list[str]:
    lines = [
        "## 1-2. Engine overhead and cut dispatch skew (no-op hooks, in-memory store)",
        "",
        "Four no-op hooks per resource. `engine-*` run `Engine.execute` with a null event "
        "sink (`record_events=False`) and the `karbor_async` logger at WARNING; "
        "`engine-cut+events` records every lifecycle event in the memory store (the default "
        f"sink); `{SQLITE_CONTENDER}` records them in an SQLite store on a temporary file "
        "(at the largest N up to 100,000 only). Every engine runs with its default settings "
        "otherwise (`quiet_gc` included). `discovery` is `Engine.build_protect` (graph "
        "expansion through the protectables, validation), timed apart and not in `total`. "
        "`collector`: the treatment of the run (`benchmarks/_gc.py`; *collector on*: "
        f"{Treatment.ON.description}; *collector off*: {Treatment.OFF.description}); with it "
        "off, and from 100,000 up, only issue 19's contenders run. `x anyio` / `x asyncio`: "
        "median over repetitions of the ratio to the floor measured in the same repetition "
        "under the same treatment. Cut skew: latest minus "
        "earliest cut instant over the volumes; instants come from the engine's own cut "
        "stamps (`ResourceOutcome.cut_at`, engine clock) for `engine-*`, from "
        "`loop.time()`/`anyio.current_time()` at the start of the floors' prepare_finish, and "
        "from the call instant for `one-at-a-time`. Peak memory: tracemalloc peak during one "
        "separate run, per resource (collector on; N <= 10,000: tracemalloc slows large runs "
        "tenfold); peak RSS: growth of `VmHWM` over the RSS before the run, one run in a "
        "fresh subprocess (`benchmarks/_memprobe.py`), per resource (large N only: pages and "
        "arenas make it coarse). `collections`: the collector's collections during the "
        "measured call (discovery included), median, with the full ones and their time.",
        "",
    ]
    headers = [
        "N",
        "collector",
        "contender",
        "total ms median [min-max]",
        "us/hook",
        "x anyio",
        "x asyncio",
        "cut skew ms median [min-max]",
        "peak KB/resource",
        "peak RSS KB/resource",
        "discovery ms",
        "collections (full) / gc ms",
    ]
    rows = []
    for n in cfg.overhead_ns:
        for t in cfg.treatments:
            for name in contenders(cfg, n, t):
                samples = res.get(n, name, t)
                if not samples:
                    continue
                secs = [s.seconds for s in samples]
                skews = [s.skew for s in samples if s.skew is not None]
                mem = res.memory.get((n, name)) if t is Treatment.ON else None
                rss = res.rss.get((n, name, t))
                build = [s.build_seconds for s in samples if s.build_seconds]
                gcs = (
                    f"{statistics.median([s.collections for s in samples]):.0f} "
                    f"({statistics.median([s.full_collections for s in samples]):.0f}) / "
                    f"{statistics.median([s.gc_seconds for s in samples]) * 1e3:.0f}"
                )
                rows.append(
                    [
                        f"{n:,}",
                        t.value,
                        name,
                        fmt_range_ms(spread(secs)),
                        f"{statistics.median(secs) / (4 * n) * 1e6:.2f}",
                        f"{res.ratio(n, name, 'floor-anyio', t):.2f}",
                        f"{res.ratio(n, name, 'floor-asyncio', t):.2f}",
                        fmt_range_ms(spread(skews), 3),
                        f"{mem / 1024:.2f}" if mem is not None else "-",
                        f"{rss.kb_per_resource:.2f}" if rss is not None else "-",
                        fmt_ms(statistics.median(build), 1) if build else "-",
                        gcs,
                    ]
                )
    return [*lines, *table(headers, rows), ""]


# -- Karbor's engine -------------------------------------------------------------------------


async def run_karbor_all(
    cfg: Config, workloads: dict[int, Workload], ns: tuple[int, ...], realistic: bool
) -> list[KarborResult]:
    out: list[KarborResult] = []
    gave_up: int | None = None
    for n in ns:
        if gave_up is not None:
            out.append(
                KarborResult(
                    n, False, cfg.karbor_timeout, error=f"not run: N={gave_up:,} did not finish"
                )
            )
            continue
        log(f"Karbor/TaskFlow N={n} ({'realistic' if realistic else 'zero'} latency)")
        w = workloads.get(n) or await Workload.build(n, SEED)
        result = await run_karbor(w, cfg.karbor_timeout, realistic=realistic)
        out.append(result)
        if not result.finished:
            gave_up = n
    return out


def karbor_section(cfg: Config, karbor: list[KarborResult], res: Overhead) -> list[str]:
    lines = [
        "## Karbor's engine: its linking rules on TaskFlow "
        "(parallel engine, greenthreaded executor)",
        "",
        "`benchmarks/karbor_taskflow.py` in a subprocess (eventlet monkey-patches it), the same "
        f"graphs and no-op hooks, killed after {cfg.karbor_timeout:.0f} s. `build` is making "
        "the `graph_flow` and `engines.load`; `run` is `engine.run()`. Cut skew from "
        "`time.monotonic()` at the start of each volume's prepare_finish task (Karbor's own "
        "dispatch, no barrier). Peak RSS of the whole subprocess (interpreter included). "
        "`speed-up` = Karbor total / this engine's `build_protect + execute` (barrier cut, "
        "null sink), medians.",
        "",
    ]
    headers = [
        "N",
        "finished",
        "build s",
        "run s",
        "total s",
        "cut skew ms",
        "peak RSS MB",
        "engine-cut total s",
        "speed-up",
        "engine-cut skew ms",
    ]
    rows = []
    for k in karbor:
        eng = res.get(k.n, "engine-cut")
        eng_total = (
            statistics.median([s.seconds + s.build_seconds for s in eng]) if eng else math.nan
        )
        eng_skew = (
            statistics.median([s.skew for s in eng if s.skew is not None]) if eng else math.nan
        )
        if not k.finished:
            rows.append(
                [
                    f"{k.n:,}",
                    f"no: {k.error}",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    f"{eng_total:.3f}",
                    "-",
                    fmt_ms(eng_skew, 3),
                ]
            )
            continue
        rows.append(
            [
                f"{k.n:,}",
                "yes",
                f"{k.build_s:.3f}",
                f"{k.run_s:.3f}",
                f"{k.total_s:.3f}",
                fmt_ms(k.skew, 3),
                f"{k.maxrss_mb:.0f}",
                f"{eng_total:.3f}",
                f"{k.total_s / eng_total:.0f}x" if eng_total else "-",
                fmt_ms(eng_skew, 3),
            ]
        )
    return [*lines, *table(headers, rows), ""]


# -- 3: realistic latencies --------------------------------------------------------------------


Realistic = dict[tuple[int, str, Treatment], list[RealisticSample]]


async def run_realistic(cfg: Config) -> Realistic:
    """Per seed: the floor and barrier cut under every treatment; with the collector on,
    barriers main and none and one hook at a time too."""
    out: Realistic = {}
    for n in cfg.realistic_ns:
        reps = cfg.big_reps if n >= 10_000 else cfg.realistic_reps
        log(f"realistic N={n}: {reps} repetitions")
        for rep in range(reps):
            seed = SEED + rep
            for t in cfg.treatments:
                samples = [
                    await realistic_floor(n, seed, t),
                    await realistic_engine(n, seed, BarrierPolicy.CUT, t),
                ]
                if t is Treatment.ON:
                    samples.append(await realistic_engine(n, seed, BarrierPolicy.MAIN, t))
                    samples.append(await realistic_engine(n, seed, BarrierPolicy.NONE, t))
                    if n <= cfg.baseline_realistic_max:
                        samples.append(await realistic_one_at_a_time(n, seed))
                for sample in samples:
                    out.setdefault((n, sample.contender, t), []).append(sample)
    return out


def _p(values: list[float]) -> str:
    if not values:
        return "n/a"
    return f"{fmt_ms(pct(values, 50))} / {fmt_ms(pct(values, 99))} / {fmt_ms(max(values))}"


def realistic_section(cfg: Config, real: Realistic, karbor: list[KarborResult]) -> list[str]:
    prof = LatencyProfile.realistic()
    lines = [
        "## 3. Realistic latencies: skew and quiesce windows from the simulated storage's instants",
        "",
        "The `karbor_simcloud` plugins on `LatencyProfile.realistic()`: quiesce lognormal "
        "(median 20 ms, sigma 0.4, cap 200 ms), thaw lognormal (5 ms), snapshot: the array "
        "takes the image uniformly 2-4 ms after the call (its own jitter: "
        f"{prof.snapshot.spread * 1e3:.0f} ms), returns 1-2 ms later; copies "
        f"{REALISTIC_VOLUME_SIZE} B chunks at ~2 ms with {REALISTIC_COPY_SLOTS} copy slots. "
        "Default engine (events recorded in the memory store). "
        "**Source of instants: the simulated storage and cloud, never the engine's stamps**: "
        "skew = max - min of `SnapshotRecord.taken_at` (recorded inside the storage's "
        "snapshot call); storage jitter = max - min of the sampled call-to-instant delays of "
        "the same run; quiesce window = `SimServer.thawed_at - frozen_at`. Engine share of a "
        "window: *thaw* = a server's thaw call starting minus its last volume's snapshot call "
        "returning; *cut* = its first volume's snapshot call starting minus the moment the "
        "cut could start (barrier `cut`: the last server of the group frozen; otherwise the "
        "volume's own servers frozen). Windows and shares pool every server of every "
        "repetition: p50 / p99 / max, ms. `one-at-a-time` runs the same plugins hook after "
        "hook through `karbor_simcloud.direct.DirectRunner`. `floor-realistic` "
        "(`benchmarks/floor_realistic.py`) makes the same cloud's quiesce, snapshot and thaw "
        "calls in Karbor's order from bare asyncio tasks, with no engine: the least skew and "
        "window share these plugins allow on one event loop. `collector`: the treatment "
        "(`benchmarks/_gc.py`), the same for the floor and the engine of a seed; with it off, "
        "only the floor and barrier cut run.",
        "",
    ]
    headers = [
        "N",
        "collector",
        "contender",
        "run s",
        "skew ms median [min-max]",
        "storage jitter ms",
        "quiesce window p50/p99/max",
        "engine share: thaw p50/p99/max",
        "engine share: cut p50/p99/max",
    ]
    rows = []
    for n in cfg.realistic_ns:
        names = ("floor-realistic", "engine-cut", "engine-main", "engine-none", "one-at-a-time")
        for t, name in [(t, name) for t in cfg.treatments for name in names]:
            samples = real.get((n, name, t), [])
            if not samples:
                continue
            windows = [w for s in samples for w in s.windows]
            thaw = [w for s in samples for w in s.share_thaw]
            cut = [w for s in samples for w in s.share_cut]
            rows.append(
                [
                    f"{n:,}",
                    t.value,
                    name,
                    f"{statistics.median([s.seconds for s in samples]):.3f}",
                    fmt_range_ms(spread([s.skew for s in samples])),
                    fmt_ms(statistics.median([s.jitter for s in samples])),
                    _p(windows),
                    _p(thaw),
                    _p(cut),
                ]
            )
        for k in karbor:
            if k.n != n:
                continue
            if not k.finished:
                rows.append([f"{n:,}", "-", "karbor-taskflow", k.error, *["-"] * 5])
            else:
                rows.append(
                    [
                        f"{n:,}",
                        "-",
                        "karbor-taskflow",
                        f"{k.total_s:.3f}",
                        fmt_ms(k.skew),
                        "same distribution",
                        _p(list(k.windows)),
                        "-",
                        "-",
                    ]
                )
    lines += table(headers, rows)
    lines += [
        "",
        "For `karbor-taskflow` the latencies are pre-sampled from the same distributions and "
        "slept in its green threads; its instants are `time.monotonic()` taken after the "
        "simulated snapshot delay (the same point as `taken_at`) and around the thaw.",
        "",
    ]
    return lines


# -- 4, 5: features that arrive with their own issues ---------------------------------------------


@contextlib.asynccontextmanager
async def _open_store(cls: Any, path: Path) -> AsyncIterator[Any]:
    """``SqliteStore.open(path)`` (an async context manager), or a plain constructor."""
    opener = getattr(cls, "open", None)
    if opener is not None:
        async with opener(path) as store:
            yield store
        return
    store = cls(path)
    try:
        yield store
    finally:
        closer = getattr(store, "aclose", None)
        if closer is not None:
            await closer()


async def sqlite_section(cfg: Config, workloads: dict[int, Workload]) -> list[str]:
    head = ["## 4. The cost of durability: SQLite store", ""]
    cls = sqlite_store_class()
    if cls is None:
        return [*head, "Skipped: `karbor_async.SqliteStore` is not importable yet.", ""]
    rows = []
    try:
        for n in [n for n in cfg.overhead_ns if n <= 10_000]:
            w = workloads[n]
            with tempfile.TemporaryDirectory() as tmp:
                async with _open_store(cls, Path(tmp) / "bench.db") as store:
                    engine = Engine(
                        [NoopProtection()], all_protectables(w.cloud), discover=False, store=store
                    )
                    async with engine:  # entered outside the timed protect
                        t0 = time.perf_counter()
                        outcome = await engine.protect(make_plan(w.roots, BarrierPolicy.CUT))
                        secs = time.perf_counter() - t0
                    events = len(await store.read_events(outcome.run_id))
            rows.append([f"{n:,}", f"{secs * 1e3:.1f}", f"{events:,}", f"{events / secs:,.0f}"])
        q_rows = []
        for n in [n for n in cfg.realistic_ns if n <= 1000]:
            mem_w: list[float] = []
            sql_w: list[float] = []
            added: list[float] = []
            for rep in range(cfg.realistic_reps):
                mem = await realistic_engine(n, SEED + rep, BarrierPolicy.CUT)
                mem_w += mem.windows
                cloud = realistic_cloud(n, SEED + rep)
                with tempfile.TemporaryDirectory() as tmp:
                    async with _open_store(cls, Path(tmp) / "bench.db") as store:
                        engine = Engine(
                            all_protections(cloud),
                            all_protectables(cloud),
                            discover=False,
                            store=store,
                        )
                        plan = make_plan(cloud.project_resources(), BarrierPolicy.CUT)
                        async with engine:
                            fresh_heap()  # as for the memory-store run
                            try:
                                await engine.protect(plan)
                            finally:
                                gc.unfreeze()
                sql = analyse("engine-cut/sqlite", cloud, 0.0, BarrierPolicy.CUT).windows
                sql_w += sql
                added.append(pct(list(sql), 50) - pct(list(mem.windows), 50))
            q_rows.append(
                [
                    f"{n:,}",
                    f"{fmt_ms(pct(mem_w, 50))} / {fmt_ms(pct(mem_w, 99))}",
                    f"{fmt_ms(pct(sql_w, 50))} / {fmt_ms(pct(sql_w, 99))}",
                    f"{fmt_ms(statistics.median(added))} [{fmt_ms(min(added))} to "
                    f"{fmt_ms(max(added))}]",
                ]
            )
    except Exception as exc:  # report, do not lose the rest of the run
        return [*head, f"Failed: {type(exc).__name__}: {exc}", ""]
    return [
        *head,
        "No-op hooks, barrier cut, default event sink, `SqliteStore.open` on a temporary file. "
        "`transitions/s` = lifecycle events read back from the store / protect time (a lower "
        "bound on the store's rate: the engine's own time is in the denominator).",
        "",
        *table(["N", "protect ms", "events stored", "transitions/s"], rows),
        "",
        "Quiesce windows (simulated cloud's instants, `SimServer.thawed_at - frozen_at`, "
        "every server of every repetition), memory store against SQLite store, barrier cut:",
        "",
        *table(
            [
                "N",
                "memory p50 / p99 ms",
                "sqlite p50 / p99 ms",
                "added p50 ms: median of repetitions [min to max]",
            ],
            q_rows,
        ),
        "",
    ]


FANOUT_MODES: tuple[tuple[str, int], ...] = (
    ("none", 0),
    ("per event", 10),
    ("per event", 100),
    ("batches", 10),
    ("batches", 100),
    ("stalled", 1),
)
"""How subscribers read, and how many: ``per event`` iterates the subscription,
``batches`` iterates ``Subscription.batches()``, ``stalled`` enters and never reads."""


async def _protect_with_subscribers(
    engine: Engine, plan: Plan, mode: str, subscribers: int
) -> tuple[float, list[int]]:
    """Protect with ``subscribers`` live consumers of every event; (seconds, events seen each)."""
    seen = [0] * subscribers
    stalled = anyio.Event()

    async def consume(i: int, *, task_status: TaskStatus[None]) -> None:
        async with engine.subscribe() as stream:
            task_status.started()
            if mode == "stalled":
                await stalled.wait()
            elif mode == "batches":
                async for batch in stream.batches():
                    seen[i] += len(batch)
            else:
                async for _event in stream:
                    seen[i] += 1

    async with anyio.create_task_group() as tg:
        for i in range(subscribers):
            await tg.start(consume, i)
        t0 = time.perf_counter()
        await engine.protect(plan)
        secs = time.perf_counter() - t0
        tg.cancel_scope.cancel()
    return secs, seen


async def fanout_section(
    cfg: Config, workloads: dict[int, Workload]
) -> tuple[list[str], dict[str, float]]:
    """The fan-out table, and the realistic slowdown with 100 subscribers per way of reading."""
    head = ["## 5. Event fan-out: 0, 10 and 100 subscribers", ""]
    if not has_subscribe():
        return [*head, "Skipped: `Engine.subscribe` does not exist yet.", ""], {}
    rows = []
    hundred: dict[str, float] = {}
    try:
        for n in cfg.fanout_ns:
            for realistic in (False, True):
                times: dict[tuple[str, int], list[float]] = {m: [] for m in FANOUT_MODES}
                seen_med: dict[tuple[str, int], float] = {}
                for rep in range(cfg.realistic_reps):
                    for mode in FANOUT_MODES:
                        cloud = realistic_cloud(n, SEED + rep) if realistic else workloads[n].cloud
                        plugins = all_protections(cloud) if realistic else [NoopProtection()]
                        engine = Engine(plugins, all_protectables(cloud), discover=False)
                        plan = make_plan(
                            cloud.project_resources(),
                            BarrierPolicy.CUT,
                            parameters={VOLUME: {"chunk_size": REALISTIC_VOLUME_SIZE}},
                        )
                        async with engine:  # entered outside the timed protect
                            fresh_heap()
                            try:
                                secs, seen = await _protect_with_subscribers(engine, plan, *mode)
                            finally:
                                gc.unfreeze()
                        times[mode].append(secs)
                        seen_med[mode] = statistics.median(seen) if seen else 0
                alone = times[FANOUT_MODES[0]]
                for mode in FANOUT_MODES:
                    ratios = [a / b for a, b in zip(times[mode], alone, strict=True)]
                    if realistic and mode[1] == 100:
                        hundred[mode[0]] = statistics.median(ratios)
                    rows.append(
                        [
                            f"{n:,}",
                            "realistic" if realistic else "no-op",
                            str(mode[1]),
                            mode[0],
                            fmt_range_ms(spread(times[mode]), 1),
                            f"{statistics.median(ratios):.2f}",
                            "-" if mode[0] == "stalled" else f"{seen_med[mode]:,.0f}",
                        ]
                    )
    except Exception as exc:  # report, do not lose the rest of the run
        return [*head, f"Failed: {type(exc).__name__}: {exc}", ""], {}
    return [
        *head,
        "`Engine.subscribe()` (every run's events) entered before the run by each subscriber; "
        "barrier cut, default memory store, all subscribers on the engine's event loop. "
        "`per event`: `async for event in subscription`, counting each event. "
        "`batches`: `async for batch in subscription.batches()`, counting `len(batch)` "
        "(subscribers woken together share one immutable batch). "
        "`stalled`: one subscriber that enters and never reads. Events per subscriber: seen "
        "by the time `protect` returned (the median subscriber of the last repetition). "
        "`x 0 subscribers`: median of per-repetition ratios.",
        "",
        *table(
            [
                "N",
                "hooks",
                "subscribers",
                "reading",
                "protect ms median [min-max]",
                "x 0 subscribers",
                "events per subscriber",
            ],
            rows,
        ),
        "",
    ], hundred


# -- targets and plots -----------------------------------------------------------------------------


def targets_section(
    cfg: Config,
    res: Overhead,
    karbor: list[KarborResult],
    real: Realistic,
    fanout: dict[str, float],
) -> list[str]:
    rows = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("met" if ok else "**missed**")

    ratios = {n: res.ratio(n, "engine-cut", "floor-anyio") for n in cfg.overhead_ns}
    ok = all(r <= 1.5 for r in ratios.values()) if ratios else None
    rows.append(
        [
            "overhead within 1.5x of the anyio floor at every N (engine-cut, null sink)",
            ", ".join(f"{n:,}: {r:.2f}x" for n, r in ratios.items()),
            verdict(ok),
        ]
    )
    big = res.get(100_000, "engine-cut")
    if big:
        total = statistics.median([s.seconds + s.build_seconds for s in big])
        rows.append(
            [
                "100,000 resources in under 5 s (discovery + run)",
                f"{total:.2f} s",
                verdict(total < 5),
            ]
        )
    else:
        rows.append(["100,000 resources in under 5 s", "not run in this mode", "n/a"])
    mem = {
        n: res.memory[(n, "engine-cut")] / res.memory[(n, "floor-anyio")]
        for n in cfg.memory_ns
        if (n, "engine-cut") in res.memory and res.memory.get((n, "floor-anyio"))
    }
    labels = {n: f"{n:,}: {r:.2f}x" for n, r in mem.items()}
    for n in cfg.rss_ns:
        eng_p = res.rss.get((n, "engine-cut", Treatment.ON))
        floor_p = res.rss.get((n, "floor-anyio", Treatment.ON))
        if n not in mem and eng_p is not None and floor_p is not None and floor_p.kb_per_resource:
            mem[n] = eng_p.kb_per_resource / floor_p.kb_per_resource
            labels[n] = f"{n:,}: {mem[n]:.2f}x (RSS)"
    rows.append(
        [
            "peak memory per resource within 1.5x of the anyio floor",
            ", ".join(labels[n] for n in sorted(labels)) or "not measured",
            verdict(all(r <= 1.5 for r in mem.values()) if mem else None),
        ]
    )
    sk = {}
    for n in cfg.overhead_ns:
        eng = [s.skew for s in res.get(n, "engine-cut") if s.skew is not None]
        flo = [s.skew for s in res.get(n, "floor-asyncio") if s.skew is not None]
        if eng and flo and statistics.median(flo) > 0:
            sk[n] = statistics.median(eng) / statistics.median(flo)
    rows.append(
        [
            "cut dispatch skew within 1.5x of the raw asyncio floor",
            ", ".join(f"{n:,}: {r:.1f}x" for n, r in sk.items()),
            verdict(all(r <= 1.5 for r in sk.values()) if sk else None),
        ]
    )
    k1000 = next((k for k in karbor if k.n == 1000), None)
    eng1000 = res.get(1000, "engine-cut")
    if k1000 is not None and eng1000:
        total = statistics.median([s.seconds + s.build_seconds for s in eng1000])
        if k1000.finished:
            speed = k1000.total_s / total
            rows.append(
                [
                    "500x faster than Karbor's engine at 1,000",
                    f"{speed:.0f}x",
                    verdict(speed >= 500),
                ]
            )
        else:
            rows.append(
                [
                    "500x faster than Karbor's engine at 1,000",
                    f"Karbor {k1000.error}; engine {total:.2f} s (>= {k1000.timeout / total:.0f}x)",
                    verdict(k1000.timeout / total >= 500),
                ]
            )
    else:
        rows.append(["500x faster than Karbor's engine at 1,000", "not run in this mode", "n/a"])
    lower = []
    for k in karbor:
        eng = [s.skew for s in res.get(k.n, "engine-cut") if s.skew is not None]
        if k.finished and k.skew is not None and eng:
            lower.append((k.n, statistics.median(eng), k.skew))
    rows.append(
        [
            "lower skew than Karbor's engine wherever it finishes",
            ", ".join(f"{n:,}: {fmt_ms(a, 3)} vs {fmt_ms(b, 3)} ms" for n, a, b in lower),
            verdict(all(a < b for _, a, b in lower) if lower else None),
        ]
    )
    jit = []
    for n in cfg.realistic_ns:
        samples = real.get((n, "engine-cut", Treatment.ON), [])
        floor = real.get((n, "floor-realistic", Treatment.ON), [])
        if samples:
            jit.append(
                (
                    n,
                    statistics.median([s.skew for s in samples]),
                    statistics.median([s.jitter for s in samples]),
                    statistics.median([s.skew for s in floor]) if floor else math.nan,
                )
            )
    rows.append(
        [
            "realistic: barrier cut skew within the storage's own jitter "
            "(in brackets: the realistic floor, the same calls with no engine)",
            ", ".join(f"{n:,}: {fmt_ms(a)} vs {fmt_ms(b)} ms [{fmt_ms(c)}]" for n, a, b, c in jit),
            verdict(all(a <= b for _, a, b, _c in jit) if jit else None),
        ]
    )
    share = real.get((1000, "engine-cut", Treatment.ON), [])
    if share:

        def p99(samples: list[RealisticSample]) -> tuple[float, float]:
            return (
                pct([w for s in samples for w in s.share_thaw], 99),
                pct([w for s in samples for w in s.share_cut], 99),
            )

        thaw, cut = p99(share)
        floor = real.get((1000, "floor-realistic", Treatment.ON), [])
        f_thaw, f_cut = p99(floor) if floor else (math.nan, math.nan)
        rows.append(
            [
                "engine share of a quiesce window < 1 ms p99 at 1,000 "
                "(thaw / cut; in brackets: the realistic floor)",
                f"{fmt_ms(thaw)} / {fmt_ms(cut)} ms [{fmt_ms(f_thaw)} / {fmt_ms(f_cut)}]",
                verdict(max(thaw, cut) < 1e-3),
            ]
        )
    else:
        rows.append(
            ["engine share of a quiesce window < 1 ms p99 at 1,000", "not run in this mode", "n/a"]
        )
    if fanout:
        rows.append(
            [
                "100 subscribers slow a realistic run by under 20%",
                ", ".join(f"{how}: {r:.2f}x" for how, r in fanout.items()),
                verdict(min(fanout.values()) < 1.2),
            ]
        )
    return [
        "## Targets of issue 3 (earlier; collector on)",
        "",
        *table(["target", "measured", "verdict"], rows),
        "",
    ]


def make_plots(
    cfg: Config,
    res: Overhead,
    karbor: list[KarborResult],
    real: Realistic,
) -> list[str]:
    suffix = "-quick" if cfg.quick else ""

    def label(name: str, t: Treatment) -> str:
        return name if t is Treatment.ON else f"{name} ({t.label})"

    overhead: dict[str, list[tuple[int, float]]] = {}
    skew: dict[str, list[tuple[int, float]]] = {}
    for (n, name, t), samples in res.samples.items():
        if name == SQLITE_CONTENDER:
            continue  # one N only
        overhead.setdefault(label(name, t), []).append(
            (n, statistics.median([s.seconds for s in samples]) / n * 1e6)
        )
        skews = [s.skew for s in samples if s.skew is not None]
        if skews:
            skew.setdefault(label(name, t), []).append((n, statistics.median(skews) * 1e3))
    for k in karbor:
        if k.finished:
            overhead.setdefault("karbor-taskflow (run)", []).append((k.n, k.run_s / k.n * 1e6))
            if k.skew:
                skew.setdefault("karbor-taskflow", []).append((k.n, k.skew * 1e3))
    realistic: dict[str, list[tuple[int, float]]] = {}
    for (n, name, t), rsamples in real.items():
        realistic.setdefault(f"{label(name, t)} skew", []).append(
            (n, statistics.median([s.skew for s in rsamples]) * 1e3)
        )
        if t is not Treatment.ON:
            continue
        windows = [w for s in rsamples for w in s.windows]
        if name == "engine-cut" and windows:
            realistic.setdefault("engine-cut quiesce window p99", []).append(
                (n, pct(windows, 99) * 1e3)
            )
        if name == "engine-cut":
            realistic.setdefault("storage jitter", []).append(
                (n, statistics.median([s.jitter for s in rsamples]) * 1e3)
            )
    made = []
    note = "simulated cloud (karbor_simcloud); see RESULTS.md for the machine and command"
    for fname, title, ylabel, series in (
        (
            f"overhead{suffix}.png",
            "Time per resource, no-op hooks",
            "microseconds per resource",
            overhead,
        ),
        (f"skew{suffix}.png", "Cut dispatch skew, zero-latency hooks", "skew (ms)", skew),
        (
            f"realistic{suffix}.png",
            "Realistic latencies: skew (the storage's own clock)",
            "ms",
            realistic,
        ),
    ):
        if plot_lines(cfg.out / fname, title, ylabel, series, note=note):
            made.append(fname)
    return made


async def _section(name: str, make: Any) -> list[str]:
    """A section that may fail without losing the rest of the report."""
    log(f"{name} section")
    try:
        lines: list[str] = await make()
    except Exception as exc:  # report, do not lose the rest of the run
        return [f"## {name}", "", f"Failed: {type(exc).__name__}: {exc}", ""]
    return lines


async def main_async(cfg: Config, header: list[str]) -> tuple[str, list[str]]:
    """The report's text, and the README's headline block."""
    quiet_logging()
    t_start = time.perf_counter()
    ns = sorted(set(cfg.overhead_ns) | set(cfg.karbor_ns) | set(cfg.fanout_ns))
    workloads: dict[int, Workload] = {}
    for n in ns:
        workloads[n] = await Workload.build(n, SEED)
    res = await run_overhead(cfg, workloads)
    karbor = await run_karbor_all(cfg, workloads, cfg.karbor_ns, realistic=False)
    real = await run_realistic(cfg)
    karbor_real = await run_karbor_all(cfg, workloads, cfg.karbor_realistic_ns, realistic=True)
    log("SQLite store and fan-out sections")
    sqlite = await sqlite_section(cfg, workloads)
    fanout, hundred = await fanout_section(cfg, workloads)
    log("abort latency section")
    aborts = await abort_latency_section(cfg.abort_ns, cfg.realistic_reps, SEED)
    log("SQLite plugin section")
    sqlite_plugin = await sqlite_plugin_section(cfg.sqlite_mbs, cfg.sqlite_reps)
    log("PostgreSQL plugin section")
    postgres = await postgres_section(cfg.quick, cfg.realistic_reps)
    pg_store = await _section("PostgreSQL store", lambda: pg_store_section(cfg.quick))
    log("real file systems section")
    fs = await fs_section((8,) if cfg.quick else (64, 512), 1 if cfg.quick else 3)
    log("per-task cost section")
    tasks, _ = await task_cost_section(cfg.quick)
    log("consistency of restored pairs (the live two-shard application)")
    suffix = "-quick" if cfg.quick else ""
    proof, proof_plot = consistency_section(
        await run_consistency(cfg.consistency_protects), cfg.out, suffix
    )
    plots = [*([proof_plot] if proof_plot else []), *make_plots(cfg, res, karbor, real)]
    shape = workloads[max(ns)].cloud.stats()
    targets = Issue19(
        res,
        real,
        cfg.overhead_ns,
        cfg.rss_ns,
        cfg.realistic_ns,
        cfg.treatments,
        cpu_model(),
        million=load_million(cfg.million_json),
        karbor=karbor,
        fanout=hundred,
    )
    stamp = ", ".join(
        line.removeprefix("- ") for line in header if line.startswith(("- date", "- commit"))
    )
    head_block = targets.headline(f"{stamp}; CPU {cpu_model()}")
    body = [
        "# karbor-async benchmarks" + (" (quick smoke run)" if cfg.quick else ""),
        "",
        "The overhead, skew and scale sections run on a **simulated cloud** "
        "(`karbor_simcloud`, in-process): no real cloud is touched. The consistency section "
        "protects a real application (two processes, two SQLite stores) while it writes; the "
        "plugin sections protect real SQLite and PostgreSQL databases and file systems.",
        "",
        *header,
        f"- mode: {'quick' if cfg.quick else 'full'}; repetitions: {cfg.reps} "
        f"({cfg.big_reps} at N >= 100,000 overhead / 10,000 realistic); seed {SEED}; "
        f"wall time of the whole run: {time.perf_counter() - t_start:.0f} s",
        "- workload: `SimCloud.generate(N)`: one project, one network per 200 resources, "
        "servers with 1-4 volumes (5% of volume slots reuse an earlier server's volume) and an "
        f"image each; the graph has exactly N nodes (largest here: {shape}).",
        "- collector treatments: "
        + "; ".join(f"*{t.label}*: {t.description}" for t in cfg.treatments)
        + " (`benchmarks/_gc.py`; every contender of a comparison under the same one).",
        "",
        *targets.section(),
        "### Headline (copied into README.md)",
        "",
        *head_block,
        "",
        *[f"![{p}]({p})" for p in plots],
        "",
        *proof,
        *targets_section(cfg, res, karbor, real, hundred),
        *overhead_section(cfg, res),
        *karbor_section(cfg, karbor, res),
        *realistic_section(cfg, real, karbor_real),
        *sqlite,
        *fanout,
        *aborts,
        *sqlite_plugin,
        *postgres,
        *pg_store,
        *fs,
        *tasks,
    ]
    return "\n".join(body) + "\n", head_block


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    cfg = parse(args)
    cfg.out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "benchmarks", *args])
    header = environment(command, HERE.parent)
    report, _block = anyio.run(main_async, cfg, header, backend="asyncio")
    path = cfg.out / "RESULTS.md"
    path.write_text(report)
    log(f"wrote {path}")
    if cfg.write_readme:
        readme = HERE.parent / "README.md"
        headline.write(readme, headline.extract(report))
        log(f"wrote the headline block of {readme}")
    else:
        log("README.md's headline block not written (quick, trimmed or redirected run)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
