"""A hook that blocks the event loop is named and charged; nobody else is blamed.

Real clocks on both backends (``time.sleep`` does not advance a virtual clock).
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from karbor_async import (
    Engine,
    EventKind,
    Hook,
    HookContext,
    MemoryStore,
    Plan,
    ProtectionPlugin,
    Resource,
    ResourceStatus,
    ResourceType,
    RunError,
    Timeouts,
)
from karbor_async._stall import Stall, _GcFlag
from karbor_async._tasks import STALL_LISTENERS
from karbor_async.testing import LoopBlockedError, no_loop_stalls, run_hooks

pytestmark = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])

TYPE = "Test::Volume"


class _Op:
    def __init__(self, block: float) -> None:
        self.block = block

    async def on_main(self, ctx: HookContext) -> None:
        if ctx.resource.id == "bad":
            time.sleep(self.block)  # the plugin bug under test  # noqa: ASYNC251
        else:
            await anyio.sleep(0.4)


class Blocking(ProtectionPlugin):
    name = "blocking"
    types = (ResourceType(TYPE),)

    def __init__(self, block: float = 2.0) -> None:
        self.block = block

    def get_protect_operation(self, resource_type: str) -> object:
        return _Op(self.block)


def _plan(limit: float) -> Plan:
    resources = [Resource(TYPE, "bad")] + [Resource(TYPE, f"ok{i}") for i in range(10)]
    return Plan(name="s", resources=resources, timeouts=Timeouts(hook=limit))


@pytest.mark.slow
async def test_a_hook_holding_the_loop_past_its_limit_fails_and_no_one_else_does() -> None:
    """time.sleep(2) in on_main under a 0.5 s limit: that hook fails with HookTimeoutError
    saying so, a LOOP_BLOCKED event names it and its frame; the ten hooks that only waited
    behind it succeed."""
    store = MemoryStore()
    async with Engine([Blocking(2.0)], store=store, discover=False) as engine:
        with pytest.raises(RunError) as info:
            await engine.protect(_plan(0.5))
    outcome = info.value.outcome
    bad = outcome.resources[(TYPE, "bad")]
    assert bad.status is ResourceStatus.FAILED and bad.failed_hook is Hook.MAIN
    assert bad.error is not None and "held the event loop for" in bad.error
    assert "limit 0.5 s" in bad.error and "HookTimeoutError" in bad.error
    assert bad.blocked_loop_s == pytest.approx(2.0, abs=0.3)
    others = [r for k, r in outcome.resources.items() if k[1] != "bad"]
    assert all(r.status is ResourceStatus.SUCCEEDED for r in others), "nobody else is blamed"
    events = await store.read_events(outcome.run_id)
    [blocked] = [e for e in events if e.kind is EventKind.LOOP_BLOCKED]
    assert blocked.resource == (TYPE, "bad") and blocked.hook is Hook.MAIN
    assert blocked.data["seconds"] == pytest.approx(2.0, abs=0.3)
    assert "test_stalls.py" in blocked.data["frame"] and "on_main" in blocked.data["frame"]


async def test_a_short_block_within_the_limit_is_named_but_not_failed() -> None:
    """Blocking 0.3 s under a 5 s limit: LOOP_BLOCKED and blocked_loop_s, the run succeeds."""
    store = MemoryStore()
    async with Engine([Blocking(0.3)], store=store, discover=False) as engine:
        outcome = await engine.protect(_plan(5))
    assert outcome.resources[(TYPE, "bad")].blocked_loop_s == pytest.approx(0.3, abs=0.15)
    events = await store.read_events(outcome.run_id)
    assert [e.resource for e in events if e.kind is EventKind.LOOP_BLOCKED] == [(TYPE, "bad")]


@pytest.mark.slow
async def test_stalls_outside_hooks_blame_the_application_or_gc() -> None:
    """The application blocking the loop, or a collection, is named as such, not a hook."""
    seen: list[Stall] = []
    STALL_LISTENERS.append(seen.append)
    try:
        async with Engine([Blocking()], discover=False):
            await anyio.sleep(0.1)
            time.sleep(0.4)  # noqa: ASYNC251 - the application blocks, on purpose
            await anyio.sleep(0.1)
            _GcFlag.running = True  # as the gc callback sets it during a collection
            try:
                time.sleep(0.4)  # noqa: ASYNC251
            finally:
                _GcFlag.running = False
            await anyio.sleep(0.1)
    finally:
        STALL_LISTENERS.remove(seen.append)
    assert [s.culprit for s in seen] == ["application", "gc"]


async def test_run_hooks_fails_a_vendor_test_naming_the_blocking_hook() -> None:
    """testing.run_hooks (fail_on_block=True by default) fails naming the hook."""
    with pytest.raises(LoopBlockedError, match=r"Test::Volume#bad on_main"):
        await run_hooks(Blocking(0.3), Resource(TYPE, "bad"), timeouts=Timeouts(hook=5))
    outcome = await run_hooks(
        Blocking(0.3), Resource(TYPE, "bad"), timeouts=Timeouts(hook=5), fail_on_block=False
    )
    assert outcome.protect.resources[(TYPE, "bad")].blocked_loop_s > 0


async def test_no_loop_stalls_names_the_hook(anyio_backend: Any) -> None:
    """no_loop_stalls() around a vendor's own engine use fails naming the hook."""
    with pytest.raises(LoopBlockedError, match=r"Test::Volume#bad on_main"), no_loop_stalls():
        async with Engine([Blocking(0.3)], discover=False) as engine:
            await engine.protect(_plan(5))


async def test_the_pytest_fixture_sees_what_the_test_blocks(no_loop_stalls: list[str]) -> None:
    """The ``no_loop_stalls`` fixture (the package's pytest plugin) collects hook stalls;
    a clean run leaves it empty, so the test passes."""
    async with Engine([Blocking(0.0)], discover=False) as engine:
        await engine.protect(_plan(5))
    assert no_loop_stalls == []
