"""Collector treatments: how the cyclic garbage collector is set for one measured run.

Issue 19: each floor runs with the same collector treatment as the engine in a
comparison, and both treatments are reported. Every run starts from a collected,
frozen heap (``gc.collect(); gc.freeze()``), so that the generated cloud and
earlier runs do not weigh on the collector's full scans; then

- ``Treatment.ON``: the collector stays enabled during the run (the engine, with
  its default ``quiet_gc``, may still hold it off for parts of its run: that is
  the engine's own doing and is counted in the ``collections`` it reports);
- ``Treatment.OFF``: ``gc.disable()`` around the run, for floors and engine alike
  (an engine that holds the collector off for its whole run is measured against
  floors in this treatment).

:class:`GcWatch` counts the collections that happened during a run and the time
they took (``gc.callbacks``), so a report can say which treatment the engine
really ran under.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import time
from collections.abc import Iterator
from typing import Any

import attrs

__all__ = ["GcWatch", "Treatment", "parse_treatments", "treated"]


class Treatment(enum.Enum):
    ON = "on"
    OFF = "off"

    @property
    def label(self) -> str:
        """Short, for table headers."""
        return "collector on" if self is Treatment.ON else "collector off"

    @property
    def description(self) -> str:
        if self is Treatment.ON:
            return (
                "heap collected and frozen (`gc.collect(); gc.freeze()`) before the run, "
                "collector enabled during it"
            )
        return (
            "heap collected and frozen before the run, collector disabled around it "
            "(`gc.disable()`), for floors and engine alike"
        )


def parse_treatments(text: str) -> tuple[Treatment, ...]:
    """``on``, ``off`` or ``both`` (the command line's ``--treatment``)."""
    if text == "both":
        return (Treatment.ON, Treatment.OFF)
    return (Treatment(text),)


@attrs.define
class GcWatch:
    """Collections seen between :meth:`start` and :meth:`stop`, per generation, and their time."""

    counts: list[int] = attrs.field(factory=lambda: [0, 0, 0])
    seconds: float = 0.0
    _began: float = 0.0
    _on: bool = False

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._began
            self.counts[int(info["generation"])] += 1

    def start(self) -> None:
        if not self._on:
            gc.callbacks.append(self._callback)
            self._on = True

    def stop(self) -> None:
        if self._on:
            gc.callbacks.remove(self._callback)
            self._on = False

    @property
    def total(self) -> int:
        return sum(self.counts)

    @property
    def full(self) -> int:
        """Generation-2 (full) collections."""
        return self.counts[2]


@contextlib.contextmanager
def treated(treatment: Treatment) -> Iterator[GcWatch]:
    """Collect and freeze the heap, apply ``treatment``, watch the collector; undo after."""
    gc.collect()
    gc.freeze()
    was_enabled = gc.isenabled()
    if treatment is Treatment.OFF:
        gc.disable()
    watch = GcWatch()
    watch.start()
    try:
        yield watch
    finally:
        watch.stop()
        if treatment is Treatment.OFF and was_enabled:
            gc.enable()
        gc.unfreeze()
