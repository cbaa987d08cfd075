"""A plugin for the crash tests: journals every hook call and can block at a named point.

The child process protects or restores with it; ``CRASH_AT`` names the point
(``TYPE#ID:hook:operation``) where the hook blocks forever after journalling
``BLOCK``; ``CRASH_JOURNAL`` is the journal file. With ``CRASH_CUT_IN_PROCESS=1``,
:func:`crash_plugin` gives :class:`InProcessCrashPlugin`, whose volumes' cuts live in
the process (``cut_outlives_process=False``). Restores create "resources" by
journalling ``CREATE`` lines, and adopt what ``ctx.restored_id`` says exists.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import anyio
import anyio.to_thread

from karbor_async import HookContext, ProtectionPlugin, ResourceType

SERVER = "OS::Nova::Server"
VOLUME = "OS::Cinder::Volume"


def _append(path: str, line: str) -> None:
    with Path(path).open("a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


class _Op:
    async def _journal(self, ctx: HookContext, extra: str = "") -> None:
        path = os.environ["CRASH_JOURNAL"]
        abort = ctx.aborting.value if ctx.aborting else "-"
        line = (
            f"{os.getpid()} {ctx.operation.value} {ctx.resource.type}#{ctx.resource.id} "
            f"{ctx.hook.value} {abort} {ctx.attempt}{extra}"
        )
        await anyio.to_thread.run_sync(_append, path, line)

    async def _maybe_block(self, ctx: HookContext) -> None:
        point = f"{ctx.resource.type}#{ctx.resource.id}:{ctx.hook.value}:{ctx.operation.value}"
        if os.environ.get("CRASH_AT") == point and ctx.aborting is None:
            await self._journal(ctx, " BLOCK")
            await anyio.sleep_forever()

    async def _hook(self, ctx: HookContext) -> None:
        await self._journal(ctx)
        point = f"{ctx.resource.type}#{ctx.resource.id}:{ctx.hook.value}:{ctx.attempt}"
        if os.environ.get("CRASH_FAIL") == point and ctx.aborting is None:
            raise RuntimeError(f"injected failure of attempt {ctx.attempt}")
        if ctx.operation.value == "protect" and ctx.hook.value == "on_main":
            await ctx.bank.put("data", f"{ctx.resource.id}".encode())
            ctx.save(copied=True, attempt=ctx.attempt)
        if ctx.operation.value == "restore" and ctx.aborting is None:
            creates = (ctx.resource.type == VOLUME and ctx.hook.value == "on_main") or (
                ctx.resource.type == SERVER and ctx.hook.value == "on_complete"
            )
            if creates and ctx.restored_id(ctx.resource) is None:
                new_id = f"new-{ctx.resource.id}"
                await self._journal(ctx, f" CREATE {new_id}")
                await ctx.report_restored(new_id)
        await self._maybe_block(ctx)

    async def on_prepare_begin(self, ctx: HookContext) -> None:
        await self._hook(ctx)

    async def on_prepare_finish(self, ctx: HookContext) -> None:
        await self._hook(ctx)

    async def on_main(self, ctx: HookContext) -> None:
        await self._hook(ctx)

    async def on_complete(self, ctx: HookContext) -> None:
        await self._hook(ctx)


class CrashPlugin(ProtectionPlugin):
    name = "crash"
    types: ClassVar[tuple[ResourceType, ...]] = (
        ResourceType(SERVER, quiesces=True, snapshots=False),
        ResourceType(VOLUME),
    )

    def get_protect_operation(self, resource_type: str) -> object:
        return _Op()

    def get_restore_operation(self, resource_type: str) -> object:
        return _Op()

    def get_delete_operation(self, resource_type: str) -> object:
        return _Op()


class InProcessCrashPlugin(CrashPlugin):
    """The same, but a volume's cut dies with the process (an open read transaction)."""

    types: ClassVar[tuple[ResourceType, ...]] = (
        ResourceType(SERVER, quiesces=True, snapshots=False),
        ResourceType(VOLUME, cut_outlives_process=False),
    )


def crash_plugin() -> CrashPlugin:
    """The plugin ``CRASH_CUT_IN_PROCESS`` asks for (the child and the recovering engine
    must agree on the types)."""
    if os.environ.get("CRASH_CUT_IN_PROCESS") == "1":
        return InProcessCrashPlugin()
    return CrashPlugin()
