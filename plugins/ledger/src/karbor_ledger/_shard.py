"""One shard of the sample application: a process owning one store and a control socket.

The store is an SQLite file (``--db``) or a PostgreSQL database (``--pg``); see
``_backends.py``. Either way the shard's event loop never blocks on it.

Shard A makes transfers: it debits one of its accounts, yields (the transfer is
half-done for that while), then asks shard B over B's socket to credit one of
B's accounts, and waits for B's answer before the next transfer. So the two
stores' balances add up to their opening total only when no transfer is in flight.

Both shards answer on their socket, one line per request:

``PAUSE``
    stop at a safe point and answer ``PAUSED`` (A: after the transfer in flight
    has been credited, starting no new one; both: after the shard's pause latency,
    the time an application takes to flush). The pause lasts while *that
    connection* is open: ``RESUME`` (answer ``RESUMED``) or the connection's end
    resumes it, so a pause whose holder died ends by itself (a session-bound
    quiesce: nothing stays frozen when the engine is killed).
``STATS``
    one JSON line: transfers made, transfers the application could not make
    while paused, pauses and the longest one.
``CREDIT ID ACCOUNT AMOUNT`` (B only, from A)
    apply a credit and answer ``OK ID``. B applies credits whether paused or not:
    its only writes are the ones A asks for, so it is A's pause that stops them.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import attrs
from anyio.streams.buffered import BufferedByteReceiveStream

from karbor_ledger._backends import Backend, open_backend
from karbor_ledger._store import ACCOUNTS

__all__ = ["Shard", "ShardConfig"]

_MAX_LINE = 4096


@attrs.frozen
class ShardConfig:
    role: str
    """``a`` (makes transfers) or ``b`` (applies credits)."""
    db: Path | None
    """The SQLite store's file (``None`` with ``pg``)."""
    socket: Path
    peer: Path | None = None
    """B's socket (A only)."""
    pause_latency: float = 0.005
    """Seconds from a pause request to the shard's answer, once at a safe point."""
    rate: float = 400.0
    """A: transfers started per second at most."""
    gap: float = 0.002
    """A: seconds between a transfer's debit and its credit request."""
    seed: int = 0
    pg: str | None = None
    """A PostgreSQL store instead: a libpq URL without the password, which comes from
    ``PGPASSWORD`` in the shard's environment (never on its command line)."""


class _Lines:
    """A line protocol over one connected byte stream."""

    def __init__(self, stream: anyio.abc.ByteStream) -> None:
        self.stream = stream
        self._buffer = BufferedByteReceiveStream(stream)

    async def read(self) -> str | None:
        """The next line, or ``None`` at the end of the stream."""
        try:
            return (await self._buffer.receive_until(b"\n", _MAX_LINE)).decode()
        except (anyio.EndOfStream, anyio.IncompleteRead, anyio.BrokenResourceError):
            return None

    async def write(self, line: str) -> None:
        await self.stream.send(line.encode() + b"\n")


