"""PostgreSQL for karbor-async: ``PostgreSQL::Database``, protected from an exported snapshot.

- **The cut** (``on_prepare_finish``): a ``REPEATABLE READ READ ONLY`` transaction
  on the plugin's own asyncpg connection (opened by ``on_prepare_begin``, so the
  cut does not include logging in) runs ``pg_export_snapshot()``. No lock,
  no writer waits. Saved: the snapshot id and ``pg_current_snapshot()`` (which
  transactions the cut sees).
- **The copy** (``on_main``): ``pg_dump --snapshot=ID -Fc``, named by
  ``PGAPPNAME`` after the run and the resource, streamed into the bank with
  progress. The exporting transaction is closed as soon as ``pg_stat_activity``
  shows pg_dump's session holding the snapshot (its ``backend_xmin``); vacuum
  waits while it is open.
- **Restore**: a new database (``restore_dbname``, else ``<dbname>_<checkpoint>``)
  loaded by ``pg_restore --single-transaction``; its name is reported.
- **Delete**: closes a cut still held, removes the dump.

The password is a secret parameter; it reaches ``pg_dump``/``pg_restore`` only
through a 0600 ``PGPASSFILE`` (see ``_settings``). asyncpg runs on asyncio only,
so this plugin does too. See ``README.md``.
"""

from __future__ import annotations

from typing import ClassVar

from karbor_async import Param, ProtectionPlugin, ResourceType
from karbor_postgres._exports import held as held_exports
from karbor_postgres._protect import DumpFailedError, ProtectDatabase, SnapshotLostError, dump_key
from karbor_postgres._restore import DeleteDatabase, RestoreDatabase, restore_target
from karbor_postgres._settings import PostgresError, Settings

__all__ = [
    "DATABASE",
    "PARAMETERS",
    "DumpFailedError",
    "PostgresError",
    "PostgresPlugin",
    "Settings",
    "SnapshotLostError",
    "dump_key",
    "held_exports",
    "restore_target",
]

DATABASE = "PostgreSQL::Database"
"""The resource type: a database; its id is the database's name unless ``dbname`` says."""

EXPORT_IDLE_TIMEOUT = 600.0

_PROTECT_RESTORE = frozenset({"protect", "restore"})

PARAMETERS: dict[str, Param] = {
    "host": Param(str, default="localhost", description="server host name, address or socket dir"),
    "port": Param(int, default=5432, description="server port"),
    "user": Param(str, default="postgres", description="role to log in as"),
    "dbname": Param(str, description="database name (default: the resource's id)"),
    "password": Param(
        str,
        secret=True,
        operations=_PROTECT_RESTORE,
        description="the role's password (a secret reference); reaches pg_dump and "
        "pg_restore through a 0600 PGPASSFILE only",
    ),
    "maintenance_db": Param(
        str, default="postgres", description="database to connect to for CREATE DATABASE"
    ),
    "bin_dir": Param(
        str, default="", description="where pg_dump and pg_restore are (default: newest found)"
    ),
    "connect_timeout": Param(float, default=10.0, description="seconds to connect"),
    "export_idle_timeout": Param(
        float,
        default=EXPORT_IDLE_TIMEOUT,
        operations={"protect"},
        description="seconds the server keeps a cut's exported snapshot with no pg_dump "
        "taking it (vacuum waits while it is open)",
    ),
    "restore_dbname": Param(
        str,
        operations={"restore"},
        description="name of the new database (default: <dbname>_<checkpoint id>)",
    ),
    "no_owner": Param(
        bool, default=False, operations={"restore"}, description="pg_restore --no-owner"
    ),
}


class PostgresPlugin(ProtectionPlugin):
    """Protects, restores and deletes ``PostgreSQL::Database`` resources."""

    name = "postgres"
    types: ClassVar[tuple[ResourceType, ...]] = (
        ResourceType(
            DATABASE,
            quiesces=False,
            snapshots=True,
            parameters=PARAMETERS,
            # The exported snapshot lives in this process's connection: after a crash
            # before on_main ended, the copy cannot resume from the cut.
            cut_outlives_process=False,
        ),
    )

    def __init__(self) -> None:
        self._protect = ProtectDatabase(EXPORT_IDLE_TIMEOUT)
        self._restore = RestoreDatabase()
        self._delete = DeleteDatabase()

    def get_protect_operation(self, resource_type: str) -> object | None:
        return self._protect if resource_type == DATABASE else None

    def get_restore_operation(self, resource_type: str) -> object | None:
        return self._restore if resource_type == DATABASE else None

    def get_delete_operation(self, resource_type: str) -> object | None:
        return self._delete if resource_type == DATABASE else None
