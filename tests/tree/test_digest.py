"""digest.py: the tree walk, tree_stats, content hashes used only while their file is unchanged."""

from __future__ import annotations

import os
from pathlib import Path

from asynccache.tree.digest import entries_under, tree_digest, tree_stats, walk


def test_tree_stats_counts_regular_files_without_following_symlinks(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big").write_bytes(b"o" * 1000)
    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "a").write_bytes(b"a" * 10)
    (tree / "sub" / "b").write_bytes(b"b" * 20)
    (tree / "sub" / "deeper" / "empty").write_bytes(b"")
    os.link(tree / "a", tree / "sub" / "a_again")
    os.symlink(tree / "a", tree / "link_to_a")
    os.symlink(outside, tree / "link_to_outside_dir")
    os.symlink(outside / "big", tree / "sub" / "link_to_outside_file")
    os.mkfifo(tree / "fifo")
    assert tree_stats(tree) == (4, 40)


def test_tree_stats_of_a_file_or_symlink(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"12345")
    os.symlink(tmp_path / "f", tmp_path / "l")
    assert tree_stats(tmp_path / "f") == (1, 5)
    assert tree_stats(tmp_path / "l") == (0, 0)


def test_a_hash_is_used_only_while_its_file_is_unchanged(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"old")
    info = os.lstat(tmp_path / "a")
    identity = (info.st_ino, info.st_size, info.st_mtime_ns)
    stale = {b"a": (identity, "0" * 64)}
    assert tree_digest(tmp_path, stale) != tree_digest(tmp_path)  # taken at face value
    (tmp_path / "a").write_bytes(b"new content")  # size and mtime change
    assert tree_digest(tmp_path, stale) == tree_digest(tmp_path)


def test_the_walk_names_every_entry_once_and_never_follows_a_link(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / "hidden").mkdir(parents=True)
    tree = tmp_path / "tree"
    (tree / "sub" / "deeper").mkdir(parents=True)
    (tree / "a").write_bytes(b"a")
    (tree / "sub" / "deeper" / "b").write_bytes(b"b")
    os.symlink(outside, tree / "sub" / "link_to_dir")
    seen = [(name, entry.path) for name, entry in entries_under(os.fsencode(tree))]
    assert sorted(name for name, _ in seen) == [
        b"a",
        b"sub",
        b"sub/deeper",
        b"sub/deeper/b",
        b"sub/link_to_dir",
    ]
    assert all(path == os.fsencode(tree) + b"/" + name for name, path in seen)
    files, size, folders = walk(os.fsencode(tree))
    assert (files, size) == (2, 2)
    assert sorted(folders) == sorted(os.fsencode(tree / p) for p in ("", "sub", "sub/deeper"))
