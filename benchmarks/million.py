"""``make bench-million`` (``python -m benchmarks.million``): a million resources in one run,
and the cost per resource from 1,000 to 1,000,000.

For each N (default 1,000, 10,000, 100,000 and 1,000,000) one fresh subprocess
(``--child N``) generates ``SimCloud.generate(N)``, makes a default ``Engine``
(memory store, events recorded, every other setting its default; four no-op
hooks per resource, barrier ``cut``), starts from a collected, frozen heap,
resets the peak RSS (``clear_refs``), and times ``build_protect`` (discovery and
validation) and ``execute`` (the run). It reads the peak RSS (``VmHWM``) after
each, and counts the collector's collections and their time in each phase
(``gc.callbacks``). One run per N: the million is measured once.

Writes ``MILLION.md`` (environment, table, where the cost per resource grows),
``million.png`` (us per resource of build and of run, peak RSS KB per resource)
and ``million.json`` (read by ``python -m benchmarks`` for its issue-19 targets
table). Before a child starts, the memory it will need is estimated from the
previous N's peak (scaled by N, plus a quarter); if the machine has less
available (``MemAvailable``), that N is skipped with the numbers, not run into
the out-of-memory killer. Not run by CI.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from benchmarks._gc import GcWatch, Treatment, treated
from benchmarks._measure import events_bytes
from benchmarks._report import cpu_model, environment, git_commit, plot_panels, table
from benchmarks._workload import NoopProtection, make_plan, quiet_logging
from karbor_async import BarrierPolicy, Engine, MemoryBank, MemoryStore

__all__ = ["main"]

HERE = Path(__file__).resolve().parent
SEED = 20161129
DEFAULT_NS = (1_000, 10_000, 100_000, 1_000_000)
RSS_LIMIT_GIB = 16
EVENTS_WEIGHED_UP_TO = 100_000
"""Above this N the stored events are counted, not weighed (the walk takes minutes)."""


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open(f"/proc/{os.getpid()}/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


def _available_kb() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


async def child(n: int, seed: int, treatment: Treatment) -> dict[str, Any]:
    """One N in this (fresh) process: generate, build, run; the measurements as a dict."""
    from karbor_simcloud import SimCloud, all_protectables

    quiet_logging()
    t0 = time.perf_counter()
    cloud = SimCloud.generate(n, seed)
    generate_s = time.perf_counter() - t0
    store = MemoryStore()
    engine = Engine(
        [NoopProtection()], all_protectables(cloud), discover=False, store=store, bank=MemoryBank()
    )
    plan = make_plan(cloud.project_resources(), BarrierPolicy.CUT)
    run_watch = GcWatch()
    async with engine:
        with treated(treatment) as build_watch:
            reset = _reset_peak()
            before = _status_kb("VmRSS")
            floor = before if reset else max(before, _status_kb("VmHWM"))
            c1, t1 = time.process_time(), time.perf_counter()
            built = await engine.build_protect(plan)
            c2, t2 = time.process_time(), time.perf_counter()
            build_watch.stop()
            peak_build = _status_kb("VmHWM")
            rss_build = _status_kb("VmRSS")
            run_watch.start()
            outcome = await engine.execute(built)
            c3, t3 = time.process_time(), time.perf_counter()
            run_watch.stop()
            peak = _status_kb("VmHWM")
    events = await store.read_events(outcome.run_id)
    weighed = events_bytes(events) / 1024 / n if n <= EVENTS_WEIGHED_UP_TO else None
    return {
        "n": n,
        "ok": True,
        "resources": len(outcome.resources),
        "status": outcome.status.value,
        "generate_s": generate_s,
        "build_s": t2 - t1,
        "run_s": t3 - t2,
        "build_us": (t2 - t1) / n * 1e6,
        "run_us": (t3 - t2) / n * 1e6,
        "build_cpu_us": (c2 - c1) / n * 1e6,
        "run_cpu_us": (c3 - c2) / n * 1e6,
        "rss_before_kb": before,
        "rss_after_build_kb": rss_build,
        "peak_build_kb": peak_build,
        "peak_kb": peak,
        "build_kb_per_resource": max(0, peak_build - floor) / n,
        "kb_per_resource": max(0, peak - floor) / n,
        "build_gc": [build_watch.total, build_watch.full, build_watch.seconds],
        "run_gc": [run_watch.total, run_watch.full, run_watch.seconds],
        "events": len(events),
        "events_kb_per_resource": weighed,
        "skew": outcome.skew,
    }


async def _spawn(n: int, seed: int, treatment: Treatment, limit: float) -> dict[str, Any]:
    env = dict(os.environ)
    root = str(HERE.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "benchmarks.million", "--child", str(n)]
    cmd += ["--seed", str(seed), "--treatment", treatment.value]
    t0 = time.perf_counter()
    try:
        with anyio.fail_after(limit):
            proc = await anyio.run_process(cmd, env=env, check=False)
    except TimeoutError:
        return {"n": n, "ok": False, "error": f"did not finish within {limit:.0f} s"}
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        lines = proc.stderr.decode(errors="replace").strip().splitlines()
        why = lines[-1] if lines else "no output"
        if proc.returncode < 0:
            why = f"killed by signal {-proc.returncode} (out of memory?); {why}"
        return {"n": n, "ok": False, "error": f"exit {proc.returncode}: {why}"}
    data: dict[str, Any] = json.loads(proc.stdout)
    data["wall_s"] = wall
    return data


def _growth(rows: list[dict[str, Any]]) -> list[str]:
    """Where the cost per resource grows, phase by phase, and what the collector took."""
    ok = [r for r in rows if r.get("ok")]
    if len(ok) < 2:
        return ["Too few sizes ran to say how the cost per resource grows."]
    lo, hi = ok[0], ok[-1]
    out = []
    for key, label in (
        ("build_us", "discovery (`build_protect`), us/resource"),
        ("run_us", "run (`execute`), us/resource"),
        ("kb_per_resource", "peak RSS growth, KB/resource"),
    ):
        factor = hi[key] / lo[key] if lo[key] else math.nan
        steps = [
            (b["n"], b[key] / a[key] if a[key] else math.nan) for a, b in itertools.pairwise(ok)
        ]
        worst_n, worst = max(steps, key=lambda s: s[1])
        shape = "flat (within 1.25x)" if factor <= 1.25 else f"grows {factor:.2f}x"
        out.append(
            f"- {label}: {lo[key]:.2f} at {lo['n']:,}, {hi[key]:.2f} at {hi['n']:,}: {shape}; "
            f"the largest step is up to {worst_n:,} ({worst:.2f}x)."
        )
    for phase, key in (("discovery", "build"), ("run", "run")):
        per_n = ", ".join(
            f"{r['n']:,}: {r[f'{key}_gc'][2] / r['n'] * 1e6:.1f} + "
            f"{(r[f'{key}_s'] - r[f'{key}_gc'][2]) / r['n'] * 1e6:.1f}"
            for r in ok
        )
        out.append(f"- {phase}, us/resource inside collections + outside them: {per_n}.")
    for phase, key in (("discovery", "build"), ("run", "run")):
        gc_lo = lo[f"{key}_gc"][2] / lo[f"{key}_s"] if lo[f"{key}_s"] else math.nan
        gc_hi = hi[f"{key}_gc"][2] / hi[f"{key}_s"] if hi[f"{key}_s"] else math.nan
        no_gc_lo = (lo[f"{key}_s"] - lo[f"{key}_gc"][2]) / lo["n"] * 1e6
        no_gc_hi = (hi[f"{key}_s"] - hi[f"{key}_gc"][2]) / hi["n"] * 1e6
        out.append(
            f"- the collector's share of {phase}: {gc_lo:.0%} at {lo['n']:,} "
            f"({lo[f'{key}_gc'][1]} full collections), {gc_hi:.0%} at {hi['n']:,} "
            f"({hi[f'{key}_gc'][1]} full); without it, {phase} costs {no_gc_lo:.2f} -> "
            f"{no_gc_hi:.2f} us/resource."
        )
    for phase, key in (("discovery", "build"), ("run", "run")):
        cpu_lo, cpu_hi = lo[f"{key}_cpu_us"], hi[f"{key}_cpu_us"]
        wall_lo, wall_hi = lo[f"{key}_us"], hi[f"{key}_us"]
        out.append(
            f"- {phase} in CPU time (this process's, `time.process_time`): {cpu_lo:.2f} -> "
            f"{cpu_hi:.2f} us/resource, {cpu_lo / wall_lo:.0%} and {cpu_hi / wall_hi:.0%} of "
            "its wall time (the rest is waiting for a CPU on a shared machine)."
        )
    return out


def report(
    rows: list[dict[str, Any]], header: list[str], treatment: Treatment, out: Path
) -> tuple[str, bool]:
    """MILLION.md's text, and whether the plot was written."""
    table_rows = []
    for r in rows:
        if not r.get("ok"):
            table_rows.append([f"{r['n']:,}", f"no: {r.get('error')}", *["-"] * 9])
            continue
        ev = r.get("events_kb_per_resource")
        table_rows.append(
            [
                f"{r['n']:,}",
                f"{r['build_s']:.2f} ({r['build_us']:.2f}; CPU {r['build_cpu_us']:.2f})",
                f"{r['run_s']:.2f} ({r['run_us']:.2f}; CPU {r['run_cpu_us']:.2f})",
                f"{r['build_gc'][0]} / {r['build_gc'][1]} / {r['build_gc'][2]:.2f}",
                f"{r['run_gc'][0]} / {r['run_gc'][1]} / {r['run_gc'][2]:.2f}",
                f"{r['peak_kb'] / 1024 / 1024:.2f}",
                f"{r['build_kb_per_resource']:.2f}",
                f"{r['kb_per_resource']:.2f}",
                f"{r['events'] / r['n']:.1f}" + (f" ({ev:.2f} KB)" if ev is not None else ""),
                f"{r['skew'] * 1e3:.1f}" if r.get("skew") is not None else "-",
                f"{r.get('wall_s', math.nan):.0f}",
            ]
        )
    top = next((r for r in rows if r["n"] == 1_000_000), None)
    if top is None:
        verdict = "1,000,000 not in this run's sizes"
    elif not top.get("ok"):
        verdict = f"**missed**: 1,000,000 did not run ({top.get('error')})"
    else:
        gib = top["peak_kb"] / 1024 / 1024
        ok = gib < RSS_LIMIT_GIB
        verdict = (
            f"{'met' if ok else '**missed**'}: peak RSS {gib:.2f} GiB "
            f"({'<' if ok else '>='} {RSS_LIMIT_GIB} GiB) for 1,000,000 resources, build "
            f"{top['build_s']:.1f} s + run {top['run_s']:.1f} s"
        )
    series_time: dict[str, list[tuple[int, float]]] = {
        "discovery (build_protect)": [],
        "run (execute)": [],
    }
    series_mem: dict[str, list[tuple[int, float]]] = {"peak RSS growth": [], "after discovery": []}
    for r in rows:
        if r.get("ok"):
            series_time["discovery (build_protect)"].append((r["n"], r["build_us"]))
            series_time["run (execute)"].append((r["n"], r["run_us"]))
            series_time.setdefault("discovery without collections", []).append(
                (r["n"], (r["build_s"] - r["build_gc"][2]) / r["n"] * 1e6)
            )
            series_time.setdefault("run without collections", []).append(
                (r["n"], (r["run_s"] - r["run_gc"][2]) / r["n"] * 1e6)
            )
            series_mem["peak RSS growth"].append((r["n"], r["kb_per_resource"]))
            series_mem["after discovery"].append((r["n"], r["build_kb_per_resource"]))
    plotted = plot_panels(
        out / "million.png",
        "Cost per resource, 1,000 to 1,000,000 (one run each)",
        [
            ("time", "microseconds per resource", series_time),
            ("memory", "peak RSS KB per resource", series_mem),
        ],
        note="simulated cloud, no-op hooks, memory store, events recorded; see MILLION.md",
    )
    lines = [
        "# karbor-async: a million resources in one run",
        "",
        *header,
        f"- collector: {treatment.description}",
        "",
        *(["![million.png](million.png)", ""] if plotted else []),
        f"**Target (issue 19): {verdict}.**",
        "",
        "`SimCloud.generate(N)` (the workload of `RESULTS.md`), four no-op hooks per "
        "resource, barrier `cut`, a default `Engine` (memory store, events recorded); one "
        "fresh subprocess per N, one run each. Times in seconds of wall time (in brackets: "
        "microseconds per resource, of wall and of this process's CPU time). Collections: "
        "count / full / seconds inside each phase. Peak RSS: the "
        "subprocess's whole `VmHWM` (interpreter and the generated cloud included), and its "
        "growth over the RSS before `build_protect`, per resource, after discovery and at the "
        "end of the run. Events: lifecycle events stored per resource (and their deep size, "
        f"up to {EVENTS_WEIGHED_UP_TO:,}). Wall: the subprocess, generation included.",
        "",
        *table(
            [
                "N",
                "discovery s (us/res)",
                "run s (us/res)",
                "discovery collections",
                "run collections",
                "peak RSS GiB",
                "KB/res after discovery",
                "peak KB/res",
                "events/res",
                "cut skew ms",
                "wall s",
            ],
            table_rows,
        ),
        "",
        "Where the cost per resource grows:",
        "",
        *_growth(rows),
        "",
    ]
    return "\n".join(lines), plotted


