"""The engine's central claim as a measured fact: restored stores are consistent.

The two-shard application (``plugins/ledger``) writes hundreds of transfers a
second while it is protected. Each protect is restored and the restored pair of
stores checked: their balances add up only if both stores were cut at one
consistent point.

- Under barrier ``cut`` with the shards quiesced, every one of 30 restored pairs
  holds.
- With quiesce off, the application is cut mid-transfer often enough that 30
  protects catch it at least once; the measured catch rate is printed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from karbor_async import Engine, FsBank, SqliteStore
from karbor_ledger import running_ledger
from karbor_ledger.proof import ProofSample, protect_restore_check
from proofchecks import assert_all_consistent, assert_caught

PROTECTS = 30


@pytest.fixture
def anyio_backend() -> str:
    """Real processes, sockets and files: real time."""
    return "asyncio"


async def _samples(tmp_path: Path, *, barrier: str, quiesce: bool) -> list[ProofSample]:
    samples: list[ProofSample] = []
    async with (
        running_ledger(tmp_path / "app") as app,
        SqliteStore.open(tmp_path / "karbor.db") as store,
        Engine(store=store, bank=FsBank(tmp_path / "bank")) as engine,
    ):
        for i in range(PROTECTS):
            sample = await protect_restore_check(
                engine, app, tmp_path / f"restored-{i}", barrier=barrier, quiesce=quiesce
            )
            samples.append(sample)
        stats = await app.stats()
    assert stats["A"]["transfers"] > 100, "the application hardly wrote while protected"
    return samples


@pytest.mark.slow
async def test_every_restored_pair_is_consistent_under_barrier_cut_with_quiesce(
    tmp_path: Path,
) -> None:
    samples = await _samples(tmp_path, barrier="cut", quiesce=True)
    assert_all_consistent(samples, "")


@pytest.mark.slow
async def test_without_quiesce_a_restored_pair_is_caught_inconsistent(tmp_path: Path) -> None:
    samples = await _samples(tmp_path, barrier="cut", quiesce=False)
    assert_caught(samples, "")
