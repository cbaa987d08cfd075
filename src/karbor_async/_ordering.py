"""The ordering core: Karbor's edges, the phase barriers, the abort rules, the limit order.

Pure: no anyio, no I/O, no clock, no threads; it imports only the standard
library's typing helpers, attrs and the enums of :mod:`karbor_async._types`.
So the local scheduler runs it in its tasks and a deterministic workflow
(Temporal's sandbox) can run the same rules.

The state is plain counters on two kinds of objects: a :class:`Gate` per
consistency group and a :class:`Slot` per resource. The local scheduler's
per-resource and per-group state extend them (``_node._Node``, ``_node._Group``),
so the counters cost no extra object or lookup. The functions below are the
inputs ("the on_prepare_begin of this slot is done", "this gate aborts") and
return the outputs: the slots whose wait just ended (so the driver wakes them)
and the barriers that opened.

The rules (DESIGN.md section 4):

- **Edges.** A child's ``on_prepare_begin`` starts after its parents'; a
  parent's ``on_prepare_finish`` after its children's; a parent's
  ``on_complete`` after its children's ``on_complete`` (and is skipped if one
  of them failed). A slot without an ``on_prepare_begin`` is done with it as
  soon as its parents are (so a wave passes through it in one step).
- **Barriers.** ``cut``: no ``on_prepare_finish`` of the gate before every
  ``on_prepare_begin`` of the gate is done, and no thaw (the ``on_prepare_finish``
  of a slot that quiesces) before every cut taken under a quiesce is done
  (:func:`hold_thaws`): quiesce everything, cut, then thaw. ``main`` and ``cut``: no
  ``on_main`` of the gate before every ``on_prepare_finish`` of the gate is
  done (the driver commits in between: :func:`open_main`).
- **Aborts.** Once a gate aborts, none of its hooks that has not started
  starts, except the aborting ``on_prepare_finish`` (the thaw) of each slot
  whose ``on_prepare_begin`` started, which does not wait for its children. A
  started non-aborting ``on_prepare_finish`` (a cut) is not interrupted; every
  other running hook of the gate is. A quiesce budget that runs out without
  the crash-consistent fallback aborts the gate; with it, the slot thaws at
  once and counts as finished, so its children's cuts still run.
- **Limits.** Concurrency limits are taken only once every edge into the hook
  is satisfied, always in name order (:func:`limit_order`), so they cannot
  deadlock.

:class:`Ordering` drives a whole run on these functions from inputs alone
(the property tests use it; so will the Temporal workflow). The local
scheduler does not need it: each resource's task is itself the sequence.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import Any, Generic, Self, TypeVar

import attrs

from karbor_async._types import AbortReason, BarrierPolicy, Hook

__all__ = [
    "Gate",
    "Ordering",
    "OrderingError",
    "Phase",
    "Slot",
    "abort",
    "begin_done",
    "complete_done",
    "finish_done",
    "held_at_cut",
    "held_at_main",
    "held_at_thaw",
    "hold_thaws",
    "opened_thaws",
    "interruptible",
    "limit_order",
    "link",
    "needs_thaw",
    "open_main",
    "settle",
]


@attrs.define(eq=False, slots=True)
class Gate:
    """A consistency group's barrier counters and abort state."""

    name: str
    policy: BarrierPolicy
    pending_pb: int = 0
    """Members whose on_prepare_begin is not yet done (the ``cut`` barrier waits on it)."""
    pending_pf: int = 0
    """Members whose on_prepare_finish is not yet done (the ``main`` barrier waits on it)."""
    pending_cuts: int = 0
    """Cuts under a quiesce not yet done (under ``cut``, thaws wait on it: :func:`hold_thaws`)."""
    cut_open: bool = False
    thaw_open: bool = True
    main_open: bool = False
    aborting: AbortReason | None = None


G = TypeVar("G", bound=Gate)


