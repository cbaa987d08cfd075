"""The pure ordering core: random DAGs, groups, barriers, failures and aborts.

Every sequence of inputs the core accepts yields only starts the rules allow
(checked here by an oracle of their own over the run's history, not by the
core's counters), every run ends, and what began its prepare gets its thaw.
"""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from pathlib import Path

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from karbor_async._ordering import Ordering, OrderingError, limit_order
from karbor_async._types import AbortReason, BarrierPolicy, Hook

SRC = Path(__file__).resolve().parents[1] / "src" / "karbor_async"
HOOKS = tuple(Hook)


@attrs.frozen
class Graph:
    hooks: tuple[frozenset[Hook], ...]
    edges: tuple[tuple[int, int], ...]
    gate_of: tuple[str, ...]
    policies: dict[str, BarrierPolicy]
    quiesces: tuple[bool, ...]
    seed: int
    cuts: tuple[bool, ...] = ()
    """Which slots take a cut (its on_prepare_finish); under ``cut`` thaws wait for them."""


@st.composite
def graphs(draw: st.DrawFn) -> Graph:
    n = draw(st.integers(1, 18))
    gates = draw(st.integers(1, 3))
    policies = {f"g{i}": draw(st.sampled_from(list(BarrierPolicy))) for i in range(gates)}
    gate_of: list[str] = []
    edges: list[tuple[int, int]] = []
    for child in range(n):
        parents = (
            sorted({draw(st.integers(0, child - 1)) for _ in range(draw(st.integers(0, 2)))})
            if child
            else []
        )
        if parents:
            gate = gate_of[parents[0]]
            parents = [p for p in parents if gate_of[p] == gate]  # edges stay inside a group
        else:
            gate = f"g{draw(st.integers(0, gates - 1))}"
        gate_of.append(gate)
        edges.extend((p, child) for p in parents)
    hooks = tuple(frozenset(h for h in HOOKS if draw(st.integers(0, 4)) > 0) for _ in range(n))
    # (a type that quiesces has both prepare hooks: its begin freezes, its finish thaws)
    quiesces = tuple(
        Hook.PREPARE_BEGIN in h and Hook.PREPARE_FINISH in h and draw(st.booleans()) for h in hooks
    )
    cuts = tuple(Hook.PREPARE_FINISH in h and draw(st.booleans()) for h in hooks)
    return Graph(
        hooks, tuple(edges), tuple(gate_of), policies, quiesces, draw(st.integers(0, 2**32)), cuts
    )


class Oracle:
    """The rules, restated over what happened so far (independent of the core's counters)."""

    def __init__(self, g: Graph) -> None:
        self.g = g
        n = len(g.hooks)
        self.parents: list[list[int]] = [[] for _ in range(n)]
        self.children: list[list[int]] = [[] for _ in range(n)]
        for p, c in g.edges:
            self.parents[c].append(p)
            self.children[p].append(c)
        self.ok: dict[tuple[int, Hook], bool] = {}
        """(slot, hook) -> True once a non-aborting call returned, False once it failed."""
        self.started: set[tuple[int, Hook]] = set()
        self.aborted: set[str] = set()
        self.thawed: set[int] = set()
        self.budgeted: set[int] = set()
        self.thaw_started: set[int] = set()
        self.log: list[str] = []
        """What happened, in order (shown when a check fails)."""

    def pb_done(self, i: int) -> bool:
        if Hook.PREPARE_BEGIN in self.g.hooks[i]:
            return self.ok.get((i, Hook.PREPARE_BEGIN)) is True
        return all(self.pb_done(p) for p in self.parents[i])

    def pf_done(self, i: int) -> bool:
        if i in self.budgeted and i in self.thawed:
            return True
        if Hook.PREPARE_FINISH in self.g.hooks[i]:
            return self.ok.get((i, Hook.PREPARE_FINISH)) is True
        gate = self.g.gate_of[i]
        if self.g.policies[gate] is BarrierPolicy.CUT and not self.cut_open(gate):
            return False
        return self.pb_done(i) and all(self.pf_done(c) for c in self.children[i])

    def _reach(self, i: int, up: bool) -> bool:
        """A quiescing slot among ``i``'s ancestors (``up``) or descendants."""
        seen: set[int] = set()
        todo = list(self.parents[i] if up else self.children[i])
        while todo:
            j = todo.pop()
            if j in seen:
                continue
            seen.add(j)
            if self.g.quiesces[j]:
                return True
            todo.extend(self.parents[j] if up else self.children[j])
        return False

    def cuts_before_thaw(self, gate: str) -> list[int]:
        """Under ``cut``, the cuts a thaw waits for: taken under a quiesce, by a slot that
        does not quiesce and has nothing quiescing below it."""
        return [
            i
            for i in self.members(gate)
            if self.g.cuts
            and self.g.cuts[i]
            and not self.g.quiesces[i]
            and self._reach(i, up=True)
            and not self._reach(i, up=False)
        ]

    def members(self, gate: str) -> list[int]:
        return [i for i, x in enumerate(self.g.gate_of) if x == gate]

    def cut_open(self, gate: str) -> bool:
        return all(self.pb_done(i) for i in self.members(gate))

    def ok_through(self, i: int) -> bool:
        """Every hook of ``i`` and of all below it returned (a failure anywhere skips)."""
        own = all(
            self.ok.get((i, h)) is True
            or (h is Hook.PREPARE_FINISH and i in self.budgeted and i in self.thawed)
            for h in self.g.hooks[i]
        )
        return own and all(self.ok_through(c) for c in self.children[i])

    def check(self, i: int, hook: Hook, aborting: AbortReason | None) -> None:
        self.log.append(f"start {i} {hook.value} {aborting}")
        try:
            self._check(i, hook, aborting)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; history: {'; '.join(self.log)}") from None

    def _check(self, i: int, hook: Hook, aborting: AbortReason | None) -> None:
        gate = self.g.gate_of[i]
        policy = self.g.policies[gate]
        if aborting is not None:
            assert hook is Hook.PREPARE_FINISH
            assert (i, Hook.PREPARE_BEGIN) in self.started, "a thaw of what never began"
            assert gate in self.aborted or i in self.budgeted
            assert i not in self.thaw_started, "one thaw per slot"
            self.thaw_started.add(i)
            return
        assert gate not in self.aborted, f"{hook.value} of {i} started in aborted {gate}"
        assert (i, hook) not in self.started, "each hook once"
        if hook is Hook.PREPARE_BEGIN:
            assert all(self.pb_done(p) for p in self.parents[i])
        elif hook is Hook.PREPARE_FINISH:
            assert self.pb_done(i)
            assert all(self.pf_done(c) for c in self.children[i]), "a parent cut before a child"
            if policy is BarrierPolicy.CUT:
                assert self.cut_open(gate), "a cut before the cut barrier"
                if self.g.quiesces[i]:
                    waiting = [c for c in self.cuts_before_thaw(gate) if not self.pf_done(c)]
                    assert not waiting, f"thaw of {i} before the cuts of {waiting}"
        elif hook is Hook.MAIN:
            assert self.pf_done(i)
            if policy is not BarrierPolicy.NONE:
                assert all(self.pf_done(m) for m in self.members(gate)), "main before the barrier"
        else:
            assert Hook.MAIN not in self.g.hooks[i] or self.ok.get((i, Hook.MAIN)) is True
            assert self.pf_done(i)
            assert all(self.ok_through(c) for c in self.children[i]), "complete over a failure"


