"""karbor-sqlite: SQLite databases for karbor-async.

``SQLite::Database`` (id: the file's absolute path) is cut with a read transaction
on the plugin's own connection (WAL mode: writers go on) and copied by the online
backup from that same connection, so the checkpoint holds exactly the rows at the
cut. ``SQLite::Directory`` (id: a directory) finds the databases in it. Both are
registered as entry points (``karbor_async.protections`` / ``protectables``), so
``Engine()`` and the ``karbor-async`` command line find them. See ``README.md``.
"""

from karbor_sqlite.protectables import DirectoryProtectable
from karbor_sqlite.protection import (
    DATABASE,
    DIRECTORY,
    PARAMETERS,
    SqliteProtection,
    backup_key,
    restore_target,
    scratch_path,
)

__all__ = [
    "DATABASE",
    "DIRECTORY",
    "PARAMETERS",
    "DirectoryProtectable",
    "SqliteProtection",
    "backup_key",
    "restore_target",
    "scratch_path",
]
