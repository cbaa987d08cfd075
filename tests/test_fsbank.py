"""The file-system bank: layout and escaping, key validation, confinement, read-only
sections, atomic and streaming writes, checkpoint deletion (asyncio and trio)."""

from __future__ import annotations

import os
import time
import tracemalloc
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path

import anyio
import pytest
from hypothesis import given
from hypothesis import strategies as st

from karbor_async._fsbank import FsBank, escape_component, unescape_component
from karbor_async.exceptions import BankKeyError
from karbor_async.plugin import Bank, BankSection

SERVER = ("OS::Nova::Server", "srv-1")
VOLUME = ("OS::Cinder::Volume", "vol-1")


@pytest.fixture
def bank(tmp_path: Path) -> FsBank:
    return FsBank(tmp_path / "bank")


def tree(root: Path) -> list[str]:
    """Every file under ``root`` (relative, sorted), temporary files included."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def _tree(root: Path) -> list[str]:
    return tree(root)


async def drain(stream: AsyncIterator[bytes]) -> int:
    return sum([len(c) async for c in stream])


async def chunks_of(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
        await anyio.lowlevel.checkpoint()


def test_fsbank_satisfies_the_bank_protocol(bank: FsBank) -> None:
    """Static check (mypy) that FsBank and its sections fit the plugin contract."""
    as_bank: Bank = bank
    section: BankSection = as_bank.section("cp-1", SERVER)
    assert not section.read_only


# -- layout and escaping -----------------------------------------------------------------


def test_layout_is_checkpoint_type_id_key(bank: FsBank) -> None:
    section = bank.section("cp-1", ("OS::Nova::Server", "a/b"))
    assert section.directory == bank.root / "cp-1" / "OS%3A%3ANova%3A%3AServer" / "a%2Fb"


@pytest.mark.parametrize(
    ("text", "escaped"),
    [
        ("", "%"),
        (".", "%2E"),
        ("..", "%2E."),
        (".hidden", "%2Ehidden"),
        ("%", "%25"),
        ("a/b", "a%2Fb"),
        ("a\\b", "a%5Cb"),
        ("vol-1_x.img", "vol-1_x.img"),
        ("é", "%C3%A9"),
    ],
)
def test_escape_examples(text: str, escaped: str) -> None:
    assert escape_component(text) == escaped
    assert unescape_component(escaped) == text


@given(st.text(max_size=60))
def test_escaping_is_reversible_and_yields_one_safe_component(text: str) -> None:
    """Any text escapes to one safe path component that unescapes to it, or, when the
    escaped name would pass the file-system limit of 255 bytes, is refused clearly."""
    escaped_size = sum(
        1 if c.isascii() and (c.isalnum() or c in "-_.") else 3 * len(c.encode()) for c in text
    ) + (2 if text.startswith(".") else 0)
    if escaped_size > 255:
        with pytest.raises(BankKeyError, match="too long"):
            escape_component(text)
        return
    name = escape_component(text)
    assert unescape_component(name) == text
    assert "/" not in name
    assert "\\" not in name
    assert "\x00" not in name
    assert name not in ("", ".", "..")
    assert not name.startswith(".")


@given(st.text(max_size=30), st.text(max_size=30))
def test_distinct_texts_escape_to_distinct_names(a: str, b: str) -> None:
    if a != b:
        assert escape_component(a) != escape_component(b)


def test_a_name_too_long_to_escape_is_refused(bank: FsBank) -> None:
    with pytest.raises(BankKeyError, match="too long"):
        bank.section("cp-1", ("T", "x" * 300))


async def test_tricky_resource_ids_get_separate_sections(bank: FsBank) -> None:
    """Ids such as '..', '.', '', 'a/b' and 'a%2Fb' neither collide nor leave the bank."""
    ids = ["..", ".", "", "a/b", "a%2Fb", "a", "../../etc", "%2E"]
    for rid in ids:
        await bank.section("cp-1", ("T::x", rid)).put("obj", rid.encode())
    for rid in ids:
        assert await bank.section("cp-1", ("T::x", rid)).get("obj") == rid.encode()
    assert _tree(bank.root.parent) == sorted(
        f"bank/cp-1/T%3A%3Ax/{escape_component(rid)}/obj" for rid in ids
    )


# -- objects -------------------------------------------------------------------------------


async def test_put_get_list_delete(bank: FsBank) -> None:
    section = bank.section("cp-1", VOLUME)
    await section.put("meta.json", b"{}")
    await section.put("data/0001", b"a" * 10)
    await section.put("data/0002", b"b")
    await section.put("data/0001", b"replaced")
    assert await section.get("data/0001") == b"replaced"
    assert await section.list() == ["data/0001", "data/0002", "meta.json"]
    assert await section.list("data/") == ["data/0001", "data/0002"]
    assert await section.list("nothing") == []
    await section.delete("data/0001")
    await section.delete("data/0002")
    await section.delete("never-there")
    assert await section.list() == ["meta.json"]
    assert not (section.directory / "data").exists()  # emptied directories are pruned
    with pytest.raises(KeyError, match="data/0001"):
        await section.get("data/0001")


async def test_sections_are_separate(bank: FsBank) -> None:
    await bank.section("cp-1", VOLUME).put("k", b"1")
    await bank.section("cp-1", SERVER).put("k", b"2")
    await bank.section("cp-2", VOLUME).put("k", b"3")
    assert await bank.section("cp-1", VOLUME).list() == ["k"]
    assert await bank.section("cp-1", SERVER).get("k") == b"2"
    assert await bank.section("cp-2", VOLUME).get("k") == b"3"
    assert await bank.section("cp-3", VOLUME).list() == []


async def test_a_directory_is_not_an_object(bank: FsBank) -> None:
    section = bank.section("cp-1", VOLUME)
    await section.put("a/b", b"x")
    with pytest.raises(KeyError):
        await section.get("a")
    with pytest.raises(BankKeyError, match="directory"):
        await section.put("a", b"y")
    with pytest.raises(BankKeyError, match="directory"):
        await section.put("a/b/c", b"y")
    await section.delete("a")  # not an object: nothing happens
    assert await section.get("a/b") == b"x"


@pytest.mark.parametrize(
    "key",
    [
        "",
        "/etc/passwd",
        "../x",
        "a/../../x",
        "a//b",
        "./a",
        "a/.",
        "C:\\x",
        "a\x00b",
        "\\x",
        "x" * 300,  # one part longer than a file name may be
        "/".join(["abcdefghij" * 10] * 40),  # many parts: longer than a path may be
        "lone-\udc80-surrogate",
    ],
)
async def test_bad_keys_are_refused(bank: FsBank, key: str) -> None:
    section = bank.section("cp-1", VOLUME)
    for call in (section.put(key, b"x"), section.get(key), section.delete(key)):
        with pytest.raises(BankKeyError):
            await call
    assert not bank.root.exists()


async def test_reserved_names_are_refused(bank: FsBank) -> None:
    with pytest.raises(BankKeyError, match="reserved"):
        await bank.section("cp-1", VOLUME).put("x/.~karbor-tmp.abc", b"x")


async def test_symbolic_links_cannot_lead_out(bank: FsBank, tmp_path: Path) -> None:
    """A link planted inside a section, or a section that is a link, is refused."""
    outside = tmp_path / "outside"
    outside.mkdir()
    section = bank.section("cp-1", VOLUME)
    await section.put("real", b"x")
    (section.directory / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(BankKeyError, match="outside"):
        await section.put("link/evil", b"x")
    with pytest.raises(BankKeyError, match="outside"):
        await section.get("link/evil")
    other = bank.section("cp-1", SERVER)
    other.directory.parent.mkdir(parents=True, exist_ok=True)
    other.directory.symlink_to(outside, target_is_directory=True)
    with pytest.raises(BankKeyError, match="outside"):
        await other.put("evil", b"x")
    assert list(outside.iterdir()) == []


async def test_read_only_sections_refuse_writes(bank: FsBank) -> None:
    await bank.section("cp-1", VOLUME).put("k", b"v")
    ro = bank.section("cp-1", VOLUME, read_only=True)
    assert ro.read_only
    with pytest.raises(BankKeyError, match="read-only"):
        await ro.put("k", b"new")
    with pytest.raises(BankKeyError, match="read-only"):
        await ro.put_stream("k2", chunks_of(b"new", 1))
    with pytest.raises(BankKeyError, match="read-only"):
        await ro.delete("k")
    assert await ro.get("k") == b"v"
    assert await ro.list() == ["k"]


# -- streaming and atomicity ----------------------------------------------------------------


async def test_put_stream_and_get_stream_round_trip(bank: FsBank) -> None:
    data = os.urandom(300_000)
    section = bank.section("cp-1", VOLUME)
    assert await section.put_stream("disk.img", chunks_of(data, 777)) == len(data)
    got = [c async for c in section.get_stream("disk.img", chunk_size=65_536)]
    assert b"".join(got) == data
    assert [len(c) for c in got] == [65_536] * 4 + [len(data) - 4 * 65_536]
    assert await section.put_stream("empty", chunks_of(b"", 1)) == 0
    assert await section.get("empty") == b""
    with pytest.raises(KeyError):
        await drain(section.get_stream("missing"))


async def test_streaming_never_holds_the_whole_object(bank: FsBank) -> None:
    """A 32 MiB object goes in and out with a few MiB of memory at most."""
    size, chunk = 32 << 20, 256 << 10
    block = os.urandom(chunk)

    async def produce() -> AsyncIterator[bytes]:
        for _ in range(size // chunk):
            yield block

    section = bank.section("cp-1", VOLUME)
    tracemalloc.start()
    try:
        assert await section.put_stream("big", produce()) == size
        _, put_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        total = 0
        async with aclosing(section.get_stream("big", chunk_size=1 << 20)) as stream:
            async for part in stream:
                total += len(part)
        _, get_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == size
    assert put_peak < 6 << 20, put_peak
    assert get_peak < 6 << 20, get_peak


async def test_a_failed_stream_leaves_nothing_and_keeps_the_old_object(bank: FsBank) -> None:
    section = bank.section("cp-1", VOLUME)
    await section.put("disk.img", b"old")

    async def broken() -> AsyncIterator[bytes]:
        yield b"x" * (2 << 20)  # past the write buffer: a partial temp file exists
        raise OSError("source went away")

    with pytest.raises(OSError, match="source went away"):
        await section.put_stream("disk.img", broken())
    assert await section.get("disk.img") == b"old"
    assert tree(section.directory) == ["disk.img"]


async def test_a_cancelled_stream_leaves_nothing(bank: FsBank) -> None:
    section = bank.section("cp-1", VOLUME)
    started = anyio.Event()

    async def endless() -> AsyncIterator[bytes]:
        while True:
            yield b"y" * 65_536
            started.set()
            await anyio.sleep(0.001)

    async with anyio.create_task_group() as tg:
        tg.start_soon(section.put_stream, "disk.img", endless())
        await started.wait()
        tg.cancel_scope.cancel()
    assert tree(section.directory) == []


async def test_an_object_appears_only_when_complete(bank: FsBank) -> None:
    """While a stream is being written its data sits in a temporary file beside the target,
    invisible to get and list; the final name appears at once when it completes."""
    section = bank.section("cp-1", VOLUME)
    go_on = anyio.Event()
    halfway = anyio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"a" * (2 << 20)
        halfway.set()
        await go_on.wait()
        yield b"b"

    async with anyio.create_task_group() as tg:
        tg.start_soon(section.put_stream, "sub/disk.img", slow())
        await halfway.wait()
        await anyio.sleep(0.05)
        assert await section.list() == []
        with pytest.raises(KeyError):
            await section.get("sub/disk.img")
        (temp,) = tree(section.directory)
        assert temp.startswith("sub/.~karbor-tmp.")
        go_on.set()
    assert await section.list() == ["sub/disk.img"]
    assert len(await section.get("sub/disk.img")) == (2 << 20) + 1
    assert tree(section.directory) == ["sub/disk.img"]


async def test_concurrent_writers_of_one_key_never_mix(bank: FsBank) -> None:
    section = bank.section("cp-1", VOLUME)
    payloads = [bytes([i]) * 50_000 for i in range(20)]
    async with anyio.create_task_group() as tg:
        for p in payloads:
            tg.start_soon(section.put, "same", p)
            tg.start_soon(section.put, f"own/{p[0]}", p)
    assert await section.get("same") in payloads
    assert len(await section.list("own/")) == 20
    assert tree(section.directory) == sorted(["same", *(f"own/{i}" for i in range(20))])


async def test_file_io_does_not_block_the_event_loop(
    bank: FsBank, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A slow fsync runs in a worker thread: other tasks keep running meanwhile."""
    real_fsync = os.fsync

    def slow_fsync(fd: int) -> None:
        time.sleep(0.3)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    ticks = 0
    done = False

    async def ticker() -> None:
        nonlocal ticks
        while not done:
            ticks += 1
            await anyio.lowlevel.checkpoint()

    async with anyio.create_task_group() as tg:
        tg.start_soon(ticker)
        await bank.section("cp-1", VOLUME).put("k", b"v")
        done = True
    assert ticks > 100


