"""The PostgreSQL plugin on a real server: consistent cuts that block no writer.

Every test runs against the session's throwaway cluster (``pg_cluster``, see
``tests/pgcluster.py``) in a database of its own, on asyncio only (asyncpg).
Writers insert rows that carry the id of the transaction that wrote them
(``pg_current_xact_id()``), so what a restore must hold is exact: the rows whose
transaction is visible in the snapshot the cut saved (``pg_current_snapshot()``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest

from karbor_async import Engine, MemoryBank, MemoryStore, Plan, Resource, RunStatus, SqliteStore
from karbor_async._fsbank import FsBank
from karbor_async.exceptions import PlanError, RunError
from karbor_async.testing import Fault, RecordingPlugin, make_context
from pgcluster import PgCluster

asyncpg = pytest.importorskip("asyncpg")
karbor_postgres = pytest.importorskip("karbor_postgres")
DATABASE: str = karbor_postgres.DATABASE
PostgresPlugin = karbor_postgres.PostgresPlugin

SECRET = "pg-pw"
KARBOR = str(Path(sys.executable).parent / "karbor-async")
TESTS = str(Path(__file__).parent)
SCHEMA = """
CREATE TABLE orders (
  id bigserial PRIMARY KEY,
  xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
  writer int NOT NULL,
  pad text NOT NULL
);
CREATE TABLE side (x int);
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # asyncpg is asyncio's


@pytest.fixture
def db(pg_cluster: PgCluster) -> Iterator[str]:
    """A database of this test's: ``orders`` with 20,000 rows, and an empty ``side``."""
    name = pg_cluster.create_database("shop")
    pg_cluster.psql(SCHEMA, name)
    pg_cluster.psql(
        "INSERT INTO orders (writer, pad) SELECT 0, repeat(md5(g::text), 6) "
        "FROM generate_series(1, 20000) g",
        name,
    )
    yield name
    for other in pg_cluster.databases():
        if other.startswith(name):
            pg_cluster.drop_database(other)


async def _connect(cluster: PgCluster, dbname: str = "postgres") -> Any:
    return await asyncpg.connect(
        host=cluster.host,
        port=cluster.port,
        user=cluster.user,
        password=cluster.password,
        database=dbname,
    )


def _params(cluster: PgCluster, **more: Any) -> dict[str, Any]:
    return {"host": cluster.host, "port": cluster.port, "password": SECRET, **more}


def _plan(cluster: PgCluster, db: str, **more: Any) -> Plan:
    return Plan(
        name="pg",
        resources=[Resource(DATABASE, db)],
        parameters={DATABASE: _params(cluster)},
        **more,
    )


def _resolver(cluster: PgCluster) -> Any:
    async def resolve(name: str) -> str:
        assert name == SECRET
        return cluster.password

    return resolve


def _engine(
    cluster: PgCluster, bank: Path | FsBank, *plugins: Any, store: Any = None, secrets: Any = None
) -> Engine:
    return Engine(
        [PostgresPlugin(), *plugins],
        [],
        store=store or MemoryStore(),
        bank=bank if isinstance(bank, FsBank) else FsBank(bank),
        discover=False,
        secrets=secrets or _resolver(cluster),
    )


async def _sessions(cluster: PgCluster, kind: str) -> list[Any]:
    """Our sessions of one kind (``cut``, ``dump``, ``restore``) still on the server."""
    conn = await _connect(cluster)
    try:
        return list(
            await conn.fetch(
                "SELECT pid, application_name, backend_xmin, state, wait_event_type "
                "FROM pg_stat_activity WHERE application_name LIKE $1",
                f"karbor-{kind} %",
            )
        )
    finally:
        await conn.close()


async def _until(probe: Callable[[], Awaitable[object]], within: float = 10.0) -> Any:
    """Poll ``probe`` until it returns something true (and return that), within a limit."""
    with anyio.fail_after(within):
        while not (got := await probe()):  # noqa: ASYNC110 (a server's or a process's state: no event)
            await anyio.sleep(0.02)
        return got


async def _gone(cluster: PgCluster, kind: str, within: float = 10.0) -> None:
    async def none_left() -> bool:
        return not await _sessions(cluster, kind)

    await _until(none_left, within)


