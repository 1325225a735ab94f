"""cache/transfer.py: objects sent once, trees rebuilt exactly, damaged or foreign input refused."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import tarfile
from pathlib import Path
from typing import Any

import pytest
import zstandard

from asynccache.cache.exchange import receive_object
from asynccache.cache.manifest import build_tree, scan_tree
from asynccache.cache.store import Store
from asynccache.cache.transfer import (
    StreamEnd,
    StreamObject,
    StreamTree,
    StreamWriter,
    TransferError,
    read_stream,
)
from asynccache.tree.digest import tree_digest
from tests.support.fixtures import snapshot_tree

MTIME = 1_600_000_000


def make_tree(root: Path, variant: str) -> None:
    """A small tree with folders of several modes, files, an empty file, symlinks."""
    (root / "pkg" / "sub").mkdir(parents=True)
    (root / "pkg" / "__init__.py").write_bytes(b"")
    (root / "pkg" / "core.py").write_bytes(b"def f():\n    return 1\n")
    (root / "pkg" / "sub" / "data.bin").write_bytes(bytes(range(256)) * 50)
    (root / "pkg" / f"only_{variant}.py").write_bytes(variant.encode() * 3)
    (root / "run.sh").write_bytes(b"#!/bin/sh\necho hi\n")
    os.chmod(root / "run.sh", 0o755)
    (root / "link").symlink_to("pkg/core.py")
    (root / "abs").symlink_to("/usr/bin/python3")
    os.chmod(root / "pkg" / "sub", 0o700)
    for path in (root / "pkg" / "sub", root / "pkg", root):
        os.utime(path, ns=(MTIME * 10**9, MTIME * 10**9))


def dedup_tree(store: Store, root: Path) -> None:
    """Put every file of root into the store (as an extraction with dedup does)."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            store.put(
                os.fsencode(path), hashlib.sha256(data).hexdigest(), path.stat().st_mode & 0o777
            )


def open_store(folder: Path) -> Store:
    folder.mkdir(parents=True, exist_ok=True)
    store = Store(folder)
    store.open()
    return store


def export(trees: dict[str, Path], store: Store | None) -> bytes:
    """A stream of the given trees, each object once."""
    out = io.BytesIO()
    writer = StreamWriter(out, threads=0)
    sent: set[tuple[str, int]] = set()
    stored = store.inodes() if store is not None else {}
    for instance_id, root in trees.items():
        scan = scan_tree(root, store, stored)
        for key, source in scan.sources.items():
            if key not in sent:
                writer.add_object(key[0], key[1], source)
                sent.add(key)
        record = {"instance_id": instance_id, "cache_path": instance_id}
        writer.add_tree(instance_id, record, tree_digest(root), scan.root, scan.entries)
    writer.close()
    return out.getvalue()


def receive(stream: bytes, store: Store, dest: Path) -> list[Any]:
    """Apply a stream into store and dest/<id>; the items seen."""
    items: list[Any] = []
    for item in read_stream(io.BytesIO(stream)):
        items.append(item)
        if isinstance(item, StreamObject):
            receive_object(item, store)
        elif isinstance(item, StreamTree):
            (dest / item.instance_id).mkdir(parents=True)
            build_tree(item, dest / item.instance_id, store)
    return items


def test_a_round_trip_rebuilds_each_tree_exactly_and_sends_each_object_once(
    tmp_path: Path,
) -> None:
    source = open_store(tmp_path / "src")
    trees = {}
    for variant in ("a", "b"):
        root = tmp_path / "src" / variant
        root.mkdir()
        make_tree(root, variant)
        dedup_tree(source, root)
        trees[f"repo__{variant * 12}"] = root
    stream = export(trees, source)

    target = open_store(tmp_path / "dst")
    items = receive(stream, target, tmp_path / "dst")
    objects = [item for item in items if isinstance(item, StreamObject)]
    # 5 files per tree, 4 of them shared: 6 objects, each sent once
    assert len(objects) == len({(o.digest, o.mode) for o in objects}) == 6
    assert isinstance(items[-1], StreamEnd) and items[-1].trees == 2
    for instance_id, root in trees.items():
        copy = tmp_path / "dst" / instance_id
        assert snapshot_tree(copy, hardlinks=False) == snapshot_tree(root, hardlinks=False)
        assert tree_digest(copy) == tree_digest(root)
        for folder in ("", "pkg", "pkg/sub"):
            assert os.stat(copy / folder).st_mtime_ns == os.stat(root / folder).st_mtime_ns
    shared = [tmp_path / "dst" / i / "pkg" / "core.py" for i in trees]
    assert os.path.samefile(*shared)  # dedup rebuilt on the receiving side


