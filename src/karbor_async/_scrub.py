"""Keeping resolved secrets out of everything a run stores, emits, logs or raises.

A run adds each secret value it resolves for a hook; from then on every string
it writes (event data, progress messages, saved info, error chains, log fields,
the exceptions it raises) has the value replaced by ``***`` wherever it appears
literally, as its ``repr()`` body, as the body of its UTF-8 bytes' ``repr()``,
or percent-encoded. A plugin exception whose text held a value reaches the
caller as a :class:`~karbor_async.exceptions.ScrubbedError`.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import quote, quote_plus

from karbor_async.exceptions import ScrubbedError

__all__ = ["MASK", "Scrubber", "ScrubbingLogger"]

MASK = "***"


def _spellings(value: str) -> set[str]:
    return {
        value,
        repr(value)[1:-1],
        repr(value.encode())[2:-1],
        quote(value, safe=""),
        quote_plus(value, safe=""),
    }


class Scrubber:
    """The secret values one run resolved, and the ways to take them out of text."""

    __slots__ = ("_known", "_pattern", "active")

    def __init__(self) -> None:
        self._known: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self.active = False
        """Some value is known (a plain attribute: read for every event)."""

    def add(self, values: Iterable[Any]) -> None:
        new = {str(v) for v in values if v is not None and str(v)} - self._known
        if not new:
            return
        self._known |= new
        spellings = {s for v in self._known for s in _spellings(v) if s}
        # Longest first, so a value is masked whole before any of its parts.
        alternatives = sorted(spellings, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(s) for s in alternatives))
        self.active = True

    def text(self, text: str) -> str:
        pattern = self._pattern
        return text if pattern is None else pattern.sub(MASK, text)

    def touches(self, text: str) -> bool:
        pattern = self._pattern
        return pattern is not None and pattern.search(text) is not None

    def data(self, value: Any) -> Any:
        """``value`` with every string in it (mapping keys too, nested) scrubbed."""
        if self._pattern is None:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {self.data(k): self.data(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.data(v) for v in value)
        return value

    def exception(self, exc: BaseException) -> BaseException:
        """``exc`` itself, or a :class:`ScrubbedError` if its chain's text held a secret."""
        if self._pattern is None:
            return exc
        full = "".join(traceback.format_exception(exc))
        if not self.touches(full):
            return exc
        scrubbed = ScrubbedError(type(exc).__name__, self.text(str(exc)))
        scrubbed.add_note(self.text(full.rstrip()))
        return scrubbed


class ScrubbingLogger:
    """``ctx.log`` once the run resolved secrets: fields and messages are scrubbed first."""

    __slots__ = ("_log", "_scrub")

    def __init__(self, log: Any, scrub: Scrubber) -> None:
        self._log = log
        self._scrub = scrub

    def bind(self, **kw: Any) -> ScrubbingLogger:
        return ScrubbingLogger(self._log.bind(**self._scrub.data(kw)), self._scrub)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._log, name)
        if not callable(method):
            return method
        scrub = self._scrub

        def call(*args: Any, **kw: Any) -> Any:
            return method(*scrub.data(list(args)), **scrub.data(kw))

        return call
