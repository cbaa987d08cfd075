"""The timeline report: one self-contained HTML file with a Gantt chart of a run.

``karbor-async report RUN -o timeline.html`` writes it from the run's stored
lifecycle events: a row per resource (grouped in collapsible sections per
resource type), a bar per hook call (one colour per hook, failed calls hatched
in red), barrier releases as vertical lines, cut instants as ticks, quiesce
windows shaded; the header gives the skew and the longest quiesce window. The
data is embedded as JSON and drawn by inline JavaScript into SVG, so the file
needs no network; zoom (buttons or Ctrl+wheel), a filter box and per-type
collapsing keep a 1,000-resource run usable.

Only what the events and the outcome hold reaches the file: parameter values
(and so secrets) never do.
"""

from __future__ import annotations

import html
import json
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from karbor_async._types import Hook, ResourceKey
from karbor_async.events import Event, EventKind
from karbor_async.store import RunOutcome, RunRecord, Store

__all__ = ["build_timeline", "render_timeline", "write_report"]

_HOOKS = tuple(Hook)
_HOOK_INDEX = {h: i for i, h in enumerate(_HOOKS)}


def _r(value: float) -> float:
    """Seconds rounded to the microsecond (keeps the embedded JSON small)."""
    return round(value, 6)


def build_timeline(
    run: RunRecord, events: Sequence[Event], outcome: RunOutcome | None
) -> dict[str, Any]:
    """The chart's data: rows, hook bars, cuts, quiesce windows, barrier releases, summary.

    Times are seconds from the run's start on the engine clock.
    """
    rows: list[list[Any]] = []
    index: dict[ResourceKey, int] = {}

    def row_of(key: ResourceKey) -> int:
        found = index.get(key)
        if found is None:
            found = index[key] = len(rows)
            rows.append([key[0], key[1], "", "", "pending"])
        return found

    for res in run.graph.get("resources", ()):
        rows[row_of((str(res["type"]), str(res["id"])))][2] = str(res.get("name") or "")
    if outcome is not None:
        for rkey, r in outcome.resources.items():
            entry = rows[row_of(rkey)]
            entry[2] = entry[2] or r.resource.name
            entry[3] = r.group
            entry[4] = r.status.value

    t0 = next((e.mono for e in events if e.kind is EventKind.RUN_STARTED), None)
    if t0 is None:
        t0 = min((e.mono for e in events), default=0.0)
    end = max((e.mono for e in events), default=t0) - t0

    bars: list[list[Any]] = []
    cuts: list[list[Any]] = []
    quiesce: list[list[Any]] = []
    barriers: list[list[Any]] = []
    aborts: list[list[Any]] = []
    thaw_failed: list[list[Any]] = []
    open_bars: dict[tuple[ResourceKey, Hook, int], tuple[float, bool]] = {}
    open_quiesce: dict[ResourceKey, float] = {}
    groups_seen: dict[ResourceKey, str] = {}
    for e in events:
        t = e.mono - t0
        if e.resource is not None and e.group:
            groups_seen.setdefault(e.resource, e.group)
        key: ResourceKey | None = e.resource
        if e.kind is EventKind.STARTED and key is not None and e.hook is not None:
            open_bars[(key, e.hook, e.attempt)] = (t, bool(e.data.get("aborting")))
        elif e.kind in (EventKind.FINISHED, EventKind.FAILED) and key and e.hook is not None:
            start, aborting = open_bars.pop((key, e.hook, e.attempt), (t, False))
            state = "failed" if e.kind is EventKind.FAILED else "ok"
            error = str(e.data.get("error") or "") if state == "failed" else ""
            bars.append(
                [row_of(key), _HOOK_INDEX[e.hook], _r(start), _r(t), state, e.attempt, aborting]
                + ([error[:500]] if error else [])
            )
        elif e.kind is EventKind.CUT and key is not None:
            at = float(e.data.get("at", e.mono)) - t0
            cuts.append([row_of(key), _r(at), bool(e.data.get("crash_consistent"))])
        elif e.kind is EventKind.QUIESCED and key is not None:
            open_quiesce[key] = float(e.data.get("at", e.mono)) - t0
        elif e.kind is EventKind.THAWED and key is not None:
            start_q = open_quiesce.pop(key, None)
            if start_q is not None:
                at = float(e.data.get("at", e.mono)) - t0
                quiesce.append([row_of(key), _r(start_q), _r(at), True])
        elif e.kind is EventKind.THAW_FAILED and key is not None:
            thaw_failed.append([row_of(key), _r(t)])
        elif e.kind is EventKind.BARRIER_RELEASED:
            barriers.append([str(e.group or ""), str(e.data.get("barrier", "")), _r(t)])
        elif e.kind is EventKind.GROUP_ABORTING:
            aborts.append([str(e.group or ""), str(e.data.get("reason", "")), _r(t)])
    for (rkey, hook, attempt), (start, aborting) in open_bars.items():
        row = row_of(rkey)
        bars.append([row, _HOOK_INDEX[hook], _r(start), _r(end), "open", attempt, aborting])
    for rkey, start_q in open_quiesce.items():
        quiesce.append([row_of(rkey), _r(start_q), _r(end), False])
    for seen, group in groups_seen.items():
        entry = rows[row_of(seen)]
        entry[3] = entry[3] or group

    windows = [(q[2] - q[1], q[0]) for q in quiesce]
    longest = max(windows, default=None)
    group_skew: dict[str, float | None] = {}
    if outcome is not None:
        group_skew = {name: g.skew for name, g in outcome.groups.items()}
    else:
        spans: dict[str, list[float]] = {}
        for row, at, _cc in cuts:
            spans.setdefault(rows[row][3] or "default", []).append(at)
        group_skew = {g: max(v) - min(v) for g, v in spans.items()}
    skews = [s for s in group_skew.values() if s is not None]
    status = outcome.status.value if outcome is not None else run.status.value
    return {
        "meta": {
            "run_id": run.run_id,
            "checkpoint_id": run.checkpoint_id,
            "operation": run.operation.value,
            "plan": str(run.plan.get("name", "")),
            "status": status,
            "started": run.started_wall,
            "duration": outcome.duration if outcome is not None else _r(end),
            "resources": len(rows),
            "skew": max(skews) if skews else None,
            "group_skew": group_skew,
            "longest_quiesce": _r(longest[0]) if longest else None,
            "longest_quiesce_resource": (
                f"{rows[longest[1]][0]}#{rows[longest[1]][1]}" if longest else None
            ),
            "error": outcome.error if outcome is not None else None,
            "crash_consistent": bool(outcome and outcome.crash_consistent),
        },
        "hooks": [h.value for h in _HOOKS],
        "rows": rows,
        "bars": bars,
        "cuts": cuts,
        "quiesce": quiesce,
        "barriers": barriers,
        "aborts": aborts,
        "thawFailed": thaw_failed,
        "end": _r(end),
    }


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds >= 1:
        return f"{seconds:.3f} s"
    return f"{seconds * 1000:.2f} ms"


