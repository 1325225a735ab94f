"""Every path a record or an entry names is checked where it comes in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asynccache import Entry, RepoCache
from asynccache.cache.index import read_index
from asynccache.cache.layout import CacheDir, resolve_instance_path
from asynccache.cache.verify import verify_cache
from asynccache.errors import IndexCorrupt, InvalidEntry, MissingInstance
from tests.support.cache_trees import cache_instance

ALPHA = "alpha__aaaaaaaaaaaa"


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    cache_instance(root, "alpha", "a" * 40, digest=True)
    return root


@pytest.mark.parametrize("instance_id", ["../escape", "a/b", ".hidden", "..", "x" * 300, ""])
def test_entry_objects_are_validated_when_made(instance_id: str) -> None:
    with pytest.raises(InvalidEntry, match="fix this entry"):
        Entry(instance_id, "repo", "example.org/repo:tag", "a" * 40)


def test_entry_objects_with_a_bad_image_are_refused() -> None:
    with pytest.raises(InvalidEntry, match="malformed image reference"):
        Entry("repo__aaaaaaaaaaaa", "repo", "not a reference", "a" * 40)


def test_an_index_key_that_leaves_the_folder_is_corrupt(cache_dir: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim.json"
    victim.write_text("{}")
    index = json.loads((cache_dir / "index.json").read_text())
    hostile = dict(index[ALPHA], instance_id="../../victim")
    index["../../victim"] = hostile
    (cache_dir / "index.json").write_text(json.dumps(index))
    with pytest.raises(IndexCorrupt, match="not a safe folder name"):
        read_index(cache_dir / "index.json")


def test_repair_never_deletes_outside_the_cache(cache_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text("precious")
    index = json.loads((cache_dir / "index.json").read_text())
    index["../../outside"] = dict(index[ALPHA], instance_id="../../outside")
    (cache_dir / "index.json").write_text(json.dumps(index))
    with pytest.raises(IndexCorrupt):
        verify_cache(cache_dir, repair=True)
    assert outside.read_text() == "precious"


def test_a_recorded_path_outside_the_cache_is_never_used(cache_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    record = dict(read_index(cache_dir / "index.json")[ALPHA], cache_path=str(elsewhere))
    assert resolve_instance_path(cache_dir, record) == cache_dir / ALPHA
    index = {ALPHA: record}
    (cache_dir / "index.json").write_text(json.dumps(index))
    assert RepoCache(cache_dir).path(ALPHA) == cache_dir / ALPHA


def test_repo_cache_never_resolves_an_unsafe_id(cache_dir: Path) -> None:
    cache = RepoCache(cache_dir)
    with pytest.raises(MissingInstance):
        cache.path("../alpha__aaaaaaaaaaaa")
    assert "../alpha__aaaaaaaaaaaa" not in cache


def test_the_cache_folder_refuses_an_unsafe_instance_path(cache_dir: Path) -> None:
    with pytest.raises(ValueError, match="not a safe folder name"):
        CacheDir(cache_dir).instance_path("../x")
