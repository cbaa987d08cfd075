"""The SIMULATED cloud's shared state: processes see one cloud, and it outlives them.

Two processes share one state directory; a server one freezes is frozen for the
other; a process killed with SIGKILL leaves its servers frozen in the state and
``simcloud show`` names it; fault rules from the command line, a plan file and
the state fire in the hooks they name; snapshot names are deterministic; the
array stamps a snapshot on its own clock.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import structlog
from typer.testing import CliRunner

from karbor_async import Engine, Hook, Plan, RunError
from karbor_async._cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_OK, app

sim = pytest.importorskip("karbor_simcloud")

PROJECT = "OS::Keystone::Project"
VOLUME = "OS::Cinder::Volume"
SERVER = "OS::Nova::Server"
KARBOR = str(Path(sys.executable).parent / "karbor-async")
PLAN = f"""\
name = "app"
barrier = "cut"
resources = [{{ type = "{PROJECT}", id = "prj-0000001" }}]

[timeouts]
hook = 30
"""

HOLDER = """\
import sys, anyio
from pathlib import Path
from karbor_simcloud import SimCloud

cloud, _ = SimCloud.shared(Path(sys.argv[1]), 12, 3)
server = sorted(cloud.servers)[0]

async def main() -> None:
    await cloud.quiesce(server, by="holder")
    print("frozen", server, flush=True)
    for line in sys.stdin:
        if line.strip() == "frozen?":
            print(await cloud.state.is_frozen(server), flush=True)

