"""What the CLI says about a run's results, in words: names, failure lines, and what each
figure of a summary means (the demo prints them; any later demo or command reuses them).

Rendering of progress while a run executes is in ``_progress``; this module only turns
outcomes into sentences. Every explanation ends with the section of ``docs/cli.md``
that says more (:data:`FIGURES_DOC`).
"""

from __future__ import annotations

import statistics as stats
from collections.abc import Sequence
from typing import Any

from karbor_async._types import BarrierPolicy, Resource, ResourceStatus, RunStatus
from karbor_async.events import Event, EventKind
from karbor_async.store import GroupOutcome, ResourceOutcome, RunOutcome

__all__ = [
    "FIGURES_DOC",
    "cancel_summary",
    "explain_consistency",
    "failure_line",
    "format_count",
    "format_ms",
    "frozen_when_cancelled",
    "resource_name",
]

FIGURES_DOC = "docs/cli.md#what-the-figures-mean"
"""Where the figures of a run's summary are explained at length."""


def resource_name(resource: Resource) -> str:
    """``TYPE#ID``, as plans, events and errors write a resource."""
    return f"{resource.type}#{resource.id}"


def format_ms(seconds: float | None) -> str:
    """A duration for people: milliseconds under a second, seconds above."""
    if seconds is None:
        return "-"
    return f"{seconds:.3f} s" if seconds >= 1 else f"{seconds * 1000:.2f} ms"