def render_timeline(data: Mapping[str, Any]) -> str:
    """The HTML document for :func:`build_timeline`'s data (no external resources)."""
    meta = data["meta"]
    esc = html.escape
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(meta["started"]))
    longest = _ms(meta["longest_quiesce"])
    if meta["longest_quiesce_resource"]:
        longest += f" ({meta['longest_quiesce_resource']})"
    facts = [
        ("status", meta["status"]),
        ("checkpoint", meta["checkpoint_id"]),
        ("plan", meta["plan"]),
        ("started", started),
        ("duration", _ms(meta["duration"])),
        ("resources", str(meta["resources"])),
        ("skew", _ms(meta["skew"])),
        ("longest quiesce window", longest),
    ]
    if len(meta["group_skew"]) > 1:
        facts.append(
            (
                "skew per group",
                ", ".join(f"{g}: {_ms(s)}" for g, s in sorted(meta["group_skew"].items())),
            )
        )
    if meta["crash_consistent"]:
        facts.append(("consistency", "crash-consistent (some resource cut without quiesce)"))
    if meta["error"]:
        # A cancelled run's summary says why it stopped: the cancel is not an error.
        label = "cancelled" if meta["status"] == "cancelled" else "error"
        facts.append((label, str(meta["error"])[:2000]))
    dl = "\n".join(
        f'<div class="fact" data-fact="{esc(k)}"><dt>{esc(k)}</dt><dd>{esc(v)}</dd></div>'
        for k, v in facts
    )
    # "<" as \u003c: nothing in the data can close the script element or open a comment.
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    title = f"{meta['operation']} {meta['run_id']}: {meta['status']}"
    parts = {
        "TITLE": esc(title),
        "STATUS": esc(meta["status"]),
        "FACTS": dl,
        "DATA": payload,
        "STYLE": _CSS,
        "SCRIPT": _JS,
    }
    # One pass, so text from the run can never be taken for a placeholder.
    return re.sub(r"@@([A-Z]+)@@", lambda m: parts[m.group(1)], _TEMPLATE)


