"""The dead-man sentinel with the PostgreSQL store: no store file to journal beside.

An engine process on the PostgreSQL store freezes a resource (a marker file,
``tests/safetyplugin.py``) and is killed with SIGKILL. Its sentinel thaws at once and
journals the firing on its host; then either its shipper copies the journal into the
store, where a second engine process on *another host* (a journal directory of its own,
the dead engine's lease waited out) reads it when it recovers the run, or, when no
shipper could, the next engine on the *same host* imports the journal as it recovers
(the dead owner is taken over at once: pid and start time). Either way the recovered run
records ``THAWED`` by the sentinel before recovery's own thaw.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from pgcluster import PgCluster
from safetyplugin import DB

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

ENGINE = textwrap.dedent(
    """
    import os, sys, anyio
    sys.path.insert(0, {tests!r})
    from safetyplugin import DB, SafetyPlugin
    from karbor_async import Engine, Plan, Resource
    from karbor_async._pg_store import PostgresStore

    class NoShipper(PostgresStore):  # a shipper that could not reach the server
        def sentinel_journal(self):
            import attrs
            return attrs.evolve(super().sentinel_journal(), ship=None, ship_input=None)

    async def main(dsn, owner, journal, ship):
        cls = PostgresStore if ship == "ship" else NoShipper
        password = os.environ.pop("TEST_PG_PASSWORD")  # (its children do not get it so)
        async with cls.open(dsn, password=password, owner=owner or None, lease_seconds=3.0,
                            journal_dir=journal) as store:
            async with Engine([SafetyPlugin()], store=store, discover=False) as engine:
                await engine.protect(Plan(name="dm", resources=[Resource(DB, "db1")]))

    anyio.run(main, *sys.argv[1:])
    """
).format(tests=str(TESTS))

RECOVER = textwrap.dedent(
    """
    import json, os, sys, time, anyio
    sys.path.insert(0, {tests!r})
    from safetyplugin import SafetyPlugin
    from karbor_async import Engine
    from karbor_async._pg_store import PostgresStore

    async def main(dsn, journal):
        password = os.environ["TEST_PG_PASSWORD"]
        held = []
        async with PostgresStore.open(dsn, password=password, lease_seconds=2.0,
                                      journal_dir=journal) as store:
            deadline = time.monotonic() + 20
            while True:
                async with Engine([SafetyPlugin()], store=store, discover=False,
                                  recover=False) as engine:
                    report = await engine.recover_report()
                if report.outcomes or time.monotonic() > deadline:
                    break
                held += [h.run_id for h in report.held]
                await anyio.sleep(0.1)
            recovered_at = time.time()
            (outcome,) = report.outcomes
            events = await store.read_events(outcome.run_id)
            left = await store.sentinel_firings(outcome.run_id)
        print(json.dumps({{
            "held": sorted(set(held)),
            "recovered_at": recovered_at,
            "status": outcome.status.value,
            "thawed": [[e.data.get("reason"), e.data.get("ok")] for e in events
                       if e.kind.value == "thawed"],
            "left": len(left),
        }}))

    anyio.run(main, *sys.argv[1:])
    """
).format(tests=str(TESTS))


@pytest.fixture
def frozen(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "FROZEN"
    monkeypatch.setenv("SAFETY_FROZEN", str(path))
    monkeypatch.setenv("SAFETY_JOURNAL", str(tmp_path / "calls.txt"))
    monkeypatch.setenv("SAFETY_MODE", "command")
    for name in ("SAFETY_HANG", "SAFETY_STUCK"):
        monkeypatch.delenv(name, raising=False)
    return path


def _env(password: str) -> dict[str, str]:
    """The children's environment: the password in a variable of the test's own (no
    PGPASSWORD: the sentinel's shipper must get it from the store, through a pipe)."""
    paths = [str(ROOT / "src"), str(TESTS), os.environ.get("PYTHONPATH", "")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    return {
        **env,
        "PYTHONPATH": os.pathsep.join(p for p in paths if p),
        "TEST_PG_PASSWORD": password,
    }


def _kill_while_frozen(
    tmp_path: Path, frozen: Path, password: str, args: list[str]
) -> tuple[float, list[str]]:
    """Run the engine, SIGKILL it once frozen; return how long the sentinel took to thaw
    and the arguments of the engine's processes then (the sentinel's included)."""
    err = tmp_path / "engine.err"
    with err.open("wb") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-c", ENGINE, *args],
            env={**_env(password), "SAFETY_HANG": "1"},
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
    try:
        deadline = time.monotonic() + 30
        while not frozen.exists():
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline, "never froze"
            time.sleep(0.005)
        done = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True)
        commands = [line for line in done.stdout.splitlines() if "karbor_async" in line]
    finally:
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        proc.wait()
    while frozen.exists():
        assert time.monotonic() - killed < 5, "the sentinel did not thaw within 5 s"
        time.sleep(0.001)
    return time.monotonic() - killed, commands


def _recover(dsn: str, password: str, journal: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", RECOVER, dsn, str(journal)],
        env=_env(password),
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return result


def _journals(root: Path) -> list[Path]:
    return sorted(root.rglob("*.sentinel.jsonl"))


def test_a_thaw_by_a_dead_engines_sentinel_reaches_a_replica_on_another_host(
    tmp_path: Path, frozen: Path, pg_cluster: PgCluster
) -> None:
    """The engine (a host of its own, by its lease's owner name) is killed while frozen:
    its sentinel thaws, journals, and its shipper copies the firing into the store and
    removes the journal. A second engine process, with a journal directory of its own,
    waits out the dead engine's lease, recovers the run and records the sentinel's thaw,
    then recovery's; the store lets the firing go. The password is in no process's
    arguments, the sentinel's included."""
    name = pg_cluster.create_database("sentinel")
    dsn = pg_cluster.dsn(name)
    here, there = tmp_path / "host-a", tmp_path / "host-b"
    owner = f"host-a.example:{os.getpid()}:1:{name[-8:]}"
    took, commands = _kill_while_frozen(
        tmp_path, frozen, pg_cluster.password, [dsn, owner, str(here), "ship"]
    )
    assert any("karbor_async._sentinel" in c for c in commands), commands
    assert not any(pg_cluster.password in c for c in commands)
    deadline = time.monotonic() + 20
    rows = ""
    while not rows or _journals(here):
        assert time.monotonic() < deadline, (rows, _journals(here))
        time.sleep(0.05)
        rows = pg_cluster.psql("SELECT rtype, rid, why, host FROM sentinel_firings", name)
    assert rows.split("|")[:3] == [DB, "db1", "engine_gone"]
    expires = float(pg_cluster.psql("SELECT lease_expires FROM runs", name))
    report = _recover(dsn, pg_cluster.password, there)
    assert report["recovered_at"] >= expires, "the dead engine's lease was not waited out"
    assert report["status"] == "failed"  # (killed in its quiesce: the checkpoint is lost)
    assert report["thawed"] == [["sentinel", True], ["recovery", None]]
    assert report["left"] == 0
    assert not _journals(there)
    calls = (tmp_path / "calls.txt").read_text().split("\n")
    assert "thaw recovery 2" in calls  # the aborting thaw still ran (idempotent)
    print(f"\nsentinel thaw {took * 1000:.1f} ms after SIGKILL; shipped to the store")


def test_a_journal_the_shipper_could_not_send_is_imported_by_the_next_engine_on_the_host(
    tmp_path: Path, frozen: Path, pg_cluster: PgCluster
) -> None:
    """No shipper (it could not reach the server): the journal stays on the host, and the
    next engine there, taking the dead owner's run over at once, imports it as it
    recovers; the journal is removed once its sentinel has ended."""
    name = pg_cluster.create_database("sentinel")
    dsn = pg_cluster.dsn(name)
    journal = tmp_path / "state"
    _kill_while_frozen(tmp_path, frozen, pg_cluster.password, [dsn, "", str(journal), "none"])
    deadline = time.monotonic() + 5  # (the sentinel journals right after the thaw)
    while not (found := _journals(journal)) or not found[0].read_text().endswith("\n"):
        assert time.monotonic() < deadline, "the sentinel journaled nothing"
        time.sleep(0.01)
    assert len(found) == 1
    assert pg_cluster.psql("SELECT count(*) FROM sentinel_firings", name) == "0"
    report = _recover(dsn, pg_cluster.password, journal)
    assert report["held"] == []  # the owner is a process of this host that is gone
    assert report["thawed"] == [["sentinel", True], ["recovery", None]]
    assert report["left"] == 0
    assert not _journals(journal)
