"""Extraction with a content store: the same tree, files linked instead of written; --exclude."""

from __future__ import annotations

import errno
import io
import os
import random
import stat
import tarfile
import traceback
import tracemalloc
from pathlib import Path
from typing import Any, BinaryIO, cast

import pytest

from asynccache.cache.store import Store
from asynccache.errors import TruncatedArchive, UnsafeArchive
from asynccache.tree.digest import tree_digest, tree_stats
from asynccache.tree.exclude import ExcludeRules
from asynccache.tree.extract import ExtractResult, extract_tar
from asynccache.tree.folder import Folder
from asynccache.tree.layered import LayerRules, LayerTree
from asynccache.tree.writer import MAX_LINKED_FILE, MAX_QUEUED_FILE
from tests.support.fixtures import snapshot_tree
from tests.support.tars import Trickle, tar_of
from tests.tree.test_writer import random_members

MTIME = 1_600_000_000


def member(name: str, data: bytes | None = None, **attributes: Any) -> tuple[Any, bytes]:
    info = tarfile.TarInfo(name)
    info.mtime, info.mode = MTIME, 0o644
    if data is None:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    else:
        info.size = len(data)
    for key, value in attributes.items():
        setattr(info, key, value)
    return info, data or b""


def sample_members(variant: bytes) -> list[tuple[Any, bytes]]:
    """A tree with shared and own files, small, large and larger than the writer takes, an
    empty one, modes, a hardlink."""
    big = bytes(range(256)) * ((MAX_QUEUED_FILE // 256) + 10)
    huge = bytes(range(256)) * ((MAX_LINKED_FILE // 256) + 1)
    return [
        member("testbed"),
        member("testbed/pkg"),
        member("testbed/pkg/__init__.py", b""),
        member("testbed/pkg/again/__init__.py", b""),
        member("testbed/pkg/core.py", b"def f():\n    return 1\n"),
        member("testbed/pkg/own.py", b"own " + variant),
        member("testbed/run.sh", b"#!/bin/sh\n", mode=0o755),
        member("testbed/plain.sh", b"#!/bin/sh\n"),
        member("testbed/big.bin", big),
        member("testbed/big-own.bin", big + variant),
        member("testbed/huge.bin", huge),
        member("testbed/hard", type=tarfile.LNKTYPE, linkname="testbed/pkg/core.py"),
        member("testbed/link", type=tarfile.SYMTYPE, linkname="pkg/core.py"),
    ]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    (tmp_path / "cache").mkdir()
    opened = Store(tmp_path / "cache")
    opened.open()
    return opened


def extract(data: bytes, dest: Path, **options: Any) -> ExtractResult:
    dest.mkdir(parents=True)
    return extract_tar(io.BytesIO(data), dest, keep_hashes=True, **options)


def regular_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def test_the_second_tree_links_what_the_first_wrote_and_reads_the_same(
    store: Store, tmp_path: Path
) -> None:
    plain = extract(tar_of(sample_members(b"a")), tmp_path / "plain")
    first = extract(tar_of(sample_members(b"a")), tmp_path / "cache" / "one", store=store)
    second = extract(tar_of(sample_members(b"b")), tmp_path / "cache" / "two", store=store)

    one, two = tmp_path / "cache" / "one", tmp_path / "cache" / "two"
    assert snapshot_tree(one, hardlinks=False) == snapshot_tree(tmp_path / "plain", hardlinks=False)
    assert (first.file_count, first.size_bytes) == (plain.file_count, plain.size_bytes)
    assert first.digest == plain.digest == tree_digest(one)
    assert second.digest == tree_digest(two)
    assert (first.file_count, first.size_bytes) == tree_stats(one)
    # within one tree: the empty files share an inode, the image's own hardlink stays one
    assert os.path.samefile(one / "pkg" / "__init__.py", one / "pkg" / "again" / "__init__.py")
    assert os.path.samefile(one / "hard", one / "pkg" / "core.py")
    # same content, other mode: another object
    assert not os.path.samefile(one / "run.sh", one / "plain.sh")
    assert stat.S_IMODE(os.stat(one / "run.sh").st_mode) == 0o755
    # across trees: every shared file is one inode; own files are not
    for name in ("pkg/core.py", "pkg/__init__.py", "run.sh", "plain.sh", "big.bin", "huge.bin"):
        assert os.path.samefile(one / name, two / name), name
    assert not os.path.samefile(one / "pkg" / "own.py", two / "pkg" / "own.py")
    # the first wrote each distinct file once (the hardlink is a link); the second linked
    # each file it shared that the writer takes (hashed first, big.bin too), and wrote the one
    # past that (hashed while written) before replacing it by a link to the stored copy
    assert (first.files_written, first.files_linked) == (8, 1)
    assert (second.files_written, second.files_linked) == (3, 6)
    # every regular file of both trees is a stored object
    objects = store.inodes()
    for path in regular_files(one) + regular_files(two):
        info = os.stat(path)
        assert (info.st_dev, info.st_ino) in objects, path


@pytest.mark.parametrize("seed", range(12))
def test_random_archives_give_the_same_tree_with_a_store(
    seed: int, store: Store, tmp_path: Path
) -> None:
    data = tar_of(random_members(random.Random(seed), 60, layered=False))
    try:
        plain: ExtractResult | None = extract(data, tmp_path / "plain")
    except UnsafeArchive:
        plain = None
    for copy in ("a", "b"):  # the second copy links everything from the store
        dest = tmp_path / "cache" / copy
        if plain is None:
            with pytest.raises(UnsafeArchive):
                extract(data, dest, store=store)
            continue
        result = extract(data, dest, store=store)
        assert snapshot_tree(dest, hardlinks=False) == snapshot_tree(
            tmp_path / "plain", hardlinks=False
        )
        assert result.digest == plain.digest == tree_digest(dest)
        assert tree_digest(dest, result.file_hashes) == tree_digest(dest)
        assert (result.file_count, result.size_bytes) == (plain.file_count, plain.size_bytes)
    objects = store.inodes()
    for path in regular_files(tmp_path / "cache" / "b") if plain is not None else ():
        info = os.stat(path)
        assert (info.st_dev, info.st_ino) in objects


@pytest.mark.parametrize("seed", range(12))
def test_random_layers_give_the_same_tree_with_a_store(
    seed: int, store: Store, tmp_path: Path
) -> None:
    rng = random.Random(seed)
    layers = [tar_of(random_members(rng, 40, layered=True)) for _ in range(3)]

    def run(dest: Path, layer_store: Store | None) -> tuple[str, Any]:
        dest.mkdir(parents=True)
        tree = LayerTree(dest, keep_hashes=True, store=layer_store)
        try:
            for layer in layers:
                tree.apply(io.BytesIO(layer).read)
            result = tree.finish()
        except UnsafeArchive as exc:
            return "error", str(exc).replace(str(dest), "<dest>")
        assert result.digest in (None, tree_digest(dest))
        assert tree_digest(dest, result.file_hashes) == tree_digest(dest)
        return "tree", snapshot_tree(dest, hardlinks=False)

    plain = run(tmp_path / "plain", None)
    assert run(tmp_path / "cache" / "a", store) == plain
    assert run(tmp_path / "cache" / "b", store) == plain


def test_hardlinks_to_files_outside_the_root_are_stored_once_filled(
    store: Store, tmp_path: Path
) -> None:
    """A layer whose /testbed files link to a file outside it (as uv's venvs do)."""
    data = b"shared library\n" * 100
    layer = tar_of(
        [
            member("root/.cache/uv/lib.py", data),
            member("testbed"),
            member("testbed/.venv"),
            member("testbed/.venv/lib.py", type=tarfile.LNKTYPE, linkname="root/.cache/uv/lib.py"),
            member("testbed/.venv/lib2.py", type=tarfile.LNKTYPE, linkname="root/.cache/uv/lib.py"),
        ]
    )
    trees = []
    for name in ("a", "b"):
        dest = tmp_path / "cache" / name
        dest.mkdir(parents=True)
        tree = LayerTree(dest, keep_hashes=True, store=store)
        result = tree.apply(io.BytesIO(layer).read)
        assert result.links_pending
        tree.fill_links(io.BytesIO(layer).read)
        finished = tree.finish()
        assert finished.file_count == 2 and finished.size_bytes == 2 * len(data)
        assert tree_digest(dest, finished.file_hashes) == tree_digest(dest)
        trees.append(dest)
    paths = [tree / ".venv" / name for tree in trees for name in ("lib.py", "lib2.py")]
    assert all(path.read_bytes() == data for path in paths)
    assert all(os.path.samefile(paths[0], path) for path in paths)
    (only,) = list(store.objects())
    assert only.links == 5


def test_exclude_leaves_out_matching_folders_files_and_links_to_them(tmp_path: Path) -> None:
    members = [
        member("testbed"),
        member("testbed/.venv"),
        member("testbed/.venv/bin"),
        member("testbed/.venv/bin/python", type=tarfile.SYMTYPE, linkname="/usr/bin/python3"),
        member("testbed/.venv/lib.py", b"lib"),
        member("testbed/src"),
        member("testbed/src/__pycache__"),
        member("testbed/src/__pycache__/m.cpython-311.pyc", b"pyc"),
        member("testbed/src/m.py", b"m"),
        member("testbed/src/m-link.py", type=tarfile.LNKTYPE, linkname="testbed/.venv/lib.py"),
        member("testbed/keep.venv", b"not the folder"),
    ]
    rules = ExcludeRules([".venv", "**/__pycache__"])
    result = extract(tar_of(members), tmp_path / "t", exclude=rules)
    found = sorted(str(p.relative_to(tmp_path / "t")) for p in (tmp_path / "t").rglob("*"))
    assert found == ["keep.venv", "src", "src/m.py"]
    assert (result.file_count, result.size_bytes) == tree_stats(tmp_path / "t") == (2, 15)
    assert result.digest == tree_digest(tmp_path / "t")
    assert any("hardlink target" in warning for warning in result.warnings)


def test_exclude_applies_to_layers_and_whiteouts_still_apply(tmp_path: Path) -> None:
    lower = tar_of(
        [member("testbed"), member("testbed/a.txt", b"a"), member("testbed/b.log", b"b")]
    )
    upper = tar_of([member("testbed/.wh.a.txt", b""), member("testbed/c.log", b"c")])
    dest = tmp_path / "t"
    dest.mkdir()
    tree = LayerTree(dest, keep_hashes=True, exclude=ExcludeRules(["*.log"]))
    tree.apply(io.BytesIO(lower).read)
    tree.apply(io.BytesIO(upper).read)
    result = tree.finish()
    assert sorted(os.listdir(dest)) == [] and result.file_count == 0


def test_exclude_patterns_are_checked() -> None:
    for bad in ("", "  ", "a\nb"):
        with pytest.raises(ValueError):
            ExcludeRules([bad])
    assert not ExcludeRules([])


def test_a_file_read_a_few_bytes_at_a_time_is_held_about_once(store: Store, tmp_path: Path) -> None:
    """The writer takes files up to 16 MiB in memory: their pieces are joined as they come."""
    size = MAX_QUEUED_FILE + 1  # past the small-file limit: in memory only because of the store
    data = tar_of(
        [member("testbed"), member("testbed/big.bin", bytes(range(256)) * (size // 256) + b"x")]
    )
    dest = tmp_path / "cache" / "tree"
    dest.mkdir()
    tracemalloc.start()
    try:
        result = extract_tar(cast(BinaryIO, Trickle(data, 8)), dest, keep_hashes=True, store=store)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result.file_count == 1 and (dest / "big.bin").stat().st_size == size
    # kept as 8-byte pieces it was ~49 bytes of memory for each byte of the file
    assert peak < 3 * size, peak


class _PutFailsOnce(Store):
    """A store whose first put fails as a full disk would (after the file was written)."""

    failed = False

    def put(self, path: bytes, digest: str, mode: int) -> tuple[bool, os.stat_result]:
        if not self.failed:
            self.failed = True
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().put(path, digest, mode)


def test_a_file_the_writer_could_not_store_is_done_again_and_counted_once(
    tmp_path: Path,
) -> None:
    (tmp_path / "cache").mkdir()
    flaky = _PutFailsOnce(tmp_path / "cache")
    flaky.open()
    size = 2 << 20
    data = tar_of([member("testbed"), member("testbed/big.bin", b"y" * size)])
    dest = tmp_path / "cache" / "tree"
    result = extract(data, dest, store=flaky)
    assert flaky.failed
    assert (result.file_count, result.size_bytes) == (1, size)
    assert (dest / "big.bin").read_bytes() == b"y" * size
    assert result.digest == tree_digest(dest)


def test_a_stream_cut_inside_a_file_keeps_none_of_its_data(store: Store, tmp_path: Path) -> None:
    """The error's traceback holds the extraction's frames; not the file's data read so far."""
    data = tar_of([member("testbed"), member("testbed/big.bin", b"z" * (3 << 20))])
    dest = tmp_path / "cache" / "tree"
    dest.mkdir()
    with pytest.raises(TruncatedArchive) as failure:
        extract_tar(io.BytesIO(data[: 2 << 20]), dest, keep_hashes=True, store=store)
    held = [
        frame.f_locals["pieces"]
        for frame, _ in traceback.walk_tb(failure.value.__traceback__)
        if frame.f_code.co_name == "read_data"
    ]
    assert held == [[]]
    assert not (dest / "big.bin").exists()


def test_only_a_store_makes_the_writer_take_files_past_1_mib(tmp_path: Path) -> None:
    rules = LayerRules()
    plain = Folder(bytes(tmp_path), rules)
    stored = Folder(bytes(tmp_path), rules, store=Store(tmp_path))
    for folder in (plain, stored):
        folder.start_writer()
    try:
        assert plain.queues(b"f", MAX_QUEUED_FILE) and stored.queues(b"f", MAX_QUEUED_FILE)
        assert not plain.queues(b"f", MAX_QUEUED_FILE + 1)
        assert stored.queues(b"f", MAX_LINKED_FILE)
        assert not stored.queues(b"f", MAX_LINKED_FILE + 1)
    finally:
        for folder in (plain, stored):
            folder.stop_writer(completed=False)
