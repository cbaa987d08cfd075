"""The protectable: the SQLite databases directly in a ``SQLite::Directory``."""

from __future__ import annotations

from pathlib import Path

import anyio.to_thread

from karbor_async import Resource
from karbor_sqlite import _sync
from karbor_sqlite.protection import DATABASE, DIRECTORY

__all__ = ["DirectoryProtectable"]


class DirectoryProtectable:
    """A plan that names a directory (``SQLite::Directory#/srv/app/data``) protects every
    SQLite database file directly in it (found by their header; not recursive; side
    files ``-wal``, ``-shm``, ``-journal`` skipped), each as a ``SQLite::Database``
    whose id is its absolute path."""

    resource_type: str = DATABASE
    parent_types: tuple[str, ...] = (DIRECTORY,)

    async def dependents(self, parent: Resource) -> list[Resource]:
        found = await anyio.to_thread.run_sync(_sync.find_databases, Path(parent.id))
        return [Resource(DATABASE, str(p), name=p.name) for p in found]
