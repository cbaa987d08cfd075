"""Issue 19's targets: one row per target with its measured value and verdict, per treatment,
and the README's headline table (ratios only) built from the same numbers.

Every figure here comes from the measurements of the run that writes the report
(``Overhead``, the realistic samples) or, for the million run, from the JSON file
``make bench-million`` leaves (``benchmarks/million.json``), named with its date
and commit. Ratios are medians of per-repetition ratios: the two contenders of a
ratio ran in the same repetition (zero-latency) or on the same seed's cloud
(realistic), under the same collector treatment.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs

from benchmarks._gc import Treatment
from benchmarks._measure import (
    SQLITE_CONTENDER,
    KarborResult,
    Overhead,
    RealisticSample,
    Sample,
)
from benchmarks._report import fmt_ms, table

__all__ = [
    "HEADLINE_BEGIN",
    "HEADLINE_END",
    "Issue19",
    "load_million",
]

HEADLINE_BEGIN = "<!-- bench:headline -->"
HEADLINE_END = "<!-- /bench:headline -->"

BIG = 100_000
"""The N of the discovery-plus-run target."""
ANYIO_FROM = 1_000
"""The anyio-floor targets hold at every N from here up."""
MEMORY_NS = (10_000, 100_000)
REALISTIC_NS = (100, 1_000, 10_000)
GIB = 1024 * 1024  # KB in a GiB
MILLION_RSS_LIMIT_GIB = 16


def load_million(path: Path) -> dict[str, Any] | None:
    """The last ``make bench-million`` results, or None if there are none."""
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


def _run_collections(s: Sample) -> int:
    return s.collections if s.run_collections is None else s.run_collections


def _x(r: float) -> str:
    return "n/a" if math.isnan(r) else f"{r:.2f}x"


def _med(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def _verdict(values: dict[int, float], limit: float) -> str:
    """``met``, or ``**missed**`` with the numbers that miss."""
    if not values or any(math.isnan(v) for v in values.values()):
        return "n/a (not measured)"
    misses = {n: v for n, v in values.items() if v > limit}
    if not misses:
        return "met"
    return "**missed**: " + ", ".join(f"{n:,}: {_x(v)} > {limit:g}x" for n, v in misses.items())


@attrs.define
class Issue19:
    """The targets of issue 19 over one report's measurements."""

    res: Overhead
    real: dict[tuple[int, str, Treatment], list[RealisticSample]]
    overhead_ns: tuple[int, ...]
    rss_ns: tuple[int, ...]
    realistic_ns: tuple[int, ...]
    treatments: tuple[Treatment, ...]
    cpu: str
    million: dict[str, Any] | None = None
    karbor: Sequence[KarborResult] = ()
    fanout: dict[str, float] = attrs.field(factory=dict)
    """Realistic run with 100 subscribers against none, by way of reading (section 5)."""

    # -- the numbers ------------------------------------------------------------------------

    @property
    def big_n(self) -> int | None:
        """The N the discovery-plus-run target is measured at (100,000, or the largest run)."""
        ns = [n for n in self.overhead_ns if n <= BIG]
        return max(ns) if ns else None

    @property
    def anyio_ns(self) -> list[int]:
        return [n for n in self.overhead_ns if n >= ANYIO_FROM]

    @property
    def memory_ns(self) -> list[int]:
        wanted = [n for n in self.rss_ns if n in MEMORY_NS]
        return wanted or list(self.rss_ns)

    @property
    def realistic_target_ns(self) -> list[int]:
        return [n for n in self.realistic_ns if n in REALISTIC_NS]

    def discovery_run(self, t: Treatment, contender: str) -> tuple[float, float, float]:
        """(ratio to the raw asyncio floor's run, engine build+run s, floor run s) at big N."""
        n = self.big_n
        if n is None:
            return (math.nan, math.nan, math.nan)
        eng, floor = self.res.get(n, contender, t), self.res.get(n, "floor-asyncio", t)
        return (
            self.res.ratio(n, contender, "floor-asyncio", t, with_build=True),
            _med([s.seconds + s.build_seconds for s in eng]),
            _med([s.seconds for s in floor]),
        )

    def run_ratios(self, t: Treatment, contender: str, floor: str) -> dict[int, float]:
        return {n: self.res.ratio(n, contender, floor, t) for n in self.anyio_ns}

    def skew_ratios(self, t: Treatment, contender: str, floor: str) -> dict[int, float]:
        return {n: self.res.skew_ratio(n, contender, floor, t) for n in self.anyio_ns}

    def rss(self, n: int, contender: str, t: Treatment) -> float:
        probe = self.res.rss.get((n, contender, t))
        return probe.kb_per_resource if probe is not None else math.nan

    def memory_ratios(self, t: Treatment) -> dict[int, float]:
        out = {}
        for n in self.memory_ns:
            eng, floor = self.rss(n, "engine-cut+events", t), self.rss(n, "floor-anyio", t)
            out[n] = eng / floor if floor else math.nan
        return out

    def realistic_ratios(self, t: Treatment) -> dict[int, float]:
        out = {}
        for n in self.realistic_target_ns:
            eng = self.real.get((n, "engine-cut", t), [])
            floor = self.real.get((n, "floor-realistic", t), [])
            pairs = [a.skew / b.skew for a, b in zip(eng, floor, strict=False) if b.skew]
            out[n] = _med(pairs)
        return out

    def realistic_skews(self, n: int, contender: str, t: Treatment) -> float:
        return _med([s.skew for s in self.real.get((n, contender, t), [])])

    # -- the table --------------------------------------------------------------------------

    def _cells(self, measure: Callable[[Treatment], tuple[str, str]]) -> list[str]:
        cells: list[str] = []
        for t in (Treatment.ON, Treatment.OFF):
            if t in self.treatments:
                cells += list(measure(t))
            else:
                cells += ["not run (`--treatment`)", "n/a"]
        return cells

    def _target_a(self, contender: str, limit: float) -> Callable[[Treatment], tuple[str, str]]:
        def measure(t: Treatment) -> tuple[str, str]:
            n = self.big_n
            ratio, eng_s, floor_s = self.discovery_run(t, contender)
            if n is None or math.isnan(ratio):
                return ("not measured", "n/a")
            text = f"{_x(ratio)} ({eng_s:.2f} s against {floor_s:.2f} s; {self.cpu})"
            if n != BIG:
                return (f"at N={n:,}: {text}", f"n/a (the target is at {BIG:,})")
            return (text, _verdict({n: ratio}, limit).replace(f"{n:,}: ", ""))

        return measure

    def _ratios_cell(
        self,
        get: Callable[[Treatment, str, str], dict[int, float]],
        contender: str,
        limit: float,
    ) -> Callable[[Treatment], tuple[str, str]]:
        def measure(t: Treatment) -> tuple[str, str]:
            anyio_r = get(t, contender, "floor-anyio")
            raw = get(t, contender, "floor-asyncio")
            if not anyio_r:
                return ("not measured (no N >= 1,000)", "n/a")
            text = ", ".join(f"{n:,}: {_x(r)}" for n, r in anyio_r.items())
            text += " (raw asyncio: " + ", ".join(_x(r) for r in raw.values()) + ")"
            return (text, _verdict(anyio_r, limit))

        return measure

    def _memory(self, t: Treatment) -> tuple[str, str]:
        ratios = self.memory_ratios(t)
        if not ratios:
            return ("not measured", "n/a")
        parts = []
        for n, r in ratios.items():
            eng, floor = self.rss(n, "engine-cut+events", t), self.rss(n, "floor-anyio", t)
            parts.append(f"{n:,}: {_x(r)} ({eng:.2f} against {floor:.2f} KB)")
        verdict = _verdict(ratios, 1.3)
        if not any(n in MEMORY_NS for n in ratios):
            verdict = f"n/a (the target is at {MEMORY_NS[0]:,} and {MEMORY_NS[1]:,})"
        return ("; ".join(parts), verdict)

    def _events_share(self, t: Treatment) -> tuple[str, str]:
        parts = []
        for n in self.memory_ns:
            with_ev = self.res.rss.get((n, "engine-cut+events", t))
            without = self.rss(n, "engine-cut", t)
            if with_ev is None:
                continue
            added = with_ev.kb_per_resource - without
            share = added / with_ev.kb_per_resource if with_ev.kb_per_resource else math.nan
            parts.append(
                f"{n:,}: recording events adds {added:.2f} of {with_ev.kb_per_resource:.2f} KB "
                f"({share:.0%}; `engine-cut`, no events: {without:.2f} KB); the stored "
                f"events hold {with_ev.events_kb_per_resource:.2f} KB/resource "
                f"({with_ev.events / n:.1f} events/resource, deep size)"
            )
        return ("; ".join(parts) or "not measured", "-")

    def _realistic(self, t: Treatment) -> tuple[str, str]:
        ratios = self.realistic_ratios(t)
        if not ratios:
            return ("not measured", "n/a")
        parts = [
            f"{n:,}: {_x(r)} ({fmt_ms(self.realistic_skews(n, 'engine-cut', t))} against "
            f"{fmt_ms(self.realistic_skews(n, 'floor-realistic', t))} ms)"
            for n, r in ratios.items()
        ]
        return ("; ".join(parts), _verdict(ratios, 1.2))

    def _million(self, t: Treatment) -> tuple[str, str]:
        m = self.million
        if m is None:
            return ("not run: `make bench-million` writes `benchmarks/million.json`", "n/a")
        if Treatment(m.get("treatment", "on")) is not t:
            return (f"not run (`make bench-million` ran collector {m.get('treatment')})", "n/a")
        rows = {int(r["n"]): r for r in m.get("rows", [])}
        top = rows.get(1_000_000)
        stamp = f"`make bench-million` of {m.get('date', '?')}, commit {m.get('commit', '?')}"
        if top is None or not top.get("ok"):
            why = top.get("error", "not run") if top else "no 1,000,000 row"
            return (f"1,000,000: {why} ({stamp})", "**missed**: did not run")
        gib = float(top["peak_kb"]) / GIB
        low = rows.get(min(rows))
        growth = ""
        if low is not None and low is not top:
            growth = (
                f"; per resource from {int(low['n']):,}: build "
                f"{low['build_us']:.1f} -> {top['build_us']:.1f} us, run {low['run_us']:.1f} "
                f"-> {top['run_us']:.1f} us, RSS {low['kb_per_resource']:.2f} -> "
                f"{top['kb_per_resource']:.2f} KB"
            )
        text = (
            f"1,000,000 once: build {top['build_s']:.1f} s + run {top['run_s']:.1f} s, peak RSS "
            f"{gib:.2f} GiB{growth} ({stamp})"
        )
        if gib < MILLION_RSS_LIMIT_GIB:
            return (text, "met")
        return (text, f"**missed**: {gib:.2f} GiB >= {MILLION_RSS_LIMIT_GIB} GiB")

    def rows(self) -> list[list[str]]:
        runs = self.run_ratios
        skews = self.skew_ratios
        return [
            [
                f"(a) {BIG:,} resources x 4 hooks, discovery + run (`build_protect` + `execute`), "
                "barrier cut, events recorded, memory store, default settings, against the raw "
                "asyncio floor's run",
                "<= 2.0x",
                *self._cells(self._target_a("engine-cut+events", 2.0)),
            ],
            [
                "(a) the same with the SQLite store (a temporary file)",
                "<= 4x",
                *self._cells(self._target_a(SQLITE_CONTENDER, 4.0)),
            ],
            [
                "(b) run (`execute`) against the anyio floor, no events, every N from 1,000",
                "<= 1.25x",
                *self._cells(self._ratios_cell(runs, "engine-cut", 1.25)),
            ],
            [
                "(b) run against the anyio floor, events recorded, every N from 1,000",
                "<= 1.5x",
                *self._cells(self._ratios_cell(runs, "engine-cut+events", 1.5)),
            ],
            [
                "(b) cut skew against the anyio floor's, no events",
                "<= 1.5x",
                *self._cells(self._ratios_cell(skews, "engine-cut", 1.5)),
            ],
            [
                "(b) cut skew against the anyio floor's, events recorded",
                "<= 2x",
                *self._cells(self._ratios_cell(skews, "engine-cut+events", 2.0)),
            ],
            [
                "(c) peak RSS per resource against the anyio floor's, events recorded in the "
                "memory store",
                "<= 1.3x",
                *self._cells(self._memory),
            ],
            [
                "(c) how much of the engine's figure the stored events are",
                "-",
                *self._cells(self._events_share),
            ],
            [
                "(d) realistic cut skew by the storage's own clock (`SnapshotRecord.taken_at` = "
                "request time + sampled delay) against `floor-realistic` (the same cloud's "
                "calls, no engine)",
                "<= 1.2x",
                *self._cells(self._realistic),
            ],
            [
                "(e) 1,000,000 resources, once (memory store, events recorded, defaults): peak "
                "RSS, and cost per resource from 1,000 (`benchmarks/MILLION.md`)",
                f"< {MILLION_RSS_LIMIT_GIB} GiB",
                *self._cells(self._million),
            ],
        ]

    def collections_note(self) -> str:
        """Which treatment the engine really ran under: collections seen during the runs."""
        details, verdict = self._collections()
        return f"{details} {verdict}" if details else ""

    def _collections(self) -> tuple[str, str]:
        """(the collections of engine and anyio floor per N, what they say), or empty."""
        if Treatment.ON not in self.treatments:
            return ("", "")
        parts = []
        for n in self.anyio_ns or list(self.overhead_ns):
            eng = self.res.get(n, "engine-cut+events", Treatment.ON)
            floor = self.res.get(n, "floor-anyio", Treatment.ON)
            if not eng or not floor:
                continue
            parts.append(
                f"{n:,}: engine {_med([s.collections for s in eng]):.0f} "
                f"({_med([s.full_collections for s in eng]):.0f} full, "
                f"{_med([s.gc_seconds for s in eng]) * 1e3:.0f} ms; "
                f"{_med([_run_collections(s) for s in eng]):.0f} in `execute`), anyio floor "
                f"{_med([s.collections for s in floor]):.0f} "
                f"({_med([s.full_collections for s in floor]):.0f} full, "
                f"{_med([s.gc_seconds for s in floor]) * 1e3:.0f} ms)"
            )
        if not parts:
            return ("", "")
        held = all(
            _med([_run_collections(s) for s in self.res.get(n, "engine-cut+events", Treatment.ON)])
            == 0
            for n in self.anyio_ns
            if self.res.get(n, "engine-cut+events", Treatment.ON)
        )
        verdict = (
            "The engine held the collector off for its whole run (`execute`; its default "
            "`quiet_gc`): "
            "under *collector on* it ran against floors that did not, and the *collector off* "
            "column is the like-for-like one."
            if held
            else "The engine's default `quiet_gc` held the collector off for part of its run "
            "only, so in both columns engine and floors ran under the same treatment."
        )
        return (
            "Collections during the measured call under *collector on* (median of repetitions; "
            "engine: `build_protect` + `execute`, events recorded): " + "; ".join(parts) + ".",
            verdict,
        )

    def section(self) -> list[str]:
        headers = [
            "target",
            "limit",
            f"{Treatment.ON.label}: measured",
            f"{Treatment.ON.label}: verdict",
            f"{Treatment.OFF.label}: measured",
            f"{Treatment.OFF.label}: verdict",
        ]
        note = self.collections_note()
        return [
            "## Issue 19 targets",
            "",
            "Zero-latency rows: four no-op hooks per resource on `SimCloud.generate(N)`, the "
            "same graph for every contender, the order rotated each repetition; medians of 5 "
            "repetitions up to 10,000 and 3 at 100,000 (or as `--reps` says; see the header), "
            "each ratio the median of per-repetition ratios. Engine time is `Engine.execute` "
            "alone, except in (a), which adds `build_protect`. Cut skew: the engine's cut "
            "stamps; the floors' `loop.time()` / `anyio.current_time()` at the start of a "
            "volume's prepare_finish. Peak RSS: growth of `VmHWM` over the RSS before the run, "
            "one run in a fresh subprocess. Realistic: paired by seed (the same generated "
            "cloud). Two collector treatments: "
            f"*{Treatment.ON.label}*: {Treatment.ON.description}; "
            f"*{Treatment.OFF.label}*: {Treatment.OFF.description}. "
            f"Machine: {self.cpu}.",
            "",
            *table(headers, self.rows()),
            "",
            *([note, ""] if note else []),
        ]

    # -- the README's headline --------------------------------------------------------------

    def _head_cell(self, values: dict[int, float]) -> str:
        if not values:
            return "-"
        return " / ".join(_x(v) for v in values.values())

    def headline(self, stamp: str) -> list[str]:
        """The README's headline block (markers included): ratios only, no absolute times."""

        def per_t(fn: Callable[[Treatment], str]) -> list[str]:
            return [fn(t) if t in self.treatments else "not run" for t in Treatment]

        def ns(values: Sequence[int]) -> str:
            return " / ".join(f"{n:,}" for n in values)

        big = self.big_n
        rows = []
        if big is not None:
            rows.append(
                [
                    f"{big:,} resources, discovery + run with events, against the raw asyncio "
                    "floor's run",
                    *per_t(lambda t: _x(self.discovery_run(t, "engine-cut+events")[0])),
                    "<= 2.0x" if big == BIG else f"(target at {BIG:,})",
                ]
            )
            rows.append(
                [
                    "the same on the SQLite store",
                    *per_t(lambda t: _x(self.discovery_run(t, SQLITE_CONTENDER)[0])),
                    "<= 4x" if big == BIG else f"(target at {BIG:,})",
                ]
            )
        an = ns(self.anyio_ns)
        for label, get, contender, floor, limit in (
            (
                "run against the plain anyio floor, no events",
                self.run_ratios,
                "engine-cut",
                "floor-anyio",
                "<= 1.25x",
            ),
            (
                "run against the plain anyio floor, events recorded",
                self.run_ratios,
                "engine-cut+events",
                "floor-anyio",
                "<= 1.5x",
            ),
            (
                "run against the raw asyncio floor, events recorded",
                self.run_ratios,
                "engine-cut+events",
                "floor-asyncio",
                "-",
            ),
            (
                "cut skew against the anyio floor's, no events",
                self.skew_ratios,
                "engine-cut",
                "floor-anyio",
                "<= 1.5x",
            ),
            (
                "cut skew against the anyio floor's, events recorded",
                self.skew_ratios,
                "engine-cut+events",
                "floor-anyio",
                "<= 2x",
            ),
        ):
            cells = [
                self._head_cell(get(t, contender, floor)) if t in self.treatments else "not run"
                for t in Treatment
            ]
            rows.append([f"{label} (N = {an})", *cells, limit])
        rows.append(
            [
                "peak RSS per resource against the anyio floor's, events recorded "
                f"(N = {ns(self.memory_ns)})",
                *per_t(lambda t: self._head_cell(self.memory_ratios(t))),
                "<= 1.3x",
            ]
        )
        rows.append(
            [
                "realistic cut skew by the array's own clock against the same cloud calls with "
                f"no engine (N = {ns(self.realistic_target_ns)})",
                *per_t(lambda t: self._head_cell(self.realistic_ratios(t))),
                "<= 1.2x",
            ]
        )
        rows += self._karbor_rows()
        if self.fanout:
            rows.append(
                [
                    "a realistic run with 100 live subscribers against none (section 5; "
                    + " / ".join(self.fanout)
                    + ")",
                    " / ".join(_x(v) for v in self.fanout.values()),
                    "-",
                    "-",
                ]
            )
        rows += self._million_head_rows()
        lines = [
            HEADLINE_BEGIN,
            "<!-- written by `make bench` from benchmarks/RESULTS.md; "
            "regenerate with `python -m benchmarks.headline` -->",
            "",
            f"Ratios from `benchmarks/RESULTS.md` ({stamp}); verdicts, absolute times and "
            "how each figure is measured are there. Each ratio compares contenders run side by "
            "side under the same collector treatment (*collector on*: frozen heap, collector "
            "enabled; *collector off*: disabled around the run).",
            "",
            *table(["measure", Treatment.ON.label, Treatment.OFF.label, "target (issue 19)"], rows),
            "",
        ]
        verdict = self._collections()[1]
        if verdict:
            lines += [verdict, ""]
        lines.append(HEADLINE_END)
        return lines

    def _million_head_rows(self) -> list[list[str]]:
        """The million run in the headline: its peak RSS, its cost per resource in ratios."""
        m = self.million
        if m is None:
            return []
        rows = {int(r["n"]): r for r in m.get("rows", []) if r.get("ok")}
        top = rows.get(1_000_000)
        if top is None:
            return []
        low = rows[min(rows)]
        growth = " / ".join(
            _x(top[key] / low[key]) if low[key] else "n/a"
            for key in ("build_us", "run_us", "kb_per_resource")
        )
        cell = f"{float(top['peak_kb']) / GIB:.2f} GiB; {growth}"
        return [
            [
                "1,000,000 resources in one run (`make bench-million`, "
                f"{m.get('date', '?')}): peak RSS; cost per resource against {int(low['n']):,} "
                "(discovery / run / RSS)",
                cell if Treatment(m.get("treatment", "on")) is Treatment.ON else "not run",
                cell if Treatment(m.get("treatment", "on")) is Treatment.OFF else "not run",
                f"< {MILLION_RSS_LIMIT_GIB} GiB",
            ]
        ]

    def _karbor_rows(self) -> list[list[str]]:
        """The largest N Karbor's engine finished, and the first it did not."""
        done = [k for k in self.karbor if k.finished]
        undone = [k for k in self.karbor if not k.finished and not k.error.startswith("not run")]
        rows = []
        for k in [*done[-1:], *undone[:1]]:
            eng = self.res.get(k.n, "engine-cut", Treatment.ON)
            if not eng:
                continue
            total = _med([s.seconds + s.build_seconds for s in eng])
            if k.finished:
                cell = f"{k.total_s / total:,.0f}x"
            else:
                cell = (
                    f">= {k.timeout / total:,.0f}x (Karbor's did not finish in {k.timeout:.0f} s)"
                )
            rows.append(
                [
                    f"Karbor's rules on TaskFlow against karbor-async (build + run, barrier cut), "
                    f"N = {k.n:,}",
                    cell,
                    "-",
                    "-",
                ]
            )
        return rows
