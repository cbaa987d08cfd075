"""Signalling the edges and barriers: the ordering core's outputs turned into wake-ups.

The core (``_ordering``) counts a finished hook off its neighbours and says
whose wait ended and which barrier opened; here those become ``anyio.Event``
sets (a resource with nothing to wait for never touches an event), the
collector hold over a cut wave, and commit point 2 before a ``main`` barrier.
"""

from __future__ import annotations

import anyio

from karbor_async import _ordering
from karbor_async._abort import store_failed
from karbor_async._node import _Group, _Node
from karbor_async._runstate import RunState
from karbor_async._types import OperationKind
from karbor_async.events import EventKind
from karbor_async.exceptions import StoreError

__all__ = ["release_main", "settle", "signal_cp", "signal_pb", "signal_pf", "signal_pf_edges"]


def signal_pb(run: RunState, n: _Node) -> None:
    """``n``'s prepare_begin is done: wake the children it was the last parent of."""
    woken, opened = _ordering.begin_done(n)
    for c in woken:
        if c.ev_pb is not None:
            c.ev_pb.set()
    for x in opened:
        _release_cut(run, x.gate)


def _release_cut(run: RunState, g: _Group) -> None:
    # Waiters wake in the order their events are set: the cuts go first.
    g.cut_released.set()
    g.cut_released_rest.set()
    holds = run.holds
    if holds.gc_take():
        # No collection until every woken resource has taken its first step
        # (its cut begun): the watcher, woken now, runs after all of them.
        run.timers.soon(holds.gc_give)
    rec = run.rec
    if rec.record:
        # Nor are the wave's events built inside it: the watcher builds them after it.
        rec.defer()
        run.timers.soon(rec.flush)
    rec.emit(EventKind.BARRIER_RELEASED, None, None, group=g.name, barrier="cut")


def signal_pf_edges(n: _Node) -> bool:
    """Release the parents' waits; True when this was the group's last cut."""
    woken, last = _ordering.finish_done(n)
    for p in woken:
        if p.ev_pf is not None:
            p.ev_pf.set()
    if n.counts_cut and _ordering.opened_thaws(n):
        n.gate.thaw_released.set()
    return last


async def signal_pf(run: RunState, n: _Node) -> None:
    if not n.signalled_pf and signal_pf_edges(n):
        await release_main(run, n.gate)


async def release_main(run: RunState, g: _Group) -> None:
    """The group's last cut finished: give back the leases of what is thawed (once per
    group, not inside the cut wave), commit (point 2), then open its main barrier."""
    release = run.rec.release
    for n in g.nodes:
        if n.leased and n.signalled_pf and not n.frozen:
            release(n)
    if run.operation is OperationKind.PROTECT:
        with anyio.CancelScope(shield=True):
            try:
                await run.rec.commit()
            except StoreError as exc:  # (the cuts are not durable: no main wave)
                store_failed(run, g, None, exc)
                return
    if _ordering.open_main(g):
        g.main_released.set()
        run.rec.emit(EventKind.BARRIER_RELEASED, None, None, group=g.name, barrier="main")


def signal_cp(n: _Node, *, failed: bool) -> None:
    for p in _ordering.complete_done(n, failed=failed):
        if p.ev_cp is not None:
            p.ev_cp.set()


def settle(run: RunState, n: _Node) -> None:
    """A node that leaves early still releases what others wait on (never a hang)."""
    woken_pb, opened, woken_pf, woken_cp = _ordering.settle(n)
    for c in woken_pb:
        if c.ev_pb is not None:
            c.ev_pb.set()
    for x in opened:
        _release_cut(run, x.gate)
    for p in woken_pf:
        if p.ev_pf is not None:
            p.ev_pf.set()
    if n.counts_cut and _ordering.opened_thaws(n):
        n.gate.thaw_released.set()
    for p in woken_cp:
        if p.ev_cp is not None:
            p.ev_cp.set()
