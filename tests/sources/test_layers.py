"""Layer application: OCI whiteouts, replacements, hostile layers, decompression, the store."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import stat
import tarfile
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import anyio
import pytest

from asynccache.errors import DigestMismatch, TransferFailed, UnsafeArchive
from asynccache.sources.registry.compression import compression_of
from asynccache.sources.registry.layer_store import LayerStore
from asynccache.tree.extract import ExtractResult, LayerTree, tree_stats
from tests.support.oci_fixtures import (
    compress,
    device,
    file,
    folder,
    hardlink,
    opaque,
    sha256,
    symlink,
    tar_bytes,
    whiteout,
)

Tar = bytes


def apply_all(dest: Path, *layers: Tar) -> tuple[LayerTree, ExtractResult]:
    tree = LayerTree(dest)
    for data in layers:
        tree.apply(io.BytesIO(data).read)
    return tree, tree.finish()


def listing(root: Path) -> dict[str, str]:
    """rel path -> "dir" | "link:<target>" | file content (text; sha256 when large)."""
    found: dict[str, str] = {}
    for current, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(current, name)
            rel = path.relative_to(root).as_posix()
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                found[rel] = f"link:{os.readlink(path)}"
            elif stat.S_ISDIR(info.st_mode):
                found[rel] = "dir"
            else:
                data = path.read_bytes()
                found[rel] = data.decode() if len(data) < 1000 else hashlib.sha256(data).hexdigest()
    return found


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    path = tmp_path / "dest"
    path.mkdir()
    return path


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """dest plus a victim folder beside it that no layer may touch."""
    box = tmp_path / "box"
    (box / "victim").mkdir(parents=True)
    (box / "victim" / "secret.txt").write_text("secret")
    (box / "dest").mkdir()
    return box


def victim_intact(box: Path) -> bool:
    return (box / "victim" / "secret.txt").read_text() == "secret"


# --- OCI semantics ----------------------------------------------------------------------------


def test_whiteouts_remove_a_lower_file_and_directory(dest: Path) -> None:
    lower = tar_bytes(
        [
            folder("testbed"),
            file("testbed/keep.txt", "keep"),
            file("testbed/gone.txt", "gone"),
            folder("testbed/gone_dir"),
            file("testbed/gone_dir/a", "a"),
        ]
    )
    upper = tar_bytes(
        [folder("testbed"), whiteout("testbed/gone.txt"), whiteout("testbed/gone_dir")]
    )
    _, result = apply_all(dest, lower, upper)
    assert listing(dest) == {"keep.txt": "keep"}
    assert (result.file_count, result.size_bytes) == tree_stats(dest) == (1, 4)


def test_whiteout_spares_what_its_own_layer_wrote(dest: Path) -> None:
    lower = tar_bytes([folder("testbed"), file("testbed/a", "old")])
    upper = tar_bytes([file("testbed/b", "new"), whiteout("testbed/b")])
    apply_all(dest, lower, upper)
    assert listing(dest) == {"a": "old", "b": "new"}


@pytest.mark.parametrize("marker_first", [True, False])
def test_opaque_directory_hides_lower_children_whatever_its_place(
    dest: Path, marker_first: bool
) -> None:
    lower = tar_bytes(
        [
            folder("testbed"),
            folder("testbed/opq"),
            file("testbed/opq/old1", "1"),
            folder("testbed/opq/sub"),
            file("testbed/opq/sub/old2", "2"),
            file("testbed/outside_opq", "o"),
        ]
    )
    entries = [
        folder("testbed/opq"),
        file("testbed/opq/new1", "n"),
        folder("testbed/opq/sub"),
        file("testbed/opq/sub/new2", "m"),
    ]
    marker = opaque("testbed/opq")
    upper = tar_bytes([marker, *entries] if marker_first else [*entries, marker])
    apply_all(dest, lower, upper)
    assert listing(dest) == {
        "opq": "dir",
        "opq/new1": "n",
        "opq/sub": "dir",
        "opq/sub/new2": "m",
        "outside_opq": "o",
    }


def test_opaque_marker_of_a_missing_directory_creates_it_empty(dest: Path) -> None:
    apply_all(dest, tar_bytes([folder("testbed"), opaque("testbed/fresh")]))
    assert listing(dest) == {"fresh": "dir"}


def test_file_replaced_by_a_directory_and_back(dest: Path) -> None:
    layers = [
        tar_bytes([folder("testbed"), file("testbed/flip", "file-1")]),
        tar_bytes([folder("testbed/flip", 0o700), file("testbed/flip/inside", "in")]),
        tar_bytes([file("testbed/flip", "file-2", 0o600)]),
    ]
    _, result = apply_all(dest, *layers)
    assert listing(dest) == {"flip": "file-2"}
    assert stat.S_IMODE((dest / "flip").lstat().st_mode) == 0o600
    assert (result.file_count, result.size_bytes) == (1, 6)


def test_directory_replaced_by_a_symlink_then_a_directory(dest: Path) -> None:
    layers = [
        tar_bytes([folder("testbed"), folder("testbed/d"), file("testbed/d/x", "x")]),
        tar_bytes([symlink("testbed/d", "/etc")]),
        tar_bytes([folder("testbed/d"), file("testbed/d/y", "y")]),
    ]
    apply_all(dest, *layers)
    assert listing(dest) == {"d": "dir", "d/y": "y"}


def test_symlink_replaced_by_a_file_is_not_written_through(sandbox: Path) -> None:
    dest = sandbox / "dest"
    target = str(sandbox / "victim" / "secret.txt")
    layers = [
        tar_bytes([folder("testbed"), symlink("testbed/link", target)]),
        tar_bytes([file("testbed/link", "replaced")]),
    ]
    apply_all(dest, *layers)
    assert listing(dest) == {"link": "replaced"}
    assert victim_intact(sandbox)


def test_lower_symlinked_folder_becomes_a_real_folder(sandbox: Path) -> None:
    dest = sandbox / "dest"
    layers = [
        tar_bytes([folder("testbed"), symlink("testbed/lib", str(sandbox / "victim"))]),
        tar_bytes([file("testbed/lib/secret.txt", "mine"), whiteout("testbed/lib/other")]),
    ]
    apply_all(dest, *layers)
    assert listing(dest) == {"lib": "dir", "lib/secret.txt": "mine"}
    assert victim_intact(sandbox)


def test_whiteout_under_a_lower_symlink_deletes_nothing_outside(sandbox: Path) -> None:
    dest = sandbox / "dest"
    layers = [
        tar_bytes([folder("testbed"), symlink("testbed/v", "../victim")]),
        tar_bytes([whiteout("testbed/v/secret.txt")]),
    ]
    apply_all(dest, *layers)
    assert victim_intact(sandbox)
    assert listing(dest) == {"v": "dir"}


def test_hardlink_to_a_lower_layer_file(dest: Path) -> None:
    layers = [
        tar_bytes([folder("testbed"), file("testbed/base.txt", "base", 0o640)]),
        tar_bytes([hardlink("testbed/sub/hard", "testbed/base.txt")]),
    ]
    _, result = apply_all(dest, *layers)
    base, hard = (dest / "base.txt").lstat(), (dest / "sub" / "hard").lstat()
    assert base.st_ino == hard.st_ino
    assert (dest / "sub" / "hard").read_text() == "base"
    assert (result.file_count, result.size_bytes) == tree_stats(dest) == (2, 8)


def test_members_outside_the_root_are_skipped_and_the_layer_is_untouched(dest: Path) -> None:
    tree = LayerTree(dest)
    base = tar_bytes(
        [
            folder("etc"),
            file("etc/passwd", "root"),
            device("dev/null"),
            file("usr/bin/tool", "t", 0o4755),
            file("testbedx/f", "sibling"),
            whiteout("usr/old"),
            opaque("var"),
        ]
    )
    done = tree.apply(io.BytesIO(base).read)
    assert not done.touched and not tree.present
    assert listing(dest) == {}
    done = tree.apply(io.BytesIO(tar_bytes([file("./testbed/a", "a")])).read)
    assert done.touched and tree.present
    result = tree.finish()
    assert listing(dest) == {"a": "a"}
    assert result.warnings == ()


def test_whiteout_of_the_root_hides_the_testbed(dest: Path) -> None:
    tree, _ = apply_all(dest, tar_bytes([folder("testbed"), file("testbed/a", "a")]))
    done = tree.apply(io.BytesIO(tar_bytes([whiteout("testbed")])).read)
    assert done.touched and not tree.present
    assert listing(dest) == {}
    tree.apply(io.BytesIO(tar_bytes([folder("testbed"), file("testbed/b", "b")])).read)
    assert tree.present and listing(dest) == {"b": "b"}


def test_opaque_marker_at_the_top_hides_the_testbed(dest: Path) -> None:
    tree, _ = apply_all(dest, tar_bytes([folder("testbed"), file("testbed/a", "a")]))
    done = tree.apply(io.BytesIO(tar_bytes([opaque("."), file("etc/x", "x")])).read)
    assert done.touched and not tree.present
    assert listing(dest) == {}


def test_root_mode_comes_from_the_last_layer_that_sets_it(dest: Path) -> None:
    layers = [
        tar_bytes([folder("testbed", 0o755), file("testbed/a", "a")]),
        tar_bytes([folder("testbed", 0o750)]),
        tar_bytes([file("testbed/b", "b")]),
    ]
    apply_all(dest, *layers)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o750


def test_aufs_metadata_is_never_written(dest: Path) -> None:
    layer = tar_bytes(
        [
            folder("testbed"),
            file("testbed/.wh..wh.aufs", ""),
            folder("testbed/.wh..wh.plnk"),
            file("testbed/.wh..wh.plnk/123.456", "x"),
            file("testbed/real", "r"),
        ]
    )
    apply_all(dest, layer)
    assert listing(dest) == {"real": "r"}


# --- hostile layers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["testbed/.wh..", "testbed/sub/.wh...", "testbed/../.wh.victim", ".wh..", "usr/.wh..."],
)
def test_whiteout_pointing_outside_is_rejected(sandbox: Path, name: str) -> None:
    dest = sandbox / "dest"
    tree = LayerTree(dest)
    tree.apply(io.BytesIO(tar_bytes([folder("testbed"), file("testbed/a", "a")])).read)
    with pytest.raises(UnsafeArchive):
        tree.apply(io.BytesIO(tar_bytes([file(name)])).read)
    assert victim_intact(sandbox)
    assert (dest / "a").read_text() == "a"


@pytest.mark.parametrize("name", ["/testbed/x", "/etc/passwd", "testbed/../../victim/x"])
def test_absolute_and_dotdot_names_are_rejected(sandbox: Path, name: str) -> None:
    tree = LayerTree(sandbox / "dest")
    with pytest.raises(UnsafeArchive):
        tree.apply(io.BytesIO(tar_bytes([folder("testbed"), file(name, "evil")])).read)
    assert victim_intact(sandbox)
    assert not (sandbox / "victim" / "x").exists()


def test_hardlink_escaping_through_dotdot_is_rejected(sandbox: Path) -> None:
    tree = LayerTree(sandbox / "dest")
    layer = tar_bytes([folder("testbed"), hardlink("testbed/h", "testbed/../../victim/secret.txt")])
    with pytest.raises(UnsafeArchive):
        tree.apply(io.BytesIO(layer).read)
    assert victim_intact(sandbox)


def test_device_files_are_skipped_with_a_warning(dest: Path) -> None:
    layer = tar_bytes(
        [
            folder("testbed"),
            device("testbed/null"),
            device("testbed/disk", tarfile.BLKTYPE),
            device("dev/console"),
            file("testbed/ok", "ok"),
        ]
    )
    _, result = apply_all(dest, layer)
    assert listing(dest) == {"ok": "ok"}
    assert result.warnings == (
        "testbed/null: skipped character device",
        "testbed/disk: skipped block device",
    )


def test_setuid_bits_are_dropped_in_layers(dest: Path) -> None:
    _, result = apply_all(dest, tar_bytes([folder("testbed"), file("testbed/s", "s", 0o4755)]))
    assert stat.S_IMODE((dest / "s").lstat().st_mode) == 0o755
    assert len(result.warnings) == 1


def test_write_through_a_symlink_of_the_same_layer_is_rejected(sandbox: Path) -> None:
    tree = LayerTree(sandbox / "dest")
    layer = tar_bytes(
        [folder("testbed"), symlink("testbed/l", str(sandbox / "victim")), file("testbed/l/x", "e")]
    )
    with pytest.raises(UnsafeArchive, match="is a symlink"):
        tree.apply(io.BytesIO(layer).read)
    assert not (sandbox / "victim" / "x").exists()


# --- blobs: compression, digests, hardlinks outside the root, the store -----------------------


def blob_opener(
    blob: bytes, calls: list[str], chunk: int = 777
) -> Callable[[], AbstractAsyncContextManager[AsyncIterator[bytes]]]:
    @asynccontextmanager
    async def opened() -> AsyncIterator[AsyncIterator[bytes]]:
        calls.append("open")

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(blob), chunk):
                await anyio.sleep(0)
                yield blob[start : start + chunk]

        yield chunks()

    return opened


SAMPLE = tar_bytes(
    [
        folder("etc"),
        file("etc/hosts", "h" * 5000),
        folder("testbed"),
        file("testbed/big.bin", os.urandom(300_000)),
        file("testbed/small.txt", "small"),
        symlink("testbed/py", "/usr/bin/python3"),
    ]
)


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
@pytest.mark.anyio
async def test_each_compression_gives_the_same_tree(tmp_path: Path, compression: str) -> None:
    blob = compress(SAMPLE, compression)  # type: ignore[arg-type]
    assert compression_of(blob[:4]) == {"none": "tar"}.get(compression, compression)
    plain = tmp_path / "plain"
    plain.mkdir()
    apply_all(plain, SAMPLE)
    dest = tmp_path / "dest"
    dest.mkdir()
    tree = LayerTree(dest)
    store = LayerStore(None)
    await store.apply(tree, "img", sha256(blob), len(blob), blob_opener(blob, []))
    tree.finish()
    assert listing(dest) == listing(plain)


@pytest.mark.anyio
async def test_concatenated_gzip_members_are_read_whole(tmp_path: Path) -> None:
    half = len(SAMPLE) // 2
    blob = gzip.compress(SAMPLE[:half]) + gzip.compress(SAMPLE[half:])
    dest = tmp_path / "dest"
    dest.mkdir()
    tree = LayerTree(dest)
    await LayerStore(None).apply(tree, "img", sha256(blob), len(blob), blob_opener(blob, []))
    assert (dest / "small.txt").read_text() == "small"


@pytest.mark.anyio
async def test_digest_mismatch_fails_and_the_layer_is_not_remembered(tmp_path: Path) -> None:
    blob = compress(SAMPLE, "gzip")
    wrong = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    store = LayerStore(tmp_path / ".layers")
    store.open()
    tree = LayerTree(tmp_path / "dest")
    (tmp_path / "dest").mkdir()
    with pytest.raises(DigestMismatch, match="does not match its digest"):
        await store.apply(tree, "img", wrong, len(blob), blob_opener(blob, []))
    assert wrong not in store.untouched
    assert [p.name for p in (tmp_path / ".layers").iterdir() if p.is_file()] == []
    assert list((tmp_path / ".layers" / ".partial").iterdir()) == []


@pytest.mark.anyio
async def test_short_or_long_blobs_are_refused(tmp_path: Path) -> None:
    blob = compress(SAMPLE, "gzip")
    (tmp_path / "a").mkdir()
    with pytest.raises(TransferFailed, match="ended after"):
        await LayerStore(None).apply(
            LayerTree(tmp_path / "a"), "img", sha256(blob), len(blob) + 10, blob_opener(blob, [])
        )
    (tmp_path / "b").mkdir()
    with pytest.raises(DigestMismatch, match="more than"):
        await LayerStore(None).apply(
            LayerTree(tmp_path / "b"), "img", sha256(blob), len(blob) - 10, blob_opener(blob, [])
        )


@pytest.mark.anyio
async def test_hardlinks_to_files_outside_the_root_get_their_data(tmp_path: Path) -> None:
    layer = tar_bytes(
        [
            folder("root/.cache/uv"),
            file("root/.cache/uv/mod.py", "print('cached')\n", 0o640),
            file("root/.cache/uv/other.py", "other"),
            folder("testbed"),
            folder("testbed/.venv"),
            hardlink("testbed/.venv/mod.py", "root/.cache/uv/mod.py"),
            hardlink("testbed/.venv/again.py", "./root/.cache/uv/mod.py"),
            hardlink("testbed/.venv/other.py", "root/.cache/uv/other.py"),
        ]
    )
    blob = compress(layer, "gzip")
    store = LayerStore(tmp_path / ".layers")
    store.open()
    dest = tmp_path / "dest"
    dest.mkdir()
    tree = LayerTree(dest)
    await store.apply(tree, "img", sha256(blob), len(blob), blob_opener(blob, []))
    result = tree.finish()
    venv = dest / ".venv"
    assert (venv / "mod.py").read_text() == "print('cached')\n"
    assert (venv / "again.py").lstat().st_ino == (venv / "mod.py").lstat().st_ino
    assert stat.S_IMODE((venv / "mod.py").lstat().st_mode) == 0o640
    assert (venv / "other.py").read_text() == "other"
    assert not (dest / "root").exists()
    assert (result.file_count, result.size_bytes) == tree_stats(dest) == (3, 37)


@pytest.mark.anyio
async def test_untouched_layers_are_fetched_once_and_remembered_across_runs(
    tmp_path: Path,
) -> None:
    base = compress(tar_bytes([folder("usr"), file("usr/lib/x", "x" * 1000)]), "gzip")
    mine = compress(tar_bytes([folder("testbed"), file("testbed/a", "a")]), "gzip")
    calls: list[str] = []
    store = LayerStore(tmp_path / ".layers")
    store.open()
    for number in range(3):
        dest = tmp_path / f"d{number}"
        dest.mkdir()
        tree = LayerTree(dest)
        await store.apply(tree, "img", sha256(base), len(base), blob_opener(base, calls))
        await store.apply(tree, "img", sha256(mine), len(mine), blob_opener(mine, calls))
        assert listing(dest) == {"a": "a"}
    assert calls == ["open", "open"]
    assert (store.fetches, store.cache_hits, store.skipped) == (2, 2, 2)
    later = LayerStore(tmp_path / ".layers")
    later.open()
    assert sha256(base) in later.untouched
    assert sha256(mine) not in later.untouched


@pytest.mark.anyio
async def test_one_fetch_when_workers_need_the_same_layer_at_once(tmp_path: Path) -> None:
    blob = compress(SAMPLE, "gzip")
    calls: list[str] = []
    store = LayerStore(tmp_path / ".layers")
    store.open()
    dests = [tmp_path / f"d{n}" for n in range(4)]

    async def one(dest: Path) -> None:
        dest.mkdir()
        tree = LayerTree(dest)
        await store.apply(tree, "img", sha256(blob), len(blob), blob_opener(blob, calls, 100))

    async with anyio.create_task_group() as tg:
        for dest in dests:
            tg.start_soon(one, dest)
    assert calls == ["open"]
    assert all(listing(d) == listing(dests[0]) for d in dests)
    assert "small.txt" in listing(dests[0])


@pytest.mark.anyio
async def test_blob_cache_keeps_the_most_recent_within_its_bound(tmp_path: Path) -> None:
    blobs = [
        compress(tar_bytes([folder("testbed"), file(f"testbed/f{n}", os.urandom(4000))]), "none")
        for n in range(3)
    ]
    store = LayerStore(tmp_path / ".layers", max_bytes=len(blobs[0]) * 2 + 100)
    store.open()
    for number, blob in enumerate(blobs):
        dest = tmp_path / f"d{number}"
        dest.mkdir()
        await store.apply(LayerTree(dest), "img", sha256(blob), len(blob), blob_opener(blob, []))
    kept = sorted(p.name for p in (tmp_path / ".layers").iterdir() if p.name.startswith("sha"))
    assert kept == sorted(sha256(b).replace(":", "-") for b in blobs[1:])


def layer_threads() -> list[str]:
    """The read-ahead and writer threads still alive."""
    names = ("asynccache-read-ahead", "asynccache-writer")
    return [thread.name for thread in threading.enumerate() if thread.name in names]


@pytest.mark.anyio
async def test_a_layer_that_fails_early_stops_its_reading_threads(tmp_path: Path) -> None:
    # the parser fails on the second member while 8 MiB are still to be inflated behind it
    bulk = os.urandom(8 << 20)
    layer = tar_bytes([file("testbed/a", "a"), file("/etc/evil", "x"), file("testbed/bulk", bulk)])
    blob = compress(layer, "gzip")
    (tmp_path / "dest").mkdir()
    with pytest.raises(UnsafeArchive, match="absolute name"):
        await LayerStore(None).apply(
            LayerTree(tmp_path / "dest"), "img", sha256(blob), len(blob), blob_opener(blob, [])
        )
    assert layer_threads() == []


@pytest.mark.anyio
async def test_corrupt_gzip_is_reported_through_the_read_ahead_thread(tmp_path: Path) -> None:
    blob = bytearray(compress(SAMPLE, "gzip"))
    blob[len(blob) // 2] ^= 0xFF
    (tmp_path / "dest").mkdir()
    with pytest.raises(UnsafeArchive):
        await LayerStore(None).apply(
            LayerTree(tmp_path / "dest"),
            "img",
            sha256(bytes(blob)),
            len(blob),
            blob_opener(bytes(blob), []),
        )
    assert layer_threads() == []
