"""Rendering a run's progress and outcome for people (rich on a terminal, plain lines otherwise)."""

from __future__ import annotations

import enum
import statistics as stats
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, contextmanager, nullcontext
from typing import Any, TypeVar

import anyio
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from karbor_async._cli_output import FIGURES_DOC, format_count, resource_name
from karbor_async._scheduler import Run, RunStatistics
from karbor_async._types import Hook, OperationKind, ResourceStatus
from karbor_async.events import Event, EventKind, Progress
from karbor_async.store import RunOutcome

__all__ = [
    "BarrierLines",
    "Display",
    "Notices",
    "barrier_line",
    "follow_run",
    "outcome_tables",
    "phase_table",
    "show_progress",
]

T = TypeVar("T")

_HOOK_SHORT = {
    Hook.PREPARE_BEGIN: "prepare_begin",
    Hook.PREPARE_FINISH: "prepare_finish",
    Hook.MAIN: "main",
    Hook.COMPLETE: "complete",
}


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f} ms"


def _barriers_text(s: RunStatistics) -> str:
    released, pending = s.barriers_released, s.barriers_pending
    if not released and not pending:
        return "barriers: none (barrier policy none)"
    if len(released) + len(pending) <= 4:
        said = [f"{b} released" for b in released] + [f"{b} waiting" for b in pending]
        return "barriers: " + ", ".join(said)
    return f"barriers: {len(released)} of {len(released) + len(pending)} released"


def _stats_line(s: RunStatistics) -> str:
    """The status line: where the run stands (docs/cli.md, "Progress and output")."""
    done = sum(
        v
        for k, v in s.by_status.items()
        if k not in (ResourceStatus.PENDING, ResourceStatus.RUNNING)
    )
    running = ", ".join(f"{_HOOK_SHORT[h]} {n}" for h, n in s.running.items()) or "idle"
    parts = [
        f"{s.operation.value} {s.elapsed:6.2f}s",
        f"{done}/{s.resources} done",
        f"running: {running}",
        f"frozen {s.frozen}",
        f"cuts {s.cuts}" + (f" skew {_ms(s.skew)}" if s.skew is not None else ""),
    ]
    if s.mains_done or s.mains_running or s.mains_waiting:
        what = "copies" if s.operation is OperationKind.PROTECT else "on_main"
        parts.append(
            f"{what}: {s.mains_done} done, {s.mains_running} running, {s.mains_waiting} waiting"
        )
    if s.bytes_total:
        parts.append(
            f"data {format_count(s.bytes_done)} of {format_count(s.bytes_total)} "
            f"(over the {s.reporting} that reported a total)"
        )
    parts.append(_barriers_text(s))
    return "  ".join(parts)


class Display(enum.Enum):
    """How a run's progress is shown while it executes."""

    LIVE = "live"
    """A rich live view (a terminal): status line, barrier releases, per-resource rows."""
    PLAIN = "plain"
    """A status line per second and a line per barrier release (logs, pipes)."""
    QUIET = "quiet"
    """Nothing (``--json``: the result is printed once at the end)."""


def _fraction(prog: Progress | None) -> float | None:
    if prog is None:
        return None
    if prog.fraction is not None:
        return max(0.0, min(1.0, prog.fraction))
    if prog.total:
        return max(0.0, min(1.0, (prog.done or 0) / prog.total))
    return None


def _live_view(s: RunStatistics, rows: int) -> Group:
    table = Table(box=None, pad_edge=False, show_header=True, header_style="bold", expand=False)
    table.add_column("resource", no_wrap=True, overflow="ellipsis", max_width=48)
    table.add_column("phase", no_wrap=True)
    table.add_column("progress", no_wrap=True, width=24)
    table.add_column("", justify="right", no_wrap=True, overflow="ellipsis", max_width=40)

    # Calls making progress first (a copy under way before the ones waiting for a slot).
    def order(entry: tuple[Any, Hook, Progress | None]) -> int:
        frac = _fraction(entry[2])
        return 0 if frac is not None and frac < 1 else 1 if entry[2] is not None else 2

    for res, hook, prog in sorted(s.active, key=order)[:rows]:
        frac = _fraction(prog)
        bar: ProgressBar | str = ""
        pct = ""
        if frac is not None:
            bar = ProgressBar(total=1.0, completed=frac, width=22)
            pct = f"{frac:.0%}"
        if prog is not None and prog.message:
            pct = f"{pct} {prog.message}".strip()
        table.add_row(resource_name(res), _HOOK_SHORT[hook], bar, pct)
    more = sum(s.running.values()) - min(len(s.active), rows)
    parts: list[RenderableType] = [Text(_stats_line(s), style="cyan"), table]
    if more > 0:
        parts.append(Text(f"... and {more} more hooks running", style="dim"))
    return Group(*parts)


