"""The shard's protection plugin (it quiesces) and the protectables that find its store.

A shard is a root resource that quiesces and takes no cut of its own: its store
is its dependent, cut by the store's plugin while the shard is paused. One
protectable per kind of store finds it (the shard's ``extra['store']`` says which):
an ``SQLite::Database`` (the SQLite plugin), a ``PostgreSQL::Database`` (the
PostgreSQL plugin), or the ``Linux::FileSystem`` an SQLite file lives on (the fs
plugin: frozen, and its image cut by reflink).

``on_prepare_begin`` opens a control connection to the shard, asks it to
``PAUSE`` and waits for ``PAUSED``; the pause lasts while that connection is
open, so ``on_prepare_finish`` (the thaw) says ``RESUME`` and closes it, and an
engine killed in between leaves nothing paused: its connection ends with its
process and the shard resumes by itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

import anyio
import anyio.abc

from karbor_async import HookContext, Param, ProtectionPlugin, Resource, ResourceKey, ResourceType
from karbor_async.exceptions import PlanError
from karbor_ledger._app import SHARD
from karbor_ledger._shard import _Lines
from karbor_ledger._stores import DATABASE, FILESYSTEM, SQLITE

__all__ = [
    "ShardDatabaseProtectable",
    "ShardFileSystemProtectable",
    "ShardProtection",
    "ShardStoreProtectable",
]


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
    """Quiesces a ledger shard; its store is protected by the store's own plugin."""

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


def _store_kind(parent: Resource) -> str:
    kind = parent.extra.get("store", "sqlite")  # (no kind: the SQLite file of old)
    if kind not in ("sqlite", "postgres", "fs"):
        raise PlanError(f"{parent}: unknown store kind {kind!r} (sqlite, postgres or fs)")
    return str(kind)


def _extra(parent: Resource, key: str) -> str:
    value = parent.extra.get(key)
    if not isinstance(value, str) or not value:
        kind = _store_kind(parent)
        raise PlanError(f"{parent}: a ledger shard whose store is {kind} needs extra[{key!r}]")
    return value


class ShardStoreProtectable:
    """A shard's SQLite store: one ``SQLite::Database`` resource, its file's path
    (``extra['db']``; the shard's ``extra['store']`` is ``sqlite`` or absent)."""

    resource_type: str = SQLITE
    parent_types: tuple[str, ...] = (SHARD,)

    async def dependents(self, parent: Resource) -> Iterable[Resource]:
        if _store_kind(parent) != "sqlite":
            return []
        return [Resource(SQLITE, _extra(parent, "db"), name=f"store of shard {parent.id}")]


class ShardDatabaseProtectable:
    """A shard's PostgreSQL store: one ``PostgreSQL::Database`` resource, the database's
    name (``extra['dbname']``; ``extra['store']`` is ``postgres``). Where the server is
    and how to log in are the plan's parameters (``PostgreSQL::Database#NAME``)."""

    resource_type: str = DATABASE
    parent_types: tuple[str, ...] = (SHARD,)

    async def dependents(self, parent: Resource) -> Iterable[Resource]:
        if _store_kind(parent) != "postgres":
            return []
        return [Resource(DATABASE, _extra(parent, "dbname"), name=f"store of shard {parent.id}")]


class ShardFileSystemProtectable:
    """A shard whose SQLite store is a file on a freezable file system depends on that
    file system: one ``Linux::FileSystem`` resource, its mount point (``extra['mount']``;
    ``extra['store']`` is ``fs``). The fs plugin's own protectable then finds the image
    the file system lives in, which is what is cut (by reflink) and copied; the file
    system is frozen around that cut, inside the shard's pause."""

    resource_type: str = FILESYSTEM
    parent_types: tuple[str, ...] = (SHARD,)

    async def dependents(self, parent: Resource) -> Iterable[Resource]:
        if _store_kind(parent) != "fs":
            return []
        mount = _extra(parent, "mount")
        # named by its mount point: two shards on one file system report one resource
        return [Resource(FILESYSTEM, mount, name=mount)]


def _socket(resource: Resource) -> Path:
    socket = resource.extra.get("socket")
    if not isinstance(socket, str) or not socket:
        raise PlanError(f"{resource}: a ledger shard needs extra['socket'], its control socket")
    return Path(socket)
