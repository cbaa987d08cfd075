"""karbor-async-ledger: a live-writing sample application in two shards, and its plugin.

Shard A debits, then asks shard B to credit: the two stores add up only when no
transfer is in flight, so a restored pair proves (or disproves) that the engine
cut both stores at a consistent point. See README.md.
"""

from karbor_ledger._app import SHARD, LedgerApp, ShardSpec, running_ledger
from karbor_ledger._store import ACCOUNTS, OPENING_BALANCE, Invariant, Tally, check_pair
from karbor_ledger._stores import (
    DATABASE,
    FILESYSTEM,
    IMAGE,
    SQLITE,
    FileOnFileSystem,
    PostgresDatabase,
    SqliteFile,
    Store,
)
from karbor_ledger.protections import (
    ShardDatabaseProtectable,
    ShardFileSystemProtectable,
    ShardProtection,
    ShardStoreProtectable,
)

__all__ = [
    "ACCOUNTS",
    "DATABASE",
    "FILESYSTEM",
    "IMAGE",
    "OPENING_BALANCE",
    "SHARD",
    "SQLITE",
    "FileOnFileSystem",
    "Invariant",
    "LedgerApp",
    "PostgresDatabase",
    "ShardDatabaseProtectable",
    "ShardFileSystemProtectable",
    "ShardProtection",
    "ShardSpec",
    "ShardStoreProtectable",
    "SqliteFile",
    "Store",
    "Tally",
    "check_pair",
    "running_ledger",
]
