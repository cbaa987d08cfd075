"""Latency distributions of the SIMULATED cloud's calls (quiesce, snapshot, copy, create)."""

from __future__ import annotations

import enum
import math
import random

import attrs

__all__ = ["Distribution", "Latency", "LatencyProfile"]


class Distribution(enum.Enum):
    """The shape of a simulated latency."""

    ZERO = "zero"
    FIXED = "fixed"
    UNIFORM = "uniform"
    LOGNORMAL = "lognormal"


def _non_negative(_instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, not {value!r}")


@attrs.frozen
class Latency:
    """One simulated delay, in seconds: a base distribution plus uniform jitter.

    ``a`` and ``b`` mean, per distribution: ``FIXED`` value and unused;
    ``UNIFORM`` low and high; ``LOGNORMAL`` median and sigma (of the underlying
    normal). ``jitter`` adds a uniform ``[0, jitter)`` on top; ``cap`` clips the
    result (lognormal tails are long). Build one with the class methods.
    """

    kind: Distribution = Distribution.ZERO
    a: float = attrs.field(default=0.0, validator=_non_negative)
    b: float = attrs.field(default=0.0, validator=_non_negative)
    jitter: float = attrs.field(default=0.0, validator=_non_negative)
    cap: float | None = None

    @classmethod
    def zero(cls) -> Latency:
        return cls()

    @classmethod
    def fixed(cls, seconds: float, *, jitter: float = 0.0) -> Latency:
        return cls(Distribution.FIXED, seconds, 0.0, jitter)

    @classmethod
    def uniform(cls, low: float, high: float) -> Latency:
        if high < low:
            raise ValueError(f"uniform latency needs low <= high, got {low} > {high}")
        return cls(Distribution.UNIFORM, low, high)

    @classmethod
    def lognormal(
        cls, median: float, sigma: float, *, jitter: float = 0.0, cap: float | None = None
    ) -> Latency:
        return cls(Distribution.LOGNORMAL, median, sigma, jitter, cap)

    @property
    def is_zero(self) -> bool:
        """True when every sample is 0 (the hook then does not await at all)."""
        if self.jitter > 0:
            return False
        if self.kind is Distribution.ZERO:
            return True
        if self.kind is Distribution.UNIFORM:
            return self.b == 0
        return self.a == 0

    @property
    def spread(self) -> float:
        """The width of the distribution's support (``inf`` for an uncapped lognormal).

        This is the storage's own jitter against which barrier ``cut`` skew is judged.
        """
        if self.kind is Distribution.UNIFORM:
            base = self.b - self.a
        elif self.kind is Distribution.LOGNORMAL and self.b > 0:
            base = math.inf if self.cap is None else self.cap
        else:
            base = 0.0
        return base + self.jitter

    def sample(self, rng: random.Random) -> float:
        if self.kind is Distribution.ZERO:
            value = 0.0
        elif self.kind is Distribution.FIXED:
            value = self.a
        elif self.kind is Distribution.UNIFORM:
            value = rng.uniform(self.a, self.b)
        else:
            value = self.a * math.exp(rng.gauss(0.0, self.b)) if self.a > 0 else 0.0
        if self.jitter > 0:
            value += rng.uniform(0.0, self.jitter)
        if self.cap is not None:
            value = min(value, self.cap)
        return value


@attrs.frozen
class LatencyProfile:
    """The latencies of every simulated call. ``zero()`` for overhead runs.

    ``snapshot`` is the time from the snapshot call to the instant the storage
    takes the point-in-time image (the instant the storage records);
    ``snapshot_return`` is the time from that instant until the call returns.
    ``copy_chunk`` is per chunk copied to the bank; ``create`` per resource
    recreated by a restore; ``api`` is any other control-plane call (listing
    dependents, reading metadata).
    """

    quiesce: Latency = Latency()
    thaw: Latency = Latency()
    snapshot: Latency = Latency()
    snapshot_return: Latency = Latency()
    copy_chunk: Latency = Latency()
    create: Latency = Latency()
    api: Latency = Latency()

    @classmethod
    def zero(cls) -> LatencyProfile:
        return cls()

    @classmethod
    def realistic(cls) -> LatencyProfile:
        """A plausible private cloud, scaled down so that benchmarks stay short.

        Quiescing a guest (fsfreeze through an agent) takes tens of ms with a long
        tail; the array takes a snapshot 2-4 ms after the call (uniform, so its
        own jitter is 2 ms); copies move small chunks at a few ms each.
        """
        return cls(
            quiesce=Latency.lognormal(0.020, 0.4, cap=0.200),
            thaw=Latency.lognormal(0.005, 0.3, cap=0.050),
            snapshot=Latency.uniform(0.002, 0.004),
            snapshot_return=Latency.fixed(0.001, jitter=0.001),
            copy_chunk=Latency.lognormal(0.002, 0.3, cap=0.020),
            create=Latency.lognormal(0.010, 0.3, cap=0.100),
        )

    @classmethod
    def real_time(cls) -> LatencyProfile:
        """The same private cloud at the pace people see (``realistic()`` is it sped up).

        What the CLI's ``realistic`` latency and ``make demo`` use: quiescing a guest
        takes about half a second (a long tail, capped at 3 s), the array takes a
        snapshot 50-55 ms after the call (its own jitter is 5 ms), a chunk copies in
        about 0.2 s through the array's copy slots, a restore creates a resource in
        about 0.2 s. A protect of the 40-resource demo application lasts 3 to 10 s.
        """
        return cls(
            quiesce=Latency.lognormal(0.5, 0.4, cap=3.0),
            thaw=Latency.lognormal(0.1, 0.3, cap=0.5),
            snapshot=Latency.uniform(0.05, 0.055),
            snapshot_return=Latency.fixed(0.02, jitter=0.02),
            copy_chunk=Latency.lognormal(0.2, 0.3, cap=1.0),
            create=Latency.lognormal(0.2, 0.3, cap=1.0),
        )

    @property
    def is_zero(self) -> bool:
        return all(
            lat.is_zero
            for lat in (
                self.quiesce,
                self.thaw,
                self.snapshot,
                self.snapshot_return,
                self.copy_chunk,
                self.create,
                self.api,
            )
        )
