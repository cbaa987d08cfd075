"""`kill -9` of the CLI at five points, then `recover` and `protect` with the defaults.

Each trial runs the real command line on a 200-resource SIMULATED cloud in its
shared state, holds the run at one point with a hanging fault on one resource
(the state records where the fault fired, so the point reached is checked, not
guessed), kills the process with SIGKILL, and then, as an operator would, runs
`karbor-async recover` (default engine options) and the next command on the
same store. Recovery must end within 30 s with the documented exit code, leave
nothing frozen, leave no snapshot that does not belong to an available
checkpoint, and leave a checkpoint that restores (or, for a protect whose cuts
were not all committed, none, and the next protect's restores).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

sim = pytest.importorskip("karbor_simcloud")
pytestmark = pytest.mark.slow  # every trial runs and kills CLIs: 5 to 20 s each

N, SEED = 200, 11
SIM = f"{N}:{SEED}:zero"
KARBOR = str(Path(sys.executable).parent / "karbor-async")
PROJECT = "OS::Keystone::Project"
SERVER = "OS::Nova::Server"
VOLUME = "OS::Cinder::Volume"
PLAN = f"""\
name = "app"
barrier = "cut"
resources = [{{ type = "{PROJECT}", id = "prj-0000001" }}]

[timeouts]
hook = 120
"""

_CLOUD = sim.SimCloud.generate(N, SEED)
_SERVERS = sorted(_CLOUD.servers)


def _server(trial: int) -> str:
    return str(_SERVERS[(trial * 7) % len(_SERVERS)])


def _volume(trial: int) -> str:
    return str(_CLOUD.servers[_server(trial)].volume_ids[0])


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KARBOR_")}
    env.update(KARBOR_DB=str(root / "karbor.db"), KARBOR_BANK=str(root / "bank"), COLUMNS="200")
    return env


def _spawn(root: Path, *args: str) -> subprocess.Popen[bytes]:
    """``karbor-async ARGS`` in the background, its output discarded."""
    return subprocess.Popen(
        [KARBOR, *args],
        cwd=root,
        env=_env(root),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _run(root: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [KARBOR, *args],
        cwd=root,
        env=_env(root),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _json(root: Path, *args: str) -> Any:
    done = _run(root, *args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _state(root: Path) -> Any:
    shared, _ = sim.SharedState.open(root / "simcloud")
    try:
        return shared.view()
    finally:
        shared.close()


def _kill_when_fired(root: Path, args: list[str], hook: str, resource: str, extra: Any) -> None:
    """Start ``karbor-async ARGS``; SIGKILL it once the fault fired at ``resource``'s
    ``hook`` and ``extra(view)`` holds (the point is reached), within 60 s."""
    proc = _spawn(root, *args)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"the command ended ({proc.returncode}) before the point"
            assert time.monotonic() < deadline, "the point was not reached in 60 s"
            time.sleep(0.05)
            if not (root / "simcloud" / "simcloud.db").exists():
                continue
            view = _state(root)
            hit = any(f.hook == hook and f.resource == resource for f in view.fired)
            if hit and extra(view):
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def _checkpoints(root: Path) -> dict[str, str]:
    listed = _json(root, "checkpoints", "list", "--all")["checkpoints"]
    return {c["id"]: c["status"] for c in listed}


def _stored(root: Path, run_id: str) -> Any:
    """The run's record as stored (read with the library, as another program would)."""
    import anyio

    from karbor_async import SqliteStore

    async def read() -> Any:
        async with SqliteStore.open(root / "karbor.db") as store:
            return await store.get_run(run_id), await store.read_events(run_id)

    return anyio.run(read)


def _recover(root: Path) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    done = _run(root, "recover", "--simcloud", SIM, timeout=30)
    assert time.monotonic() - started < 30
    return done


def _nothing_frozen_and_no_orphaned_snapshot(root: Path) -> None:
    view = _state(root)
    assert view.frozen == (), view.frozen
    available = {c for c, s in _checkpoints(root).items() if s == "available"}
    orphans = [s for s in view.snapshots if s.checkpoint_id not in available]
    assert orphans == [], orphans


def _restores(root: Path, checkpoint: str) -> None:
    done = _run(root, "restore", checkpoint, "--simcloud", SIM, "--plain")
    assert done.returncode == 0, done.stdout + done.stderr