# -- checkpoints ---------------------------------------------------------------------------


async def test_delete_checkpoint_removes_its_tree_only(bank: FsBank) -> None:
    await bank.section("cp-1", VOLUME).put("a/b", b"1")
    await bank.section("cp-1", SERVER).put("c", b"2")
    await bank.section("cp/2", VOLUME).put("d", b"3")
    assert await bank.list_checkpoints() == ["cp-1", "cp/2"]
    await bank.delete_checkpoint("cp-1")
    await bank.delete_checkpoint("cp-1")  # again: nothing to do
    await bank.delete_checkpoint("never")
    assert await bank.list_checkpoints() == ["cp/2"]
    assert await bank.section("cp-1", VOLUME).list() == []
    assert _tree(bank.root) == ["cp%2F2/OS%3A%3ACinder%3A%3AVolume/vol-1/d"]


async def test_list_checkpoints_of_a_missing_root(bank: FsBank) -> None:
    assert await bank.list_checkpoints() == []
    assert await bank.cleanup() == 0


async def test_cleanup_removes_crash_leftovers(bank: FsBank) -> None:
    """A half-deleted checkpoint and stale temporary files go; a young temp file stays
    (a live writer may own it)."""
    section = bank.section("cp-1", VOLUME)
    await section.put("keep", b"k")
    _make_leftovers(bank.root, section.directory)
    assert await bank.cleanup() == 2
    assert sorted(p.name for p in bank.root.iterdir()) == ["cp-1"]
    assert tree(section.directory) == [".~karbor-tmp.young", "keep"]


