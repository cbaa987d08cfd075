"""karbor-async: application-consistent protection of resource graphs on anyio.

Vendors write plugins against :mod:`karbor_async.plugin`; applications build a
:class:`Plan` and call :meth:`Engine.protect`, :meth:`Engine.restore` and
:meth:`Engine.delete`. See ``README.md`` and ``docs/``.
"""

from karbor_async._engine import Engine
from karbor_async._fsbank import FsBank
from karbor_async._graph import ResourceGraph
from karbor_async._memory import MemoryBank, MemoryStore
from karbor_async._pg_store import PostgresStore
from karbor_async._plan import ConsistencyGroup, Plan, Timeouts
from karbor_async._scheduler import Run, RunStatistics
from karbor_async._sqlite import SqliteStore
from karbor_async._types import (
    AbortReason,
    BarrierPolicy,
    Hook,
    OperationKind,
    Resource,
    ResourceKey,
    ResourceStatus,
    RunStatus,
)
from karbor_async.events import Event, EventKind, Progress
from karbor_async.exceptions import KarborError, RunError
from karbor_async.plugin import HookContext, Param, Protectable, ProtectionPlugin, ResourceType
from karbor_async.store import CheckpointStatus, RunOutcome

__all__ = [
    "AbortReason",
    "BarrierPolicy",
    "CheckpointStatus",
    "ConsistencyGroup",
    "Engine",
    "Event",
    "FsBank",
    "EventKind",
    "Hook",
    "HookContext",
    "KarborError",
    "MemoryBank",
    "MemoryStore",
    "OperationKind",
    "Param",
    "Plan",
    "PostgresStore",
    "Progress",
    "Protectable",
    "ProtectionPlugin",
    "Resource",
    "ResourceGraph",
    "ResourceKey",
    "ResourceStatus",
    "ResourceType",
    "Run",
    "RunError",
    "RunOutcome",
    "RunStatistics",
    "RunStatus",
    "SqliteStore",
    "Timeouts",
]

__version__ = "0.1.0"
