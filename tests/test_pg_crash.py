"""The crash and lease tests of the CLI (``test_crash_cli``) with the store in PostgreSQL.

Each runs real ``karbor-async`` processes, two engines on one database: one is held in
a quiesce (or killed), the other is refused what the first holds, leaves a live
engine's run alone, and takes a dead one's runs over (its owner, a process of this
host, is gone: pid and start time). The helpers are ``test_crash_cli``'s, with
``KARBOR_STORE`` (and ``PGPASSWORD``) added to each command's environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

import test_crash_cli as crash
from karbor_async._pg_store import PostgresStore
from pgcluster import PgCluster


@pytest.fixture
def pg_store_env(pg_cluster: PgCluster, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every command of ``test_crash_cli`` runs on a fresh PostgreSQL store."""
    url = pg_cluster.dsn(pg_cluster.create_database("crash"))
    env = crash._env

    def pg_env(root: Path) -> dict[str, str]:
        return {**env(root), "KARBOR_STORE": url, "PGPASSWORD": pg_cluster.password}

    def stored(_root: Path, run_id: str) -> Any:
        async def read() -> Any:
            async with PostgresStore.open(url, password=pg_cluster.password) as store:
                return await store.get_run(run_id), await store.read_events(run_id)

        return anyio.run(read)

    monkeypatch.setattr(crash, "_env", pg_env)
    monkeypatch.setattr(crash, "_stored", stored)
    return url


def test_two_engines_never_protect_one_resource_and_a_dead_ones_run_is_taken_over(
    tmp_path: Path, pg_store_env: str
) -> None:
    """A second engine's protect of resources the first holds frozen exits 4 naming the
    run; once the first is killed, the next engine recovers its run (thaws, cleans up)."""
    crash.test_two_clis_never_protect_one_resource_at_once(tmp_path)
    assert not (tmp_path / "karbor.db").exists()  # the store was PostgreSQL throughout


def test_recover_by_another_engine_leaves_a_live_engines_run_alone(
    tmp_path: Path, pg_store_env: str
) -> None:
    crash.test_recover_leaves_a_run_a_live_engine_holds_and_exits_4(tmp_path)


@pytest.mark.parametrize("point", ["main", "quiesce"])
def test_a_protect_killed_at_a_point_is_recovered_by_another_engine(
    tmp_path: Path, pg_store_env: str, point: str
) -> None:
    """Killed in main: recovered, available, restorable; killed in a quiesce: thawed, the
    checkpoint lost and cleaned up; the event log intact and consecutive either way."""
    crash.test_a_protect_killed_at_a_point_recovers_with_the_defaults(tmp_path, point, 0)
