"""The vendor-facing testing helpers behave like the engine's side of a context."""

from __future__ import annotations

from karbor_async import AbortReason, Hook, HookContext, OperationKind, Resource
from karbor_async.testing import make_context


class _Op:
    async def on_main(self, ctx: HookContext) -> None:
        await ctx.bank.put("data/0001", b"abc")
        ctx.save(copied=3, attempt=ctx.attempt)
        ctx.report_progress(1.0, done=3, total=3)

    async def on_prepare_finish(self, ctx: HookContext) -> None:
        if ctx.aborting:
            ctx.mark_thawed()
            return
        ctx.mark_cut()

    async def on_complete(self, ctx: HookContext) -> None:
        await ctx.report_restored(f"new-{ctx.resource.id}")


async def test_make_context_records_what_a_hook_did() -> None:
    """A hook called directly saves, reports and writes to a bank section as under the engine."""
    vol = Resource("OS::Cinder::Volume", "v1")
    ctx, rec = make_context(vol, Hook.MAIN, attempt=2, children=(), parents=())
    await _Op().on_main(ctx)
    assert rec.saved[vol.key] == {"copied": 3, "attempt": 2}
    assert rec.progress_reports == [(1.0, 3, 3, None)]
    assert await ctx.bank.get("data/0001") == b"abc"
    assert ctx.operation is OperationKind.PROTECT and ctx.run_id == "test-run"


async def test_make_context_shares_state_through_the_recorder() -> None:
    vol = Resource("OS::Cinder::Volume", "v1")
    ctx, rec = make_context(vol, Hook.PREPARE_FINISH, aborting=AbortReason.FAILURE)
    await _Op().on_prepare_finish(ctx)
    assert set(rec.marks) == {"thawed"}
    ctx2, rec2 = make_context(vol, Hook.COMPLETE, operation=OperationKind.RESTORE, recorder=rec)
    await _Op().on_complete(ctx2)
    assert rec2.restored == {vol.key: "new-v1"}
    assert ctx2.restored_id(vol) == "new-v1"
    assert ctx2.bank.read_only