class Notices:
    """Messages to the operator while a run is shown (the Ctrl-C acknowledgements).

    On a terminal the live view redraws itself over whatever is written around it,
    so while it runs a notice goes through the live view's console, which prints
    it above the view at once; otherwise (plain lines, a redirected stderr) to stderr.
    """

    def __init__(self, err: Console) -> None:
        self._err = err
        self._live: Live | None = None

    def say(self, message: str) -> None:
        live = self._live
        if live is not None and live.is_started and self._err.is_terminal:
            live.console.print(message, highlight=False)
        else:
            self._err.print(message, highlight=False)

    @contextmanager
    def over(self, live: Live) -> Iterator[None]:
        """Notices go through ``live`` while it shows."""
        self._live = live
        try:
            yield
        finally:
            self._live = None


async def show_progress(
    run: Run,
    console: Console,
    display: Display,
    *,
    interval: float = 0.1,
    notices: Notices | None = None,
) -> None:
    """Show the run's statistics until cancelled (call it beside the run's execution).

    It only polls :meth:`Run.statistics`, so the engine pays nothing per event for it.
    """
    if display is Display.QUIET:
        await anyio.sleep_forever()
    if display is Display.LIVE:
        rows = max(4, min(40, console.size.height - 8))
        with (
            Live(console=console, refresh_per_second=10, transient=True) as view,
            notices.over(view) if notices is not None else nullcontext(),
        ):
            while True:
                view.update(_live_view(run.statistics(limit=rows * 5), rows))
                await anyio.sleep(interval)
    ticks = 0
    while True:
        await anyio.sleep(interval)
        ticks += 1
        if ticks % max(1, round(1.0 / interval)) == 0:
            console.print(_stats_line(run.statistics()), highlight=False)


class BarrierLines:
    """A line per barrier release, at the instant its ``BARRIER_RELEASED`` event says
    (relative to the run's start), with the cuts the group had returned by then."""

    def __init__(self, console: Console) -> None:
        self._console = console
        self._t0: float | None = None
        self._cuts: dict[str | None, list[float]] = {}
        self.finished = anyio.Event()

    def seen(self, e: Event) -> None:
        if e.kind is EventKind.RUN_STARTED or self._t0 is None:
            self._t0 = e.mono
        if e.kind is EventKind.CUT:
            at = e.data.get("at")
            self._cuts.setdefault(e.group, []).append(at if isinstance(at, float) else e.mono)
        elif e.kind is EventKind.BARRIER_RELEASED:
            self._console.print(barrier_line(e, self._t0, self._cuts.get(e.group, [])))
        elif e.kind is EventKind.RUN_FINISHED:
            self.finished.set()

    async def follow(self, events: AbstractAsyncContextManager[AsyncIterator[Event]]) -> None:
        async with events as stream:
            async for e in stream:
                self.seen(e)
                if self.finished.is_set():
                    return


def barrier_line(e: Event, t0: float | None, cuts: Sequence[float]) -> str:
    """``main barrier of group G released at 54.29 ms (20 cuts returned, skew 1.95 ms)``."""
    which = e.data.get("barrier")
    when = _ms(e.mono - t0) if t0 is not None else "?"
    if which == "cut":
        after = "every quiesce of the group returned: its cuts start"
    else:
        skew = _ms(max(cuts) - min(cuts)) if cuts else "-"
        after = f"{len(cuts)} cuts returned, skew {skew}: its copies start"
    return f"{which} barrier of group {e.group} released at {when} ({after})"


