"""docs/plugins.md as a vendor uses it: its plugin packaged, found, run by the CLI and tested.

The guide's ``docs-module`` blocks are the plugin package ``mycloud_karbor``; its
``docs-entry-points`` TOML block is the package's entry points. They are assembled
into a throwaway distribution (a directory with the module and a ``.dist-info``,
as pip would leave it; no pip, no network), which a plain ``Engine()`` finds.
"""

from __future__ import annotations

import enum
import importlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path
from typing import Any

import anyio
import pytest

import karbor_async
import karbor_async.testing
from karbor_async import EventKind, Hook, SqliteStore

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "plugins.md"
MODULE_BLOCK = re.compile(r"<!-- docs-module: [\w-]+ -->\s*```python\n(.*?)```", re.DOTALL)
PYTEST_BLOCK = re.compile(r"<!-- docs-pytest: ([\w.]+) -->\s*```python\n(.*?)```", re.DOTALL)
ENTRY_POINTS = re.compile(r"<!-- docs-entry-points -->\s*```toml\n(.*?)```", re.DOTALL)
SERVER, VOLUME = "MyCloud::Server", "MyCloud::Volume"
PLAN = """\
name = "app"
resources = [{ type = "MyCloud::Server", id = "s1" }]

[parameters."MyCloud::Volume"]
array_password = "array-pw"
"""


def _install(root: Path) -> Path:
    """The guide's package as an installed distribution: ``site/`` for ``PYTHONPATH``."""
    guide = GUIDE.read_text()
    groups = tomllib.loads(ENTRY_POINTS.findall(guide)[0])["project"]["entry-points"]
    modules = {ref.partition(":")[0] for group in groups.values() for ref in group.values()}
    assert modules == {"mycloud_karbor"}, modules
    site = root / "site"
    dist = site / "mycloud_karbor-1.0.dist-info"
    dist.mkdir(parents=True)
    (site / "mycloud_karbor.py").write_text("\n\n".join(MODULE_BLOCK.findall(guide)))
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: mycloud-karbor\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "".join(
            f"[{group}]\n" + "".join(f"{name} = {ref}\n" for name, ref in eps.items()) + "\n"
            for group, eps in groups.items()
        )
    )
    return site


def _env(site: Path, **extra: str) -> dict[str, str]:
    """For a ``python -S`` child that sees the guide's package, karbor_async and the
    installed dependencies, but no other karbor-async plugin (whatever else this
    environment has installed, consistent with this tree or not)."""
    deps = site.parent / "deps"
    if not deps.exists():
        deps.mkdir()
        dirs = {Path(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
        for entry in sorted(e for d in dirs if d.is_dir() for e in d.iterdir()):
            eps = entry / "entry_points.txt"
            if entry.suffix == ".pth" or (deps / entry.name).exists():
                continue
            if eps.is_file() and "[karbor_async.prot" in eps.read_text():
                continue  # another plugin distribution
            (deps / entry.name).symlink_to(entry)
    src = Path(karbor_async.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (site, src, deps))), **extra}
    for name in ("KARBOR_SIMCLOUD", "KARBOR_DB", "KARBOR_BANK", "KARBOR_SECRET_ARRAY_PW"):
        if name not in extra:
            env.pop(name, None)
    return env


def _cli() -> list[str]:
    """The ``karbor-async`` command of this interpreter's environment, run with ``-S``."""
    script = Path(sys.executable).with_name("karbor-async")
    if script.exists():
        return [sys.executable, "-S", str(script)]
    return [sys.executable, "-S", "-c", "from karbor_async._cli import main; main()"]


