"""What the barrier buys, on real data: the two-shard application protected while it writes.

For barriers ``none``, ``main`` and ``cut``, with the shards quiesced and without,
the live application (``plugins/ledger``: two processes, two SQLite stores,
hundreds of transfers a second) is protected repeatedly; each checkpoint is
restored and the restored pair checked. Reported per configuration: the share of
restored pairs that break the invariant, by how much they are off, the skew
between the two stores' cuts, and the application's pause (the longest quiesce
window, and the transfers it could not make while paused).
"""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path

from benchmarks._report import fmt_ms, table
from karbor_async import Engine, FsBank, SqliteStore
from karbor_ledger import running_ledger
from karbor_ledger.proof import ProofSample, protect_restore_check

CONFIGS: tuple[tuple[str, bool], ...] = tuple(
    (barrier, quiesce) for quiesce in (True, False) for barrier in ("none", "main", "cut")
)


def _label(barrier: str, quiesce: bool) -> str:
    return f"{barrier}, {'quiesce' if quiesce else 'no quiesce'}"


async def run_consistency(protects: int) -> dict[tuple[str, bool], list[ProofSample]]:
    """``protects`` protect-restore-check rounds per configuration, interleaved."""
    samples: dict[tuple[str, bool], list[ProofSample]] = {c: [] for c in CONFIGS}
    with tempfile.TemporaryDirectory(prefix="karbor-bench-ledger-") as tmp:
        root = Path(tmp)
        async with (
            running_ledger(root / "app") as app,
            SqliteStore.open(root / "karbor.db") as store,
            Engine(store=store, bank=FsBank(root / "bank")) as engine,
        ):
            for i in range(protects):
                for barrier, quiesce in CONFIGS:
                    sample = await protect_restore_check(
                        engine,
                        app,
                        root / f"restored-{i}-{barrier}-{quiesce}",
                        barrier=barrier,
                        quiesce=quiesce,
                    )
                    samples[(barrier, quiesce)].append(sample)
                    await engine.delete(sample.protect.checkpoint_id)
    return samples


def _median_ms(values: Sequence[float]) -> str:
    return fmt_ms(statistics.median(values)) if values else "-"


def consistency_section(
    samples: dict[tuple[str, bool], list[ProofSample]], out: Path, suffix: str
) -> tuple[list[str], str | None]:
    """The report's table (and the headline plot's file name, if one was drawn)."""
    rows: list[list[str]] = []
    shares: dict[str, float] = {}
    offs: dict[str, list[int]] = {}
    for config in CONFIGS:
        got = samples[config]
        broken = [s for s in got if not s.invariant.holds]
        label = _label(*config)
        shares[label] = len(broken) / len(got) if got else 0.0
        offs[label] = [abs(s.invariant.off_by) for s in broken]
        windows = [s.longest_window for s in got if s.longest_window is not None]
        rows.append(
            [
                label,
                f"{len(broken)} of {len(got)} ({shares[label]:.0%})",
                (
                    f"{statistics.median(offs[label]):.0f} [{min(offs[label])}-{max(offs[label])}]"
                    if broken
                    else "-"
                ),
                _median_ms([s.skew for s in got if s.skew is not None]),
                _median_ms(windows),
                fmt_ms(max(windows)) if windows else "-",
                f"{statistics.median([s.missed for s in got]):.0f}" if got else "-",
            ]
        )
    lines = [
        "## What the barrier buys: restored pairs of a live two-shard application",
        "",
        "The ledger application (`plugins/ledger`) runs as two processes with an SQLite store "
        "each; shard A debits, yields, then asks shard B to credit, hundreds of times a second. "
        "Each protect (one consistency group: both shards, their stores as dependents) is "
        "restored and the restored pair checked: the balances add up only if both stores were "
        "cut at one consistent point. Configurations run interleaved, round after round. "
        "Shard A pauses in 5 ms, shard B in 40 ms (two services rarely pause alike).",
        "",
        *table(
            [
                "barrier, quiesce",
                "broken restores",
                "off by (median [range])",
                "cut skew, ms (median)",
                "longest pause, ms (median)",
                "longest pause, ms (max)",
                "transfers missed while paused (median)",
            ],
            rows,
        ),
        "",
        "Reading it: under `cut` with quiesce, both shards pause before either store is cut, "
        "so no restored pair is broken. Under `none` and `main`, shard A can resume and send a "
        "credit before B has paused, so B's cut holds a credit whose debit A's lacks. Under "
        "`cut` the shards also stay paused until both stores are cut (thaws wait for the "
        "group's cuts). Without "
        "quiesce, any barrier cuts transfers in flight. The price of the proof is the pause: "
        "the application stops making transfers for the longest window shown.",
        "",
    ]
    plot = _plot(out / f"consistency{suffix}.png", shares, offs)
    return lines, plot


def _plot(path: Path, shares: dict[str, float], offs: dict[str, list[int]]) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels = list(shares)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.4), dpi=110)
    colours = ["#2a7" if shares[k] == 0 else "#d54" for k in labels]
    left.barh(labels, [shares[k] * 100 for k in labels], color=colours)
    for pos, k in enumerate(labels):
        text = f"{shares[k]:.0%}" if shares[k] else "0%: every pair consistent"
        left.text(min(shares[k] * 100, 80) + 1, pos, text, va="center", fontsize=8)
    left.set_xlim(0, 100)
    left.set_xlabel("restored pairs that break the invariant (%)")
    left.invert_yaxis()
    left.set_title("Consistency of restored pairs")
    positions = list(range(1, len(labels) + 1))
    for pos, k in zip(positions, labels, strict=True):
        values = offs[k]
        if not values:
            right.text(0, pos, "none broken", va="center", fontsize=8, color="#2a7")
            continue
        right.scatter(values, [pos] * len(values), s=12, alpha=0.5, color="#d54")
        right.plot([statistics.median(values)] * 2, [pos - 0.3, pos + 0.3], color="black")
    right.set_yticks(positions, labels)
    right.set_ylim(len(labels) + 0.5, 0.5)
    right.set_xlabel("how far a broken pair is off (money units)")
    right.set_title("By how much")
    fig.text(0.01, 0.01, "live two-shard ledger on SQLite; see RESULTS.md", fontsize=7, alpha=0.7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path.name


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.consistency [--protects N] [--out DIR]``: this section alone,
    written to ``CONSISTENCY.md`` and ``consistency.png`` in ``--out`` (``benchmarks/``)."""
    import argparse
    import shlex
    import sys

    import anyio

    from benchmarks._report import environment
    from benchmarks._workload import quiet_logging

    ap = argparse.ArgumentParser(prog="python -m benchmarks.consistency")
    ap.add_argument("--protects", type=int, default=50, help="protects per configuration")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = ap.parse_args(sys.argv[1:] if argv is None else argv)
    quiet_logging()
    samples = anyio.run(run_consistency, args.protects, backend="asyncio")
    lines, plot = consistency_section(samples, args.out, "")
    command = shlex.join(["python", "-m", "benchmarks.consistency", *(argv or sys.argv[1:])])
    header = environment(command, Path(__file__).resolve().parents[1])
    picture = [f"![{plot}]({plot})", ""] if plot else []
    (args.out / "CONSISTENCY.md").write_text("\n".join([*header, "", *picture, *lines]) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