def _make_leftovers(root: Path, directory: Path) -> None:
    (root / ".~karbor-deleting.abc" / "x").mkdir(parents=True)
    (root / ".~karbor-deleting.abc" / "x" / "f").write_bytes(b"x")
    old = directory / ".~karbor-tmp.old"
    old.write_bytes(b"partial")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    (directory / ".~karbor-tmp.young").write_bytes(b"partial")


async def test_list_and_get_agree_about_a_planted_link(bank: FsBank, tmp_path: Path) -> None:
    """A symbolic link planted in a section is no object: list() leaves it out, as get()
    refuses it."""
    section = bank.section("cp-1", VOLUME)
    await section.put("real", b"x")
    target = tmp_path / "elsewhere"
    target.write_bytes(b"secret")
    (section.directory / "planted").symlink_to(target)
    assert await section.list() == ["real"]
    with pytest.raises(BankKeyError):
        await section.get("planted")


async def test_deleting_a_checkpoint_whose_directory_is_a_link_touches_nothing(
    bank: FsBank, tmp_path: Path
) -> None:
    """A checkpoint directory replaced by a symbolic link: the delete is refused with
    BankKeyError, and the link, what it points to and the bank's root are left as they were."""
    await bank.section("cp-2", VOLUME).put("k", b"v")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_bytes(b"mine")
    bank.checkpoint_dir("cp-1").symlink_to(outside, target_is_directory=True)
    before = sorted(p.name for p in bank.root.iterdir())
    with pytest.raises(BankKeyError, match="symbolic link"):
        await bank.delete_checkpoint("cp-1")
    assert sorted(p.name for p in bank.root.iterdir()) == before
    assert (outside / "keep").read_bytes() == b"mine"


