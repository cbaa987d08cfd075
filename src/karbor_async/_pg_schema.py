"""The PostgreSQL store's schema: versioned migrations, refusing databases not ours or newer.

A store database holds a ``karbor_meta`` table with :data:`MAGIC` and the schema
version. Opening first *inspects* the database: an empty one (no tables in the
``public`` schema) is ours to initialise; one with tables but no ``karbor_meta``,
or with another magic, is another application's and is refused untouched; one
with a newer version is refused untouched. Migrations run forward one step at a
time in one transaction, under an advisory lock so two engines opening a new
database at once do not both create it. Never edit a shipped step; append one.

DSNs are scrubbed of their password (:func:`scrub_dsn`) in every message.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from karbor_async._schema_meta import MAGIC, stored_version
from karbor_async.exceptions import ForeignFileError, StoreFileError

if TYPE_CHECKING:
    import asyncpg

__all__ = [
    "MAGIC",
    "MIGRATIONS",
    "inspect",
    "migrate",
    "schema_version",
    "scrub",
    "scrub_dsn",
    "store_id",
]


_LOCK_KEY = 0x4B415342
"""The advisory lock migrations hold (``"KASB"``, SQLite's application id)."""

_V1: tuple[str, ...] = (
    "CREATE TABLE karbor_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE runs (
        run_id TEXT PRIMARY KEY,
        operation TEXT NOT NULL,
        checkpoint_id TEXT NOT NULL,
        plan TEXT NOT NULL,
        graph TEXT NOT NULL,
        status TEXT NOT NULL,
        started_wall DOUBLE PRECISION NOT NULL,
        ended_wall DOUBLE PRECISION,
        outcome TEXT,
        error TEXT,
        lease_owner TEXT,
        lease_token BIGINT NOT NULL DEFAULT 0,
        lease_expires DOUBLE PRECISION NOT NULL DEFAULT 0
    )""",
    "CREATE INDEX runs_by_checkpoint ON runs (checkpoint_id, started_wall, run_id)",
    "CREATE INDEX runs_by_start ON runs (started_wall, run_id)",
    "CREATE INDEX runs_running ON runs (started_wall) WHERE status = 'running'",
    """CREATE TABLE checkpoints (
        id TEXT PRIMARY KEY,
        plan_name TEXT NOT NULL,
        status TEXT NOT NULL,
        created_wall DOUBLE PRECISION NOT NULL,
        ended_wall DOUBLE PRECISION,
        resources INTEGER,
        skew DOUBLE PRECISION,
        crash_consistent BOOLEAN,
        error TEXT
    )""",
    "CREATE INDEX checkpoints_by_date ON checkpoints (created_wall, id)",
    "CREATE INDEX checkpoints_by_plan ON checkpoints (plan_name, created_wall, id)",
    """CREATE TABLE saved_info (
        checkpoint_id TEXT NOT NULL,
        rtype TEXT NOT NULL,
        rid TEXT NOT NULL,
        info TEXT NOT NULL,
        PRIMARY KEY (checkpoint_id, rtype, rid)
    )""",
    """CREATE TABLE restored (
        run_id TEXT NOT NULL,
        rtype TEXT NOT NULL,
        rid TEXT NOT NULL,
        new_id TEXT NOT NULL,
        PRIMARY KEY (run_id, rtype, rid)
    )""",
    # The per-run counter row: each event's seq is taken from it in the transaction that
    # writes the event, so seqs are consecutive and in commit order with several writers.
    "CREATE TABLE run_seq (run_id TEXT PRIMARY KEY, seq BIGINT NOT NULL)",
    """CREATE TABLE events (
        run_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        kind TEXT NOT NULL,
        operation TEXT NOT NULL,
        wall DOUBLE PRECISION NOT NULL,
        mono DOUBLE PRECISION NOT NULL,
        rtype TEXT,
        rid TEXT,
        hook TEXT,
        grp TEXT,
        attempt INTEGER NOT NULL,
        data TEXT,
        progress TEXT,
        PRIMARY KEY (run_id, seq)
    )""",
    """CREATE TABLE progress (
        run_id TEXT NOT NULL,
        rtype TEXT NOT NULL,
        rid TEXT NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (run_id, rtype, rid)
    )""",
    """CREATE TABLE resource_leases (
        rtype TEXT NOT NULL,
        rid TEXT NOT NULL,
        run_id TEXT NOT NULL,
        abandoned_by TEXT,
        PRIMARY KEY (rtype, rid)
    )""",
    "CREATE INDEX resource_leases_by_run ON resource_leases (run_id)",
)

_V2: tuple[str, ...] = (
    # The dead-man sentinel's firings (DESIGN.md guarantee 8), so that recovery by any
    # replica, on any host, learns that a safety thaw ran: the sentinel journals each
    # firing on its own host (stdlib only, no server needed to thaw), and its shipper,
    # or the next engine on that host, copies the journal here (``_pg_journal``).
    # One row per firing; shipping twice inserts nothing twice.
    """CREATE TABLE sentinel_firings (
        run_id TEXT NOT NULL,
        rtype TEXT NOT NULL,
        rid TEXT NOT NULL,
        at DOUBLE PRECISION NOT NULL,
        why TEXT NOT NULL,
        result TEXT NOT NULL,
        host TEXT NOT NULL,
        shipped_wall DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (run_id, rtype, rid, at)
    )""",
    # The store's identity: hosts key their local sentinel journals by it (a DSN is not
    # one: two hosts may reach one database by different names).
    "INSERT INTO karbor_meta (key, value) VALUES ('store_id', gen_random_uuid()::text)"
    " ON CONFLICT (key) DO NOTHING",
)

MIGRATIONS: list[tuple[str, ...]] = [_V1, _V2]
"""Step ``i`` migrates version ``i`` to ``i + 1``; the current version is ``len(MIGRATIONS)``."""


def schema_version() -> int:
    return len(MIGRATIONS)


_PASSWORD_IN_URL = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]*@", re.I)
_PASSWORD_KV = re.compile(r"(?P<head>(?:^|\s)password\s*=\s*)('[^']*'|\S+)", re.I)


def scrub_dsn(dsn: str) -> str:
    """``dsn`` with any password replaced by ``***`` (URL or ``key=value`` form)."""
    out = _PASSWORD_IN_URL.sub(lambda m: f"{m['head']}***@", dsn)
    out = _PASSWORD_KV.sub(lambda m: f"{m['head']}***", out)
    return re.sub(r"([?&]password=)[^&\s]*", r"\1***", out, flags=re.I)


def scrub(text: str, *secrets: str | None) -> str:
    """``text`` with DSN passwords and each of ``secrets`` replaced by ``***``."""
    out = scrub_dsn(text)
    for secret in secrets:
        if secret:
            out = out.replace(secret, "***")
    return out


async def inspect(conn: asyncpg.Connection, where: str) -> int:
    """The store version of the database behind ``conn`` (0: empty, ours to initialise),
    changing nothing. Raises :class:`ForeignFileError` for another application's
    database and :class:`NewerSchemaError` for a newer store."""
    tables = {
        str(r[0])
        for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()"
        )
    }
    if not tables:
        return 0
    if "karbor_meta" not in tables:
        raise ForeignFileError(
            f"{where} is not a karbor-async store (it holds tables of another "
            f"application: {', '.join(sorted(tables)[:5])}); it was left untouched: "
            "point the store at a database of its own"
        )
    meta = {str(k): str(v) for k, v in await conn.fetch("SELECT key, value FROM karbor_meta")}
    damaged = StoreFileError(
        f"{where} has a karbor_meta table that is not a karbor-async store's "
        f"({meta!r}); it was left untouched: point the store at a new database"
    )
    return stored_version(where, meta, schema_version(), "database", damaged)


async def migrate(conn: asyncpg.Connection, where: str) -> int:
    """Inspect the database behind ``conn`` and migrate it to :func:`schema_version`.

    Returns the version found (0: a new store). ``where`` names the database (a
    scrubbed DSN) in messages. Raises :class:`ForeignFileError` for another
    application's database and :class:`NewerSchemaError` for a newer store, changing
    nothing.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        version = await inspect(conn, where)
        for step in MIGRATIONS[version:]:
            for statement in step:
                await conn.execute(statement)
        if version < schema_version():
            await conn.execute(
                "INSERT INTO karbor_meta (key, value) VALUES ('magic', $1), ('schema_version', $2)"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                MAGIC,
                str(schema_version()),
            )
        return version


async def store_id(conn: asyncpg.Connection) -> str:
    """The store's identity (``karbor_meta.store_id``, made by migration 2)."""
    value = await conn.fetchval("SELECT value FROM karbor_meta WHERE key = 'store_id'")
    return "" if value is None else str(value)
