"""The realistic floor: the simulated cloud's own calls in Karbor's order, no engine.

Raw asyncio, one task per server and per volume, one event as the cut
barrier: every server quiesces; once all are frozen, every volume cuts its
snapshot; a server thaws as soon as the snapshots of its volumes returned.
No events, no checks, no copies. Whatever skew and quiesce-window share this
program shows is the cost of the plugins' own calls on one event loop, which
no engine can go below.
"""

from __future__ import annotations

import asyncio

from karbor_simcloud import SimCloud


async def run(cloud: SimCloud) -> float:
    """Quiesce, cut and thaw every server and volume of ``cloud``; return the seconds."""
    loop = asyncio.get_running_loop()
    servers = list(cloud.servers.values())
    released = asyncio.Event()
    left_frozen = [len(servers)]
    volumes_left = {s.id: len(s.volume_ids) for s in servers}
    done: dict[str, asyncio.Event] = {s.id: asyncio.Event() for s in servers}

    async def server(server_id: str) -> None:
        await cloud.quiesce(server_id)
        left_frozen[0] -= 1
        if left_frozen[0] == 0:
            released.set()
        if volumes_left[server_id]:
            await done[server_id].wait()
        await cloud.thaw(server_id)

    async def volume(volume_id: str) -> None:
        await released.wait()
        await cloud.storage.snapshot(volume_id)
        for server_id in cloud.volume(volume_id).attached_to:
            volumes_left[server_id] -= 1
            if volumes_left[server_id] == 0:
                done[server_id].set()

    start = loop.time()
    async with asyncio.TaskGroup() as tg:
        for s in servers:
            tg.create_task(server(s.id))
        for volume_id in cloud.volumes:
            tg.create_task(volume(volume_id))
    return loop.time() - start
