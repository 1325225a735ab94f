"""RepoCache: live index, portable paths, checkouts from coroutines, single-flight ensure."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import shutil
import subprocess
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from asynccache.cache import index as index_module
from asynccache.cache.index import read_index
from asynccache.cache.layout import CacheDir
from asynccache.cache.parts import cached_records
from asynccache.config import CacheOptions
from asynccache.entries import Entry, entry_from_row
from asynccache.errors import CacheError, EnsureFailed, ImageNotFound, MissingInstance
from asynccache.pipeline import Outcome, Pipeline
from asynccache.trainer import repo_cache as repo_cache_module
from asynccache.trainer.checkout import overlay_side_dir
from asynccache.trainer.repo_cache import RepoCache
from asynccache.tree.extract import ExtractResult, extract_stream
from tests.support.cache_trees import build_generated_tree, build_sample_tree, cache_instance
from tests.support.checkouts import MODES, OVERLAY_OK
from tests.support.fixtures import FixtureImage, as_copied, row_for, snapshot_tree

COMMIT_A = "a" * 40
COMMIT_B = "b" * 40


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A cache folder with one indexed instance, built by hand."""
    root = tmp_path / "cache"
    cache_instance(root, "alpha", COMMIT_A)
    return root


def test_lookups(cache_dir: Path) -> None:
    cache_instance(cache_dir, "beta", COMMIT_B)
    cache = RepoCache(cache_dir)
    assert cache.instance_ids == ["alpha__aaaaaaaaaaaa", "beta__bbbbbbbbbbbb"]
    assert len(cache) == 2
    assert "alpha__aaaaaaaaaaaa" in cache and "gamma__cccccccccccc" not in cache
    assert list(cache) == cache.instance_ids
    record = cache.entry("beta__bbbbbbbbbbbb")
    assert record["repo_name"] == "beta" and record["commit_hash"] == COMMIT_B
    record["repo_name"] = "changed by the caller"
    assert cache.entry("beta__bbbbbbbbbbbb")["repo_name"] == "beta"
    assert cache.path("beta__bbbbbbbbbbbb") == cache_dir / "beta__bbbbbbbbbbbb"