class Shard:
    """The shard's state; :meth:`run` serves until cancelled."""

    def __init__(self, config: ShardConfig) -> None:
        self.config = config
        self._store: Backend | None = None
        self._pausers = 0
        self._in_flight = False
        self._idle = anyio.Event()
        self._idle.set()
        self._paused_since: float | None = None
        self.transfers = 0
        self.missed_while_paused = 0
        self.pauses = 0
        self.longest_pause = 0.0
        self._random = random.Random(config.seed)

    async def run(self, ready: Callable[[], Awaitable[None]] | None = None) -> None:
        cfg = self.config
        self._store = await open_backend(cfg)
        cfg.socket.unlink(missing_ok=True)
        listener = await anyio.create_unix_listener(cfg.socket)
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(listener.serve, self._serve)
                if cfg.role == "a":
                    assert cfg.peer is not None
                    peer = _Lines(await _connect_retrying(cfg.peer))
                    await self._finish_last_transfer(peer)
                    tg.start_soon(self._transfer_loop, peer)
                if ready is not None:
                    await ready()
        finally:
            await listener.aclose()
            if self._store is not None:
                with anyio.CancelScope(shield=True):
                    await self._store.close()

    # -- the application's own work -----------------------------------------------------
    @property
    def store(self) -> Backend:
        assert self._store is not None
        return self._store

    async def _finish_last_transfer(self, peer: _Lines) -> None:
        """A shard stopped (even killed) between a debit and its credit left the pair
        inconsistent: on start, ask B again for the last transfer's credit (B applies a
        credit once, so a credit it already has changes nothing)."""
        found = await self.store.last_transfer()
        if found is not None:
            tid, amount = found
            await peer.write(f"CREDIT {tid} {tid % ACCOUNTS} {-amount}")
            if await peer.read() != f"OK {tid}":
                raise RuntimeError(f"shard B refused to finish transfer {tid}")

    async def _transfer_loop(self, peer: _Lines) -> None:
        cfg = self.config
        interval = 1.0 / cfg.rate
        next_id = await self.store.last_id()
        while True:
            started = time.monotonic()
            if self._pausers:
                self.missed_while_paused += 1
            else:
                next_id += 1
                await self._transfer(peer, next_id)
            await anyio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def _transfer(self, peer: _Lines, tid: int) -> None:
        account = self._random.randrange(ACCOUNTS)
        amount = self._random.randint(1, 100)
        self._in_flight = True
        self._idle = anyio.Event()
        try:
            await self.store.debit(tid, account, amount)
            await anyio.sleep(self.config.gap)  # half-done: debited, not yet credited
            await peer.write(f"CREDIT {tid} {tid % ACCOUNTS} {amount}")
            answer = await peer.read()
            if answer != f"OK {tid}":
                raise RuntimeError(f"shard B answered {answer!r} to the credit of {tid}")
            self.transfers += 1
        finally:
            self._in_flight = False
            self._idle.set()

    async def _credit(self, tid: int, account: int, amount: int) -> None:
        await self.store.credit(tid, account, amount)
        self.transfers += 1

    # -- the socket ---------------------------------------------------------------------
    async def _serve(self, stream: anyio.abc.ByteStream) -> None:
        lines = _Lines(stream)
        async with stream:
            while (line := await lines.read()) is not None:
                words = line.split()
                if words == ["PAUSE"]:
                    await self._pause(lines)
                    return
                if words == ["STATS"]:
                    await lines.write(json.dumps(self.stats()))
                elif words[:1] == ["CREDIT"] and len(words) == 4 and self.config.role == "b":
                    tid, account, amount = (int(w) for w in words[1:])
                    await self._credit(tid, account, amount)
                    await lines.write(f"OK {tid}")
                else:
                    await lines.write(f"ERROR unknown request {line!r}")

    async def _pause(self, lines: _Lines) -> None:
        """Pause while this connection holds it: until ``RESUME`` or the connection ends."""
        self._pausers += 1
        try:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    # the holder's end (EOF) resumes at once, even while still pausing
                    async def watch() -> None:
                        request = await lines.read()
                        if request == "RESUME":
                            await lines.write("RESUMED")
                        scope.cancel()

                    tg.start_soon(watch)
                    await self._idle.wait()  # A: the transfer in flight is credited
                    await anyio.sleep(self.config.pause_latency)
                    if self._paused_since is None:
                        self._paused_since = time.monotonic()
                        self.pauses += 1
                    await lines.write("PAUSED")
                    await anyio.sleep_forever()
        finally:
            self._pausers -= 1
            if not self._pausers and self._paused_since is not None:
                self.longest_pause = max(self.longest_pause, time.monotonic() - self._paused_since)
                self._paused_since = None

    def stats(self) -> dict[str, Any]:
        return {
            "role": self.config.role,
            "transfers": self.transfers,
            "missed_while_paused": self.missed_while_paused,
            "pauses": self.pauses,
            "longest_pause_s": round(self.longest_pause, 6),
            "paused": self._pausers > 0,
        }


async def _connect_retrying(path: Path) -> anyio.abc.ByteStream:
    """Connect to shard B, waiting up to 10 s for it to listen."""
    with anyio.fail_after(10):
        while True:
            try:
                return await anyio.connect_unix(path)
            except OSError:
                await anyio.sleep(0.02)
