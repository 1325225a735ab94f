"""Filesystem helpers: tree removal at any depth, never through a link or a mount point."""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from asynccache._fs import remove_tree
from asynccache.cache.layout import CacheDir


def make_deep(top: Path, depth: int) -> None:
    """A chain of ``depth`` nested folders under ``top``, a file at every tenth level."""
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for level in range(depth):
            os.mkdir("d", dir_fd=fd)
            child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
            if level % 10 == 0:
                os.close(os.open("f", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))
    finally:
        os.close(fd)


def test_removes_a_tree_deeper_than_the_recursion_limit_and_path_max(tmp_path: Path) -> None:
    top = tmp_path / "deep"
    make_deep(top, 2500)  # 5,000 characters of path: beyond PATH_MAX as well
    remove_tree(top)
    assert not top.exists()


def test_removes_read_only_folders(tmp_path: Path) -> None:
    top = tmp_path / "ro"
    (top / "a" / "b").mkdir(parents=True)
    (top / "a" / "b" / "file").write_text("x")
    os.chmod(top / "a" / "b", 0o500)
    os.chmod(top / "a", 0o000)
    remove_tree(top)
    assert not top.exists()


def test_never_follows_a_symlink_out_of_the_tree(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    top = tmp_path / "tree"
    top.mkdir()
    (top / "link").symlink_to(outside)
    (top / "file-link").symlink_to(outside / "precious")
    remove_tree(top)
    assert not top.exists()
    assert (outside / "precious").read_text() == "keep"


def test_a_symlink_given_as_the_tree_is_only_unlinked(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    (tmp_path / "link").symlink_to(outside)
    remove_tree(tmp_path / "link")
    assert (outside / "precious").read_text() == "keep"


def test_missing_path_is_fine(tmp_path: Path) -> None:
    remove_tree(tmp_path / "absent")


def _can_mount() -> bool:
    return os.geteuid() == 0


@pytest.fixture
def bind_mount(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A folder of precious files bind-mounted inside a tree; unmounted afterwards."""
    if not _can_mount():
        if os.environ.get("CI"):
            pytest.fail("bind-mount tests need root in CI", pytrace=False)
        pytest.skip("bind-mount tests need root")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data").write_text("keep")
    tree = tmp_path / "tree"
    mount_point = tree / "sub" / "mnt"
    mount_point.mkdir(parents=True)
    (tree / "sub" / "other").write_text("x")
    subprocess.run(["mount", "--bind", str(precious), str(mount_point)], check=True)
    try:
        yield tree, precious
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_never_crosses_a_mount_point(bind_mount: tuple[Path, Path]) -> None:
    tree, precious = bind_mount
    with pytest.raises(OSError, match="mount points"):
        remove_tree(tree)
    assert (precious / "data").read_text() == "keep"
    assert not (tree / "sub" / "other").exists()
    assert (tree / "sub" / "mnt" / "data").exists()


def test_an_unremovable_work_folder_is_reported_and_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if not _can_mount():
        if os.environ.get("CI"):
            pytest.fail("bind-mount tests need root in CI", pytrace=False)
        pytest.skip("bind-mount tests need root")
    cache = CacheDir(tmp_path / "cache")
    cache.root.mkdir()
    cache.tmp_dir.mkdir()
    stuck = cache.tmp_dir / "a__1.dead"
    (stuck / "mnt").mkdir(parents=True)
    gone = cache.tmp_dir / "b__2.dead"
    make_deep(gone, 1500)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "data").write_text("keep")
    subprocess.run(["mount", "--bind", str(precious), str(stuck / "mnt")], check=True)
    try:
        with caplog.at_level(logging.WARNING):
            assert cache.remove_stale_work() == 1
            # A later run meets it again and still goes on.
            assert cache.remove_stale_work() == 0
    finally:
        subprocess.run(["umount", str(stuck / "mnt")], check=False)
    assert "cannot remove the unfinished folder" in caplog.text
    assert not gone.exists()
    assert (precious / "data").read_text() == "keep"


def test_a_planted_tmp_link_is_replaced_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep")
    cache = CacheDir(tmp_path / "cache")
    cache.root.mkdir()
    cache.tmp_dir.symlink_to(outside)
    assert cache.remove_stale_work() == 0
    assert cache.tmp_dir.is_dir() and not cache.tmp_dir.is_symlink()
    assert (outside / "precious").read_text() == "keep"


def test_a_planted_lock_link_is_never_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    cache = CacheDir(tmp_path / "cache")
    cache.root.mkdir()
    (cache.root / ".lock").symlink_to(victim)
    cache.lock()
    try:
        assert victim.read_text() == "precious\n"
        assert not (cache.root / ".lock").is_symlink()
        assert (cache.root / ".lock").read_text() == f"{os.getpid()}\n"
    finally:
        cache.unlock()