@attrs.define(eq=False, slots=True, kw_only=True)
class Slot(Generic[G]):
    """A resource's edge counters and where its prepare stands."""

    gate: G
    has_pb: bool = True
    """It has an on_prepare_begin to run (one without is done with it at once)."""
    parents: Sequence[Self] = attrs.field(default=(), init=False)
    children: Sequence[Self] = attrs.field(default=(), init=False)
    wait_pb: int = attrs.field(default=0, init=False)
    """Parents whose on_prepare_begin is not done."""
    wait_pf: int = attrs.field(default=0, init=False)
    """Children whose on_prepare_finish is not done."""
    wait_cp: int = attrs.field(default=0, init=False)
    """Children whose on_complete is not done (or skipped)."""
    signalled_pb: bool = attrs.field(default=False, init=False)
    signalled_pf: bool = attrs.field(default=False, init=False)
    signalled_cp: bool = attrs.field(default=False, init=False)
    child_failed: bool = attrs.field(default=False, init=False)
    pb_started: bool = attrs.field(default=False, init=False)
    """Its on_prepare_begin started: it is owed an on_prepare_finish whatever happens."""
    pf_started: bool = attrs.field(default=False, init=False)
    in_cut: bool = attrs.field(default=False, init=False)
    """A non-aborting on_prepare_finish runs: aborts do not interrupt it."""
    counts_cut: bool = attrs.field(default=False, init=False)
    """Its on_prepare_finish is a cut its gate's thaws wait for (:func:`hold_thaws`)."""
    waits_cuts: bool = attrs.field(default=False, init=False)
    """It quiesces: under ``cut`` its thaw waits for the gate's cuts."""


S = TypeVar("S", bound="Slot[Any]")

_NONE: tuple[Any, ...] = ()
"""What an input returns when it woke nothing (most do: no allocation then)."""


class OrderingError(Exception):
    """An input the rules do not allow (a start that is not allowed, an unknown call)."""


# -- building ---------------------------------------------------------------------------
def link(slots: Sequence[S], edges: Iterable[tuple[int, int]]) -> None:
    """Set the edges (parent index, child index) and every counter to its start."""
    parents: list[list[S]] = [[] for _ in slots]
    children: list[list[S]] = [[] for _ in slots]
    for p, c in edges:
        children[p].append(slots[c])
        parents[c].append(slots[p])
    for slot, ps, cs in zip(slots, parents, children, strict=True):
        slot.parents = tuple(ps)  # tuples: smaller, and most resources have none
        slot.children = tuple(cs)
        slot.wait_pb = len(ps)
        slot.wait_pf = slot.wait_cp = len(cs)
        gate = slot.gate
        gate.pending_pb += 1
        gate.pending_pf += 1


def hold_thaws(slots: Sequence[S], cuts: Sequence[bool], quiesces: Sequence[bool]) -> None:
    """Under ``cut``, make each quiescing slot's thaw wait for its gate's cuts.

    The cuts counted are those of slots that cut, do not quiesce, have a quiescing
    ancestor (so they are taken under a quiesce) and no quiescing descendant. The
    last condition keeps it free of cycles: such a cut's ``on_prepare_finish`` waits
    only for its descendants' (none of which is a thaw) and the ``cut`` barrier,
    never for a thaw. Call after :func:`link`.
    """
    if not any(s.gate.policy is BarrierPolicy.CUT for s in slots):
        return
    above, below = _quiesced_around(slots, quiesces)
    for i, s in enumerate(slots):
        g = s.gate
        if g.policy is not BarrierPolicy.CUT:
            continue
        if quiesces[i]:
            s.waits_cuts = True
        elif cuts[i] and above[i] and not below[i]:
            s.counts_cut = True
            g.pending_cuts += 1
            g.thaw_open = False


def _quiesced_around(slots: Sequence[S], quiesces: Sequence[bool]) -> tuple[list[bool], list[bool]]:
    """For each slot: whether a quiescing slot is among its ancestors, and among its
    descendants (itself excluded). One topological order (Kahn's, over the counts the
    slots already have), then one pass each way: linear, and no recursion (graphs are
    deep and wide)."""
    pos = {id(s): i for i, s in enumerate(slots)}
    kids = [[pos[id(c)] for c in s.children] for s in slots]
    waiting = [len(s.parents) for s in slots]
    order = [i for i, w in enumerate(waiting) if not w]
    for i in order:  # (grows while it is walked: each slot once its parents are in)
        for j in kids[i]:
            waiting[j] -= 1
            if not waiting[j]:
                order.append(j)
    above = [False] * len(slots)
    for i in order:
        if quiesces[i] or above[i]:
            for j in kids[i]:
                above[j] = True
    below = [False] * len(slots)
    for i in reversed(order):
        below[i] = any(quiesces[j] or below[j] for j in kids[i])
    return above, below