Point = tuple[str, Callable[[int], str], Callable[[Any], object], int]
POINTS: dict[str, Point] = {
    # point: (the fault's hook, resource of the trial, more that must hold, recover's exit)
    "quiesce": ("on_prepare_begin", lambda t: f"{SERVER}#{_server(t)}", lambda v: v.frozen, 1),
    "between_cuts": (
        "on_prepare_finish",
        lambda t: f"{VOLUME}#{_volume(t)}",
        lambda v: v.frozen and v.snapshots,
        1,
    ),
    "main": ("on_main", lambda t: f"{VOLUME}#{_volume(t)}", lambda v: not v.frozen, 0),
    "complete": ("on_complete", lambda t: f"{VOLUME}#{_volume(t)}", lambda v: not v.frozen, 0),
}


@pytest.mark.parametrize("trial", [0, 1, 2])
@pytest.mark.parametrize("point", sorted(POINTS))
def test_a_protect_killed_at_a_point_recovers_with_the_defaults(
    tmp_path: Path, point: str, trial: int
) -> None:
    """Killed during a quiesce or between cuts: recover exits 1 (the checkpoint is lost and
    cleaned up: its snapshots deleted) and the next protect's checkpoint restores. Killed
    in main or complete: recover exits 0 and the checkpoint is available and restores."""
    (tmp_path / "plan.toml").write_text(PLAN)
    hook, resource, reached, expected = POINTS[point]
    fault = f"protect:{hook}:{resource(trial)}:hang"
    args = ["protect", "plan.toml", "--simcloud", SIM, "--simcloud-fault", fault, "--plain"]
    _kill_when_fired(tmp_path, args, hook, resource(trial), reached)
    [(checkpoint, status)] = _checkpoints(tmp_path).items()
    assert status == "protecting"
    # Committed before any cut: which resources may have cut (even with no CUT recorded).
    events = _run(tmp_path, "events", checkpoint, "--json").stdout.splitlines()
    intents = [json.loads(e) for e in events if '"cut_intent"' in e]
    assert [_volume(trial)] == [
        rid for i in intents for t, rid in i["data"]["resources"] if rid == _volume(trial)
    ]

    started = time.time()
    done = _recover(tmp_path)
    assert done.returncode == expected, done.stdout + done.stderr
    assert checkpoint in done.stdout
    _nothing_frozen_and_no_orphaned_snapshot(tmp_path)
    # The recovered outcome tells the truth: the first start, a duration across the
    # crash, the committed instants (skew from the committed CUT events).
    record, events = _stored(tmp_path, checkpoint)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))  # the log is intact
    o = record.outcome
    assert o.recovered and o.started_wall == record.started_wall < started
    assert o.duration == pytest.approx(o.ended_wall - o.started_wall)
    cuts = {e.resource: e.data["at"] for e in events if e.kind.value == "cut"}
    if expected == 0:
        assert {k: r.cut_at for k, r in o.resources.items() if r.cut_at is not None} == cuts
        assert o.skew == pytest.approx(max(cuts.values()) - min(cuts.values()))
    else:
        thawed = [r for r in o.resources.values() if r.window_approximate]
        assert thawed and all(r.quiesce_window is not None for r in thawed)
    if expected == 0:
        assert _checkpoints(tmp_path)[checkpoint] == "available"
        _restores(tmp_path, checkpoint)
        again = _run(tmp_path, "protect", "plan.toml", "--simcloud", SIM)
        assert again.returncode == 0, again.stdout + again.stderr
    else:
        assert "is lost" in done.stdout
        assert _checkpoints(tmp_path)[checkpoint] != "available"
        assert not any(s.checkpoint_id == checkpoint for s in _state(tmp_path).snapshots)
        again = _run(tmp_path, "protect", "plan.toml", "--simcloud", SIM, "--json")
        assert again.returncode == 0, again.stderr
        _restores(tmp_path, json.loads(again.stdout)["outcome"]["checkpoint_id"])
    _nothing_frozen_and_no_orphaned_snapshot(tmp_path)


