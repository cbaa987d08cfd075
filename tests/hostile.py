"""A hostile plugin: hooks that raise BaseExceptions, swallow their cancellation, or hang.

Each behaviour is keyed by ``(operation, resource id, hook, aborting)``; every
other call behaves (volumes snapshot, servers quiesce and thaw, main copies).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Mapping

import anyio
import attrs

from helpers import SERVER, TYPES, VOLUME, res
from karbor_async import Hook, HookContext, OperationKind, ProtectionPlugin, Resource


class CustomBaseError(BaseException):
    """A BaseException that is neither an Exception nor a cancellation."""


class Behaviour(enum.Enum):
    KEYBOARD_INTERRUPT = "keyboard_interrupt"
    SYSTEM_EXIT = "system_exit"
    GENERATOR_EXIT = "generator_exit"
    BASE_GROUP = "base_exception_group"
    CUSTOM_BASE = "custom_base_exception"
    STRAY_CANCEL = "stray_cancel"
    """Raise the backend's cancellation exception while nothing cancelled the hook."""
    SWALLOW_ONCE = "swallow_once"
    SWALLOW_1_5 = "swallow_1.5s"
    SWALLOW_FOREVER = "swallow_forever"
    """Until the test sets ``release`` (so the engine can close at the end of a test)."""
    HANG = "hang"
    RAISE = "raise"

    @property
    def raises(self) -> bool:
        return self in _RAISING

    @property
    def swallows(self) -> bool:
        return self in (Behaviour.SWALLOW_ONCE, Behaviour.SWALLOW_1_5, Behaviour.SWALLOW_FOREVER)


_RAISING = {
    Behaviour.KEYBOARD_INTERRUPT,
    Behaviour.SYSTEM_EXIT,
    Behaviour.GENERATOR_EXIT,
    Behaviour.BASE_GROUP,
    Behaviour.CUSTOM_BASE,
    Behaviour.STRAY_CANCEL,
    Behaviour.RAISE,
}

Key = tuple[OperationKind, str, Hook, bool]
"""(operation, resource id, hook, aborting)."""


@attrs.define
class Call:
    op: OperationKind
    resource: str
    hook: Hook
    aborting: bool
    outcome: str = "running"
    raised: BaseException | None = None


async def _stray_cancel() -> BaseException:
    """A real cancellation exception of the backend, caught from a scope of our own."""
    with anyio.CancelScope() as scope:
        scope.cancel()
        try:
            await anyio.lowlevel.checkpoint()
        except anyio.get_cancelled_exc_class() as exc:
            return exc
    raise AssertionError("the cancelled scope did not cancel")


class _Op:
    def __init__(self, plugin: HostilePlugin) -> None:
        self._plugin = plugin

    async def _hook(self, ctx: HookContext) -> None:
        await self._plugin.call(ctx)

    on_prepare_begin = on_prepare_finish = on_main = on_complete = _hook


class HostilePlugin(ProtectionPlugin):
    name = "hostile"
    types = TYPES

    def __init__(self, behaviours: Mapping[Key, Behaviour] | None = None) -> None:
        self.behaviours: dict[Key, Behaviour] = dict(behaviours or {})
        self.calls: list[Call] = []
        self.release = False
        """Set by the test: swallowing hooks stop swallowing."""
        self.raised: list[BaseException] = []
        self._op = _Op(self)

    def get_protect_operation(self, resource_type: str) -> object:
        return self._op

    def get_restore_operation(self, resource_type: str) -> object:
        return self._op

    def get_delete_operation(self, resource_type: str) -> object:
        return self._op

    def calls_of(self, resource: str, hook: Hook | None = None) -> list[Call]:
        return [
            c for c in self.calls if c.resource == resource and (hook is None or c.hook is hook)
        ]

    async def call(self, ctx: HookContext) -> None:
        res = ctx.resource
        aborting = ctx.aborting is not None
        record = Call(ctx.operation, res.id, ctx.hook, aborting)
        self.calls.append(record)
        behaviour = self.behaviours.get((ctx.operation, res.id, ctx.hook, aborting))
        try:
            if behaviour is not None:
                await self._misbehave(behaviour)
            await self._behave(ctx)
        except BaseException as exc:
            record.outcome = "raised"
            record.raised = exc
            raise
        record.outcome = "ok"

    async def _behave(self, ctx: HookContext) -> None:
        res, hook = ctx.resource, ctx.hook
        if ctx.operation is not OperationKind.PROTECT:
            restoring = ctx.operation is OperationKind.RESTORE and hook is Hook.MAIN
            if restoring and ctx.restored_id(res) is None:
                await ctx.report_restored(f"new-{res.id}")
            return
        if hook is Hook.PREPARE_BEGIN and res.type == SERVER:
            ctx.mark_quiesced()
        elif hook is Hook.PREPARE_FINISH and res.type == VOLUME and ctx.aborting is None:
            ctx.save(snapshot=f"snap-{res.id}")
            ctx.mark_cut()
        elif hook is Hook.PREPARE_FINISH and res.type == SERVER:
            ctx.mark_thawed()
        elif hook is Hook.MAIN and res.type == VOLUME:
            await ctx.bank.put("data", res.id.encode())

    async def _misbehave(self, behaviour: Behaviour) -> None:
        exc: BaseException
        if behaviour is Behaviour.KEYBOARD_INTERRUPT:
            exc = KeyboardInterrupt()
        elif behaviour is Behaviour.SYSTEM_EXIT:
            exc = SystemExit(3)
        elif behaviour is Behaviour.GENERATOR_EXIT:
            exc = GeneratorExit()
        elif behaviour is Behaviour.BASE_GROUP:
            exc = BaseExceptionGroup("hostile", [RuntimeError("inner"), CustomBaseError("inner")])
        elif behaviour is Behaviour.CUSTOM_BASE:
            exc = CustomBaseError("hostile")
        elif behaviour is Behaviour.STRAY_CANCEL:
            exc = await _stray_cancel()
        elif behaviour is Behaviour.RAISE:
            exc = RuntimeError("injected")
        elif behaviour is Behaviour.HANG:
            await anyio.sleep_forever()
            return
        else:
            await self._swallow(behaviour)
            return
        self.raised.append(exc)
        raise exc

    async def _swallow(self, behaviour: Behaviour) -> None:
        """Hang; when cancelled, keep waiting (once, for 1.5 s, or until released)."""
        cancelled = anyio.get_cancelled_exc_class()
        until: float | None = None
        while True:
            try:
                await anyio.sleep(3600)
            except cancelled:
                now = time.monotonic()
                if until is None:  # the first one is always swallowed
                    until = now + (1.5 if behaviour is Behaviour.SWALLOW_1_5 else 0.0)
                    continue
                if behaviour is Behaviour.SWALLOW_FOREVER and not self.release:
                    continue
                if now < until:
                    continue
                raise


def graph_edges() -> list[tuple[Resource, Resource]]:
    """p1 -> s1 -> (v1, v2); p1 -> s2 -> v3."""
    pairs = [("p1", "s1"), ("s1", "v1"), ("s1", "v2"), ("p1", "s2"), ("s2", "v3")]
    return [(res(a), res(b)) for a, b in pairs]


resource = res
