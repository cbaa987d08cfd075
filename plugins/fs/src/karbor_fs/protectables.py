"""A file system's dependent: the image file behind its loop device."""

from __future__ import annotations

from collections.abc import Iterable

import anyio.to_thread

from karbor_async import Resource
from karbor_fs import _sys
from karbor_fs.protections import FILESYSTEM, IMAGE

__all__ = ["ImageProtectable"]


class ImageProtectable:
    """``Linux::FileSystem`` (a mount point) -> its ``Linux::DiskImage`` (the backing file
    of the loop device it is mounted from); none for a file system not on a loop device."""

    resource_type = IMAGE
    parent_types: tuple[str, ...] = (FILESYSTEM,)

    async def dependents(self, parent: Resource) -> Iterable[Resource]:
        mount = await anyio.to_thread.run_sync(_sys.mount_at, parent.id)
        if mount is None:
            return []
        backing = await anyio.to_thread.run_sync(_sys.backing_file, mount.source)
        if backing is None:
            return []
        extra = {"fstype": mount.fstype, "mount": mount.path}
        return [Resource(IMAGE, backing, name=backing.rsplit("/", 1)[-1], extra=extra)]
