"""An extracted tree's last step: history past HEAD removed, the store told, the digest taken."""

from __future__ import annotations

import io
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from asynccache.cache.history import HistoryCloser, close_history
from asynccache.cache.layout import CacheDir
from asynccache.cache.publish import Publisher
from asynccache.cache.records import meta_path, read_digest
from asynccache.cache.store import Store
from asynccache.entries import Entry
from asynccache.errors import GitGuardFailed
from asynccache.tree.digest import file_sha256, tree_digest, tree_stats
from asynccache.tree.extract import ExtractResult, extract_tar
from asynccache.tree.git_check import check_tree
from tests.support.cache_trees import build_sample_tree
from tests.support.leaky_repo import LeakyRepo, copy_repo

ENTRY = Entry("alpha__aaaaaaaaaaaa", "alpha", "namanjain12/alpha_final:" + "a" * 40, "a" * 40)


@pytest.fixture
def cache(empty_cache: CacheDir) -> CacheDir:
    return empty_cache


@pytest.fixture
def store(cache: CacheDir) -> Iterator[Store]:
    # the sample repository's packs are small: every file the guard takes out is released
    opened = Store(cache.root, released_min_size=0)
    opened.open()
    yield opened
    opened.close()


def _result(tree: Path, digest: str | None = None) -> ExtractResult:
    files, size = tree_stats(tree)
    return ExtractResult(files, size, (), digest=digest)


def _extracted(repo: Path, dest: Path, store: Store | None = None) -> ExtractResult:
    """The repository extracted from a tar of it, as a source extracts (hashes and lines kept)."""
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        tar.add(repo, arcname="testbed")
    data.seek(0)
    return extract_tar(data, dest, keep_hashes=True, store=store)


def test_history_past_head_is_removed_and_the_counts_follow(
    cache: CacheDir, leaky_repo: LeakyRepo
) -> None:
    work_dir = copy_repo(leaky_repo.path, cache.new_work_dir(ENTRY.instance_id))
    extracted = _result(work_dir, digest="digest of the tree as extracted")
    closed = close_history(work_dir, extracted)
    assert check_tree(work_dir) == []
    assert (closed.file_count, closed.size_bytes) == tree_stats(work_dir)
    assert (closed.file_count, closed.size_bytes) != (extracted.file_count, extracted.size_bytes)
    assert closed.digest is None  # the extraction kept no lines: the digest must be read back
    assert list(cache.tmp_dir.iterdir()) == [work_dir]  # no shadow git folder left behind


@pytest.mark.parametrize("dedup", [False, True], ids=["plain", "dedup"])
def test_the_digest_after_the_guard_is_the_tree_as_read_back(
    cache: CacheDir, store: Store, leaky_repo: LeakyRepo, dedup: bool
) -> None:
    work_dir = cache.new_work_dir(ENTRY.instance_id)
    extracted = _extracted(leaky_repo.path, work_dir, store if dedup else None)
    assert extracted.digest == tree_digest(work_dir)
    closed = close_history(work_dir, extracted, store if dedup else None)
    assert check_tree(work_dir) == []
    # taken from the extraction's lines outside .git and .git read back, not the whole tree
    assert closed.digest == tree_digest(work_dir)
    assert closed.digest != extracted.digest
    assert (closed.file_count, closed.size_bytes) == tree_stats(work_dir)


def _git_objects(tree: Path) -> dict[tuple[str, int], int]:
    """(sha256, mode) of each regular file under tree/.git, with its link count."""
    found: dict[tuple[str, int], int] = {}
    for path in (tree / ".git").rglob("*"):
        info = path.lstat()
        if stat.S_ISREG(info.st_mode):
            found[(file_sha256(path), stat.S_IMODE(info.st_mode))] = info.st_nlink
    return found


