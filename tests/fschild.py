"""The engine process the fs crash tests kill: ``python fschild.py MODE ROOT [ARG]``.

``protect MOUNT`` protects the file system mounted at MOUNT (barrier ``cut``);
``restore CHECKPOINT`` restores it. Store ``ROOT/k.db``, bank ``ROOT/bank``;
plugins: the fs plugin and the hold plugin (``holdplugin``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio

from holdplugin import HoldPlugin, HoldProtectable
from karbor_async import (
    BarrierPolicy,
    Engine,
    FsBank,
    Plan,
    Resource,
    SqliteStore,
    Timeouts,
)
from karbor_fs import FILESYSTEM, FsProtection, ImageProtectable


def engine(store: SqliteStore, root: Path) -> Engine:
    return Engine(
        [FsProtection(), HoldPlugin()],
        [ImageProtectable(), HoldProtectable()],
        store=store,
        bank=FsBank(root / "bank"),
        discover=False,
    )


def plan(mount: str, chunk: int | None = None) -> Plan:
    params = {"Linux::DiskImage": {"chunk_bytes": chunk}} if chunk else {}
    return Plan(
        name="fs",
        resources=[Resource(FILESYSTEM, mount)],
        barrier=BarrierPolicy.CUT,
        parameters=params,
        timeouts=Timeouts(hook=120),
    )


async def main(mode: str, root: str, arg: str) -> None:
    where = Path(root)
    async with (
        SqliteStore.open(where / "k.db", lease_seconds=2.0) as store,
        engine(store, where) as e,
    ):
        if mode == "protect":
            chunk = int(os.environ.get("FS_CHUNK", "0")) or None
            await e.protect(plan(arg, chunk))
        else:
            await e.restore(arg)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], sys.argv[3])
