"""Runs on Temporal: the same plans and plugins, with workers in several processes.

Needs the ``temporal`` extra (``pip install 'karbor-async[temporal]'``) and the
PostgreSQL store. The application starts runs with :class:`TemporalBackend`;
each worker process enters an :class:`~karbor_async.Engine` on the shared
:class:`~karbor_async.PostgresStore` and serves it with :func:`serve` (or runs
``karbor-async worker``). See ``docs/temporal.md``.
"""

from __future__ import annotations

try:
    import temporalio  # noqa: F401  (the SDK: imported here, never by the core engine)
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "karbor_async.temporal needs the Temporal SDK: pip install 'karbor-async[temporal]'"
    ) from exc

from karbor_async.temporal._client import TemporalBackend, workflow_id
from karbor_async.temporal._wire import DRIVER_PREFIX, Options
from karbor_async.temporal._worker import TASK_QUEUE, WorkerInfo, serve

__all__ = [
    "DRIVER_PREFIX",
    "TASK_QUEUE",
    "Options",
    "TemporalBackend",
    "WorkerInfo",
    "serve",
    "workflow_id",
]
