"""Hook deadlines, quiesce budgets and the run's alarms, kept by one watcher task per run."""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Awaitable, Callable

import anyio

from karbor_async._node import Interrupt, _Node

__all__ = ["Timers"]


class Timers:
    """Hook deadlines and quiesce budgets for one run, watched by one task.

    Hook deadlines go to a FIFO per time limit: calls with the same limit
    start in time order, so each FIFO is sorted and arming costs one append.
    Budgets (few: one per quiescing resource) go to a heap. An entry whose
    node has moved on (its token changed) is dropped when it reaches the head.
    The watcher also runs the run's own chores: a callback at its next wake-up
    (``soon``, which runs after every task woken before it), alarms (the
    collector hold's cap, abandonment deadlines), and the abandonment of the
    nodes put ``due`` (an awaited step: they get a moment to end first).
    """

    def __init__(
        self,
        fire: Callable[[_Node, Interrupt], None],
        abandon: Callable[[list[_Node]], Awaitable[None]],
    ) -> None:
        self._fire = fire
        self._abandon = abandon
        self.now: Callable[[], float] = anyio.current_time
        self._fifos: dict[float, deque[tuple[float, _Node, int]]] = {}
        self._budgets: list[tuple[float, int, _Node, int]] = []
        self._seq = 0
        self._target = math.inf
        self._wake: anyio.Event | None = None
        self._soon: list[Callable[[], None]] = []
        self._alarms: list[tuple[float, int, Callable[[], None]]] = []
        self.due: list[_Node] = []
        """Nodes whose hooks the run stops waiting for at the watcher's next step."""
        self.stalled = 0.0
        """Seconds the loop was stalled during the run: hook limits run on ``now - stalled``
        (a stall is not counted against the hooks that only waited behind it)."""
        self.catch_up: Callable[[], None] | None = None
        """Settles a stall the loop just came out of, before any deadline is looked at."""

    def poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def soon(self, call: Callable[[], None]) -> None:
        """Run ``call`` at the watcher's next step: after every task already woken."""
        self._soon.append(call)
        if self._wake is not None:
            self._wake.set()

    def alarm(self, deadline: float, call: Callable[[], None]) -> None:
        """Run ``call`` once at ``deadline``."""
        self._seq += 1
        heapq.heappush(self._alarms, (deadline, self._seq, call))
        if deadline < self._target and self._wake is not None:
            self._wake.set()

    def arm_hook(self, n: _Node, limit: float, now: float) -> None:
        deadline = now - self.stalled + limit  # hook time
        fifo = self._fifos.get(limit)
        if fifo is None:
            fifo = self._fifos[limit] = deque()
        while fifo and fifo[0][1].token != fifo[0][2]:
            fifo.popleft()  # that call has ended: do not keep it until its deadline
        fifo.append((deadline, n, n.token))
        if deadline + self.stalled < self._target and self._wake is not None:
            self._wake.set()

    def arm_budget(self, n: _Node, deadline: float) -> None:
        n.budget_token += 1
        self._seq += 1
        heapq.heappush(self._budgets, (deadline, self._seq, n, n.budget_token))
        if deadline < self._target and self._wake is not None:
            self._wake.set()

    async def watch(self) -> None:
        while True:
            if self.catch_up is not None:
                self.catch_up()
            if self._soon:
                calls, self._soon = self._soon, []
                for call in calls:
                    call()
            now = self.now()
            earliest = math.inf
            alarms = self._alarms
            while alarms:
                when, _, call = alarms[0]
                if when > now:
                    earliest = when
                    break
                heapq.heappop(alarms)
                call()
            hook_now = now - self.stalled
            for fifo in self._fifos.values():
                while fifo:
                    deadline, n, token = fifo[0]
                    if token != n.token:
                        fifo.popleft()  # that call already ended
                    elif deadline <= hook_now:
                        fifo.popleft()
                        self._fire(n, Interrupt.TIMEOUT)
                    else:
                        earliest = min(earliest, deadline + self.stalled)
                        break
            budgets = self._budgets
            while budgets:
                deadline, _, n, token = budgets[0]
                if token != n.budget_token:
                    heapq.heappop(budgets)
                elif deadline <= now:
                    heapq.heappop(budgets)
                    self._fire(n, Interrupt.BUDGET)
                else:
                    earliest = min(earliest, deadline)
                    break
            if self.due:
                nodes, self.due = self.due, []
                await self._abandon(nodes)
                continue  # time passed: look at every deadline again
            if alarms:  # firing a deadline above may have set an alarm
                earliest = min(earliest, alarms[0][0])
            self._target = earliest
            self._wake = anyio.Event()
            with anyio.CancelScope(deadline=earliest):  # (move_on_at exists only from anyio 4.15)
                await self._wake.wait()
