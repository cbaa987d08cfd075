"""The engine's side of the dead-man sentinel (DESIGN.md guarantee 8).

A quiescing ``on_prepare_begin`` calls ``ctx.arm_safety_thaw(...)`` before it
freezes. The first arm starts the engine's sentinel (``python -m
karbor_async._sentinel``, see that module for the protocol), in a task of the
engine's task group, shielded, which owns the process and its pipes: a writer
task sends what the engine says, the serving task reads what the sentinel
answers. Nothing here blocks the event loop (anyio's subprocess streams).

The sentinel learns of the engine's death by end-of-file on its stdin, which
only this process holds (pipes are not inherited by other children). Closing
the engine closes that pipe after every run has ended and thawed, so what the
sentinel still holds armed then (a ``thaw_failed`` resource) is thawed by it.

Each firing is journaled where the store says (:func:`journal_for`): beside a
store that has a file (``<store path>.sentinel.jsonl``), or, for a store without
one (PostgreSQL), in a file of this host per sentinel, named by the engine's and
the sentinel's pid and start time, in a directory keyed by the store, which the
sentinel's *shipper* (a command the store names, started by the sentinel once it
has thawed what it held) copies into the store, so that recovery by a replica on
another host learns of it too. Recovery reads the entries of the runs it
recovers (:func:`recorded_firings`) and forgets them once done
(:func:`forget_firings`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import anyio
import anyio.abc
import anyio.to_thread
import attrs
from anyio.streams.buffered import BufferedByteReceiveStream
from anyio.streams.memory import MemoryObjectSendStream

from karbor_async._liveness import process_start
from karbor_async._log import get_logger
from karbor_async._types import ResourceKey

__all__ = [
    "JOURNAL_SUFFIX",
    "Armed",
    "SafetyThaws",
    "SentinelJournal",
    "forget",
    "forget_firings",
    "journal_for",
    "journal_path",
    "read_journal",
    "recorded_firings",
]

_log = get_logger("karbor_async.safety")

JOURNAL_SUFFIX = ".sentinel.jsonl"
_START_LIMIT = 30.0
"""Seconds the sentinel may take to start (it imports the package once)."""
_ARM_LIMIT = 30.0
"""Seconds an arm may take (the sentinel imports a thaw function's module)."""
_CLOSE_LIMIT = 70.0
"""Seconds closing waits for the sentinel to thaw what is still armed and exit."""
_LINE = 1 << 20

Fired = Callable[[Mapping[str, Any], float], None]
"""Told when the sentinel fired a resource's safety thaw: (result, wall-clock instant)."""


@attrs.frozen
class SentinelJournal:
    """Where a sentinel journals its firings: one file (``path``), or a file of its own in
    ``directory``; ``ship`` (a command) reads ``ship_input`` and the sentinel's journal
    path on stdin and copies the journal into the store, once the sentinel is done."""

    path: str | None = None
    directory: str | None = None
    ship: tuple[str, ...] | None = None
    ship_input: str | None = attrs.field(default=None, repr=False)
    """(It may hold the store's password: it goes through pipes only, never argv or logs.)"""

    def file_for(self, sentinel_pid: int) -> str | None:
        """The journal of the sentinel ``sentinel_pid`` (a child of this process)."""
        if self.path is not None or self.directory is None:
            return self.path
        me = os.getpid()
        name = (
            f"{me}.{process_start(me) or 0}.{sentinel_pid}."
            f"{process_start(sentinel_pid) or 0}{JOURNAL_SUFFIX}"
        )
        return os.path.join(self.directory, name)


class _JournalStore(Protocol):
    """A store that keeps the sentinel's firings itself (``PostgresStore``)."""

    def sentinel_journal(self) -> SentinelJournal | None: ...

    async def sentinel_firings(self, run_id: str) -> dict[ResourceKey, dict[str, Any]]: ...

    async def forget_sentinel_firings(self, run_id: str) -> None: ...


def journal_path(store: object) -> str | None:
    """Where the sentinel journals its firings beside a store that has a file."""
    path = getattr(store, "path", None)
    if path is None:
        return None
    return str(path) + JOURNAL_SUFFIX


def journal_for(store: object) -> SentinelJournal | None:
    """Where the engine's sentinel journals firings for ``store`` (None: nowhere, a store
    that dies with its process)."""
    own = getattr(store, "sentinel_journal", None)
    if own is not None:
        journal: SentinelJournal | None = own()
        return journal
    path = journal_path(store)
    return None if path is None else SentinelJournal(path=path)


async def recorded_firings(store: object, run_id: str) -> dict[ResourceKey, dict[str, Any]]:
    """The firings sentinels journaled for ``run_id`` (the last one per resource)."""
    if hasattr(store, "sentinel_firings"):
        return await cast("_JournalStore", store).sentinel_firings(run_id)
    path = journal_path(store)
    if path is None:
        return {}
    return await anyio.to_thread.run_sync(read_journal, path, run_id)


async def forget_firings(store: object, run_id: str) -> None:
    """Recovery recorded ``run_id``'s firings on the run: the journal lets them go."""
    if hasattr(store, "forget_sentinel_firings"):
        await cast("_JournalStore", store).forget_sentinel_firings(run_id)
        return
    path = journal_path(store)
    if path is not None:
        await anyio.to_thread.run_sync(forget, path, run_id)


def read_journal(path: str, run_id: str) -> dict[ResourceKey, dict[str, Any]]:
    """The firings journaled for ``run_id``, per resource (the last one of each)."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return {}
    found: dict[ResourceKey, dict[str, Any]] = {}
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a torn last line (the sentinel died writing it)
        if isinstance(entry, dict) and entry.get("run") == run_id and entry.get("resource"):
            rtype, rid = entry["resource"]
            found[(str(rtype), str(rid))] = entry
    return found


def forget(path: str, run_id: str) -> None:
    """Drop ``run_id``'s entries from the journal (recovery handled them); atomic."""
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return
    kept = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("run") != run_id:
            kept.append(line)
    if not kept:
        Path(path).unlink(missing_ok=True)
        return
    tmp = f"{path}.tmp{os.getpid()}"
    Path(tmp).write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


class Armed:
    """One armed safety thaw: told when the resource is frozen, disarmed once thawed."""

    __slots__ = ("_owner", "active", "ident", "on_fired")

    def __init__(self, owner: SafetyThaws, ident: int, on_fired: Fired | None) -> None:
        self._owner = owner
        self.ident = ident
        self.on_fired = on_fired
        self.active = True

    def frozen(self) -> None:
        """The resource is frozen: its limit (budget + margin) runs from now."""
        if self.active:
            self._owner.send({"op": "frozen", "id": self.ident})

    def disarm(self) -> None:
        """Its thaw was recorded: the sentinel lets it go."""
        if self.active:
            self.active = False
            self._owner.forget(self)


class _Reply:
    __slots__ = ("error", "event")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.error: str | None = None


def _check_spec(
    command: Sequence[str] | None, function: str | None, args: Mapping[str, Any] | None
) -> dict[str, Any]:
    if (command is None) == (function is None):
        raise ValueError("arm_safety_thaw takes either command=[...] or function='pkg.mod:func'")
    if command is not None:
        if isinstance(command, str) or not command or not all(isinstance(c, str) for c in command):
            raise ValueError(f"command must be a non-empty list of strings, not {command!r}")
        if args:
            raise ValueError("args go with function=, not with command=")
        return {"command": list(command)}
    if not isinstance(function, str) or ":" not in function:
        raise ValueError(f"function must be 'package.module:function', not {function!r}")
    try:
        json.dumps(dict(args or {}))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"args must be JSON-able: {exc}") from exc
    return {"function": function, "args": dict(args or {})}