async def write_report(store: Store, run_id: str) -> tuple[str, dict[str, Any]]:
    """Read a run and its events from the store; return the HTML and the chart data."""
    run = await store.get_run(run_id)
    events = await store.read_events(run_id, 0)
    data = build_timeline(run, events, run.outcome)
    return render_timeline(data), data


_CSS = """
:root { --pb:#4e79a7; --pf:#f28e2b; --mn:#59a14f; --cp:#b07aa1; --fail:#d62728;
        --q:rgba(78,121,167,.22); --ink:#222; --muted:#666; --line:#e4e4e4; }
* { box-sizing: border-box; }
body { font: 13px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--ink);
       margin: 0; background: #fafafa; }
header { padding: 12px 18px 6px; background: #fff; border-bottom: 1px solid var(--line); }
h1 { font-size: 17px; margin: 0 0 8px; }
h1 .status { padding: 1px 8px; border-radius: 10px; font-size: 13px; background: #ddd; }
h1 .status.succeeded { background: #d8f0d2; } h1 .status.failed { background: #f8d0d0; }
h1 .status.cancelled { background: #f7e3bf; }
dl { display: flex; flex-wrap: wrap; gap: 4px 22px; margin: 0; }
.fact { display: flex; gap: 6px; } dt { color: var(--muted); } dd { margin: 0; font-weight: 600; }
.fact[data-fact=error] dd { font-weight: 400; color: var(--fail); white-space: pre-wrap;
       max-width: 100%; }
.fact[data-fact=cancelled] dd { font-weight: 400; white-space: pre-wrap; max-width: 100%; }
.controls { display: flex; flex-wrap: wrap; align-items: center; gap: 10px; padding: 8px 18px;
            background: #fff; border-bottom: 1px solid var(--line); }
.controls input[type=search] { width: 240px; padding: 3px 6px; }
.controls button { padding: 2px 9px; }
.legend { display: flex; gap: 12px; flex-wrap: wrap; color: var(--muted); }
.legend span { display: inline-flex; align-items: center; gap: 4px; }
.legend svg { overflow: visible; }
.sw { display: inline-block; width: 14px; height: 9px; border-radius: 2px; }
.barrier-label { font-size: 11px; }
#axis-wrap { overflow: hidden; background: #fff; border-bottom: 1px solid var(--line);
             position: sticky; top: 0; z-index: 2; }
#chart-wrap { overflow: auto; max-height: calc(100vh - 190px); background: #fff; }
svg text { font-size: 11px; fill: var(--ink); }
.label { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 10.5px; }
.type-header text { font-weight: 700; } .type-header { cursor: pointer; }
.grid { stroke: var(--line); }
.bar.failed { stroke: var(--fail); stroke-width: 1.5; }
.bar.open { stroke: #000; stroke-dasharray: 2 2; }
.quiesce { fill: var(--q); }
.cut-at { stroke: #000; stroke-width: 1.5; } .cut-at.cc { stroke: var(--fail); }
.barrier { stroke-width: 1.3; stroke-dasharray: 5 3; }
.barrier.cut { stroke: #7b2cbf; } .barrier.main { stroke: #1b7f3b; }
.abort { stroke: var(--fail); stroke-width: 1.5; }
.thaw-failed { fill: var(--fail); }
.status-failed .label, .status-thaw_failed .label { fill: var(--fail); font-weight: 700; }
#empty { padding: 20px; color: var(--muted); }
"""