def drive(g: Graph) -> tuple[Ordering, Oracle, int]:
    rng = random.Random(g.seed)
    order = Ordering(
        g.hooks, g.edges, g.gate_of, dict(g.policies), quiesces=g.quiesces, cuts=g.cuts
    )
    oracle = Oracle(g)
    running: dict[int, tuple[Hook, AbortReason | None]] = {}
    steps = 0
    while True:
        steps += 1
        assert steps < 10_000, "the run does not end"
        for i in order.interrupt:
            if i in running:
                hook, _ = running.pop(i)
                order.failed(i, hook, cancelled=True)
                oracle.log.append(f"cancelled {i} {hook.value}")
        order.interrupt.clear()
        choices: list[str] = []
        if order.ready:
            choices += ["start"] * 4
        if running:
            choices += ["end"] * 4
        if not choices:
            break
        if rng.random() < 0.05:
            gate = rng.choice([None, *g.policies])
            reason = AbortReason.CANCELLED if gate is None else AbortReason.FAILURE
            order.abort(gate, reason)
            oracle.log.append(f"abort {gate}")
            oracle.aborted.update(g.policies if gate is None else [gate])
            continue
        frozen = [
            i
            for i, s in enumerate(order.slots)
            if s.pb_started
            and not s.pf_started
            and i not in running
            and g.quiesces[i]
            and s.phase.value == "wait_pf"
            and i not in order.ready
        ]
        if frozen and rng.random() < 0.05:
            i = rng.choice(frozen)
            fallback = rng.random() < 0.5
            order.budget(i, fallback=fallback)
            oracle.log.append(f"budget {i} fallback={fallback}")
            if fallback and g.gate_of[i] not in oracle.aborted:
                oracle.budgeted.add(i)
            else:
                oracle.aborted.add(g.gate_of[i])
            continue
        if rng.choice(choices) == "start":
            i, (hook, aborting) = rng.choice(sorted(order.ready.items(), key=lambda x: x[0]))
            oracle.check(i, hook, aborting)
            # Any other hook of that slot is refused.
            with pytest.raises(OrderingError):
                order.start(i, next(h for h in HOOKS if h is not hook))
            order.start(i, hook)
            if aborting is None:
                oracle.started.add((i, hook))
            running[i] = (hook, aborting)
        else:
            i = rng.choice(sorted(running))
            hook, aborting = running.pop(i)
            if aborting is not None:
                oracle.thawed.add(i)  # (a thaw's retries are the driver's: it ended)
            fail = rng.random() < 0.15
            oracle.log.append(f"{'fail' if fail else 'end'} {i} {hook.value}")
            if fail:
                order.failed(i, hook)
                if aborting is None:
                    oracle.ok[(i, hook)] = False
                    if hook in (Hook.PREPARE_BEGIN, Hook.PREPARE_FINISH):
                        oracle.aborted.add(g.gate_of[i])
            else:
                order.finished(i, hook)
                if aborting is None:
                    oracle.ok[(i, hook)] = True
    return order, oracle, steps


