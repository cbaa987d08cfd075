"""Protection plugins of the SIMULATED cloud, written as a vendor would (public API only).

Protect follows Karbor's example: a server quiesces in ``on_prepare_begin``;
each volume takes its snapshot (the cut) in ``on_prepare_finish``; the server,
whose ``on_prepare_finish`` runs after its volumes', thaws; ``on_main`` copies
data to the bank in chunks, reporting progress; a volume's ``on_complete``
drops the temporary snapshot. Restore recreates volumes, images and networks
in ``on_main`` and each server in ``on_complete`` from its restored children.
Delete removes what protect saved (bank objects and any snapshot left).

Every hook first asks the cloud's fault injector whether to fail (the cloud's
rules, then the plan's ``sim_faults`` for the type), sleeps ``sim_latency`` if
the plan sets it, and is idempotent per attempt: a volume's snapshot is named
after the checkpoint and the volume (:func:`~karbor_simcloud.snapshot_name`), so
a re-run cut reuses it and a delete finds it without saved info; a copy skips
chunks already in the bank; a restore adopts what it (or a crashed attempt, in
this process or another sharing the cloud's state) already created.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import anyio

from karbor_simcloud._cloud import (
    IMAGE,
    NETWORK,
    PROJECT,
    SERVER,
    VOLUME,
    Origin,
    SimCloud,
    SimCloudError,
    snapshot_name,
)
from karbor_simcloud._compat import (
    BankSection,
    HookContext,
    OperationKind,
    Param,
    ProtectionPlugin,
    ResourceType,
)
from karbor_simcloud._config import current_cloud
from karbor_simcloud._faults import FaultRule
from karbor_simcloud._shared import process_owner

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "ImageProtection",
    "NetworkProtection",
    "ProjectProtection",
    "RestoreError",
    "ServerProtection",
    "VolumeProtection",
    "all_protections",
]

DEFAULT_CHUNK_SIZE = 1024
META_KEY = "meta.json"
DATA_PREFIX = "data/"

_TARGET_PROJECT = Param(
    str, default=None, description="restore: the project to recreate into (default: original's)"
)
_SIM = {
    "sim_faults": Param(
        list,
        default=None,
        description=(
            "SIMULATION: faults for this type's hooks, OPERATION:HOOK[#ID]:raise|hang[:P] each"
        ),
    ),
    "sim_latency": Param(
        float, default=None, description="SIMULATION: seconds each of this type's hooks sleeps"
    ),
}
"""Parameters every simulated type declares (a plan's knobs for the simulation only)."""


def plan_faults(resource_type: str, texts: object) -> tuple[FaultRule, ...]:
    """The rules a plan's ``sim_faults`` for ``resource_type`` says (FaultSyntaxError if not)."""
    if texts is None:
        return ()
    if not isinstance(texts, Sequence) or isinstance(texts, str):
        raise TypeError(f"sim_faults of {resource_type} must be a list of rule strings")
    return _parsed(resource_type, tuple(str(t) for t in texts))


_PARSED: dict[tuple[str, tuple[str, ...]], tuple[FaultRule, ...]] = {}


def _parsed(resource_type: str, texts: tuple[str, ...]) -> tuple[FaultRule, ...]:
    key = (resource_type, texts)
    rules = _PARSED.get(key)
    if rules is None:
        rules = _PARSED[key] = tuple(FaultRule.parse(t, resource_type=resource_type) for t in texts)
    return rules


class RestoreError(RuntimeError):
    """A simulated restore cannot proceed (missing bank data or an unrestored child)."""


def _chunk_key(index: int) -> str:
    return f"{DATA_PREFIX}{index:06d}"


async def _put_json(bank: BankSection, key: str, value: Mapping[str, Any]) -> None:
    await bank.put(key, json.dumps(value, sort_keys=True).encode())


async def _get_json(bank: BankSection, key: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(await bank.get(key))
    return data


class _SimPlugin(ProtectionPlugin):
    """Resolves the cloud lazily (see :mod:`karbor_simcloud._config`) and hands out operations."""

    _protect: ClassVar[type[_SimOperation] | None] = None
    _restore: ClassVar[type[_SimOperation] | None] = None
    _delete: ClassVar[type[_SimOperation] | None] = None

    def __init__(self, cloud: SimCloud | None = None) -> None:
        self._cloud = cloud
        self._ops: dict[OperationKind, _SimOperation | None] = {}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.plugin_name()!r} (simulated cloud)>"

    @property
    def cloud(self) -> SimCloud:
        return self._cloud if self._cloud is not None else current_cloud()

    def _op(self, kind: OperationKind, resource_type: str) -> _SimOperation | None:
        if resource_type not in {t.name for t in self.types}:
            return None
        if kind not in self._ops:
            cls = {
                OperationKind.PROTECT: self._protect,
                OperationKind.RESTORE: self._restore,
                OperationKind.DELETE: self._delete,
            }[kind]
            self._ops[kind] = cls(self) if cls is not None else None
        return self._ops[kind]

    def get_protect_operation(self, resource_type: str) -> object | None:
        return self._op(OperationKind.PROTECT, resource_type)

    def get_restore_operation(self, resource_type: str) -> object | None:
        return self._op(OperationKind.RESTORE, resource_type)

    def get_delete_operation(self, resource_type: str) -> object | None:
        return self._op(OperationKind.DELETE, resource_type)


class _SimOperation:
    """All four hooks, each a fault-injection point; subclasses add the work."""

    def __init__(self, plugin: _SimPlugin) -> None:
        self._plugin = plugin

    @property
    def cloud(self) -> SimCloud:
        return self._plugin.cloud

    async def _enter(self, ctx: HookContext) -> SimCloud:
        cloud = self.cloud
        params = ctx.parameters
        extra = plan_faults(ctx.resource.type, params.get("sim_faults"))
        await cloud.faults.check(ctx.operation, ctx.hook, ctx.resource, extra)
        latency = params.get("sim_latency")
        if latency:
            await anyio.sleep(float(latency))
        if cloud.state is not None and ctx.operation is not OperationKind.PROTECT:
            await cloud.refresh()  # another process may have restored what this one needs
        return cloud

    async def on_prepare_begin(self, ctx: HookContext) -> None:
        await self._enter(ctx)

    async def on_prepare_finish(self, ctx: HookContext) -> None:
        await self._enter(ctx)

    async def on_main(self, ctx: HookContext) -> None:
        await self._enter(ctx)

    async def on_complete(self, ctx: HookContext) -> None:
        await self._enter(ctx)


# -- shared pieces -----------------------------------------------------------------------


async def _copy_chunks(
    ctx: HookContext, cloud: SimCloud, content: str, size: int, chunk_size: int
) -> str:
    """Copy simulated data to the bank in chunks under a copy slot; return its digest.

    A re-run (``attempt > 1``) skips chunks already in the bank.
    """
    existing: set[str] = set()
    if ctx.attempt > 1:
        existing = set(await ctx.bank.list(DATA_PREFIX))
    digest = hashlib.blake2b(digest_size=16)
    total_chunks = max(1, -(-size // chunk_size))
    ctx.report_progress(message="waiting for a copy slot")
    async with cloud.storage.copy_slot():
        done = 0
        for index in range(total_chunks):
            length = min(chunk_size, size - index * chunk_size)
            key = _chunk_key(index)
            if key in existing:
                data = await ctx.bank.get(key)
            else:
                data = await cloud.storage.read_chunk(content, index, length)
                await ctx.bank.put(key, data)
            digest.update(data)
            done += length
            ctx.report_progress(
                done / size if size else 1.0, done=done, total=size, message="copying"
            )
    return digest.hexdigest()


async def _read_chunks(ctx: HookContext, size: int) -> str:
    """Read a resource's data back from the bank with progress; return its digest."""
    keys = await ctx.bank.list(DATA_PREFIX)
    digest = hashlib.blake2b(digest_size=16)
    done = 0
    for key in keys:
        data = await ctx.bank.get(key)
        digest.update(data)
        done += len(data)
        ctx.report_progress(
            done / size if size else 1.0, done=done, total=size, message="reading back"
        )
    if done != size:
        raise RestoreError(f"{ctx.resource}: the bank holds {done} bytes, protect saved {size}")
    return digest.hexdigest()


async def _copied_before(ctx: HookContext, snapshot_id: str) -> bool:
    """Whether an earlier attempt finished the copy of this snapshot (its meta is written
    last, so its presence means every chunk is in the bank)."""
    if META_KEY not in await ctx.bank.list():
        return False
    meta = await _get_json(ctx.bank, META_KEY)
    if meta.get("snapshot_id") != snapshot_id:
        return False
    ctx.save(copied=True, digest=meta["digest"])
    return True


def _origin(ctx: HookContext) -> Origin:
    return Origin(ctx.checkpoint_id, ctx.resource.id)


async def _adopt(ctx: HookContext, cloud: SimCloud) -> bool:
    """Skip a restore already done: reported before, or created by a crashed attempt."""
    if ctx.restored_id(ctx.resource) is not None:
        return True
    existing = await cloud.lookup_restored(ctx.resource.type, _origin(ctx))
    if existing is None:
        return False
    await ctx.report_restored(existing)
    return True


def _target_project(ctx: HookContext, meta: Mapping[str, Any], cloud: SimCloud) -> str:
    target = ctx.parameters.get("target_project") or meta["project_id"]
    return cloud.ensure_project(str(target)).id


class _WipeOperation(_SimOperation):
    """Delete: remove every bank object protect wrote for this resource."""

    async def on_main(self, ctx: HookContext) -> None:
        await self._enter(ctx)
        keys = await ctx.bank.list()
        for i, key in enumerate(keys):
            await ctx.bank.delete(key)
            ctx.report_progress((i + 1) / len(keys), message="deleting saved data")


# -- project -----------------------------------------------------------------------------


class _ProjectProtect(_SimOperation):
    async def on_main(self, ctx: HookContext) -> None:
        cloud = await self._enter(ctx)
        project = cloud.project(ctx.resource.id)
        ctx.report_progress(0.0, message="saving metadata")
        await _put_json(ctx.bank, META_KEY, {"id": project.id, "name": project.name})
        ctx.report_progress(1.0, message="metadata saved")


class _ProjectRestore(_SimOperation):
    async def on_complete(self, ctx: HookContext) -> None:
        cloud = await self._enter(ctx)
        if ctx.restored_id(ctx.resource) is not None:
            return
        target = ctx.parameters.get("target_project") or ctx.resource.id
        ctx.report_progress(0.0, message=f"mapping to project {target}")
        await ctx.report_restored(cloud.ensure_project(str(target)).id)


class ProjectProtection(_SimPlugin):
    """Simulated Keystone projects: records the project; a restore maps it to a target."""

    name = "simcloud-project"
    types = (
        ResourceType(
            PROJECT,
            quiesces=False,
            snapshots=False,
            parameters={"target_project": _TARGET_PROJECT, **_SIM},
        ),
    )
    _protect = _ProjectProtect
    _restore = _ProjectRestore
    _delete = _WipeOperation


# -- server ------------------------------------------------------------------------------


class _ServerProtect(_SimOperation):
    async def on_prepare_begin(self, ctx: HookContext) -> None:
        cloud = await self._enter(ctx)
        if not ctx.parameters.get("quiesce", True):
            return
        ctx.report_progress(0.0, message="freezing file systems")
        server = await cloud.quiesce(ctx.resource.id, by=process_owner(ctx.run_id))
        ctx.mark_quiesced(server.frozen_at)
        ctx.log.debug("guest_frozen")
        ctx.report_progress(1.0, message="frozen")

    async def on_prepare_finish(self, ctx: HookContext) -> None:
        # Called after every child cut, or to thaw when the run aborts (ctx.aborting):
        # either way the work is the same, thaw, and it is safe if never frozen.
        cloud = await self._enter(ctx)
        ctx.report_progress(0.0, message="thawing")
        if await cloud.thaw(ctx.resource.id):
            ctx.mark_thawed(cloud.server(ctx.resource.id).thawed_at)
            ctx.log.debug("guest_thawed", aborting=ctx.aborting.value if ctx.aborting else None)
        ctx.report_progress(1.0, message="thawed")

    async def on_main(self, ctx: HookContext) -> None:
        cloud = await self._enter(ctx)
        server = cloud.server(ctx.resource.id)
        ctx.report_progress(0.0, message="saving metadata")
        await _put_json(
            ctx.bank,
            META_KEY,
            {
                "id": server.id,
                "name": server.name,
                "project_id": server.project_id,
                "flavor": server.flavor,
                "image_id": server.image_id,
                "volume_ids": server.volume_ids,
                "network_ids": server.network_ids,
            },
        )


class _ServerRestore(_SimOperation):
    async def on_complete(self, ctx: HookContext) -> None:
        cloud = await self._enter(ctx)
        if await _adopt(ctx, cloud):
            return
        meta = await _get_json(ctx.bank, META_KEY)
        children = {c.key for c in ctx.children}
        volumes: list[str] = []
        for vid in meta["volume_ids"]:
            new = ctx.restored_id((VOLUME, vid))
            if new is None:
                raise RestoreError(
                    f"{ctx.resource}: its volume {vid} was not restored"
                    + ("" if (VOLUME, vid) in children else " (it is not in the checkpoint)")
                )
            volumes.append(new)
        image = ctx.restored_id((IMAGE, meta["image_id"])) or meta["image_id"]
        if image not in cloud.images:
            raise RestoreError(f"{ctx.resource}: its image {meta['image_id']} was not restored")
        networks = [ctx.restored_id((NETWORK, n)) or n for n in meta["network_ids"]]
        networks = [n for n in networks if n in cloud.networks]
        ctx.report_progress(0.0, message=f"creating server ({len(volumes)} volumes)")
        server = await cloud.create_server(
            _target_project(ctx, meta, cloud),
            f"{meta['name']}-restored",
            str(ctx.parameters.get("flavor") or meta["flavor"]),
            image,
            volumes,
            networks,
            _origin(ctx),
        )
        await ctx.report_restored(server.id)


class ServerProtection(_SimPlugin):
    """Simulated Nova servers: quiesce, thaw after the volumes cut, recreate on restore."""

    name = "simcloud-server"
    types = (
        ResourceType(
            SERVER,
            quiesces=True,
            snapshots=False,
            parameters={
                "quiesce": Param(bool, default=True, description="freeze file systems first"),
                "flavor": Param(str, default=None, description="restore: flavor override"),
                "target_project": _TARGET_PROJECT,
                **_SIM,
            },
        ),
    )
    _protect = _ServerProtect
    _restore = _ServerRestore
    _delete = _WipeOperation


# -- volume ------------------------------------------------------------------------------


class _VolumeProtect(_SimOperation):
    async def on_prepare_finish(self, ctx: HookContext) -> None:
        cloud = await self._enter(ctx)
        if ctx.aborting is not None:
            return  # never cut while the run aborts
        name = snapshot_name(ctx.checkpoint_id, ctx.resource.id)
        previous = str(ctx.saved.get("snapshot_id") or name)
        record = await cloud.storage.find_snapshot(previous)
        if record is None:
            ctx.report_progress(0.0, message="taking snapshot")
            record = await cloud.storage.snapshot(
                ctx.resource.id,
                name=name,
                checkpoint_id=ctx.checkpoint_id,
                owner=process_owner(ctx.run_id),
            )
        ctx.save(snapshot_id=record.id, taken_at=record.taken_at)
        ctx.mark_cut(record.taken_at)
        ctx.report_progress(1.0, message="snapshot taken")

    async def on_main(self, ctx: HookContext) -> None:
        cloud = await self._enter(ctx)
        if ctx.saved.get("copied"):
            return
        snapshot_id = ctx.saved.get("snapshot_id") or snapshot_name(
            ctx.checkpoint_id, ctx.resource.id
        )
        record = await cloud.storage.find_snapshot(str(snapshot_id))
        if record is None:
            if ctx.attempt > 1 and await _copied_before(ctx, str(snapshot_id)):
                return  # an earlier attempt copied it all (and its on_complete dropped it)
            raise SimCloudError(f"{ctx.resource}: no snapshot to copy (saved {snapshot_id!r})")
        volume = cloud.volume(ctx.resource.id)
        chunk_size = int(ctx.parameters.get("chunk_size") or DEFAULT_CHUNK_SIZE)
        digest = await _copy_chunks(ctx, cloud, record.content, volume.size, chunk_size)
        meta = {
            "id": volume.id,
            "name": volume.name,
            "project_id": volume.project_id,
            "size": volume.size,
            "content": record.content,
            "digest": digest,
            "snapshot_id": record.id,
        }
        await _put_json(ctx.bank, META_KEY, meta)
        ctx.save(copied=True, digest=digest)

    async def on_complete(self, ctx: HookContext) -> None:
        cloud = await self._enter(ctx)
        snapshot_id = ctx.saved.get("snapshot_id")
        if snapshot_id and not ctx.parameters.get("keep_snapshot", False):
            ctx.report_progress(0.0, message="dropping the temporary snapshot")
            await cloud.storage.remove_snapshot(str(snapshot_id))


class _DataRestore(_SimOperation):
    """Restore of a volume or an image: read the bank back, verify, recreate (on_main)."""

    async def on_main(self, ctx: HookContext) -> None:
        cloud = await self._enter(ctx)
        if await _adopt(ctx, cloud):
            return
        meta = await _get_json(ctx.bank, META_KEY)
        digest = await _read_chunks(ctx, int(meta["size"]))
        if digest != meta["digest"]:
            raise RestoreError(f"{ctx.resource}: bank data does not match the saved digest")
        project = _target_project(ctx, meta, cloud)
        name = f"{meta['name']}-restored"
        size = int(meta["size"])
        kind = "volume" if ctx.resource.type == VOLUME else "image"
        ctx.report_progress(1.0, done=size, total=size, message=f"creating the {kind}")
        if ctx.resource.type == VOLUME:
            new_id = (
                await cloud.create_volume(
                    project, name, int(meta["size"]), str(meta["content"]), _origin(ctx)
                )
            ).id
        else:
            new_id = (
                await cloud.create_image(
                    project, name, int(meta["size"]), str(meta["content"]), _origin(ctx)
                )
            ).id
        await ctx.report_restored(new_id)


class _VolumeDelete(_WipeOperation):
    async def on_main(self, ctx: HookContext) -> None:
        """Remove the bank data and the cut's snapshot: found by its name without saved
        info; a cut never taken (or already dropped) is a no-op."""
        await super().on_main(ctx)
        storage = self.cloud.storage
        names = {snapshot_name(ctx.checkpoint_id, ctx.resource.id)}
        if ctx.saved.get("snapshot_id"):
            names.add(str(ctx.saved["snapshot_id"]))
        for name in sorted(names):
            await storage.remove_snapshot(name)


class VolumeProtection(_SimPlugin):
    """Simulated Cinder volumes: snapshot at the cut, copy to the bank, recreate on restore."""

    name = "simcloud-volume"
    types = (
        ResourceType(
            VOLUME,
            quiesces=False,
            snapshots=True,
            parameters={
                "chunk_size": Param(int, default=DEFAULT_CHUNK_SIZE, description="copy chunk"),
                "keep_snapshot": Param(bool, default=False, description="keep after the copy"),
                "target_project": _TARGET_PROJECT,
                **_SIM,
            },
        ),
    )
    _protect = _VolumeProtect
    _restore = _DataRestore
    _delete = _VolumeDelete


# -- image -------------------------------------------------------------------------------


class _ImageProtect(_SimOperation):
    async def on_main(self, ctx: HookContext) -> None:
        cloud = await self._enter(ctx)
        if ctx.saved.get("copied"):
            return
        image = cloud.image(ctx.resource.id)
        chunk_size = int(ctx.parameters.get("chunk_size") or DEFAULT_CHUNK_SIZE)
        digest = await _copy_chunks(ctx, cloud, image.content, image.size, chunk_size)
        meta = {
            "id": image.id,
            "name": image.name,
            "project_id": image.project_id,
            "size": image.size,
            "content": image.content,
            "digest": digest,
        }
        await _put_json(ctx.bank, META_KEY, meta)
        ctx.save(copied=True, digest=digest)


class ImageProtection(_SimPlugin):
    """Simulated Glance images: immutable, so no cut; copied to the bank in ``on_main``."""

    name = "simcloud-image"
    types = (
        ResourceType(
            IMAGE,
            quiesces=False,
            snapshots=False,
            parameters={
                "chunk_size": Param(int, default=DEFAULT_CHUNK_SIZE, description="copy chunk"),
                "target_project": _TARGET_PROJECT,
                **_SIM,
            },
        ),
    )
    _protect = _ImageProtect
    _restore = _DataRestore
    _delete = _WipeOperation


# -- network -----------------------------------------------------------------------------


class _NetworkProtect(_SimOperation):
    async def on_main(self, ctx: HookContext) -> None:
        cloud = await self._enter(ctx)
        network = cloud.network(ctx.resource.id)
        ctx.report_progress(0.0, message="saving metadata")
        await _put_json(
            ctx.bank,
            META_KEY,
            {
                "id": network.id,
                "name": network.name,
                "project_id": network.project_id,
                "cidr": network.cidr,
            },
        )


class _NetworkRestore(_SimOperation):
    async def on_main(self, ctx: HookContext) -> None:
        cloud = await self._enter(ctx)
        if await _adopt(ctx, cloud):
            return
        meta = await _get_json(ctx.bank, META_KEY)
        ctx.report_progress(0.0, message="creating the network")
        network = await cloud.create_network(
            _target_project(ctx, meta, cloud),
            f"{meta['name']}-restored",
            str(meta["cidr"]),
            _origin(ctx),
        )
        await ctx.report_restored(network.id)


class NetworkProtection(_SimPlugin):
    """Simulated Neutron networks: definition saved in ``on_main``, recreated on restore."""

    name = "simcloud-network"
    types = (
        ResourceType(
            NETWORK,
            quiesces=False,
            snapshots=False,
            parameters={"target_project": _TARGET_PROJECT, **_SIM},
        ),
    )
    _protect = _NetworkProtect
    _restore = _NetworkRestore
    _delete = _WipeOperation


def all_protections(cloud: SimCloud | None = None) -> list[ProtectionPlugin]:
    """One plugin per simulated type, bound to ``cloud`` (or resolved at call time)."""
    return [
        ProjectProtection(cloud),
        ServerProtection(cloud),
        VolumeProtection(cloud),
        ImageProtection(cloud),
        NetworkProtection(cloud),
    ]
