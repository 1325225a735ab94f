"""Shards of one split in one cache folder: locks, work folders, index parts, merge, readers.

The source is in memory (each image's /testbed a small tar), so these tests exercise the cache
folder itself; the Slurm and Kubernetes tests run the same against the real registry.
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import tarfile
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from asynccache import RepoCache, cache_repos
from asynccache.cache.layout import CacheDir
from asynccache.cache.merge import merge_cache
from asynccache.cache.status import cache_status
from asynccache.cache.verify import verify_cache
from asynccache.entries import Entry
from asynccache.errors import CacheLocked, ImageNotFound
from asynccache.pipeline import Summary
from asynccache.shards import Shard, shard_positions
from asynccache.tree.extract import ExtractResult, extract_stream
from tests.support.cache_trees import build_sample_tree, cache_instance
from tests.support.fixtures import snapshot_tree

#: Rows of three repositories, interleaved as a dataset may list them.
REPOS = ("alpha", "beta", "gamma")


def rows(count: int = 10) -> list[dict[str, str]]:
    made = []
    for number in range(count):
        repo = REPOS[number % len(REPOS)]
        commit = f"{number + 1:012x}" + "c" * 28
        made.append(
            {
                "repo_name": repo,
                "docker_image": f"registry.test/ns/{repo}_final:{commit}",
                "commit_hash": commit,
            }
        )
    return made


def instance_id(row: dict[str, str]) -> str:
    return f"{row['repo_name']}__{row['commit_hash'][:12]}"


def _positions(data: list[dict[str, str]], shard: Shard) -> list[int]:
    return shard_positions([row["repo_name"] for row in data], shard)


def make_testbed_tar(name: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for folder in ("testbed", "testbed/pkg"):
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for path, text in (("testbed/README", name), ("testbed/pkg/core.py", f"# {name}\n")):
            data = text.encode()
            member = tarfile.TarInfo(path)
            member.size = len(data)
            member.mode = 0o644
            tar.addfile(member, io.BytesIO(data))
        link = tarfile.TarInfo("testbed/link")
        link.type = tarfile.SYMTYPE
        link.linkname = "pkg/core.py"
        tar.addfile(link)
    return buffer.getvalue()


class MemorySource:
    """Each image's /testbed from memory; counts the archives asked for per image."""

    def __init__(self, missing: frozenset[str] = frozenset()) -> None:
        self.fetched: Counter[str] = Counter()
        self.missing = missing
        self.gate: anyio.Event | None = None

    async def prepare(self, entry: Entry) -> None:
        """Nothing to fetch."""

    async def extract_into(self, entry: Entry, dest: Path) -> ExtractResult:
        self.fetched[entry.docker_image] += 1
        if self.gate is not None:
            await self.gate.wait()
        if entry.docker_image in self.missing:
            raise ImageNotFound(entry.docker_image)

        async def chunks() -> AsyncIterator[bytes]:
            yield make_testbed_tar(entry.instance_id)

        return await extract_stream(chunks(), dest, keep_hashes=True)

    async def after_extraction(self, entry: Entry) -> None:
        """Nothing to release."""


async def run_shards(
    cache_dir: Path, data: list[dict[str, str]], count: int, source: MemorySource
) -> list[Summary]:
    """Every shard of ``count`` at once into one folder, as an array job would."""
    summaries: list[Summary | None] = [None] * count

    async def one(index: int) -> None:
        summaries[index] = await cache_repos(
            data, cache_dir=cache_dir, source=source, shard=f"{index}/{count}", concurrency=2
        )

    async with anyio.create_task_group() as tg:
        for index in range(count):
            tg.start_soon(one, index)
    return [summary for summary in summaries if summary is not None]


def stable(record: dict[str, Any]) -> dict[str, Any]:
    """A record without what differs between two runs of the same entry."""
    return {k: v for k, v in record.items() if k not in {"cache_path", "seconds", "cached_at"}}


