"""The simulated cloud (plugins/): generation, dependents, latencies, faults, storage instants,
and protect/restore/delete through the engine. Nothing here asserts a timing."""

from __future__ import annotations

import itertools
import random
from typing import Any

import anyio
import pytest

from karbor_async import (
    AbortReason,
    BarrierPolicy,
    Engine,
    Hook,
    MemoryBank,
    MemoryStore,
    OperationKind,
    Plan,
    Resource,
    ResourceStatus,
    RunError,
    RunStatus,
)
from karbor_simcloud import (
    IMAGE,
    NETWORK,
    PROJECT,
    SERVER,
    VOLUME,
    FaultAction,
    FaultRule,
    Latency,
    LatencyProfile,
    NoCloudError,
    SimCloud,
    SimulatedFault,
    all_protectables,
    all_protections,
    content_digest,
    current_cloud,
    set_cloud,
    use_cloud,
)
from karbor_simcloud.direct import DirectGraph, DirectRunner

PB, PF, MAIN, CP = Hook.PREPARE_BEGIN, Hook.PREPARE_FINISH, Hook.MAIN, Hook.COMPLETE


def structure(cloud: SimCloud) -> list[Any]:
    return [
        sorted(cloud.networks),
        sorted(cloud.images),
        sorted((v.id, tuple(v.attached_to)) for v in cloud.volumes.values()),
        sorted(
            (s.id, s.image_id, tuple(s.volume_ids), tuple(s.network_ids))
            for s in cloud.servers.values()
        ),
    ]


async def graph_of(cloud: SimCloud) -> DirectGraph:
    return await DirectGraph.discover(cloud.project_resources(), all_protectables(cloud))


def app_plan(cloud: SimCloud, barrier: BarrierPolicy) -> Plan:
    # Keyword arguments through a dict: mypy cannot solve Plan's attrs converter (tuple)
    # for a typed argument.
    args: dict[str, Any] = {"resources": cloud.project_resources(), "barrier": barrier}
    return Plan(name="sim-app", **args)


def runner_for(cloud: SimCloud) -> DirectRunner:
    return DirectRunner(all_protections(cloud), MemoryBank())


# -- generation ---------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 10, 57, 1000])
def test_generate_makes_exactly_n_resources(n: int) -> None:
    """generate(n) builds an application of exactly n resources, whatever n is."""
    assert SimCloud.generate(n, seed=7).stats()["total"] == n


def test_generate_is_deterministic_per_seed() -> None:
    """The same seed gives the same application; another seed gives another one."""
    a, b = SimCloud.generate(500, seed=11), SimCloud.generate(500, seed=11)
    assert structure(a) == structure(b)
    assert structure(a) != structure(SimCloud.generate(500, seed=12))


def test_generate_shape() -> None:
    """Servers have 1-4 volumes and their own image; some volumes are shared; one network each."""
    cloud = SimCloud.generate(2000, seed=3)
    stats = cloud.stats()
    assert stats["servers"] > 0
    assert stats["shared_volumes"] > 0
    images = [s.image_id for s in cloud.servers.values()]
    assert len(set(images)) == len(images) == stats["images"]
    for server in cloud.servers.values():
        assert 1 <= len(server.volume_ids) <= 4
        assert len(set(server.volume_ids)) == len(server.volume_ids)
        assert len(server.network_ids) == 1
        for vid in server.volume_ids:
            assert server.id in cloud.volume(vid).attached_to
    assert all(v.attached_to for v in cloud.volumes.values())


def test_generate_rejects_an_empty_application() -> None:
    with pytest.raises(ValueError, match="at least one"):
        SimCloud.generate(0)


# -- dependents -----------------------------------------------------------------------------


async def test_dependents_follow_karbors_hierarchy() -> None:
    """A project lists servers and networks; a server lists its volumes and its image."""
    cloud = SimCloud.generate(60, seed=5)
    graph = await graph_of(cloud)
    assert len(graph.resources) == 60
    assert len({r.key for r in graph.resources}) == 60
    project = cloud.project_resources()[0]
    kids = {c.type for c in graph.children[project.key]}
    assert kids == {SERVER, NETWORK}
    for server in cloud.servers.values():
        children = graph.children[(SERVER, server.id)]
        assert {c.id for c in children if c.type == VOLUME} == set(server.volume_ids)
        assert [c.id for c in children if c.type == IMAGE] == [server.image_id]
    shared = [v for v in cloud.volumes.values() if len(v.attached_to) > 1]
    for volume in shared:
        assert {p.id for p in graph.parents[(VOLUME, volume.id)]} == set(volume.attached_to)


