"""What a run holds back while resources are frozen: the garbage collector, the store's writes.

A full collection in a large heap takes tens to hundreds of milliseconds;
inside a quiesce window or a cut wave each one is added to the window or the
skew, and a run of 100,000 resources set off fifteen of them (about 40% of
its time). So the collector is held off for the whole run, for ``quiet_gc``
seconds at most per run (and the collector is never kept off more than about
twice that in a row by overlapping runs), and the store is asked to keep its
write-behind records back while anything is frozen.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from karbor_async._node import _Node
from karbor_async._timers import Timers

__all__ = ["Holds", "QuietGc"]


class QuietGc:
    """Holds the cyclic garbage collector off while cut waves are dispatched.

    Process-wide and counted (several runs, several threads): the collector is
    disabled by the first holder, if it was enabled, and enabled again by the
    last.
    """

    _lock = threading.Lock()
    _holders = 0
    _resume = False
    _since = 0.0
    """``time.monotonic()`` when the first holder of the current hold took it."""

    @classmethod
    def take(cls, *, unless_held_for: float | None = None) -> bool:
        """Take a hold; with ``unless_held_for``, refuse (False) if the collector has
        already been held that many seconds in a row (overlapping runs must not keep
        it off for good: a run's hold starts only while the current hold is young)."""
        with cls._lock:
            if cls._holders == 0:
                cls._resume = gc.isenabled()
                if cls._resume:
                    gc.disable()
                cls._since = time.monotonic()
            elif unless_held_for is not None and time.monotonic() - cls._since >= unless_held_for:
                return False
            cls._holders += 1
            return True

    @classmethod
    def give(cls) -> None:
        with cls._lock:
            cls._holders -= 1
            if cls._holders == 0 and cls._resume:
                gc.enable()


class Holds:
    """One run's holds: counted collector holds (capped in time) and the write hold."""

    __slots__ = (
        "_cap_armed",
        "_capped",
        "_for_frozen",
        "_frozen_now",
        "_holds",
        "_quiet_gc",
        "_store",
        "_timers",
        "_writes_held",
        "now",
        "watching",
    )

    def __init__(self, store: Any, timers: Timers, quiet_gc: float) -> None:
        self._store = store
        self._timers = timers
        self._quiet_gc = quiet_gc
        self._holds = 0
        self._for_frozen = False
        self._capped = False
        self._cap_armed = False
        self._frozen_now = 0
        self._writes_held = False
        self.watching = False
        """The run's watcher task is up (it keeps the collector hold's chores)."""
        self.now: Callable[[], float] = timers.now

    def set_frozen(self, n: _Node, frozen: bool) -> None:
        """Track what is frozen: the collector is held off while anything is."""
        if n.frozen is frozen:
            return
        n.frozen = frozen
        if frozen:
            self._frozen_now += 1
            if self._frozen_now == 1:
                self._for_frozen = self.gc_take()
                self.hold_writes(True)
        else:
            self._frozen_now -= 1
            if self._frozen_now == 0:
                self.hold_writes(False)
                if self._for_frozen:
                    self._for_frozen = False
                    self.gc_give()

    def hold_writes(self, hold: bool) -> None:
        """Ask the store (if it can) to keep write-behind records back while things are frozen.

        Commit points still commit; everything else is written at the next commit or
        when the last thaw releases the hold.
        """
        if hold is self._writes_held:
            return
        hint = getattr(self._store, "hold_background_writes", None)
        if hint is not None:
            self._writes_held = hold
            hint(hold)

    @contextlib.contextmanager
    def briefly(self) -> Iterator[None]:
        """The collector held off for a short, bounded piece of the run's own work after
        its resources ended (its outcome: 100,000 of them set off two full collections)."""
        took = self._quiet_gc > 0 and QuietGc.take(unless_held_for=self._quiet_gc)
        try:
            yield
        finally:
            if took:
                QuietGc.give()

    def hold_run(self) -> None:
        """The run starts: hold the collector off for it (capped like every hold)."""
        self.gc_take(run=True)

    def gc_take(self, *, run: bool = False) -> bool:
        if self._quiet_gc <= 0 or self._capped or not self.watching:
            return False
        if not QuietGc.take(unless_held_for=self._quiet_gc if run else None):
            return False
        self._holds += 1
        if not self._cap_armed:
            self._cap_armed = True
            self._timers.alarm(self.now() + self._quiet_gc, self._cap)
        return True

    def gc_give(self) -> None:
        if self._holds:
            self._holds -= 1
            QuietGc.give()

    def release_all(self) -> None:
        """The run's watcher stops: give back every hold (a failed thaw, a cancelled task)."""
        self.watching = False
        while self._holds:
            self.gc_give()
        self.hold_writes(False)

    def _cap(self) -> None:
        """However long things stay frozen, the collector is held off this long at most."""
        self._capped = True
        while self._holds:
            self.gc_give()
