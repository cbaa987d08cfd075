"""Run the ``karbor-async`` command with the PostgreSQL plugin's cut held open.

``python -c "import pgholdcut; pgholdcut.main()" protect PLAN ...`` patches
``ProtectDatabase.on_prepare_finish`` so that, after the real cut (the snapshot
exported and held), it writes the file named by ``PG_HOLD_CUT_MARK`` and never
returns: a crash test can then kill the process *during* the cut, once it is proven
to be there (the mark, and the exporting session in ``pg_stat_activity``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import anyio
import anyio.to_thread

from karbor_async import HookContext
from karbor_postgres._protect import ProtectDatabase

_real_cut = ProtectDatabase.on_prepare_finish


async def _held_cut(self: ProtectDatabase, ctx: HookContext) -> None:
    await _real_cut(self, ctx)
    if ctx.aborting is None:
        mark = Path(os.environ["PG_HOLD_CUT_MARK"])
        await anyio.to_thread.run_sync(mark.write_text, ctx.run_id)
        await anyio.sleep_forever()


def main() -> None:
    ProtectDatabase.on_prepare_finish = _held_cut  # type: ignore[method-assign]
    from karbor_async._cli import main as cli

    sys.argv[0] = "karbor-async"
    cli()