async def test_project_lists_unattached_volumes_and_unused_images() -> None:
    """Volumes and images no server uses hang under the project, so they are protected too."""
    cloud = SimCloud.generate(10, seed=1)
    project_id = next(iter(cloud.projects))
    loose_volume = cloud.add_volume(project_id)
    loose_image = cloud.add_image(project_id)
    graph = await graph_of(cloud)
    kids = {c.key for c in graph.children[(PROJECT, project_id)]}
    assert (VOLUME, loose_volume.id) in kids
    assert (IMAGE, loose_image.id) in kids
    assert len(graph.resources) == 12


# -- latencies --------------------------------------------------------------------------------


def test_latency_distributions_stay_in_their_support() -> None:
    """Samples are reproducible per seed and fall inside each distribution's support."""
    rng = random.Random(1)
    uniform = Latency.uniform(0.002, 0.004)
    assert all(0.002 <= uniform.sample(rng) <= 0.004 for _ in range(1000))
    assert uniform.spread == pytest.approx(0.002)
    fixed = Latency.fixed(0.01, jitter=0.001)
    assert all(0.01 <= fixed.sample(rng) < 0.011 for _ in range(1000))
    capped = Latency.lognormal(0.02, 1.0, cap=0.05)
    samples = [capped.sample(rng) for _ in range(2000)]
    assert max(samples) == 0.05
    assert 0.01 < sorted(samples)[1000] < 0.04  # the median is near 0.02
    assert Latency.zero().is_zero
    assert LatencyProfile.zero().is_zero
    assert not LatencyProfile.realistic().is_zero
    a = [Latency.lognormal(0.02, 0.5).sample(random.Random(9)) for _ in range(3)]
    assert a[0] == a[1] == a[2]
    with pytest.raises(ValueError, match="low <= high"):
        Latency.uniform(0.2, 0.1)


async def test_zero_latency_hooks_do_not_sleep(virtual_time: bool) -> None:
    """With the zero profile a whole protect never sleeps (on trio's virtual clock, time stands)."""
    cloud = SimCloud.generate(30, seed=2)
    runner = runner_for(cloud)
    graph = await graph_of(cloud)
    start = anyio.current_time()
    await runner.run_one_at_a_time(OperationKind.PROTECT, graph)
    assert len(cloud.storage.snapshots) == len(cloud.volumes)
    assert all(r.delay == 0.0 for r in cloud.storage.snapshots.values())
    if virtual_time:
        assert anyio.current_time() == start


# -- storage instants -------------------------------------------------------------------------


async def test_storage_records_the_instant_of_each_snapshot(virtual_time: bool) -> None:
    """taken_at lies between the call and its return, offset from the call by the sampled delay."""
    latency = LatencyProfile(
        snapshot=Latency.uniform(0.5, 1.0) if virtual_time else Latency.uniform(0.001, 0.003),
        snapshot_return=Latency.fixed(0.2 if virtual_time else 0.001),
    )
    cloud = SimCloud.generate(20, seed=4, latency=latency)
    records = []
    for vid in list(cloud.volumes)[:5]:
        records.append(await cloud.storage.snapshot(vid))
    for record in records:
        assert record.returned_at is not None
        assert record.requested_at <= record.taken_at <= record.returned_at
        assert record.taken_at - record.requested_at >= record.delay * 0.999
        assert latency.snapshot.a <= record.delay <= latency.snapshot.b
        assert record.content == cloud.volume(record.volume_id).content
    assert cloud.storage.get_snapshot(records[0].id) is records[0]
    assert cloud.storage.delete_snapshot(records[0].id)
    assert not cloud.storage.delete_snapshot(records[0].id)
    assert cloud.storage.get_snapshot(records[0].id) is None


async def test_copies_are_bounded_by_the_storage() -> None:
    """No more than max_concurrent_copies copy slots are held at once."""
    cloud = SimCloud(max_concurrent_copies=3)
    active = 0
    peak = 0

    async def copy() -> None:
        nonlocal active, peak
        async with cloud.storage.copy_slot():
            active += 1
            peak = max(peak, active)
            await anyio.sleep(0.01)
            active -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(12):
            tg.start_soon(copy)
    assert peak == cloud.storage.peak_copies == 3
    assert cloud.storage.copies_done == 12
    assert cloud.storage.copies_in_flight == 0


