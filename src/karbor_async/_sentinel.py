"""The dead-man sentinel: ``python -m karbor_async._sentinel`` (DESIGN.md guarantee 8).

One per engine, started by :mod:`karbor_async._safety` on first use, in a
session of its own, ignoring SIGINT, SIGHUP and SIGTERM, with ``/`` as its
working directory (it must never touch a frozen file system). It reads JSON
lines on stdin and answers on stdout:

- ``{"op": "arm", "id", "run", "resource", "command" | "function" + "args",
  "limit", "journal"}``: pre-imports the function (a thaw must not import from a
  file system that may be frozen), answers ``{"armed": id}`` or
  ``{"armed": id, "error": ...}``;
- ``{"op": "frozen", "id"}``: the resource is frozen; its ``limit`` (its
  quiesce budget plus the engine's margin, seconds, or ``null``: no limit)
  runs from now;
- ``{"op": "disarm", "id"}``: its thaw was recorded;
- ``{"op": "ship", "command", "input"}`` (a store without a file beside it, once,
  before any arm): when the sentinel ends having journaled a firing, it starts
  ``command`` in a session of its own and writes ``input`` and then a line with
  its journal's path to its stdin (the store's shipper: it copies the journal
  into the store, so that recovery on another host learns of the thaw). The
  input may hold a password: it is never written anywhere else.

A resource still armed when its limit passes is thawed and reported
(``{"fired": id, "at", "result"}``); end-of-file on stdin (the engine closed
it, or died) thaws every resource still armed, in the order they were armed,
and the sentinel exits. Each firing appends ``{run, resource, at, result}`` to
the journal given at arm time (beside the store's file, or this host's journal of a
store without one), flushed and synced.

Only the standard library is used here, and nothing is imported after the
arm; each thaw is bounded (``THAW_LIMIT`` seconds). The shipper is started only
after every thaw (nothing of this process waits for it).
"""

from __future__ import annotations

import importlib
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from typing import Any

__all__ = ["THAW_LIMIT", "main"]

THAW_LIMIT = 30.0
"""Seconds a safety thaw (command or function) may take before it is given up."""


class _Armed:
    __slots__ = (
        "args",
        "command",
        "function",
        "id",
        "journal",
        "limit",
        "resource",
        "run",
        "until",
    )

    def __init__(self, msg: dict[str, Any], function: Any) -> None:
        self.id = int(msg["id"])
        self.run = str(msg.get("run", ""))
        self.resource = msg.get("resource")
        self.command: list[str] | None = msg.get("command")
        self.function = function
        self.args: dict[str, Any] = dict(msg.get("args") or {})
        limit = msg.get("limit")
        self.limit: float | None = None if limit is None else float(limit)
        self.journal: str | None = msg.get("journal")
        self.until: float | None = None


def _load(spec: str) -> Any:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"function must be 'package.module:function', not {spec!r}")
    target: Any = importlib.import_module(module)
    for part in name.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{spec} is not callable")
    return target


def _thaw(a: _Armed) -> dict[str, Any]:
    """Run one safety thaw, bounded; never raises."""
    if a.command is not None:
        try:
            done = subprocess.run(
                a.command,
                cwd="/",
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=THAW_LIMIT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"timed out after {THAW_LIMIT:g} s"}
        except OSError as exc:
            return {"ok": False, "error": repr(exc)}
        out = (done.stdout + done.stderr).decode("utf-8", "replace")[-2000:]
        return {"ok": done.returncode == 0, "returncode": done.returncode, "output": out}
    box: dict[str, Any] = {"ok": False, "error": f"timed out after {THAW_LIMIT:g} s"}

    def call() -> None:
        try:
            returned = a.function(**a.args)
            box.clear()
            box.update(ok=True, returned=repr(returned)[:500])
        except BaseException as exc:  # the sentinel outlives any thaw
            box.clear()
            box.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])

    worker = threading.Thread(target=call, daemon=True)
    worker.start()
    worker.join(THAW_LIMIT)
    return dict(box)


def _journal(a: _Armed, at: float, result: dict[str, Any], why: str) -> None:
    if not a.journal:
        return
    line = json.dumps(
        {"run": a.run, "resource": a.resource, "at": at, "result": result, "why": why}
    )
    try:
        fd = os.open(a.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, (line + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        _SHIPPER.journals.add(a.journal)
    except OSError as exc:
        print(f"karbor sentinel: journal {a.journal}: {exc}", file=sys.stderr)


class _Shipper:
    """The store's shipper, started once the sentinel ends if it journaled a firing."""

    __slots__ = ("command", "input", "journals")

    def __init__(self) -> None:
        self.command: list[str] | None = None
        self.input = ""
        self.journals: set[str] = set()

    def start(self) -> None:
        if self.command is None or not self.journals:
            return
        data = self.input + "\n" + "\n".join(sorted(self.journals)) + "\n"
        try:
            proc = subprocess.Popen(  # not waited for: the sentinel's work is done
                self.command,
                cwd="/",
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            assert proc.stdin is not None
            proc.stdin.write(data.encode())
            proc.stdin.close()
        except OSError as exc:
            print(f"karbor sentinel: shipper {self.command[:3]}: {exc}", file=sys.stderr)


_SHIPPER = _Shipper()


def _say(out: Any, msg: dict[str, Any]) -> None:
    try:
        out.write(json.dumps(msg) + "\n")
        out.flush()
    except (OSError, ValueError):  # the engine is gone: the journal has it
        pass


def _fire(out: Any, a: _Armed, why: str) -> None:
    result = _thaw(a)
    at = time.time()
    _journal(a, at, result, why)
    _say(out, {"fired": a.id, "at": at, "result": result, "why": why})


def _handle(out: Any, armed: dict[int, _Armed], msg: dict[str, Any]) -> None:
    op = msg.get("op")
    ident = int(msg.get("id", -1))
    if op == "arm":
        try:
            function = None if msg.get("command") is not None else _load(str(msg["function"]))
            armed[ident] = _Armed(msg, function)
        except Exception as exc:
            _say(out, {"armed": ident, "error": f"{type(exc).__name__}: {exc}"})
        else:
            _say(out, {"armed": ident})
    elif op == "frozen":
        a = armed.get(ident)
        if a is not None and a.limit is not None:
            a.until = time.monotonic() + a.limit
    elif op == "disarm":
        armed.pop(ident, None)
    elif op == "ship":
        command = msg.get("command")
        if isinstance(command, list) and command and all(isinstance(c, str) for c in command):
            _SHIPPER.command = command
            _SHIPPER.input = str(msg.get("input") or "")


def main() -> None:
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    sys.dont_write_bytecode = True  # never write a .pyc (a frozen file system blocks it)
    os.chdir("/")
    out = sys.stdout
    fd = sys.stdin.fileno()
    os.set_blocking(fd, False)
    armed: dict[int, _Armed] = {}
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    _say(out, {"ready": os.getpid()})
    pending = b""
    while True:
        dues = [a.until for a in armed.values() if a.until is not None]
        timeout = None if not dues else max(0.0, min(dues) - time.monotonic())
        if sel.select(timeout):
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                continue
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.strip():
                    _handle(out, armed, json.loads(line))
        now = time.monotonic()
        for a in [a for a in armed.values() if a.until is not None and a.until <= now]:
            del armed[a.id]
            _fire(out, a, "limit")
    # End of file: the engine closed the pipe or died. Thaw what is still armed.
    for a in list(armed.values()):
        _fire(out, a, "engine_gone")
    _SHIPPER.start()


if __name__ == "__main__":
    main()
