"""A store that fails a commit point's commit (its server gone past its reconnect window,
or another engine owning the run): the run ends, everything it froze is thawed, and
the error names the store's failure. Never a hang.

The commit points of a protect here: the cut intent (before any hook), one before each
quiescing ``on_prepare_begin``, the group's cuts (before its main wave).
"""

from __future__ import annotations

import anyio
import pytest

from helpers import QUIESCING, setup
from invariants import check_run
from karbor_async import BarrierPolicy, Hook, MemoryStore, RunStatus
from karbor_async.exceptions import RunError, StoreError, StoreUnavailableError

COMMITS = 5  # the cut intent, three quiesces, the cuts
FAILS = [
    (1, "before any hook"),
    (2, "before the first quiesce"),
    (3, "before a quiesce, with a server frozen"),
    (5, "before the main wave, the cuts taken"),
]


class FailingStore(MemoryStore):
    """A memory store whose ``n``-th commit raises as an unreachable server does."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.fail_at = n
        self.calls = 0

    async def commit(self) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise StoreUnavailableError("the store's server went away (test)")
        await super().commit()


@pytest.mark.parametrize(("n", "point"), FAILS, ids=[p for _, p in FAILS])
async def test_a_failed_commit_point_ends_the_run_with_everything_thawed(
    n: int, point: str
) -> None:
    store = FailingStore(n)
    engine, plugin, plan = setup(
        [("s1", "v1"), ("s2", "v2"), ("s3", "v3")],
        ["s1", "s2", "s3"],
        barrier=BarrierPolicy.CUT,
        store=store,
        delays={("OS::Nova::Server", Hook.PREPARE_BEGIN): 0.01},
    )
    with anyio.fail_after(30):
        async with engine:
            run = await engine.build_protect(plan)
            with pytest.raises((RunError, StoreError)) as info:
                await engine.execute(run)
    frozen = [e.resource for e in plugin.calls(hook="on_prepare_begin")]
    thawed = [e.resource for e in plugin.calls(hook="on_prepare_finish")]
    assert set(frozen) <= set(thawed), "a quiesced server was not thawed"
    if isinstance(info.value, RunError):
        outcome = info.value.outcome
        assert outcome.status is RunStatus.FAILED
        assert "the store's server went away" in str(info.value)
        assert not any(plugin.calls(hook="on_main"))  # the cuts were not durable
        events = await store.read_events(run.run_id)
        check_run(plugin.trace, run.spec.graph, outcome, QUIESCING, events)
    else:  # before any hook: nothing ran, nothing to thaw
        assert n == 1 and plugin.trace == []
        assert "every thaw was called" in "".join(info.value.__notes__)
