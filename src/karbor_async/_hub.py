"""Fan-out of a run's events to any number of subscribers (DESIGN.md section 6).

The engine's path pays the same whatever the number of subscribers: a
lifecycle event is appended to one *pending* deque (nothing at all when nobody
subscribes); a progress tick goes straight into one shared ring. Subscribers
keep their own cursor into the ring.

Lifecycle events reach subscribers only once committed: a subscriber that has
caught up asks the hub to *flush*, which awaits ``store.commit()`` once for
everyone and then moves what was pending before it into the ring. A slow
subscriber never slows the engine: the ring and the pending deque are bounded;
what overflows is lost from the live path only. Lifecycle events are numbered
consecutively per run, so a subscriber that finds a gap (or is told by the hub
that pending events were dropped) reads the missing ones from the store's log,
in order, and goes on; a lost progress tick is only counted, and the
subscriber is told how many with a ``TICKS_DROPPED`` event.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from itertools import islice

import anyio
import attrs

from karbor_async._types import OperationKind
from karbor_async.events import Event, EventKind
from karbor_async.store import Store

__all__ = ["EventHub", "Subscription", "SubscriptionStatistics"]

_Slot = tuple[Event, int]
"""An event in the ring and the number of progress ticks published before it."""

_NO_TICK = 1 << 62


@attrs.frozen
class _View:
    """The wanted events of one stretch of the ring, computed once for every subscriber.

    Subscribers woken together sit at the same cursor; the first to read builds
    the view, the others take it whole (checking only per run, not per event)
    when it follows on from what they already delivered.
    """

    end: int
    events: tuple[Event, ...]
    runs: dict[str, tuple[int, int, int]]
    """Per run: first and last lifecycle seq in the view (0 if none), and the lowest seq
    of a progress tick before its first lifecycle event (``_NO_TICK`` if none)."""
    consistent: bool
    """Lifecycle seqs follow on per run and no tick is older than the lifecycle before it."""
    finished: frozenset[str]
    """Runs whose ``RUN_FINISHED`` is in the view."""


def _make_view(slots: Iterable[_Slot], run_id: str | None, end: int) -> _View:
    events: list[Event] = []
    runs: dict[str, list[int]] = {}
    finished: set[str] = set()
    consistent = True
    progress = EventKind.PROGRESS
    for event, _ticks in slots:
        rid = event.run_id
        if run_id is not None and rid != run_id:
            continue
        events.append(event)
        info = runs.get(rid)
        seq = event.seq
        if event.kind is progress:
            if info is None:
                runs[rid] = [0, 0, seq]
            elif not info[1]:
                info[2] = min(info[2], seq)
            elif seq < info[1]:
                consistent = False
            continue
        if event.kind is EventKind.RUN_FINISHED:
            finished.add(rid)
        if info is None:
            runs[rid] = [seq, seq, _NO_TICK]
        elif not info[1]:
            info[0] = info[1] = seq
        elif seq == info[1] + 1:
            info[1] = seq
        else:
            consistent = False
    return _View(
        end,
        tuple(events),
        {rid: (a, b, c) for rid, (a, b, c) in runs.items()},
        consistent,
        frozenset(finished),
    )


class EventHub:
    """One per engine: the shared buffer every subscriber reads with its own cursor."""

    def __init__(self, store: Store, *, capacity: int = 16384, coalesce: float = 0.01) -> None:
        if capacity < 16:
            raise ValueError("the event buffer needs room for at least 16 events")
        self._store = store
        self.capacity = capacity
        self._ring: deque[_Slot] = deque(maxlen=capacity)
        self.next_index = 0
        """Absolute index of the next event put in the ring."""
        self._ticks = 0
        self._pending: deque[Event] = deque()
        self._dropped_upto: dict[str, int] = {}
        """Per run, the highest lifecycle seq dropped from ``pending`` (read it from the store)."""
        self._wake: anyio.Event | None = None
        self._flushing: anyio.Event | None = None
        self._gate: anyio.Event | None = None
        self._views: dict[tuple[str | None, int], _View] = {}
        self.subscribers = 0
        self.coalesce = coalesce
        """After a wake-up, a subscriber lets this long's worth of events gather: each
        wakes at most 1/coalesce times a second, however busy the run."""

    # -- the engine's side (synchronous, O(1), whatever the number of subscribers) -------
    @property
    def active(self) -> bool:
        return self.subscribers > 0

    def lifecycle(self, event: Event) -> None:
        if not self.subscribers:
            return
        pending = self._pending
        if len(pending) >= self.capacity:
            lost = pending.popleft()
            if lost.seq > self._dropped_upto.get(lost.run_id, 0):
                self._dropped_upto[lost.run_id] = lost.seq
        pending.append(event)
        self._poke()

    def tick(self, event: Event) -> None:
        if not self.subscribers:
            return
        self._put(event)
        self._ticks += 1
        self._poke()

    def _put(self, event: Event) -> None:
        self._ring.append((event, self._ticks))
        self.next_index += 1

    def _poke(self) -> None:
        wake = self._wake
        if wake is not None:
            self._wake = None
            wake.set()

    # -- the subscribers' side ------------------------------------------------------------
    @property
    def base_index(self) -> int:
        return self.next_index - len(self._ring)

    def slot(self, index: int) -> _Slot:
        return self._ring[index - self.base_index]

    def ticks_before(self, index: int) -> int:
        """Progress ticks published before absolute ``index`` (exact while it is in the ring)."""
        if index >= self.next_index:
            return self._ticks
        return self.slot(index)[1]

    _VIEWS_KEPT = 8

    def view(self, run_id: str | None, start: int) -> _View:
        """The wanted events from ``start`` on, shared by every subscriber reading from there."""
        key = (run_id, start)
        view = self._views.get(key)
        if view is None:
            end = self.next_index
            base = self.base_index
            view = _make_view(islice(self._ring, start - base, end - base), run_id, end)
            views = self._views
            if len(views) >= self._VIEWS_KEPT:
                del views[next(iter(views))]
            views[key] = view
        return view

    def dropped_upto(self, run_id: str) -> int:
        return self._dropped_upto.get(run_id, 0)

    def dropped_runs(self) -> list[str]:
        return list(self._dropped_upto) if self._dropped_upto else []

    async def flush(self) -> None:
        """Commit what is pending, then publish it (one commit shared by every subscriber)."""
        if self._flushing is not None:
            await self._flushing.wait()
            return
        if not self._pending:
            return
        done = self._flushing = anyio.Event()
        try:
            count = len(self._pending)
            await self._store.commit()
            for _ in range(min(count, len(self._pending))):
                self._put(self._pending.popleft())
        finally:
            self._flushing = None
            done.set()

    async def wait(self, index: int) -> None:
        """Return when something new may be there for a reader at ``index``.

        Waiting readers share rounds: the first to wait leads one (it waits for
        anything new, lets ``coalesce`` seconds of events gather, commits and
        publishes what is pending), the others just wait for the round to end.
        One timer and one commit per round, however many subscribers.
        """
        while index >= self.next_index:
            gate = self._gate
            if gate is not None:
                await gate.wait()
                continue
            gate = self._gate = anyio.Event()
            try:
                mark = self.next_index
                while self.next_index == mark and not self._pending:
                    if self._wake is None:
                        self._wake = anyio.Event()
                    await self._wake.wait()
                if self.coalesce:
                    await anyio.sleep(self.coalesce)
                await self.flush()
            finally:
                self._gate = None
                gate.set()

    @asynccontextmanager
    async def subscribe(
        self, run_id: str | None = None, since: int = 0
    ) -> AsyncIterator[Subscription]:
        sub = Subscription(self, self._store, run_id, since)
        self.subscribers += 1
        try:
            yield sub
        finally:
            self.subscribers -= 1
            if not self.subscribers:
                self._pending.clear()
                self._dropped_upto.clear()
                self._views.clear()


class _Batches:
    """``Subscription.batches()``: an async iterator of sequences of events."""

    __slots__ = ("_sub",)

    def __init__(self, sub: Subscription) -> None:
        self._sub = sub

    def __aiter__(self) -> _Batches:
        return self

    async def __anext__(self) -> Sequence[Event]:
        return await self._sub.next_batch()


@attrs.frozen
class SubscriptionStatistics:
    delivered: int
    ticks_dropped: int
    caught_up_from_store: int
    """Lifecycle events read back from the store after they fell off the live path."""


class Subscription:
    """An async iterator of events: the replay from ``since``, then live events.

    With a ``run_id`` it yields that run's events and stops after its
    ``RUN_FINISHED``; without, it yields every run's events until the context ends.
    Lifecycle events come in order, each once; progress ticks may be dropped
    (counted, and reported by a ``TICKS_DROPPED`` event).
    """

    def __init__(self, hub: EventHub, store: Store, run_id: str | None, since: int) -> None:
        self._hub = hub
        self._store = store
        self._run_id = run_id
        self._cursor = hub.next_index  # registered before the replay read: no gap
        self._ticks_at_cursor = hub.ticks_before(self._cursor)
        self._last: dict[str, int] = {}
        self._queue: deque[Event] = deque()
        self._replayed = run_id is None or since < 0
        self._since = since
        self._finished = False
        self._operation = OperationKind.PROTECT
        self._delivered = 0
        self._dropped = 0
        self._caught_up = 0
        if run_id is not None:
            self._last[run_id] = since

    def statistics(self) -> SubscriptionStatistics:
        return SubscriptionStatistics(self._delivered, self._dropped, self._caught_up)

    def __aiter__(self) -> Subscription:
        return self

    def batches(self) -> AsyncIterator[Sequence[Event]]:
        """The same stream in sequences: everything available at each wake-up at once.

        For consumers that handle many events (a log shipper, a UI pushing
        updates): one step per wake-up instead of one per event. Subscribers
        woken together are handed the same immutable sequence, so a hundred
        batch readers cost about what one does; do not mutate what you get.
        A plain async iterator (not a generator): leaving the loop early needs
        no clean-up.
        """
        return _Batches(self)

    async def next_batch(self) -> Sequence[Event]:
        """The next batch of :meth:`batches`; ``StopAsyncIteration`` at the end."""
        while True:
            if not self._queue and not self._finished:
                if not self._replayed:
                    await self._replay()
                    continue
                shared = await self._advance(share=True)
                if shared:
                    self._delivered += len(shared)
                    self._operation = shared[-1].operation
                    return shared
                continue
            batch = [await self.__anext__()]
            while self._queue and not self._finished:
                head = self._queue[0]
                if (
                    self._run_id is not None
                    and head.run_id == self._run_id
                    and head.kind is EventKind.RUN_FINISHED
                ):
                    batch.append(await self.__anext__())
                    break
                batch.append(self._queue.popleft())
                self._delivered += 1
            return batch

    async def __anext__(self) -> Event:
        queue = self._queue
        if queue and self._run_id is None:  # the common case, kept short: it runs per event
            event = queue.popleft()
            self._delivered += 1
            self._operation = event.operation
            return event
        while True:
            if queue:
                event = queue[0]
                if (
                    self._run_id is not None
                    and event.run_id == self._run_id
                    and event.kind is EventKind.RUN_FINISHED
                ):
                    unread = self._unread_ticks()
                    if unread:
                        # Ticks this subscriber will never read: say so before the end.
                        self._dropped += unread
                        self._delivered += 1
                        return self._dropped_marker(unread)
                    self._finished = True
                self._queue.popleft()
                self._delivered += 1
                self._operation = event.operation
                return event
            if self._finished:
                raise StopAsyncIteration
            if not self._replayed:
                await self._replay()
                continue
            await self._advance()

    async def _replay(self) -> None:
        """The first step of a ``since=N`` subscription: the store's log after N."""
        self._replayed = True
        assert self._run_id is not None
        await self._catch_up(self._run_id, None)

    async def _advance(self, *, share: bool = False) -> tuple[Event, ...] | None:
        """Move what is new into the queue; with ``share``, return a shared view instead."""
        hub = self._hub
        for run_id in hub.dropped_runs():
            if self._wants(run_id) and hub.dropped_upto(run_id) > self._last.get(run_id, 0):
                await hub.flush()
                await self._catch_up(run_id, None)
        if self._queue:
            return None
        if self._cursor < hub.base_index:
            # Overrun: what fell off the ring is gone from the live path.
            base = hub.base_index
            skipped_ticks = hub.ticks_before(base) - self._ticks_at_cursor
            self._cursor = base
            self._ticks_at_cursor = hub.ticks_before(base)
            if skipped_ticks > 0:
                self._dropped += skipped_ticks
                self._queue.append(self._dropped_marker(skipped_ticks))
            return None
        if self._cursor >= hub.next_index:
            await hub.wait(self._cursor)
            if self._cursor < hub.base_index or hub.dropped_runs():
                return None  # overrun or dropped while waiting: handled from the top
        view = hub.view(self._run_id, self._cursor)
        if self._follows(view):
            for rid, (_first, upto, _lead) in view.runs.items():
                if upto:
                    self._last[rid] = upto
            self._cursor = view.end
            self._ticks_at_cursor = hub.ticks_before(view.end)
            if share:
                # All of the run's ticks precede its RUN_FINISHED in the ring: none is left unread.
                if self._run_id is not None and self._run_id in view.finished:
                    self._finished = True
                return view.events
            self._queue.extend(view.events)
            return None
        # Event by event: take everything available in one go (one wake-up, many events).
        end = hub.next_index
        while self._cursor < end:
            event, _ticks = hub.slot(self._cursor)
            self._cursor += 1
            if not self._wants(event.run_id):
                continue
            if event.kind is EventKind.PROGRESS:
                if event.seq >= self._last.get(event.run_id, 0):
                    self._queue.append(event)
                else:  # older than lifecycle events already read back from the store
                    self._dropped += 1
                    self._queue.append(self._dropped_marker(1))
                continue
            last = self._last.get(event.run_id)
            if last is not None and event.seq <= last:
                continue  # already delivered (replay or catch-up)
            if last is not None and event.seq > last + 1:
                # A gap: the missing lifecycle events are in the store's log.
                await self._catch_up(event.run_id, event.seq)
            self._queue.append(event)
            self._last[event.run_id] = event.seq
        self._ticks_at_cursor = hub.ticks_before(self._cursor)
        return None

    def _follows(self, view: _View) -> bool:
        """Whether ``view`` follows on from what this subscriber delivered, taken whole."""
        if not view.consistent:
            return False
        last_seen = self._last
        for rid, (first, _last, lead) in view.runs.items():
            mine = last_seen.get(rid)
            if mine is None:
                continue
            if lead < mine or (first and first != mine + 1):
                return False
        return True

    def _unread_ticks(self) -> int:
        """Progress ticks of this subscription's run still ahead of its cursor (then skipped)."""
        hub = self._hub
        count = 0
        start = self._cursor
        if start < hub.base_index:
            count += hub.ticks_before(hub.base_index) - self._ticks_at_cursor
            start = hub.base_index
        for index in range(start, hub.next_index):
            event = hub.slot(index)[0]
            if event.kind is EventKind.PROGRESS and self._wants(event.run_id):
                count += 1
        self._cursor = hub.next_index
        self._ticks_at_cursor = hub.ticks_before(self._cursor)
        return count

    def _wants(self, run_id: str) -> bool:
        return self._run_id is None or run_id == self._run_id

    async def _catch_up(self, run_id: str, before: int | None) -> None:
        """Queue the committed lifecycle events of ``run_id`` after the last one delivered."""
        last = self._last.get(run_id, 0)
        for event in await self._store.read_events(run_id, last):
            if before is not None and event.seq >= before:
                break
            if event.seq != last + 1 and last:
                break  # the store has a gap too: never skip ahead silently
            self._queue.append(event)
            self._caught_up += 1
            last = event.seq
        self._last[run_id] = last

    def _dropped_marker(self, count: int) -> Event:
        return Event(
            run_id=self._run_id or "",
            seq=self._last.get(self._run_id or "", 0),
            kind=EventKind.TICKS_DROPPED,
            operation=self._operation,
            wall=time.time(),
            mono=anyio.current_time(),
            data={"count": count},
        )