def test_content_shared_far_apart_is_sent_about_once_and_plain_zstd_reads_the_stream(
    tmp_path: Path,
) -> None:
    # two objects that differ only at their end, 24 MiB apart in the stream (as two clones'
    # packs of one repository are): beyond level 3's own 2 MiB window, within the long window
    shared = random.Random(7).randbytes(24 << 20)
    trees = {}
    for variant in ("a", "b"):
        root = tmp_path / "src" / variant
        root.mkdir(parents=True)
        (root / "pack").write_bytes(shared + variant.encode())
        trees[f"repo__{variant * 12}"] = root
    stream = export(trees, None)
    assert len(stream) < 30 << 20  # the second copy costs next to nothing (48 MiB without)
    # `zstd -d` with no option (no --long, no memory flag) reads it
    members = subprocess.run(["zstd", "-dc"], input=stream, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(members), mode="r|") as archive:
        names = [member.name for member in archive]
    assert names[0] == "asynccache-export.json" and names[-1] == "end.json"
    assert sum(name.startswith("objects/") for name in names) == 2
    target = open_store(tmp_path / "dst")
    receive(stream, target, tmp_path / "dst")
    for instance_id, root in trees.items():
        copy = tmp_path / "dst" / instance_id / "pack"
        assert copy.read_bytes() == (root / "pack").read_bytes()


def test_a_cache_without_a_store_exports_by_hashing_its_files(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    root.mkdir()
    make_tree(root, "a")
    stream = export({"repo__aaaaaaaaaaaa": root}, None)
    target = open_store(tmp_path / "dst")
    receive(stream, target, tmp_path / "dst")
    copy = tmp_path / "dst" / "repo__aaaaaaaaaaaa"
    assert snapshot_tree(copy, hardlinks=False) == snapshot_tree(root, hardlinks=False)


def test_objects_the_receiving_store_has_are_skipped_unread(tmp_path: Path) -> None:
    root = tmp_path / "t"
    root.mkdir()
    make_tree(root, "a")
    stream = export({"repo__aaaaaaaaaaaa": root}, None)
    target = open_store(tmp_path / "dst")
    pins = [receive_object(i, target) for i in read_stream(io.BytesIO(stream)) if _obj(i)]
    assert all(pins)
    again = [receive_object(i, target) for i in read_stream(io.BytesIO(stream)) if _obj(i)]
    assert again == [None] * len(pins)


def _obj(item: object) -> bool:
    return isinstance(item, StreamObject)


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5, 0.9, 0.99])
def test_a_truncated_stream_is_an_error_before_its_end(tmp_path: Path, fraction: float) -> None:
    root = tmp_path / "t"
    root.mkdir()
    make_tree(root, "a")
    stream = export({"repo__aaaaaaaaaaaa": root}, None)
    cut = stream[: int(len(stream) * fraction)]
    target = open_store(tmp_path / "dst")
    seen: list[Any] = []
    with pytest.raises(TransferError):
        seen = receive(cut, target, tmp_path / "dst")
    assert not any(isinstance(item, StreamEnd) for item in seen)