@pytest.mark.parametrize("trial", [0, 1, 2])
def test_a_restore_killed_midway_resumes_and_creates_nothing_twice(
    tmp_path: Path, trial: int
) -> None:
    """A restore killed while a server is being recreated: recover resumes it, adopting
    what was created before the kill; each original is recreated exactly once."""
    (tmp_path / "plan.toml").write_text(PLAN)
    protected = _run(tmp_path, "protect", "plan.toml", "--simcloud", SIM, "--json")
    assert protected.returncode == 0, protected.stderr
    checkpoint = json.loads(protected.stdout)["outcome"]["checkpoint_id"]
    resource = f"{SERVER}#{_server(trial)}"
    fault = f"restore:on_complete:{resource}:hang"
    args = ["restore", checkpoint, "--simcloud", SIM, "--simcloud-fault", fault, "--plain"]
    _kill_when_fired(tmp_path, args, "on_complete", resource, lambda v: v.created)
    made_before = len(_state(tmp_path).created)
    assert made_before > 0

    done = _recover(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    created = _state(tmp_path).created
    origins = [(c.kind, c.origin_checkpoint, c.origin_id) for c in created]
    assert len(origins) == len(set(origins))  # nothing recreated twice
    assert len(created) == N - 1  # every resource but the project (mapped, not created)
    _nothing_frozen_and_no_orphaned_snapshot(tmp_path)


def _held_in_a_quiesce(root: Path) -> subprocess.Popen[bytes]:
    """A protect of the plan, held with one server's quiesce hanging (others frozen)."""
    (root / "plan.toml").write_text(PLAN)
    fault = f"protect:on_prepare_begin:{SERVER}#{_server(0)}:hang"
    proc = _spawn(root, "protect", "plan.toml", "--simcloud", SIM, "--simcloud-fault", fault)
    try:
        deadline = time.monotonic() + 60
        while not ((root / "simcloud" / "simcloud.db").exists() and _state(root).fired):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc


def test_two_clis_never_protect_one_resource_at_once(tmp_path: Path) -> None:
    """A second protect of overlapping resources, while the first holds them frozen, exits
    4 naming the resource and the holding run, having frozen nothing; once the first is
    killed, the next protect takes its run over (thaws, cleans up) and runs."""
    proc = _held_in_a_quiesce(tmp_path)
    try:
        second = _run(tmp_path, "protect", "plan.toml", "--simcloud", SIM)
        assert second.returncode == 4, second.stdout + second.stderr
        [(first, _)] = _checkpoints(tmp_path).items()
        assert f"is held by run {first}" in second.stderr
        # It froze nothing: every frozen server is the first run's (which goes on freezing).
        frozen = _state(tmp_path).frozen
        assert frozen and all(f"pid {proc.pid} run {first}" in (r.by or "") for r in frozen)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    third = _run(tmp_path, "protect", "plan.toml", "--simcloud", SIM, "--plain")
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"recovered protect run {first}" in third.stdout
    _nothing_frozen_and_no_orphaned_snapshot(tmp_path)


def _two_prunes(root: Path) -> list[Any]:
    root.mkdir()
    slow = f'\n[parameters."{VOLUME}"]\nsim_latency = 0.1\n'
    (root / "plan.toml").write_text(PLAN + slow)
    for _ in range(3):
        done = _run(root, "protect", "plan.toml", "--simcloud", "12:3:zero")
        assert done.returncode == 0, done.stderr
    prune = [KARBOR, "checkpoints", "prune", "--plan", "app", "--keep", "0"]
    procs = [
        subprocess.Popen(
            [*prune, "--simcloud", "12:3:zero", "--json"],
            cwd=root,
            env=_env(root),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    docs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stdout + stderr
        docs.append(json.loads(stdout))
    deleted = [cp for doc in docs for cp in doc["deleted"]]
    assert sorted(deleted) == sorted(set(deleted))  # none deleted twice
    assert set(_checkpoints(root).values()) == {"deleted"}
    runs = _json(root, "runs", "list")["runs"]
    assert not [r for r in runs if r["status"] == "running"]
    again = _run(root, "protect", "plan.toml", "--simcloud", "12:3:zero")
    assert again.returncode == 0, again.stdout + again.stderr
    return docs


def test_two_prunes_at_once_delete_each_checkpoint_once(tmp_path: Path) -> None:
    """Two `checkpoints prune --keep 0` at once: each checkpoint is deleted by one of them
    (the other lists it as being deleted by another run), neither fails, no delete run is
    left running, and the next protect runs. (A trial in which the two did not overlap is
    run again, up to three times.)"""
    for trial in range(3):
        docs = _two_prunes(tmp_path / f"trial{trial}")
        if any(doc["in_progress"] for doc in docs):
            return
    pytest.fail(f"the two prunes never overlapped in 3 trials: {docs}")


def test_events_follow_ends_when_the_runs_engine_dies(tmp_path: Path) -> None:
    """`events RUN --follow` notices within seconds that the run's engine was killed: it
    says to run recover and exits 1 (JSON: a last {"follow_ended": "owner_gone"})."""
    proc = _held_in_a_quiesce(tmp_path)
    try:
        [checkpoint] = _checkpoints(tmp_path)
        follower = subprocess.Popen(
            [KARBOR, "events", checkpoint, "--follow", "--json"],
            cwd=tmp_path,
            env=_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.5)
        assert follower.poll() is None  # the engine lives: it keeps following
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    stdout, stderr = follower.communicate(timeout=15)
    assert follower.returncode == 1, stdout + stderr
    last = json.loads(stdout.splitlines()[-1])
    assert last["follow_ended"] == "owner_gone" and last["run_id"] == checkpoint
    assert "karbor-async recover" in stderr


def test_a_store_locked_past_its_busy_timeout_is_busy_not_a_failure(tmp_path: Path) -> None:
    """Another process holding the store's write lock past the busy timeout (10 s): the
    command exits 4 saying the store stayed locked and nothing was written."""
    (tmp_path / "plan.toml").write_text(PLAN)
    done = _run(tmp_path, "protect", "plan.toml", "--simcloud", "12:3:zero")
    assert done.returncode == 0, done.stderr
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sqlite3, sys, time\n"
            "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
            "c.execute('BEGIN IMMEDIATE')\n"
            "print('locked', flush=True)\n"
            "time.sleep(30)\n",
            str(tmp_path / "karbor.db"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        busy = _run(tmp_path, "protect", "plan.toml", "--simcloud", "12:3:zero", timeout=40)
    finally:
        holder.kill()
        holder.communicate()
    assert busy.returncode == 4, busy.stdout + busy.stderr
    assert "stayed locked by another process" in busy.stderr


def test_a_delete_of_a_checkpoint_being_deleted_waits_for_that_run(tmp_path: Path) -> None:
    """`delete C` while another process deletes C starts no second delete: it waits for
    that run and exits with its result."""
    slow = f'\n[parameters."{VOLUME}"]\nsim_latency = 1.0\n'
    (tmp_path / "plan.toml").write_text(PLAN + slow)
    done = _run(tmp_path, "protect", "plan.toml", "--simcloud", "12:3:zero", "--json")
    assert done.returncode == 0, done.stderr
    checkpoint = json.loads(done.stdout)["outcome"]["checkpoint_id"]
    first = _spawn(tmp_path, "delete", checkpoint, "--simcloud", "12:3:zero")
    deadline = time.monotonic() + 30
    while _checkpoints(tmp_path)[checkpoint] != "deleting":
        assert time.monotonic() < deadline and first.poll() is None
        time.sleep(0.05)
    second = _run(tmp_path, "delete", checkpoint, "--simcloud", "12:3:zero")
    assert first.wait(timeout=30) == 0
    assert second.returncode == 0, second.stdout + second.stderr
    assert "is being deleted by run" in second.stdout and "waiting for it" in second.stdout
    deletes = [r for r in _json(tmp_path, "runs", "list")["runs"] if r["operation"] == "delete"]
    assert len(deletes) == 1 and _checkpoints(tmp_path)[checkpoint] == "deleted"


def test_recover_leaves_a_run_a_live_engine_holds_and_exits_4(tmp_path: Path) -> None:
    """While the run's engine lives, `recover` does nothing to it: it names the run, its
    owner and the lease expiry, and exits 4 (JSON: "held")."""
    proc = _held_in_a_quiesce(tmp_path)
    try:
        [checkpoint] = _checkpoints(tmp_path)
        done = _run(tmp_path, "recover", "--simcloud", SIM, "--json")
        held = _run(tmp_path, "recover", "--simcloud", SIM)
        frozen = _state(tmp_path).frozen
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert done.returncode == 4, done.stdout + done.stderr
    doc = json.loads(done.stdout)
    [entry] = doc["held"]
    assert doc["recovered"] == [] and doc["exit_code"] == 4
    assert entry["run_id"] == checkpoint and f":{proc.pid}:" in entry["owner"]
    assert entry["expires"] > time.time() - 60
    assert held.returncode == 4 and f"run {checkpoint} is held by" in held.stdout
    assert frozen  # nothing was thawed under the live engine