def limit_order(names: Iterable[str], limits: Iterable[str]) -> tuple[str, ...]:
    """The limits a hook takes (those of ``names`` that are limited), in the one order."""
    limited = set(limits)
    return tuple(name for name in sorted(set(names)) if name in limited)


# -- inputs -----------------------------------------------------------------------------
def begin_done(s: S) -> tuple[Sequence[S], Sequence[S]]:
    """``s``'s on_prepare_begin is done (or it left early): count it off.

    Returns the slots whose wait for their parents just ended, and the slots
    whose counting off opened their gate's ``cut`` barrier. A child without an
    on_prepare_begin is counted off here too, without waiting for its own turn,
    so the last quiesce of a gate opens its barrier in the same step.
    """
    if s.signalled_pb:
        return _NONE, _NONE
    if not s.children:  # a leaf (most resources): count it off its gate only
        s.signalled_pb = True
        g = s.gate
        g.pending_pb -= 1
        if g.pending_pb == 0 and g.policy is BarrierPolicy.CUT and g.aborting is None:
            g.cut_open = True
            return _NONE, [s]
        return _NONE, _NONE
    woken: list[S] = []
    opened: list[S] = []
    todo = [s]
    while todo:
        s = todo.pop()
        if s.signalled_pb:
            continue
        s.signalled_pb = True
        for c in s.children:
            c.wait_pb -= 1
            if c.wait_pb == 0:
                woken.append(c)
                if not c.has_pb:
                    todo.append(c)
        g = s.gate
        g.pending_pb -= 1
        if g.pending_pb == 0 and g.policy is BarrierPolicy.CUT and g.aborting is None:
            g.cut_open = True
            opened.append(s)
    return woken, opened


def finish_done(s: S) -> tuple[Sequence[S], bool]:
    """``s``'s on_prepare_finish is done (or it left early): release its parents.

    Returns the parents whose wait for their children just ended, and whether
    this was the last one of a gate that is not aborting (the driver commits,
    then calls :func:`open_main`).
    """
    s.signalled_pf = True
    woken: Sequence[S] = _NONE
    for p in s.parents:
        p.wait_pf -= 1
        if p.wait_pf == 0:
            woken = [*woken, p]
    g = s.gate
    if s.counts_cut:
        g.pending_cuts -= 1
        if g.pending_cuts == 0:
            g.thaw_open = True  # (the caller wakes the thaws: see opened_thaws)
    g.pending_pf -= 1
    return woken, g.pending_pf == 0 and g.aborting is None


def open_main(g: Gate) -> bool:
    """The gate's cuts are done and committed: whether ``on_main`` now waits for nothing
    else (False under ``none``, whose main waits only for its own finish)."""
    if g.policy is BarrierPolicy.NONE:
        return False
    g.main_open = True
    return True


def complete_done(s: S, *, failed: bool) -> Sequence[S]:
    """``s``'s on_complete is done, or was skipped or failed (``failed``): count it off
    its parents. Returns the parents whose wait just ended."""
    woken: Sequence[S] = _NONE
    if s.signalled_cp:
        return woken
    s.signalled_cp = True
    for p in s.parents:
        p.wait_cp -= 1
        if failed:
            p.child_failed = True
        if p.wait_cp == 0:
            woken = [*woken, p]
    return woken


def settle(s: S) -> tuple[Sequence[S], Sequence[S], Sequence[S], Sequence[S]]:
    """``s`` leaves early (aborted, abandoned): it still releases all that waits on it.

    Returns, as :func:`begin_done` does, the slots woken and the openers of a
    ``cut`` barrier, then the slots woken by its finish and by its complete. It
    opens no ``main`` barrier: it left because its gate aborts.
    """
    woken_pb, opened = begin_done(s)
    woken_pf: Sequence[S] = _NONE
    if not s.signalled_pf:
        woken_pf, _last = finish_done(s)
    return woken_pb, opened, woken_pf, complete_done(s, failed=True)


