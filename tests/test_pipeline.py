"""The pipeline with an in-memory source: releases run beside the workers."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from asynccache import Entry, Outcome, cache_repos
from asynccache.cache.index import read_index
from asynccache.cache.records import read_digest
from asynccache.cache.verify import verify_cache
from asynccache.errors import DaemonInterrupted, SetupError
from asynccache.pipeline import MAX_RESTARTS
from asynccache.tree.digest import tree_digest, tree_stats
from asynccache.tree.extract import ExtractResult, extract_stream
from asynccache.tree.git_check import check_tree
from tests.support.leaky_repo import LeakyRepo, copy_repo, git


def make_testbed_tar(text: str) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        root = tarfile.TarInfo("testbed")
        root.type = tarfile.DIRTYPE
        root.mode = 0o755
        tar.addfile(root)
        data = text.encode()
        member = tarfile.TarInfo("testbed/README")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


class SlowReleaseSource:
    """Archives from memory; releasing an entry blocks until the test allows it."""

    def __init__(self) -> None:
        self.allow_release = anyio.Event()
        self.released: list[str] = []

    async def prepare(self, entry: Entry) -> None:
        """Nothing to fetch."""

    async def extract_into(self, entry: Entry, dest: Path) -> ExtractResult:
        async def chunks() -> AsyncIterator[bytes]:
            yield make_testbed_tar(entry.instance_id)

        return await extract_stream(chunks(), dest, keep_hashes=True)

    async def after_extraction(self, entry: Entry) -> None:
        await self.allow_release.wait()
        self.released.append(entry.instance_id)


@pytest.mark.anyio
async def test_slow_image_release_does_not_stall_the_workers(tmp_path: Path) -> None:
    source = SlowReleaseSource()
    entries = [
        Entry(f"repo__{i:012x}", "repo", f"namanjain12/repo_final:{i:040x}", f"{i:040x}")
        for i in range(6)
    ]
    cached: list[Outcome] = []

    async def on_outcome(outcome: Outcome) -> None:
        cached.append(outcome)
        if len(cached) == len(entries):
            # Every entry finished while no release had been allowed to complete.
            assert source.released == []
            source.allow_release.set()

    with anyio.fail_after(30):
        summary = await cache_repos(
            entries,
            cache_dir=tmp_path / "cache",
            concurrency=1,
            source=source,
            on_outcome=on_outcome,
        )
    assert summary.cached == len(entries)
    assert sorted(source.released) == sorted(e.instance_id for e in entries)
    for entry in entries:
        assert (tmp_path / "cache" / entry.instance_id / "README").read_text() == entry.instance_id


class BrokenSource(SlowReleaseSource):
    """Raises an error no layer translates for one entry."""

    async def extract_into(self, entry: Entry, dest: Path) -> ExtractResult:
        if entry.instance_id.endswith("1"):
            raise ValueError("something nobody planned for")
        return await super().extract_into(entry, dest)


@pytest.mark.anyio
async def test_an_unexpected_error_fails_only_its_entry(tmp_path: Path) -> None:
    source = BrokenSource()
    source.allow_release.set()
    entries = [
        Entry(f"repo__{i:012x}", "repo", f"namanjain12/repo_final:{i:040x}", f"{i:040x}")
        for i in range(3)
    ]
    summary = await cache_repos(entries, cache_dir=tmp_path / "cache", source=source)
    assert (summary.cached, summary.failed) == (2, 1)
    assert summary.failures[0].reason == "unexpected ValueError: something nobody planned for"


@pytest.mark.anyio
async def test_content_digests_are_recorded_for_verify_deep(tmp_path: Path) -> None:
    source = SlowReleaseSource()
    source.allow_release.set()
    entries = [
        Entry(f"repo__{i:012x}", "repo", f"namanjain12/repo_final:{i:040x}", f"{i:040x}")
        for i in range(3)
    ]
    cache_dir = tmp_path / "cache"
    await cache_repos(entries, cache_dir=cache_dir, source=source)
    for entry in entries:
        recorded = read_digest(cache_dir, entry.instance_id)
        assert recorded == tree_digest(cache_dir / entry.instance_id)
    report = verify_cache(cache_dir, deep=True)
    assert report.problems == [] and report.no_digest == []
    # Same size, other bytes: only the recorded content digest can tell.
    (cache_dir / entries[0].instance_id / "README").write_text("X" * len(entries[0].instance_id))
    assert verify_cache(cache_dir, deep=False).problems == []
    assert [p.instance_id for p in verify_cache(cache_dir, deep=True).problems] == [
        entries[0].instance_id
    ]


class RepositorySource(SlowReleaseSource):
    """Streams one repository folder as /testbed, as an image would; counts extractions."""

    def __init__(self, repo: Path) -> None:
        super().__init__()
        self.allow_release.set()
        self.repo = repo
        self.extractions = 0

    async def extract_into(self, entry: Entry, dest: Path) -> ExtractResult:
        self.extractions += 1
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            tar.add(self.repo, arcname="testbed")

        async def chunks() -> AsyncIterator[bytes]:
            yield buffer.getvalue()

        return await extract_stream(chunks(), dest, keep_hashes=True)


class InterruptedSource(SlowReleaseSource):
    """Cuts each entry's stream mid-way the first ``cuts`` times, as a daemon going away does."""

    def __init__(self, cuts: int) -> None:
        super().__init__()
        self.allow_release.set()
        self.cuts = cuts
        self.starts: dict[str, int] = {}

    async def extract_into(self, entry: Entry, dest: Path) -> ExtractResult:
        self.starts[entry.instance_id] = self.starts.get(entry.instance_id, 0) + 1
        data = make_testbed_tar(entry.instance_id)
        cut = self.starts[entry.instance_id] <= self.cuts

        async def chunks() -> AsyncIterator[bytes]:
            yield data[:1024]
            if cut:
                raise DaemonInterrupted("the archive stream broke: connection reset")
            yield data[1024:]

        return await extract_stream(chunks(), dest, keep_hashes=True)