def test_entries_added_later_are_seen(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[Path] = []
    original = cached_records

    def counting(path: Path) -> dict[str, Any]:
        reads.append(path)
        return original(path)

    monkeypatch.setattr(repo_cache_module, "cached_records", counting)
    cache = RepoCache(cache_dir)
    assert len(cache) == 1
    for _ in range(100):
        assert "alpha__aaaaaaaaaaaa" in cache
    assert len(reads) == 1, "an unchanged index.json must not be read again"
    cache_instance(cache_dir, "beta", COMMIT_B)
    assert "beta__bbbbbbbbbbbb" in cache
    assert cache.instance_ids == ["alpha__aaaaaaaaaaaa", "beta__bbbbbbbbbbbb"]
    assert len(reads) == 2


def test_an_index_that_appears_later_is_seen(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = RepoCache(root)
    assert len(cache) == 0 and cache.instance_ids == []
    cache_instance(root, "alpha", COMMIT_A)
    assert cache.instance_ids == ["alpha__aaaaaaaaaaaa"]


def test_a_moved_cache_keeps_working(cache_dir: Path, tmp_path: Path) -> None:
    moved = tmp_path / "elsewhere" / "repo-cache"
    moved.parent.mkdir()
    os.rename(cache_dir, moved)
    cache = RepoCache(moved)
    assert cache.entry("alpha__aaaaaaaaaaaa")["cache_path"] == str(
        cache_dir / "alpha__aaaaaaaaaaaa"
    )
    assert cache.path("alpha__aaaaaaaaaaaa") == moved / "alpha__aaaaaaaaaaaa"


@pytest.mark.anyio
async def test_a_moved_cache_checks_out(cache_dir: Path, tmp_path: Path) -> None:
    moved = tmp_path / "untarred"
    subprocess.run(["cp", "-a", str(cache_dir), str(moved)], check=True)
    shutil.rmtree(cache_dir)
    cache = RepoCache(moved)
    async with cache.checkout("alpha__aaaaaaaaaaaa", tmp_path / "rollout") as path:
        assert (path / "README.md").read_bytes() == b"# sample\n"


def test_a_missing_id_raises_missing_instance(cache_dir: Path) -> None:
    cache = RepoCache(cache_dir)
    with pytest.raises(MissingInstance) as raised:
        cache.path("ghost__ffffffffffff")
    error = raised.value
    assert isinstance(error, KeyError) and isinstance(error, CacheError)
    assert "ghost__ffffffffffff" in str(error) and str(cache_dir) in str(error)
    assert error.instance_id == "ghost__ffffffffffff"
    with pytest.raises(KeyError):
        cache.entry("ghost__ffffffffffff")


@pytest.mark.anyio
async def test_checkout_of_a_missing_id_or_folder_raises(cache_dir: Path, tmp_path: Path) -> None:
    cache = RepoCache(cache_dir)
    with pytest.raises(MissingInstance, match="ghost"):
        await cache.checkout("ghost__ffffffffffff", tmp_path / "r1")
    shutil.rmtree(cache_dir / "alpha__aaaaaaaaaaaa")
    with pytest.raises(MissingInstance, match="verify --repair"):
        await cache.checkout("alpha__aaaaaaaaaaaa", tmp_path / "r1")
    assert not (tmp_path / "r1").exists()


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_awaited_checkout_and_release(cache_dir: Path, tmp_path: Path, mode: str) -> None:
    cache = RepoCache(cache_dir, mode=mode)  # type: ignore[arg-type]
    source = cache.path("alpha__aaaaaaaaaaaa")
    before = snapshot_tree(source)
    dest = tmp_path / "rollouts" / "r1"
    path = await cache.checkout("alpha__aaaaaaaaaaaa", dest)
    assert path == dest
    assert cache.checkouts == {dest: mode}
    expected = snapshot_tree(source, hardlinks=False)
    assert snapshot_tree(path, hardlinks=False) == (
        as_copied(expected) if mode == "copy" else expected
    )
    (path / "pkg" / "core.py").write_text("def answer():\n    return 42\n")
    (path / "README.md").unlink()
    assert snapshot_tree(source) == before
    await cache.release(path)
    assert not dest.exists() and not overlay_side_dir(dest).exists()
    assert cache.checkouts == {}
    assert snapshot_tree(source) == before


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_async_with_releases_on_exit_and_on_error(
    cache_dir: Path, tmp_path: Path, mode: str
) -> None:
    cache = RepoCache(cache_dir)
    dest = tmp_path / "r1"
    async with cache.checkout("alpha__aaaaaaaaaaaa", dest, mode=mode) as path:  # type: ignore[arg-type]
        assert path == dest and (path / "setup.py").is_file()
        (path / "scratch.txt").write_text("rollout output")
    assert not dest.exists()
    with pytest.raises(RuntimeError, match="rollout crashed"):
        async with cache.checkout("alpha__aaaaaaaaaaaa", dest, mode=mode) as path:  # type: ignore[arg-type]
            raise RuntimeError("rollout crashed")
    assert not dest.exists() and not overlay_side_dir(dest).exists()
    assert cache.checkouts == {}


@pytest.mark.anyio
async def test_release_refuses_folders_that_are_not_checkouts(
    cache_dir: Path, tmp_path: Path
) -> None:
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    cache = RepoCache(cache_dir)
    with pytest.raises(ValueError, match="did not check it out"):
        await cache.release(precious)
    assert (precious / "notes.txt").exists()
    made_elsewhere = await RepoCache(cache_dir, mode="copy").checkout(
        "alpha__aaaaaaaaaaaa", tmp_path / "r1"
    )
    with pytest.raises(ValueError, match="force=True"):
        await cache.release(made_elsewhere)
    await cache.release(made_elsewhere, force=True)
    assert not made_elsewhere.exists()
    if OVERLAY_OK:
        overlay = await RepoCache(cache_dir).checkout(
            "alpha__aaaaaaaaaaaa", tmp_path / "r2", "overlay"
        )
        await cache.release(overlay)
        assert not overlay.exists() and not overlay_side_dir(overlay).exists()


@pytest.mark.anyio
async def test_release_all(cache_dir: Path, tmp_path: Path) -> None:
    cache = RepoCache(cache_dir)
    paths = [await cache.checkout("alpha__aaaaaaaaaaaa", tmp_path / f"r{n}") for n in range(3)]
    assert await cache.release_all() == 3
    assert not any(path.exists() for path in paths)


@pytest.mark.anyio
async def test_destinations_overlapping_the_cache_are_refused(cache_dir: Path) -> None:
    cache = RepoCache(cache_dir)
    with pytest.raises(ValueError, match="overlaps the cache folder"):
        cache.checkout("alpha__aaaaaaaaaaaa", cache_dir / "rollout")
    with pytest.raises(ValueError, match="overlaps the cache folder"):
        await cache.release(cache_dir / "alpha__aaaaaaaaaaaa")
    with pytest.raises(ValueError, match="overlaps the cache folder"):
        await cache.release(cache_dir.parent)
    assert (cache_dir / "alpha__aaaaaaaaaaaa" / "README.md").exists()


@pytest.mark.anyio
@pytest.mark.parametrize("mode", MODES)
async def test_checkout_never_blocks_the_event_loop(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "cache"
    record = cache_instance(
        root,
        "large",
        COMMIT_A,
        lambda path: build_generated_tree(path, files=3000, total_bytes=20 << 20),
    )
    cache = RepoCache(root, mode=mode)  # type: ignore[arg-type]
    loop = asyncio.get_running_loop()
    debug, slow = loop.get_debug(), loop.slow_callback_duration
    loop.set_debug(True)
    loop.slow_callback_duration = 0.05
    # A checkout done in the event loop makes a slow step in every attempt; a machine shared
    # with other work can stall one step now and then (0.13 s was seen once): three attempts,
    # one without a slow step passes.
    attempts: list[list[str]] = []
    try:
        for attempt in range(3):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="asyncio"):
                async with anyio.create_task_group() as tg:
                    for number in range(3):
                        dest = tmp_path / f"r{attempt}-{number}"
                        tg.start_soon(_checkout_and_release, cache, dest, record)
            attempts.append([r.getMessage() for r in caplog.records if "took" in r.getMessage()])
            if not attempts[-1]:
                break
    finally:
        loop.set_debug(debug)
        loop.slow_callback_duration = slow
    assert [] in attempts, attempts


async def _checkout_and_release(cache: RepoCache, dest: Path, record: dict[str, Any]) -> None:
    async with cache.checkout(record["instance_id"], dest) as path:
        assert (path / "run_tests.sh").is_file()


# --- ensure without Docker ---------------------------------------------------------------


def _tar_of_tree(tree: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        archive.add(tree, arcname="testbed")
    return buffer.getvalue()


class FakeSource:
    """A source that extracts one archive for every entry, slowly, and counts calls."""

    def __init__(self, payload: bytes, *, missing: bool = False, delay: float = 0.3) -> None:
        self.payload = payload
        self.missing = missing
        self.delay = delay
        self.calls: list[str] = []

    async def prepare(self, entry: Entry) -> None:
        """Nothing to fetch."""

    async def extract_into(self, entry: Entry, dest: Path) -> ExtractResult:
        self.calls.append(entry.instance_id)
        await anyio.sleep(self.delay)
        if self.missing:
            raise ImageNotFound(entry.docker_image, "manifest unknown")
        return await extract_stream(self._chunks(), dest, keep_hashes=True)

    async def _chunks(self) -> AsyncIterator[bytes]:
        for start in range(0, len(self.payload), 65536):
            yield self.payload[start : start + 65536]

    async def after_extraction(self, entry: Entry) -> None:
        """Nothing to release."""


@pytest.fixture
def payload(tmp_path: Path) -> bytes:
    tree = tmp_path / "image-testbed"
    build_sample_tree(tree)
    os.unlink(tree / "a-fifo")
    return _tar_of_tree(tree)


def _entry(repo: str, commit: str) -> Entry:
    return entry_from_row(
        row_for(f"127.0.0.1:5000/namanjain12/{repo}_final:{commit}", repo, commit), 1
    )


@pytest.mark.anyio
async def test_concurrent_ensures_share_one_extraction(tmp_path: Path, payload: bytes) -> None:
    source = FakeSource(payload)
    entry = _entry("delta", "d" * 40)
    results: list[Path] = []
    async with RepoCache(tmp_path / "cache", source=source) as cache:

        async def ensure() -> None:
            results.append(await cache.ensure(entry))

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(ensure)
        assert source.calls == [entry.instance_id]
        assert results == [tmp_path / "cache" / entry.instance_id] * 20
        assert entry.instance_id in cache
        assert cache.entry(entry.instance_id)["docker_image"] == entry.docker_image
        assert await cache.ensure(entry) == results[0]
        assert len(source.calls) == 1
        async with cache.checkout(entry.instance_id, tmp_path / "rollout") as path:
            assert (path / "pkg" / "core.py").is_file()
    assert entry.instance_id in read_index(tmp_path / "cache" / "index.json")


@pytest.mark.anyio
async def test_a_failed_extraction_fails_every_waiter_and_can_be_retried(
    tmp_path: Path, payload: bytes
) -> None:
    source = FakeSource(payload, missing=True)
    entry = _entry("ghost", "f" * 40)
    errors: list[BaseException] = []
    async with RepoCache(tmp_path / "cache", source=source) as cache:

        async def ensure() -> None:
            try:
                await cache.ensure(entry)
            except EnsureFailed as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(ensure)
        assert source.calls == [entry.instance_id]
        assert len(errors) == 20
        assert all(isinstance(e, EnsureFailed) and "not found" in e.reason for e in errors)
        assert all(e.instance_id == entry.instance_id for e in errors)  # type: ignore[attr-defined]
        source.missing = False
        assert await cache.ensure(entry) == tmp_path / "cache" / entry.instance_id
        assert len(source.calls) == 2


@pytest.mark.anyio
async def test_a_cancelled_leader_hands_over_to_a_waiter(tmp_path: Path, payload: bytes) -> None:
    source = FakeSource(payload, delay=0.5)
    entry = _entry("epsilon", "e" * 40)
    results: list[Path] = []
    async with RepoCache(tmp_path / "cache", source=source) as cache:
        leader_scope = anyio.CancelScope()

        async def leader() -> None:
            with leader_scope:
                await cache.ensure(entry)

        async def waiter() -> None:
            results.append(await cache.ensure(entry))

        async with anyio.create_task_group() as tg:
            tg.start_soon(leader)
            while not source.calls:
                await anyio.sleep(0.01)
            tg.start_soon(waiter)
            tg.start_soon(waiter)
            await anyio.sleep(0.1)
            leader_scope.cancel()
        assert leader_scope.cancelled_caught
        assert results == [tmp_path / "cache" / entry.instance_id] * 2
        assert len(source.calls) == 2


@pytest.mark.anyio
async def test_ensure_of_a_cached_instance_needs_no_pipeline(cache_dir: Path) -> None:
    cache = RepoCache(cache_dir, source=FakeSource(b"", missing=True))
    path = await cache.ensure(_entry("alpha", COMMIT_A))
    assert path == cache_dir / "alpha__aaaaaaaaaaaa"
    assert cache._pipeline is None
    CacheDir(cache_dir).lock()


@pytest.mark.anyio
async def test_ensure_holds_the_folder_lock_until_aclose(tmp_path: Path, payload: bytes) -> None:
    root = tmp_path / "cache"
    cache = RepoCache(root, source=FakeSource(payload, delay=0))
    await cache.ensure(_entry("zeta", "c" * 40))
    other = CacheDir(root)
    with pytest.raises(CacheError, match="in use"):
        other.lock()
    await cache.aclose()
    other.lock()
    other.unlock()


@pytest.mark.anyio
async def test_ensure_while_another_run_holds_the_folder(tmp_path: Path, payload: bytes) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    holder = CacheDir(root)
    holder.lock()
    try:
        async with RepoCache(root, source=FakeSource(payload)) as cache:
            with pytest.raises(EnsureFailed, match="in use by process"):
                await cache.ensure(_entry("eta", "e" * 40))
    finally:
        holder.unlock()


# --- ensure with Docker ------------------------------------------------------------------


@pytest.fixture
def count_process(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every Pipeline.process call (one per extraction attempt), by instance id."""
    calls: list[str] = []
    original = Pipeline.process

    async def counting(self: Pipeline, entry: Entry) -> Outcome:
        calls.append(entry.instance_id)
        return await original(self, entry)

    monkeypatch.setattr(Pipeline, "process", counting)
    return calls


@pytest.mark.anyio
async def test_docker_concurrent_ensures_extract_once(
    tmp_path: Path,
    fixture_images: list[FixtureImage],
    count_process: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    image = fixture_images[0]
    entry = entry_from_row(row_for(image.ref, image.repo, image.commit_hash), 1)
    root = tmp_path / "cache"
    writes: list[Path] = []
    original_write = index_module.write_json_atomic

    def counting_write(path: Path, data: Any) -> int:
        if path.name == "index.json":
            writes.append(path)
        return original_write(path, data)

    monkeypatch.setattr(index_module, "write_json_atomic", counting_write)
    options = CacheOptions(cache_dir=root, cp_timeout=300)
    async with RepoCache(root, options=options) as cache:
        paths = await _gather(20, lambda: cache.ensure(entry))
        assert count_process == [entry.instance_id]
        assert len(writes) == 1
        assert paths == [root / entry.instance_id] * 20
        record = cache.entry(entry.instance_id)
        assert record["docker_image"] == image.ref
        assert record["file_count"] == sum(
            1 for kind, *_ in snapshot_tree(paths[0]).values() if kind == "file"
        )


@pytest.mark.anyio
async def test_docker_missing_image_fails_every_waiter(
    tmp_path: Path, missing_image: str, count_process: list[str]
) -> None:
    entry = entry_from_row(row_for(missing_image, "ghostproj", "f" * 40), 1)
    async with RepoCache(tmp_path / "cache") as cache:
        outcomes = await _gather(20, lambda: _ensure_error(cache, entry))
    assert count_process == [entry.instance_id]
    assert all(isinstance(error, EnsureFailed) for error in outcomes)
    assert all("not found" in error.reason for error in outcomes)


async def _ensure_error(cache: RepoCache, entry: Entry) -> BaseException | None:
    try:
        await cache.ensure(entry)
    except EnsureFailed as exc:
        return exc
    return None


async def _gather(count: int, make: Any) -> list[Any]:
    results: list[Any] = [None] * count

    async def run(slot: int) -> None:
        results[slot] = await make()

    async with anyio.create_task_group() as tg:
        for slot in range(count):
            tg.start_soon(run, slot)
    return results