async def test_the_bank_reports_its_free_space(bank: FsBank) -> None:
    """free_bytes() is the room left on the bank's file system (before and after its root
    exists)."""
    import shutil

    free = await bank.free_bytes()
    assert 0 < free <= shutil.disk_usage(bank.root.parent).total
    await bank.section("cp-1", VOLUME).put("k", b"v")
    assert abs(await bank.free_bytes() - shutil.disk_usage(bank.root).free) < 64 << 20


def _dead_writer() -> str:
    """The writer name (host:pid:start:nonce) of a process that has ended."""
    import socket
    import subprocess
    import sys

    from karbor_async._liveness import process_start

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    start = process_start(child.pid)
    child.kill()
    child.wait()
    return f"{socket.gethostname()}:{child.pid}:{start}:deadbeef"


async def test_temp_files_name_their_writer_and_only_dead_writers_are_removed(
    bank: FsBank,
) -> None:
    """A temporary file's name carries its writer (host, pid, start time): cleanup removes
    a dead writer's, even a young one, and never a live writer's, even an old one."""
    from karbor_async._liveness import owner_gone

    section = bank.section("cp-1", VOLUME)
    await section.put("keep", b"k")
    seen: list[str] = []

    async def chunks() -> AsyncIterator[bytes]:
        seen.extend(p.name for p in section.directory.iterdir() if p.name.startswith(".~"))
        yield b"x"

    await section.put_stream("streamed", chunks())
    [live_name] = seen
    writer = live_name[len(".~karbor-tmp.") :].rpartition(".")[0]
    assert writer.count(":") == 3 and not owner_gone(writer)
    live = section.directory / live_name  # (as if this process were still writing it)
    live.write_bytes(b"mine")
    os.utime(live, (time.time() - 7200, time.time() - 7200))
    dead = section.directory / f".~karbor-tmp.{_dead_writer()}.0123abcd"
    dead.write_bytes(b"partial")
    assert await bank.cleanup(checkpoint_id="cp-1") == 1
    assert sorted(tree(section.directory)) == sorted([live_name, "keep", "streamed"])


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # (real time: a thread does the walk)
async def test_an_engine_removes_dead_writers_temp_files_when_it_opens_the_bank(
    bank: FsBank,
) -> None:
    """Entering an engine on a file-system bank removes what killed writers left there."""
    from karbor_async import Engine

    section = bank.section("cp-1", VOLUME)
    await section.put("keep", b"k")
    dead = section.directory / f".~karbor-tmp.{_dead_writer()}.0123abcd"
    dead.write_bytes(b"partial")
    async with Engine(bank=bank, discover=False):
        with anyio.fail_after(5):
            while dead.exists():  # noqa: ASYNC110 (polling the file system: no event to wait on)
                await anyio.sleep(0.01)
    assert tree(section.directory) == ["keep"]