async def _visible_ids(cluster: PgCluster, db: str, snapshot: str) -> tuple[list[int], int]:
    """The ids of the rows the snapshot sees in the source, and how many it does not."""
    conn = await _connect(cluster, db)
    try:
        seen = [
            r["id"]
            for r in await conn.fetch(
                "SELECT id FROM orders WHERE pg_visible_in_snapshot(xid, $1::text::pg_snapshot) "
                "ORDER BY id",
                snapshot,
            )
        ]
        later = await conn.fetchval(
            "SELECT count(*) FROM orders "
            "WHERE NOT pg_visible_in_snapshot(xid, $1::text::pg_snapshot)",
            snapshot,
        )
        return seen, int(later)
    finally:
        await conn.close()


async def _ids(cluster: PgCluster, db: str) -> list[int]:
    conn = await _connect(cluster, db)
    try:
        return [r["id"] for r in await conn.fetch("SELECT id FROM orders ORDER BY id")]
    finally:
        await conn.close()


class _Writers:
    """Writers inserting one row per transaction as fast as they can; each commit's
    latency is kept, so a stall (a writer waiting on the cut) shows."""

    def __init__(self, cluster: PgCluster, db: str, n: int = 3) -> None:
        self.cluster, self.db, self.n = cluster, db, n
        self.latencies: list[float] = []
        self.stop = anyio.Event()

    async def _one(self, i: int) -> None:
        conn = await _connect(self.cluster, self.db)
        try:
            while not self.stop.is_set():
                t = time.perf_counter()
                await conn.execute("INSERT INTO orders (writer, pad) VALUES ($1, 'w')", i)
                self.latencies.append(time.perf_counter() - t)
        finally:
            await conn.close()

    @classmethod
    async def running(cls, tg: Any, cluster: PgCluster, db: str) -> _Writers:
        writers = cls(cluster, db)
        for i in range(1, writers.n + 1):
            tg.start_soon(writers._one, i)

        async def going() -> bool:
            return len(writers.latencies) >= 50

        await _until(going)
        return writers


async def test_writers_go_on_during_protect_and_the_restore_holds_exactly_the_cut(
    pg_cluster: PgCluster, db: str, tmp_path: Path
) -> None:
    """Three writers insert throughout a protect: none waits on the cut (no commit
    slower than 2 s), rows keep arriving during the copy, and the restored database
    holds exactly the rows of the transactions the cut's snapshot sees (not one the
    writers committed after it). The exporting session is gone once pg_dump took the
    snapshot; the restore reports the new database's name."""
    async with _engine(pg_cluster, tmp_path / "bank") as engine, anyio.create_task_group() as tg:
        writers = await _Writers.running(tg, pg_cluster, db)
        before = len(writers.latencies)
        outcome = await engine.protect(_plan(pg_cluster, db))
        during = len(writers.latencies) - before
        await anyio.sleep(0.1)
        writers.stop.set()
    assert outcome.status is RunStatus.SUCCEEDED, outcome
    # (a generous bound: the writers share this loaded machine's event loop and cores)
    assert during > 10 and max(writers.latencies) < 2.0
    assert await _sessions(pg_cluster, "cut") == [] and karbor_postgres.held_exports() == {}
    saved = await engine.store.load_saved_info(outcome.checkpoint_id)
    info = saved[(DATABASE, db)]
    assert info["dump_bytes"] > 100_000 and 0 < info["export_held_s"] < 5
    assert info["dump_key"] == f"{outcome.checkpoint_id}-{db}.pgdump"
    assert outcome.resources[(DATABASE, db)].cut_at is not None

    async with _engine(pg_cluster, tmp_path / "bank", store=engine.store) as engine2:
        restored = await engine2.restore(outcome.checkpoint_id)
    assert restored.status is RunStatus.SUCCEEDED, restored
    [(key, new_db)] = (await engine2.store.load_restored(restored.run_id)).items()
    assert key == (DATABASE, db)
    assert new_db == f"{db}_{outcome.checkpoint_id.lower().replace('-', '_')}"
    seen, later = await _visible_ids(pg_cluster, db, info["snapshot"])
    assert later > 0  # the writers did commit after the cut
    assert await _ids(pg_cluster, new_db) == seen
    assert len(seen) >= 20000


