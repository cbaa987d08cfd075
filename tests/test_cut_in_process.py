"""Cuts that live in the engine's process (``cut_outlives_process=False``).

Such a cut (an open read transaction) is held from its ``on_prepare_finish`` until
its ``on_main`` has copied it. When the run stops short in between, the engine calls
its ``on_prepare_finish`` once more with ``ctx.aborting`` set, so that the plugin
closes it; recovery after a crash is in ``test_recovery.py``.
"""

from __future__ import annotations

import anyio
import pytest

from karbor_async import BarrierPolicy, Engine, Hook, MemoryStore, Plan, Resource, ResourceType
from karbor_async.exceptions import RunError
from karbor_async.testing import Fault, RecordingPlugin

HELD = "Test::Held"
DISK = "Test::Disk"
A, B = Resource(HELD, "a"), Resource(DISK, "b")


def _plugin(**kw: object) -> RecordingPlugin:
    return RecordingPlugin([ResourceType(HELD, cut_outlives_process=False), DISK], **kw)  # type: ignore[arg-type]


def _cuts(plugin: RecordingPlugin, res: Resource) -> list[tuple[str | None, str]]:
    return [
        (e.aborting.value if e.aborting else None, e.outcome)
        for e in plugin.calls(res.key, Hook.PREPARE_FINISH)
    ]


async def test_a_group_that_aborts_after_the_cut_releases_it() -> None:
    """Another resource's cut fails after A's cut: A's main never runs, so A's
    on_prepare_finish is called again, aborting, to close what holds its cut."""
    plugin = _plugin(
        faults={(f"{DISK}#b", "on_prepare_finish"): Fault.RAISE},
        delays={(f"{DISK}#b", "on_prepare_finish"): 0.05},
    )
    async with Engine([plugin], [], store=MemoryStore(), discover=False) as engine:
        with pytest.raises(RunError) as info:
            await engine.protect(Plan(name="p", resources=[A, B], barrier=BarrierPolicy.MAIN))
    assert _cuts(plugin, A) == [(None, "ok"), ("failure", "ok")]
    assert plugin.calls(A.key, Hook.MAIN) == []
    assert info.value.outcome.resources[A.key].error is None


async def test_a_cancel_while_waiting_for_main_releases_the_cut() -> None:
    """Cancelled between the cut and the copy: the cut is released (aborting: cancelled)."""
    plugin = _plugin(delays={(f"{DISK}#b", "on_prepare_finish"): 0.3})
    async with Engine([plugin], [], store=MemoryStore(), discover=False) as engine:
        run = await engine.build_protect(
            Plan(name="p", resources=[A, B], barrier=BarrierPolicy.MAIN)
        )
        async with anyio.create_task_group() as tg:

            async def cancel_after_a_cut() -> None:
                while not plugin.calls(A.key, Hook.PREPARE_FINISH) or (  # noqa: ASYNC110 - polls the trace
                    plugin.calls(A.key, Hook.PREPARE_FINISH)[0].outcome != "ok"
                ):
                    await anyio.sleep(0.01)
                run.cancel()

            tg.start_soon(cancel_after_a_cut)
            with pytest.raises(RunError):
                await engine.execute(run)
    assert _cuts(plugin, A) == [(None, "ok"), ("cancelled", "ok")]


async def test_a_cut_copied_or_a_cut_that_outlives_the_process_is_not_released_again() -> None:
    """A successful run calls each on_prepare_finish once; so does a failed one for a
    type whose cut outlives the process, and for an in-process cut already copied."""
    plugin = _plugin()
    async with Engine([plugin], [], store=MemoryStore(), discover=False) as engine:
        await engine.protect(Plan(name="p", resources=[A, B]))
    assert _cuts(plugin, A) == [(None, "ok")] and _cuts(plugin, B) == [(None, "ok")]

    failing = RecordingPlugin(
        [ResourceType(HELD, cut_outlives_process=False), DISK],
        faults={
            (f"{DISK}#b", "on_complete"): Fault.RAISE,
            (f"{HELD}#a", "on_complete"): Fault.RAISE,
        },
    )
    async with Engine([failing], [], store=MemoryStore(), discover=False) as engine:
        with pytest.raises(RunError):
            await engine.protect(Plan(name="p", resources=[A, B]))
    assert _cuts(failing, A) == [(None, "ok")] and _cuts(failing, B) == [(None, "ok")]


async def test_a_restore_that_aborts_calls_no_extra_on_prepare_finish() -> None:
    """Only a protect cuts: an aborted restore does not call on_prepare_finish again."""
    plugin = _plugin(
        faults={(f"{DISK}#b", "on_prepare_finish"): Fault.RAISE},
        delays={(f"{DISK}#b", "on_prepare_finish"): 0.05},
        fault_operations=("restore",),
    )
    async with Engine([plugin], [], store=MemoryStore(), discover=False) as engine:
        protected = await engine.protect(Plan(name="p", resources=[A, B]))
        with pytest.raises(RunError):
            await engine.restore(protected.checkpoint_id, barrier=BarrierPolicy.MAIN)
    restore_cuts = [
        e for e in plugin.calls(A.key, Hook.PREPARE_FINISH) if e.operation.value == "restore"
    ]
    assert [(e.aborting, e.outcome) for e in restore_cuts] == [(None, "ok")]
    assert plugin.calls(A.key, Hook.MAIN)[-1].operation.value == "protect"
