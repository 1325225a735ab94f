"""cache/store.py: objects by content and mode, link ceilings, freeing, checks against names."""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from asynccache.cache.store import STORE_DIR_NAME, Store
from asynccache.cache.store_check import check_store
from asynccache.cache.store_layout import object_name, parse_object_name


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write(path: Path, data: bytes, mode: int = 0o644) -> bytes:
    """A complete file with this content and mode; its path as bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    return os.fsencode(path)


def leftovers(store: Store) -> list[str]:
    """What the store's work folders hold besides their owner locks."""
    return [
        f"{folder.name}/{name}"
        for folder in store.tmp_dir.iterdir()
        for name in os.listdir(folder)
        if name != ".owner"
    ]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    opened = Store(tmp_path / "cache")
    (tmp_path / "cache").mkdir()
    opened.open()
    return opened


def test_names_fan_out_by_hash_prefix_and_carry_the_mode() -> None:
    digest = sha(b"x")
    assert object_name(digest, 0o644) == f"{digest[:2]}/{digest[2:]}.644"
    assert object_name(digest, 0o755, 2) == f"{digest[:2]}/{digest[2:]}.755.2"
    assert parse_object_name(digest[:2], f"{digest[2:]}.755.2") == (digest, 0o755, 2)
    for junk in (
        f"{digest[2:]}",
        f"{digest[2:]}.999",
        f"{digest[2:]}.644.0",
        f"{digest[2:]}.644.01",
        f"{digest[2:-1]}.644",
        f"{digest[2:].upper()}.644",
        "x.644",
    ):
        assert parse_object_name(digest[:2], junk) is None, junk


def test_a_put_file_becomes_the_object_and_later_files_link_to_it(
    store: Store, tmp_path: Path
) -> None:
    data = b"print('hello')\n"
    first = write(tmp_path / "a" / "one.py", data)
    linked, found = store.put(first, sha(data), 0o644)
    assert not linked and found.st_nlink == 2
    assert os.path.samefile(store.path(sha(data), 0o644), first)

    dest = os.fsencode(tmp_path / "b" / "two.py")
    os.makedirs(os.path.dirname(dest))
    before = store.link(sha(data), 0o644, len(data), dest)
    assert before is not None and before.st_ino == os.stat(first).st_ino
    assert os.stat(dest).st_nlink == 3 and Path(os.fsdecode(dest)).read_bytes() == data
    with pytest.raises(FileExistsError):
        store.link(sha(data), 0o644, len(data), dest)


def test_the_store_has_nothing_for_unknown_content_another_mode_or_size(
    store: Store, tmp_path: Path
) -> None:
    data = b"abc"
    store.put(write(tmp_path / "f", data), sha(data), 0o644)
    dest = os.fsencode(tmp_path / "g")
    assert store.link(sha(b"other"), 0o644, 5, dest) is None
    assert store.link(sha(data), 0o755, len(data), dest) is None
    assert store.link(sha(data), 0o644, len(data) + 1, dest) is None
    assert not os.path.lexists(dest)
    assert store.has(sha(data), 0o644) and not store.has(sha(data), 0o600)


def test_same_content_with_two_modes_is_two_objects(store: Store, tmp_path: Path) -> None:
    data = b"#!/bin/sh\n"
    store.put(write(tmp_path / "plain", data, 0o644), sha(data), 0o644)
    store.put(write(tmp_path / "script", data, 0o755), sha(data), 0o755)
    assert not os.path.samefile(tmp_path / "plain", tmp_path / "script")
    assert os.stat(tmp_path / "script").st_mode & 0o777 == 0o755
    assert sorted(o.mode for o in store.objects()) == [0o644, 0o755]


def test_putting_content_the_store_has_replaces_the_file_by_a_link(
    store: Store, tmp_path: Path
) -> None:
    data = b"same"
    store.put(write(tmp_path / "first", data), sha(data), 0o644)
    second = write(tmp_path / "second", data)
    linked, found = store.put(second, sha(data), 0o644)
    assert linked and found.st_ino == os.stat(tmp_path / "first").st_ino
    assert os.path.samefile(tmp_path / "first", tmp_path / "second")
    assert leftovers(store) == []  # the temporary link was renamed into place


