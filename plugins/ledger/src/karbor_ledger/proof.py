"""Protect the running application, restore the checkpoint, check the restored pair.

One function serves the test suite, the benchmark report and the demo, so the
three measure the same thing the same way, whatever the stores are: the
application's stores say where their restore goes and how a restored one is read
(an SQLite file, a PostgreSQL database, a file in a file-system image).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import attrs

from karbor_async import Engine, RunOutcome
from karbor_ledger._app import SHARD, LedgerApp
from karbor_ledger._store import Invariant
from karbor_ledger._stores import Restored

__all__ = ["ProofSample", "protect_restore_check"]


@attrs.frozen
class ProofSample:
    """One protect of the live application, restored and checked."""

    barrier: str
    quiesce: bool
    invariant: Invariant
    skew: float | None
    """Seconds between the two stores' cuts (the group's cut skew)."""
    longest_window: float | None
    """The longest quiesce window of a shard, in seconds (``None`` without quiesce)."""
    missed: int
    """Transfers shard A could not make while paused during this protect."""
    protect: RunOutcome
    restore: RunOutcome
    restored: tuple[Restored, Restored]
    """The restored stores of A and B: an SQLite file's path, a PostgreSQL database's
    name, a file-system image's path."""


async def protect_restore_check(
    engine: Engine,
    app: LedgerApp,
    restore_dir: Path,
    *,
    barrier: str = "cut",
    quiesce: bool = True,
    plan_name: str = "ledger",
    **plan_kw: Any,
) -> ProofSample:
    """Protect ``app`` under ``barrier`` (quiescing the shards or not), restore the
    checkpoint's stores into ``restore_dir`` (a file store's; a PostgreSQL store into a
    new database) and check the restored pair."""
    before = (await app.stats())["A"]["missed_while_paused"]
    protected = await engine.protect(
        app.plan(plan_name, barrier=barrier, quiesce=quiesce, **plan_kw)
    )
    missed = (await app.stats())["A"]["missed_while_paused"] - before
    await anyio.Path(restore_dir).mkdir(parents=True, exist_ok=True)
    restored = await engine.restore(
        protected.checkpoint_id, parameters=app.restore_parameters(restore_dir)
    )
    pair = await app.restored(restored)
    windows = [
        r.thawed_at - r.quiesced_at
        for key, r in protected.resources.items()
        if key[0] == SHARD and r.quiesced_at is not None and r.thawed_at is not None
    ]
    return ProofSample(
        barrier=barrier,
        quiesce=quiesce,
        invariant=await app.check(*pair),
        skew=protected.groups["ledger"].skew,
        longest_window=max(windows) if windows and quiesce else None,
        missed=missed,
        protect=protected,
        restore=restored,
        restored=pair,
    )