ENTRY = Entry("repo__000000000001", "repo", "namanjain12/repo_final:" + "1" * 40, "1" * 40)


@pytest.mark.anyio
async def test_a_cached_repository_reaches_nothing_past_head(
    tmp_path: Path, leaky_repo: LeakyRepo
) -> None:
    cache_dir = tmp_path / "cache"
    summary = await cache_repos(
        [ENTRY], cache_dir=cache_dir, source=RepositorySource(leaky_repo.path)
    )
    assert summary.cached == 1
    final = cache_dir / ENTRY.instance_id
    assert check_tree(final) == []
    assert git(final, "rev-parse", "HEAD").strip() == leaky_repo.head
    record = read_index(cache_dir / "index.json")[ENTRY.instance_id]
    assert record["git_history"] == "head"
    assert (record["file_count"], record["size_bytes"]) == tree_stats(final)
    assert read_digest(cache_dir, ENTRY.instance_id) == tree_digest(final)
    assert verify_cache(cache_dir, deep=True).healthy


@pytest.mark.anyio
async def test_keep_git_history_caches_git_as_the_image_has_it(
    tmp_path: Path, leaky_repo: LeakyRepo
) -> None:
    cache_dir = tmp_path / "cache"
    source = RepositorySource(leaky_repo.path)
    await cache_repos([ENTRY], cache_dir=cache_dir, source=source, keep_git_history=True)
    final = cache_dir / ENTRY.instance_id
    assert tree_digest(final) == tree_digest(leaky_repo.path)
    assert check_tree(final) != []
    assert read_index(cache_dir / "index.json")[ENTRY.instance_id]["git_history"] == "full"
    assert verify_cache(cache_dir, deep=True).healthy


@pytest.mark.anyio
async def test_a_repository_the_guard_cannot_clean_fails_its_entry_once(
    tmp_path: Path, leaky_repo: LeakyRepo
) -> None:
    broken = copy_repo(leaky_repo.path, tmp_path / "broken")
    (broken / ".git/HEAD").write_text("0" * 39 + "1\n")
    source = RepositorySource(broken)
    cache_dir = tmp_path / "cache"
    summary = await cache_repos([ENTRY], cache_dir=cache_dir, source=source)
    assert (summary.cached, summary.failed) == (0, 1)
    assert summary.failures[0].reason == (
        "cannot remove the git history past HEAD from .git: HEAD does not name a commit of "
        "the repository; --keep_git_history keeps .git as the image has it"
    )
    assert source.extractions == 1  # not transient: never retried
    assert not (cache_dir / ENTRY.instance_id).exists()
    assert list((cache_dir / ".tmp").iterdir()) == []
    assert ENTRY.instance_id in json.loads((cache_dir / "failures.json").read_text())


@pytest.mark.anyio
async def test_without_git_the_guard_is_a_setup_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # a folder with no git in it
    with pytest.raises(SetupError, match=r"git is not installed.*--keep_git_history"):
        await cache_repos([], cache_dir=tmp_path / "cache", source=SlowReleaseSource())
    summary = await cache_repos(
        [], cache_dir=tmp_path / "cache", source=SlowReleaseSource(), keep_git_history=True
    )
    assert summary.cached == 0


@pytest.mark.anyio
async def test_an_entry_cut_off_by_its_source_starts_again_without_using_an_attempt(
    tmp_path: Path,
) -> None:
    source = InterruptedSource(cuts=MAX_RESTARTS)
    entry = Entry("repo__000000000001", "repo", "namanjain12/repo_final:1", "1" * 40)
    cache_dir = tmp_path / "cache"
    summary = await cache_repos([entry], cache_dir=cache_dir, source=source, retry_attempts=1)
    assert (summary.cached, summary.failed) == (1, 0), summary.failures
    assert source.starts[entry.instance_id] == MAX_RESTARTS + 1
    assert (cache_dir / entry.instance_id / "README").read_text() == entry.instance_id
    assert list((cache_dir / ".tmp").iterdir()) == []


@pytest.mark.anyio
async def test_an_entry_cut_off_too_often_fails_saying_how_often(tmp_path: Path) -> None:
    source = InterruptedSource(cuts=MAX_RESTARTS + 1)
    entry = Entry("repo__000000000001", "repo", "namanjain12/repo_final:1", "1" * 40)
    cache_dir = tmp_path / "cache"
    summary = await cache_repos([entry], cache_dir=cache_dir, source=source, retry_attempts=1)
    assert (summary.cached, summary.failed) == (0, 1)
    assert f"{MAX_RESTARTS} times" in summary.failures[0].reason
    assert "went away" in summary.failures[0].reason
    assert not (cache_dir / entry.instance_id).exists()
    assert list((cache_dir / ".tmp").iterdir()) == []
