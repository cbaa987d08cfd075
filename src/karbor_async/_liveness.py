"""Whether the process a lease names still runs: host, pid and the process's start time.

A lease owner is ``host:pid:start:nonce`` (``start`` is field 22 of
``/proc/<pid>/stat``, the process's start time in clock ticks since boot). On
the same host, an owner is gone when no process has that pid with that start
time: its leases can be taken over at once instead of after they expire. An
owner on another host (or in the older ``host:pid:nonce`` form, with no start
time) is alive until its lease expires.
"""

from __future__ import annotations

import os
import socket
import uuid

__all__ = ["owner_gone", "owner_name", "process_start", "this_process"]


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot), or None if it is gone
    (or a zombie) or the system has no ``/proc``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()  # after the command, which may hold spaces
    if not fields or fields[0] == b"Z":
        return None
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def owner_name() -> str:
    """This process as a lease owner: host, pid, start time and a nonce (one per store)."""
    pid = os.getpid()
    start = process_start(pid)
    return (
        f"{socket.gethostname()}:{pid}:{start if start is not None else 0}:{uuid.uuid4().hex[:8]}"
    )


_THIS: dict[int, str] = {}


def this_process() -> str:
    """This process as an owner (one name per process: a forked child gets its own)."""
    pid = os.getpid()
    name = _THIS.get(pid)
    if name is None:
        name = _THIS[pid] = owner_name()
    return name


def owner_gone(owner: str) -> bool:
    """True only when ``owner`` names a process of this host that no longer runs."""
    parts = owner.split(":")
    if len(parts) != 4 or parts[0] != socket.gethostname():
        return False
    try:
        pid, start = int(parts[1]), int(parts[2])
    except ValueError:
        return False
    if start == 0 or not os.path.exists("/proc/self/stat"):
        return False  # no start time known: only expiry tells
    return process_start(pid) != start