def test_the_store_keeps_what_the_guard_wrote_and_frees_what_only_the_old_git_held(
    cache: CacheDir, store: Store, leaky_repo: LeakyRepo
) -> None:
    work_dir = cache.new_work_dir(ENTRY.instance_id)
    extracted = _extracted(leaky_repo.path, work_dir, store)
    before = _git_objects(work_dir)
    close_history(work_dir, extracted, store)
    after = _git_objects(work_dir)
    assert after and all(links >= 2 for links in after.values())  # each one stored
    gone = before.keys() - after.keys()
    assert gone  # the guard's repack replaced packs and refs
    # released: kept for a next tree of the same repository, freed when the run closes
    assert all(store.has(digest, mode) for digest, mode in gone)
    store.close()
    for digest, mode in gone:
        assert not store.has(digest, mode)  # nothing links them any more: freed
    assert all(store.has(digest, mode) for digest, mode in after)


def test_a_next_tree_of_the_same_repository_links_the_git_files_the_guard_released(
    cache: CacheDir, store: Store, leaky_repo: LeakyRepo
) -> None:
    first = cache.new_work_dir(ENTRY.instance_id)
    close_history(first, _extracted(leaky_repo.path, first, store), store)
    second = cache.new_work_dir("beta__bbbbbbbbbbbb")
    extracted = _extracted(leaky_repo.path, second, store)
    assert extracted.files_written == 0  # its old packs and refs too: linked, not written
    assert extracted.files_linked == extracted.file_count


def test_the_closer_gives_a_digest_and_keeps_nothing_the_main_process_does_not_need(
    cache: CacheDir, store: Store, leaky_repo: LeakyRepo
) -> None:
    work_dir = cache.new_work_dir(ENTRY.instance_id)
    extracted = _extracted(leaky_repo.path, work_dir, store)
    closed = HistoryCloser(store=store)(work_dir, extracted)
    assert check_tree(work_dir) == []
    assert closed.digest == tree_digest(work_dir)
    assert closed.file_hashes == {} and closed.digest_lines is None
    # without lines (a record that lost track), the tree is read back
    copy = cache.new_work_dir("beta__bbbbbbbbbbbb")
    copy_repo(leaky_repo.path, copy)
    read_back = HistoryCloser()(copy, _result(copy))
    assert read_back.digest == tree_digest(copy)


def test_keep_git_history_publishes_git_as_extracted(
    cache: CacheDir, leaky_repo: LeakyRepo
) -> None:
    work_dir = cache.new_work_dir(ENTRY.instance_id)
    extracted = _extracted(leaky_repo.path, work_dir)
    closed = HistoryCloser(keep_git_history=True)(work_dir, extracted)
    assert check_tree(work_dir) != []
    assert closed.digest == extracted.digest == tree_digest(work_dir)
    assert (closed.file_count, closed.size_bytes) == (extracted.file_count, extracted.size_bytes)


def test_a_tree_without_git_is_published_as_extracted(cache: CacheDir) -> None:
    work_dir = cache.new_work_dir(ENTRY.instance_id)
    build_sample_tree(work_dir)
    extracted = _result(work_dir, digest=tree_digest(work_dir))
    assert close_history(work_dir, extracted) is extracted


@pytest.mark.anyio
async def test_a_repository_the_guard_cannot_clean_is_never_published(
    cache: CacheDir, leaky_repo: LeakyRepo
) -> None:
    publisher = Publisher(cache)
    with pytest.raises(GitGuardFailed, match="HEAD does not name a commit"):
        async with publisher.work_dir(ENTRY.instance_id) as work_dir:
            copy_repo(leaky_repo.path, work_dir)
            (work_dir / ".git/HEAD").write_text("0" * 39 + "1\n")
            closed = HistoryCloser()(work_dir, _result(work_dir))
            await publisher.publish(ENTRY, work_dir, closed, 1.0)
    assert not (cache.root / ENTRY.instance_id).exists()
    assert not meta_path(cache.root, ENTRY.instance_id).exists()
    assert read_digest(cache.root, ENTRY.instance_id) is None
    assert list(cache.tmp_dir.iterdir()) == []