@given(graphs())
def test_only_allowed_starts_and_every_run_ends(g: Graph) -> None:
    """Whatever fails or aborts, each start the core allows keeps the rules, nothing is
    left running or waiting, and every slot whose prepare began was owed and got its thaw
    (its non-aborting on_prepare_finish, or an aborting one)."""
    order, oracle, _steps = drive(g)
    assert order.finished_all
    assert not order.ready
    for i, hooks in enumerate(g.hooks):
        if (i, Hook.PREPARE_BEGIN) in oracle.started and Hook.PREPARE_FINISH in hooks:
            assert (i, Hook.PREPARE_FINISH) in oracle.started or i in oracle.thaw_started, i


@given(graphs())
def test_without_faults_every_hook_runs_once(g: Graph) -> None:
    """On success every hook of every resource runs exactly once, the barriers open in
    order (cut before main), and nothing is thawed."""
    order = Ordering(
        g.hooks, g.edges, g.gate_of, dict(g.policies), quiesces=g.quiesces, cuts=g.cuts
    )
    oracle = Oracle(g)
    rng = random.Random(g.seed)
    running: list[tuple[int, Hook]] = []
    while order.ready or running:
        if order.ready and (not running or rng.random() < 0.5):
            i, (hook, aborting) = rng.choice(sorted(order.ready.items(), key=lambda x: x[0]))
            assert aborting is None
            oracle.check(i, hook, None)
            order.start(i, hook)
            oracle.started.add((i, hook))
            running.append((i, hook))
        else:
            i, hook = running.pop(rng.randrange(len(running)))
            order.finished(i, hook)
            oracle.ok[(i, hook)] = True
    assert order.finished_all
    assert oracle.started == {(i, h) for i, hooks in enumerate(g.hooks) for h in hooks}
    for gate, policy in g.policies.items():
        if not oracle.members(gate):
            continue
        opened = [b for name, b in order.released if name == gate]
        expected = {
            BarrierPolicy.NONE: [],
            BarrierPolicy.MAIN: ["main"],
            BarrierPolicy.CUT: ["cut", "main"],
        }
        assert opened == expected[policy]


def test_a_start_out_of_turn_is_refused() -> None:
    """A child's on_prepare_begin before its parent's is refused, and so is any finish
    of a hook that does not run."""
    order = Ordering(
        [frozenset(HOOKS), frozenset(HOOKS)], [(0, 1)], ["g", "g"], {"g": BarrierPolicy.CUT}
    )
    assert order.ready == {0: (Hook.PREPARE_BEGIN, None)}
    with pytest.raises(OrderingError, match="may not start on_prepare_begin"):
        order.start(1, Hook.PREPARE_BEGIN)
    with pytest.raises(OrderingError, match="is not running"):
        order.finished(0, Hook.PREPARE_BEGIN)


def test_limits_are_taken_in_one_order() -> None:
    """Whatever order a resource names its limits in, they are taken sorted by name."""
    assert limit_order(["vol", "cinder", "vol"], {"vol": 2, "cinder": 1, "x": 3}) == (
        "cinder",
        "vol",
    )
    assert limit_order(["a"], {}) == ()


def test_the_core_imports_nothing_a_workflow_sandbox_refuses() -> None:
    """The core imports no event loop, clock, thread, random or I/O module: it can run
    inside a deterministic workflow. Checked on its source and by importing it alone
    (without the package, whose root imports the engine)."""
    allowed = {"__future__", "enum", "collections.abc", "typing", "attrs", "karbor_async._types"}
    for name in ("_ordering.py", "_types.py"):
        tree = ast.parse((SRC / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [node.module or ""]
            else:
                continue
            for mod in mods:
                assert mod in allowed or mod == "types" or mod.startswith("collections"), (
                    name,
                    mod,
                )
    probe = (
        "import sys, types, importlib.util\n"
        f"pkg = types.ModuleType('karbor_async'); pkg.__path__ = [{str(SRC)!r}]\n"
        "sys.modules['karbor_async'] = pkg\n"
        "import attrs  # (attrs itself imports threading: stdlib, passed through by Temporal)\n"
        "before = set(sys.modules)\n"
        "import karbor_async._ordering\n"
        "new = set(sys.modules) - before\n"
        "bad = {m for m in new if m.split('.')[0] in "
        "{'anyio', 'asyncio', 'trio', 'sniffio', 'threading', 'time', 'random', 'socket',"
        " 'sqlite3', 'aiosqlite', 'structlog', 'os', 'subprocess', 'datetime'}}\n"
        "assert not bad, sorted(bad)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
