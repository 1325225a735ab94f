"""writer.py: files created in a thread of their own give the same tree, and the same errors."""

from __future__ import annotations

import hashlib
import io
import os
import random
import tarfile
import threading
from collections import deque
from pathlib import Path
from typing import Any

import pytest

import asynccache.tree.folder as folder_module
import asynccache.tree.writer as writer_module
from asynccache.tree.digest import tree_digest, tree_stats
from asynccache.tree.extract import ExtractResult, extract_tar
from asynccache.tree.layered import LayerTree
from asynccache.tree.writer import FileJob, FileWriter
from tests.support.fixtures import snapshot_tree
from tests.support.tars import tar_of

MTIME = 1_600_000_000
NAMES = ("a", "b", "c", "d", "e", "f", ".wh.a", ".wh.b", ".wh..wh..opq")


def random_members(rng: random.Random, count: int, *, layered: bool) -> list[tuple[Any, bytes]]:
    """Valid members over a small namespace, so that paths meet: twice, file then folder, ..."""
    members: list[tuple[Any, bytes]] = []
    kinds: dict[str, str] = {}  # what this archive put at each path so far
    plain = NAMES[:6]
    if not layered:
        root = tarfile.TarInfo("testbed")
        root.type, root.mode, root.mtime = tarfile.DIRTYPE, 0o755, MTIME
        members.append((root, b""))
    while len(members) < count:
        parts = [rng.choice(plain) for _ in range(rng.choice((0, 1, 2, 2, 2)))]
        if any(
            kinds.get("/".join(parts[:end]), "dir") != "dir" for end in range(1, len(parts) + 1)
        ):
            continue  # a parent that is not a folder fails the archive: not what is tested here
        parts.append(rng.choice(NAMES if layered else plain))
        path = "/".join(parts)
        info = tarfile.TarInfo("testbed/" + path)
        info.mtime = MTIME + rng.randint(0, 1000)
        kind = rng.random()
        data = b""
        files = [
            name
            for name, what in kinds.items()
            if what == "file" and name != path and not name.startswith(path + "/")
        ]
        if kind < 0.55 or parts[-1].startswith(".wh."):
            size = rng.choice((0, 1, 700, 5000, 5000, writer_module.MAX_QUEUED_FILE + 3))
            data = rng.randbytes(size)
            info.size, info.mode = size, rng.choice((0o644, 0o755, 0o600))
            what = "file"
        elif kind < 0.75:
            info.type, info.mode = tarfile.DIRTYPE, rng.choice((0o755, 0o700))
            what = "dir"
        elif kind < 0.9 or not files:
            info.type, info.linkname = tarfile.SYMTYPE, rng.choice(("a", "../b", "/etc"))
            what = "symlink"
        else:
            info.type, info.linkname = tarfile.LNKTYPE, "testbed/" + rng.choice(files)
            what = "file"
        if what != "dir":
            kinds = {name: k for name, k in kinds.items() if not name.startswith(path + "/")}
        for end in range(1, len(parts)):
            kinds.setdefault("/".join(parts[:end]), "dir")
        if not parts[-1].startswith(".wh."):
            kinds[path] = what
        members.append((info, data))
    return members


def outcome(run: Any, dest: Path) -> tuple[str, Any]:
    """The tree run() leaves under dest, or the error it raised.

    The content hashes taken while writing must give the digest that reading gives.
    """
    try:
        result = run(dest)
    except Exception as exc:
        return "error", (type(exc).__name__, str(exc).replace(str(dest), "<dest>"))
    assert tree_digest(dest, result.file_hashes) == tree_digest(dest)
    assert result.digest == tree_digest(dest)  # the digest of what was written is the tree's
    assert (result.file_count, result.size_bytes) == tree_stats(dest)
    for rel, (identity, content) in result.file_hashes.items():  # every kept hash is current
        found = os.lstat(os.path.join(os.fsencode(dest), rel))
        assert identity == (found.st_ino, found.st_size, found.st_mtime_ns)
        assert content == hashlib.sha256((dest / os.fsdecode(rel)).read_bytes()).hexdigest()
    return "tree", snapshot_tree(dest)