async def follow_run(
    run: Run,
    execute: Callable[[], Awaitable[T]],
    console: Console,
    *,
    display: Display,
    beside: Callable[[], Coroutine[Any, Any, None]] | None = None,
    interval: float = 0.1,
    notices: Notices | None = None,
    events: Callable[[], AbstractAsyncContextManager[AsyncIterator[Event]]] | None = None,
) -> T:
    """Execute the run while showing its progress; return its result or raise its error.

    ``beside`` runs alongside (the CLI's Ctrl-C watcher) and is cancelled with the display.
    ``events`` opens the run's event stream (``engine.subscribe(run.run_id)``): its
    barrier releases are printed as lines (not under ``Display.QUIET``); the display
    waits up to a second after the run for the stream to reach ``RUN_FINISHED``.
    The run's own exception (``RunError``) is raised as is, not wrapped in a group.
    """
    result: list[T] = []
    failure: list[BaseException] = []
    lines = BarrierLines(console) if events is not None and display is not Display.QUIET else None

    async def runner(stop: Callable[[], None]) -> None:
        try:
            result.append(await execute())
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as exc:  # re-raised below, outside the task group
            # (a hook's KeyboardInterrupt too: execute re-raises it once all is thawed)
            failure.append(exc)
        if lines is not None and run.statistics(limit=0).elapsed > 0:
            with anyio.move_on_after(1.0):
                await lines.finished.wait()
        stop()

    async with anyio.create_task_group() as tg:
        tg.start_soon(runner, tg.cancel_scope.cancel)
        if beside is not None:
            tg.start_soon(beside)
        if lines is not None and events is not None:
            tg.start_soon(lines.follow, events())
        await show_progress(run, console, display, interval=interval, notices=notices)
    if failure:
        raise failure[0]
    return result[0]


def phase_table(events: Sequence[Event]) -> Table:
    """What each phase did: hooks run, first start, last end, relative to the run's start."""
    t0 = events[0].mono if events else 0.0
    spans: dict[Hook, list[float]] = {}
    counts: dict[Hook, int] = {}
    releases: list[str] = []
    for e in events:
        if e.hook is not None and e.kind in (EventKind.STARTED, EventKind.FINISHED):
            span = spans.setdefault(e.hook, [e.mono, e.mono])
            span[0] = min(span[0], e.mono)
            span[1] = max(span[1], e.mono)
            if e.kind is EventKind.FINISHED:
                counts[e.hook] = counts.get(e.hook, 0) + 1
        if e.kind is EventKind.BARRIER_RELEASED:
            releases.append(f"{e.data.get('barrier')} barrier of {e.group} at {_ms(e.mono - t0)}")
    table = Table(title="What each phase did", caption="; ".join(releases) or None)
    table.add_column("phase")
    table.add_column("hooks run", justify="right")
    table.add_column("first start", justify="right")
    table.add_column("last end", justify="right")
    for hook in Hook:
        if hook in spans:
            first, last = spans[hook]
            table.add_row(hook.value, str(counts.get(hook, 0)), _ms(first - t0), _ms(last - t0))
    return table


def outcome_tables(outcome: RunOutcome) -> list[Table]:
    """Per-type status counts, and per-group skew and quiesce windows."""
    by_type: dict[str, dict[ResourceStatus, int]] = {}
    for r in outcome.resources.values():
        row = by_type.setdefault(r.resource.type, {})
        row[r.status] = row.get(r.status, 0) + 1
    statuses = [s for s in ResourceStatus if any(s in row for row in by_type.values())]
    kinds = Table(title=f"{outcome.operation.value} run {outcome.run_id}: {outcome.status.value}")
    kinds.add_column("resource type")
    for s in statuses:
        kinds.add_column(s.value, justify="right")
    for rtype, row in sorted(by_type.items()):
        kinds.add_row(rtype, *(str(row.get(s, 0)) for s in statuses))
    tables = [kinds]
    if any(g.cuts for g in outcome.groups.values()):
        groups = Table(title="Consistency", caption=f"what these figures mean: {FIGURES_DOC}")
        for col in ("group", "barrier", "cuts", "skew", "quiesce windows (median / max)", "mode"):
            groups.add_column(col)
        windows_by_group: dict[str, list[float]] = {}
        for r in outcome.resources.values():
            if r.quiesce_window is not None:
                windows_by_group.setdefault(r.group, []).append(r.quiesce_window)
        for g in outcome.groups.values():
            w = windows_by_group.get(g.name, [])
            wtext = f"{_ms(stats.median(w))} / {_ms(max(w))} ({len(w)})" if w else "-"
            mode = "crash-consistent" if g.crash_consistent else "application-consistent"
            if g.aborted is not None:
                mode = f"aborted ({g.aborted.value})"
            groups.add_row(
                g.name, g.barrier.value, f"{g.cuts} of {g.resources}", _ms(g.skew), wtext, mode
            )
        tables.append(groups)
    return tables
