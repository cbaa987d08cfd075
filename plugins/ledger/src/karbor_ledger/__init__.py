"""karbor-async-ledger: a live-writing sample application in two shards, and its plugin.

Shard A debits, then asks shard B to credit: the two stores add up only when no
transfer is in flight, so a restored pair proves (or disproves) that the engine
cut both stores at a consistent point. See README.md.
"""

from karbor_ledger._app import SHARD, SQLITE, LedgerApp, ShardSpec, running_ledger
from karbor_ledger._store import ACCOUNTS, OPENING_BALANCE, Invariant, check_pair
from karbor_ledger.protections import ShardProtection, ShardStoreProtectable

__all__ = [
    "ACCOUNTS",
    "OPENING_BALANCE",
    "SHARD",
    "SQLITE",
    "Invariant",
    "LedgerApp",
    "ShardProtection",
    "ShardSpec",
    "ShardStoreProtectable",
    "check_pair",
    "running_ledger",
]
