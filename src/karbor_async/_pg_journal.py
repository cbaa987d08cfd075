"""The dead-man sentinel's journal for a store without a file: this host's journals, shipped.

The sentinel (``_sentinel``) needs no server to thaw and writes its firings with
the standard library only, so it journals them on its own host: one file per
sentinel, ``<engine pid>.<engine start>.<sentinel pid>.<sentinel start>.sentinel.jsonl``,
in ``<journal root>/<store id>/`` (the store's id is the same from every host; a
DSN is not). Two ways bring a firing into the store's ``sentinel_firings`` table,
where recovery by any replica reads it:

- the *shipper*: once a sentinel that journaled something has thawed all it held,
  it starts ``python -m karbor_async._pg_journal``, which reads the store's DSN
  and password from its stdin (never its arguments), copies the journal in and
  removes it, trying again for up to :data:`SHIP_WINDOW` seconds while the server
  cannot be reached. A replica on another host can take the dead engine's runs
  only once their lease expired, which gives the shipper that long;
- the next engine on this host (:meth:`PostgresStore.import_journals`, called by
  recovery): it copies every journal of this store, after waiting, bounded, for
  the sentinels of dead engines that are still thawing, and removes the journals
  whose sentinel has ended.

A firing is one row keyed by run, resource and instant: copying a journal twice
(the shipper and an engine at once) inserts nothing twice.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from karbor_async._liveness import process_start

if TYPE_CHECKING:
    import asyncpg

__all__ = [
    "SHIP_WINDOW",
    "forget",
    "host",
    "journal_root",
    "main",
    "parse",
    "remove",
    "settled_journals",
    "store_dir",
    "upload",
]

SHIP_WINDOW = 600.0
"""Seconds the shipper keeps trying to reach the server before it leaves the journal to
the next engine started on this host."""
WAIT_LIMIT = 35.0
"""Seconds an engine's import waits for the sentinels of dead engines to finish thawing
(one thaw is given up after 30 s)."""
_SUFFIX = ".sentinel.jsonl"


def journal_root(given: str | os.PathLike[str] | None) -> Path:
    """``given``, or ``$XDG_STATE_HOME/karbor-async/sentinel`` (``~/.local/state/...``)."""
    if given is not None:
        return Path(given).absolute()
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return Path(state, "karbor-async", "sentinel").absolute()


def store_dir(root: Path, store_id: str) -> Path:
    return root / (store_id or "unknown")


def host() -> str:
    return socket.gethostname()


def parse(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The firings a journal holds (a torn last line, the sentinel dying, is skipped)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    entries = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("run") and entry.get("resource"):
            entries.append(entry)
    return entries


def _alive(pid: int, start: int) -> bool:
    return start != 0 and process_start(pid) == start


def _writers(path: Path) -> tuple[bool, bool] | None:
    """(engine alive, sentinel alive) from a journal's name; None for another file."""
    parts = path.name[: -len(_SUFFIX)].split(".")
    if len(parts) != 4 or not all(p.isdigit() for p in parts):
        return None
    epid, estart, spid, sstart = (int(p) for p in parts)
    return _alive(epid, estart), _alive(spid, sstart)


def settled_journals(directory: Path) -> list[tuple[Path, list[dict[str, Any]], bool]]:
    """This host's journals in ``directory``: (path, its firings, whether its sentinel has
    ended). A sentinel whose engine is gone is thawing: waited for, up to WAIT_LIMIT
    seconds in all. Blocking (run it in a thread)."""
    try:
        paths = sorted(p for p in directory.iterdir() if p.name.endswith(_SUFFIX))
    except FileNotFoundError:
        return []
    deadline = time.monotonic() + WAIT_LIMIT
    found = []
    for path in paths:
        state = _writers(path)
        if state is None:
            continue
        engine, sentinel = state
        while sentinel and not engine and time.monotonic() < deadline:
            time.sleep(0.02)
            engine, sentinel = _writers(path) or (False, False)
        found.append((path, parse(path), not sentinel))
    return found


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)


async def upload(conn: asyncpg.Connection, entries: list[dict[str, Any]], host: str) -> int:
    """Insert ``entries`` into ``sentinel_firings`` (once each); returns how many were new."""
    rows = []
    for e in entries:
        resource = e.get("resource") or ["", ""]
        rows.append(
            (
                str(e["run"]),
                str(resource[0]),
                str(resource[1]),
                float(e.get("at", 0.0)),
                str(e.get("why", "")),
                json.dumps(e.get("result") or {}),
            )
        )
    if not rows:
        return 0
    inserted = await conn.fetch(
        "INSERT INTO sentinel_firings (run_id, rtype, rid, at, why, result, host, shipped_wall)"
        " SELECT u.*, $7::text, $8::float8 FROM unnest($1::text[], $2::text[], $3::text[],"
        " $4::float8[], $5::text[], $6::text[]) AS u"
        " ON CONFLICT DO NOTHING RETURNING 1",
        *([r[i] for r in rows] for i in range(6)),
        host,
        time.time(),
    )
    return len(inserted)


async def forget(conn: asyncpg.Connection, run_id: str) -> None:
    await conn.execute("DELETE FROM sentinel_firings WHERE run_id = $1", run_id)


# -- the shipper: python -m karbor_async._pg_journal -------------------------------------


async def _ship(config: dict[str, Any], journals: list[str]) -> int:
    import anyio
    import asyncpg

    deadline = time.monotonic() + float(config.get("window", SHIP_WINDOW))
    delay = 0.2
    while True:
        try:
            conn = await asyncpg.connect(
                str(config["dsn"]), password=config.get("password"), timeout=10
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            if time.monotonic() >= deadline:
                return 1  # (the journals stay: the next engine on this host imports them)
            await anyio.sleep(delay)
            delay = min(5.0, delay * 2)
            continue
        break
    try:
        found = await conn.fetchval("SELECT value FROM karbor_meta WHERE key = 'store_id'")
        if found != config.get("store_id"):
            return 2  # not the store these journals belong to: leave them
        for path in journals:
            entries = parse(path)
            async with conn.transaction():
                await upload(conn, entries, host())
            remove(Path(path))
    finally:
        await conn.close()
    return 0


def main() -> None:
    """Read the store's connection (a JSON line) and the journals' paths from stdin, ship."""
    for sig in (signal.SIGINT, signal.SIGHUP):  # (a closed terminal does not stop it)
        signal.signal(sig, signal.SIG_IGN)
    lines = sys.stdin.read().splitlines()
    if not lines:
        sys.exit(2)
    config = json.loads(lines[0])
    journals = [line for line in lines[1:] if line.strip()]
    import anyio

    sys.exit(anyio.run(_ship, config, journals, backend="asyncio"))


if __name__ == "__main__":
    main()
