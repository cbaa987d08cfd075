"""Run the two-shard application: shard B, then shard A, each in a process of its own."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import attrs

from karbor_async import ConsistencyGroup, Plan, Resource, RunOutcome
from karbor_ledger._store import Invariant, invariant
from karbor_ledger._stores import SQLITE, Restored, SqliteFile, Store

__all__ = ["SHARD", "SQLITE", "LedgerApp", "ShardSpec", "running_ledger"]

SHARD = "Ledger::Shard"
"""The resource type of a shard (quiesces: pause at a safe point; thaw: resume)."""


def _as_store(store: Store | Path) -> Store:
    return SqliteFile(store) if isinstance(store, Path) else store


@attrs.frozen
class ShardSpec:
    name: str
    store: Store = attrs.field(converter=_as_store)
    """The shard's store (a :class:`Path` given here is an SQLite file's)."""
    socket: Path
    pause_latency: float

    @property
    def db(self) -> Path:
        """The store's file (an SQLite store, on a file system of the host's or in an
        image); a PostgreSQL store has none."""
        path = getattr(self.store, "path", None)
        if isinstance(path, Path):
            return path
        raise AttributeError(f"shard {self.name}'s store is a {self.store.kind} database")

    @property
    def resource(self) -> Resource:
        return Resource(
            SHARD,
            self.name,
            name=f"ledger shard {self.name}",
            extra={"socket": str(self.socket), **self.store.extra()},
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
        ``quiesce=False`` among them sets the shards' parameter instead. The stores'
        parameters (a PostgreSQL server's address and password reference) are added.
        """
        quiesce = kw.pop("quiesce", True)
        parameters: dict[str, Mapping[str, Any]] = {
            **self.a.store.plan_parameters(),
            **self.b.store.plan_parameters(),
            **kw.pop("parameters", {}),
        }
        parameters.setdefault(SHARD, {"quiesce": quiesce})
        return Plan(
            name=name,
            resources=self.resources(),
            groups=[ConsistencyGroup("ledger", [r.key for r in self.resources()])],
            parameters=parameters,
            **kw,
        )

    async def resolve_secret(self, name: str) -> str:
        """The engine's secret resolver for the stores' references (``Engine(secrets=)``)."""
        for spec in (self.a, self.b):
            value = await spec.store.resolve_secret(name)
            if value is not None:
                return value
        raise KeyError(f"no ledger store names the secret {name!r}")

    def restore_parameters(self, restore_dir: Path) -> dict[str, dict[str, Any]]:
        """Restore parameters putting both stores' restored copies in ``restore_dir``
        (a file store's; a PostgreSQL store is restored into a new database)."""
        out: dict[str, dict[str, Any]] = {}
        for spec in (self.a, self.b):
            for key, values in spec.store.restore_parameters(restore_dir).items():
                out.setdefault(key, {}).update(values)
        return out

    async def restored(self, outcome: RunOutcome) -> tuple[Restored, Restored]:
        """Where the restore run ``outcome`` put A's and B's stores."""
        return (await self.a.store.restored(outcome), await self.b.store.restored(outcome))

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

    async def check(self, a_db: Restored | None = None, b_db: Restored | None = None) -> Invariant:
        """The invariant over a pair of stores (by default the live ones): a restored
        SQLite file, PostgreSQL database (its name) or image, as the store's kind is."""
        return invariant(await self.a.store.read(a_db), await self.b.store.read(b_db))


_MAX_SOCKET_PATH = 100
"""Bytes; the kernel's limit for a Unix socket's path is 107."""


@asynccontextmanager
async def running_ledger(
    root: Path,
    *,
    pause_latency_a: float = 0.005,
    pause_latency_b: float = 0.040,
    rate: float = 400.0,
    gap: float = 0.002,
    seed: int = 0,
    stores: tuple[Store, Store] | None = None,
) -> AsyncIterator[LedgerApp]:
    """Start the application under ``root`` (sockets there; by default the stores too,
    SQLite files ``a.db`` and ``b.db``), yield it, and stop both shards on the way out.

    ``stores`` puts A's and B's stores elsewhere (see ``karbor_ledger._stores``): say
    A in a :class:`PostgresDatabase` and B in a :class:`FileOnFileSystem`.
    Shard A pauses in ``pause_latency_a`` seconds, B in ``pause_latency_b``: they
    differ by default, as two real services would.
    """
    root = Path(await anyio.Path(root).absolute())  # (the shards run in /)
    await anyio.Path(root).mkdir(parents=True, exist_ok=True)
    store_a, store_b = stores or (SqliteFile(root / "a.db"), SqliteFile(root / "b.db"))
    sockets = root
    if len(os.fsencode(root / "a.sock")) > _MAX_SOCKET_PATH:
        # A Unix socket's path has at most 107 bytes: put them in a short directory.
        sockets = Path(await anyio.to_thread.run_sync(lambda: tempfile.mkdtemp(prefix="ledger-")))
    app = LedgerApp(
        root=root,
        a=ShardSpec("A", store_a, sockets / "a.sock", pause_latency_a),
        b=ShardSpec("B", store_b, sockets / "b.sock", pause_latency_b),
    )
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
                sys.executable, "-m", "karbor_ledger", "shard", *spec.store.shard_args(),
                "--socket", str(spec.socket), "--pause-latency", str(spec.pause_latency),
                "--exit-with-parent", *extra,
            ]  # fmt: skip
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec.store.shard_env()}
            process = await anyio.open_process(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,
                env=env,
                cwd="/",
            )
            app.processes.append(process)
            await _ready(process, spec)
        yield app
    finally:
        with anyio.CancelScope(shield=True):
            for process in reversed(app.processes):
                if process.stdin is not None:  # the shard's cue to stop (cleanly)
                    await process.stdin.aclose()
                with anyio.move_on_after(5):
                    await process.wait()
                if process.returncode is None:
                    process.terminate()
                    with anyio.move_on_after(5):
                        await process.wait()
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                if process.stdout is not None:
                    await process.stdout.aclose()
            if sockets != root:
                await anyio.to_thread.run_sync(shutil.rmtree, sockets, True)


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
