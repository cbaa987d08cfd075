"""Run the two-shard application: shard B, then shard A, each in a process of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import attrs

from karbor_async import ConsistencyGroup, Plan, Resource
from karbor_ledger._store import Invariant, check_pair

__all__ = ["SHARD", "SQLITE", "LedgerApp", "ShardSpec", "running_ledger"]

SHARD = "Ledger::Shard"
"""The resource type of a shard (quiesces: pause at a safe point; thaw: resume)."""
SQLITE = "SQLite::Database"
"""The resource type of a shard's store (protected by the karbor-async-sqlite plugin)."""


@attrs.frozen
class ShardSpec:
    name: str
    db: Path
    socket: Path
    pause_latency: float

    @property
    def resource(self) -> Resource:
        return Resource(
            SHARD,
            self.name,
            name=f"ledger shard {self.name}",
            extra={"socket": str(self.socket), "db": str(self.db)},
        )


@attrs.define
class LedgerApp:
    """The running application: its shards, their processes, and what to protect."""

    root: Path
    a: ShardSpec
    b: ShardSpec
    processes: list[anyio.abc.Process] = attrs.Factory(list)

    def resources(self) -> list[Resource]:
        return [self.a.resource, self.b.resource]

    def plan(self, name: str = "ledger", **kw: Any) -> Plan:
        """A plan protecting both shards (and so their stores) as one consistency group.

        ``kw`` goes to :class:`Plan` (``barrier=``, ``timeouts=``...); a
        ``quiesce=False`` among them sets the shards' parameter instead.
        """
        quiesce = kw.pop("quiesce", True)
        parameters: dict[str, Mapping[str, Any]] = dict(kw.pop("parameters", {}))
        parameters.setdefault(SHARD, {"quiesce": quiesce})
        return Plan(
            name=name,
            resources=self.resources(),
            groups=[ConsistencyGroup("ledger", [r.key for r in self.resources()])],
            parameters=parameters,
            **kw,
        )

    async def stats(self) -> dict[str, dict[str, Any]]:
        """Each shard's counters (``STATS``)."""
        out: dict[str, dict[str, Any]] = {}
        for spec in (self.a, self.b):
            async with await anyio.connect_unix(spec.socket) as stream:
                await stream.send(b"STATS\n")
                data = b""
                while not data.endswith(b"\n"):
                    data += await stream.receive()
            out[spec.name] = json.loads(data)
        return out

    async def check(self, a_db: Path | None = None, b_db: Path | None = None) -> Invariant:
        """The invariant over a pair of stores (by default the live ones)."""
        return await anyio.to_thread.run_sync(check_pair, a_db or self.a.db, b_db or self.b.db)


@asynccontextmanager
async def running_ledger(
    root: Path,
    *,
    pause_latency_a: float = 0.005,
    pause_latency_b: float = 0.040,
    rate: float = 400.0,
    gap: float = 0.002,
    seed: int = 0,
) -> AsyncIterator[LedgerApp]:
    """Start the application under ``root`` (stores ``a.db``, ``b.db``; sockets beside
    them), yield it, and stop both shards on the way out.

    Shard A pauses in ``pause_latency_a`` seconds, B in ``pause_latency_b``: they
    differ by default, as two real services would.
    """
    await anyio.Path(root).mkdir(parents=True, exist_ok=True)
    app = LedgerApp(
        root=root,
        a=ShardSpec("A", root / "a.db", root / "a.sock", pause_latency_a),
        b=ShardSpec("B", root / "b.db", root / "b.sock", pause_latency_b),
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        for spec, extra in (
            (app.b, ["--role", "b"]),
            (
                app.a,
                [
                    "--role",
                    "a",
                    "--peer",
                    str(app.b.socket),
                    "--rate",
                    str(rate),
                    "--gap",
                    str(gap),
                    "--seed",
                    str(seed),
                ],
            ),
        ):
            command = [
                sys.executable, "-m", "karbor_ledger", "shard", "--db", str(spec.db),
                "--socket", str(spec.socket), "--pause-latency", str(spec.pause_latency),
                *extra,
            ]  # fmt: skip
            process = await anyio.open_process(
                command, stdout=subprocess.PIPE, stderr=None, env=env, cwd="/"
            )
            app.processes.append(process)
            await _ready(process, spec)
        yield app
    finally:
        with anyio.CancelScope(shield=True):
            for process in reversed(app.processes):
                if process.returncode is None:
                    process.terminate()
                with anyio.move_on_after(5):
                    await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                if process.stdout is not None:
                    await process.stdout.aclose()


async def _ready(process: anyio.abc.Process, spec: ShardSpec) -> None:
    assert process.stdout is not None
    with anyio.fail_after(30):
        line = b""
        while not line.endswith(b"\n"):
            try:
                line += await process.stdout.receive(64)
            except anyio.EndOfStream:
                raise RuntimeError(
                    f"ledger shard {spec.name} exited before serving (code {await process.wait()})"
                ) from None
    if line.strip() != b"READY":
        raise RuntimeError(f"ledger shard {spec.name} said {line!r} instead of READY")