async def test_check_refuses_a_missing_database_a_wrong_password_and_a_full_bank(
    pg_cluster: PgCluster, db: str, tmp_path: Path
) -> None:
    """Before anything is stored or frozen: a database that does not exist, a wrong
    password (named as such, the password itself in no message), a bank with less room
    than the tables take; and a restore into a database that exists."""

    class SmallBank(FsBank):
        async def free_bytes(self) -> int:
            return 4096

    async def wrong(name: str) -> str:
        return "not-the-password"

    cases: list[tuple[Plan, Any, str]] = [
        (_plan(pg_cluster, "nosuchdb"), None, "database 'nosuchdb' does not exist"),
        (_plan(pg_cluster, db), wrong, "password authentication failed"),
        (_plan(pg_cluster, db), "small", "the bank has 4096 bytes free"),
    ]
    for plan, how, message in cases:
        if how == "small":
            engine = _engine(pg_cluster, SmallBank(tmp_path / "bank"))
        else:
            engine = _engine(pg_cluster, tmp_path / "bank", secrets=how)
        async with engine:
            with pytest.raises(PlanError, match=message) as caught:
                await engine.build_protect(plan)
            assert "not-the-password" not in str(caught.value)
            assert pg_cluster.password not in str(caught.value)
            assert await engine.store.list_checkpoints() == []

    async with _engine(pg_cluster, tmp_path / "bank") as engine:
        outcome = await engine.protect(_plan(pg_cluster, db))
        parameters = {DATABASE: {"restore_dbname": db}}
        with pytest.raises(PlanError, match=f"database '{db}' already exists"):
            await engine.build_restore(outcome.checkpoint_id, parameters=parameters)


async def test_a_cut_left_by_a_failed_run_is_closed_by_delete_or_by_the_server(
    pg_cluster: PgCluster, db: str, tmp_path: Path
) -> None:
    """Another resource of the group fails after this database cut, so its copy never
    runs and the export stays open (vacuum waits): with ``delete_on_failure`` the delete
    closes it and removes the bank data; without, the server ends it after
    ``export_idle_timeout``."""
    other = RecordingPlugin(
        ["Test::Other"],
        delays={("Test::Other", "on_prepare_finish"): 0.5},
        faults={("Test::Other", "on_prepare_finish"): Fault.RAISE},
    )
    resources = [Resource(DATABASE, db), Resource("Test::Other", "o1")]
    for delete in (True, False):
        params = _params(pg_cluster, export_idle_timeout=1.0)
        plan = Plan(
            name="pg",
            resources=resources,
            parameters={DATABASE: params},
            delete_on_failure=delete,
        )
        async with _engine(pg_cluster, tmp_path / "bank", other) as engine:
            run = await engine.build_protect(plan)
            async with anyio.create_task_group() as tg:
                tg.start_soon(_expect_failure, engine, run)

                async def cut() -> bool:
                    return bool(karbor_postgres.held_exports())

                await _until(cut, 5)
                assert len(await _sessions(pg_cluster, "cut")) == 1  # cut, held
        if delete:
            assert await _sessions(pg_cluster, "cut") == []
            assert karbor_postgres.held_exports() == {}
            assert not any(p.is_file() for p in (tmp_path / "bank").rglob("*"))
        else:
            started = time.monotonic()
            await _gone(pg_cluster, "cut", within=5)
            assert time.monotonic() - started < 4
            assert karbor_postgres.held_exports() == {}  # (its connection is gone)


