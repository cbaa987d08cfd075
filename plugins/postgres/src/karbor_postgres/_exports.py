"""The exported snapshots this process holds open: the cuts waiting for their copy.

A cut is a ``REPEATABLE READ`` transaction that ran ``pg_export_snapshot()``; the
snapshot stays importable only while that transaction is open, on a connection of
this process. They are kept here, per checkpoint and resource, from the cut until
``pg_dump`` holds the snapshot itself (or the copy fails, or a delete or an
aborting cut closes them). While one is open, vacuum cannot remove row versions
the snapshot may still see, so none is kept longer than that: the exporting
session also has ``idle_in_transaction_session_timeout`` set, so the server ends
it on its own if nothing takes it (a run that failed after its cut and was not
deleted), and it ends with this process.
"""

from __future__ import annotations

import anyio
import asyncpg
import attrs

from karbor_async import ResourceKey

__all__ = ["Export", "ExportKey", "close", "get", "held", "hold", "park", "unpark"]

ExportKey = tuple[str, ResourceKey]
"""(checkpoint id, resource key)"""

_CLOSE_LIMIT = 5.0


@attrs.define(eq=False)
class Export:
    connection: asyncpg.Connection
    snapshot_id: str
    cut_at: float
    """engine clock (``anyio.current_time()``) when the snapshot was exported"""


_held: dict[ExportKey, Export] = {}
_parked: dict[ExportKey, asyncpg.Connection] = {}
"""connections opened by ``on_prepare_begin`` for the cut to come"""


def park(key: ExportKey, connection: asyncpg.Connection) -> None:
    _parked[key] = connection


def unpark(key: ExportKey) -> asyncpg.Connection | None:
    return _parked.pop(key, None)


def _prune() -> None:
    """Forget exports whose connection is gone (the server ended it: its idle limit)."""
    for key in [k for k, e in _held.items() if e.connection.is_closed()]:
        del _held[key]


def hold(key: ExportKey, export: Export) -> None:
    _prune()
    _held[key] = export


def get(key: ExportKey) -> Export | None:
    return _held.get(key)


def held() -> dict[ExportKey, Export]:
    """The exports this process holds open now (a copy; for tests and diagnostics)."""
    _prune()
    return dict(_held)


async def close(key: ExportKey) -> bool:
    """Close the exporting transaction of ``key`` (and a connection parked for its cut)
    if this process holds one (shielded, bounded; a connection that does not close in
    time is terminated). True if there was one."""
    parked = _parked.pop(key, None)
    if parked is not None:
        await close_connection(parked)
    export = _held.pop(key, None)
    if export is None:
        return parked is not None
    await close_connection(export.connection)
    return True


async def close_connection(connection: asyncpg.Connection) -> None:
    """Close ``connection`` (rolling back its transaction), shielded and bounded."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(_CLOSE_LIMIT) as scope:
        try:
            await connection.close(timeout=_CLOSE_LIMIT)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            connection.terminate()
    if scope.cancelled_caught:
        connection.terminate()
