"""The two verdicts of the consistency proof, shared by every store set's proof tests."""

from __future__ import annotations

from collections.abc import Sequence

from karbor_ledger.proof import ProofSample


def assert_all_consistent(samples: Sequence[ProofSample], label: str) -> None:
    """Every restored pair holds, the application kept writing, and each shard paused."""
    broken = [s.invariant.describe() for s in samples if not s.invariant.holds]
    assert broken == []
    transfers = [s.invariant.debits for s in samples]
    assert transfers == sorted(transfers) and transfers[-1] > transfers[0]  # it kept writing
    assert all(s.longest_window is not None for s in samples)
    print(
        f"{len(samples)} of {len(samples)} restored pairs{label} consistent; "
        f"{transfers[0]}..{transfers[-1]} transfers in the restored stores"
    )


def assert_caught(samples: Sequence[ProofSample], label: str) -> None:
    """Without quiesce at least one restored pair is broken, by a transfer in flight."""
    broken = [s for s in samples if not s.invariant.holds]
    print(
        f"quiesce off{label}: {len(broken)} of {len(samples)} restored pairs inconsistent "
        f"(catch rate {len(broken) / len(samples):.0%}); off by "
        f"{sorted(s.invariant.off_by for s in broken)}"
    )
    assert broken, f"{len(samples)} protects with quiesce off never caught a transfer in flight"
    # what breaks is a transfer in flight: a debit in A's store with no credit in B's
    assert all(s.invariant.half_done >= 1 for s in broken)
