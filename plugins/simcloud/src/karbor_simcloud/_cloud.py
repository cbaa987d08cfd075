"""The SIMULATED cloud: an in-process inventory, a fake storage array, latencies and faults.

Nothing here talks to a real cloud. :class:`SimCloud` holds projects, servers,
volumes, images and networks as plain records; its calls (quiesce, snapshot,
copy, create) sleep for latencies drawn from a seeded :class:`LatencyProfile`
and may fail through :class:`FaultInjector` rules. :class:`SimStorage` is the
fake array: it stamps each snapshot's instant on its own clock (the request
time plus its sampled delay, fixed at the call: a busy event loop that resumes
the call late does not move it) and limits how many copies run at once.

A cloud lives in this process by default (the library's, the tests' and the
benchmarks' mode). :meth:`SimCloud.shared` puts its state in a directory that
every process uses and that survives them (``_shared``): frozen servers,
snapshots, restored resources and stored fault rules. A cloud is meant to be
used from one event loop at a time (its copy limiter binds to the loop that
first uses it).
"""

from __future__ import annotations

import hashlib
import itertools
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import anyio
import attrs

from karbor_simcloud._compat import Resource
from karbor_simcloud._faults import FaultInjector, FaultRule, FiredFault
from karbor_simcloud._latency import Latency, LatencyProfile
from karbor_simcloud._shared import SharedState, process_owner

__all__ = [
    "IMAGE",
    "NETWORK",
    "PROJECT",
    "RESOURCE_TYPES",
    "SERVER",
    "VOLUME",
    "Origin",
    "SimCloud",
    "SimCloudError",
    "SimImage",
    "SimNetwork",
    "SimProject",
    "SimServer",
    "SimStorage",
    "SimVolume",
    "SnapshotRecord",
    "snapshot_name",
]

_T = TypeVar("_T")

PROJECT = "OS::Keystone::Project"
SERVER = "OS::Nova::Server"
VOLUME = "OS::Cinder::Volume"
IMAGE = "OS::Glance::Image"
NETWORK = "OS::Neutron::Network"
RESOURCE_TYPES: tuple[str, ...] = (PROJECT, SERVER, VOLUME, IMAGE, NETWORK)


class SimCloudError(LookupError):
    """The simulated cloud has no such resource (or refuses the call)."""


@attrs.frozen
class Origin:
    """Where a restored resource came from: the checkpoint and the original's id."""

    checkpoint_id: str
    original_id: str


@attrs.define
class SimProject:
    id: str
    name: str


@attrs.define
class SimNetwork:
    id: str
    name: str
    project_id: str
    cidr: str
    origin: Origin | None = None


@attrs.define
class SimImage:
    id: str
    name: str
    project_id: str
    size: int
    content: str
    """What the bytes are derived from (restored images keep their original's)."""
    origin: Origin | None = None


@attrs.define
class SimVolume:
    id: str
    name: str
    project_id: str
    size: int
    content: str
    attached_to: list[str] = attrs.field(factory=list)
    origin: Origin | None = None


@attrs.define
class SimServer:
    """A simulated server; the ``*_at`` fields are its last freeze cycle (engine clock)."""

    id: str
    name: str
    project_id: str
    flavor: str
    image_id: str
    volume_ids: list[str] = attrs.field(factory=list)
    network_ids: list[str] = attrs.field(factory=list)
    origin: Origin | None = None
    frozen: bool = False
    freezes: int = 0
    thaws: int = 0
    quiesce_started_at: float | None = None
    frozen_at: float | None = None
    thaw_started_at: float | None = None
    thawed_at: float | None = None


@attrs.define
class SnapshotRecord:
    """One snapshot, as the simulated array saw it (instants on the engine clock).

    ``taken_at`` is the point-in-time instant of the image: the source of truth
    for skew. ``requested_at`` is when the call reached the array and
    ``returned_at`` when it returned to the caller.
    """

    id: str
    volume_id: str
    content: str
    requested_at: float
    taken_at: float
    delay: float
    """The sampled latency from request to instant (the array's own jitter)."""
    returned_at: float | None = None
    deleted: bool = False


