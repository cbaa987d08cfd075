"""The run lease a Temporal workflow owns, in the PostgreSQL store's tables.

The workflow cannot do I/O, so its activities hold the lease for it: the start
records the run with owner ``temporal:<workflow id>`` and fencing token 1, a
long-lived activity renews it, every part writes under its token
(``PostgresStore.fence``) and the finish ends it. The store's own transactions
(``_pg_ops``) do the work, on the store's writer connection, after its pending
batch, like every other write of the store. Each is shielded: an activity is
cancelled at any await (the lease's, when its workflow ends), and a transaction
cut off halfway would leave the shared writer connection inside it.
"""

from __future__ import annotations

import anyio

from karbor_async import _pg_ops as ops
from karbor_async._pg_store import PostgresStore
from karbor_async.exceptions import LeaseLostError
from karbor_async.store import RunRecord

__all__ = ["create", "driven", "renew"]


async def create(store: PostgresStore, record: RunRecord, owner: str, seconds: float) -> int:
    """Record ``record`` (and its checkpoint, its resource leases, all or none) with the run
    lease held by ``owner``; returns the fencing token."""
    with anyio.CancelScope(shield=True):
        await store._w.submit(lambda c: ops.create_run(c, record, owner, seconds))
    return 1


async def driven(store: PostgresStore, run_id: str) -> tuple[str, int] | None:
    """(owner, token) of a stored run that is still running, or None (a committed read on
    the store's reader pool: it waits neither for the writer nor for its batch)."""
    with anyio.CancelScope(shield=True):
        row = await store._queries.pool.fetchrow(
            "SELECT lease_owner, lease_token FROM runs WHERE run_id = $1 AND status = 'running'",
            run_id,
        )
    if row is None or row["lease_owner"] is None:
        return None
    return str(row["lease_owner"]), int(row["lease_token"])


async def renew(store: PostgresStore, run_id: str, token: int, seconds: float) -> None:
    """Extend the lease while ``token`` still stands; LeaseLostError once it moved on."""
    with anyio.CancelScope(shield=True):
        lost = await store._w.submit(lambda c: ops.renew(c, {run_id: token}, seconds))
    if lost:
        raise LeaseLostError(f"run {run_id!r} is owned by another engine now")
