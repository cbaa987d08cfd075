"""Building small Karbor graphs for tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest

from karbor_async import BarrierPolicy, Engine, MemoryStore, Plan, Resource, ResourceType, Timeouts
from karbor_async.testing import Fault, RecordingPlugin, ScriptKey, protectables_for

SERVER = "OS::Nova::Server"
VOLUME = "OS::Cinder::Volume"
PROJECT = "OS::Keystone::Project"

TYPES = (
    ResourceType(PROJECT, quiesces=False, snapshots=False),
    ResourceType(SERVER, quiesces=True, snapshots=False),
    ResourceType(VOLUME),
)
QUIESCING = {SERVER}


def res(name: str) -> Resource:
    """``"s1"`` -> a server, ``"v1"`` -> a volume, ``"p1"`` -> a project, else a volume."""
    kind = {"s": SERVER, "p": PROJECT}.get(name[0], VOLUME)
    return Resource(kind, name, name=name)


def key(name: str) -> tuple[str, str]:
    return res(name).key


def sk(name: str) -> str:
    """Script key for one resource."""
    r = res(name)
    return f"{r.type}#{r.id}"


def setup(
    edges: Iterable[tuple[str, str]],
    roots: Iterable[str],
    *,
    barrier: BarrierPolicy | None = None,
    delays: Mapping[ScriptKey, Any] | None = None,
    faults: Mapping[ScriptKey, Fault] | None = None,
    fault_thaws: bool = False,
    timeouts: Timeouts | None = None,
    store: MemoryStore | None = None,
    **plan_kw: Any,
) -> tuple[Engine, RecordingPlugin, Plan]:
    plugin = RecordingPlugin(TYPES, delays=delays, faults=faults, fault_thaws=fault_thaws)
    pairs = [(res(a), res(b)) for a, b in edges]
    engine = Engine([plugin], protectables_for(pairs), store=store or MemoryStore(), discover=False)
    plan = Plan(
        name="test",
        resources=[res(r) for r in roots],
        barrier=barrier,
        timeouts=timeouts or Timeouts(hook=30),
        **plan_kw,
    )
    return engine, plugin, plan


def install_plugin(root: Path, name: str, source: str, entry_points: str) -> Path:
    """A vendor's plugin as pip would leave it: ``<name>_plugin.py`` and a ``.dist-info``
    with ``entry_points`` (INI text), in a directory to put on a child's ``PYTHONPATH``."""
    site = root / "site"
    dist = site / f"{name}-1.0.dist-info"
    dist.mkdir(parents=True)
    (site / f"{name}_plugin.py").write_text(source)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(entry_points)
    return site


#: Fixtures (in ``tests/conftest.py``) that need a service, root or a tool the machine
#: may lack: every test whose fixture closure holds one is marked ``service``
#: automatically (``conftest.pytest_collection_modifyitems``).
SERVICE_FIXTURES = frozenset({"pg_cluster", "fs_stack", "temporal_server"})

#: The test pytest is running, and the services it used without being marked
#: ``service`` (both kept by ``tests/conftest.py`` around each test), for
#: :func:`uses_service`.
running_test: pytest.Item | None = None
unmarked_uses: list[str] = []


def uses_service(what: str) -> None:
    """Note that the running test uses ``what``: called before anything here looks for
    a service. Unless the test is marked ``service``, ``tests/conftest.py`` fails it
    when it ends, so that a test needing a service can never be left in the runs that
    deselect them (``-m "not service"``, ``make test-lowest``) by mistake. (Failing
    here, inside a shared fixture's set-up, would fail every later test taking it.)"""
    item = running_test
    if item is not None and item.get_closest_marker("service") is None:
        unmarked_uses.append(what)


def need_service(reason: str) -> None:
    """Skip the calling test with ``reason``, except under CI (``KARBOR_REQUIRE_SERVICES``
    set, as ``.ci/run`` does), where a service it needs must be there, so it fails. The
    test must be marked ``service`` (:func:`uses_service`)."""
    uses_service(reason)
    if os.environ.get("KARBOR_REQUIRE_SERVICES"):
        pytest.fail(f"{reason}, and CI requires this test")
    pytest.skip(reason)


def need_tools(what: str, tools: Iterable[str]) -> None:
    """``what`` needs the programs ``tools`` on the PATH: skip without them, except under
    CI, where the test fails. The test must be marked ``service``."""
    uses_service(what)
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        need_service(f"{what} needs {' and '.join(missing)}")


def need_root(what: str, tools: Iterable[str] = ("mount",)) -> None:
    """Mounting needs root and mount(8) (and ``tools``): skip without them, except
    under CI (``KARBOR_REQUIRE_SERVICES=1``), where the test fails instead. The test
    must be marked ``service``."""
    uses_service(what)
    missing = [t for t in tools if shutil.which(t) is None]
    if os.geteuid() != 0 or missing:
        need = " and ".join((["root"] if os.geteuid() != 0 else []) + missing)
        need_service(f"{what} needs {need}")
