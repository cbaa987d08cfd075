"""Crash recovery: kill an engine mid-run with SIGKILL, restart on the same store and bank.

Each test runs the engine in a child process whose plugin blocks at a named
point, proves from the store's rows that the hook is in flight, kills the
child, and starts a new engine on the same SQLite file and bank directory.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from crashplugin import SERVER, VOLUME, CrashPlugin, crash_plugin
from karbor_async import (
    BarrierPolicy,
    CheckpointStatus,
    Engine,
    EventKind,
    FsBank,
    Hook,
    Plan,
    Resource,
    ResourceStatus,
    RunStatus,
    SqliteStore,
)
from karbor_async.testing import MapProtectable

TESTS = Path(__file__).resolve().parent
LEASE = 1.0
S1 = Resource(SERVER, "s1")
V1 = Resource(VOLUME, "v1")
V2 = Resource(VOLUME, "v2")

CHILD = textwrap.dedent(
    """
    import os
    import sys
    import anyio
    sys.path.insert(0, {tests!r})
    from crashplugin import SERVER, VOLUME, crash_plugin
    from karbor_async import BarrierPolicy, Engine, FsBank, Plan, Resource, SqliteStore
    from karbor_async.testing import MapProtectable

    S1 = Resource(SERVER, "s1")
    VOLS = [Resource(VOLUME, "v1"), Resource(VOLUME, "v2")]
    FINDER = MapProtectable(VOLUME, [SERVER], {{S1.key: VOLS}})

    async def main(mode: str, db: str, bank: str, checkpoint: str) -> None:
        async with SqliteStore.open(db, lease_seconds={lease}) as store:
            engine = Engine(
                [crash_plugin()], [FINDER], store=store, bank=FsBank(bank), discover=False
            )
            async with engine:
                if mode == "protect":
                    plan = Plan(
                        name="crash",
                        resources=[S1],
                        barrier=BarrierPolicy.CUT,
                        delete_on_failure=os.environ.get("CRASH_DELETE_ON_FAILURE") == "1",
                    )
                    await engine.protect(plan)
                else:
                    await engine.restore(checkpoint)

    anyio.run(main, *sys.argv[1:])
    """
).format(tests=str(TESTS), lease=LEASE)


@pytest.fixture
def anyio_backend() -> Any:
    return ("asyncio", {})  # the SQLite store runs on asyncio


@pytest.fixture
def journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "journal.txt"
    path.touch()
    monkeypatch.setenv("CRASH_JOURNAL", str(path))
    monkeypatch.delenv("CRASH_AT", raising=False)
    monkeypatch.delenv("CRASH_CUT_IN_PROCESS", raising=False)
    return path


def _finder() -> MapProtectable:
    return MapProtectable(VOLUME, [SERVER], {S1.key: [V1, V2]})


def _lines(journal: Path) -> list[list[str]]:
    return [line.split() for line in journal.read_text().splitlines() if line.strip()]


def _committed(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return list(conn.execute(sql, params))
    finally:
        conn.close()


def _has(db: Path, kind: str, key: str, hook: str, operation: str = "protect") -> bool:
    """Whether the store holds a committed `kind` event of `hook` on resource `key`."""
    rtype, rid = key.split("#")
    rows = _committed(
        db,
        "SELECT count(*) FROM events WHERE operation = ? AND rtype = ? AND rid = ?"
        " AND hook = ? AND kind = ?",
        (operation, rtype, rid, hook, kind),
    )
    return bool(rows[0][0])


def _finished(db: Path, key: str, hook: str) -> bool:
    return _has(db, "finished", key, hook)


def _started(db: Path, key: str, hook: str) -> bool:
    return _has(db, "started", key, hook)


def _events(db: Path) -> list[tuple[Any, ...]]:
    return _committed(db, "SELECT run_id, seq, kind, rtype, rid, hook, attempt FROM events")


async def _crash_child(
    tmp_path: Path,
    journal: Path,
    crash_at: str,
    ready: Callable[[Path], bool],
    *,
    mode: str = "protect",
    checkpoint: str = "-",
) -> list[tuple[Any, ...]]:
    """Run the child until `ready` holds on the store, SIGKILL it, return the committed events."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    db, bank = tmp_path / "karbor.db", tmp_path / "bank"
    env = {**os.environ, "CRASH_AT": crash_at, "CRASH_JOURNAL": str(journal)}
    proc = subprocess.Popen(  # noqa: ASYNC220 - a child we kill; waiting is bounded below
        [sys.executable, str(script), mode, str(db), str(bank), checkpoint], env=env
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            blocked = any("BLOCK" in line for line in _lines(journal))
            if blocked and db.exists() and await anyio.to_thread.run_sync(ready, db):
                break
            assert proc.poll() is None, "the child ended before reaching its crash point"
            assert time.monotonic() < deadline, "the child never reached its crash point"
            await anyio.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        await anyio.to_thread.run_sync(proc.wait)
    return await anyio.to_thread.run_sync(_events, db)


async def _recover(tmp_path: Path) -> AsyncIterator[tuple[Engine, list[Any]]]:
    await anyio.sleep(LEASE * 1.2)  # the dead owner's lease expires
    async with SqliteStore.open(tmp_path / "karbor.db", lease_seconds=LEASE) as store:
        engine = Engine(
            [crash_plugin()],
            [_finder()],
            store=store,
            bank=FsBank(tmp_path / "bank"),
            discover=False,
            recover=False,
        )
        async with engine:
            outcomes = await engine.recover()
            yield engine, outcomes


def _calls(
    journal: Path, pid: int, key: str, operation: str = "protect"
) -> list[tuple[str, str, str]]:
    """(hook, aborting, attempt) of the `operation` calls process `pid` made on `key`."""
    return [
        (p[3], p[4], p[5])
        for p in _lines(journal)
        if int(p[0]) == pid and p[2] == key and p[1] == operation
    ]


def _assert_prefix_kept(before: list[tuple[Any, ...]], after: list[tuple[Any, ...]]) -> None:
    assert set(before) <= set(after), "a committed record was lost"


S1K, V1K, V2K = f"{SERVER}#s1", f"{VOLUME}#v1", f"{VOLUME}#v2"
ME = os.getpid()


@pytest.mark.slow
async def test_crash_during_quiesce_thaws_and_cleans_up(tmp_path: Path, journal: Path) -> None:
    """Killed while the server is quiescing: recovery thaws it and deletes the checkpoint."""
    before = await _crash_child(
        tmp_path,
        journal,
        f"{S1K}:on_prepare_begin:protect",
        lambda db: _started(db, S1K, "on_prepare_begin"),
    )
    async for engine, outcomes in _recover(tmp_path):
        (outcome,) = outcomes
        assert outcome.status is RunStatus.FAILED
        assert _calls(journal, ME, S1K)[0] == ("on_prepare_finish", "recovery", "2")
        assert _calls(journal, ME, V1K) == []
        assert ("on_main", "-", "1") in _calls(journal, ME, V1K, "delete")  # the clean-up
        cp = await engine.store.get_checkpoint(outcome.checkpoint_id)
        assert cp.status is CheckpointStatus.DELETED
        after = await anyio.to_thread.run_sync(_events, tmp_path / "karbor.db")
        _assert_prefix_kept(before, after)


@pytest.mark.slow
async def test_crash_between_cuts_thaws_and_fails_cleanly(tmp_path: Path, journal: Path) -> None:
    """Killed after one cut of two: the group cannot be consistent, so it is thawed and deleted."""
    before = await _crash_child(
        tmp_path,
        journal,
        f"{V2K}:on_prepare_finish:protect",
        lambda db: (
            _finished(db, V1K, "on_prepare_finish") and _started(db, V2K, "on_prepare_finish")
        ),
    )
    async for engine, outcomes in _recover(tmp_path):
        (outcome,) = outcomes
        assert outcome.status is RunStatus.FAILED
        assert ("on_prepare_finish", "recovery", "2") in _calls(journal, ME, S1K)
        assert ("on_prepare_finish", "recovery", "2") in _calls(journal, ME, V2K)
        assert not [c for c in _calls(journal, ME, V1K) if c[0] == "on_prepare_finish"]
        cp = await engine.store.get_checkpoint(outcome.checkpoint_id)
        assert cp.status is CheckpointStatus.DELETED
        assert not (tmp_path / "bank" / outcome.checkpoint_id).exists()
        _assert_prefix_kept(before, await anyio.to_thread.run_sync(_events, tmp_path / "karbor.db"))


async def test_crash_during_main_resumes_with_next_attempt(tmp_path: Path, journal: Path) -> None:
    """Cuts were committed: main resumes; finished hooks are not re-run; the rest get attempt 2."""
    before = await _crash_child(
        tmp_path,
        journal,
        f"{V1K}:on_main:protect",
        lambda db: _finished(db, V2K, "on_main") and _finished(db, S1K, "on_prepare_finish"),
    )
    async for engine, outcomes in _recover(tmp_path):
        (outcome,) = outcomes
        assert outcome.status is RunStatus.SUCCEEDED
        assert _calls(journal, ME, V1K) == [("on_main", "-", "2"), ("on_complete", "-", "2")]
        assert ("on_main", "-", "2") not in _calls(journal, ME, V2K)
        assert not [c for c in _calls(journal, ME, S1K) if c[0].startswith("on_prepare")]
        cp = await engine.store.get_checkpoint(outcome.checkpoint_id)
        assert cp.status is CheckpointStatus.AVAILABLE
        saved = await engine.store.load_saved_info(outcome.checkpoint_id)
        assert saved[V2.key]["attempt"] == 1 and saved[V1.key]["attempt"] == 2
        _assert_prefix_kept(before, await anyio.to_thread.run_sync(_events, tmp_path / "karbor.db"))


@pytest.mark.slow
async def test_a_resumed_protect_that_fails_is_deleted_when_its_plan_says_so(
    tmp_path: Path, journal: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`delete_on_failure` holds for a protect that recovery resumed and that then failed:
    nothing it saved is kept, as for a protect that failed in one process."""
    monkeypatch.setenv("CRASH_DELETE_ON_FAILURE", "1")
    await _crash_child(
        tmp_path,
        journal,
        f"{V1K}:on_main:protect",
        lambda db: _finished(db, V2K, "on_main") and _finished(db, S1K, "on_prepare_finish"),
    )
    monkeypatch.setenv("CRASH_FAIL", f"{V1K}:on_main:2")
    async for engine, outcomes in _recover(tmp_path):
        (outcome,) = outcomes
        assert outcome.status is RunStatus.FAILED
        cp = await engine.store.get_checkpoint(outcome.checkpoint_id)
        assert cp.status is CheckpointStatus.DELETED
        assert [c[0] for c in _calls(journal, ME, V2K, "delete")] == [
            "on_prepare_begin",
            "on_prepare_finish",
            "on_main",
            "on_complete",
        ]


@pytest.mark.slow
async def test_crash_during_complete_reruns_only_what_was_not_finished(
    tmp_path: Path, journal: Path
) -> None:
    before = await _crash_child(
        tmp_path,
        journal,
        f"{S1K}:on_complete:protect",
        lambda db: _started(db, S1K, "on_complete"),
    )
    async for engine, outcomes in _recover(tmp_path):
        (outcome,) = outcomes
        assert outcome.status is RunStatus.SUCCEEDED
        assert _calls(journal, ME, S1K) == [("on_complete", "-", "2")]
        assert _calls(journal, ME, V1K) == [] and _calls(journal, ME, V2K) == []
        cp = await engine.store.get_checkpoint(outcome.checkpoint_id)
        assert cp.status is CheckpointStatus.AVAILABLE
        _assert_prefix_kept(before, await anyio.to_thread.run_sync(_events, tmp_path / "karbor.db"))


@pytest.mark.slow
async def test_crash_during_main_of_a_cut_that_lived_in_the_process_fails_and_cleans_up(
    tmp_path: Path, journal: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed during the copy of a volume whose cut lives in the process: recovery does
    not resume it (the cut is gone), fails the run naming the volume and why, runs no
    protect hook, and deletes the checkpoint through the plugins' delete operation."""
    monkeypatch.setenv("CRASH_CUT_IN_PROCESS", "1")
    before = await _crash_child(
        tmp_path,
        journal,
        f"{V1K}:on_main:protect",
        lambda db: _finished(db, V2K, "on_main") and _started(db, V1K, "on_main"),
    )
    async for engine, outcomes in _recover(tmp_path):
        (outcome,) = outcomes
        assert outcome.status is RunStatus.FAILED
        assert _calls(journal, ME, V1K) == _calls(journal, ME, V2K) == []
        assert _calls(journal, ME, S1K) == []
        assert ("on_main", "-", "1") in _calls(journal, ME, V1K, "delete")  # the clean-up
        v1 = outcome.resources[V1.key]
        assert v1.status is ResourceStatus.FAILED and v1.failed_hook is Hook.MAIN
        assert v1.error is not None and "its cut lived in the killed process" in v1.error
        assert outcome.error is not None
        assert str(V1) in outcome.error and "cut lived in the killed process" in outcome.error
        # V2's copy had finished before the kill: only V1 is why.
        assert outcome.resources[V2.key].status is not ResourceStatus.FAILED
        events = await engine.store.read_events(outcome.run_id)
        (lost,) = [e for e in events if e.data.get("reason") == "cut_lost"]
        assert lost.kind is EventKind.FAILED and lost.resource == V1.key
        assert "its cut lived in the killed process" in lost.data["error"]
        cp = await engine.store.get_checkpoint(outcome.checkpoint_id)
        assert cp.status is CheckpointStatus.DELETED
        assert not (tmp_path / "bank" / outcome.checkpoint_id).exists()
        _assert_prefix_kept(before, await anyio.to_thread.run_sync(_events, tmp_path / "karbor.db"))


@pytest.mark.slow
async def test_crash_after_the_copies_of_cuts_in_the_process_resumes(
    tmp_path: Path, journal: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed in on_complete after every copy of an in-process cut finished: nothing
    depends on the lost cut any more, so recovery resumes and the checkpoint is available."""
    monkeypatch.setenv("CRASH_CUT_IN_PROCESS", "1")
    await _crash_child(
        tmp_path,
        journal,
        f"{V1K}:on_complete:protect",
        lambda db: _finished(db, V1K, "on_main") and _finished(db, V2K, "on_main"),
    )
    async for engine, outcomes in _recover(tmp_path):
        (outcome,) = outcomes
        assert outcome.status is RunStatus.SUCCEEDED
        assert _calls(journal, ME, V1K) == [("on_complete", "-", "2")]
        cp = await engine.store.get_checkpoint(outcome.checkpoint_id)
        assert cp.status is CheckpointStatus.AVAILABLE


@pytest.mark.slow
async def test_crash_during_restore_adopts_instead_of_creating_twice(
    tmp_path: Path, journal: Path
) -> None:
    """A re-run restore hook sees the id it reported before the crash and adopts it."""
    async with SqliteStore.open(tmp_path / "karbor.db", lease_seconds=LEASE) as store:
        engine = Engine(
            [CrashPlugin()],
            [_finder()],
            store=store,
            bank=FsBank(tmp_path / "bank"),
            discover=False,
        )
        async with engine:
            protected = await engine.protect(
                Plan(name="crash", resources=[S1], barrier=BarrierPolicy.CUT)
            )
    before = await _crash_child(
        tmp_path,
        journal,
        f"{S1K}:on_complete:restore",
        lambda db: bool(
            _committed(db, "SELECT 1 FROM events WHERE kind = 'restored' AND rid = 's1'")
        ),
        mode="restore",
        checkpoint=protected.checkpoint_id,
    )
    async for _engine, outcomes in _recover(tmp_path):
        (outcome,) = outcomes
        assert outcome.status is RunStatus.SUCCEEDED
        creates = [p for p in _lines(journal) if "CREATE" in p]
        assert sorted(p[-1] for p in creates) == ["new-s1", "new-v1", "new-v2"]
        assert dict(outcome.restored) == {S1.key: "new-s1", V1.key: "new-v1", V2.key: "new-v2"}
        assert _calls(journal, ME, S1K, "restore") == [("on_complete", "-", "2")]
        _assert_prefix_kept(before, await anyio.to_thread.run_sync(_events, tmp_path / "karbor.db"))


@pytest.mark.slow
async def test_engine_recovers_before_its_first_operation(tmp_path: Path, journal: Path) -> None:
    """With recovery on (the default), a new engine finishes the dead one's run first;
    with it off, the run stays unfinished."""
    await _crash_child(
        tmp_path,
        journal,
        f"{S1K}:on_complete:protect",
        lambda db: _started(db, S1K, "on_complete"),
    )
    await anyio.sleep(LEASE * 1.2)
    async with SqliteStore.open(tmp_path / "karbor.db", lease_seconds=LEASE) as store:
        (stale,) = await store.unfinished_runs()
        off = Engine([CrashPlugin()], [_finder()], store=store, discover=False, recover=False)
        async with off:
            await off.build_protect(Plan(name="other", resources=[S1]))
            assert [r.run_id for r in await store.unfinished_runs()] == [stale.run_id]
        on = Engine(
            [CrashPlugin()],
            [_finder()],
            store=store,
            bank=FsBank(tmp_path / "bank"),
            discover=False,
        )
        async with on:
            await on.build_protect(Plan(name="other", resources=[S1]))
            assert await store.unfinished_runs() == []
            cp = await store.get_checkpoint(stale.checkpoint_id)
            assert cp.status is CheckpointStatus.AVAILABLE


async def test_recovery_resolves_secrets_or_stops_clearly(tmp_path: Path) -> None:
    """Recovering a run whose plan has secret parameters needs the engine's resolver;
    without one, recovery stops with an error naming the parameter and the resource."""
    from karbor_async import Param, ResourceType
    from karbor_async.exceptions import SecretError
    from karbor_async.store import RunRecord

    class SecretCrash(CrashPlugin):
        types = (
            ResourceType(SERVER, quiesces=True, snapshots=False),
            ResourceType(VOLUME, parameters={"password": Param(str, secret=True)}),
        )

    async def resolver(name: str) -> str:
        return {"pw": "hunter2"}[name]

    plan = Plan(name="secret", resources=[S1], parameters={VOLUME: {"password": "pw"}})
    async with SqliteStore.open(tmp_path / "karbor.db", lease_seconds=LEASE) as store:
        engine = Engine(
            [SecretCrash()],
            [_finder()],
            store=store,
            secrets=resolver,
            discover=False,
            recover=False,
        )
        async with engine:
            run = await engine.build_protect(plan)
            # A run a dead engine left: recorded, never finished, its lease given up.
            await store.create_run(
                RunRecord(
                    run.run_id,
                    run.operation,
                    run.checkpoint_id,
                    plan.to_json(),
                    run.spec.graph.to_json(),
                    RunStatus.RUNNING,
                    time.time(),
                )
            )
            await store.release_lease(run.run_id)
            bare = Engine([SecretCrash()], [_finder()], store=store, discover=False, recover=False)
            async with bare:
                with pytest.raises(
                    SecretError, match=r"OS::Cinder::Volume#v\d: parameter 'password'"
                ):
                    await bare.recover()
            (outcome,) = await engine.recover()
            assert outcome.run_id == run.run_id and outcome.status is RunStatus.FAILED
