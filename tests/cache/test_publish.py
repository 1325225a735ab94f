"""Publishing: work folder -> .meta record -> final name -> digest."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from asynccache.cache.index import load_and_repair
from asynccache.cache.layout import CacheDir, scratch_of
from asynccache.cache.publish import Publisher
from asynccache.cache.records import meta_path, read_digest, write_digest
from asynccache.entries import Entry
from asynccache.tree.digest import tree_digest, tree_stats
from asynccache.tree.extract import ExtractResult
from tests.support.cache_trees import build_sample_tree

ENTRY = Entry("alpha__aaaaaaaaaaaa", "alpha", "namanjain12/alpha_final:" + "a" * 40, "a" * 40)


@pytest.fixture
def publisher(empty_cache: CacheDir) -> Publisher:
    return Publisher(empty_cache)


def _result(tree: Path, digest: str | None = None) -> ExtractResult:
    files, size = tree_stats(tree)
    return ExtractResult(files, size, (), digest=digest)


@pytest.mark.anyio
async def test_a_published_tree_has_its_record_and_digest(publisher: Publisher) -> None:
    root = publisher.cache.root
    async with publisher.work_dir(ENTRY.instance_id) as work_dir:
        build_sample_tree(work_dir)
        result = _result(work_dir)
        record = await publisher.publish(ENTRY, work_dir, result, 1.23456)
        await publisher.record_digest(ENTRY.instance_id, result)
    final = root / ENTRY.instance_id
    assert record["cache_path"] == str(final)
    assert (record["file_count"], record["size_bytes"]) == tree_stats(final)
    assert record["seconds"] == 1.235
    assert json.loads(meta_path(root, ENTRY.instance_id).read_text()) == record
    assert read_digest(root, ENTRY.instance_id) == tree_digest(final)
    assert list(publisher.cache.tmp_dir.iterdir()) == []
    # A run killed before index.json was written finds the tree again from its record.
    records, _ = load_and_repair(root)
    assert records == {ENTRY.instance_id: record}


@pytest.mark.anyio
async def test_republishing_replaces_the_tree_and_forgets_the_old_digest(
    publisher: Publisher,
) -> None:
    root = publisher.cache.root
    (root / ENTRY.instance_id).mkdir()
    (root / ENTRY.instance_id / "old.txt").write_text("old")
    write_digest(root, ENTRY.instance_id, "0" * 64)
    async with publisher.work_dir(ENTRY.instance_id) as work_dir:
        (work_dir / "new.txt").write_text("new")
        result = _result(work_dir, digest="1" * 64)
        await publisher.publish(ENTRY, work_dir, result, 0.0)
        assert read_digest(root, ENTRY.instance_id) is None
        await publisher.record_digest(ENTRY.instance_id, result)
    assert sorted(p.name for p in (root / ENTRY.instance_id).iterdir()) == ["new.txt"]
    assert read_digest(root, ENTRY.instance_id) == "1" * 64
    assert list(publisher.cache.tmp_dir.iterdir()) == []


@pytest.mark.anyio
async def test_an_unpublished_work_folder_is_removed(publisher: Publisher) -> None:
    with pytest.raises(RuntimeError, match="extraction broke"):
        async with publisher.work_dir(ENTRY.instance_id) as work_dir:
            build_sample_tree(work_dir)
            raise RuntimeError("extraction broke")
    with anyio.CancelScope() as scope:
        async with publisher.work_dir(ENTRY.instance_id) as work_dir:
            (work_dir / "partial").write_text("x")
            scope.cancel()
            await anyio.sleep(1)
    assert list(publisher.cache.tmp_dir.iterdir()) == []
    assert not (publisher.cache.root / ENTRY.instance_id).exists()


def test_failures_json_is_written_when_there_is_or_was_a_failure(publisher: Publisher) -> None:
    path = publisher.cache.failures_path
    publisher.write_failures([])
    assert not path.exists()
    publisher.write_failures(
        [("a__1", "x/a:1", "image not found"), ("b__2", "x/b:2", "no /testbed")]
    )
    assert json.loads(path.read_text()) == {
        "a__1": {"docker_image": "x/a:1", "reason": "image not found"},
        "b__2": {"docker_image": "x/b:2", "reason": "no /testbed"},
    }
    publisher.write_failures([])
    assert json.loads(path.read_text()) == {}


@pytest.mark.anyio
async def test_a_work_folder_goes_with_its_scratch_folder_whatever_happened(
    publisher: Publisher,
) -> None:
    # a worker killed in the git guard leaves its shadow repositories in the scratch folder
    with pytest.raises(RuntimeError, match="worker died"):
        async with publisher.work_dir(ENTRY.instance_id) as work_dir:
            build_sample_tree(work_dir)
            (scratch_of(work_dir) / ".git-guard-x" / "git").mkdir(parents=True)
            raise RuntimeError("worker died")
    assert list(publisher.cache.tmp_dir.iterdir()) == []