_JS = r"""
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("timeline-data").textContent);
  const COLORS = ["var(--pb)", "var(--pf)", "var(--mn)", "var(--cp)"];
  const LABEL_W = 300, ROW_H = 16, BAR_H = 10, HEAD_H = 18, AXIS_H = 30, LANE_H = 14;
  // Sections of more than BIG rows start collapsed ("auto"); a filter or "only failed"
  // opens them while it is on; a click on a header, or expand/collapse all, decides.
  const BIG = 50;
  const state = { zoom: 1, filter: "", collapsed: new Set(), auto: new Set(),
                  onlyProblems: false };
  const esc = (s) => String(s).replace(/[&<>"']/g,
    (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
  const fmt = (s) => s >= 1 ? s.toFixed(3) + " s" : (s * 1000).toFixed(2) + " ms";

  // Per row: its bars, cuts, quiesce windows, thaw failures.
  const per = D.rows.map(() => ({ bars: [], cuts: [], quiesce: [], tf: [] }));
  D.bars.forEach((b) => per[b[0]].bars.push(b));
  D.cuts.forEach((c) => per[c[0]].cuts.push(c));
  D.quiesce.forEach((q) => per[q[0]].quiesce.push(q));
  D.thawFailed.forEach((t) => per[t[0]].tf.push(t));
  const firstStart = (i) => per[i].bars.reduce((m, b) => Math.min(m, b[2]), Infinity);
  const types = new Map();
  D.rows.forEach((r, i) => { if (!types.has(r[0])) types.set(r[0], []); types.get(r[0]).push(i); });
  types.forEach((rows) => rows.sort((a, b) => firstStart(a) - firstStart(b) || a - b));
  types.forEach((rows, t) => { if (rows.length > BIG) state.auto.add(t); });
  const isClosed = (t) => state.collapsed.has(t) ||
    (state.auto.has(t) && !state.filter && !state.onlyProblems);
  const end = Math.max(D.end, 1e-6);

  function niceStep(span, target) {
    const raw = span / target, p = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 5, 10]) if (m * p >= raw) return m * p;
    return 10 * p;
  }
  function visible(i) {
    const r = D.rows[i];
    if (state.onlyProblems && !["failed", "thaw_failed", "aborted", "cancelled", "skipped"]
        .includes(r[4])) return false;
    if (!state.filter) return true;
    return (r[0] + "#" + r[1] + " " + r[2] + " " + r[3] + " " + r[4]).toLowerCase()
      .includes(state.filter);
  }

  function render() {
    const wrap = document.getElementById("chart-wrap");
    const width = Math.max(600, (wrap.clientWidth || 1000) - LABEL_W - 24) * state.zoom;
    const x = (t) => LABEL_W + (t / end) * width;
    const total = LABEL_W + width + 12;
    let y = 0, body = "", shown = 0;
    types.forEach((rows, type) => {
      const vis = rows.filter(visible);
      if (!vis.length) return;
      const closed = isClosed(type);
      // The type's header row: the span of each hook over its resources.
      let head = `<g class="type-header" data-type="${esc(type)}" transform="translate(0,${y})">` +
        `<rect x="0" y="0" width="${total}" height="${HEAD_H}" fill="#eef1f5"/>` +
        `<text x="6" y="13">${closed ? "\u25b8" : "\u25be"} ${esc(type)} (${vis.length})` +
        `${closed ? " \u2014 click to expand" : ""}</text>`;
      for (let h = 0; h < 4; h++) {
        let lo = Infinity, hi = -Infinity;
        vis.forEach((i) => per[i].bars.forEach((b) => {
          if (b[1] === h) { lo = Math.min(lo, b[2]); hi = Math.max(hi, b[3]); } }));
        if (lo <= hi) {
          head += `<rect x="${x(lo)}" y="${3 + h * 3}" width="${Math.max(1, x(hi) - x(lo))}"` +
            ` height="3" fill="${COLORS[h]}"><title>${esc(D.hooks[h])}: ${fmt(lo)} \u2192 ` +
            `${fmt(hi)}</title></rect>`;
        }
      }
      body += head + "</g>";
      y += HEAD_H;
      if (closed) return;
      vis.forEach((i, n) => {
        const r = D.rows[i], p = per[i], mid = ROW_H / 2;
        let g = `<g class="row status-${esc(r[4])}" data-resource="${esc(r[0] + "#" + r[1])}"` +
          ` data-status="${esc(r[4])}" transform="translate(0,${y})">`;
        if (n % 2) g += `<rect x="0" y="0" width="${total}" height="${ROW_H}" fill="#f7f8fa"/>`;
        p.quiesce.forEach((q) => {
          g += `<rect class="quiesce" x="${x(q[1])}" y="0"` +
            ` width="${Math.max(1, x(q[2]) - x(q[1]))}" height="${ROW_H}">` +
            `<title>frozen ${fmt(q[2] - q[1])}${q[3] ? "" : " (not thawed)"}</title></rect>`;
        });
        p.bars.forEach((b) => {
          const w = Math.max(1.5, x(b[3]) - x(b[2]));
          const cls = "bar hook-" + b[1] + (b[4] === "failed" ? " failed" : "") +
            (b[4] === "open" ? " open" : "");
          const fill = b[4] === "failed" ? "url(#hatch)" : COLORS[b[1]];
          g += `<rect class="${cls}" data-hook="${esc(D.hooks[b[1]])}" x="${x(b[2])}"` +
            ` y="${(ROW_H - BAR_H) / 2}" width="${w}" height="${BAR_H}" fill="${fill}"` +
            ` fill-opacity="${b[6] ? 0.45 : 0.9}"><title>${esc(D.hooks[b[1]])}` +
            `${b[5] > 1 ? " (attempt " + b[5] + ")" : ""}${b[6] ? " (aborting)" : ""}: ` +
            `${fmt(b[2])} \u2192 ${fmt(b[3])} (${fmt(b[3] - b[2])}) ${esc(b[4])}` +
            `${b[7] ? "\n" + esc(b[7]) : ""}</title></rect>`;
        });
        p.cuts.forEach((c) => {
          g += `<line class="cut-at${c[2] ? " cc" : ""}" x1="${x(c[1])}" x2="${x(c[1])}" y1="1"` +
            ` y2="${ROW_H - 1}"><title>cut at ${fmt(c[1])}${c[2] ? " (crash-consistent)" : ""}` +
            `</title></line><path class="cut-mark" d="M${x(c[1]) - 3},0 L${x(c[1]) + 3},0 ` +
            `L${x(c[1])},4 Z" fill="#000"/>`;
        });
        p.tf.forEach((t) => {
          g += `<circle class="thaw-failed" cx="${x(t[1])}" cy="${mid}" r="4">` +
            `<title>THAW FAILED at ${fmt(t[1])}</title></circle>`;
        });
        const name = r[2] && r[2] !== r[1] ? " " + r[2] : "";
        g += `<text class="label" x="14" y="${mid + 4}">${esc(r[1] + name)}` +
          `<title>${esc(r[0] + "#" + r[1] + name + " \u2014 " + r[4] +
          (r[3] ? ", group " + r[3] : ""))}</title></text></g>`;
        body += g;
        y += ROW_H;
        shown++;
      });
    });
    const height = Math.max(y, 1);
    let lines = "";
    D.barriers.forEach((b) => {
      lines += `<line class="barrier ${esc(b[1])}" data-barrier="${esc(b[1])}" x1="${x(b[2])}"` +
        ` x2="${x(b[2])}" y1="0" y2="${height}"><title>${esc(b[1])} barrier of ${esc(b[0])}` +
        ` released at ${fmt(b[2])}</title></line>`;
    });
    D.aborts.forEach((a) => {
      lines += `<line class="abort" x1="${x(a[2])}" x2="${x(a[2])}" y1="0" y2="${height}">` +
        `<title>group ${esc(a[0])} aborting (${esc(a[1])}) at ${fmt(a[2])}</title></line>`;
    });
    // Axis ticks (also as faint grid lines in the chart).
    const step = niceStep(end / state.zoom, 10);
    let ticks = "", grid = "";
    for (let t = 0; t <= end + 1e-12; t += step) {
      ticks += `<line x1="${x(t)}" x2="${x(t)}" y1="${AXIS_H - 6}" y2="${AXIS_H}" stroke="#999"/>` +
        `<text x="${x(t) + 2}" y="${AXIS_H - 8}">${fmt(t)}</text>`;
      grid += `<line class="grid" x1="${x(t)}" x2="${x(t)}" y1="0" y2="${height}"/>`;
    }
    let labels = "";
    D.barriers.forEach((b) => {
      labels += `<text x="${x(b[2]) - 4}" y="10" class="barrier-label" data-barrier="` +
        `${esc(b[1])}" fill="${b[1] === "cut" ? "#7b2cbf" : "#1b7f3b"}">\u25bc ${esc(b[1])}` +
        `${D.barriers.length < 6 ? " (" + esc(b[0]) + ")" : ""}` +
        `<title>${esc(b[1])} barrier of ${esc(b[0])} released at ${fmt(b[2])}</title></text>`;
    });
    document.getElementById("axis").outerHTML =
      `<svg id="axis" width="${total}" height="${AXIS_H}" xmlns="http://www.w3.org/2000/svg">` +
      `<g id="barrier-labels">${labels}</g><g id="axis-ticks">` +
      `<text x="6" y="${AXIS_H - 8}" fill="#666">resource</text>${ticks}</g></svg>`;
    layBarrierLabels();
    const defs = `<defs><pattern id="hatch" width="5" height="5" patternUnits="userSpaceOnUse"` +
      ` patternTransform="rotate(45)"><rect width="5" height="5" fill="#f4b6b6"/>` +
      `<line x1="0" y1="0" x2="0" y2="5" stroke="#d62728" stroke-width="2.5"/></pattern></defs>`;
    document.getElementById("chart").outerHTML =
      `<svg id="chart" width="${total}" height="${height}" xmlns="http://www.w3.org/2000/svg"` +
      ` data-rows="${shown}">${defs}${grid}${body}${lines}</svg>`;
    document.getElementById("shown").textContent =
      `${shown} of ${D.rows.length} resources shown`;
    document.getElementById("chart").addEventListener("click", (ev) => {
      const h = ev.target.closest(".type-header");
      if (!h) return;
      const t = h.getAttribute("data-type");
      if (isClosed(t)) { state.collapsed.delete(t); state.auto.delete(t); }
      else state.collapsed.add(t);
      render();
    });
    document.body.setAttribute("data-rendered", "true");
  }

  // Barrier labels that would overlap go on lanes of their own, above the time ticks,
  // so two barriers released close together are both readable.
  function layBarrierLabels() {
    const axis = document.getElementById("axis");
    const found = [...axis.querySelectorAll(".barrier-label")];
    const placed = found.map((el) => ({ el, x: el.getBBox().x, w: el.getBBox().width }))
      .sort((a, b) => a.x - b.x);
    const laneEnds = [];
    placed.forEach((p) => {
      let lane = laneEnds.findIndex((e) => e + 6 <= p.x);
      if (lane < 0) { lane = laneEnds.length; laneEnds.push(0); }
      laneEnds[lane] = p.x + p.w;
      p.el.setAttribute("y", String(11 + lane * LANE_H));
    });
    // The ticks' text goes below the last lane (a lane is LANE_H high, text ~11 px).
    const extra = laneEnds.length ? laneEnds.length * LANE_H - 9 : 0;
    axis.setAttribute("height", String(AXIS_H + extra));
    axis.querySelector("#axis-ticks").setAttribute("transform", `translate(0,${extra})`);
  }

  const wrap = document.getElementById("chart-wrap");
  wrap.addEventListener("scroll", () => {
    document.getElementById("axis-wrap").scrollLeft = wrap.scrollLeft; });
  function zoomBy(f) { state.zoom = Math.min(200, Math.max(1, state.zoom * f)); render(); }
  document.getElementById("zoom-in").onclick = () => zoomBy(2);
  document.getElementById("zoom-out").onclick = () => zoomBy(0.5);
  document.getElementById("zoom-fit").onclick = () => { state.zoom = 1; render(); };
  document.getElementById("collapse").onclick = () => {
    types.forEach((_r, t) => state.collapsed.add(t)); render(); };
  document.getElementById("expand").onclick = () => {
    state.collapsed.clear(); state.auto.clear(); render(); };
  document.getElementById("problems").onchange = (ev) => {
    state.onlyProblems = ev.target.checked; render(); };
  document.getElementById("filter").oninput = (ev) => {
    state.filter = ev.target.value.trim().toLowerCase(); render(); };
  wrap.addEventListener("wheel", (ev) => {
    if (!ev.ctrlKey) return;
    ev.preventDefault();
    zoomBy(ev.deltaY < 0 ? 1.25 : 0.8);
  }, { passive: false });
  window.addEventListener("resize", render);
  render();
})();
"""