def snapshot_name(checkpoint_id: str, volume_id: str) -> str:
    """The snapshot a cut of ``volume_id`` for ``checkpoint_id`` makes (deterministic, so a
    delete finds it without saved info, and a re-run cut finds the one it already took)."""
    return f"snap-{checkpoint_id}-{volume_id}"


def _snapshot_record(row: dict[str, Any]) -> SnapshotRecord:
    return SnapshotRecord(
        id=row["id"],
        volume_id=row["volume_id"],
        content=row["content"],
        requested_at=float(row["requested_at"]),
        taken_at=float(row["taken_at"]),
        delay=float(row["delay"]),
        returned_at=row.get("returned_at"),
        deleted=bool(row.get("deleted")),
    )


def chunk_bytes(content: str, index: int, size: int) -> bytes:
    """The deterministic bytes of chunk ``index`` of simulated data ``content``."""
    seed = hashlib.blake2b(f"{content}:{index}".encode(), digest_size=32).digest()
    reps, rest = divmod(size, len(seed))
    return seed * reps + seed[:rest]


def content_digest(content: str, size: int, chunk_size: int) -> str:
    """The digest of simulated data of ``size`` bytes read in ``chunk_size`` chunks."""
    h = hashlib.blake2b(digest_size=16)
    for i, off in enumerate(range(0, size, chunk_size)):
        h.update(chunk_bytes(content, i, min(chunk_size, size - off)))
    return h.hexdigest()


