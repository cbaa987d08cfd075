"""A shard's store: accounts with balances and a log of the transfers it took part in.

Shard A's log holds the debits it made, shard B's the credits it applied; a transfer
is whole in a pair of stores when both logs hold its id. The invariant a consistent
pair keeps: the two stores' balances add up to what they held at the start.

A store is read into a :class:`Tally` (its balances' sum and its log's ids) and a
pair of tallies makes an :class:`Invariant`: the same check whatever the store is
(an SQLite file, a PostgreSQL database, a file inside a file-system image; see
``_stores.py`` for the last two). Every function here is synchronous and blocking
(``sqlite3``): callers run them in a worker thread.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import attrs

__all__ = [
    "ACCOUNTS",
    "OPENING_BALANCE",
    "Invariant",
    "Tally",
    "check_pair",
    "connect",
    "create",
    "invariant",
    "read_sqlite",
]

ACCOUNTS = 16
"""Accounts per shard."""
OPENING_BALANCE = 1_000_000
"""Each account's balance when the store is created."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS transfers (id INTEGER PRIMARY KEY, account INTEGER NOT NULL,
                                      amount INTEGER NOT NULL);
"""


def connect(path: Path) -> sqlite3.Connection:
    """A connection in WAL mode (a backup's read transaction never blocks the writer)."""
    db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    return db


def create(path: Path) -> None:
    """A new store at ``path`` with :data:`ACCOUNTS` opening balances (an existing one
    is kept as it is: a restarted shard continues where it stopped)."""
    db = connect(path)
    try:
        db.executescript(_SCHEMA)
        if db.execute("SELECT COUNT(*) FROM accounts").fetchone()[0] == 0:
            db.executemany(
                "INSERT INTO accounts (id, balance) VALUES (?, ?)",
                [(i, OPENING_BALANCE) for i in range(ACCOUNTS)],
            )
    finally:
        db.close()


@attrs.frozen
class Invariant:
    """What a pair of stores (A's, B's) says about the transfers between them."""

    total: int
    """The sum of every balance in both stores."""
    expected: int
    """What the sum must be: the opening balances of both."""
    debits: int
    """Transfers whose debit A's store holds."""
    credits: int
    """Transfers whose credit B's store holds."""
    half_done: int
    """Transfers one store holds and the other does not."""

    @property
    def holds(self) -> bool:
        return self.total == self.expected and self.half_done == 0

    @property
    def off_by(self) -> int:
        """How far the sum is from what it must be (positive: money appeared)."""
        return self.total - self.expected

    def describe(self) -> str:
        if self.holds:
            return (
                f"consistent: {self.debits} transfers, each in both stores; "
                f"the balances add up to {self.expected:,}"
            )
        return (
            f"INCONSISTENT: the balances add up to {self.total:,}, off by {self.off_by:+,}; "
            f"{self.half_done} of {max(self.debits, self.credits)} transfers are in one "
            "store only"
        )


@attrs.frozen
class Tally:
    """What one store holds: the sum of its balances and the ids in its transfer log."""

    total: int
    ids: frozenset[int]


def invariant(a: Tally, b: Tally) -> Invariant:
    """The invariant over A's and B's tallies."""
    return Invariant(
        total=a.total + b.total,
        expected=2 * ACCOUNTS * OPENING_BALANCE,
        debits=len(a.ids),
        credits=len(b.ids),
        half_done=len(a.ids ^ b.ids),
    )


def read_sqlite(path: Path) -> Tally:
    """Read one SQLite store (read-only)."""
    if not path.is_file():
        raise FileNotFoundError(f"no store at {path}")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        total = db.execute("SELECT COALESCE(SUM(balance), 0) FROM accounts").fetchone()[0]
        ids = frozenset(row[0] for row in db.execute("SELECT id FROM transfers"))
    finally:
        db.close()
    return Tally(int(total), ids)


def check_pair(a: Path, b: Path) -> Invariant:
    """Read a pair of SQLite stores (read-only) and say whether the invariant holds."""
    return invariant(read_sqlite(a), read_sqlite(b))
