"""The protection plugin: a mounted file system (quiesced) and its image file (cut, copied).

Protect: the file system's ``on_prepare_begin`` arms the dead-man thaw and
freezes it (``FIFREEZE``); its image's ``on_prepare_finish`` is the cut
(``FICLONE`` of the image to a name derived from the checkpoint and the
resource); the file system's ``on_prepare_finish`` thaws it (``FITHAW``;
idempotent, so the aborting call and the sentinel may both run it). The
image's ``on_main`` streams the clone's data extents into the bank (holes
skipped) with progress in bytes, writes a manifest (size, extents, sha256)
and deletes the clone once both are durable.

Restore writes a new image beside the original (or in ``restore_dir``),
verifies the checksum by reading it back, attaches it to a loop device
(read-only), checks the file system (``e2fsck -fn`` or ``xfs_repair -n``) and
reports the new image's path as the new id. Delete removes the clone and the
bank data; it is a no-op for a cut never taken.

Every blocking call runs in a worker thread or a subprocess: the hooks never
block the engine's event loop.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
from typing import Any, ClassVar

import anyio
import anyio.to_thread
from anyio.streams.memory import MemoryObjectSendStream

from karbor_async import HookContext, Param, ProtectionPlugin, ResourceType
from karbor_async.plugin import CheckContext
from karbor_fs import _sys

__all__ = [
    "FILESYSTEM",
    "IMAGE",
    "FsProtection",
    "clone_path",
    "thaw_mount",
]

FILESYSTEM = "Linux::FileSystem"
"""A mounted file system; its id is the mount point."""
IMAGE = "Linux::DiskImage"
"""The image file a file system lives in (a loop device's backing file); its id is the path."""

_CHUNK = 4 << 20
_READ_AHEAD = 2
"""Chunks read ahead of the bank's writes."""
_MANIFEST = "manifest.json"
_DATA = "data"


def thaw_mount(path: str) -> str:
    """The safety thaw the sentinel runs: ``FITHAW`` the file system at ``path``.

    Idempotent: a file system that is not frozen is left as it is.
    """
    return "thawed" if _sys.thaw(path) else "was not frozen"


def clone_path(checkpoint_id: str, image: str) -> str:
    """Where the cut of ``image`` for ``checkpoint_id`` lives: beside the image (a
    reflink needs the same file system), named after both, so delete finds it."""
    directory, name = os.path.split(image)
    return os.path.join(directory, f".{name}.karbor-{checkpoint_id}.clone")


async def _thread(fn: Any, *args: Any) -> Any:
    return await anyio.to_thread.run_sync(functools.partial(fn, *args))


def _device_of(path: str) -> int:
    return os.stat(path).st_dev


# -- the file system -------------------------------------------------------------------
class _FileSystemProtect:
    async def check(self, ctx: CheckContext) -> None:
        path = ctx.resource.id
        mount = await _thread(_sys.mount_at, path)
        if mount is None:
            raise ValueError(f"{path} is not a mount point")
        if mount.path == "/":
            raise ValueError("/ cannot be frozen: the engine itself writes there")
        if mount.fstype not in _sys.FREEZABLE:
            raise ValueError(
                f"{path} is {mount.fstype}, which cannot be frozen "
                f"(freezable: {', '.join(sorted(_sys.FREEZABLE))})"
            )
        root = getattr(ctx.bank, "root", None)
        if root is not None:
            where = await _thread(_sys.mount_of, str(root))
            if where is not None and where.device == mount.device:
                raise ValueError(f"the bank ({root}) is on {path}: a freeze would block the copy")

    async def on_prepare_begin(self, ctx: HookContext) -> None:
        path = ctx.resource.id
        # Armed before the freeze: if this process dies from here on, the sentinel thaws.
        await ctx.arm_safety_thaw(function="karbor_fs.protections:thaw_mount", args={"path": path})
        try:
            await _thread(_sys.freeze, path)
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                raise
            # Someone else froze it: not ours to thaw (the aborting call leaves it).
            ctx.save(frozen_elsewhere=True)
            raise RuntimeError(
                f"{path} is frozen already, by someone else; this run neither froze it nor "
                "will thaw it"
            ) from exc
        ctx.log.info("fs_frozen", path=path)

    async def on_prepare_finish(self, ctx: HookContext) -> None:
        path = ctx.resource.id
        if ctx.aborting is not None and ctx.saved.get("frozen_elsewhere"):
            ctx.log.warning("fs_left_frozen_by_its_owner", path=path)
            return
        was = await _thread(_sys.thaw, path)
        ctx.log.info("fs_thawed", path=path, was_frozen=was, aborting=bool(ctx.aborting))


# -- the image -------------------------------------------------------------------------
class _ImageProtect:
    async def check(self, ctx: CheckContext) -> None:
        image = ctx.resource.id
        try:
            st = await _thread(os.stat, image)
        except OSError as exc:
            raise ValueError(f"image {image}: {exc.strerror or exc}") from exc
        refusal = await _thread(_sys.reflink_refusal, os.path.dirname(image))
        if refusal is not None:
            raise ValueError(f"image {image} cannot be cut: {refusal}")
        free_bytes = getattr(ctx.bank, "free_bytes", None)
        if free_bytes is not None:
            need = st.st_blocks * 512
            free = await free_bytes()
            if need > free:
                raise ValueError(
                    f"the bank has {free} bytes free; image {image} holds {need} bytes of data"
                )

    async def on_prepare_finish(self, ctx: HookContext) -> None:
        if ctx.aborting is not None:
            return  # never cut while aborting; a clone already taken goes with delete
        image = ctx.resource.id
        target = clone_path(ctx.checkpoint_id, image)
        start = anyio.current_time()
        await _thread(_sys.clone, image, target)
        ctx.save(clone=target, cut_seconds=anyio.current_time() - start)

    async def on_main(self, ctx: HookContext) -> None:
        saved = ctx.saved
        if saved.get("copied"):
            await _remove(saved.get("clone"))  # (a kill between the manifest and the unlink)
            return
        clone = str(saved["clone"])
        chunk = int(ctx.parameters.get("chunk_bytes") or _CHUNK)
        fd = await _thread(os.open, clone, os.O_RDONLY)
        try:
            size, extents = await _thread(_sys.data_extents, fd)
            total = sum(length for _, length in extents)
            digest = hashlib.sha256()
            ctx.report_progress(0.0, done=0, total=total)
            start = anyio.current_time()
            # Reading (and hashing) the next chunks overlaps the bank's writes: both run
            # in worker threads, so the copy goes at the slower of the two, not their sum.
            send, receive = anyio.create_memory_object_stream[bytes](_READ_AHEAD)
            async with anyio.create_task_group() as tg:
                tg.start_soon(_read_extents, ctx, send, fd, extents, chunk, digest, total)
                with receive:
                    written = await ctx.bank.put_stream(_DATA, receive)
            seconds = anyio.current_time() - start
        finally:
            await _thread(os.close, fd)
        manifest = {
            "format": 1,
            "size": size,
            "extents": extents,
            "bytes": written,
            "sha256": digest.hexdigest(),
            "fstype": ctx.resource.extra.get("fstype"),
        }
        await ctx.bank.put(_MANIFEST, json.dumps(manifest).encode())
        # Both objects are durable (written, fsynced, renamed): the clone can go.
        ctx.save(copied=True, bytes=written, size=size, sha256=manifest["sha256"])
        ctx.save(copy_seconds=seconds)
        await _remove(clone)


async def _read_extents(
    ctx: HookContext,
    send: MemoryObjectSendStream[bytes],
    fd: int,
    extents: list[tuple[int, int]],
    chunk: int,
    digest: Any,
    total: int,
) -> None:
    """Read the clone's data extents in chunks (holes skipped), hash them, send them on."""

    def read(n: int, pos: int) -> bytes:
        data = os.pread(fd, n, pos)
        digest.update(data)  # (in the worker thread too: hashing a chunk takes ms)
        return data

    done = 0
    with send:
        for offset, length in extents:
            pos, end = offset, offset + length
            while pos < end:
                data = await anyio.to_thread.run_sync(read, min(chunk, end - pos), pos)
                if not data:
                    raise OSError(f"the clone ends at {pos}, inside an extent that ends at {end}")
                pos += len(data)
                done += len(data)
                await send.send(data)
                ctx.report_progress(done / total if total else 1.0, done=done, total=total)


async def _remove(path: object) -> None:
    if not path:
        return
    with contextlib.suppress(FileNotFoundError):
        await anyio.Path(str(path)).unlink()


class _ImageRestore:
    async def on_main(self, ctx: HookContext) -> None:
        original = ctx.resource.id
        target = ctx.restored_id(ctx.resource) or _restore_path(ctx, original)
        await _detach_loops(target)  # what a killed attempt left attached
        manifest = json.loads(await ctx.bank.get(_MANIFEST))
        extents = [(int(o), int(n)) for o, n in manifest["extents"]]
        await _write_image(ctx, target, int(manifest["size"]), extents)
        digest = await _thread(_sys.hash_extents, target, extents)
        if digest != manifest["sha256"]:
            await _remove(target)
            raise ValueError(
                f"restored image {target}: sha256 {digest} does not match the checkpoint's "
                f"{manifest['sha256']}"
            )
        if ctx.parameters.get("fsck", True):
            await _check_fs(target, manifest.get("fstype") or ctx.resource.extra.get("fstype"))
        await ctx.report_restored(target)


def _restore_path(ctx: HookContext, original: str) -> str:
    directory = str(ctx.parameters.get("restore_dir") or os.path.dirname(original))
    stem, ext = os.path.splitext(os.path.basename(original))
    return os.path.join(directory, f"{stem}.restored-{ctx.run_id}{ext or '.img'}")


async def _write_image(
    ctx: HookContext, target: str, size: int, extents: list[tuple[int, int]]
) -> None:
    fd = await _thread(os.open, target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        await _thread(os.ftruncate, fd, size)
        total = sum(n for _, n in extents)
        done = 0
        index, pos = 0, extents[0][0] if extents else 0
        async for data in ctx.bank.get_stream(_DATA, _CHUNK):
            view = memoryview(data)
            while view:
                offset, length = extents[index]
                take = min(len(view), offset + length - pos)
                await _thread(os.pwrite, fd, bytes(view[:take]), pos)
                view = view[take:]
                pos += take
                done += take
                if pos == offset + length and index + 1 < len(extents):
                    index += 1
                    pos = extents[index][0]
            ctx.report_progress(done / total if total else 1.0, done=done, total=total)
        if done != total:
            raise ValueError(f"the checkpoint holds {done} bytes of data, its manifest {total}")
        await _thread(os.fsync, fd)
    finally:
        await _thread(os.close, fd)


async def _losetup(*args: str) -> str:
    done = await anyio.run_process(["losetup", *args], check=False)
    if done.returncode != 0:
        raise OSError(errno.EIO, f"losetup {' '.join(args)}: {done.stderr.decode().strip()}")
    return done.stdout.decode().strip()


async def _detach_loops(path: str) -> None:
    """Detach every loop device backed by ``path`` (left by a killed restore)."""
    if not await anyio.Path(path).exists():
        return
    for line in (await _losetup("-j", path)).splitlines():
        device = line.split(":", 1)[0]
        if device:
            await _losetup("-d", device)


async def _check_fs(image: str, fstype: object) -> None:
    device = await _losetup("--find", "--show", "--read-only", image)
    try:
        command = ["xfs_repair", "-n", device] if fstype == "xfs" else ["e2fsck", "-fn", device]
        if shutil.which(command[0]) is None:
            raise OSError(errno.ENOENT, f"{command[0]} is needed to check the restored image")
        done = await anyio.run_process(command, check=False)
        if done.returncode != 0:
            out = (done.stdout + done.stderr).decode(errors="replace").strip()[-1000:]
            raise ValueError(f"restored image {image}: {' '.join(command)} failed: {out}")
    finally:
        with anyio.CancelScope(shield=True):
            await _losetup("-d", device)


class _ImageDelete:
    async def on_main(self, ctx: HookContext) -> None:
        await _remove(ctx.saved.get("clone"))
        await _remove(clone_path(ctx.checkpoint_id, ctx.resource.id))
        for key in await ctx.bank.list():
            await ctx.bank.delete(key)


class FsProtection(ProtectionPlugin):
    """Mounted file systems on loop-attached images on a reflink-capable file system."""

    name = "fs"
    types: ClassVar[tuple[ResourceType, ...]] = (
        ResourceType(FILESYSTEM, quiesces=True, snapshots=False, parameters={}, host_bound=True),
        ResourceType(
            IMAGE,
            host_bound=True,  # (its cut is a reflink clone on this host's file system)
            parameters={
                "chunk_bytes": Param(int, default=_CHUNK, description="bytes per read"),
                "restore_dir": Param(str, description="where restore writes the new image"),
                "fsck": Param(bool, default=True, description="check the restored file system"),
            },
        ),
    )

    def get_protect_operation(self, resource_type: str) -> object | None:
        return _FileSystemProtect() if resource_type == FILESYSTEM else _ImageProtect()

    def get_restore_operation(self, resource_type: str) -> object | None:
        return _ImageRestore() if resource_type == IMAGE else None

    def get_delete_operation(self, resource_type: str) -> object | None:
        return _ImageDelete() if resource_type == IMAGE else None
