"""Dedup through whole caching runs: sharing, link limits, damage, gc, exclude, export/import.

The archives come from memory (the pipeline's archive-source seam), so these runs need no
daemon; the Docker and registry backends are checked against ``docker cp`` with dedup in
tests/e2e/test_cache_e2e.py and tests/sources/test_registry_backend.py.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from asynccache import Entry, cache_repos
from asynccache.cache.exchange import export_cache, import_cache
from asynccache.cache.gc import collect_garbage
from asynccache.cache.records import read_digest
from asynccache.cache.status import cache_status
from asynccache.cache.store import Store
from asynccache.cache.store_check import store_usage
from asynccache.cache.verify import format_verify, verify_cache
from asynccache.config import store_max_links
from asynccache.trainer.checkout import checkout_tree, release_tree
from asynccache.tree.digest import tree_digest
from asynccache.tree.exclude import ExcludeRules
from asynccache.tree.extract import ExtractResult, extract_stream
from tests.support.fixtures import snapshot_tree

MTIME = 1_600_000_000
VENV = {f".venv/lib/mod{n}.py": f"# module {n}\n".encode() * 40 for n in range(30)}
VENV[".venv/lib/empty/__init__.py"] = b""


def source_files(repo: str, commit: int) -> dict[str, bytes]:
    """A repository at one commit: the same venv, mostly the same sources, changed files."""
    files = dict(VENV)
    files.update({f"src/pkg/m{n}.py": f"def f{n}(): return {n}\n".encode() for n in range(20)})
    files["src/pkg/__init__.py"] = b""
    files["src/pkg/sub/__init__.py"] = b""
    files["src/changed.py"] = f"VERSION = '{repo} {commit}'\n".encode()
    files["src/__pycache__/changed.cpython-311.pyc"] = f"pyc {repo} {commit}".encode()
    files["big.bin"] = bytes(range(256)) * 5000  # past the small-file limit, linked all the same
    return files


def archive_of(files: Mapping[str, bytes], scripts: tuple[str, ...] = ("run.sh",)) -> bytes:
    """The tar stream `docker cp` would give for a /testbed with these files."""
    out = io.BytesIO()
    folders = sorted(
        {"/".join(p.split("/")[:n]) for p in files for n in range(1, p.count("/") + 1)}
    )
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name in ["", *folders]:
            info = tarfile.TarInfo(f"testbed/{name}".rstrip("/"))
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tar.addfile(info)
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(f"testbed/{name}")
            info.size, info.mode, info.mtime = len(data), 0o644, MTIME
            tar.addfile(info, io.BytesIO(data))
        for name in scripts:
            data = b"#!/bin/sh\nexec pytest\n"
            info = tarfile.TarInfo(f"testbed/{name}")
            info.size, info.mode, info.mtime = len(data), 0o755, MTIME
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("testbed/src/pkg/m0-link.py")
        link.type, link.linkname, link.mtime = tarfile.LNKTYPE, "testbed/src/pkg/m0.py", MTIME
        tar.addfile(link)
    return out.getvalue()


class MemorySource:
    """Archives of fixed trees by instance id, extracted as the Docker source extracts them."""

    def __init__(
        self,
        archives: Mapping[str, bytes],
        store: Store | None = None,
        exclude: ExcludeRules | None = None,
    ) -> None:
        self.archives = dict(archives)
        self.store, self.exclude = store, exclude

    async def prepare(self, entry: Entry) -> None:
        """Nothing to fetch."""

    async def extract_into(self, entry: Entry, dest: Path) -> ExtractResult:
        data = self.archives[entry.instance_id]

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(data), 65536):
                yield data[start : start + 65536]

        return await extract_stream(
            chunks(), dest, keep_hashes=True, store=self.store, exclude=self.exclude
        )

    async def after_extraction(self, entry: Entry) -> None:
        """Nothing to release."""


@contextmanager
def memory_source(
    cache_dir: Path, archives: Mapping[str, bytes], **options: Any
) -> Iterator[MemorySource]:
    """A source for a run with these options: its own view of the folder's store (as the
    built-in sources get theirs from open_pipeline), closed after the run."""
    patterns = options.get("exclude", ())
    exclude = ExcludeRules(patterns) if patterns else None
    if not options.get("dedup", True):
        yield MemorySource(archives, None, exclude)
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    store = Store(cache_dir, max_links=options.get("store_max_links", store_max_links))
    store.open()
    try:
        yield MemorySource(archives, store, exclude)
    finally:
        store.close()


def entry(repo: str, commit: int) -> Entry:
    commit_hash = f"{commit:x}" * 40
    image = f"namanjain12/{repo}_final:{commit_hash}"
    return Entry(f"{repo}__{commit_hash[:12]}", repo, image, commit_hash)


ENTRIES = [entry(repo, commit) for repo in ("alpha", "beta") for commit in (1, 2)]


def archives_for(entries: list[Entry]) -> dict[str, bytes]:
    return {
        e.instance_id: archive_of(source_files(e.repo_name, int(e.commit_hash[0], 16)))
        for e in entries
    }


async def cache(cache_dir: Path, entries: list[Entry] = ENTRIES, **options: Any) -> Any:
    with memory_source(cache_dir, archives_for(entries), **options) as source:
        summary = await cache_repos(entries, cache_dir=cache_dir, source=source, **options)
    assert summary.failed == 0, [o.reason for o in summary.failures]
    return summary


def index_of(cache_dir: Path) -> dict[str, dict[str, Any]]:
    return dict(json.loads((cache_dir / "index.json").read_text()))


def regular_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())


@pytest.mark.anyio
async def test_files_are_shared_across_repositories_and_within_one(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    await cache(cache_dir, concurrency=1)  # one after the other, to count what each wrote
    plain_dir = tmp_path / "plain"
    await cache(plain_dir, dedup=False)
    index = index_of(cache_dir)
    trees = [cache_dir / e.instance_id for e in ENTRIES]
    for tree, plain in zip(trees, (plain_dir / e.instance_id for e in ENTRIES), strict=True):
        assert snapshot_tree(tree, hardlinks=False) == snapshot_tree(plain, hardlinks=False)
        assert read_digest(cache_dir, tree.name) == tree_digest(plain)
    # across repositories and commits: the venv and unchanged sources are one inode each
    for name in (".venv/lib/mod3.py", "src/pkg/m7.py", "big.bin", "run.sh"):
        assert len({os.stat(tree / name).st_ino for tree in trees}) == 1, name
    assert not os.path.samefile(trees[0] / "src/changed.py", trees[1] / "src/changed.py")
    # within one tree: equal files share an inode; the image's own hardlink stays one
    assert os.path.samefile(trees[0] / "src/pkg/__init__.py", trees[0] / "src/pkg/sub/__init__.py")
    assert os.path.samefile(trees[0] / "src/pkg/m0.py", trees[0] / "src/pkg/m0-link.py")
    # logical figures in the index; the first tree wrote what the others linked
    records = [index[e.instance_id] for e in ENTRIES]
    assert all(r["dedup"] is True for r in records)
    assert all(index_of(plain_dir)[e.instance_id]["dedup"] is False for e in ENTRIES)
    assert [r["file_count"] for r in records] == [len(regular_files(t)) for t in trees]
    first_written = records[0]["files_written"]
    assert records[0]["files_linked"] == 2  # the two other empty __init__.py
    for later in records[1:]:
        assert later["files_written"] == 2  # src/changed.py and its pyc
        assert later["files_linked"] == first_written + 2 - 2
    status = cache_status(cache_dir)
    assert status.logical_bytes == sum(r["size_bytes"] for r in records)
    assert status.physical_bytes == status.store.bytes < status.logical_bytes * 0.4
    assert status.store.unlinked_objects == 0
    plain_status = cache_status(plain_dir)
    assert plain_status.physical_bytes == plain_status.logical_bytes
    assert verify_cache(cache_dir, deep=True).healthy


@pytest.mark.anyio
async def test_a_link_ceiling_starts_new_copies_and_no_object_passes_it(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    await cache(cache_dir, store_max_links=3)
    objects = list(Store(cache_dir).objects())
    # src/pkg/m0.py is hard-linked in each image too: that link is the image's, made past
    # the store (the ceiling leaves room for such groups below the filesystem's limit)
    m0 = hashlib.sha256(source_files("alpha", 1)["src/pkg/m0.py"]).hexdigest()
    assert max(o.links for o in objects if o.digest != m0) == 3
    empties = [o for o in objects if o.size == 0]
    # 3 empty files per tree, 4 trees: 12 tree links, at most 2 per copy (at least 6 copies;
    # extractions filling copies at once may each leave one not full)
    assert sum(o.links - 1 for o in empties) == 12
    assert len(empties) >= 6 and max(o.links for o in empties) <= 3
    for e in ENTRIES:
        assert read_digest(cache_dir, e.instance_id) == tree_digest(cache_dir / e.instance_id)
    assert verify_cache(cache_dir, deep=True).healthy


@pytest.mark.anyio
async def test_an_in_place_edit_is_found_in_every_sharer_and_repaired(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    await cache(cache_dir)
    victim = cache_dir / ENTRIES[0].instance_id / ".venv/lib/mod5.py"
    with open(victim, "r+b") as handle:  # through one tree's hardlink: every sharer changes
        handle.write(b"X")
    report = verify_cache(cache_dir, deep=True)
    assert not report.healthy and report.exit_code == 1
    (damaged,) = report.objects
    assert damaged.reason == "content changed in place"
    assert damaged.shared_by == sorted(e.instance_id for e in ENTRIES)
    assert {c.instance_id for c in report.problems} == {e.instance_id for e in ENTRIES}
    text = format_verify(report)
    assert f"store object {damaged.name}" in text and ENTRIES[3].instance_id in text

    repaired = verify_cache(cache_dir, deep=True, repair=True)
    assert repaired.repaired_objects == [damaged.name]
    assert repaired.repaired == sorted(e.instance_id for e in ENTRIES)
    assert index_of(cache_dir) == {}
    # the next run extracts them again, writing the good content anew (not the changed inode)
    summary = await cache(cache_dir)
    assert summary.cached == len(ENTRIES)
    assert victim.read_bytes() == VENV[".venv/lib/mod5.py"]
    after = verify_cache(cache_dir, deep=True)
    assert after.healthy, format_verify(after)
    assert collect_garbage(cache_dir).freed_objects == 0


@pytest.mark.anyio
async def test_gc_and_re_extraction_free_only_what_nothing_links(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    await cache(cache_dir)
    store = Store(cache_dir)
    before = store_usage(store)
    # re-extracting a tree whose image changed frees at once what only the old tree linked
    changed = dict(source_files("alpha", 1), **{"src/changed.py": b"VERSION = 'new'\n"})
    archives = {ENTRIES[0].instance_id: archive_of(changed)}
    with memory_source(cache_dir, archives) as source:
        await cache_repos([ENTRIES[0]], cache_dir=cache_dir, source=source, skip_existing=False)
    usage = store_usage(store)
    assert usage.unlinked_objects == 0
    assert usage.objects == before.objects  # the old src/changed.py freed, the new one added
    # removing a tree by hand leaves its own objects to gc, and gc frees nothing else
    gone = cache_dir / ENTRIES[1].instance_id
    own = gone / "src/changed.py"
    own_size = (
        own.stat().st_size + (gone / "src/__pycache__/changed.cpython-311.pyc").stat().st_size
    )
    subprocess.run(["rm", "-rf", str(gone)], check=True)
    assert store_usage(store).unlinked_objects == 2
    report = collect_garbage(cache_dir)
    assert (report.freed_objects, report.freed_bytes) == (2, own_size)
    assert store_usage(store).unlinked_objects == 0
    for e in (ENTRIES[0], *ENTRIES[2:]):
        assert read_digest(cache_dir, e.instance_id) == tree_digest(cache_dir / e.instance_id)
    assert collect_garbage(cache_dir).freed_objects == 0


@pytest.mark.anyio
async def test_checkouts_never_hand_out_a_stored_inode(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    await cache(cache_dir, entries=ENTRIES[:1])
    tree = cache_dir / ENTRIES[0].instance_id
    stored = Store(cache_dir).inodes()
    dest = tmp_path / "rollout"
    assert checkout_tree(tree, dest, mode="copy") == "copy"
    try:
        for path in regular_files(dest):
            info = path.stat()
            assert (info.st_dev, info.st_ino) not in stored
        (dest / ".venv/lib/mod1.py").write_bytes(b"edited by a rollout")
    finally:
        release_tree(dest)
    assert verify_cache(cache_dir, deep=True).healthy


@pytest.mark.anyio
async def test_exclude_leaves_paths_out_and_is_recorded(tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    patterns = (".venv", "**/__pycache__")
    await cache(cache_dir, entries=ENTRIES[:1], exclude=patterns)
    tree = cache_dir / ENTRIES[0].instance_id
    assert not (tree / ".venv").exists() and not (tree / "src/__pycache__").exists()
    assert (tree / "src/pkg/m1.py").exists()
    record = index_of(cache_dir)[ENTRIES[0].instance_id]
    assert record["exclude"] == list(patterns)
    assert record["file_count"] == len(regular_files(tree))
    assert cache_status(cache_dir).excluded == {".venv **/__pycache__": 1}
    assert verify_cache(cache_dir, deep=True).healthy
    # a run that wants the whole tree does not take the excluded one for it
    summary = await cache(cache_dir, entries=ENTRIES[:1])
    assert summary.cached == 1 and (tree / ".venv/lib/mod1.py").exists()
    assert "exclude" not in index_of(cache_dir)[ENTRIES[0].instance_id]


def portable(record: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "cache_path"}


@pytest.mark.anyio
async def test_export_import_round_trip_keeps_trees_records_and_dedup(tmp_path: Path) -> None:
    source_dir, target_dir = tmp_path / "source", tmp_path / "target"
    await cache(source_dir)
    stream = io.BytesIO()
    exported = export_cache(source_dir, stream)
    assert (exported.trees, exported.skipped) == (4, {})
    assert exported.objects == store_usage(Store(source_dir)).objects

    report = import_cache(target_dir, io.BytesIO(stream.getvalue()))
    assert report.exit_code == 0, report
    assert sorted(report.imported) == sorted(e.instance_id for e in ENTRIES)
    source_index, target_index = index_of(source_dir), index_of(target_dir)
    assert {k: portable(v) for k, v in target_index.items()} == {
        k: portable(v) for k, v in source_index.items()
    }
    for e in ENTRIES:
        copy, original = target_dir / e.instance_id, source_dir / e.instance_id
        assert target_index[e.instance_id]["cache_path"] == str(copy)
        assert snapshot_tree(copy, hardlinks=False) == snapshot_tree(original, hardlinks=False)
        assert read_digest(target_dir, e.instance_id) == read_digest(source_dir, e.instance_id)
    trees = [target_dir / e.instance_id for e in ENTRIES]
    assert len({os.stat(tree / ".venv/lib/mod3.py").st_ino for tree in trees}) == 1
    assert store_usage(Store(target_dir)) == store_usage(Store(source_dir))
    assert verify_cache(target_dir, deep=True).healthy
    # the same stream again: everything is there already
    again = import_cache(target_dir, io.BytesIO(stream.getvalue()))
    assert (again.imported, again.objects_received, again.exit_code) == ([], 0, 0)
    assert sorted(again.skipped) == sorted(e.instance_id for e in ENTRIES)


@pytest.mark.anyio
@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.6, 0.97])
async def test_a_truncated_stream_publishes_nothing_partial_and_resumes(
    tmp_path: Path, fraction: float
) -> None:
    source_dir, target_dir = tmp_path / "source", tmp_path / "target"
    await cache(source_dir)
    stream = io.BytesIO()
    export_cache(source_dir, stream)
    whole = stream.getvalue()
    report = import_cache(target_dir, io.BytesIO(whole[: int(len(whole) * fraction)]))
    assert report.exit_code == 1 and not report.complete and report.error
    index = index_of(target_dir) if (target_dir / "index.json").exists() else {}
    assert sorted(index) == sorted(report.imported)
    for folder in target_dir.iterdir():
        if not folder.name.startswith("."):
            assert folder.name in index  # no folder under a final name but complete ones
            assert read_digest(target_dir, folder.name) == tree_digest(folder)
    assert list((target_dir / ".tmp").iterdir()) == []
    resumed = import_cache(target_dir, io.BytesIO(whole))
    assert resumed.exit_code == 0
    assert sorted(resumed.imported + resumed.skipped) == sorted(e.instance_id for e in ENTRIES)
    assert sorted(resumed.skipped) == sorted(report.imported)
    assert verify_cache(target_dir, deep=True).healthy


def asynccache(*args: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[bytes]:
    environment = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    return subprocess.run(
        [sys.executable, "-m", "asynccache", *map(str, args)],
        capture_output=True,
        env=environment,
        timeout=120,
        **kwargs,
    )


@pytest.mark.anyio
async def test_the_commands_export_import_gc_and_status(tmp_path: Path) -> None:
    source_dir, target_dir = tmp_path / "source", tmp_path / "target"
    await cache(source_dir)
    ids = tmp_path / "ids.txt"
    ids.write_text(f"{ENTRIES[0].instance_id}\n{ENTRIES[2].instance_id}\nnot__cached\n")
    pipeline = subprocess.run(
        f"{sys.executable} -m asynccache export --cache_dir {source_dir} --ids {ids} | "
        f"{sys.executable} -m asynccache import --cache_dir {target_dir}",
        shell=True,
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])),
        timeout=120,
    )
    assert pipeline.returncode == 0, pipeline.stderr
    assert "exported 2 trees" in pipeline.stderr and "1 selected trees are not cached" in (
        pipeline.stderr
    )
    assert "imported 2 trees" in pipeline.stdout
    assert sorted(index_of(target_dir)) == sorted([ENTRIES[0].instance_id, ENTRIES[2].instance_id])

    shard = asynccache("export", "--cache_dir", source_dir, "--shard", "1/2")
    assert shard.returncode == 0, shard.stderr
    assert b"exported 2 trees" in shard.stderr
    terminal = asynccache("import", "--cache_dir", target_dir, input=b"not a stream")
    assert terminal.returncode == 1 and b"zstd" in terminal.stderr

    status = asynccache("status", "--cache_dir", source_dir)
    assert b"physical for" in status.stdout and b"logical" in status.stdout
    gc = asynccache("gc", "--cache_dir", source_dir)
    assert gc.returncode == 0 and b"freed 0 objects" in gc.stdout