def test_a_stream_cut_at_a_member_boundary_is_an_error(tmp_path: Path) -> None:
    """The tar and zstd layers end cleanly; only the missing end marker tells."""
    raw = io.BytesIO()
    with (
        zstandard.ZstdCompressor().stream_writer(raw, closefd=False) as compressed,
        tarfile.open(fileobj=compressed, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        header = json.dumps({"format": "asynccache-export", "version": 1}).encode()
        info = tarfile.TarInfo("asynccache-export.json")
        info.size = len(header)
        tar.addfile(info, io.BytesIO(header))
    with pytest.raises(TransferError, match="no end marker"):
        list(read_stream(io.BytesIO(raw.getvalue())))


def hostile_stream(members: list[tuple[str, bytes]], *, version: int = 1) -> bytes:
    raw = io.BytesIO()
    with (
        zstandard.ZstdCompressor().stream_writer(raw, closefd=False) as compressed,
        tarfile.open(fileobj=compressed, mode="w|", format=tarfile.PAX_FORMAT) as tar,
    ):
        header = json.dumps({"format": "asynccache-export", "version": version}).encode()
        for name, data in [("asynccache-export.json", header), *members]:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def tree_member(entries: list[Any], name: str = "repo__aaaaaaaaaaaa") -> tuple[str, bytes]:
    body = {"record": {}, "digest": None, "root": [0o755, None], "entries": entries}
    return f"trees/{name}.json", json.dumps(body).encode()


@pytest.mark.parametrize(
    "entries",
    [
        [["d", "../escape", 0o755, None]],
        [["d", "/abs", 0o755, None]],
        [["d", "a//b", 0o755, None]],
        [["d", "a/./b", 0o755, None]],
        [["f", "x", 0o4755, 0, "0" * 64]],
        [["f", "x", 0o644, -1, "0" * 64]],
        [["f", "x", 0o644, 0, "not-a-digest"]],
        [["l", "x", "", None]],
        [["p", "fifo", 0o644, None]],
    ],
)
def test_malformed_or_unsafe_entries_are_refused(tmp_path: Path, entries: list[Any]) -> None:
    stream = hostile_stream([tree_member(entries)])
    with pytest.raises(TransferError):
        list(read_stream(io.BytesIO(stream)))


def test_nothing_is_written_through_a_symlink_of_the_tree(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    store = open_store(tmp_path / "dst")
    data = b"payload"
    digest = hashlib.sha256(data).hexdigest()
    entries = [["l", "evil", str(outside), None], ["f", "evil/planted", 0o644, 7, digest]]
    stream = hostile_stream([(f"objects/{digest}.644", data), tree_member(entries)])
    dest = tmp_path / "dst" / "t"
    dest.mkdir()
    with pytest.raises(TransferError, match="has no folder"):
        for item in read_stream(io.BytesIO(stream)):
            if isinstance(item, StreamObject):
                receive_object(item, store)
            elif isinstance(item, StreamTree):
                build_tree(item, dest, store)
    assert list(outside.iterdir()) == []


def test_an_object_whose_content_does_not_match_its_name_is_not_kept(tmp_path: Path) -> None:
    store = open_store(tmp_path / "dst")
    stream = hostile_stream([(f"objects/{'ab' * 32}.644", b"not that content")])
    with pytest.raises(TransferError, match="arrived with other content"):
        for item in read_stream(io.BytesIO(stream)):
            assert isinstance(item, StreamObject)
            receive_object(item, store)
    assert list(store.objects()) == []
    assert [p.name for p in store.tmp_dir.glob("*/*")] == [".owner"]


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([("other.txt", b"x")], "unexpected member"),
        ([("objects/xyz.644", b"")], "malformed object name"),
        ([("trees/a/b.json", b"{}")], "malformed tree name"),
        ([("trees/a.json", b"[1]")], "not a JSON object"),
    ],
)
def test_foreign_members_are_refused(members: list[tuple[str, bytes]], message: str) -> None:
    with pytest.raises(TransferError, match=message):
        list(read_stream(io.BytesIO(hostile_stream(members))))


def test_a_stream_of_another_version_or_no_stream_at_all_is_named() -> None:
    with pytest.raises(TransferError, match="version 2"):
        list(read_stream(io.BytesIO(hostile_stream([], version=2))))
    with pytest.raises(TransferError, match="zstd"):
        list(read_stream(io.BytesIO(b"plain text, not zstd" * 10)))


def test_a_stream_whose_window_is_past_the_bound_is_refused_before_it_is_read() -> None:
    # 256 MiB of window would be 256 MiB of the reader's memory: a hostile stream asks for it
    params = zstandard.ZstdCompressionParameters.from_level(
        3, window_log=28, write_content_size=False
    )
    out = io.BytesIO()
    with zstandard.ZstdCompressor(compression_params=params).stream_writer(
        out, closefd=False
    ) as writer:
        writer.write(b"x" * (1 << 20))
    with pytest.raises(TransferError, match="zstd window is larger than 128 MiB"):
        list(read_stream(io.BytesIO(out.getvalue())))
