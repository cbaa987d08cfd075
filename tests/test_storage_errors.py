"""Unusable storage: each store error names the path and what to do, and leaves nothing.

A store directory that does not exist, a plan rejected before anything ran, a
full disk (a small tmpfs) and an empty store file, through the CLI with its
defaults, as an operator meets them.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
import structlog
from typer.testing import CliRunner

from helpers import need_root
from karbor_async import SqliteStore
from karbor_async._cli import EXIT_BAD_INPUT, EXIT_OK, app
from karbor_async.exceptions import StoreError

pytest.importorskip("karbor_simcloud")

PLAN = """\
name = "app"
resources = [{ type = "OS::Keystone::Project", id = "prj-0000001" }]
"""
SIM = ("--simcloud", "12:3:zero")


@pytest.fixture(autouse=True)
def _keep_structlog() -> Iterator[None]:
    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


def _cli(root: Path, *args: str, code: int) -> str:
    env = {"KARBOR_DB": None, "KARBOR_BANK": str(root / "bank"), "KARBOR_SIMCLOUD": None}
    env.update(KARBOR_SIMCLOUD_STATE=str(root / "simcloud"), COLUMNS="200")
    result = CliRunner().invoke(app, list(args), env=env)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert "Traceback" not in result.output
    assert result.exit_code == code, (result.exit_code, result.output)
    return " ".join(result.output.split())


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs, nearly full (root only: mounting needs it)."""
    need_root("mounting a small tmpfs")
    where = tmp_path / "full"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], check=True)
    try:
        (where / "fill").write_bytes(b"\0" * 60 * 1024)
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=False)


def test_a_store_in_a_missing_directory_is_named_with_the_fix(tmp_path: Path) -> None:
    """`protect --db missing/karbor.db` (with or without the simulated cloud) exits 2
    naming the directory and how to fix it, and creates nothing."""
    (tmp_path / "plan.toml").write_text(PLAN)
    db = tmp_path / "missing" / "karbor.db"
    for extra in (SIM, ()):
        out = _cli(
            tmp_path,
            "protect",
            str(tmp_path / "plan.toml"),
            "--db",
            str(db),
            *extra,
            code=EXIT_BAD_INPUT,
        )
        assert f"the directory {db.parent} of the checkpoint store {db} does not exist" in out
        assert "mkdir -p" in out
    assert not db.parent.exists()


def test_a_rejected_plan_creates_no_store_file(tmp_path: Path) -> None:
    """A plan refused before anything ran (a type no plugin handles) leaves no store."""
    plan = tmp_path / "bad.toml"
    plan.write_text('name = "x"\nresources = [{ type = "Nope::Type", id = "1" }]\n')
    db = tmp_path / "karbor.db"
    out = _cli(tmp_path, "protect", str(plan), "--db", str(db), *SIM, code=EXIT_BAD_INPUT)
    assert "Nope::Type" in out
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("karbor.db")] == []


def test_an_empty_store_file_is_refused_by_reads_and_initialised_by_a_write(
    tmp_path: Path,
) -> None:
    """A 0-byte store file: `checkpoints list` refuses it (exit 2) and leaves it as it was;
    the next protect makes it a store."""
    db = tmp_path / "karbor.db"
    db.write_bytes(b"")
    out = _cli(tmp_path, "checkpoints", "list", "--db", str(db), code=EXIT_BAD_INPUT)
    assert f"{db} is an empty file, not a checkpoint store (left untouched)" in out
    assert db.stat().st_size == 0
    (tmp_path / "plan.toml").write_text(PLAN)
    _cli(tmp_path, "protect", str(tmp_path / "plan.toml"), "--db", str(db), *SIM, code=EXIT_OK)
    assert "app" in _cli(tmp_path, "checkpoints", "list", "--db", str(db), code=EXIT_OK)


@pytest.mark.service
def test_a_full_disk_leaves_no_store_file_behind(tmp_path: Path, full_disk: Path) -> None:
    """A store that cannot be created for want of space: exit 2 naming the path and what to
    do, and the file it began is removed (the CLI, and SqliteStore.open itself)."""
    (tmp_path / "plan.toml").write_text(PLAN)
    db = full_disk / "karbor.db"
    out = _cli(
        tmp_path, "protect", str(tmp_path / "plan.toml"), "--db", str(db), *SIM, code=EXIT_BAD_INPUT
    )
    assert f"the checkpoint store {db} cannot be created: database or disk is full" in out
    assert "free space" in out and "nothing was left behind" in out
    assert sorted(p.name for p in full_disk.iterdir()) == ["fill"]


@pytest.mark.service
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_sqlite_store_open_removes_a_store_it_failed_to_create(full_disk: Path) -> None:
    """The library too: a failed creation removes the file it created."""
    import sqlite3

    with pytest.raises((sqlite3.Error, StoreError)):
        async with SqliteStore.open(full_disk / "karbor.db"):
            pass
    assert sorted([p.name async for p in anyio.Path(full_disk).iterdir()]) == ["fill"]


@pytest.fixture
def read_only_media(tmp_path: Path) -> Iterator[Path]:
    """A directory holding a healthy store, seen through a read-only bind mount (root
    ignores chmod, so only a read-only mount makes media read-only for it)."""
    need_root("a read-only bind mount")
    source = tmp_path / "source"
    source.mkdir()
    (tmp_path / "plan.toml").write_text(PLAN)
    _cli(
        tmp_path,
        "protect",
        str(tmp_path / "plan.toml"),
        "--db",
        str(source / "karbor.db"),
        *SIM,
        code=EXIT_OK,
    )
    media = tmp_path / "media"
    media.mkdir()
    subprocess.run(["mount", "--bind", str(source), str(media)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(media)], check=True)
        yield media
    finally:
        subprocess.run(["umount", str(media)], check=False)


@pytest.mark.service
def test_read_only_commands_work_on_read_only_media(tmp_path: Path, read_only_media: Path) -> None:
    """A healthy store on read-only media is read, not called corrupt: checkpoints, runs,
    events and the report work; a protect there says the directory is not writable."""
    db = str(read_only_media / "karbor.db")
    listed = _cli(tmp_path, "checkpoints", "list", "--db", db, code=EXIT_OK)
    assert "available" in listed and "corrupt" not in listed
    [checkpoint] = [w for w in listed.split() if w[:8].isdigit() and "T" in w][:1]
    assert "succeeded" in _cli(
        tmp_path, "checkpoints", "show", checkpoint, "--db", db, code=EXIT_OK
    )
    assert checkpoint in _cli(tmp_path, "runs", "list", "--db", db, code=EXIT_OK)
    assert "run_finished" in _cli(tmp_path, "events", checkpoint, "--db", db, code=EXIT_OK)
    report = tmp_path / "timeline.html"
    _cli(tmp_path, "report", checkpoint, "-o", str(report), "--db", db, code=EXIT_OK)
    assert report.stat().st_size > 0
    refused = _cli(
        tmp_path, "protect", str(tmp_path / "plan.toml"), "--db", db, *SIM, code=EXIT_BAD_INPUT
    )
    assert f"the checkpoint store {db} cannot be opened" in refused
    assert "writable" in refused
