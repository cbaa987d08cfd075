"""The engine holds the cyclic garbage collector off for a run (capped), frozen or not."""

from __future__ import annotations

import gc
import time
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
from karbor_async._holds import QuietGc
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
async def test_collector_is_held_off_for_the_run() -> None:
    probe = _Probe()
    engine, plan = _engine(probe)
    async with engine:
        await engine.protect(plan)
        assert probe.seen["begin", "s1"] is False  # nothing frozen yet: held for the run
        assert all(probe.seen["finish", f"v{i}"] is False for i in range(3))  # the cuts
        assert probe.seen["finish", "s1"] is False  # the thaw itself: still frozen
        assert all(probe.seen["main", f"v{i}"] is False for i in range(3))
        assert gc.isenabled()  # the run is over: the collector is back


@pytest.mark.usefixtures("gc_enabled")
def test_overlapping_runs_cannot_keep_the_collector_off_for_good() -> None:
    """A run's hold starts only while the process-wide hold is younger than its cap."""
    assert QuietGc.take(unless_held_for=0.05)
    try:
        assert not gc.isenabled()
        time.sleep(0.06)
        assert not QuietGc.take(unless_held_for=0.05)  # held too long already: refused
        QuietGc.take()  # a freeze's hold is never refused
        QuietGc.give()
    finally:
        QuietGc.give()
    assert gc.isenabled()
    assert QuietGc.take(unless_held_for=0.05)  # a fresh hold: granted again
    QuietGc.give()


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


class _CountingFinder:
    """A protectable that notes whether the collector was enabled while it listed."""

    def __init__(self, volumes: list[Resource]) -> None:
        self.resource_type = VOLUME
        self.parent_types: tuple[str, ...] = (SERVER,)
        self.volumes = volumes
        self.seen: list[bool] = []

    async def dependents(self, resource: Resource) -> list[Resource]:
        self.seen.append(gc.isenabled())
        return self.volumes


@pytest.mark.usefixtures("gc_enabled")
async def test_building_a_run_holds_the_collector_too() -> None:
    """Discovery and the run's construction are held like the run (and capped)."""
    probe = _Probe()
    listing = _CountingFinder([Resource(VOLUME, "v1")])
    engine = Engine([_ProbePlugin(probe)], [listing], store=MemoryStore(), discover=False)
    _unused, plan = _engine(probe)
    async with engine:
        run = await engine.build_protect(plan)
        assert listing.seen == [False]
        assert gc.isenabled()  # given back once built
        await engine.execute(run)
        assert gc.isenabled()


@pytest.mark.usefixtures("gc_enabled")
async def test_a_slow_discovery_gets_the_collector_back_at_the_cap() -> None:
    class _Slow(_CountingFinder):
        async def dependents(self, resource: Resource) -> list[Resource]:
            await anyio.sleep(0.3)
            return await super().dependents(resource)

    listing = _Slow([Resource(VOLUME, "v1")])
    engine = Engine(
        [_ProbePlugin(_Probe())], [listing], store=MemoryStore(), discover=False, quiet_gc=0.1
    )
    _unused, plan = _engine(_Probe())
    async with engine:
        await engine.build_protect(plan)
    assert listing.seen == [True]
