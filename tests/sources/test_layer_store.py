"""layer_store.py: compression, digest checks, hardlinks outside the root, the blob store."""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import anyio
import pytest

from asynccache.errors import DigestMismatch, SetupError, TransferFailed, UnsafeArchive
from asynccache.sources.registry.compression import compression_of
from asynccache.sources.registry.layer_store import LayerStore
from asynccache.tree.digest import tree_stats
from asynccache.tree.layered import LayerTree
from tests.support.oci_fixtures import compress, file, folder, hardlink, sha256, symlink, tar_bytes
from tests.support.oci_fixtures import folder as folder_member
from tests.support.tars import apply_all, listing


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
@pytest.mark.parametrize("fetched_before", [False, True])
async def test_hardlinks_to_files_outside_the_root_get_their_data(
    tmp_path: Path, fetched_before: bool
) -> None:
    """Their data comes from a second read of the blob: the kept copy, or a second fetch."""
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
    if fetched_before:
        store.fetched_once.add(sha256(blob))  # so this fetch keeps the blob
    calls: list[str] = []
    dest = tmp_path / "dest"
    dest.mkdir()
    tree = LayerTree(dest)
    await store.apply(tree, "img", sha256(blob), len(blob), blob_opener(blob, calls))
    assert calls == (["open"] if fetched_before else ["open", "open"])
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
    # base: fetched once, then skipped; mine: noted, then kept, then read from the cache
    assert calls == ["open"] * 3
    assert (store.fetches, store.cache_hits, store.skipped) == (3, 1, 2)
    later = LayerStore(tmp_path / ".layers")
    later.open()
    assert sha256(base) in later.untouched
    assert sha256(mine) not in later.untouched


@pytest.mark.anyio
async def test_a_layer_blob_is_kept_once_a_second_image_needs_it(tmp_path: Path) -> None:
    blob = compress(SAMPLE, "gzip")
    calls: list[str] = []
    name = sha256(blob).replace(":", "-", 1)
    for number in range(3):  # three runs (or worker processes) on one blob cache
        store = LayerStore(tmp_path / ".layers")
        store.open()
        dest = tmp_path / f"d{number}"
        dest.mkdir()
        await store.apply(LayerTree(dest), "img", sha256(blob), len(blob), blob_opener(blob, calls))
        store.close()
        assert "small.txt" in listing(dest)
        # the first fetch only notes the layer; the second keeps its blob; the third reads it
        assert (tmp_path / ".layers" / name).is_file() == (number > 0)
    assert calls == ["open", "open"]
    assert [p.name for p in (tmp_path / ".layers" / ".partial").iterdir()] == []


@pytest.mark.anyio
async def test_a_layer_another_process_noted_meanwhile_is_kept(tmp_path: Path) -> None:
    """Two worker processes on one blob cache: a layer one of them fetched once is known to the
    other, opened before, at its next fetch; what is not a digest in the list is ignored."""
    blob = compress(SAMPLE, "gzip")
    mine, theirs = LayerStore(tmp_path / ".layers"), LayerStore(tmp_path / ".layers")
    mine.open()
    theirs.open()
    with open(tmp_path / ".layers" / "fetched", "a") as planted:
        planted.write("not a digest\nsha256:short\n")
    calls: list[str] = []
    for number, store in enumerate((theirs, mine)):
        dest = tmp_path / f"d{number}"
        dest.mkdir()
        await store.apply(LayerTree(dest), "img", sha256(blob), len(blob), blob_opener(blob, calls))
    assert calls == ["open", "open"]
    assert (tmp_path / ".layers" / sha256(blob).replace(":", "-", 1)).is_file()  # kept by mine
    assert mine.fetched_once == {sha256(blob)}


@pytest.mark.anyio
async def test_a_long_list_of_layers_fetched_once_is_started_afresh(tmp_path: Path) -> None:
    layers = tmp_path / ".layers"
    layers.mkdir()
    (layers / "fetched").write_text(("sha256:" + "0" * 64 + "\n") * 60_000)
    store = LayerStore(layers)
    store.open()
    assert store.fetched_once == set()
    assert not (layers / "fetched").exists()