anyio.run(main)
"""


@pytest.fixture(autouse=True)
def _keep_structlog() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def _holder(state: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(state)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    assert line[:1] == ["frozen"], line
    return proc, line[1]


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.communicate()  # (closes its pipes)


def _cli(root: Path, *args: str, code: int = EXIT_OK, data: bool = False) -> Any:
    """Run the CLI in-process; ``data``: its output is records (events hold tracebacks)."""
    env = {
        "KARBOR_DB": str(root / "karbor.db"),
        "KARBOR_BANK": str(root / "bank"),
        "KARBOR_SIMCLOUD": None,
        "KARBOR_SIMCLOUD_STATE": None,
        "COLUMNS": "200",
    }
    result = CliRunner().invoke(app, list(args), env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if not data:
        assert "Traceback" not in result.output
    assert result.exit_code == code, (result.exit_code, result.output)
    return result


def _protect(root: Path, *args: str, code: int = EXIT_OK) -> Any:
    """``protect plan.toml`` on the 12-resource SIMULATED cloud (zero latency)."""
    plan = str(root / "plan.toml")
    return _cli(root, "protect", plan, "--simcloud", "12:3:zero", "--plain", *args, code=code)


def _show(root: Path) -> dict[str, Any]:
    out = _cli(root, "simcloud", "show", "--json").stdout
    doc: dict[str, Any] = json.loads(out)
    return doc


@pytest.mark.slow
async def test_a_server_frozen_by_one_process_is_frozen_for_another(tmp_path: Path) -> None:
    """Process A freezes a server; this process sees it frozen (its quiesce is a no-op),
    thaws it, and A then sees it thawed: one state, atomic across processes."""
    state = tmp_path / "simcloud"
    proc, server = _holder(state)
    try:
        cloud, created = sim.SimCloud.shared(state, 12, 3)
        assert not created  # A created it
        assert cloud.servers[server].frozen
        assert await cloud.state.is_frozen(server)
        again = await cloud.quiesce(server)
        assert again.freezes == 0  # someone else's freeze: not this process's
        [row] = cloud.state.view().frozen
        assert (row.server_id, row.by, row.pid, row.alive) == (server, "holder", proc.pid, True)
        assert await cloud.thaw(server)
        assert not await cloud.thaw(server)  # thawed already: a no-op
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("frozen?\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "False"
        cloud.state.close()
    finally:
        _stop(proc)


def test_a_process_killed_while_frozen_leaves_the_server_frozen_and_named(tmp_path: Path) -> None:
    """SIGKILL while a server is frozen: the state still has it frozen, and `simcloud show`
    names the process that froze it and says it is gone."""
    proc, server = _holder(tmp_path / "simcloud")
    proc.send_signal(signal.SIGKILL)
    _stop(proc)
    doc = _show(tmp_path)
    [row] = doc["frozen"]
    assert row["server_id"] == server and row["by"] == "holder"
    assert row["pid"] == proc.pid and row["alive"] is False
    text = _cli(tmp_path, "simcloud", "show").stdout
    assert server in text and "holder" in text and "gone (no longer running)" in text


@pytest.mark.slow
def test_a_crashed_protect_leaves_frozen_servers_a_later_process_can_thaw(tmp_path: Path) -> None:
    """The CLI on the shared state: a protect killed during its cuts leaves its servers
    frozen by that run; the state outlives it and the next process thaws them."""
    (tmp_path / "plan.toml").write_text(PLAN)
    proc = subprocess.Popen(
        [KARBOR, "protect", "plan.toml", "--simcloud", "12:3:slow"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "KARBOR_SIMCLOUD": "", "KARBOR_DB": "", "KARBOR_BANK": ""},
    )
    try:
        deadline = time.monotonic() + 20
        frozen: list[Any] = []
        while time.monotonic() < deadline and not frozen:
            time.sleep(0.1)
            if (tmp_path / "simcloud" / "simcloud.db").exists():
                frozen = _show(tmp_path)["frozen"]
        assert frozen, "no server was frozen"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    doc = _show(tmp_path)
    assert doc["frozen"] and all(r["alive"] is False for r in doc["frozen"])
    assert all(f"pid {proc.pid} run " in r["by"] for r in doc["frozen"])

    async def thaw_all() -> int:
        cloud, _ = sim.SimCloud.shared(tmp_path / "simcloud", 12, 3)
        try:
            return sum([await cloud.thaw(r["server_id"]) for r in doc["frozen"]])
        finally:
            cloud.state.close()

    assert anyio.run(thaw_all) == len(doc["frozen"])
    assert _show(tmp_path)["frozen"] == []


def _failed_hooks(root: Path) -> set[tuple[str, str]]:
    runs = json.loads(_cli(root, "runs", "list", "--json").stdout)["runs"]
    events = _cli(root, "events", runs[0]["run_id"], "--json", data=True).stdout.splitlines()
    failed = set()
    for line in events:
        e = json.loads(line)
        if e["kind"] == "failed":
            failed.add((e["resource"][0], e["hook"]))
    return failed


@pytest.mark.parametrize("action", ["raise", "hang"])
def test_command_line_faults_fire_in_the_hooks_they_name(tmp_path: Path, action: str) -> None:
    """--simcloud-fault protect:on_main:VOLUME:raise (or hang, until the hook's limit)
    fails exactly the volumes' on_main."""
    (tmp_path / "plan.toml").write_text(PLAN.replace("hook = 30", "hook = 0.5"))
    rule = f"protect:on_main:{VOLUME}:{action}"
    result = _protect(tmp_path, "--simcloud-fault", rule, code=EXIT_FAILED)
    said = "simulated fault in protect on_main" if action == "raise" else "timed out after 0.5 s"
    assert said in result.output
    assert _failed_hooks(tmp_path) == {(VOLUME, "on_main")}


def test_plan_file_faults_and_stored_faults_fire(tmp_path: Path) -> None:
    """A plan's sim_faults under a type fails that type's hook; a rule stored with
    `simcloud fault add` fails every later process until `simcloud fault clear`."""
    plan = tmp_path / "plan.toml"
    plan.write_text(
        PLAN + f'\n[parameters."{SERVER}"]\nsim_faults = ["protect:on_prepare_begin:raise"]\n'
    )
    _protect(tmp_path, code=EXIT_FAILED)
    assert _failed_hooks(tmp_path) == {(SERVER, "on_prepare_begin")}

    plan.write_text(PLAN)
    _cli(tmp_path, "simcloud", "fault", "add", f"protect:on_complete:{VOLUME}:raise")
    assert _show(tmp_path)["faults"] == [f"protect:on_complete:{VOLUME}:raise"]
    _protect(tmp_path, code=EXIT_FAILED)
    assert _failed_hooks(tmp_path) == {(VOLUME, "on_complete")}
    _cli(tmp_path, "simcloud", "fault", "clear")
    _protect(tmp_path)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--simcloud-fault", "protect:on_main:raise"), "no TYPE"),
        (("--simcloud-fault", f"protect:main:{VOLUME}:raise"), "unknown hook 'main'"),
        (("--simcloud-fault", f"backup:on_main:{VOLUME}:raise"), "unknown operation"),
        (("--simcloud-fault", f"protect:on_main:{VOLUME}:explode"), "unknown action"),
        (("--simcloud-fault", f"protect:on_main:{VOLUME}:raise:2"), "not within [0, 1]"),
    ],
)
def test_bad_fault_rules_are_bad_input(tmp_path: Path, args: tuple[str, ...], needle: str) -> None:
    """A fault rule that does not parse is bad input naming the part and the syntax."""
    (tmp_path / "plan.toml").write_text(PLAN)
    result = _protect(tmp_path, *args, code=EXIT_BAD_INPUT)
    assert needle in result.output and "OPERATION:HOOK:TYPE[#ID]" in result.output


