"""The shard's protection plugin (it quiesces) and the protectable that finds its store.

A shard is a root resource that quiesces and takes no cut of its own: its store,
a dependent of type ``SQLite::Database``, is cut by the SQLite plugin while the
shard is paused. ``on_prepare_begin`` opens a control connection to the shard,
asks it to ``PAUSE`` and waits for ``PAUSED``; the pause lasts while that
connection is open, so ``on_prepare_finish`` (the thaw) says ``RESUME`` and closes
it, and an engine killed in between leaves nothing paused: its connection ends
with its process and the shard resumes by itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

import anyio
import anyio.abc

from karbor_async import HookContext, Param, ProtectionPlugin, Resource, ResourceKey, ResourceType
from karbor_async.exceptions import PlanError
from karbor_ledger._app import SHARD, SQLITE
from karbor_ledger._shard import _Lines

__all__ = ["ShardProtection", "ShardStoreProtectable"]


class _Pause:
    """One held pause: the control connection whose end resumes the shard."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.lines = _Lines(stream)

    async def resume(self) -> None:
        try:
            with anyio.fail_after(5):
                await self.lines.write("RESUME")
                await self.lines.read()
        except (OSError, anyio.BrokenResourceError, TimeoutError):
            pass  # the shard resumes when the connection ends, which it does now
        finally:
            await self.lines.stream.aclose()


class _ShardOperation:
    """Protect: pause in ``on_prepare_begin``, resume in ``on_prepare_finish``."""

    def __init__(self, held: dict[tuple[str, ResourceKey], _Pause]) -> None:
        self._held = held

    async def on_prepare_begin(self, ctx: HookContext) -> None:
        if not ctx.parameters.get("quiesce", True):
            return
        socket = _socket(ctx.resource)
        slot = (ctx.run_id, ctx.resource.key)
        old = self._held.pop(slot, None)
        if old is not None:  # a retried attempt: let go of the earlier pause first
            await old.resume()
        try:
            stream = await anyio.connect_unix(socket)
        except OSError as exc:
            raise RuntimeError(f"cannot reach ledger shard at {socket}: {exc}") from exc
        pause = _Pause(stream)
        self._held[slot] = pause
        await pause.lines.write("PAUSE")
        answer = await pause.lines.read()
        if answer != "PAUSED":
            raise RuntimeError(f"ledger shard at {socket} answered {answer!r} to PAUSE")
        ctx.mark_quiesced()

    async def on_prepare_finish(self, ctx: HookContext) -> None:
        pause = self._held.pop((ctx.run_id, ctx.resource.key), None)
        if pause is not None:  # idempotent: a pause never taken, or already let go
            await pause.resume()
            ctx.mark_thawed()


class ShardProtection(ProtectionPlugin):
    """Quiesces a ledger shard; its store is protected by the SQLite plugin."""

    name = "ledger"
    types: ClassVar[tuple[ResourceType, ...]] = (
        ResourceType(
            SHARD,
            quiesces=True,
            snapshots=False,
            parameters={
                "quiesce": Param(
                    bool, default=True, description="pause the shard at a safe point while cut"
                ),
            },
        ),
    )

    def __init__(self) -> None:
        self._held: dict[tuple[str, ResourceKey], _Pause] = {}
        self._protect = _ShardOperation(self._held)

    def get_protect_operation(self, resource_type: str) -> object:
        return self._protect

    def get_restore_operation(self, resource_type: str) -> object:
        return _NOTHING  # a shard is a process: restoring means restoring its store

    def get_delete_operation(self, resource_type: str) -> object:
        return _NOTHING


class _Nothing:
    """An operation whose hooks do nothing (a shard has no data of its own)."""


_NOTHING = _Nothing()


class ShardStoreProtectable:
    """A shard depends on its store: one ``SQLite::Database`` resource, its file's path."""

    resource_type: str = SQLITE
    parent_types: tuple[str, ...] = (SHARD,)

    async def dependents(self, parent: Resource) -> Iterable[Resource]:
        db = parent.extra.get("db")
        if not isinstance(db, str) or not db:
            raise PlanError(f"{parent}: a ledger shard needs extra['db'], its store's path")
        return [Resource(SQLITE, db, name=f"store of shard {parent.id}")]


def _socket(resource: Resource) -> Path:
    socket = resource.extra.get("socket")
    if not isinstance(socket, str) or not socket:
        raise PlanError(f"{resource}: a ledger shard needs extra['socket'], its control socket")
    return Path(socket)
