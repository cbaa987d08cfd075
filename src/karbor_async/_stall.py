"""Detecting a blocked event loop while it is blocked, and naming who blocked it.

A monitor thread posts a tiny callback into the loop every ``threshold / 2``
seconds (``call_soon_threadsafe`` on asyncio, the trio token's
``run_sync_soon`` on trio). When one has not run ``threshold`` seconds after it
was posted, the loop is *stalled*: the thread samples the loop thread's stack
(``sys._current_frames()``) and names the culprit: ``gc`` during a collection
(``gc.callbacks``), the hook whose engine frame (``Run._call``) is on the stack,
``engine`` for engine code, or ``application``.

The thread only reads: the frames, and a flag. Everything the stall changes
(events, deadlines, the blamed hook's charge) is done on the loop thread, when
the loop runs again: by the posted callback, or by a run's watcher, which
settles a stall before it looks at any deadline (whichever runs first).
A thread is the only way to see a stall while it lasts, since nothing on the
loop runs then; it never touches engine state (see ``docs/design.md``).
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
import threading
import time
import types
from collections.abc import Callable
from typing import Any

import attrs
import sniffio

__all__ = ["Stall", "StallMonitor"]

_ENGINE_DIR = os.path.dirname(os.path.abspath(__file__))


@attrs.frozen
class Stall:
    """One stall, settled on the loop thread."""

    seconds: float
    culprit: str
    """``hook``, ``gc``, ``engine`` or ``application``."""
    node: Any = None
    """The blamed resource task (the scheduler's node) when ``culprit`` is ``hook``."""
    hook: Any = None
    """The blamed hook (a ``Hook``)."""
    token: int = -1
    """The blamed call's token (the node's ``token`` while that call ran)."""
    frame: str | None = None
    """The innermost frame outside the engine: ``file:line in function``."""


class _GcFlag:
    """Whether a collection is running (one callback for the process)."""

    running = False
    _installed = False
    _lock = threading.Lock()

    @classmethod
    def install(cls) -> None:
        with cls._lock:
            if not cls._installed:
                cls._installed = True
                gc.callbacks.append(cls._callback)

    @classmethod
    def _callback(cls, phase: str, _info: dict[str, Any]) -> None:
        cls.running = phase == "start"


class StallMonitor:
    """One per engine: the thread, and the stall it is watching (if any)."""

    def __init__(
        self,
        threshold: float,
        call_code: types.CodeType,
        settle: Callable[[Stall], None],
    ) -> None:
        self.threshold = threshold
        self._call_code = call_code
        self._settle_cb = settle
        self._interval = threshold / 2
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._posted_at = 0.0
        self._acked_at = 0.0
        self._since: float | None = None
        """When the stall being watched began (the post the loop did not answer)."""
        self.stalling = False
        """A stall is under way or not yet settled (a plain attribute: read on every
        hook's return)."""
        self._sample: tuple[str, Any, Any, int, str | None] | None = None
        self._loop_thread = threading.get_ident()
        self._post: Callable[[Callable[[], None]], Any] | None = None
        self._thread: threading.Thread | None = None

    # -- loop side -----------------------------------------------------------------------
    def start(self) -> None:
        """Start watching the running loop (call from the loop)."""
        if sniffio.current_async_library() == "trio":
            import trio

            self._post = trio.lowlevel.current_trio_token().run_sync_soon
        else:
            self._post = asyncio.get_running_loop().call_soon_threadsafe
        self._loop_thread = threading.get_ident()
        _GcFlag.install()
        self._thread = threading.Thread(
            target=self._watch, name="karbor-async-stall-monitor", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def blamed(self) -> tuple[Any, int, float] | None:
        """(node, call token, since when) the stall under way is blamed on, if a hook."""
        sample, since = self._sample, self._since
        if sample is None or since is None or sample[0] != "hook":
            return None
        return sample[1], sample[3], since

    def catch_up(self) -> None:
        """Settle a stall the loop has just come out of (loop thread; cheap when none)."""
        if self._since is not None:
            self._settle(time.monotonic())

    def _ack(self) -> None:
        now = time.monotonic()
        self._acked_at = now
        if self._since is not None:
            self._settle(now)

    def _settle(self, now: float) -> None:
        with self._lock:
            since, sample = self._since, self._sample
            self._since = self._sample = None
            self.stalling = False
        if since is None:
            return
        seconds = now - since
        if seconds <= self.threshold:
            return
        culprit, node, hook, token, frame = sample or ("application", None, None, -1, None)
        self._settle_cb(Stall(seconds, culprit, node, hook, token, frame))

    # -- thread side ---------------------------------------------------------------------
    def _watch(self) -> None:
        post = self._post
        assert post is not None
        while not self._stop.is_set():
            if self._acked_at >= self._posted_at:  # the last one was answered: post again
                self._posted_at = time.monotonic()
                try:
                    post(self._ack)
                except RuntimeError:  # the loop is closed
                    return
            self._stop.wait(self._interval)
            now = time.monotonic()
            if self._acked_at < self._posted_at and now - self._posted_at > self.threshold:
                sample = self._classify()
                with self._lock:
                    if self._since is None:
                        self._since = self._posted_at
                        self.stalling = True
                    if self._sample is None or self._sample[0] != "hook":
                        self._sample = sample

    def _classify(self) -> tuple[str, Any, Any, int, str | None]:
        if _GcFlag.running:
            return ("gc", None, None, -1, None)
        frame: types.FrameType | None = sys._current_frames().get(self._loop_thread)
        outside: str | None = None
        in_engine = False
        while frame is not None:
            code = frame.f_code
            if code is self._call_code:
                local = frame.f_locals  # read-only use: the node, the hook, the call's token
                node = local.get("n")
                return ("hook", node, local.get("hook"), getattr(node, "token", -1), outside)
            if code.co_filename.startswith(_ENGINE_DIR):
                in_engine = True
            elif outside is None:
                outside = f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"
            frame = frame.f_back
        return ("engine" if in_engine else "application", None, None, -1, None)