def both_ways(run: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run() with the writer thread and without it ends the same way."""
    threaded = outcome(run, tmp_path / "threaded")
    with monkeypatch.context() as patch:
        patch.setattr(folder_module.Folder, "start_writer", lambda self: None)
        inline = outcome(run, tmp_path / "inline")
    assert threaded == inline
    assert not [t for t in threading.enumerate() if t.name == "asynccache-writer"]


@pytest.mark.parametrize("seed", range(40))
def test_an_archive_extracts_the_same_with_and_without_the_writer(
    seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tar_of(random_members(random.Random(seed), 60, layered=False))

    def run(dest: Path) -> ExtractResult:
        dest.mkdir()
        return extract_tar(io.BytesIO(data), dest, keep_hashes=True)

    both_ways(run, tmp_path, monkeypatch)


@pytest.mark.parametrize("seed", range(40))
def test_layers_apply_the_same_with_and_without_the_writer(
    seed: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = random.Random(seed)
    layers = [tar_of(random_members(rng, 40, layered=True)) for _ in range(3)]

    def run(dest: Path) -> ExtractResult:
        dest.mkdir()
        tree = LayerTree(dest, keep_hashes=True)
        for layer in layers:
            tree.apply(io.BytesIO(layer).read)
        return tree.finish()

    both_ways(run, tmp_path, monkeypatch)


def test_many_files_flush_on_the_way_and_all_arrive(tmp_path: Path) -> None:
    count = 5000
    members = [(tarfile.TarInfo("testbed"), b"")]
    members[0][0].type = tarfile.DIRTYPE
    for index in range(count):
        info = tarfile.TarInfo(f"testbed/d{index % 7}/f{index}")
        info.size = len(str(index))
        members.append((info, str(index).encode()))
    result = extract_tar(io.BytesIO(tar_of(members)), tmp_path, keep_hashes=True)
    assert result.file_count == count
    assert len(result.file_hashes) == count
    assert tree_digest(tmp_path, result.file_hashes) == tree_digest(tmp_path)
    assert (tmp_path / f"d{4999 % 7}" / "f4999").read_text() == "4999"


def job(folder: Path, name: str, data: bytes = b"x") -> FileJob:
    full = os.fsencode(folder / name)
    return FileJob(name, name.encode(), full, 0o644, None, [data], len(data))


def test_a_job_the_writer_cannot_do_is_given_back_with_every_later_one(tmp_path: Path) -> None:
    (tmp_path / "taken").mkdir()
    writer = FileWriter(0o022, hashing=True)
    try:
        jobs = [job(tmp_path, "one"), job(tmp_path, "taken"), job(tmp_path, "three")]
        for queued in jobs:
            if not writer.submit(queued):
                break
        failed, removed_files, removed_bytes, hashes = writer.flush()
    finally:
        writer.close()
    assert (tmp_path / "one").read_bytes() == b"x"
    assert [rel for rel, _mode, _hash in hashes] == [b"one"]
    assert failed[0].name == "taken"  # and "three", when it was queued before the failure
    assert not (tmp_path / "three").exists()
    assert (removed_files, removed_bytes) == (0, 0)


def test_a_failure_past_the_first_batch_keeps_every_count_of_the_jobs_before_it(
    tmp_path: Path,
) -> None:
    """The writer hands back several jobs a turn: the files it replaced and the hashes of the
    jobs done before a failure are all counted, in order, and the failed job comes back first
    with every later one."""
    count, failing = 3 * writer_module._BATCH_JOBS, writer_module._BATCH_JOBS + 5
    replaced = range(0, failing, 4)
    for number in replaced:
        (tmp_path / f"f{number}").write_bytes(b"old!")
    (tmp_path / f"f{failing}").mkdir()  # a folder where a file must go: the writer stops
    release = threading.Event()

    class HeldWriter(FileWriter):
        def _write(self, job: Any) -> Any:
            release.wait(10)  # every job queued before the first is done
            return super()._write(job)

    writer = HeldWriter(0o022, hashing=True)
    jobs = [job(tmp_path, f"f{number}", b"%d" % number) for number in range(count)]
    try:
        for queued in jobs:
            assert writer.submit(queued)
        release.set()
        failed, removed_files, removed_bytes, hashes = writer.flush()
    finally:
        release.set()
        writer.close()
    assert [rel for rel, _mode, _hash in hashes] == [b"f%d" % n for n in range(failing)]
    assert (removed_files, removed_bytes) == (len(replaced), 4 * len(replaced))
    assert [queued.name for queued in failed] == [f"f{n}" for n in range(failing, count)]
    assert (tmp_path / f"f{failing - 1}").read_bytes() == b"%d" % (failing - 1)
    assert not (tmp_path / f"f{failing + 1}").exists()


def test_a_turn_of_the_writer_takes_32_small_files_or_about_a_mib(tmp_path: Path) -> None:
    """A thread waiting for room hears of it after a batch: a batch of large files stays near
    a MiB (the first job whatever its size), one of small files near 32 jobs."""

    def sized(count: int, size: int) -> deque[Any]:
        return deque(job(tmp_path, f"f{n}", bytes(size)) for n in range(count))

    assert len(writer_module._batch(sized(40, 1024))) == writer_module._BATCH_JOBS
    assert len(writer_module._batch(sized(10, 600 << 10))) == 1
    assert len(writer_module._batch(sized(10, 300 << 10))) == 3
    assert len(writer_module._batch(sized(2, 16 << 20))) == 1


def test_the_writer_replaces_a_file_and_counts_what_it_removed(tmp_path: Path) -> None:
    (tmp_path / "old").write_bytes(b"12345")
    writer = FileWriter(0o022, hashing=True)
    try:
        assert writer.submit(job(tmp_path, "old", b"new"))
        failed, removed_files, removed_bytes, hashes = writer.flush()
    finally:
        writer.close()
    assert failed == []
    assert (removed_files, removed_bytes) == (1, 5)
    assert (tmp_path / "old").read_bytes() == b"new"
    info = os.lstat(tmp_path / "old")
    identity = (info.st_ino, info.st_size, info.st_mtime_ns)
    assert hashes == [(b"old", 0o644, (identity, hashlib.sha256(b"new").hexdigest()))]


def test_a_file_as_large_as_the_queue_waits_for_room_and_wakes_the_writer(
    tmp_path: Path,
) -> None:
    """Queued bytes stay within the bound, the arriving file counted; a writer left asleep
    below its wake-up marks is woken by a file that must wait."""
    release, started, admitted = threading.Event(), threading.Event(), threading.Event()

    class HeldWriter(FileWriter):
        def _write(self, job: Any) -> Any:
            started.set()
            release.wait(10)
            return super()._write(job)

    writer = HeldWriter(0o022)
    big_size = writer_module._MAX_QUEUED_BYTES
    small = FileJob("s", b"s", os.fsencode(tmp_path / "s"), 0o644, None, [b"x" * 1024], 1024)
    big = FileJob("b", b"b", os.fsencode(tmp_path / "b"), 0o644, None, [bytes(big_size)], big_size)
    try:
        assert writer.submit(small)  # one small file: below the marks that wake the writer

        def submit_big() -> None:
            if writer.submit(big):
                admitted.set()

        thread = threading.Thread(target=submit_big)
        thread.start()
        assert started.wait(5), "the writer was left asleep"
        assert not admitted.wait(0.3), "1 KiB + 16 MiB queued: past the bound"
        release.set()
        assert admitted.wait(5)
        thread.join(5)
        failed, *_ = writer.flush()
        assert failed == []
    finally:
        release.set()
        writer.close()
    assert (tmp_path / "b").stat().st_size == big_size