class SafetyThaws:
    """The engine's sentinel: started on first arm, closed with the engine."""

    def __init__(
        self, tg: anyio.abc.TaskGroup, margin: float, journal: SentinelJournal | None
    ) -> None:
        self._tg = tg
        self.margin = margin
        """Seconds past a quiesce budget before the sentinel thaws (``Engine(safety_margin=)``)."""
        self._journal = journal
        self.journal: str | None = None
        """The journal file of this engine's sentinel (known once it runs)."""
        self.pid: int | None = None
        """The sentinel's process id once it runs."""
        self._started: anyio.Event | None = None
        self._failure: str | None = None
        self._send: MemoryObjectSendStream[bytes] | None = None
        self._next = 0
        self._replies: dict[int, _Reply] = {}
        self._armed: dict[int, Armed] = {}
        self._done = anyio.Event()

    @property
    def armed(self) -> int:
        """How many safety thaws the sentinel holds now."""
        return len(self._armed)

    async def arm(
        self,
        *,
        run_id: str,
        resource: ResourceKey,
        command: Sequence[str] | None,
        function: str | None,
        args: Mapping[str, Any] | None,
        limit: float | None,
        on_fired: Fired | None,
    ) -> Armed:
        """Hand one resource's safety thaw to the sentinel; returns once it is armed."""
        spec = _check_spec(command, function, args)
        await self._ensure()
        self._next += 1
        ident = self._next
        reply = self._replies[ident] = _Reply()
        self.send(
            {
                "op": "arm",
                "id": ident,
                "run": run_id,
                "resource": list(resource),
                "limit": limit,
                "journal": self.journal,
                **spec,
            }
        )
        try:
            with anyio.fail_after(_ARM_LIMIT):
                await reply.event.wait()
        finally:
            self._replies.pop(ident, None)
        if reply.error is not None:
            raise RuntimeError(f"the sentinel did not arm the safety thaw: {reply.error}")
        armed = self._armed[ident] = Armed(self, ident, on_fired)
        return armed

    def send(self, msg: Mapping[str, Any]) -> None:
        if self._send is None:
            return
        # (Closed or broken: the sentinel is gone, and it fired everything it held.)
        with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._send.send_nowait((json.dumps(msg) + "\n").encode())

    def forget(self, armed: Armed) -> None:
        self._armed.pop(armed.ident, None)
        self.send({"op": "disarm", "id": armed.ident})

    async def _ensure(self) -> None:
        if self._started is None:
            self._started = anyio.Event()
            try:
                await self._tg.start(self._serve)
            except Exception as exc:
                self._failure = f"the sentinel could not start: {exc!r}"
                raise RuntimeError(self._failure) from exc
            finally:
                self._started.set()
        else:
            await self._started.wait()
        if self._failure is not None:
            raise RuntimeError(self._failure)

    async def aclose(self) -> None:
        """Close the sentinel's pipe (it thaws what it still holds) and wait for it to end."""
        send, self._send = self._send, None
        if send is None:
            return
        with anyio.CancelScope(shield=True):
            await send.aclose()
            with anyio.move_on_after(_CLOSE_LIMIT):
                await self._done.wait()

    async def _serve(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        env = _environment()
        with anyio.CancelScope(shield=True):
            proc = await anyio.open_process(
                [sys.executable, "-m", "karbor_async._sentinel"],
                stdin=-1,
                stdout=-1,
                stderr=-3,  # (subprocess.PIPE, PIPE, DEVNULL)
                cwd="/",
                start_new_session=True,
                env=env,
            )
            try:
                assert proc.stdout is not None
                assert proc.stdin is not None
                lines = BufferedByteReceiveStream(proc.stdout)
                with anyio.fail_after(_START_LIMIT):
                    hello = json.loads(await lines.receive_until(b"\n", _LINE))
                self.pid = int(hello["ready"])
                send, receive = anyio.create_memory_object_stream[bytes](math.inf)
                self._send = send
                await self._prepare_journal()
                _log.info("sentinel_started", pid=self.pid, journal=self.journal)
                task_status.started()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_write, proc.stdin, receive)
                    await self._read(lines)
                    tg.cancel_scope.cancel()
            except Exception as exc:
                if self.pid is None:
                    raise
                _log.error("sentinel_failed", pid=self.pid, error=repr(exc))
            finally:
                self._failure = self._failure or "the sentinel has ended"
                for reply in self._replies.values():
                    reply.error = self._failure
                    reply.event.set()
                if self._armed and self._send is not None:
                    _log.error("sentinel_ended_while_armed", pid=self.pid, armed=len(self._armed))
                self._send = None
                with anyio.move_on_after(_CLOSE_LIMIT):
                    await proc.aclose()
                self._done.set()

    async def _prepare_journal(self) -> None:
        """The sentinel runs: name its journal, make its directory, tell it the shipper."""
        spec = self._journal
        if spec is None or self.pid is None:
            return
        self.journal = spec.file_for(self.pid)
        if spec.directory is not None:
            await anyio.to_thread.run_sync(
                functools.partial(os.makedirs, spec.directory, mode=0o700, exist_ok=True)
            )
        if spec.ship is not None:
            self.send({"op": "ship", "command": list(spec.ship), "input": spec.ship_input or ""})

    async def _read(self, lines: BufferedByteReceiveStream) -> None:
        while True:
            try:
                line = await lines.receive_until(b"\n", _LINE)
            except (anyio.EndOfStream, anyio.IncompleteRead):
                return
            msg = json.loads(line)
            if "armed" in msg:
                reply = self._replies.get(int(msg["armed"]))
                if reply is not None:
                    reply.error = msg.get("error")
                    reply.event.set()
            elif "fired" in msg:
                self._fired(msg)

    def _fired(self, msg: Mapping[str, Any]) -> None:
        armed = self._armed.pop(int(msg["fired"]), None)
        result = msg.get("result") or {}
        if armed is None or armed.on_fired is None:
            _log.error(
                "safety_thaw_fired",
                why=msg.get("why"),
                ok=result.get("ok"),
                error=result.get("error"),
            )
            return
        armed.active = False
        try:
            armed.on_fired(result, float(msg.get("at", 0.0)))
        except Exception:  # an engine bug must not stop the sentinel's reader
            _log.exception("safety_thaw_report_failed")


async def _write(stdin: anyio.abc.ByteSendStream, receive: Any) -> None:
    try:
        async with receive:
            async for data in receive:
                await stdin.send(data)
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass
    finally:
        with anyio.CancelScope(shield=True):
            await stdin.aclose()


def _environment() -> dict[str, str]:
    """The sentinel imports thaw functions as this process does, from ``/`` as its cwd."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(os.path.abspath(p) for p in sys.path if p)
    return env
