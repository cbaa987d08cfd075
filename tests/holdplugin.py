"""A resource that holds a fs protect at a chosen point, for the kill -9 tests.

With ``HOLD_AT`` set, every ``Linux::FileSystem`` gets one ``Test::Hold`` child
(so its ``on_prepare_begin`` starts only once the file system is frozen, and
the file system's thaw waits for its cut). At ``HOLD_AT`` (``on_prepare_begin``
or ``on_prepare_finish``) the hook writes ``HOLD_MARK`` and hangs.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import ClassVar

import anyio

from karbor_async import HookContext, ProtectionPlugin, Resource, ResourceType
from karbor_fs import FILESYSTEM

HOLD = "Test::Hold"


class _Op:
    async def _hold(self, ctx: HookContext) -> None:
        if ctx.aborting is None and os.environ.get("HOLD_AT") == ctx.hook.value:
            await anyio.Path(os.environ["HOLD_MARK"]).write_text(ctx.hook.value)
            await anyio.sleep_forever()

    async def on_prepare_begin(self, ctx: HookContext) -> None:
        await self._hold(ctx)

    async def on_prepare_finish(self, ctx: HookContext) -> None:
        await self._hold(ctx)


class HoldPlugin(ProtectionPlugin):
    name = "hold"
    types: ClassVar[tuple[ResourceType, ...]] = (ResourceType(HOLD),)

    def get_protect_operation(self, resource_type: str) -> object:
        return _Op()


class HoldProtectable:
    resource_type = HOLD
    parent_types: tuple[str, ...] = (FILESYSTEM,)

    async def dependents(self, parent: Resource) -> Iterable[Resource]:
        if not os.environ.get("HOLD_AT"):
            return []
        return [Resource(HOLD, "hold")]
