"""The benchmark report's bookkeeping: the README's headline block and issue 19's verdicts.

No timing is asserted here (benchmarks are not tests); these check that the
harness copies what it measured and judges it against the right limits.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
from benchmarks import headline
from benchmarks._gc import Treatment, treated
from benchmarks._issue19 import HEADLINE_BEGIN, HEADLINE_END, Issue19
from benchmarks._measure import MemProbe, Overhead, Sample

BLOCK = f"{HEADLINE_BEGIN}\n| a | b |\n{HEADLINE_END}"


def test_headline_block_replaces_only_what_lies_between_the_markers(tmp_path: Path) -> None:
    """Writing the block keeps the README around it and is idempotent."""
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{HEADLINE_BEGIN}\nold table\n{HEADLINE_END}\n\noutro\n")
    report = f"# report\n\n{BLOCK}\n\nmore\n"
    headline.write(readme, headline.extract(report))
    once = readme.read_text()
    assert once == f"intro\n\n{BLOCK}\n\noutro\n"
    headline.write(readme, headline.extract(report))
    assert readme.read_text() == once


def test_headline_refuses_a_readme_without_exactly_one_block() -> None:
    """A README without the markers (or with two blocks) is not written into."""
    with pytest.raises(ValueError, match="exactly one"):
        headline.replace("no markers here", BLOCK)
    with pytest.raises(ValueError, match="exactly one"):
        headline.replace(f"{BLOCK}\n{BLOCK}", BLOCK)


def test_collector_off_treatment_disables_and_restores_the_collector() -> None:
    """``Treatment.OFF`` disables the collector for the run and gives it back after."""
    assert gc.isenabled()
    with treated(Treatment.OFF) as watch:
        assert not gc.isenabled()
        gc.collect()  # an explicit collection is still seen by the watch
    assert gc.isenabled()
    assert watch.total >= 1
    with treated(Treatment.ON):
        assert gc.isenabled()


def _samples(name: str, seconds: float, skew: float, build: float = 0.0) -> list[Sample]:
    return [Sample(name, 1000, seconds, skew, build_seconds=build) for _ in range(3)]


def _overhead() -> Overhead:
    res = Overhead()
    for n in (1_000, 100_000):
        for t in Treatment:
            res.samples[(n, "floor-asyncio", t)] = _samples("floor-asyncio", 1.0, 0.010)
            res.samples[(n, "floor-anyio", t)] = _samples("floor-anyio", 2.0, 0.020)
            res.samples[(n, "engine-cut", t)] = _samples("engine-cut", 2.4, 0.030, 0.5)
            res.samples[(n, "engine-cut+events", t)] = _samples(
                "engine-cut+events", 2.8, 0.050, 0.5
            )
    for t in Treatment:
        res.rss[(100_000, "floor-anyio", t)] = MemProbe(4.0, 0.0)
        res.rss[(100_000, "engine-cut", t)] = MemProbe(5.0, 0.0)
        res.rss[(100_000, "engine-cut+events", t)] = MemProbe(5.2, 0.0, 900_000, 1.0)
    return res


def test_issue19_verdicts_name_each_miss_with_its_number() -> None:
    """Ratios come from paired samples; a miss says where and by how much."""
    targets = Issue19(
        _overhead(),
        {},
        overhead_ns=(1_000, 100_000),
        rss_ns=(100_000,),
        realistic_ns=(),
        treatments=(Treatment.ON, Treatment.OFF),
        cpu="Test CPU",
    )
    rows = {row[0]: row for row in targets.rows()}
    (a,) = (r for k, r in rows.items() if k.startswith("(a) 100,000"))
    assert a[2].startswith("3.30x (3.30 s against 1.00 s; Test CPU)")  # (2.8 + 0.5) / 1.0
    assert a[3] == "**missed**: 3.30x > 2x"
    (no_events,) = (r for k, r in rows.items() if k.startswith("(b) run (`execute`)"))
    assert no_events[2] == "1,000: 1.20x, 100,000: 1.20x (raw asyncio: 2.40x, 2.40x)"
    assert no_events[3] == "met"
    (memory,) = (r for k, r in rows.items() if k.startswith("(c) peak RSS"))
    assert memory[2] == "100,000: 1.30x (5.20 against 4.00 KB)"
    assert memory[3] == "met"
    (skew,) = (
        r for k, r in rows.items() if k.startswith("(b) cut skew against the anyio floor's, e")
    )
    assert skew[3] == "**missed**: 1,000: 2.50x > 2x, 100,000: 2.50x > 2x"
    block = targets.headline("today")
    assert block[0] == HEADLINE_BEGIN
    assert block[-1] == HEADLINE_END
