"""The ordering rules and guarantees of DESIGN.md sections 3-4, checked on a recorded trace."""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence

from karbor_async import BarrierPolicy, Hook, ResourceGraph, ResourceStatus, RunOutcome, RunStatus
from karbor_async._types import ResourceKey
from karbor_async.events import Event, EventKind
from karbor_async.testing import TraceEntry

ORDER = [Hook.PREPARE_BEGIN, Hook.PREPARE_FINISH, Hook.MAIN, Hook.COMPLETE]


def check_run(
    trace: Sequence[TraceEntry],
    graph: ResourceGraph,
    outcome: RunOutcome,
    quiescing: set[str],
    events: Sequence[Event] = (),
    done_before: frozenset[ResourceKey] = frozenset(),
) -> None:
    """Assert every ordering rule, barrier, exactly-once on success and the thaw invariant."""
    calls: dict[ResourceKey, list[TraceEntry]] = defaultdict(list)
    for e in trace:
        calls[e.resource].append(e)
    keys = [r.key for r in graph.resources]
    group_of = {k: outcome.resources[k].group for k in keys}
    groups = outcome.groups
    abort_times = {str(e.group): e.mono for e in events if e.kind is EventKind.GROUP_ABORTING}

    def normal(key: ResourceKey, hook: Hook) -> list[TraceEntry]:
        return [e for e in calls[key] if e.hook is hook and e.aborting is None]

    def any_call(key: ResourceKey, hook: Hook) -> list[TraceEntry]:
        return [e for e in calls[key] if e.hook is hook]

    # Per resource: each hook at most once (non-aborting), in order.
    for key in keys:
        starts = []
        for hook in ORDER:
            got = normal(key, hook)
            assert len(got) <= 1, f"{key} {hook.value} ran {len(got)} times"
            if got:
                starts.append((hook, got[0]))
        for (h1, e1), (h2, e2) in itertools.pairwise(starts):
            assert ORDER.index(h1) < ORDER.index(h2)
            assert e1.end is not None and e1.end <= e2.start, f"{key}: {h1.value} before {h2.value}"

    for p, c in graph.edges:
        pk, ck = keys[p], keys[c]
        # prepare_begin(P) -> prepare_begin(C)
        for ec in any_call(ck, Hook.PREPARE_BEGIN):
            eps = normal(pk, Hook.PREPARE_BEGIN)
            assert eps, f"pb {ck} ran but its parent {pk}'s did not"
            if not outcome.resources[pk].thawed_early:
                assert eps[0].outcome == "ok", f"pb {ck} ran after {pk}'s failed"
                assert eps[0].end is not None and eps[0].end <= ec.start, f"pb {pk} -> pb {ck}"
        # prepare_finish(C) -> prepare_finish(P), unless P is aborting/thawing early.
        for ep in normal(pk, Hook.PREPARE_FINISH):
            for ec in any_call(ck, Hook.PREPARE_FINISH):
                if ec.aborting is None:
                    assert ec.end is not None and ec.end <= ep.start, f"pf {ck} -> pf {pk}"
        # complete(C) -> complete(P)
        for ep in normal(pk, Hook.COMPLETE):
            ecs = normal(ck, Hook.COMPLETE)
            assert ecs and ecs[0].outcome == "ok", f"complete {pk} ran without {ck}'s"
            assert ecs[0].end is not None and ecs[0].end <= ep.start, f"cp {ck} -> cp {pk}"

    # Barriers per group.
    members: dict[str, list[ResourceKey]] = defaultdict(list)
    for key in keys:
        members[group_of[key]].append(key)
    for name, group in groups.items():
        ks = members[name]
        mains = [e for k in ks for e in normal(k, Hook.MAIN)]
        if group.barrier is not BarrierPolicy.NONE and mains:
            first_main = min(e.start for e in mains)
            for k in ks:
                pfs = any_call(k, Hook.PREPARE_FINISH)
                for e in pfs:
                    assert e.end is not None and e.end <= first_main, f"main barrier in {name}: {k}"
        if group.barrier is BarrierPolicy.CUT:
            pfs = [e for k in ks for e in normal(k, Hook.PREPARE_FINISH)]
            if pfs:
                first_pf = min(e.start for e in pfs)
                for k in ks:
                    for e in normal(k, Hook.PREPARE_BEGIN):
                        assert e.end is not None and e.end <= first_pf, f"cut barrier {name}: {k}"
        aborted_at = abort_times.get(name)
        if aborted_at is not None:
            # Once a group is aborting, no main/complete and no cut starts in it.
            for k in ks:
                for e in calls[k]:
                    if e.aborting is None and e.hook is not Hook.PREPARE_BEGIN:
                        assert e.start <= aborted_at, f"{k} {e.hook.value} started after abort"

    # Guarantee 1: every resource whose on_prepare_begin started gets on_prepare_finish;
    # the thaw invariant: every quiesce start has a thaw end or a thaw_failed record.
    for key in keys:
        pb = any_call(key, Hook.PREPARE_BEGIN)
        if not pb:
            continue
        pfs = any_call(key, Hook.PREPARE_FINISH)
        status = outcome.resources[key].status
        if outcome.operation.value != "protect" or key[0] not in quiescing:
            continue
        thawed = [e for e in pfs if e.outcome == "ok" and e.start >= pb[0].start]
        assert thawed or status is ResourceStatus.THAW_FAILED, (
            f"{key} quiesced and was never thawed (status {status.value}, pf calls {pfs})"
        )

    # A resource reported succeeded ran every hook it has (or was thawed early).
    for key in keys:
        r = outcome.resources[key]
        if r.status is ResourceStatus.SUCCEEDED and not r.thawed_early:
            for hook in ORDER:
                if key in done_before:
                    break
                assert len(normal(key, hook)) == 1, f"{key} succeeded without {hook.value}"

    # Exactly once on success.
    if outcome.status is RunStatus.SUCCEEDED:
        for key in keys:
            r = outcome.resources[key]
            assert r.status is ResourceStatus.SUCCEEDED, f"{key} is {r.status.value}"
            if r.thawed_early:
                continue
            for hook in ORDER:
                got = normal(key, hook)
                assert len(got) == 1 and got[0].outcome == "ok", f"{key} {hook.value}: {got}"