async def parent(
    ns: list[int], seed: int, treatment: Treatment, limit: float, out: Path
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for n in ns:
        prev = next((r for r in reversed(rows) if r.get("ok")), None)
        avail = _available_kb()
        if prev is not None and avail is not None:
            need = prev["peak_kb"] * n / prev["n"] * 1.25
            if need > avail:
                rows.append(
                    {
                        "n": n,
                        "ok": False,
                        "error": f"skipped: needs about {need / 1024 / 1024:.1f} GiB (from "
                        f"{prev['n']:,}), {avail / 1024 / 1024:.1f} GiB available",
                    }
                )
                continue
        print(f"[bench-million {time.strftime('%H:%M:%S')}] N={n:,}", file=sys.stderr, flush=True)
        rows.append(await _spawn(n, seed, treatment, limit))
        last = rows[-1]
        if last.get("ok"):
            print(
                f"[bench-million] N={n:,}: build {last['build_s']:.2f} s, "
                f"run {last['run_s']:.2f} s, peak RSS {last['peak_kb'] / 1024 / 1024:.2f} GiB",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(f"[bench-million] N={n:,}: {last.get('error')}", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m benchmarks.million", description=__doc__)
    ap.add_argument(
        "--ns", default=",".join(str(n) for n in DEFAULT_NS), help="sizes, comma-separated"
    )
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument(
        "--treatment",
        choices=[t.value for t in Treatment],
        default="on",
        help="collector treatment (benchmarks/_gc.py)",
    )
    ap.add_argument("--limit", type=float, default=3600.0, help="seconds per size")
    ap.add_argument(
        "--out", type=Path, default=HERE, help="where MILLION.md, million.png and million.json go"
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: rewrite MILLION.md and million.png from --out's million.json",
    )
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(args_list)
    treatment = Treatment(args.treatment)
    if args.child is not None:
        print(json.dumps(anyio.run(child, args.child, args.seed, treatment, backend="asyncio")))
        return 0
    if args.report_only:
        saved = json.loads((args.out / "million.json").read_text())
        header = saved.get("header") or [
            f"- date: {saved['date']}",
            f"- machine: CPU {saved['cpu']}",
            f"- commit: {saved['commit']}",
            f"- command: `{saved['command']}`",
        ]
        text, _ = report(saved["rows"], header, Treatment(saved["treatment"]), args.out)
        (args.out / "MILLION.md").write_text(text)
        return 0
    ns = [int(x) for x in args.ns.split(",") if x.strip()]
    args.out.mkdir(parents=True, exist_ok=True)
    command = shlex.join(["python", "-m", "benchmarks.million", *args_list])
    header = environment(command, HERE.parent)
    started = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    commit = git_commit(HERE.parent)  # before the run: its own outputs are not changes
    t0 = time.perf_counter()
    rows = anyio.run(parent, ns, args.seed, treatment, args.limit, args.out, backend="asyncio")
    header.append(f"- wall time of the whole run: {time.perf_counter() - t0:.0f} s")
    text, _ = report(rows, header, treatment, args.out)
    (args.out / "MILLION.md").write_text(text)
    (args.out / "million.json").write_text(
        json.dumps(
            {
                "date": started,
                "commit": commit,
                "cpu": cpu_model(),
                "treatment": treatment.value,
                "command": command,
                "header": header,
                "rows": rows,
            },
            indent=1,
        )
        + "\n"
    )
    print(f"[bench-million] wrote {args.out / 'MILLION.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