# -- faults -----------------------------------------------------------------------------------


async def test_fault_rule_hits_its_resource_and_hook_only() -> None:
    """A rule for one volume's on_main raises there, and nowhere else."""
    cloud = SimCloud.generate(20, seed=6)
    graph = await graph_of(cloud)
    victim = next(iter(cloud.volumes))
    cloud.faults.add(FaultRule(OperationKind.PROTECT, MAIN, VOLUME, victim))
    runner = runner_for(cloud)
    volume = Resource(VOLUME, victim)
    await runner.call(OperationKind.PROTECT, PF, volume, graph)
    with pytest.raises(SimulatedFault, match="simulated fault"):
        await runner.call(OperationKind.PROTECT, MAIN, volume, graph)
    other = Resource(VOLUME, list(cloud.volumes)[1])
    await runner.call(OperationKind.PROTECT, PF, other, graph)
    await runner.call(OperationKind.PROTECT, MAIN, other, graph)
    assert [(f.hook, f.resource.id) for f in cloud.faults.fired] == [(MAIN, victim)]


async def test_fault_times_and_probability() -> None:
    """times=1 fails only the first call; probability 0 never fires; draws follow the seed."""
    cloud = SimCloud.generate(10, seed=6)
    server = Resource(SERVER, next(iter(cloud.servers)))
    cloud.faults.add(FaultRule(hook=MAIN, resource_type=SERVER, times=1))
    cloud.faults.add(FaultRule(hook=CP, probability=0.0))
    runner = runner_for(cloud)
    with pytest.raises(SimulatedFault):
        await runner.call(OperationKind.PROTECT, MAIN, server, attempt=1)
    await runner.call(OperationKind.PROTECT, MAIN, server, attempt=2)
    for _ in range(50):
        await runner.call(OperationKind.PROTECT, CP, server)

    def draws(seed: int) -> list[bool]:
        c = SimCloud(seed=seed, faults=[FaultRule(probability=0.3)])
        return [
            c.faults.decide(OperationKind.PROTECT, MAIN, server) is not None for _ in range(200)
        ]

    assert draws(1) == draws(1)
    assert 20 < sum(draws(1)) < 100
    with pytest.raises(ValueError, match="probability"):
        FaultRule(probability=1.5)


async def test_hang_fault_hangs_until_cancelled() -> None:
    """A HANG rule never returns; only a timeout or cancellation stops the hook."""
    cloud = SimCloud.generate(10, seed=6)
    server = Resource(SERVER, next(iter(cloud.servers)))
    cloud.faults.add(FaultRule(hook=PB, action=FaultAction.HANG))
    runner = runner_for(cloud)
    with pytest.raises(TimeoutError):
        with anyio.fail_after(0.05):
            await runner.call(OperationKind.PROTECT, PB, server)


# -- hooks, called directly -------------------------------------------------------------------


async def test_server_quiesces_and_thaws_and_abort_is_safe() -> None:
    """prepare_begin freezes and marks; prepare_finish thaws; an aborting thaw of a never-frozen
    server does nothing and marks nothing."""
    cloud = SimCloud.generate(10, seed=8, latency=LatencyProfile(quiesce=Latency.fixed(0.001)))
    sid = next(iter(cloud.servers))
    server = Resource(SERVER, sid)
    runner = runner_for(cloud)
    await runner.call(OperationKind.PROTECT, PF, server, aborting=AbortReason.FAILURE)
    assert runner.marks.get(server.key) is None
    assert cloud.server(sid).thaws == 0
    await runner.call(OperationKind.PROTECT, PB, server)
    assert cloud.server(sid).frozen
    assert runner.marks[server.key]["quiesced"] == cloud.server(sid).frozen_at
    await runner.call(OperationKind.PROTECT, PB, server, attempt=2)
    assert cloud.server(sid).freezes == 1  # freezing a frozen server is a no-op
    await runner.call(OperationKind.PROTECT, PF, server, aborting=AbortReason.CANCELLED)
    assert not cloud.server(sid).frozen
    assert runner.marks[server.key]["thawed"] == cloud.server(sid).thawed_at


