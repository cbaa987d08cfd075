"""Plans, parameters and secrets are checked before any hook runs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import pytest

from helpers import SERVER, VOLUME, res
from karbor_async import (
    Engine,
    HookContext,
    MemoryStore,
    Param,
    Plan,
    ProtectionPlugin,
    ResourceType,
    Timeouts,
)
from karbor_async.exceptions import PlanError, SecretError
from karbor_async.testing import protectables_for, run_hooks


class _SeenOp:
    def __init__(self, seen: list[Mapping[str, Any]]) -> None:
        self.seen = seen

    async def on_main(self, ctx: HookContext) -> None:
        self.seen.append(dict(ctx.parameters))
        ctx.log.info("copying", note="parameters are not logged")


class DbPlugin(ProtectionPlugin):
    name = "db"
    types: ClassVar[tuple[ResourceType, ...]] = (
        ResourceType(
            VOLUME,
            parameters={
                "pool": Param(str, default="gold"),
                "streams": Param(int, default=1),
                "password": Param(str, secret=True, required=False),
            },
        ),
        ResourceType(SERVER, quiesces=True, snapshots=False, parameters=None),
    )

    def __init__(self) -> None:
        self.seen: list[Mapping[str, Any]] = []

    def get_protect_operation(self, resource_type: str) -> object:
        return _SeenOp(self.seen)


def _engine(store: MemoryStore | None = None, **kw: Any) -> tuple[Engine, DbPlugin]:
    plugin = DbPlugin()
    finders = protectables_for([(res("s1"), res("v1")), (res("s1"), res("v2"))])
    return Engine([plugin], finders, discover=False, store=store, **kw), plugin


async def test_type_parameters_are_overridden_per_resource() -> None:
    """Each hook sees defaults, then "Type", then "Type#id" parameters."""
    engine, plugin = _engine()
    async with engine:
        plan = Plan(
            name="p",
            resources=[res("s1")],
            parameters={VOLUME: {"streams": 4}, f"{VOLUME}#v2": {"pool": "silver"}},
        )
        await engine.protect(plan)
        by_pool = sorted((p["pool"], p["streams"]) for p in plugin.seen if "pool" in p)
        assert by_pool == [("gold", 4), ("silver", 4)]


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({VOLUME: {"colour": "red"}}, r"OS::Cinder::Volume#v\d: unknown parameter 'colour'"),
        ({VOLUME: {"streams": "4"}}, r"parameter 'streams' must be int, got str"),
        ({f"{VOLUME}#v9": {"pool": "x"}}, r"names a resource that is not in the plan's graph"),
        ({"OS::Glance::Image": {"x": 1}}, r"names a type with no resource in the plan's graph"),
    ],
)
async def test_bad_parameters_are_named_before_any_hook(
    parameters: dict[str, dict[str, Any]], message: str
) -> None:
    engine, plugin = _engine()
    async with engine:
        with pytest.raises(PlanError, match=message):
            await engine.protect(Plan(name="p", resources=[res("s1")], parameters=parameters))
        assert plugin.seen == []


async def test_secret_is_resolved_for_the_hook_and_stored_as_a_reference() -> None:
    """The hook gets the value; the stored plan, events and logs hold only the name."""

    async def resolver(name: str) -> str:
        return {"db-password": "hunter2"}[name]

    store = MemoryStore()
    engine, plugin = _engine(store, secrets=resolver)
    async with engine:
        plan = Plan(
            name="p", resources=[res("s1")], parameters={VOLUME: {"password": "db-password"}}
        )
        outcome = await engine.protect(plan)
        assert {p.get("password") for p in plugin.seen if "pool" in p} == {"hunter2"}
        record = await store.get_run(outcome.run_id)
        assert "hunter2" not in repr(record.plan)
        assert "db-password" in repr(record.plan)
        events = await store.read_events(outcome.run_id)
        assert "hunter2" not in repr([e.to_json() for e in events])


async def test_missing_resolver_stops_before_any_hook() -> None:
    engine, plugin = _engine()
    async with engine:
        plan = Plan(
            name="p", resources=[res("s1")], parameters={VOLUME: {"password": "db-password"}}
        )
        with pytest.raises(SecretError, match=r"'password' is secret .* no secrets resolver"):
            await engine.protect(plan)
        assert plugin.seen == []


async def test_unresolvable_secret_names_parameter_and_resource() -> None:
    async def resolver(name: str) -> str:
        raise KeyError(name)

    engine, plugin = _engine(secrets=resolver)
    async with engine:
        plan = Plan(name="p", resources=[res("s1")], parameters={VOLUME: {"password": "nope"}})
        with pytest.raises(
            SecretError, match=r"OS::Cinder::Volume#v1: cannot resolve .*'password'"
        ):
            await engine.protect(plan)
        assert plugin.seen == []


async def test_secret_value_in_plan_is_refused() -> None:
    engine, _plugin = _engine()
    async with engine:
        plan = Plan(name="p", resources=[res("s1")], parameters={VOLUME: {"password": 1234}})
        with pytest.raises(PlanError, match="secret; the plan must hold the secret's name"):
            await engine.protect(plan)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"resources": []}, "names no resources"),
        ({"resources": [res("s1"), res("s1")]}, "names OS::Nova::Server#s1 twice"),
        ({"limits": {VOLUME: 0}}, r"limits\['OS::Cinder::Volume'\] must be a whole number"),
    ],
)
def test_malformed_plans_are_refused(kwargs: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"name": "p", "resources": [res("s1")]}
    with pytest.raises(PlanError, match=message):
        Plan(**{**base, **kwargs})


def test_bad_timeouts_are_refused() -> None:
    with pytest.raises(PlanError, match=r"timeouts\.hook must be a positive number"):
        Timeouts(hook=-1)


def test_plan_json_round_trips() -> None:
    plan = Plan(
        name="p",
        resources=[res("s1")],
        parameters={VOLUME: {"pool": "gold"}},
        timeouts=Timeouts(hook=5, quiesce_budget=2),
        limits={VOLUME: 3},
    )
    assert Plan.from_json(plan.to_json()) == plan


def test_plan_from_json_names_missing_key() -> None:
    with pytest.raises(PlanError, match="missing the key 'resources'"):
        Plan.from_json({"name": "x"})


async def test_run_hooks_helper_runs_a_plugin_as_the_engine_does() -> None:
    """The testing helper protects, restores and deletes one resource with a real engine."""
    plugin = DbPlugin()
    got = await run_hooks(plugin, res("v1"), parameters={"pool": "x"}, delete=True)
    assert got.protect.status.value == "succeeded"
    assert got.delete is not None and got.delete.status.value == "succeeded"
    assert plugin.seen[0]["pool"] == "x"


async def test_restore_and_delete_resolve_secrets_or_stop_clearly() -> None:
    """Restore and delete resolve secret parameters through the engine's resolver, and an
    engine without one stops before any hook with an error naming parameter and resource."""

    async def resolver(name: str) -> str:
        return {"db-password": "hunter2"}[name]

    store = MemoryStore()
    engine, _plugin = _engine(store, secrets=resolver)
    async with engine:
        plan = Plan(
            name="p", resources=[res("s1")], parameters={VOLUME: {"password": "db-password"}}
        )
        outcome = await engine.protect(plan)
        bare, bare_plugin = _engine(store)
        async with bare:
            with pytest.raises(SecretError, match=r"OS::Cinder::Volume#v\d: parameter 'password'"):
                await bare.restore(outcome.checkpoint_id)
            with pytest.raises(SecretError, match="no secrets resolver"):
                await bare.delete(outcome.checkpoint_id)
            assert bare_plugin.seen == []
        restored = await engine.restore(outcome.checkpoint_id)
        assert restored.status.value == "succeeded"
