"""A subscriber in another process: ``python pgsubscriber.py DSN RUN_ID [SINCE]``.

Opens the PostgreSQL store (password from ``PGPASSWORD``), subscribes to the run,
prints ``ready`` once listening, then one line ``SEQ KIND`` per event until the
run's ``RUN_FINISHED``.
"""

from __future__ import annotations

import sys

import anyio

from karbor_async._pg_store import PostgresStore


async def main(dsn: str, run_id: str, since: int) -> None:
    async with PostgresStore.open(dsn) as store, store.subscribe(run_id, since) as events:
        print("ready", flush=True)
        async for event in events:
            print(event.seq, event.kind.value, flush=True)
        print("listener", store.listener.connections, flush=True)


if __name__ == "__main__":
    anyio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)