async def test_volume_cut_is_idempotent_and_skipped_when_aborting() -> None:
    """A re-run prepare_finish reuses the saved snapshot; an aborting one never cuts."""
    cloud = SimCloud.generate(10, seed=8)
    vids = list(cloud.volumes)
    runner = runner_for(cloud)
    first = Resource(VOLUME, vids[0])
    await runner.call(OperationKind.PROTECT, PF, first)
    await runner.call(OperationKind.PROTECT, PF, first, attempt=2)
    assert len(cloud.storage.snapshots) == 1
    snap = next(iter(cloud.storage.snapshots.values()))
    assert runner.saved[first.key]["snapshot_id"] == snap.id
    assert runner.marks[first.key]["cut"] == snap.taken_at
    await runner.call(
        OperationKind.PROTECT, PF, Resource(VOLUME, vids[1]), aborting=AbortReason.BUDGET
    )
    assert len(cloud.storage.snapshots) == 1


async def test_volume_copy_resumes_and_reports_progress() -> None:
    """on_main copies in chunks with progress; a re-run skips what the bank already holds."""
    cloud = SimCloud.generate(10, seed=9)
    vid = next(iter(cloud.volumes))
    volume = Resource(VOLUME, vid)
    runner = runner_for(cloud)
    runner.parameters = {VOLUME: {"chunk_size": 1000}}
    await runner.call(OperationKind.PROTECT, PF, volume)
    cut_reports = len(runner.progress[volume.key])  # (the snapshot's own progress)
    cloud.faults.add(FaultRule(hook=MAIN, times=1))
    with pytest.raises(SimulatedFault):
        await runner.call(OperationKind.PROTECT, MAIN, volume)
    await runner.call(OperationKind.PROTECT, MAIN, volume, attempt=2)
    size = cloud.volume(vid).size
    assert runner.saved[volume.key]["copied"] is True
    assert runner.saved[volume.key]["digest"] == content_digest(
        cloud.volume(vid).content, size, 1000
    )
    copied = runner.progress[volume.key][cut_reports:]
    assert copied[-1] == 1.0
    assert copied[0] is None  # waiting for a copy slot: a message, no fraction
    assert len([f for f in copied if f is not None]) == -(-size // 1000)
    before = len(runner.progress[volume.key])
    await runner.call(OperationKind.PROTECT, MAIN, volume, attempt=3)
    assert len(runner.progress[volume.key]) == before  # already copied: nothing redone


async def test_one_at_a_time_round_trip_restores_the_same_data() -> None:
    """Protect, restore and delete hook by hook: restored volumes carry the original data, the
    server is rebuilt on its restored volumes and image, and delete leaves nothing behind."""
    cloud = SimCloud.generate(40, seed=10)
    graph = await graph_of(cloud)
    runner = runner_for(cloud)
    await runner.run_one_at_a_time(OperationKind.PROTECT, graph)
    assert all(not s.frozen for s in cloud.servers.values())
    assert not cloud.storage.live_snapshots()  # temporary snapshots dropped on_complete
    originals = {vid: (v.content, v.size) for vid, v in cloud.volumes.items()}
    await runner.run_one_at_a_time(OperationKind.RESTORE, graph)
    assert set(runner.restored) == {r.key for r in graph.resources}
    for vid, (content, size) in originals.items():
        new = cloud.volume(runner.restored[(VOLUME, vid)])
        assert (new.content, new.size) == (content, size)
        assert new.origin is not None
        assert new.origin.original_id == vid
    for sid in [s for s in list(cloud.servers) if cloud.servers[s].origin is None]:
        old = cloud.server(sid)
        rebuilt = cloud.server(runner.restored[(SERVER, sid)])
        assert rebuilt.volume_ids == [runner.restored[(VOLUME, v)] for v in old.volume_ids]
        assert rebuilt.image_id == runner.restored[(IMAGE, old.image_id)]
    restored_before = dict(runner.restored)
    runner.restored.clear()
    await runner.run_one_at_a_time(OperationKind.RESTORE, graph)  # a re-run adopts, never dupes
    assert runner.restored == restored_before
    await runner.run_one_at_a_time(OperationKind.DELETE, graph)
    assert runner.bank.objects == {}  # type: ignore[attr-defined]


async def test_one_at_a_time_holds_each_server_frozen_only_for_its_volumes() -> None:
    """The baseline quiesces a server, cuts its own volumes, thaws it, and only then moves on;
    every main and complete comes after every prepare."""
    cloud = SimCloud.generate(40, seed=12)
    graph = await graph_of(cloud)
    runner = runner_for(cloud)
    await runner.run_one_at_a_time(OperationKind.PROTECT, graph)
    order = [(c.hook, c.resource) for c in runner.calls]
    assert len(order) == 4 * len(graph.resources)
    assert len(set(order)) == len(order)
    first_post = min(i for i, (hook, _) in enumerate(order) if hook in (MAIN, CP))
    assert all(hook in (PB, PF) for hook, _ in order[:first_post])
    freezes = [i for i, (hook, key) in enumerate(order) if hook is PB and key[0] == SERVER]
    thaws = [i for i, (hook, key) in enumerate(order) if hook is PF and key[0] == SERVER]
    windows = list(zip(freezes, thaws, strict=True))
    assert all(a < b for a, b in windows)
    assert all(b1 < a2 for (_, b1), (a2, _) in itertools.pairwise(windows))


def test_no_cloud_configured_names_the_fix() -> None:
    previous = set_cloud(None)
    try:
        with pytest.raises(NoCloudError, match="set_cloud"):
            current_cloud()
        cloud = SimCloud()
        with use_cloud(cloud):
            assert current_cloud() is cloud
        set_cloud(cloud)
        assert current_cloud() is cloud
    finally:
        set_cloud(previous)


# -- through the engine -----------------------------------------------------------------------


def storage_skew(cloud: SimCloud) -> float:
    taken = [r.taken_at for r in cloud.storage.snapshots.values()]
    return max(taken) - min(taken)


@pytest.mark.parametrize("barrier", [BarrierPolicy.CUT, BarrierPolicy.MAIN, BarrierPolicy.NONE])
async def test_engine_round_trip_through_entry_points(barrier: BarrierPolicy) -> None:
    """Discovered by entry points and bound with use_cloud: protect cuts every volume once,
    thaws every server, reports the storage's own instants; restore rebuilds everything;
    delete empties the bank."""
    cloud = SimCloud.generate(60, seed=21, latency=LatencyProfile.realistic())
    bank = MemoryBank()
    engine = Engine(store=MemoryStore(), bank=bank)
    with use_cloud(cloud):
        async with engine:
            outcome = await engine.protect(app_plan(cloud, barrier))
            assert outcome.status is RunStatus.SUCCEEDED
            assert len(outcome.resources) == 60
            assert all(r.status is ResourceStatus.SUCCEEDED for r in outcome.resources.values())
            assert len(cloud.storage.snapshots) == len(cloud.volumes)
            assert all(not s.frozen and s.freezes == 1 for s in cloud.servers.values())
            assert outcome.skew == pytest.approx(storage_skew(cloud))
            for sid, server in cloud.servers.items():
                window = outcome.resources[(SERVER, sid)].quiesce_window
                assert server.thawed_at is not None
                assert server.frozen_at is not None
                assert window == pytest.approx(server.thawed_at - server.frozen_at)
            n_servers = len(cloud.servers)

            restored = await engine.restore(outcome.checkpoint_id)
            assert restored.status is RunStatus.SUCCEEDED
            assert len(cloud.servers) == 2 * n_servers
            for (rtype, rid), new_id in restored.restored.items():
                if rtype == VOLUME:
                    assert cloud.volume(new_id).content == cloud.volume(rid).content

            deleted = await engine.delete(outcome.checkpoint_id)
            assert deleted.status is RunStatus.SUCCEEDED
    assert not [k for k in bank.objects if k.startswith(outcome.checkpoint_id)]
    assert not cloud.storage.live_snapshots()


async def test_engine_failure_thaws_every_server() -> None:
    """A volume that fails to cut aborts the run; every quiesced server is thawed."""
    cloud = SimCloud.generate(40, seed=22, latency=LatencyProfile.realistic())
    victim = list(cloud.volumes)[3]
    cloud.faults.add(FaultRule(OperationKind.PROTECT, PF, VOLUME, victim))
    engine = Engine(all_protections(cloud), all_protectables(cloud), discover=False)
    async with engine:
        with pytest.raises(RunError) as info:
            await engine.protect(app_plan(cloud, BarrierPolicy.CUT))
        assert info.value.outcome.status is RunStatus.FAILED
        assert info.value.outcome.resources[(VOLUME, victim)].status is ResourceStatus.FAILED
        assert all(not s.frozen for s in cloud.servers.values())
        assert all(s.freezes == s.thaws for s in cloud.servers.values())
