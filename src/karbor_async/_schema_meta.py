"""What every store's meta table says, checked the same way for SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Mapping

from karbor_async.exceptions import NewerSchemaError, StoreFileError

__all__ = ["MAGIC", "stored_version"]

MAGIC = "karbor-async-store"
"""The meta table's ``magic``: written by karbor-async, whatever the store."""


def stored_version(
    where: str, meta: Mapping[str, str], current: int, thing: str, damaged: StoreFileError
) -> int:
    """The schema version a store's meta table records, or the error that says why the
    store cannot be opened (``damaged``: raised for a table that is not ours, or
    damaged; a newer version is a :class:`NewerSchemaError`). ``thing``: "file" or
    "database", for the messages."""
    if meta.get("magic") != MAGIC or not meta.get("schema_version", "").isdigit():
        raise damaged
    version = int(meta["schema_version"])
    if version > current:
        raise NewerSchemaError(
            f"{where} has store schema version {version}, written by a newer karbor-async; "
            f"this one reads up to version {current}. The {thing} was left untouched: "
            "upgrade karbor-async to open it"
        )
    return version
