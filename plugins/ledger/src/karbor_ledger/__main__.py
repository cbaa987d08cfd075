"""``python -m karbor_ledger shard ...`` runs one shard; ``... check A B`` checks a pair."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import anyio

from karbor_ledger._shard import Shard, ShardConfig
from karbor_ledger._store import Invariant, invariant
from karbor_ledger._stores import read_located


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m karbor_ledger")
    sub = parser.add_subparsers(dest="command", required=True)
    shard = sub.add_parser("shard", help="run one shard (prints READY when it serves)")
    shard.add_argument("--role", choices=("a", "b"), required=True)
    store = shard.add_mutually_exclusive_group(required=True)
    store.add_argument("--db", type=Path, help="an SQLite store (its file)")
    store.add_argument(
        "--pg",
        metavar="URL",
        help="a PostgreSQL store: postgresql://USER@HOST:PORT/DBNAME (password: PGPASSWORD)",
    )
    shard.add_argument("--socket", type=Path, required=True)
    shard.add_argument("--peer", type=Path, help="shard B's socket (role a)")
    shard.add_argument("--pause-latency", type=float, default=0.005)
    shard.add_argument("--rate", type=float, default=400.0)
    shard.add_argument("--gap", type=float, default=0.002)
    shard.add_argument("--seed", type=int, default=0)
    shard.add_argument(
        "--exit-with-parent",
        action="store_true",
        help="exit when standard input ends (the parent that started it died)",
    )
    check = sub.add_parser(
        "check",
        help="does a pair of stores keep the invariant?",
        description="Each store is an SQLite file's path, a PostgreSQL database "
        "(postgresql://USER@HOST:PORT/DBNAME, password from PGPASSWORD) or IMAGE:/PATH, "
        "the SQLite file PATH inside the ext4 image IMAGE (read without mounting it).",
    )
    check.add_argument("a", help="shard A's store")
    check.add_argument("b", help="shard B's store")
    check.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "check":

        async def both() -> Invariant:
            return invariant(await read_located(args.a), await read_located(args.b))

        try:
            result = anyio.run(both)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except Exception as exc:  # a store that cannot be read (a server, an image): say so
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        if args.json:
            print(
                json.dumps(
                    {
                        "holds": result.holds,
                        "off_by": result.off_by,
                        "half_done": result.half_done,
                        "transfers": result.debits,
                    }
                )
            )
        else:
            print(result.describe())
        return 0 if result.holds else 1
    if args.role == "a" and args.peer is None:
        print("error: shard a needs --peer (shard b's socket)", file=sys.stderr)
        return 2
    config = ShardConfig(
        role=args.role,
        db=args.db,
        socket=args.socket,
        peer=args.peer,
        pause_latency=args.pause_latency,
        rate=args.rate,
        gap=args.gap,
        seed=args.seed,
        pg=args.pg,
    )

    async def ready() -> None:
        print("READY", flush=True)

    async def serve() -> None:
        async with anyio.create_task_group() as tg:

            async def until_orphaned() -> None:
                # The parent holds our stdin: its end (even by kill -9) ends the shard,
                # so no orphan keeps writing to stores a later start also writes.
                await anyio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)
                tg.cancel_scope.cancel()

            if args.exit_with_parent:
                tg.start_soon(until_orphaned)
            await Shard(config).run(ready)
            tg.cancel_scope.cancel()

    try:
        anyio.run(serve)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