class SimStorage:
    """The simulated storage array: snapshots with recorded instants, and bounded copies."""

    def __init__(self, cloud: SimCloud, *, max_concurrent_copies: int = 8) -> None:
        if max_concurrent_copies < 1:
            raise ValueError("max_concurrent_copies must be >= 1")
        self._cloud = cloud
        self.max_concurrent_copies = max_concurrent_copies
        self.snapshots: dict[str, SnapshotRecord] = {}
        self.copies_in_flight = 0
        self.peak_copies = 0
        self.copies_done = 0
        self._limiter: anyio.CapacityLimiter | None = None
        self._ids = itertools.count(1)

    async def snapshot(
        self,
        volume_id: str,
        *,
        name: str | None = None,
        checkpoint_id: str | None = None,
        owner: str | None = None,
    ) -> SnapshotRecord:
        """Take a snapshot of a volume; its instant is the request time plus the array's
        sampled delay, stamped at the call.

        With ``name`` (see :func:`snapshot_name`), a live snapshot of that name is
        returned as it is: taking it again is a no-op (a re-run cut, another process).
        """
        cloud = self._cloud
        volume = cloud.volume(volume_id)
        state = cloud.state
        if name is not None:
            existing = await self.find_snapshot(name)
            if existing is not None:
                return existing
        requested_at = anyio.current_time()
        delay = cloud.sample(cloud.latency.snapshot)
        record = SnapshotRecord(
            id=name or f"snap-{next(self._ids):07d}",
            volume_id=volume.id,
            content=volume.content,
            requested_at=requested_at,
            taken_at=requested_at + delay,  # the array's clock, not the loop's resumption
            delay=delay,
        )
        wall = time.time() + delay
        if delay > 0:
            await anyio.sleep(delay)
        if state is not None:
            row = await state.put_snapshot(
                {
                    **attrs.asdict(record),
                    "checkpoint_id": checkpoint_id,
                    "owner": owner or process_owner(),
                    "taken_wall": wall,
                }
            )
            if row["taken_at"] != record.taken_at or row["requested_at"] != requested_at:
                record = _snapshot_record(row)  # another process took it first: that one
        self.snapshots[record.id] = record
        await cloud.delay(cloud.latency.snapshot_return)
        if record.returned_at is None:
            record.returned_at = anyio.current_time()
        return record

    async def find_snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        """The live snapshot of that id (in the shared state: whoever took it)."""
        state = self._cloud.state
        if state is None:
            return self.get_snapshot(snapshot_id)
        row = await state.get_snapshot(snapshot_id)
        if row is None:
            local = self.snapshots.get(snapshot_id)
            if local is not None:
                local.deleted = True
            return None
        local = self.snapshots.get(snapshot_id)
        if local is None or local.deleted:
            local = self.snapshots[snapshot_id] = _snapshot_record(row)
        return local

    async def remove_snapshot(self, snapshot_id: str) -> bool:
        """Delete a snapshot; ``False`` if it was already gone or never taken (idempotent)."""
        state = self._cloud.state
        if state is None:
            return self.delete_snapshot(snapshot_id)
        removed = await state.delete_snapshot(snapshot_id)
        local = self.snapshots.get(snapshot_id)
        if local is not None:
            local.deleted = True
        return removed

    def get_snapshot(self, snapshot_id: str) -> SnapshotRecord | None:
        record = self.snapshots.get(snapshot_id)
        return None if record is None or record.deleted else record

    def delete_snapshot(self, snapshot_id: str) -> bool:
        """Delete a snapshot; ``False`` if it was already gone (idempotent)."""
        record = self.snapshots.get(snapshot_id)
        if record is None or record.deleted:
            return False
        record.deleted = True
        return True

    def live_snapshots(self) -> list[SnapshotRecord]:
        return [s for s in self.snapshots.values() if not s.deleted]

    def copy_slot(self) -> _CopySlot:
        """``async with storage.copy_slot():`` holds one of the array's copy slots."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.max_concurrent_copies)
        return _CopySlot(self, self._limiter)

    async def read_chunk(self, content: str, index: int, size: int) -> bytes:
        """Read one chunk of simulated data (sleeps for the copy latency)."""
        await self._cloud.delay(self._cloud.latency.copy_chunk)
        return chunk_bytes(content, index, size)


class _CopySlot:
    def __init__(self, storage: SimStorage, limiter: anyio.CapacityLimiter) -> None:
        self._storage = storage
        self._limiter = limiter

    async def __aenter__(self) -> None:
        await self._limiter.acquire_on_behalf_of(self)
        storage = self._storage
        storage.copies_in_flight += 1
        storage.peak_copies = max(storage.peak_copies, storage.copies_in_flight)

    async def __aexit__(self, *exc_info: object) -> None:
        self._storage.copies_in_flight -= 1
        self._storage.copies_done += 1
        self._limiter.release_on_behalf_of(self)


class SimCloud:
    """A SIMULATED OpenStack cloud in this process (an inventory plus fake storage).

    Build an application with :meth:`generate`, or add resources one by one.
    Latencies come from ``latency`` and a seeded random generator, so a run is
    reproducible up to the event loop's scheduling; faults come from
    ``faults.rules``.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        latency: LatencyProfile | None = None,
        faults: list[FaultRule] | None = None,
        max_concurrent_copies: int = 8,
        state: SharedState | None = None,
    ) -> None:
        self.seed = seed
        self.state = state
        """Where the cloud's mutable state lives across processes (None: this process)."""
        self._seen = 0
        """The last created resource of the shared state this process has loaded."""
        self.latency = latency or LatencyProfile.zero()
        self.faults = FaultInjector(list(faults or ()), seed=seed + 1)
        self.storage = SimStorage(self, max_concurrent_copies=max_concurrent_copies)
        self.rng = random.Random(seed + 2)
        self.projects: dict[str, SimProject] = {}
        self.servers: dict[str, SimServer] = {}
        self.volumes: dict[str, SimVolume] = {}
        self.images: dict[str, SimImage] = {}
        self.networks: dict[str, SimNetwork] = {}
        self._ids = itertools.count(1)
        self._by_origin: dict[tuple[str, Origin], str] = {}

    def __repr__(self) -> str:
        where = f" state={self.state.directory}" if self.state is not None else ""
        return (
            f"<SimCloud (simulated){where} seed={self.seed} projects={len(self.projects)} "
            f"servers={len(self.servers)} volumes={len(self.volumes)} "
            f"images={len(self.images)} networks={len(self.networks)}>"
        )

    # -- latency -------------------------------------------------------------------
    def sample(self, latency: Latency) -> float:
        return 0.0 if latency.is_zero else latency.sample(self.rng)

    async def delay(self, latency: Latency) -> None:
        """Sleep for one sample of ``latency``; does not await at all when it is zero."""
        if latency.is_zero:
            return
        seconds = latency.sample(self.rng)
        if seconds > 0:
            await anyio.sleep(seconds)

    # -- inventory -----------------------------------------------------------------
    def _new_id(self, prefix: str, rid: str | None = None) -> str:
        return rid if rid is not None else f"{prefix}-{next(self._ids):07d}"

    def add_project(self, name: str = "") -> SimProject:
        pid = self._new_id("prj")
        project = SimProject(pid, name or pid)
        self.projects[pid] = project
        return project

    def ensure_project(self, project_id: str) -> SimProject:
        """The project with this id, created (named after its id) if missing."""
        if project_id not in self.projects:
            self.projects[project_id] = SimProject(project_id, project_id)
        return self.projects[project_id]

    def add_network(
        self,
        project_id: str,
        name: str = "",
        *,
        cidr: str = "",
        origin: Origin | None = None,
        rid: str | None = None,
    ) -> SimNetwork:
        self.project(project_id)
        nid = self._new_id("net", rid)
        n = len(self.networks)
        network = SimNetwork(
            nid, name or nid, project_id, cidr or f"10.{n // 256 % 256}.{n % 256}.0/24", origin
        )
        self.networks[nid] = network
        self._note_origin(NETWORK, nid, origin)
        return network

    def add_image(
        self,
        project_id: str,
        name: str = "",
        *,
        size: int = 2048,
        content: str = "",
        origin: Origin | None = None,
        rid: str | None = None,
    ) -> SimImage:
        self.project(project_id)
        iid = self._new_id("img", rid)
        image = SimImage(iid, name or iid, project_id, size, content or iid, origin)
        self.images[iid] = image
        self._note_origin(IMAGE, iid, origin)
        return image

    def add_volume(
        self,
        project_id: str,
        name: str = "",
        *,
        size: int = 4096,
        content: str = "",
        origin: Origin | None = None,
        rid: str | None = None,
    ) -> SimVolume:
        self.project(project_id)
        vid = self._new_id("vol", rid)
        volume = SimVolume(vid, name or vid, project_id, size, content or vid, origin=origin)
        self.volumes[vid] = volume
        self._note_origin(VOLUME, vid, origin)
        return volume

    def add_server(
        self,
        project_id: str,
        image_id: str,
        volume_ids: list[str],
        network_ids: list[str],
        name: str = "",
        *,
        flavor: str = "m1.small",
        origin: Origin | None = None,
        rid: str | None = None,
    ) -> SimServer:
        self.project(project_id)
        self.image(image_id)
        for nid in network_ids:
            self.network(nid)
        sid = self._new_id("srv", rid)
        server = SimServer(
            sid, name or sid, project_id, flavor, image_id, [], list(network_ids), origin
        )
        self.servers[sid] = server
        self._note_origin(SERVER, sid, origin)
        for vid in volume_ids:
            self.attach(sid, vid)
        return server

    def attach(self, server_id: str, volume_id: str) -> None:
        server = self.server(server_id)
        volume = self.volume(volume_id)
        if volume.id not in server.volume_ids:
            server.volume_ids.append(volume.id)
        if server.id not in volume.attached_to:
            volume.attached_to.append(server.id)

    def project(self, project_id: str) -> SimProject:
        return _get(self.projects, project_id, "project")

    def server(self, server_id: str) -> SimServer:
        return _get(self.servers, server_id, "server")

    def volume(self, volume_id: str) -> SimVolume:
        return _get(self.volumes, volume_id, "volume")

    def image(self, image_id: str) -> SimImage:
        return _get(self.images, image_id, "image")

    def network(self, network_id: str) -> SimNetwork:
        return _get(self.networks, network_id, "network")

    def find_restored(self, kind: str, origin: Origin) -> str | None:
        """The id of a resource a restore already created from ``origin`` (adoption)."""
        return self._by_origin.get((kind, origin))

    def _note_origin(self, kind: str, rid: str, origin: Origin | None) -> None:
        if origin is not None:
            self._by_origin[(kind, origin)] = rid

    # -- resources as the engine sees them ------------------------------------------
    def resource_of(self, kind: str, rid: str) -> Resource:
        """The engine's :class:`Resource` for a simulated resource (name from the inventory)."""
        record: SimProject | SimServer | SimVolume | SimImage | SimNetwork
        if kind == PROJECT:
            record = self.project(rid)
        elif kind == SERVER:
            record = self.server(rid)
        elif kind == VOLUME:
            record = self.volume(rid)
        elif kind == IMAGE:
            record = self.image(rid)
        elif kind == NETWORK:
            record = self.network(rid)
        else:
            raise SimCloudError(f"the simulated cloud has no resource type {kind!r}")
        return Resource(kind, record.id, record.name)

    def all_resources(self) -> Iterator[Resource]:
        for kind, table in (
            (PROJECT, self.projects),
            (NETWORK, self.networks),
            (SERVER, self.servers),
            (IMAGE, self.images),
            (VOLUME, self.volumes),
        ):
            for rid in table:
                yield self.resource_of(kind, rid)

    def project_resources(self, project_id: str | None = None) -> list[Resource]:
        """The plan roots of an application: its project (the first project by default)."""
        if project_id is None:
            if not self.projects:
                raise SimCloudError("the simulated cloud has no project; generate one first")
            project_id = next(iter(self.projects))
        return [self.resource_of(PROJECT, project_id)]

    # -- calls the plugins make --------------------------------------------------------
    async def quiesce(self, server_id: str, *, by: str | None = None) -> SimServer:
        """Freeze a server's file systems (idempotent: freezing a frozen server is a no-op).

        ``by`` says who froze it (the shared state shows it; default: this process)."""
        server = self.server(server_id)
        state = self.state
        if state is not None and await state.is_frozen(server_id):
            server.frozen = True  # frozen by this process earlier, or by another
            return server
        if state is None and server.frozen:
            return server
        server.quiesce_started_at = anyio.current_time()
        await self.delay(self.latency.quiesce)
        if state is not None and not await state.freeze(server_id, by or process_owner()):
            server.frozen = True  # another process froze it meanwhile
            return server
        server.frozen = True
        server.freezes += 1
        server.frozen_at = anyio.current_time()
        server.thaw_started_at = server.thawed_at = None
        return server

    async def thaw(self, server_id: str) -> bool:
        """Thaw a server; ``False`` if it was not frozen (safe to call on any server)."""
        server = self.server(server_id)
        state = self.state
        if state is not None:
            server.frozen = await state.is_frozen(server_id)  # whoever froze it
        if not server.frozen:
            return False
        server.thaw_started_at = anyio.current_time()
        await self.delay(self.latency.thaw)
        if state is not None and not await state.thaw(server_id):
            server.frozen = False  # another process thawed it meanwhile
            return False
        server.frozen = False
        server.thaws += 1
        server.thawed_at = anyio.current_time()
        return True

    async def _created(
        self, kind: str, prefix: str, fields: dict[str, Any], origin: Origin
    ) -> tuple[str | None, bool]:
        """In the shared state: the id to create with (allocated there), or the one a
        process already created from ``origin`` (adopted: True)."""
        if self.state is None:
            return None, False
        fields = {**fields, "origin": [origin.checkpoint_id, origin.original_id]}
        rid, record, new = await self.state.create(
            kind, prefix, fields, (origin.checkpoint_id, origin.original_id), process_owner()
        )
        if new:
            return rid, False
        await self.refresh()  # (what it needs may come from that process too)
        self._load_created(kind, record)
        return rid, True

    def _table(self, kind: str) -> dict[str, Any]:
        tables: dict[str, dict[str, Any]] = {
            PROJECT: self.projects,
            SERVER: self.servers,
            VOLUME: self.volumes,
            IMAGE: self.images,
            NETWORK: self.networks,
        }
        return tables[kind]

    async def create_volume(
        self, project_id: str, name: str, size: int, content: str, origin: Origin
    ) -> SimVolume:
        await self.delay(self.latency.create)
        fields = {"project_id": project_id, "name": name, "size": size, "content": content}
        rid, adopted = await self._created(VOLUME, "vol", fields, origin)
        if adopted:
            return self.volume(str(rid))
        return self.add_volume(project_id, name, size=size, content=content, origin=origin, rid=rid)

    async def create_image(
        self, project_id: str, name: str, size: int, content: str, origin: Origin
    ) -> SimImage:
        await self.delay(self.latency.create)
        fields = {"project_id": project_id, "name": name, "size": size, "content": content}
        rid, adopted = await self._created(IMAGE, "img", fields, origin)
        if adopted:
            return self.image(str(rid))
        return self.add_image(project_id, name, size=size, content=content, origin=origin, rid=rid)

    async def create_network(
        self, project_id: str, name: str, cidr: str, origin: Origin
    ) -> SimNetwork:
        await self.delay(self.latency.create)
        fields = {"project_id": project_id, "name": name, "cidr": cidr}
        rid, adopted = await self._created(NETWORK, "net", fields, origin)
        if adopted:
            return self.network(str(rid))
        return self.add_network(project_id, name, cidr=cidr, origin=origin, rid=rid)

    async def create_server(
        self,
        project_id: str,
        name: str,
        flavor: str,
        image_id: str,
        volume_ids: list[str],
        network_ids: list[str],
        origin: Origin,
    ) -> SimServer:
        await self.delay(self.latency.create)
        await self.refresh()  # its volumes and image may come from another process
        fields = {
            "project_id": project_id,
            "name": name,
            "flavor": flavor,
            "image_id": image_id,
            "volume_ids": list(volume_ids),
            "network_ids": list(network_ids),
        }
        rid, adopted = await self._created(SERVER, "srv", fields, origin)
        if adopted:
            return self.server(str(rid))
        return self.add_server(
            project_id,
            image_id,
            volume_ids,
            network_ids,
            name,
            flavor=flavor,
            origin=origin,
            rid=rid,
        )

    async def lookup_restored(self, kind: str, origin: Origin) -> str | None:
        """:meth:`find_restored`, asking the shared state too (another process's restore)."""
        if self.state is None:
            return self.find_restored(kind, origin)
        found = await self.state.find_created(kind, (origin.checkpoint_id, origin.original_id))
        if found is not None and found not in self._table(kind):
            await self.refresh()
        return found

    async def refresh(self) -> None:
        """Load what other processes created since this one last looked (shared state)."""
        if self.state is None:
            return
        for seq, kind, record in await self.state.created_since(self._seen):
            self._seen = seq
            self._load_created(kind, record)

    def _load_created(self, kind: str, record: dict[str, Any]) -> None:
        rid = str(record["id"])
        if rid in self._table(kind):
            return
        origin_raw = record.get("origin")
        origin = Origin(*origin_raw) if origin_raw else None
        project = str(record["project_id"])
        self.ensure_project(project)
        if kind in (VOLUME, IMAGE):
            add = self.add_volume if kind == VOLUME else self.add_image
            add(
                project,
                record["name"],
                size=int(record["size"]),
                content=record["content"],
                origin=origin,
                rid=rid,
            )
        elif kind == NETWORK:
            self.add_network(project, record["name"], cidr=record["cidr"], origin=origin, rid=rid)
        elif kind == SERVER:
            self.add_server(
                project,
                record["image_id"],
                [v for v in record["volume_ids"] if v in self.volumes],
                [n for n in record["network_ids"] if n in self.networks],
                record["name"],
                flavor=record["flavor"],
                origin=origin,
                rid=rid,
            )

    # -- the shared state ------------------------------------------------------------------
    @classmethod
    def shared(
        cls,
        directory: Path,
        n_resources: int,
        seed: int,
        *,
        latency: LatencyProfile | None = None,
        latency_name: str = "custom",
    ) -> tuple[SimCloud, bool]:
        """The cloud whose state lives in ``directory``, created there if absent.

        Every process that opens it sees the same application (regenerated from
        ``n_resources`` and ``seed``), the same frozen servers, snapshots and
        restored resources, and the fault rules stored there. Returns the cloud
        and whether the state was created now. Call it outside the event loop (at
        start-up): it reads the state synchronously.
        """
        meta = {"resources": str(n_resources), "seed": str(seed), "latency": latency_name}
        state, created = SharedState.open(directory, meta)
        cloud = cls.generate(n_resources, seed, latency=latency)
        cloud.state = state

        async def report(fired: FiredFault) -> None:
            await state.record_fired(
                fired.rule.text(),
                fired.operation.value,
                fired.hook.value,
                f"{fired.resource.type}#{fired.resource.id}",
                process_owner(),
            )

        cloud.faults.report = report
        for seq, kind, record in state.created_since_sync(0):
            cloud._seen = seq
            cloud._load_created(kind, record)
        view = state.view()
        for row in view.frozen:
            if row.server_id in cloud.servers:
                cloud.servers[row.server_id].frozen = True
        return cloud, created

    # -- generation --------------------------------------------------------------------
    @classmethod
    def generate(
        cls,
        n_resources: int,
        seed: int = 0,
        *,
        latency: LatencyProfile | None = None,
        faults: list[FaultRule] | None = None,
        max_concurrent_copies: int = 8,
        max_volumes_per_server: int = 4,
        shared_volume_ratio: float = 0.05,
        resources_per_network: int = 200,
        volume_size: int = 4096,
        image_size: int = 2048,
    ) -> SimCloud:
        """A simulated application of exactly ``n_resources`` resources, reproducible from ``seed``.

        One project owns everything; networks (one per ``resources_per_network``
        resources, at least one); servers, each with its own image, one network
        and 1 to ``max_volumes_per_server`` volumes, where each volume slot
        reuses an earlier server's volume with probability
        ``shared_volume_ratio`` (a multi-attached volume, one node reached from
        two servers). What is left of the budget at the end becomes networks.
        The graph the engine builds from :meth:`project_resources` has exactly
        ``n_resources`` nodes.
        """
        if n_resources < 1:
            raise ValueError("an application needs at least one resource (its project)")
        if max_volumes_per_server < 1:
            raise ValueError("max_volumes_per_server must be >= 1")
        cloud = cls(
            seed=seed,
            latency=latency,
            faults=faults,
            max_concurrent_copies=max_concurrent_copies,
        )
        rng = random.Random(seed)
        project = cloud.add_project(f"app-{seed}")
        remaining = n_resources - 1
        n_networks = min(remaining, max(1, n_resources // resources_per_network))
        networks = [cloud.add_network(project.id) for _ in range(n_networks)]
        remaining -= n_networks
        volume_pool: list[str] = []
        in_pool: set[str] = set()
        while remaining >= 3:
            remaining -= 2  # the server and its image
            image = cloud.add_image(project.id, size=image_size)
            wanted = rng.randint(1, max_volumes_per_server)
            chosen: list[str] = []
            for _ in range(wanted):
                if volume_pool and rng.random() < shared_volume_ratio:
                    shared = rng.choice(volume_pool)
                    if shared not in chosen:
                        chosen.append(shared)
                        continue
                if remaining >= 1:
                    volume = cloud.add_volume(project.id, size=volume_size)
                    chosen.append(volume.id)
                    remaining -= 1
            if not chosen:
                # Only shared picks were drawn; take a fresh volume (the budget has one).
                volume = cloud.add_volume(project.id, size=volume_size)
                chosen.append(volume.id)
                remaining -= 1
            network = rng.choice(networks)
            cloud.add_server(project.id, image.id, chosen, [network.id])
            for vid in chosen:
                if vid not in in_pool:
                    in_pool.add(vid)
                    volume_pool.append(vid)
        for _ in range(remaining):
            cloud.add_network(project.id)
        return cloud

    def stats(self) -> dict[str, int]:
        shared = sum(1 for v in self.volumes.values() if len(v.attached_to) > 1)
        return {
            "projects": len(self.projects),
            "servers": len(self.servers),
            "volumes": len(self.volumes),
            "shared_volumes": shared,
            "images": len(self.images),
            "networks": len(self.networks),
            "total": len(self.projects)
            + len(self.servers)
            + len(self.volumes)
            + len(self.images)
            + len(self.networks),
        }


def _get(table: dict[str, _T], rid: str, what: str) -> _T:
    try:
        return table[rid]
    except KeyError:
        raise SimCloudError(f"the simulated cloud has no {what} {rid!r}") from None