_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<title>karbor-async: @@TITLE@@</title>
<style>@@STYLE@@</style>
</head>
<body>
<header>
<h1>karbor-async timeline: @@TITLE@@ <span class="status @@STATUS@@">@@STATUS@@</span></h1>
<dl>
@@FACTS@@
</dl>
</header>
<div class="controls">
  <input id="filter" type="search" placeholder="filter: type, id, name, group, status">
  <label><input id="problems" type="checkbox"> only failed/aborted</label>
  <span>zoom <button id="zoom-out" title="zoom out">&minus;</button>
  <button id="zoom-in" title="zoom in (or Ctrl+wheel)">+</button>
  <button id="zoom-fit">fit</button></span>
  <button id="collapse">collapse types</button><button id="expand">expand all</button>
  <span id="shown"></span>
  <span class="legend">
    <span><i class="sw" style="background:var(--pb)"></i>on_prepare_begin</span>
    <span><i class="sw" style="background:var(--pf)"></i>on_prepare_finish</span>
    <span><i class="sw" style="background:var(--mn)"></i>on_main</span>
    <span><i class="sw" style="background:var(--cp)"></i>on_complete</span>
    <span><i class="sw" style="background:#f4b6b6;outline:1.5px solid var(--fail)"></i>failed</span>
    <span data-legend="open"><svg width="16" height="10"><rect class="bar open" x="1" y="1"
      width="14" height="8" fill="var(--mn)" fill-opacity="0.9"/></svg>never ended
      (abandoned, or still running)</span>
    <span data-legend="aborting"><svg width="16" height="10"><rect class="bar" x="1" y="1"
      width="14" height="8" fill="var(--pf)" fill-opacity="0.45"/></svg>aborting call
      (a thaw while the group aborts)</span>
    <span><i class="sw" style="background:var(--q)"></i>quiesced (frozen)</span>
    <span>&#9660;| cut</span>
    <span style="color:#7b2cbf">&#9476; cut barrier</span>
    <span style="color:#1b7f3b">&#9476; main barrier</span>
  </span>
</div>
<div id="axis-wrap"><svg id="axis"></svg></div>
<div id="chart-wrap"><svg id="chart"></svg></div>
<noscript><p id="empty">The chart is drawn by the JavaScript in this file; enable it to see
the timeline.</p></noscript>
<script type="application/json" id="timeline-data">@@DATA@@</script>
<script>@@SCRIPT@@</script>
</body>
</html>
"""