@pytest.mark.anyio
async def test_a_blob_that_differs_when_fetched_again_for_its_hardlinks_fails(
    tmp_path: Path,
) -> None:
    layer = tar_bytes(
        [
            folder("root"),
            file("root/mod.py", "the real data\n"),
            folder("testbed"),
            hardlink("testbed/mod.py", "root/mod.py"),
        ]
    )
    blob = compress(layer, "none")
    other = layer.replace(b"the real data", b"other content")  # as long, another digest
    served = [blob, other]  # a registry that sends other bytes the second time

    @asynccontextmanager
    async def opened() -> AsyncIterator[AsyncIterator[bytes]]:
        data = served.pop(0)

        async def chunks() -> AsyncIterator[bytes]:
            yield data

        yield chunks()

    store = LayerStore(tmp_path / ".layers")
    store.open()
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(DigestMismatch):
        await store.apply(LayerTree(dest), "img", sha256(blob), len(blob), opened)


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
        for again in range(2):  # kept at the second fetch
            dest = tmp_path / f"d{number}-{again}"
            dest.mkdir()
            await store.apply(
                LayerTree(dest), "img", sha256(blob), len(blob), blob_opener(blob, [])
            )
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


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A folder outside the cache whose files carry the names the blob cache uses."""
    outside = tmp_path / "victim"
    (outside / ".partial").mkdir(parents=True)
    (outside / ".partial" / "sha256-0.abcd").write_text("partial")
    hours_ago = time.time() - 7200  # as old as a partial download of a run long gone
    os.utime(outside / ".partial" / "sha256-0.abcd", (hours_ago, hours_ago))
    (outside / ("sha256-" + "0" * 64)).write_text("old blob")
    (outside / "untouched").write_text("testbed sha256:feed\n")
    (outside / "secret.txt").write_text("secret")
    return outside


def outside_state(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under folder: its content and mtime."""
    return {
        str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


async def use_store(
    folder: Path, tmp_path: Path, max_bytes: int = 1 << 30, work_name: str | None = None
) -> LayerStore:
    """A store on folder that fetches, caches, evicts and remembers an untouched layer."""
    store = LayerStore(folder, max_bytes=max_bytes, work_name=work_name)
    store.open()
    untouched = compress(tar_bytes([folder_member("usr"), file("usr/x", "x")]), "gzip")
    for number in range(3):
        blob = compress(
            tar_bytes([folder_member("testbed"), file(f"testbed/{number}", "n")]), "gzip"
        )
        dest = tmp_path / f"dest{number}"
        dest.mkdir()
        tree = LayerTree(dest)
        await store.apply(
            tree, "img", sha256(untouched), len(untouched), blob_opener(untouched, [])
        )
        await store.apply(tree, "img", sha256(blob), len(blob), blob_opener(blob, []))
        await store.apply(tree, "img", sha256(blob), len(blob), blob_opener(blob, []))
        assert listing(dest) == {str(number): "n"}
    return store


@pytest.mark.anyio
async def test_the_blob_cache_may_be_a_link_of_the_users_own(tmp_path: Path) -> None:
    elsewhere = tmp_path / "big-disk"
    elsewhere.mkdir()
    layers = tmp_path / "layers"
    layers.symlink_to(elsewhere)  # to another disk, say
    store = await use_store(layers, tmp_path)
    store.close()
    assert (elsewhere / "untouched").is_file()


def test_a_link_of_another_user_as_the_blob_cache_is_refused(tmp_path: Path, victim: Path) -> None:
    before = outside_state(victim)
    layers = tmp_path / "shared" / "layers"
    layers.parent.mkdir()
    layers.symlink_to(victim)
    os.lchown(layers, 4242, 4242)  # planted by another local user before the first run
    with pytest.raises(SetupError, match=r"is a link owned by another user \(uid 4242\)"):
        LayerStore(layers).open()
    assert outside_state(victim) == before


@pytest.mark.anyio
@pytest.mark.parametrize("name", [".partial", ".partial/2-of-4", "untouched", "fetched"])
async def test_links_planted_inside_the_blob_cache_are_never_followed(
    tmp_path: Path, victim: Path, name: str
) -> None:
    before = outside_state(victim)
    layers = tmp_path / ".layers"
    (layers / name).parent.mkdir(parents=True, exist_ok=True)
    (layers / name).symlink_to(victim / ".partial" if name.count("/") else victim / name)
    work_name = name.partition("/")[2] or None  # a shard's own partial folder
    store = await use_store(layers, tmp_path, max_bytes=300, work_name=work_name)
    store.close()
    assert outside_state(victim) == before
    assert not (layers / name).is_symlink()
    later = LayerStore(layers)
    later.open()  # the untouched layer was remembered in a file of the store's own
    assert len(later.untouched) == 1
    later.close()


def _open_together(
    store: LayerStore, start: threading.Barrier, failures: list[BaseException]
) -> None:
    start.wait()
    try:
        store.open()
    except BaseException as exc:
        failures.append(exc)


def test_stores_opened_at_once_each_get_the_folder_that_replaced_a_planted_link(
    tmp_path: Path, victim: Path
) -> None:
    # a pool's workers open one blob cache at the same moment: whichever removes the planted
    # .partial link first, the others must open the folder it made, not fail
    before = outside_state(victim)
    for round_number in range(30):
        layers = tmp_path / f"layers-{round_number}"
        layers.mkdir()
        (layers / ".partial").symlink_to(victim / ".partial")
        stores = [LayerStore(layers, work_name=f"w{n}") for n in range(6)]
        start = threading.Barrier(len(stores))
        failures: list[BaseException] = []
        threads = [
            threading.Thread(target=_open_together, args=(store, start, failures))
            for store in stores
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for store in stores:
            store.close()
        assert failures == []
        assert (layers / ".partial").is_dir() and not (layers / ".partial").is_symlink()
    assert outside_state(victim) == before


@pytest.mark.anyio
@pytest.mark.parametrize("planted", ["link", "fifo"])
async def test_a_cached_blob_swapped_for_a_link_is_neither_read_nor_touched(
    tmp_path: Path, victim: Path, planted: str
) -> None:
    blob = compress(tar_bytes([folder_member("testbed"), file("testbed/a", "fetched")]), "gzip")
    layers = tmp_path / ".layers"
    calls: list[str] = []
    for number in range(3):
        store = LayerStore(layers)
        store.open()
        if number == 2:  # kept by the second fetch, then swapped before it is read
            cached = layers / sha256(blob).replace(":", "-", 1)
            cached.unlink()
            if planted == "link":
                cached.symlink_to(victim / "secret.txt")
            else:
                os.mkfifo(cached)  # would block whoever opens it to read
        dest = tmp_path / f"dest{number}"
        dest.mkdir()
        before = outside_state(victim)
        with anyio.fail_after(20):
            await store.apply(
                LayerTree(dest), "img", sha256(blob), len(blob), blob_opener(blob, calls)
            )
        store.close()
        assert listing(dest) == {"a": "fetched"}
        assert outside_state(victim) == before
    assert calls == ["open"] * 3  # fetched again: what was planted is no cached blob
    assert cached.is_file() and not cached.is_symlink()  # replaced by the real blob