def format_count(n: int) -> str:
    """A compact count (``81.9k``, ``1.2M``) for progress totals of unknown unit."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= 10 * size or (suffix != "k" and abs(n) >= size):
            return f"{n / size:.1f}{suffix}"
    return f"{n:,}"


def failure_line(r: ResourceOutcome) -> str:
    """``TYPE#ID HOOK: ExceptionType: message`` for a failed resource: its first error.

    The stored error is the formatted exception chain, outermost last: a ``HookError``
    whose message already starts with the resource and hook; that prefix is said once.
    """
    hook = r.failed_hook.value if r.failed_hook is not None else r.status.value
    name = resource_name(r.resource)
    lines = [line for line in (r.error or "").strip().splitlines() if line.strip()]
    if not lines:
        return f"{name} {hook}: {r.status.value}"
    last = lines[-1].strip()
    qualified, sep, message = last.partition(": ")
    kind = qualified.rsplit(".", 1)[-1]
    if not sep or " " in qualified:  # not "module.Type: message": show it as it is
        return f"{name} {hook}: {last}"
    legacy = f"{r.resource.type}:{r.resource.id}"  # (how errors stored before 0.1 wrote it)
    for prefix in (f"{name} {hook}: ", f"{legacy} {hook}: "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
            if kind == "HookError":  # the plain wrapper: the rest is "PluginType: message"
                return f"{name} {hook}: {message}"
            break
    return f"{name} {hook}: {kind}: {message}"


def cancel_summary(outcome: RunOutcome, frozen_at_cancel: int | None) -> str:
    """What a cancelled run left frozen, from the count frozen when it was cancelled."""
    stuck = [r for r in outcome.resources.values() if r.status is ResourceStatus.THAW_FAILED]
    if stuck:
        names = ", ".join(resource_name(r.resource) for r in stuck[:10])
        return (
            f"ALERT: {len(stuck)} resources may still be frozen (every thaw failed): {names}; "
            "see `karbor-async events` for the errors"
        )
    if not frozen_at_cancel:
        quiesced = sum(1 for r in outcome.resources.values() if r.quiesced_at is not None)
        if quiesced:
            return (
                f"nothing was frozen when it was cancelled (the {quiesced} resources it had "
                "quiesced were already thawed)"
            )
        return "nothing was frozen when it was cancelled"
    return f"every resource frozen when it was cancelled was thawed ({frozen_at_cancel})"


def frozen_when_cancelled(events: Sequence[Event]) -> int | None:
    """How many resources were frozen when the run was cancelled, from its events (the
    first ``GROUP_ABORTING`` whose reason is ``cancelled``); None if it was not."""
    cancelled = next(
        (
            e.mono
            for e in events
            if e.kind is EventKind.GROUP_ABORTING and e.data.get("reason") == "cancelled"
        ),
        None,
    )
    if cancelled is None:
        return None
    frozen: set[object] = set()
    for e in events:
        if e.mono > cancelled:
            break
        at = e.data.get("at")
        if isinstance(at, float) and at > cancelled:
            continue
        if e.kind is EventKind.QUIESCED:
            frozen.add(e.resource)
        elif e.kind is EventKind.THAWED:
            frozen.discard(e.resource)
    return len(frozen)


def _cuts_line(g: GroupOutcome, resources: Sequence[ResourceOutcome]) -> str:
    without: dict[str, int] = {}
    for r in resources:
        if r.cut_at is None:
            without[r.resource.type] = without.get(r.resource.type, 0) + 1
    others = ", ".join(f"{t} {n}" for t, n in sorted(without.items()))
    rest = f"; the {g.resources - g.cuts} others ({others}) take no snapshot" if others else ""
    return (
        f"cuts {g.cuts} of {g.resources}: resources of group {g.name} whose snapshot (the cut) "
        f"was taken{rest}. Good: every resource of a snapshotting type has one"
    )


def _skew_line(g: GroupOutcome) -> str:
    if g.barrier is BarrierPolicy.CUT:
        good = "a few ms, the storage's own jitter: the cut barrier started them together"
    else:
        good = "small; barrier cut (not " + g.barrier.value + ") starts the cuts together"
    return (
        f"skew {format_ms(g.skew)}: the time between the first and the last cut of group "
        f"{g.name}, how far apart the images are. Good: {good}"
    )


def _windows_line(windows: Sequence[float], budget: float | None) -> str:
    limit = f", well under the plan's quiesce_budget of {budget:g} s" if budget else ""
    return (
        f"quiesce windows {format_ms(stats.median(windows))} / {format_ms(max(windows))} "
        f"({len(windows)}): median and longest time a quiescing resource (a server) stayed "
        f"frozen, from its quiesce to its thaw: the pause its application felt. Good: short"
        f"{limit}; the longest is the one to watch"
    )


def _mode_line(g: GroupOutcome) -> str:
    if g.aborted is not None:
        return (
            f"mode aborted ({g.aborted.value}): group {g.name} stopped before its cuts were all "
            "taken; its checkpoint is not usable"
        )
    if g.crash_consistent:
        return (
            "mode crash-consistent: some cut was taken after its servers had thawed (a quiesce "
            "budget ran out), like pulling the plug. Good: application-consistent"
        )
    return (
        "mode application-consistent: every cut was taken while the servers above it were "
        "quiesced, so applications restart without recovery. This is the good one"
    )


def explain_consistency(outcome: RunOutcome, budget: float | None = None) -> list[str]:
    """One line per figure of the consistency summary: what it means and what is good,
    and a last line pointing to the docs (empty when the run took no cut)."""
    if outcome.status is RunStatus.CANCELLED or not any(g.cuts for g in outcome.groups.values()):
        return []
    by_group: dict[str, list[ResourceOutcome]] = {}
    for r in outcome.resources.values():
        by_group.setdefault(r.group, []).append(r)
    lines: list[str] = []
    for g in outcome.groups.values():
        members = by_group.get(g.name, [])
        lines.append(
            f"barrier {g.barrier.value}: "
            + {
                BarrierPolicy.CUT: "no cut starts before every quiesce returned, and no copy "
                "before every cut returned: the shortest skew and quiesce windows",
                BarrierPolicy.MAIN: "no copy starts before every cut returned",
                BarrierPolicy.NONE: "no barrier: each resource goes at its own pace",
            }[g.barrier]
        )
        lines.append(_cuts_line(g, members))
        if g.skew is not None:
            lines.append(_skew_line(g))
        windows = [w for r in members if (w := r.quiesce_window) is not None]
        if windows:
            lines.append(_windows_line(windows, budget))
        lines.append(_mode_line(g))
    lines.append(f"More on each figure: {FIGURES_DOC}")
    return lines


def ledger_verdict(invariant: Any, protected: RunOutcome, missed: int) -> list[str]:
    """What the demo proved about the live two-shard application: whether the restored
    stores are consistent, with the figures that say what it cost (``invariant``: a
    ``karbor_ledger.Invariant`` of the restored pair)."""
    group = protected.groups.get("ledger")
    windows = [
        w
        for r in protected.resources.values()
        if r.group == "ledger" and (w := r.quiesce_window) is not None
    ]
    lines = [
        f"Verdict on the restored stores of the live application: {invariant.describe()}",
        f"  skew between the two stores' cuts: {format_ms(group.skew if group else None)} "
        "(the barrier cut both while both shards were paused)",
    ]
    if windows:
        lines.append(
            f"  the application's pause: the longest shard stayed paused {format_ms(max(windows))}"
            f"; shard A could not make {missed} transfer{'s' if missed != 1 else ''} meanwhile"
        )
    lines.append(
        "  Why it holds: a transfer debits shard A, then credits shard B; the two stores add up "
        "only if both were cut with no transfer in flight (plugins/ledger/README.md; what the "
        "barrier buys: benchmarks/CONSISTENCY.md)."
    )
    return lines