async def test_a_failing_pg_dump_fails_the_copy_naming_why_and_leaves_nothing(
    pg_cluster: PgCluster, db: str, tmp_path: Path
) -> None:
    """pg_dump writes some output, then fails: the hook's error carries pg_dump's own
    message, no partial dump is kept in the bank, and the export is closed."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "pg_dump"
    fake.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--version" ]; then echo "pg_dump (PostgreSQL) 99.0"; exit 0; fi\n'
        "printf PGDMP; echo 'pg_dump: error: the disk caught fire' >&2; exit 1\n"
    )
    fake.chmod(0o755)
    plan = Plan(
        name="pg",
        resources=[Resource(DATABASE, db)],
        parameters={DATABASE: _params(pg_cluster, bin_dir=str(bin_dir))},
    )
    async with _engine(pg_cluster, tmp_path / "bank") as engine:
        with pytest.raises(RunError) as caught:
            await engine.protect(plan)
    failed = caught.value.outcome.resources[(DATABASE, db)]
    assert failed.failed_hook == "on_main"
    assert "pg_dump exited with 1: pg_dump: error: the disk caught fire" in str(failed.error)
    assert not any(p.is_file() for p in (tmp_path / "bank").rglob("*"))
    assert await _sessions(pg_cluster, "cut") == [] and karbor_postgres.held_exports() == {}


async def test_a_group_aborted_before_the_cut_closes_the_connection_it_opened(
    pg_cluster: PgCluster, db: str, tmp_path: Path
) -> None:
    """``on_prepare_begin`` connects for the cut; when the group aborts before the cut
    (barrier ``cut``: another resource's prepare fails), the aborting
    ``on_prepare_finish`` closes that connection and exports nothing."""
    other = RecordingPlugin(
        ["Test::Other"],
        delays={("Test::Other", "on_prepare_begin"): 0.3},
        faults={("Test::Other", "on_prepare_begin"): Fault.RAISE},
    )
    plan = Plan(
        name="pg",
        resources=[Resource(DATABASE, db), Resource("Test::Other", "o1")],
        parameters={DATABASE: _params(pg_cluster)},
        barrier="cut",
    )
    async with _engine(pg_cluster, tmp_path / "bank", other) as engine:
        run = await engine.build_protect(plan)
        outcomes: list[Any] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(_expect_failure, engine, run, outcomes)

            async def connected() -> bool:
                return bool(await _sessions(pg_cluster, "cut"))

            await _until(connected, 5)
            assert karbor_postgres.held_exports() == {}  # connected, not cut
    [outcome] = outcomes
    assert outcome.resources[(DATABASE, db)].cut_at is None
    await _gone(pg_cluster, "cut", within=2)
    assert karbor_postgres.held_exports() == {}


async def _expect_failure(engine: Engine, run: Any, outcomes: list[Any] | None = None) -> None:
    with pytest.raises(RunError) as caught:
        await engine.execute(run)
    if outcomes is not None:
        outcomes.append(caught.value.outcome)


async def test_hooks_are_idempotent_across_attempts(pg_cluster: PgCluster, db: str) -> None:
    """Called directly (``make_context``), as a recovered run would: a re-run cut replaces
    its export (one exporting session, not two); a copy in a process that does not hold
    the export refuses with ``SnapshotLostError``; a re-run restore adopts the database
    its first attempt finished, and makes again one an attempt left unfinished."""
    plugin = PostgresPlugin()
    resource = Resource(DATABASE, db)
    params = {**_params(pg_cluster), "password": pg_cluster.password}  # (resolved)
    bank = MemoryBank()
    protect, restore = (
        plugin.get_protect_operation(DATABASE),
        plugin.get_restore_operation(DATABASE),
    )
    ctx, rec = make_context(resource, "on_prepare_finish", parameters=params, bank=bank)
    await protect.on_prepare_finish(ctx)
    first = rec.saved[resource.key]["snapshot_id"]
    ctx, rec = make_context(
        resource, "on_prepare_finish", parameters=params, bank=bank, attempt=2, recorder=rec
    )
    await protect.on_prepare_finish(ctx)
    assert rec.saved[resource.key]["snapshot_id"] != first
    assert len(await _sessions(pg_cluster, "cut")) == 1
    held = karbor_postgres.held_exports()
    karbor_postgres._exports._held.clear()  # as in a process that did not cut
    ctx, rec = make_context(resource, parameters=params, bank=bank, attempt=2, recorder=rec)
    with pytest.raises(karbor_postgres.SnapshotLostError, match="no longer open"):
        await protect.on_main(ctx)
    karbor_postgres._exports._held.update(held)
    ctx, rec = make_context(resource, parameters=params, bank=bank, attempt=3, recorder=rec)
    await protect.on_main(ctx)
    assert await _sessions(pg_cluster, "cut") == []

    target = f"{db}_again"
    rparams = {**params, "restore_dbname": target}
    for attempt in (1, 2):
        ctx, rec = make_context(
            resource,
            operation="restore",
            parameters=rparams,
            bank=bank,
            attempt=attempt,
            recorder=rec,
        )
        await restore.on_main(ctx)
        assert rec.restored[resource.key] == target
    want = await _ids(pg_cluster, target)
    assert len(want) == 20000
    pg_cluster.psql(f'COMMENT ON DATABASE "{target}" IS NULL')  # as if the load had not ended
    pg_cluster.psql("DELETE FROM orders WHERE id > 10", target)
    ctx, rec = make_context(
        resource, operation="restore", parameters=rparams, bank=bank, attempt=3, recorder=rec
    )
    await restore.on_main(ctx)
    assert await _ids(pg_cluster, target) == want
    # Not this restore's (no id reported): refused, untouched.
    ctx, rec = make_context(resource, operation="restore", parameters=rparams, bank=bank)
    with pytest.raises(karbor_postgres.PostgresError, match="is not this restore's"):
        await restore.on_main(ctx)


async def test_vacuum_waits_while_the_export_is_open(pg_cluster: PgCluster, db: str) -> None:
    """What the README warns of: while a cut's export is open, VACUUM cannot remove the
    rows deleted after it; once the delete operation closed it, VACUUM removes them."""
    plugin = PostgresPlugin()
    resource = Resource(DATABASE, db)
    params = {**_params(pg_cluster), "password": pg_cluster.password}
    bank = MemoryBank()
    ctx, _ = make_context(resource, "on_prepare_finish", parameters=params, bank=bank)
    await plugin.get_protect_operation(DATABASE).on_prepare_finish(ctx)
    pg_cluster.psql("DELETE FROM orders WHERE id <= 5000", db)

    def dead_after_vacuum() -> int:
        pg_cluster.psql("VACUUM orders", db)
        return int(
            pg_cluster.psql(
                "SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'orders'", db
            )
        )

    assert await anyio.to_thread.run_sync(dead_after_vacuum) == 5000
    ctx, _ = make_context(resource, operation="delete", parameters=params, bank=bank)
    await plugin.get_delete_operation(DATABASE).on_main(ctx)
    assert await _sessions(pg_cluster, "cut") == []
    assert await anyio.to_thread.run_sync(dead_after_vacuum) == 0


# -- through the command line -----------------------------------------------------------


def _cli_env(root: Path, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KARBOR_", "PG"))}
    env.update(KARBOR_DB=str(root / "karbor.db"), KARBOR_BANK=str(root / "bank"), COLUMNS="200")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH")) if p)
    env.update(more)
    return env


def _write_plan(root: Path, cluster: PgCluster, db: str) -> None:
    (root / "plan.toml").write_text(
        f'name = "pg"\nresources = ["{DATABASE}#{db}"]\n\n'
        f'[parameters."{DATABASE}"]\nhost = "{cluster.host}"\nport = {cluster.port}\n'
        f'password = "{SECRET}"\n'
    )
    secrets = root / "secrets.toml"
    secrets.write_text(f'"{SECRET}" = "{cluster.password}"\n')
    secrets.chmod(0o600)


async def _cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    with anyio.fail_after(60):
        done = await anyio.run_process([KARBOR, *args], cwd=root, env=_cli_env(root), check=False)
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode(), done.stderr.decode()
    )


@pytest.fixture
async def side_locked(pg_cluster: PgCluster, db: str) -> AsyncIterator[Any]:
    """``side`` locked ACCESS EXCLUSIVE by another session: pg_dump, having taken the
    snapshot, waits on it, so the copy is provably in progress until ``release()``."""
    conn = await _connect(pg_cluster, db)
    tx = conn.transaction()
    await tx.start()
    await conn.execute("LOCK TABLE side IN ACCESS EXCLUSIVE MODE")

    class Lock:
        held = True

        async def release(self) -> None:
            if self.held:
                self.held = False
                await tx.commit()

    lock = Lock()
    try:
        yield lock
    finally:
        await lock.release()
        await conn.close()


async def _dump_waiting(cluster: PgCluster, ended: Callable[[], object]) -> Any:
    """pg_dump's session once it waits on the ``side`` lock (the snapshot taken)."""

    async def waiting() -> Any:
        assert not ended(), f"the command ended before pg_dump waited: {ended()}"
        rows = [r for r in await _sessions(cluster, "dump") if r["wait_event_type"] == "Lock"]
        return rows[0] if rows else None

    return await _until(waiting, 30)


def _pg_dump_processes(application: str) -> list[tuple[int, bytes]]:
    """Running ``pg_dump`` processes started with ``PGAPPNAME=application`` (others may
    run on this machine): pid and environment."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            args = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes()
        except OSError:
            continue
        mine = f"PGAPPNAME={application}".encode() in environ.split(b"\0")
        if args and args[0].endswith(b"pg_dump") and mine:
            found.append((int(proc.name), environ))
    return found


async def test_the_cli_protects_restores_and_deletes_and_the_password_shows_nowhere(
    pg_cluster: PgCluster, db: str, tmp_path: Path, side_locked: Any
) -> None:
    """`protect PLAN --secrets-file` (the password a secret reference): while pg_dump
    runs, `ps` shows its command line without the password, and neither its environment
    nor the CLI's holds it (pg_dump reads it from a 0600 PGPASSFILE on no disk); the
    cut's session is already closed. Then `restore --param ...restore_dbname=` holds the
    snapshot's rows, `delete` removes the bank data, and the store (plans, events) and
    every output never held the password."""
    _write_plan(tmp_path, pg_cluster, db)
    password = pg_cluster.password
    protect = ["protect", "plan.toml", "--secrets-file", "secrets.toml", "--json"]
    async with anyio.create_task_group() as tg:
        results: list[subprocess.CompletedProcess[str]] = []

        async def run() -> None:
            results.append(await _cli(tmp_path, *protect))

        tg.start_soon(run)
        session = await _dump_waiting(pg_cluster, lambda: results)
        assert session["backend_xmin"] is not None
        # The export is closed once pg_dump holds the snapshot (it still waits, holding it).
        await _gone(pg_cluster, "cut", within=5)
        assert (await _dump_waiting(pg_cluster, lambda: results))["pid"] == session["pid"]
        ps = (await anyio.run_process(["ps", "-eo", "pid,args"])).stdout.decode()
        assert "pg_dump --snapshot=" in ps and password not in ps
        mine = session["application_name"]
        [(pid, environ)] = await anyio.to_thread.run_sync(_pg_dump_processes, mine)
        assert password.encode() not in environ
        [passfile] = [e for e in environ.split(b"\0") if e.startswith(b"PGPASSFILE=")]
        assert passfile.startswith(b"PGPASSFILE=/dev/fd/")
        fd = passfile.rsplit(b"/", 1)[1].decode()
        assert (await anyio.Path(f"/proc/{pid}/fd/{fd}").stat()).st_mode & 0o077 == 0
        await side_locked.release()
    [done] = results
    assert done.returncode == 0, done.stdout + done.stderr
    outcome = json.loads(done.stdout)["outcome"]
    checkpoint = outcome["checkpoint_id"]

    target = f"{db}_copy"
    param = f"{DATABASE}.restore_dbname={target}"
    restored = await _cli(
        tmp_path, "restore", checkpoint, "--param", param, "--secrets-file", "secrets.toml"
    )
    assert restored.returncode == 0, restored.stdout + restored.stderr
    shown = await _cli(tmp_path, "checkpoints", "show", checkpoint, "--json")
    snapshot = json.loads(shown.stdout)["checkpoint"]["outcome"]
    assert shown.returncode == 0 and snapshot
    events = await _cli(tmp_path, "events", checkpoint, "--json")
    seen, _later = await _visible_ids(
        pg_cluster, db, (await _saved(tmp_path, checkpoint, db))["snapshot"]
    )
    assert await _ids(pg_cluster, target) == seen

    deleted = await _cli(tmp_path, "delete", checkpoint)
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    assert not any(p.is_file() for p in (tmp_path / "bank").rglob("*"))
    for out in (done, restored, shown, events, deleted):
        assert password not in out.stdout + out.stderr
    store = b"".join([await p.read_bytes() async for p in anyio.Path(tmp_path).glob("karbor.db*")])
    assert store and password.encode() not in store and SECRET.encode() in store


async def _saved(root: Path, checkpoint: str, db: str) -> dict[str, Any]:
    """The database's saved info, read from the CLI's store as another program would."""
    async with SqliteStore.open(root / "karbor.db") as store:
        return (await store.load_saved_info(checkpoint))[(DATABASE, db)]


# -- kill -9 during the cut and during the copy, then recover ----------------------------


async def _spawn(root: Path, *args: str, hold_cut: Path | None = None) -> Any:
    """The command in the background (output discarded); ``hold_cut``: with the cut held
    open after the export, marked in that file (``tests/pgholdcut.py``)."""
    command = [KARBOR, *args]
    env = _cli_env(root)
    if hold_cut is not None:
        command = [sys.executable, "-c", "import pgholdcut; pgholdcut.main()", *args]
        env["PG_HOLD_CUT_MARK"] = str(hold_cut)
    return await anyio.open_process(
        command,
        cwd=root,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def _kill(process: Any) -> None:
    process.send_signal(signal.SIGKILL)
    await process.wait()


def _leftovers(root: Path) -> list[str]:
    """Files in the bank (a dump, a temporary file of an interrupted write) and password
    files in the temporary root."""
    bank = [str(p) for p in (root / "bank").rglob("*") if p.is_file()]
    temp = [str(p) for p in Path(tempfile.gettempdir()).glob("karbor-pgpass-*")]
    return bank + temp


async def _recovered_clean(root: Path, cluster: PgCluster, checkpoint: str) -> None:
    """``recover`` fails the run (the cut died with its process), deletes what it saved,
    and nothing is left: no session of ours on the server, no file."""
    done = await _cli(root, "recover", "--secrets-file", "secrets.toml", "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    listed = await _cli(root, "checkpoints", "list", "--all", "--json")
    statuses = {c["id"]: c["status"] for c in json.loads(listed.stdout)["checkpoints"]}
    runs = json.loads((await _cli(root, "runs", "list", "--json")).stdout)["runs"]
    protect = [r for r in runs if r["run_id"] == checkpoint]
    assert protect and protect[0]["status"] == "failed", runs
    assert statuses.get(checkpoint) in ("error", "deleted"), statuses
    deletes = [r for r in runs if r["operation"] == "delete"]
    assert deletes and all(r["status"] == "succeeded" for r in deletes), runs
    for kind in ("cut", "dump", "restore", "check"):
        assert await _sessions(cluster, kind) == [], kind
    assert await anyio.to_thread.run_sync(_leftovers, root) == []


async def test_killed_during_the_cut_recover_fails_it_and_leaves_nothing(
    pg_cluster: PgCluster, db: str, tmp_path: Path
) -> None:
    """SIGKILL of `protect` while its cut holds the exported snapshot (proven: the mark,
    and the exporting session idle in its transaction): the server ends that session
    with the process; `recover` fails the run and cleans up; nothing is left."""
    _write_plan(tmp_path, pg_cluster, db)
    mark = tmp_path / "cut.mark"
    proc = await _spawn(
        tmp_path, "protect", "plan.toml", "--secrets-file", "secrets.toml", hold_cut=mark
    )

    async def cut_held() -> bool:
        assert proc.returncode is None, "the command ended before its cut"
        held = [s for s in await _sessions(pg_cluster, "cut") if s["state"] != "active"]
        return bool(held) and await anyio.Path(mark).exists()

    try:
        await _until(cut_held, 30)
    finally:
        await _kill(proc)
    checkpoint = await anyio.Path(mark).read_text()
    await _gone(pg_cluster, "cut", within=10)
    await _recovered_clean(tmp_path, pg_cluster, checkpoint)


async def test_killed_during_the_copy_recover_fails_it_and_leaves_nothing(
    pg_cluster: PgCluster, db: str, tmp_path: Path, side_locked: Any
) -> None:
    """SIGKILL of `protect` while pg_dump copies (proven: it holds the snapshot and
    waits on a lock; the export is already closed): the orphaned pg_dump ends once it
    can write (its pipe's reader is gone); `recover` does not resume the copy (it would
    copy a later state) but fails the run and deletes what was saved, the interrupted
    write included; nothing is left."""
    _write_plan(tmp_path, pg_cluster, db)
    proc = await _spawn(tmp_path, "protect", "plan.toml", "--secrets-file", "secrets.toml")
    try:
        session = await _dump_waiting(pg_cluster, lambda: proc.returncode)
        assert session["backend_xmin"] is not None
        await _gone(pg_cluster, "cut", within=5)  # the export closed: pg_dump holds it
        mine = session["application_name"]
        assert len(await anyio.to_thread.run_sync(_pg_dump_processes, mine)) == 1
    finally:
        await _kill(proc)
    await side_locked.release()
    await _gone(pg_cluster, "dump", within=10)

    async def dump_ended() -> bool:
        return not await anyio.to_thread.run_sync(_pg_dump_processes, mine)

    await _until(dump_ended, 10)
    listed = await _cli(tmp_path, "checkpoints", "list", "--all", "--json")
    [checkpoint] = [c["id"] for c in json.loads(listed.stdout)["checkpoints"]]
    await _recovered_clean(tmp_path, pg_cluster, checkpoint)