def _run(args: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    done = subprocess.run(
        [*_cli(), *args, "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    result: dict[str, Any] = json.loads(done.stdout)
    assert result["exit_code"] == 0, result
    outcome: dict[str, Any] = result["outcome"]
    return outcome


@pytest.mark.slow
def test_the_guide_plugin_is_protected_restored_and_deleted_by_the_cli(tmp_path: Path) -> None:
    """Installed from the guide, found by entry points: protect (the protectable finds the
    volumes), restore without the protect-and-delete secret, delete with it."""
    site = _install(tmp_path)
    (tmp_path / "plan.toml").write_text(PLAN)
    where = ["--db", str(tmp_path / "karbor.db"), "--bank", str(tmp_path / "bank")]
    vault = _env(site, KARBOR_SECRET_ARRAY_PW="s3cret")
    protected = _run(["protect", "plan.toml", *where], vault, tmp_path)
    cp = protected["run_id"]
    assert protected["status"] == "succeeded"
    assert sorted(r["resource"]["id"] for r in protected["resources"]) == ["s1", "v1", "v2"]
    restored = _run(
        ["restore", cp, "--param", f"{VOLUME}.restore_pool=bronze", *where], _env(site), tmp_path
    )
    run = restored["run_id"]
    assert sorted(map(tuple, restored["restored"])) == [
        (SERVER, "s1", f"srv-{run}-s1"),
        (VOLUME, "v1", f"vol-{run}-v1"),
        (VOLUME, "v2", f"vol-{run}-v2"),
    ]
    deleted = _run(["delete", cp, *where], vault, tmp_path)

    async def stored() -> None:
        async with SqliteStore.open(tmp_path / "karbor.db") as store:
            assert (await store.get_checkpoint(cp)).status == "deleted"
            checkpoint = await store.load_saved_info(cp)
            assert checkpoint[(VOLUME, "v1")] == {"snapshot": f"snap-{cp}-v1", "pool": "gold"}
            of_restore = await store.load_saved_info(run)
            assert of_restore[(VOLUME, "v2")] == {"pool": "bronze", "bytes": 4096}
            assert sorted(of_restore[(SERVER, "s1")]["volumes"]) == [
                f"vol-{run}-v1",
                f"vol-{run}-v2",
            ]
            events = await store.read_events(deleted["run_id"])
            mains = {
                e.resource
                for e in events
                if e.kind is EventKind.FINISHED and e.hook is Hook.MAIN and e.resource
            }
            assert mains == {(VOLUME, "v1"), (VOLUME, "v2")}  # the server has no delete

    anyio.run(stored, backend="asyncio")
    assert not (tmp_path / "bank" / cp).exists()


@pytest.mark.slow
def test_the_guide_pytest_file_passes_on_asyncio_and_trio(tmp_path: Path) -> None:
    """The guide's conftest.py and test file, run by pytest with anyio's own plugin against
    the installed package: run_hooks and a plain Engine(), each on both backends."""
    site = _install(tmp_path)
    tests = tmp_path / "vendor_tests"
    tests.mkdir()
    blocks = PYTEST_BLOCK.findall(GUIDE.read_text())
    assert [name for name, _code in blocks] == ["conftest.py", "test_mycloud.py"]
    for name, code in blocks:
        (tests / name).write_text(code)
    done = subprocess.run(
        [sys.executable, "-S", "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
        capture_output=True,
        text=True,
        env=_env(site),
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    ran = re.findall(r"(test_\w+)\[(asyncio|trio)\]", done.stdout) or done.stdout
    assert "4 passed" in done.stdout, ran


def _public_enums() -> dict[str, type[enum.StrEnum]]:
    found: dict[str, type[enum.StrEnum]] = {}
    for module in (karbor_async, karbor_async.testing):
        for name in module.__all__:
            obj = getattr(module, name)
            if isinstance(obj, type) and issubclass(obj, enum.StrEnum):
                found[name] = obj
    return found


def test_the_guide_enum_table_is_the_enums() -> None:
    """Section 10's table lists every public enum, where to import it from and its values,
    in definition order."""
    guide = GUIDE.read_text()
    start = guide.index("<!-- docs-enum-table -->")
    table = guide[start : guide.index("\n\n", start)].splitlines()[3:]
    rows: dict[str, tuple[str, list[str]]] = {}
    for row in table:
        names, modules, values = (re.findall(r"`([^`]+)`", cell) for cell in row.split(" | "))
        rows[names[0]] = (modules[0], values)
    assert set(rows) == set(_public_enums())
    for name, (module, listed) in rows.items():
        cls = getattr(importlib.import_module(module), name)
        assert listed == [m.value for m in cls], name
        assert all(str(m) == m.value for m in cls)


TOP, MID, LOW = "Guide::Project", "Guide::Server", "Guide::Volume"


class _Sees:
    """Restore hooks that report a new id in one chosen hook and record, in every hook,
    which resources' new ids ``ctx.restored_id`` already gives."""

    def __init__(self, reports: dict[str, str], slow: str) -> None:
        self.reports = reports
        self.slow = slow
        self.seen: dict[tuple[str, str], set[str]] = {}

    async def _hook(self, ctx: karbor_async.HookContext) -> None:
        if ctx.resource.type == self.slow and ctx.hook == "on_main":
            await anyio.sleep(0.2)  # the child's copy outlasts its parent's on_main
        others = (TOP, MID, LOW)
        self.seen[(ctx.resource.type, ctx.hook)] = {
            t for t in others if ctx.restored_id((t, t.lower())) is not None
        }
        if self.reports.get(ctx.resource.type) == ctx.hook:
            await ctx.report_restored(f"new-{ctx.resource.id}")

    on_prepare_begin = on_prepare_finish = on_main = on_complete = _hook


class _SeesPlugin(karbor_async.ProtectionPlugin):
    name = "sees"
    types = tuple(karbor_async.ResourceType(t) for t in (TOP, MID, LOW))

    def __init__(self, op: _Sees) -> None:
        self.op = op

    def get_protect_operation(self, resource_type: str) -> object:
        return object()  # nothing to do: a checkpoint to restore

    def get_restore_operation(self, resource_type: str) -> object:
        return self.op


async def _restore_sees(reports: dict[str, str], slow: str) -> dict[tuple[str, str], set[str]]:
    from karbor_async import Engine, Plan, Resource
    from karbor_async.testing import protectables_for

    top, mid, low = (Resource(t, t.lower()) for t in (TOP, MID, LOW))
    op = _Sees(reports, slow)
    finders = protectables_for([(top, mid), (mid, low)])
    async with Engine([_SeesPlugin(op)], finders, discover=False) as engine:
        cp = (await engine.protect(Plan(name="sees", resources=[top]))).checkpoint_id
        await engine.restore(cp)
    return op.seen


HOOKS = ("on_prepare_begin", "on_prepare_finish", "on_main", "on_complete")


async def test_which_restore_hooks_see_which_new_ids() -> None:
    """Section 6's table, three levels deep (project -> server -> volume)."""
    # A volume reporting in on_main: its on_complete and every ancestor's on_complete,
    # not its parent's on_main.
    seen = await _restore_sees({LOW: "on_main"}, slow=LOW)
    assert {k for k, v in seen.items() if LOW in v} == {
        (LOW, "on_complete"),
        (MID, "on_complete"),
        (TOP, "on_complete"),
    }
    # Reported in on_prepare_finish: the ancestors' on_prepare_finish and later.
    seen = await _restore_sees({LOW: "on_prepare_finish"}, slow=LOW)
    assert {k for k, v in seen.items() if LOW in v} == {
        (LOW, "on_main"),
        (LOW, "on_complete"),
        *((t, h) for t in (MID, TOP) for h in HOOKS[1:]),
    }
    # A project reporting in on_prepare_begin: every hook of its descendants.
    seen = await _restore_sees({TOP: "on_prepare_begin"}, slow=LOW)
    assert {k for k, v in seen.items() if TOP in v} == {
        *((TOP, h) for h in HOOKS[1:]),
        *((t, h) for t in (MID, LOW) for h in HOOKS),
    }


async def test_a_restore_runs_with_barrier_none_unless_asked_whatever_the_protect_plan_said() -> (
    None
):
    """Engine bug found writing the guide: a consistency group's protect barrier carried
    over to restore (a plan-level one did not); now both are protect's only."""
    from karbor_async import BarrierPolicy, ConsistencyGroup, Engine, Plan, Resource
    from karbor_async.testing import RecordingPlugin

    vol = Resource(VOLUME, "v1")
    plans = [
        Plan(name="plan-level", resources=[vol], barrier="cut"),
        Plan(name="group", resources=[vol], groups=[ConsistencyGroup("g", [vol], barrier="cut")]),
    ]
    async with Engine([RecordingPlugin([VOLUME])], discover=False) as engine:
        for plan in plans:
            cp = (await engine.protect(plan)).checkpoint_id
            restore = await engine.build_restore(cp)
            assert set(restore.spec.groups.values()) == {BarrierPolicy.NONE}, plan.name
            asked = await engine.build_restore(cp, barrier="main")
            assert set(asked.spec.groups.values()) == {BarrierPolicy.MAIN}, plan.name


class _ReportsInProtect:
    async def on_main(self, ctx: karbor_async.HookContext) -> None:
        await ctx.report_restored("new-v1")


class _ReportingPlugin(karbor_async.ProtectionPlugin):
    name = "reports"
    types = (karbor_async.ResourceType(VOLUME),)

    def get_protect_operation(self, resource_type: str) -> object:
        return _ReportsInProtect()

    def get_delete_operation(self, resource_type: str) -> object:
        return _ReportsInProtect()


async def test_report_restored_outside_a_restore_is_refused() -> None:
    """Engine gap found writing the guide: report_restored in a protect or delete hook was
    recorded as that run's restored ids; now the hook fails naming the rule (and so does
    make_context's recorder)."""
    import pytest

    from karbor_async import Engine, Plan, Resource, RunError
    from karbor_async.exceptions import PluginError
    from karbor_async.testing import make_context

    vol = Resource(VOLUME, "v1")
    async with Engine([_ReportingPlugin()], discover=False) as engine:
        with pytest.raises(RunError) as info:
            await engine.protect(Plan(name="r", resources=[vol]))
        outcome = info.value.outcome
        assert outcome.restored == {}
        error = outcome.resources[vol.key].error or ""
        assert "on_main: report_restored is for restore hooks; this is a protect" in error
        with pytest.raises(RunError) as info:
            await engine.delete(outcome.checkpoint_id)
        assert "this is a delete" in (info.value.outcome.resources[vol.key].error or "")
    ctx, _rec = make_context(vol, "on_main", operation="delete")
    with pytest.raises(PluginError, match="report_restored is for restore hooks"):
        await _ReportsInProtect().on_main(ctx)


class _SlowCopy:
    async def on_main(self, ctx: karbor_async.HookContext) -> None:
        await anyio.sleep(0.2)


class _PatientPlugin(karbor_async.ProtectionPlugin):
    name = "patient"
    hook_timeout = 600.0
    types = (karbor_async.ResourceType(VOLUME),)

    def get_protect_operation(self, resource_type: str) -> object:
        return _SlowCopy()


async def test_a_plugins_hook_timeout_wins_over_the_plans_hook_but_not_per_plugin_or_type() -> None:
    """Section 2's hook_timeout bullet: Timeouts(hook=) does not shorten it; per_plugin
    and per_type do."""
    import pytest

    from karbor_async import Resource, RunError, Timeouts
    from karbor_async.testing import run_hooks

    vol = Resource(VOLUME, "v1")
    got = await run_hooks(_PatientPlugin(), vol, timeouts=Timeouts(hook=0.05))
    assert got.protect.status == "succeeded"
    for limits in (Timeouts(per_plugin={"patient": 0.05}), Timeouts(per_type={VOLUME: 0.05})):
        with pytest.raises(RunError, match=r"timed out after 0\.05 s"):
            await run_hooks(_PatientPlugin(), vol, timeouts=limits)


class _SavesTwice:
    async def on_main(self, ctx: karbor_async.HookContext) -> None:
        ctx.save(a=1, b=1, op=str(ctx.operation))
        ctx.save(b=2)

    async def on_complete(self, ctx: karbor_async.HookContext) -> None:
        assert dict(ctx.saved) == {"a": 1, "b": 2, "op": str(ctx.operation), "kept": True}


class _SavesTwiceFirst(_SavesTwice):
    async def on_prepare_finish(self, ctx: karbor_async.HookContext) -> None:
        ctx.save(kept=True)


class _SavingPlugin(karbor_async.ProtectionPlugin):
    name = "saving"
    types = (karbor_async.ResourceType(VOLUME),)

    def get_protect_operation(self, resource_type: str) -> object:
        return _SavesTwiceFirst()

    def get_restore_operation(self, resource_type: str) -> object:
        return _SavesTwice()

    get_delete_operation = get_restore_operation


async def test_ctx_save_merges_in_every_operation() -> None:
    """Section 5: save() merges key by key; a restore's or delete's saves are its run's,
    read back over the checkpoint's, which they leave unchanged."""
    from karbor_async import Engine, Plan, Resource

    vol = Resource(VOLUME, "v1")
    async with Engine([_SavingPlugin()], discover=False) as engine:
        cp = (await engine.protect(Plan(name="s", resources=[vol]))).checkpoint_id
        restore = await engine.restore(cp)
        delete = await engine.delete(cp)
        store = engine.store
        assert (await store.load_saved_info(cp))[vol.key] == {
            "kept": True,
            "a": 1,
            "b": 2,
            "op": "protect",
        }
        for run, op in ((restore, "restore"), (delete, "delete")):
            assert (await store.load_saved_info(run.run_id))[vol.key] == {
                "a": 1,
                "b": 2,
                "op": op,
            }