def abort(g: Gate, reason: AbortReason) -> bool:
    """The gate aborts (the first reason stands). True when it was not aborting yet."""
    if g.aborting is not None:
        return False
    g.aborting = reason
    return True


# -- what may run -------------------------------------------------------------------------
def held_at_cut(s: Slot[Any]) -> bool:
    """``s``'s on_prepare_finish waits for the gate's ``cut`` barrier."""
    g = s.gate
    return g.policy is BarrierPolicy.CUT and not g.cut_open


def held_at_thaw(s: Slot[Any]) -> bool:
    """``s``'s non-aborting on_prepare_finish (its thaw) waits for its gate's cuts."""
    return s.waits_cuts and not s.gate.thaw_open


def opened_thaws(s: Slot[Any]) -> bool:
    """``s``'s finish, just counted off, was the last cut its gate's thaws waited for."""
    return s.counts_cut and s.gate.pending_cuts == 0


def held_at_main(s: Slot[Any]) -> bool:
    """``s``'s on_main waits for the gate's ``main`` barrier."""
    g = s.gate
    return g.policy is not BarrierPolicy.NONE and not g.main_open


def needs_thaw(s: Slot[Any], *, after_failed_finish: bool = False) -> bool:
    """Whether ``s`` is owed its aborting on_prepare_finish: its begin started and no
    finish did (or its non-aborting finish failed, for a slot that quiesces)."""
    return s.pb_started and (not s.pf_started or after_failed_finish)


def interruptible(s: Slot[Any]) -> bool:
    """An abort of its gate interrupts what ``s`` runs (anything but a started cut)."""
    return not s.in_cut


# -- a whole run, from inputs -------------------------------------------------------------
class Phase(enum.Enum):
    """Where a slot stands in :class:`Ordering`."""

    WAIT_PB = "wait_pb"
    WAIT_PF = "wait_pf"
    WAIT_MAIN = "wait_main"
    WAIT_CP = "wait_cp"
    RUNNING = "running"
    THAW = "thaw"
    """Owed its aborting on_prepare_finish (ready, or running)."""
    DONE = "done"


@attrs.define(eq=False, slots=True, kw_only=True)
class _Seq(Slot[Gate]):
    """A slot of :class:`Ordering`: the hooks it has, and its place in the sequence."""

    index: int
    hooks: frozenset[Hook]
    quiesces: bool
    phase: Phase = Phase.WAIT_PB
    running: Hook | None = None
    aborting_call: AbortReason | None = None
    budget_fallback: bool = False


Start = tuple[int, Hook, AbortReason | None]
"""An allowed start: (slot index, hook, the abort reason of an aborting call or None)."""


