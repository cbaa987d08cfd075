"""The public API takes what users write: enum strings, plans for retain, Param's defaults.

Each test here failed before the enums became ``StrEnum`` and the parameters took
their strings: a value a vendor or application writes as documented text must
either work exactly like the member or be refused at once, naming what is allowed.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, ClassVar

import pytest

from helpers import PROJECT, SERVER, TYPES, VOLUME, key, res, setup, sk
from karbor_async import (
    AbortReason,
    BarrierPolicy,
    CheckpointStatus,
    ConsistencyGroup,
    Engine,
    EventKind,
    Hook,
    HookContext,
    MemoryBank,
    MemoryStore,
    OperationKind,
    Param,
    Plan,
    ProtectionPlugin,
    ResourceStatus,
    ResourceType,
    RunStatus,
)
from karbor_async.exceptions import PlanError, RunError
from karbor_async.testing import Fault, RecordingPlugin, make_context, protectables_for

PUBLIC_ENUMS: tuple[type[enum.StrEnum], ...] = (
    BarrierPolicy,
    OperationKind,
    Hook,
    AbortReason,
    RunStatus,
    ResourceStatus,
    CheckpointStatus,
    EventKind,
    Fault,
)


@pytest.mark.parametrize("cls", PUBLIC_ENUMS, ids=lambda c: c.__name__)
def test_public_enums_are_str_enums_whose_values_are_the_documented_strings(
    cls: type[enum.StrEnum],
) -> None:
    assert issubclass(cls, enum.StrEnum)
    for member in cls:
        assert member == member.value and str(member) == member.value
        assert f"{member}" == member.value
        assert cls(member.value) is member
        assert member.value == member.value.lower()  # the documented, lower-case spelling


def test_hook_strings_are_the_method_names() -> None:
    assert [str(h) for h in Hook] == [
        "on_prepare_begin",
        "on_prepare_finish",
        "on_main",
        "on_complete",
    ]


async def test_plan_barrier_given_as_a_string_runs_under_that_barrier() -> None:
    engine, plugin, _ = setup([("s1", "v1"), ("s2", "v2")], ["s1", "s2"])
    plan = Plan(name="test", resources=[res("s1"), res("s2")], barrier="cut")
    assert plan.barrier is BarrierPolicy.CUT
    async with engine:
        outcome = await engine.protect(plan)
    assert outcome.status is RunStatus.SUCCEEDED
    # under `cut` every cut starts after every quiesce of the group has ended
    quiesces = [e for e in plugin.trace if e.hook is Hook.PREPARE_BEGIN and e.resource[0] == SERVER]
    cuts = [e for e in plugin.trace if e.hook is Hook.PREPARE_FINISH and e.resource[0] == VOLUME]
    assert cuts and min(c.start for c in cuts) >= max(q.end or 0.0 for q in quiesces)


def test_group_barrier_given_as_a_string() -> None:
    group = ConsistencyGroup("g", [res("s1")], barrier="main")
    assert group.barrier is BarrierPolicy.MAIN


@pytest.mark.parametrize("value", ["strict", "CUT ", 2, ""])
def test_an_unknown_barrier_is_a_plan_error_listing_the_allowed_values(value: object) -> None:
    with pytest.raises(PlanError, match=r"barrier must be one of 'none', 'main', 'cut'"):
        Plan(name="p", resources=[res("s1")], barrier=value)  # type: ignore[arg-type]


def test_plan_errors_are_value_errors() -> None:
    with pytest.raises(ValueError, match="barrier"):
        ConsistencyGroup("g", [res("s1")], barrier="sometimes")


def test_a_plan_from_json_takes_barrier_strings_and_refuses_unknown_ones() -> None:
    data: dict[str, Any] = {
        "name": "p",
        "resources": [res("s1").to_json()],
        "barrier": "cut",
        "groups": [{"name": "g", "resources": [sk("s1")], "barrier": "none"}],
    }
    plan = Plan.from_json(data)
    assert plan.barrier is BarrierPolicy.CUT and plan.groups[0].barrier is BarrierPolicy.NONE
    with pytest.raises(PlanError, match="'none', 'main', 'cut', not 'hard'"):
        Plan.from_json({**data, "barrier": "hard"})


async def test_restore_barrier_given_as_a_string() -> None:
    engine, _plugin, plan = setup([("s1", "v1")], ["s1"])
    async with engine:
        cp = (await engine.protect(plan)).checkpoint_id
        assert (await engine.restore(cp, barrier="main")).status is RunStatus.SUCCEEDED
        with pytest.raises(ValueError, match="barrier must be one of"):
            await engine.restore(cp, barrier="total")


class _AbortWatcher(ProtectionPlugin):
    """Records how ``ctx.aborting`` compares with the documented strings."""

    name = "watcher"
    types: ClassVar[tuple[ResourceType, ...]] = (
        ResourceType(SERVER, quiesces=True, snapshots=False),
        ResourceType(VOLUME),
    )

    def __init__(self) -> None:
        self.aborting: list[tuple[bool, bool]] = []

    def get_protect_operation(self, resource_type: str) -> object:
        return self

    async def on_prepare_begin(self, ctx: HookContext) -> None:
        if ctx.resource.type == VOLUME:
            raise RuntimeError("the array refused the snapshot")

    async def on_prepare_finish(self, ctx: HookContext) -> None:
        if ctx.aborting is not None:
            self.aborting.append((ctx.aborting == "failure", ctx.aborting in {"failure"}))

    async def on_main(self, ctx: HookContext) -> None:
        return None

    async def on_complete(self, ctx: HookContext) -> None:
        return None


async def test_ctx_aborting_equals_its_documented_string() -> None:
    plugin = _AbortWatcher()
    finder = protectables_for([(res("s1"), res("v1"))])
    async with Engine([plugin], finder, store=MemoryStore(), discover=False) as engine:
        with pytest.raises(RunError):
            await engine.protect(Plan(name="p", resources=[res("s1")]))
    assert plugin.aborting and set(plugin.aborting) == {(True, True)}


def test_make_context_takes_strings() -> None:
    ctx, _rec = make_context(
        res("s1"), "on_prepare_finish", operation="restore", aborting="failure"
    )
    assert ctx.hook is Hook.PREPARE_FINISH and ctx.operation is OperationKind.RESTORE
    assert ctx.aborting is AbortReason.FAILURE
    with pytest.raises(ValueError, match=r"hook must be one of 'on_prepare_begin'.*not 'main'"):
        make_context(res("s1"), "main")


async def test_recording_plugin_faults_written_with_strings_inject() -> None:
    plugin = RecordingPlugin(TYPES, faults={(sk("v1"), "on_main"): "raise"})
    assert plugin.faults == {(sk("v1"), Hook.MAIN): Fault.RAISE}
    finder = protectables_for([(res("s1"), res("v1"))])
    async with Engine([plugin], finder, store=MemoryStore(), discover=False) as engine:
        with pytest.raises(RunError) as caught:
            await engine.protect(Plan(name="p", resources=[res("s1")]))
    assert caught.value.outcome.resources[key("v1")].status is ResourceStatus.FAILED
    assert plugin.calls(key("v1"), "on_main")[0].outcome == "error"


async def test_recording_plugin_delays_written_with_strings_apply() -> None:
    plugin = RecordingPlugin(TYPES, delays={(SERVER, "on_prepare_begin"): 0.05})
    finder = protectables_for([(res("s1"), res("v1"))])
    async with Engine([plugin], finder, store=MemoryStore(), discover=False) as engine:
        await engine.protect(Plan(name="p", resources=[res("s1")]))
    (entry,) = plugin.calls(key("s1"), Hook.PREPARE_BEGIN)
    assert entry.end is not None and entry.end - entry.start >= 0.045


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({("OS::Nova::Sever", "on_main"): "raise"}, r"'OS::Nova::Sever' is neither one of this"),
        ({(f"{VOLUME}#", "on_main"): "raise"}, r"nor TYPE#ID of one"),
        ({(VOLUME, "main"): "raise"}, r"the hook must be one of 'on_prepare_begin'"),
        ({(VOLUME, Hook.MAIN): "explode"}, r"must be one of 'raise', 'hang', 'cancel_run'"),
        ({VOLUME: "raise"}, r"must be a pair \(TYPE or TYPE#ID, hook\)"),
    ],
)
def test_recording_plugin_refuses_fault_keys_that_could_never_match(
    table: Mapping[Any, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        RecordingPlugin(TYPES, faults=table)


def test_recording_plugin_refuses_bad_delays_and_operations() -> None:
    with pytest.raises(ValueError, match=r"delays key .*'on_mian'"):
        RecordingPlugin(TYPES, delays={(VOLUME, "on_mian"): 1.0})
    with pytest.raises(TypeError, match=r"must be a number of seconds or a callable"):
        RecordingPlugin(TYPES, delays={(VOLUME, "on_main"): "1s"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"fault_operations must be one of 'protect'"):
        RecordingPlugin(TYPES, fault_operations=["backup"])
    plugin = RecordingPlugin(TYPES, fault_operations=["delete", OperationKind.RESTORE])
    assert plugin.fault_operations == {OperationKind.DELETE, OperationKind.RESTORE}


async def test_store_queries_take_status_strings() -> None:
    engine, _plugin, plan = setup([("s1", "v1")], ["s1"])
    async with engine:
        cp = (await engine.protect(plan)).checkpoint_id
        found = await engine.store.list_checkpoints(status="available")
        assert [c.id for c in found] == [cp]
        with pytest.raises(ValueError, match=r"status must be one of 'protecting', 'available'"):
            await engine.store.list_checkpoints(status="ok")


async def test_retain_takes_a_plan_as_the_readme_writes_it() -> None:
    engine, _plugin, plan = setup([("s1", "v1")], ["s1"])
    async with engine:
        ids = [(await engine.protect(plan)).checkpoint_id for _ in range(3)]
        outcomes = await engine.retain(plan, keep=1)
        assert [o.checkpoint_id for o in outcomes] == ids[1::-1]
        statuses = [(await engine.store.get_checkpoint(i)).status for i in ids]
        assert statuses == ["deleted", "deleted", "available"]
        assert await engine.retain(plan.name, keep=1) == []
        with pytest.raises(TypeError, match="a Plan or a plan's name, not int"):
            await engine.retain(7, keep=1)  # type: ignore[arg-type]
        with pytest.raises(PlanError, match="keep must be a whole number"):
            await engine.retain(plan, keep=-1)


# -- Param(required=, operations=) -----------------------------------------------------------


def test_param_required_defaults_to_secret_without_default() -> None:
    assert Param(str, secret=True).required is True
    assert Param(str, secret=True, default="ref").required is False
    assert Param(str).required is False
    assert Param(str, secret=True, required=False).required is False
    assert Param(int, required=True).required is True
    assert Param(str).operations == frozenset(OperationKind)
    assert Param(str, operations="protect").operations == {OperationKind.PROTECT}
    with pytest.raises(ValueError, match=r"Param operations must be one of 'protect'"):
        Param(str, operations={"backup"})
    with pytest.raises(ValueError, match="at least one"):
        Param(str, operations=())


class _ArrayPlugin(ProtectionPlugin):
    """A volume plugin whose array password only protect needs."""

    name = "array"
    types: ClassVar[tuple[ResourceType, ...]] = (
        ResourceType(PROJECT, snapshots=False),
        ResourceType(
            VOLUME,
            parameters={
                "array_password": Param(str, secret=True, operations={"protect"}),
                "pool": Param(str, default="gold"),
            },
        ),
    )

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, Any]]] = []

    def get_protect_operation(self, resource_type: str) -> object:
        return self

    def get_restore_operation(self, resource_type: str) -> object:
        return self

    def get_delete_operation(self, resource_type: str) -> object:
        return self

    async def on_prepare_begin(self, ctx: HookContext) -> None:
        return None

    async def on_prepare_finish(self, ctx: HookContext) -> None:
        return None

    async def on_main(self, ctx: HookContext) -> None:
        self.seen.append((ctx.operation.value, ctx.resource.type, dict(ctx.parameters)))
        if ctx.operation is OperationKind.RESTORE:
            await ctx.report_restored(f"new-{ctx.resource.id}")

    async def on_complete(self, ctx: HookContext) -> None:
        return None


def _array_engine(store: MemoryStore, bank: MemoryBank, **kw: Any) -> Engine:
    finder = protectables_for([(res("p1"), res("v1"))])
    return Engine([_array_plugin], finder, store=store, bank=bank, discover=False, **kw)


_array_plugin = _ArrayPlugin()


async def test_a_secret_without_default_is_required_by_protect() -> None:
    async with _array_engine(MemoryStore(), MemoryBank()) as engine:
        with pytest.raises(PlanError, match=r"required secret parameter 'array_password'"):
            await engine.protect(Plan(name="p", resources=[res("p1")]))


async def test_a_protect_only_secret_is_neither_asked_nor_seen_by_restore_and_delete() -> None:
    async def vault(name: str) -> str:
        return {"array-pw": "s3cret"}[name]

    _array_plugin.seen.clear()
    store, bank = MemoryStore(), MemoryBank()
    plan = Plan(
        name="p",
        resources=[res("p1")],
        parameters={VOLUME: {"array_password": "array-pw"}},
    )
    async with _array_engine(store, bank, secrets=vault) as engine:
        cp = (await engine.protect(plan)).checkpoint_id
    # a later engine with no secrets resolver at all can restore and delete
    async with _array_engine(store, bank) as engine:
        assert (await engine.restore(cp)).status is RunStatus.SUCCEEDED
        assert (await engine.delete(cp)).status is RunStatus.SUCCEEDED
    volume = [(op, params) for op, rtype, params in _array_plugin.seen if rtype == VOLUME]
    assert volume == [
        ("protect", {"pool": "gold", "array_password": "s3cret"}),
        ("restore", {"pool": "gold"}),
        ("delete", {"pool": "gold"}),
    ]
