"""`kill -9` of a Temporal worker: the run goes on (or stops cleanly) on the other one.

Real processes from the documented commands: two ``karbor-async worker``
processes on one PostgreSQL store, one Temporal dev server, one shared-state
SIMULATED cloud and one file-system bank; the protect is started with
``karbor-async protect --backend temporal``. The worker running the activity
the test aims at is found in the workflow's pending activities (its identity
is ``pid@host``) and killed with SIGKILL.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from helpers import install_plugin
from pgcluster import PgCluster

sim = pytest.importorskip("karbor_simcloud")
pytest.importorskip("karbor_async.temporal")
from temporalio.client import Client  # noqa: E402

N, SEED = 40, 7
SIM = f"{N}:{SEED}:zero"
PROJECT = "OS::Keystone::Project"
VOLUME = "OS::Cinder::Volume"
HEARTBEAT = 2.0
PLAN = f"""\
name = "app"
barrier = "cut"
resources = [{{ type = "{PROJECT}", id = "prj-0000001" }}]

[timeouts]
hook = 60
"""
CLI = "from karbor_async._cli import main; main()"
BEAT = ["--heartbeat-timeout", str(HEARTBEAT)]
PROTECT = [sys.executable, "-c", CLI, "protect", "plan.toml", "--backend", "temporal"]


def _env(
    root: Path, url: str, password: str, extra: dict[str, str] | None = None
) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KARBOR_")}
    env.update(KARBOR_STORE=url, PGPASSWORD=password, KARBOR_BANK=str(root / "bank"))
    env.update(KARBOR_SIMCLOUD_STATE=str(root / "simcloud"), COLUMNS="200")
    env.update(extra or {})
    if "SAFETY_FROZEN" in env:
        del env["KARBOR_SIMCLOUD_STATE"]  # (no simulated cloud there)
    return env


@contextmanager
def _workers(
    root: Path, env: dict[str, str], address: str, queue: str, *each: list[str]
) -> Iterator[list[subprocess.Popen[str]]]:
    """One worker process per ``each`` (its own extra arguments), each ready (it printed
    its line); stopped (SIGTERM, by pid) at the end."""
    logs = [(root / f"worker{i}.log").open("w") for i in range(len(each))]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                CLI,
                "worker",
                "--temporal",
                address,
                "--task-queue",
                queue,
                *extra,
            ],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        for log, extra in zip(logs, each, strict=True)
    ]
    try:
        for i, p in enumerate(procs):
            assert p.stdout is not None
            line = p.stdout.readline()
            assert "worker ready" in line, (line, (root / f"worker{i}.log").read_text()[-3000:])
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()
        for log in logs:
            log.close()


async def _worker_running(client: Client, run_id: str, activity: str, detail: str = "") -> int:
    """The pid of the worker running ``activity`` of the run's workflow (its input
    containing ``detail``), once Temporal reports it started."""
    handle = client.get_workflow_handle(f"karbor-{run_id}")
    with anyio.fail_after(60):
        while True:
            desc = await handle.describe()
            for pa in desc.raw_description.pending_activities:
                if pa.activity_type.name != activity or not pa.last_worker_identity:
                    continue
                if pa.state != 2:  # PENDING_ACTIVITY_STATE_STARTED
                    continue
                if detail and detail not in str(pa.heartbeat_details) + str(pa):
                    continue
                return int(pa.last_worker_identity.split("@")[0])
            await anyio.sleep(0.1)


def _start_protect(root: Path, env: dict[str, str], address: str, queue: str) -> Any:
    (root / "plan.toml").write_text(PLAN)
    return subprocess.Popen(
        [*PROTECT, "--temporal", address, "--task-queue", queue, *BEAT, "--json"],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def _run_id(client: Client, queue: str) -> str:
    """The run the protect started (its workflow is the only one on ``queue``)."""
    with anyio.fail_after(60):
        while True:
            async for wf in client.list_workflows(f"TaskQueue = '{queue}'"):
                return wf.id.removeprefix("karbor-")
            await anyio.sleep(0.1)


def test_a_worker_killed_during_main_leaves_the_run_to_the_other(
    tmp_path: Path, temporal_server: str, pg_cluster: PgCluster
) -> None:
    """Worker A hangs in every volume copy it takes (a fault of its own process), B does
    not; A is killed while copies hang there: each is retried on B with attempt 2 and
    adopts what A made; the run succeeds; the cloud holds exactly one snapshot per
    volume of the checkpoint and nothing frozen; the bank holds no temporary object;
    the checkpoint restores."""
    url = pg_cluster.dsn(pg_cluster.create_database("kill"))
    cloud, _ = sim.SimCloud.shared(tmp_path / "simcloud", N, SEED)
    cloud.state.close()
    env = _env(tmp_path, url, pg_cluster.password)
    queue = "kill-main"
    hang = ["--simcloud-fault", f"protect:on_main:{VOLUME}:hang"]
    with _workers(
        tmp_path, env, temporal_server, queue, ["--simcloud", SIM, *hang], ["--simcloud", SIM]
    ) as procs:
        a, b = procs
        protect = _start_protect(tmp_path, env, temporal_server, queue)

        async def kill() -> tuple[str, set[str]]:
            client = await Client.connect(temporal_server)
            run_id = await _run_id(client, queue)
            shared, _ = sim.SharedState.open(tmp_path / "simcloud")
            try:
                with anyio.fail_after(60):
                    while True:  # A's copies hang, B's finish: wait until only A's are left
                        fired = {f.resource for f in shared.view().fired if f.hook == "on_main"}
                        desc = await client.get_workflow_handle(f"karbor-{run_id}").describe()
                        hooks = [
                            x
                            for x in desc.raw_description.pending_activities
                            if x.activity_type.name == "karbor-hook"
                        ]
                        if fired and len(hooks) == len(fired):
                            break
                        await anyio.sleep(0.1)
            finally:
                shared.close()
            os.kill(a.pid, signal.SIGKILL)
            return run_id, {r.partition("#")[2] for r in fired}

        run_id, hung = anyio.run(kill)
        out, err = protect.communicate(timeout=120)
        assert protect.returncode == 0, out + err
        assert a.poll() is not None and b.poll() is None
    outcome = json.loads(out)["outcome"]
    assert outcome["run_id"] == run_id and outcome["status"] == "succeeded"
    by_id = {r["resource"]["id"]: r for r in outcome["resources"]}
    assert hung and {rid for rid, r in by_id.items() if r["attempt"] == 2} == hung
    assert all(r["attempt"] == 1 for rid, r in by_id.items() if rid not in hung)
    shared, _ = sim.SharedState.open(tmp_path / "simcloud")
    try:
        view = shared.view()
    finally:
        shared.close()
    assert view.frozen == ()
    # Every snapshot ever taken (the copies' on_complete deleted them, as they should):
    # one per volume of the checkpoint, none taken twice, none left.
    with sqlite3.connect(tmp_path / "simcloud" / "simcloud.db") as conn:
        rows = conn.execute("SELECT volume_id, checkpoint_id, deleted FROM snapshots").fetchall()
    volumes = {r["resource"]["id"] for r in by_id.values() if r["resource"]["type"] == VOLUME}
    assert sorted(v for v, _c, _d in rows) == sorted(volumes)
    assert {c for _v, c, _d in rows} == {run_id} and all(d for _v, _c, d in rows)
    assert view.snapshots == ()
    assert not [p for p in (tmp_path / "bank").rglob("*") if ".tmp" in p.name]
    restore = subprocess.run(
        [sys.executable, "-c", CLI, "restore", run_id, "--simcloud", SIM, "--plain"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert restore.returncode == 0, restore.stdout + restore.stderr


SAFETY_ENTRY = "[karbor_async.protections]\nsafety = safety_plugin:PLUGIN\n"


def test_killing_the_prepare_worker_while_frozen_leaves_nothing_frozen(
    tmp_path: Path, temporal_server: str, pg_cluster: PgCluster
) -> None:
    """The worker running a group's prepare is killed with the resource frozen (its
    quiesce hangs): its sentinel runs the safety thaw; the workflow's compensation
    finds nobody on that worker's queue, records that the sentinel thawed, and ends
    the run failed on the other worker."""
    url = pg_cluster.dsn(pg_cluster.create_database("killprep"))
    source = (Path(__file__).parent / "safetyplugin.py").read_text() + "\nPLUGIN = SafetyPlugin()\n"
    site = install_plugin(tmp_path, "safety", source, SAFETY_ENTRY)
    frozen = tmp_path / "FROZEN"
    env = _env(
        tmp_path,
        url,
        pg_cluster.password,
        {
            "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "SAFETY_FROZEN": str(frozen),
            "SAFETY_HANG": "1",
        },
    )
    (tmp_path / "plan.toml").write_text(
        'name = "db"\nresources = [{ type = "Test::Db", id = "d1" }]\n[timeouts]\nhook = 60\n'
    )
    queue = "kill-prepare"
    with _workers(tmp_path, env, temporal_server, queue, [], []) as procs:
        protect = subprocess.Popen(
            [*PROTECT, "--temporal", temporal_server, "--task-queue", queue, *BEAT, "--json"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

        async def kill() -> str:
            client = await Client.connect(temporal_server)
            run_id = await _run_id(client, queue)
            pid = await _worker_running(client, run_id, "karbor-prepare")
            with anyio.fail_after(30):
                while not frozen.exists():  # noqa: ASYNC110  (another process's file)
                    await anyio.sleep(0.05)
            os.kill(pid, signal.SIGKILL)
            return run_id

        run_id = anyio.run(kill)
        started = time.monotonic()
        while frozen.exists() and time.monotonic() - started < 30:
            time.sleep(0.1)
        assert not frozen.exists(), "the sentinel did not thaw"
        out, err = protect.communicate(timeout=120)
        assert protect.returncode == 1, out + err
        assert sum(p.poll() is None for p in procs) == 1

    doc = json.loads(out)
    assert "outcome" in doc, out + err
    outcome = doc["outcome"]
    assert outcome["run_id"] == run_id and outcome["status"] == "failed"
    assert "sentinel" in outcome["error"]

    async def events() -> list[Any]:
        from karbor_async import PostgresStore

        async with PostgresStore.open(url, password=pg_cluster.password) as store:
            return list(await store.read_events(run_id))

    log = anyio.run(events)
    lost = [e for e in log if e.kind.value == "group_aborting" and e.data.get("thawed_by")]
    assert [e.data["thawed_by"] for e in lost] == ["sentinel"]
    assert [e.seq for e in log] == list(range(1, len(log) + 1))
