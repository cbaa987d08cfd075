"""A pytest plugin (entry point ``pytest11``): the ``no_loop_stalls`` fixture.

A test that takes the fixture fails, naming the hook, if a hook held the event
loop during it (see :func:`karbor_async.testing.no_loop_stalls`)::

    async def test_my_plugin(no_loop_stalls: list[str]) -> None: ...
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from karbor_async import testing

__all__ = ["no_loop_stalls"]


@pytest.fixture(name="no_loop_stalls")
def no_loop_stalls() -> Iterator[list[str]]:
    with testing.no_loop_stalls() as seen:
        yield seen