def index_of(cache_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((cache_dir / "index.json").read_text())
    return data


@pytest.mark.anyio
async def test_shards_at_once_cache_each_entry_once_and_merge_equals_one_run(
    tmp_path: Path,
) -> None:
    data = rows(10)
    source = MemorySource()
    sharded = tmp_path / "sharded"
    summaries = await run_shards(sharded, data, 4, source)

    assert sorted(summary.shard for summary in summaries) == ["0/4", "1/4", "2/4", "3/4"]
    assert sorted(s.cached for s in summaries) == [2, 2, 3, 3]  # balanced within one
    assert set(source.fetched.values()) == {1}  # every image fetched by exactly one shard
    assert len(source.fetched) == len(data)
    assert not (sharded / "index.json").exists()  # shards never write it; merge does
    assert list((sharded / ".tmp").iterdir()) != []  # one work folder per shard...
    assert all(not any(folder.iterdir()) for folder in (sharded / ".tmp").iterdir())  # empty

    report = merge_cache(sharded)
    assert report.exit_code == 0
    assert [state.state for state in report.shards] == ["done"] * 4
    assert report.records == report.added == len(data)

    single = tmp_path / "single"
    await cache_repos(data, cache_dir=single, source=MemorySource())
    merged, one_run = index_of(sharded), index_of(single)
    assert sorted(merged) == sorted(one_run)
    for key in one_run:
        assert stable(merged[key]) == stable(one_run[key])
        assert merged[key]["cache_path"] == str(sharded / key)
        assert snapshot_tree(sharded / key) == snapshot_tree(single / key)


@pytest.mark.anyio
async def test_merge_is_idempotent_and_safe_while_a_shard_runs(tmp_path: Path) -> None:
    data = rows(8)
    cache_dir = tmp_path / "cache"
    source = MemorySource()
    await cache_repos(data, cache_dir=cache_dir, source=source, shard="0/2")
    source.gate = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(lambda: cache_repos(data, cache_dir=cache_dir, source=source, shard="1/2"))
        with anyio.fail_after(10):
            while sum(source.fetched.values()) < len(data) // 2 + 1:
                await anyio.sleep(0.01)
        # Shard 1/2 is running and holds an image in flight: merge takes what is done.
        report = await anyio.to_thread.run_sync(merge_cache, cache_dir)
        assert [(s.shard, s.state) for s in report.shards] == [("0/2", "done"), ("1/2", "running")]
        assert report.exit_code == 1
        first = sorted(instance_id(data[p]) for p in _positions(data, Shard(0, 2)))
        assert sorted(index_of(cache_dir)) == first
        source.gate.set()
    report = merge_cache(cache_dir)
    assert report.exit_code == 0 and report.records == 8
    stamp = os.stat(cache_dir / "index.json")
    again = merge_cache(cache_dir)
    assert again.exit_code == 0 and again.records == 8 and again.added == 0
    after = os.stat(cache_dir / "index.json")
    assert (after.st_ino, after.st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)


@pytest.mark.anyio
async def test_merge_reports_missing_interrupted_and_failed_shards(tmp_path: Path) -> None:
    data = rows(9)
    cache_dir = tmp_path / "cache"
    missing = frozenset({data[0]["docker_image"]})
    failed_shard = next(
        index
        for index in range(3)
        if data[0]["docker_image"]
        in {r["docker_image"] for r in [data[p] for p in _positions(data, Shard(index, 3))]}
    )
    await cache_repos(
        data, cache_dir=cache_dir, source=MemorySource(missing), shard=f"{failed_shard}/3"
    )
    # A shard whose run died after taking its lock and writing its first part.
    dead = (failed_shard + 1) % 3
    part = CacheDir(cache_dir).shard_path(Shard(dead, 3), ".json")
    (cache_dir / ".shards" / f"{dead}-of-3.lock").write_text("process 1 on elsewhere\n")
    part.write_text(
        json.dumps({"format": 1, "shard": f"{dead}/3", "state": "running", "records": {}})
    )
    report = merge_cache(cache_dir)
    states = {state.shard: state for state in report.shards}
    assert states[f"{failed_shard}/3"].state == "failed"
    assert states[f"{failed_shard}/3"].failed == 1
    assert states[f"{dead}/3"].state == "interrupted"
    assert states[f"{(failed_shard + 2) % 3}/3"].state == "missing"
    assert report.exit_code == 1
    failures = json.loads((cache_dir / "failures.json").read_text())
    assert list(failures) == [instance_id(data[0])]
    assert "not found" in failures[instance_id(data[0])]["reason"]
    assert (cache_dir / ".shards" / f"{failed_shard}-of-3.failures.json").exists()


@pytest.mark.anyio
async def test_a_shard_resumes_and_its_part_lists_what_it_found_cached(tmp_path: Path) -> None:
    data = rows(6)
    cache_dir = tmp_path / "cache"
    source = MemorySource()
    first = await cache_repos(data, cache_dir=cache_dir, source=source, shard="1/2")
    again = await cache_repos(data, cache_dir=cache_dir, source=source, shard="1/2")
    assert (first.cached, again.cached, again.skipped) == (3, 0, 3)
    assert set(source.fetched.values()) == {1}
    part = json.loads((cache_dir / ".shards" / "1-of-2.json").read_text())
    assert part["state"] == "done" and part["rows"] == 3 and len(part["records"]) == 3


@pytest.mark.anyio
async def test_one_lock_per_shard_and_whole_runs_exclude_shards(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    running = CacheDir(cache_dir, Shard(2, 4))
    running.lock()
    try:
        with pytest.raises(CacheLocked, match=r"shard 2/4 of cache folder .* is already running"):
            CacheDir(cache_dir, Shard(2, 4)).lock()
        other = CacheDir(cache_dir, Shard(3, 4))
        other.lock()  # another shard runs beside it
        other.unlock()
        with pytest.raises(CacheLocked, match="in use by shards 2/4"):
            CacheDir(cache_dir).lock()
        with pytest.raises(CacheLocked):
            await cache_repos(rows(2), cache_dir=cache_dir, source=MemorySource())
    finally:
        running.unlock()
    whole = CacheDir(cache_dir)
    whole.lock()
    try:
        with pytest.raises(CacheLocked, match="a run of the whole split"):
            CacheDir(cache_dir, Shard(0, 4)).lock()
    finally:
        whole.unlock()


@pytest.mark.anyio
async def test_start_up_cleanup_leaves_other_shards_work_alone(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    others = cache_dir / ".tmp" / "1-of-2" / "beta__000000000002.abcd"
    mine = cache_dir / ".tmp" / "0-of-2" / "alpha__000000000001.ef01"
    for folder in (others, mine):
        folder.mkdir(parents=True)
        (folder / "half-written").write_text("x")
    (cache_dir / ".shards").mkdir()
    others_part = cache_dir / ".shards" / ".1-of-2.json.a1b2c3.tmp"
    my_part = cache_dir / ".shards" / ".0-of-2.json.d4e5f6.tmp"
    for half_written in (others_part, my_part):
        half_written.write_text("{")
    summary = await cache_repos(rows(4), cache_dir=cache_dir, source=MemorySource(), shard="0/2")
    assert summary.notes == ["removed 1 unfinished folders of an earlier run"]
    assert (others / "half-written").exists() and others_part.exists()
    assert not mine.exists() and not my_part.exists()


@pytest.mark.anyio
async def test_invalid_rows_are_reported_by_one_shard_with_their_row_numbers(
    tmp_path: Path,
) -> None:
    data: list[dict[str, Any]] = rows(6)
    data[4] = {**data[4], "docker_image": "Not A Reference"}
    cache_dir = tmp_path / "cache"
    summaries = await run_shards(cache_dir, data, 3, MemorySource())
    failures = [o for s in summaries for o in s.failures]
    assert [(o.instance_id, o.reason.split(":")[0]) for o in failures] == [("row-5", "row 5")]


@pytest.mark.anyio
async def test_readers_see_every_shards_entries_before_merge(tmp_path: Path) -> None:
    data = rows(6)
    cache_dir = tmp_path / "cache"
    await run_shards(cache_dir, data, 3, MemorySource())
    expected = sorted(instance_id(r) for r in data)
    async with RepoCache(cache_dir) as cache:
        assert cache.instance_ids == expected
        assert cache.path(expected[0]) == cache_dir / expected[0]
    status = cache_status(cache_dir)
    assert (status.cached, status.missing, status.failed) == (6, 0, 0)
    report = verify_cache(cache_dir, deep=True)
    assert len(report.checks) == 6 and report.healthy and report.no_digest == []


@pytest.mark.anyio
async def test_verify_repair_drops_damaged_instances_from_the_parts_too(tmp_path: Path) -> None:
    data = rows(4)
    cache_dir = tmp_path / "cache"
    await run_shards(cache_dir, data, 2, MemorySource())
    damaged = instance_id(data[1])
    (cache_dir / damaged / "README").unlink()
    report = verify_cache(cache_dir, repair=True)
    assert report.repaired == [damaged]
    assert damaged not in index_of(cache_dir) and len(index_of(cache_dir)) == 3
    parts = [json.loads(p.read_text()) for p in sorted((cache_dir / ".shards").glob("*-of-2.json"))]
    assert all(damaged not in part["records"] for part in parts)
    merged = merge_cache(cache_dir)
    assert damaged not in index_of(cache_dir)
    stopped = [state for state in merged.shards if state.state != "done"]
    assert len(stopped) == 1 and "verify --repair dropped 1" in stopped[0].detail


# --- merge --from: shards that ran on node-local disks --------------------------------------


@pytest.mark.anyio
async def test_merge_from_gathers_local_shards_by_rename_once(tmp_path: Path) -> None:
    data = rows(8)
    nodes = [tmp_path / f"node{index}" / "cache" for index in range(2)]
    for node in nodes:
        node.parent.mkdir()
    for index, node in enumerate(nodes):
        await cache_repos(data, cache_dir=node, source=MemorySource(), shard=f"{index}/2")
    single = tmp_path / "single"
    await cache_repos(data, cache_dir=single, source=MemorySource())
    shared = tmp_path / "shared"

    report = merge_cache(shared, nodes)
    assert (report.gathered, report.present, report.problems) == (8, 0, [])
    assert report.exit_code == 0 and [s.state for s in report.shards] == ["done", "done"]
    merged, one_run = index_of(shared), index_of(single)
    assert sorted(merged) == sorted(one_run)
    for key in one_run:
        assert stable(merged[key]) == stable(one_run[key])
        assert merged[key]["cache_path"] == str(shared / key)
        assert snapshot_tree(shared / key) == snapshot_tree(single / key)
        assert not (nodes[0] / key).exists() and not (nodes[1] / key).exists()  # renamed
    assert verify_cache(shared, deep=True).healthy

    stamp = os.stat(shared / "index.json")
    again = merge_cache(shared, nodes)
    assert (again.gathered, again.records, again.exit_code) == (0, 8, 0)
    assert os.stat(shared / "index.json").st_mtime_ns == stamp.st_mtime_ns


def test_merge_from_refuses_a_folder_a_run_still_holds(tmp_path: Path) -> None:
    source = CacheDir(tmp_path / "node")
    source.check_usable()
    source.lock()
    try:
        with pytest.raises(CacheLocked):
            merge_cache(tmp_path / "shared", [source.root])
    finally:
        source.unlock()


@pytest.fixture
def other_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs: a filesystem other than tmp_path's, so gathering must copy."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("CI must run as root: this test mounts a tmpfs")
        pytest.skip("needs root to mount a tmpfs")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_merge_from_copies_across_filesystems_keeping_every_shape(
    tmp_path: Path, other_filesystem: Path
) -> None:
    node = other_filesystem / "cache"
    records = [
        cache_instance(node, "alpha", "a" * 40, digest=True),
        cache_instance(node, "beta", "b" * 40, digest=True),
    ]
    before = {r["instance_id"]: snapshot_tree(node / r["instance_id"]) for r in records}
    shared = tmp_path / "shared"
    report = merge_cache(shared, [node])
    assert (report.gathered, report.problems) == (2, [])
    for key, snapshot in before.items():
        assert snapshot_tree(shared / key) == snapshot  # modes, links, hard links, fifo
        assert snapshot_tree(node / key) == snapshot  # a copy leaves the source as it was
        assert index_of(shared)[key]["cache_path"] == str(shared / key)
    assert verify_cache(shared, deep=True).healthy
    assert verify_cache(shared, deep=True).no_digest == []


def test_an_instance_that_cannot_be_copied_is_reported_and_left_out(
    tmp_path: Path, other_filesystem: Path
) -> None:
    node = other_filesystem / "cache"

    def with_device(root: Path) -> None:
        build_sample_tree(root)
        os.mknod(root / "a-device", 0o600 | stat.S_IFCHR, os.makedev(1, 3))

    cache_instance(node, "alpha", "a" * 40, with_device)
    cache_instance(node, "beta", "b" * 40)
    shared = tmp_path / "shared"
    report = merge_cache(shared, [node])
    assert report.gathered == 1 and len(report.problems) == 1
    assert report.problems[0].startswith("alpha__aaaaaaaaaaaa from ")
    assert report.exit_code == 1
    assert sorted(index_of(shared)) == ["beta__bbbbbbbbbbbb"]
    assert not (shared / "alpha__aaaaaaaaaaaa").exists()
    assert list((shared / ".tmp").iterdir()) == []  # nothing partial left
