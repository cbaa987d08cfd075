"""karbor-simcloud: a SIMULATED OpenStack cloud and its karbor-async plugins.

Nothing here touches a real cloud. :class:`SimCloud` is an in-process inventory
of projects, servers, volumes, images and networks with a fake storage array
(:class:`SimStorage`) that records the instant it takes each snapshot and
bounds concurrent copies; every call sleeps for a latency drawn from a
:class:`LatencyProfile` and may fail through :class:`FaultRule` rules.

The protection plugins and protectables are registered as entry points
(``karbor_async.protections`` / ``karbor_async.protectables``), so an engine
with ``discover=True`` finds them. Those instances are created with no
arguments; they act on the cloud given by :func:`use_cloud` (context) or
:func:`set_cloud` (process default)::

    cloud = SimCloud.generate(100, seed=1, latency=LatencyProfile.realistic())
    with use_cloud(cloud):
        async with Engine() as engine:
            outcome = await engine.protect(Plan("app", cloud.project_resources()))

Or bind plugins explicitly: ``Engine(all_protections(cloud), all_protectables(cloud),
discover=False)``.

``SimCloud.shared(directory, n, seed)`` keeps the cloud's state in a directory
shared by every process (the CLI's mode): frozen servers, snapshots, restored
resources and fault rules survive the process that made them.
"""

from karbor_simcloud._cloud import (
    IMAGE,
    NETWORK,
    PROJECT,
    RESOURCE_TYPES,
    SERVER,
    VOLUME,
    Origin,
    SimCloud,
    SimCloudError,
    SimImage,
    SimNetwork,
    SimProject,
    SimServer,
    SimStorage,
    SimVolume,
    SnapshotRecord,
    content_digest,
    snapshot_name,
)
from karbor_simcloud._config import NoCloudError, current_cloud, set_cloud, use_cloud
from karbor_simcloud._faults import (
    FAULT_SYNTAX,
    FaultAction,
    FaultInjector,
    FaultRule,
    FaultSyntaxError,
    FiredFault,
    SimulatedFault,
)
from karbor_simcloud._latency import Distribution, Latency, LatencyProfile
from karbor_simcloud._shared import SharedState, SharedStateError, StateView
from karbor_simcloud.protectables import all_protectables
from karbor_simcloud.protections import RestoreError, all_protections, plan_faults

__all__ = [
    # the simulated cloud
    "SimCloud",
    "SimStorage",
    "SnapshotRecord",
    "SimProject",
    "SimServer",
    "SimVolume",
    "SimImage",
    "SimNetwork",
    "Origin",
    "SimCloudError",
    "content_digest",
    "snapshot_name",
    "PROJECT",
    "SERVER",
    "VOLUME",
    "IMAGE",
    "NETWORK",
    "RESOURCE_TYPES",
    # latencies and faults
    "Distribution",
    "Latency",
    "LatencyProfile",
    "FAULT_SYNTAX",
    "FaultAction",
    "FaultInjector",
    "FaultRule",
    "FaultSyntaxError",
    "FiredFault",
    "SimulatedFault",
    # the shared state (SimCloud.shared)
    "SharedState",
    "SharedStateError",
    "StateView",
    # finding the cloud
    "current_cloud",
    "set_cloud",
    "use_cloud",
    "NoCloudError",
    # plugins
    "all_protections",
    "all_protectables",
    "RestoreError",
    "plan_faults",
]

__version__ = "0.1.0"