def test_the_link_ceiling_starts_a_new_copy_and_no_object_passes_it(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    store = Store(tmp_path / "cache", max_links=3)
    store.open()
    data = b""
    digest = sha(data)
    paths = []
    for number in range(8):
        dest = os.fsencode(tmp_path / f"t{number}")
        if store.link(digest, 0o644, 0, dest) is None:
            write(tmp_path / f"t{number}", data)
            store.put(dest, digest, 0o644)
        paths.append(dest)
    objects = sorted(store.objects(), key=lambda o: o.copy)
    assert [o.copy for o in objects] == [0, 1, 2, 3]
    assert all(os.stat(store.path(digest, 0o644, o.copy)).st_nlink <= 3 for o in objects)
    assert len({os.stat(p).st_ino for p in paths}) == 4


def test_collect_frees_only_objects_nothing_links(store: Store, tmp_path: Path) -> None:
    kept, dropped = b"kept", b"dropped" * 100
    store.put(write(tmp_path / "tree" / "kept", kept), sha(kept), 0o644)
    store.put(write(tmp_path / "tree" / "dropped", dropped), sha(dropped), 0o644)
    (tmp_path / "tree" / "dropped").unlink()
    assert store.collect() == (1, len(dropped))
    assert store.has(sha(kept), 0o644) and not store.has(sha(dropped), 0o644)
    assert (tmp_path / "tree" / "kept").read_bytes() == kept
    assert store.collect() == (0, 0)


def test_freeing_an_object_linked_meanwhile_keeps_it(store: Store, tmp_path: Path) -> None:
    data = b"shared"
    store.put(write(tmp_path / "tree" / "f", data), sha(data), 0o644)
    name = object_name(sha(data), 0o644)
    assert store.free(name) is None  # a tree links it: renamed away, then put back
    assert store.has(sha(data), 0o644)
    assert os.stat(tmp_path / "tree" / "f").st_nlink == 2
    assert leftovers(store) == []


def test_objects_only_a_removed_tree_linked_are_freed_after_it(
    store: Store, tmp_path: Path
) -> None:
    shared, own = b"shared", b"own"
    for tree in ("old", "new"):
        dest = os.fsencode(tmp_path / tree / "shared")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if store.link(sha(shared), 0o644, len(shared), dest) is None:
            write(tmp_path / tree / "shared", shared)
            store.put(dest, sha(shared), 0o644)
    store.put(write(tmp_path / "old" / "own", own), sha(own), 0o644)
    write(tmp_path / "old" / "private", b"not stored")
    names = store.sole_links(tmp_path / "old")
    assert names == [object_name(sha(own), 0o644)]
    for path in (tmp_path / "old").iterdir():
        path.unlink()
    assert store.free_unlinked(names) == (1, len(own))
    assert store.has(sha(shared), 0o644) and not store.has(sha(own), 0o644)


def stored_then_unlinked(store: Store, tmp_path: Path, data: bytes) -> str:
    """Store data from a tree file, then remove the file: only the store links it now."""
    path = write(tmp_path / "tree" / sha(data)[:8], data)
    store.put(path, sha(data), 0o644)
    os.unlink(path)
    return sha(data)


def test_a_released_object_waits_for_a_next_tree_and_goes_at_close(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    store = Store(tmp_path / "cache")
    store.open()
    released, relinked = b"pack" * 20_000, b"idx" * 30_000  # past RELEASED_MIN_SIZE
    for data in (released, relinked):
        store.release(stored_then_unlinked(store, tmp_path, data), 0o644, len(data))
    assert store.has(sha(released), 0o644) and store.has(sha(relinked), 0o644)
    again = os.fsencode(tmp_path / "next" / "idx")
    os.makedirs(os.path.dirname(again))
    assert store.link(sha(relinked), 0o644, len(relinked), again) is not None  # not rewritten
    store.close()
    assert not store.has(sha(released), 0o644)  # nothing linked it any more: freed
    assert store.has(sha(relinked), 0o644)  # a tree links it again: kept
    assert Path(os.fsdecode(again)).read_bytes() == relinked


def test_close_removes_its_work_folder_when_a_released_object_cannot_be_freed(
    tmp_path: Path,
) -> None:
    (tmp_path / "cache").mkdir()
    store = Store(tmp_path / "cache", released_min_size=0)
    store.open()
    digest = stored_then_unlinked(store, tmp_path, b"pack")
    store.release(digest, 0o644, 4)
    fanout = store.root / digest[:2]
    shutil.rmtree(fanout)
    fanout.write_bytes(b"")  # a file where its folder was: looking the object up fails
    own = list(store.tmp_dir.iterdir())
    assert len(own) == 1
    store.close()  # the error is left to gc; the work folder and its lock go all the same
    assert not own[0].exists()


def test_released_objects_past_the_bound_are_freed_oldest_first(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    store = Store(tmp_path / "cache", released_bytes=250, released_min_size=0)
    store.open()
    first, second, third = b"1" * 100, b"2" * 100, b"3" * 100
    digests = [stored_then_unlinked(store, tmp_path, data) for data in (first, second, third)]
    store.release(digests[0], 0o644, 100)
    store.release(digests[1], 0o644, 100)
    store.release(digests[0], 0o644, 100)  # released again: now the newest
    store.release(digests[2], 0o644, 100)  # 300 bytes wait: the oldest (second) goes
    assert [store.has(digest, 0o644) for digest in digests] == [True, False, True]
    assert store.free_released() == 200
    assert not any(store.has(digest, 0o644) for digest in digests)
    store.close()


def test_a_small_released_object_is_freed_at_once(store: Store, tmp_path: Path) -> None:
    small, large = b"ref\n", b"p" * store.released_min_size
    for data in (small, large):
        store.release(stored_then_unlinked(store, tmp_path, data), 0o644, len(data))
    assert not store.has(sha(small), 0o644)  # a loose object or a ref: cheap to write again
    assert store.has(sha(large), 0o644)


def test_check_finds_objects_changed_in_place_or_chmodded(store: Store, tmp_path: Path) -> None:
    good, edited, chmodded = b"good", b"edited", b"chmodded"
    for data in (good, edited, chmodded):
        store.put(write(tmp_path / "tree" / data.decode(), data), sha(data), 0o644)
    with open(tmp_path / "tree" / "edited", "r+b") as handle:  # through the tree's hardlink
        handle.write(b"E")
    os.chmod(tmp_path / "tree" / "chmodded", 0o600)
    result = check_store(store)
    assert result.checked == 3
    reasons = {d.object.digest: d.reason for d in result.damaged}
    assert reasons == {
        sha(edited): "content changed in place",
        sha(chmodded): "mode changed to 600",
    }
    inode = os.stat(tmp_path / "tree" / "edited")
    assert result.hashes[(inode.st_dev, inode.st_ino)][1] == sha(b"Edited")


def test_open_sweeps_work_folders_of_processes_that_are_gone_only(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    alive = Store(tmp_path / "cache")
    alive.open()
    pin = Path(os.fsdecode(alive.temp_path()))
    pin.write_bytes(b"held by a live process")
    gone = alive.tmp_dir / "123.dead"
    gone.mkdir()
    (gone / ".owner").touch()  # its lock is free: its process is gone
    (gone / "pin").write_bytes(b"x")
    (alive.tmp_dir / "loose").write_bytes(b"y")
    other = Store(tmp_path / "cache")
    other.open()
    assert not gone.exists() and not (alive.tmp_dir / "loose").exists()
    assert pin.read_bytes() == b"held by a live process"
    alive.close()
    assert not pin.exists()
    other.close()
    assert os.listdir(other.tmp_dir) == []
    assert other.root == tmp_path / "cache" / STORE_DIR_NAME
    with pytest.raises(RuntimeError):
        other.temp_path()


def test_a_work_folder_being_set_up_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    first = Store(tmp_path / "cache")
    first.open()
    # another process has made its folder and is taking its owner lock: not named .owner yet
    starting = first.tmp_dir / "456.new"
    starting.mkdir()
    (starting / ".owner.new").touch()
    second = Store(tmp_path / "cache")
    second.open()
    assert starting.exists()
    # a store's own lock is taken before it has its name, and held
    owner = Path(os.fsdecode(second.temp_path())).parent / ".owner"
    assert not owner.with_name(".owner.new").exists()
    with open(owner, "rb") as handle, pytest.raises(BlockingIOError):
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    first.close()
    second.close()


def test_a_work_folder_removed_while_another_process_sweeps_is_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cache").mkdir()
    first = Store(tmp_path / "cache")
    first.open()
    finished = first.tmp_dir / "789.done"
    finished.mkdir()
    listing = os.scandir

    def scandir_then_finish(path: Any) -> Any:
        entries = list(listing(path))
        if os.fsdecode(path) == str(first.tmp_dir) and finished.exists():
            finished.rmdir()  # its process finishes and removes it after the listing
        return iter(entries)

    monkeypatch.setattr(os, "scandir", scandir_then_finish)
    second = Store(tmp_path / "cache")
    second.open()
    monkeypatch.undo()
    assert not finished.exists()
    first.close()
    second.close()


def test_threads_putting_the_same_content_share_one_object(store: Store, tmp_path: Path) -> None:
    data = b"x" * 5000
    digest = sha(data)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def extract(number: int) -> None:
        try:
            barrier.wait()
            for index in range(50):
                dest = tmp_path / f"tree{number}" / f"f{index}"
                dest.parent.mkdir(exist_ok=True)
                if store.link(digest, 0o644, len(data), os.fsencode(dest)) is None:
                    store.put(write(dest, data), digest, 0o644)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=extract, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    (only,) = list(store.objects())
    assert only.links == 8 * 50 + 1
    assert leftovers(store) == []
