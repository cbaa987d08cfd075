"""The engine holds the cyclic garbage collector off while anything is frozen."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import ClassVar

import anyio
import pytest

from helpers import VOLUME
from karbor_async import (
    BarrierPolicy,
    Engine,
    HookContext,
    MemoryStore,
    Plan,
    ProtectionPlugin,
    Resource,
    ResourceType,
)
from karbor_async.testing import MapProtectable

SERVER = "OS::Nova::Server"


class _Probe:
    """Records whether the collector was enabled at each hook, by (hook, resource id)."""

    def __init__(self, thaw_delay: float = 0.0) -> None:
        self.seen: dict[tuple[str, str], bool] = {}
        self.thaw_delay = thaw_delay

    async def on_prepare_begin(self, ctx: HookContext) -> None:
        self.seen["begin", ctx.resource.id] = gc.isenabled()

    async def on_prepare_finish(self, ctx: HookContext) -> None:
        self.seen["finish", ctx.resource.id] = gc.isenabled()
        if ctx.resource.type == SERVER and self.thaw_delay:
            await anyio.sleep(self.thaw_delay)
            self.seen["late", ctx.resource.id] = gc.isenabled()

    async def on_main(self, ctx: HookContext) -> None:
        self.seen["main", ctx.resource.id] = gc.isenabled()


class _ProbePlugin(ProtectionPlugin):
    name = "gc-probe"
    types: ClassVar[tuple[ResourceType, ...]] = (
        ResourceType(SERVER, quiesces=True, snapshots=False),
        ResourceType(VOLUME),
    )

    def __init__(self, probe: _Probe) -> None:
        self.probe = probe

    def get_protect_operation(self, resource_type: str) -> object:
        return self.probe


def _engine(probe: _Probe, quiet_gc: float = 10.0) -> tuple[Engine, Plan]:
    server = Resource(SERVER, "s1")
    volumes = [Resource(VOLUME, f"v{i}") for i in range(3)]
    engine = Engine(
        [_ProbePlugin(probe)],
        [MapProtectable(VOLUME, [SERVER], {server.key: volumes})],
        store=MemoryStore(),
        discover=False,
        quiet_gc=quiet_gc,
    )
    return engine, Plan(name="gc", resources=[server], barrier=BarrierPolicy.CUT)


@pytest.fixture
def gc_enabled() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        if not was:
            gc.disable()


@pytest.mark.usefixtures("gc_enabled")
async def test_collector_is_held_off_from_freeze_to_thaw() -> None:
    probe = _Probe()
    engine, plan = _engine(probe)
    async with engine:
        await engine.protect(plan)
        assert probe.seen["begin", "s1"] is True  # nothing frozen yet
        assert all(probe.seen["finish", f"v{i}"] is False for i in range(3))  # the cuts
        assert probe.seen["finish", "s1"] is False  # the thaw itself: still frozen
        assert gc.isenabled()  # everything thawed and dispatched: the collector is back


@pytest.mark.usefixtures("gc_enabled")
async def test_quiet_gc_zero_leaves_the_collector_alone() -> None:
    probe = _Probe()
    engine, plan = _engine(probe, quiet_gc=0)
    async with engine:
        await engine.protect(plan)
        assert all(probe.seen.values())


@pytest.mark.usefixtures("gc_enabled")
async def test_the_hold_is_capped_per_run() -> None:
    """A freeze that lasts longer than ``quiet_gc`` seconds gets the collector back."""
    probe = _Probe(thaw_delay=0.3)
    engine, plan = _engine(probe, quiet_gc=0.1)
    async with engine:
        await engine.protect(plan)
        assert probe.seen["finish", "s1"] is False
        assert probe.seen["late", "s1"] is True
        assert gc.isenabled()


async def test_a_disabled_collector_stays_disabled() -> None:
    was = gc.isenabled()
    gc.disable()
    try:
        engine, plan = _engine(_Probe())
        async with engine:
            await engine.protect(plan)
            assert not gc.isenabled()
    finally:
        if was:
            gc.enable()
