"""A quiescing plugin for the dead-man tests: its "freeze" is a marker file.

``on_prepare_begin`` arms a safety thaw (``SAFETY_MODE``: ``command`` runs
``rm -f FROZEN``, ``function`` calls :func:`thaw` with the path), then creates
``FROZEN`` (the resource is now frozen) and, with ``SAFETY_HANG=1``, hangs
there as a killed engine would leave it. ``on_prepare_finish`` (the thaw)
removes it, and fails while ``SAFETY_STUCK`` names an existing file (a thaw
that cannot work until someone else thawed). Every call is journalled.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import ClassVar

import anyio
import anyio.to_thread

from karbor_async import HookContext, ProtectionPlugin, ResourceType

DB = "Test::Db"


def thaw(path: str) -> str:
    """The safety thaw by function: idempotent."""
    Path(path).unlink(missing_ok=True)
    with Path(path + ".thawed-by").open("a") as f:
        f.write(f"function {os.getpid()}\n")
    return "thawed"


def _journal(line: str) -> None:
    journal = os.environ.get("SAFETY_JOURNAL")
    if journal:
        with Path(journal).open("a") as f:
            f.write(line + "\n")


class _Op:
    async def on_prepare_begin(self, ctx: HookContext) -> None:
        frozen = os.environ["SAFETY_FROZEN"]
        if os.environ.get("SAFETY_MODE", "command") == "command":
            await ctx.arm_safety_thaw(command=["rm", "-f", frozen])
        else:
            await ctx.arm_safety_thaw(function="safetyplugin:thaw", args={"path": frozen})
        await anyio.to_thread.run_sync(Path(frozen).write_text, "frozen")
        _journal(f"freeze {ctx.attempt}")
        if os.environ.get("SAFETY_HANG") == "1":
            await anyio.sleep_forever()

    async def on_prepare_finish(self, ctx: HookContext) -> None:
        stuck = os.environ.get("SAFETY_STUCK")
        _journal(f"thaw {ctx.aborting.value if ctx.aborting else '-'} {ctx.attempt}")
        frozen = anyio.Path(os.environ["SAFETY_FROZEN"])
        if stuck and await frozen.exists():
            raise OSError("the thaw cannot reach the resource")
        await frozen.unlink(missing_ok=True)


class SafetyPlugin(ProtectionPlugin):
    name = "safety"
    types: ClassVar[tuple[ResourceType, ...]] = (ResourceType(DB, quiesces=True, snapshots=False),)

    def get_protect_operation(self, resource_type: str) -> object:
        return _Op()