class Ordering:
    """Drives a run from inputs alone: which hook may start, which barrier opened.

    Inputs: :meth:`start`, :meth:`finished`, :meth:`failed`, :meth:`abort`,
    :meth:`budget`. :attr:`ready` holds the starts now allowed; :meth:`start`
    refuses any other (:class:`OrderingError`). :attr:`interrupt` names the
    running calls an abort cancels (the driver reports each with
    :meth:`failed`, ``cancelled=True``); :attr:`released` lists the barriers
    opened, in order, as ``(gate, "cut" | "main")``.
    """

    def __init__(
        self,
        hooks: Sequence[frozenset[Hook]],
        edges: Iterable[tuple[int, int]],
        gate_of: Sequence[str],
        policies: dict[str, BarrierPolicy],
        *,
        quiesces: Sequence[bool] | None = None,
        cuts: Sequence[bool] | None = None,
    ) -> None:
        self.gates = {name: Gate(name, policy) for name, policy in policies.items()}
        self.slots = [
            _Seq(
                gate=self.gates[gate_of[i]],
                has_pb=Hook.PREPARE_BEGIN in h,
                index=i,
                hooks=h,
                quiesces=bool(quiesces[i]) if quiesces is not None else False,
            )
            for i, h in enumerate(hooks)
        ]
        link(self.slots, edges)
        if cuts is not None:
            hold_thaws(self.slots, cuts, [s.quiesces for s in self.slots])
        self._members: dict[str, list[_Seq]] = {name: [] for name in self.gates}
        for s in self.slots:
            self._members[s.gate.name].append(s)
        self.ready: dict[int, tuple[Hook, AbortReason | None]] = {}
        self.interrupt: list[int] = []
        self.released: list[tuple[str, str]] = []
        for s in self.slots:
            self._advance(s)

    @property
    def finished_all(self) -> bool:
        """Every slot is done: nothing runs and nothing may start."""
        return all(s.phase is Phase.DONE for s in self.slots)

    # -- inputs ----------------------------------------------------------------------------
    def start(self, i: int, hook: Hook) -> None:
        """The driver starts ``hook`` of slot ``i`` (it must be in :attr:`ready`)."""
        s = self.slots[i]
        allowed = self.ready.get(i)
        if allowed is None or allowed[0] is not hook:
            raise OrderingError(f"slot {i} may not start {hook.value} now ({s.phase.value})")
        del self.ready[i]
        s.running, s.aborting_call = hook, allowed[1]
        s.phase = Phase.RUNNING if allowed[1] is None else Phase.THAW
        if hook is Hook.PREPARE_BEGIN:
            s.pb_started = True
        elif hook is Hook.PREPARE_FINISH:
            s.pf_started = True
            s.in_cut = allowed[1] is None

    def finished(self, i: int, hook: Hook) -> None:
        """The running ``hook`` of slot ``i`` returned."""
        self._ended(self._running(i, hook), hook, failed=False, cancelled=False)

    def failed(self, i: int, hook: Hook, *, cancelled: bool = False) -> None:
        """The running ``hook`` of slot ``i`` raised, or timed out; ``cancelled``: it ended
        by the cancellation of an abort (named in :attr:`interrupt`).

        A thaw's retries are the driver's: the call ends once, when it succeeds or the
        driver gives up (``thaw_failed``)."""
        self._ended(self._running(i, hook), hook, failed=True, cancelled=cancelled)

    def abort(self, gate: str | None, reason: AbortReason) -> None:
        """Abort one gate, or every gate (``None``: the run is cancelled or timed out)."""
        for g in self.gates.values() if gate is None else (self.gates[gate],):
            self._abort(g, reason)

    def budget(self, i: int, *, fallback: bool) -> None:
        """Slot ``i`` stayed quiesced past its budget: it thaws now (guarantee 2)."""
        s = self.slots[i]
        if s.phase is not Phase.WAIT_PF or not s.pb_started or s.pf_started:
            raise OrderingError(f"slot {i} is not frozen and waiting for its cut")
        if fallback and s.gate.aborting is None:
            s.budget_fallback = True
            self._owe_thaw(s, AbortReason.BUDGET)
        else:
            self._abort(s.gate, AbortReason.BUDGET)

    # -- the sequence ----------------------------------------------------------------------
    def _running(self, i: int, hook: Hook) -> _Seq:
        s = self.slots[i]
        if s.running is not hook:
            raise OrderingError(f"slot {i} is not running {hook.value}")
        return s

    def _ended(self, s: _Seq, hook: Hook, *, failed: bool, cancelled: bool) -> None:
        aborting, was_cut = s.aborting_call, s.in_cut
        s.running = s.aborting_call = None
        s.in_cut = False
        g = s.gate
        if aborting is not None:  # a thaw
            if s.budget_fallback and g.aborting is None:
                s.phase = Phase.WAIT_MAIN  # thawed early: it counts as finished
                self._finish_done(s)
            else:
                self._leave(s)
        elif hook is Hook.PREPARE_BEGIN:
            if failed and not cancelled:
                self._abort(g, AbortReason.FAILURE)
            if failed:
                self._owe_thaw(s, g.aborting or AbortReason.FAILURE)
            else:
                s.phase = Phase.WAIT_PF
                self._begin_done(s)
        elif hook is Hook.PREPARE_FINISH:
            if not failed:
                s.phase = Phase.WAIT_MAIN
                self._finish_done(s)
            else:
                if not cancelled or was_cut:
                    self._abort(g, AbortReason.FAILURE)
                if s.quiesces:
                    self._owe_thaw(s, g.aborting or AbortReason.FAILURE)
                else:
                    self._leave(s)
        elif hook is Hook.MAIN and not failed:
            s.phase = Phase.WAIT_CP
        else:  # on_main failed (its on_complete is skipped), or on_complete ended
            self._complete(s, failed=failed)
        self._advance(s)

    def _abort(self, g: Gate, reason: AbortReason) -> None:
        if not abort(g, reason):
            return
        for s in self._members[g.name]:
            if s.running is not None:
                if s.aborting_call is None and interruptible(s):
                    self.interrupt.append(s.index)
                continue
            ready = self.ready.get(s.index)
            if ready is not None and ready[1] is None:
                del self.ready[s.index]  # not started: it never starts
            self._advance(s)

    def _owe_thaw(self, s: _Seq, reason: AbortReason) -> None:
        if Hook.PREPARE_FINISH not in s.hooks:
            self._leave(s)
            return
        s.phase = Phase.THAW
        self.ready[s.index] = (Hook.PREPARE_FINISH, reason)

    def _leave(self, s: _Seq) -> None:
        s.phase = Phase.DONE
        self.ready.pop(s.index, None)
        woken_pb, opened, woken_pf, woken_cp = settle(s)
        self._opened(opened)
        for woken in (woken_pb, woken_pf, woken_cp):
            self._advance_all(woken)
        if opened_thaws(s):
            self._advance_all(self._members[s.gate.name])
        for x in opened:
            self._advance_all(self._members[x.gate.name])

    def _begin_done(self, s: _Seq) -> None:
        woken, opened = begin_done(s)
        self._opened(opened)
        self._advance_all(woken)
        for x in opened:
            self._advance_all(self._members[x.gate.name])

    def _opened(self, openers: Sequence[_Seq]) -> None:
        self.released.extend((x.gate.name, "cut") for x in openers)

    def _finish_done(self, s: _Seq) -> None:
        woken, last = finish_done(s)
        self._advance_all(woken)
        if opened_thaws(s):
            self._advance_all(self._members[s.gate.name])
        if last and open_main(s.gate):
            self.released.append((s.gate.name, "main"))
            self._advance_all(self._members[s.gate.name])

    def _complete(self, s: _Seq, *, failed: bool) -> None:
        s.phase = Phase.DONE
        self._advance_all(complete_done(s, failed=failed))

    def _advance_all(self, slots: Iterable[_Seq]) -> None:
        for x in slots:
            self._advance(x)

    def _advance(self, s: _Seq) -> None:
        """Move ``s`` on as far as the rules allow without a hook running."""
        while s.running is None and s.index not in self.ready:
            phase = s.phase
            if phase is Phase.DONE or phase is Phase.THAW:
                return
            g = s.gate
            if g.aborting is not None:
                # Nothing more starts; what began its prepare is owed its thaw.
                if needs_thaw(s):
                    self._owe_thaw(s, g.aborting)
                else:
                    self._leave(s)
                return
            if phase is Phase.WAIT_PB:
                if s.wait_pb:
                    return
                if s.has_pb:
                    self.ready[s.index] = (Hook.PREPARE_BEGIN, None)
                    return
                s.phase = Phase.WAIT_PF
                self._begin_done(s)
            elif phase is Phase.WAIT_PF:
                if s.wait_pf or held_at_cut(s) or held_at_thaw(s):
                    return
                if Hook.PREPARE_FINISH in s.hooks:
                    self.ready[s.index] = (Hook.PREPARE_FINISH, None)
                    return
                s.phase = Phase.WAIT_MAIN
                self._finish_done(s)
            elif phase is Phase.WAIT_MAIN:
                if held_at_main(s):
                    return
                if Hook.MAIN in s.hooks:
                    self.ready[s.index] = (Hook.MAIN, None)
                    return
                s.phase = Phase.WAIT_CP
            else:  # WAIT_CP
                if s.wait_cp:
                    return
                if s.child_failed:
                    self._complete(s, failed=True)
                elif Hook.COMPLETE in s.hooks:
                    self.ready[s.index] = (Hook.COMPLETE, None)
                    return
                else:
                    self._complete(s, failed=False)