def test_a_bad_plan_fault_and_another_application_are_bad_input(tmp_path: Path) -> None:
    """A plan's malformed sim_faults, or a --simcloud that is not the state's application,
    stop before anything runs, naming the fix."""
    plan = tmp_path / "plan.toml"
    plan.write_text(PLAN + f'\n[parameters."{VOLUME}"]\nsim_faults = ["protect:on_main"]\n')
    bad = _cli(tmp_path, "protect", str(plan), "--simcloud", "12:3:zero", code=EXIT_BAD_INPUT)
    assert "sim_faults" in bad.output or "fault rule" in bad.output
    plan.write_text(PLAN)
    other = _cli(tmp_path, "protect", str(plan), "--simcloud", "20:3:zero", code=EXIT_BAD_INPUT)
    assert "another application" in other.output and "--simcloud-state" in other.output
    none = _cli(tmp_path, "simcloud", "show", "--simcloud-state", str(tmp_path / "x"), code=2)
    assert "no simulated cloud state" in none.output


async def test_snapshot_names_come_from_the_checkpoint_and_a_delete_finds_them() -> None:
    """A cut's snapshot is named after the checkpoint and the volume; a delete removes it
    without saved info, and deleting a checkpoint whose cut never happened is a no-op."""
    cloud = sim.SimCloud.generate(12, seed=3)
    async with Engine(sim.all_protections(cloud), sim.all_protectables(cloud), discover=False) as e:
        plan = Plan(
            "app",
            cloud.project_resources(),
            parameters={VOLUME: {"keep_snapshot": True}},
        )
        outcome = await e.protect(plan)
        volumes = [k for k in outcome.resources if k[0] == VOLUME]
        names = {sim.snapshot_name(outcome.checkpoint_id, v) for _t, v in volumes}
        assert {s.id for s in cloud.storage.live_snapshots()} == names
        await e.delete(outcome.checkpoint_id)
        assert cloud.storage.live_snapshots() == []

        cloud.faults.add(sim.FaultRule(hook=Hook.PREPARE_BEGIN, resource_type=SERVER))
        with pytest.raises(RunError) as caught:
            await e.protect(Plan("app", cloud.project_resources()))
        failed = caught.value.outcome.checkpoint_id
        cloud.faults.clear()
        deleted = await e.delete(failed)  # no cut was ever taken: nothing to remove
        assert deleted.status.value == "succeeded"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_array_stamps_a_snapshot_on_its_own_clock() -> None:
    """taken_at is the request time plus the sampled delay, however late the loop resumes
    the call (a blocked loop does not bunch the instants)."""
    latency = sim.LatencyProfile(snapshot=sim.Latency.fixed(0.01))
    cloud = sim.SimCloud.generate(12, seed=3, latency=latency)
    volume = sorted(cloud.volumes)[0]
    records = []

    async def take() -> None:
        records.append(await cloud.storage.snapshot(volume))

    async with anyio.create_task_group() as tg:
        tg.start_soon(take)
        await anyio.lowlevel.checkpoint()
        time.sleep(0.1)  # noqa: ASYNC251 (the point: the loop is held while the delay runs out)
    [record] = records
    assert record.taken_at == record.requested_at + record.delay
    assert record.delay == pytest.approx(0.01)
    assert record.returned_at is not None and record.returned_at - record.requested_at >= 0.1


@pytest.mark.slow
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_two_protects_never_freeze_one_resource() -> None:
    """While one protect holds its servers and volumes, another over them fails before any
    hook with ResourceBusyError naming the resource and the run; with timeouts.lease_wait
    it waits for the first to give them back, then runs."""
    from karbor_async import Timeouts
    from karbor_async.exceptions import ResourceBusyError

    cloud = sim.SimCloud.generate(12, seed=3)
    slow = {SERVER: {"sim_latency": 0.3}}
    async with Engine(sim.all_protections(cloud), sim.all_protectables(cloud), discover=False) as e:
        outcomes: list[Any] = []

        async def first() -> None:
            outcomes.append(await e.protect(Plan("a", cloud.project_resources(), parameters=slow)))

        async with anyio.create_task_group() as tg:
            tg.start_soon(first)
            with anyio.fail_after(10):
                while not await e.store.list_runs():  # noqa: ASYNC110 (polling the store)
                    await anyio.sleep(0.01)  # the first run exists: its leases are taken
            with pytest.raises(ResourceBusyError) as busy:
                await e.protect(Plan("b", cloud.project_resources()))
            assert busy.value.resource[0] in (SERVER, VOLUME)
            assert "two runs never freeze or cut one resource" in str(busy.value)
            waited = await e.protect(
                Plan("b", cloud.project_resources(), timeouts=Timeouts(lease_wait=30))
            )
            assert waited.status.value == "succeeded"
        [a] = outcomes
        for key, r in a.resources.items():
            if key[0] == SERVER:  # b froze each server only after a had thawed it
                b = waited.resources[key]
                assert r.thawed_at is not None and b.quiesced_at is not None
                assert b.quiesced_at > r.thawed_at
