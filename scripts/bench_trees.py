"""What a contender left in its cache folder: trees compared with docker cp's, and disk use.

* :func:`tree_manifest` describes one cached tree (kind, mode bits, content sha256 or symlink
  target of every path), optionally without ``.git`` (when asynccache's leak guard rewrote it on
  purpose); :func:`compare_trees` compares a contender's trees with the reference ones (the
  baseline's, made by ``docker cp``) and summarises what differs.
* :func:`cache_usage` counts a cache folder as a user sees it: logical files and bytes (every
  path of every cached tree, as ``tar`` or ``rsync -a`` would carry them) against files created
  (distinct inodes) and physical bytes (allocated blocks of distinct inodes), so that what
  deduplication saves shows.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import fixtures as fx  # noqa: E402

#: Folders of a cache that are bookkeeping, not cached trees.
BOOKKEEPING = (".meta", ".layers", ".tmp", ".peer-tmp")

Manifest = dict[str, fx.Entry]


def tree_manifest(root: Path, skip_git: bool = False) -> Manifest:
    """Every path under root with its kind, mode and content (hard links not compared)."""
    found = fx.snapshot_tree(root, hardlinks=False)
    if skip_git:
        found = {k: v for k, v in found.items() if k != ".git" and not k.startswith(".git/")}
    return found


def instance_folders(cache: Path) -> list[Path]:
    """The cached trees of a cache folder (every folder that is not bookkeeping)."""
    if not cache.is_dir():
        return []
    return sorted(
        path
        for path in cache.iterdir()
        if path.is_dir() and not path.is_symlink() and not path.name.startswith(".")
    )


def compare_trees(
    reference: dict[str, Manifest], cache: Path, skip_git: bool = False, limit: int = 3
) -> dict[str, Any]:
    """Compare the cached trees with the reference manifests (by instance id).

    ``skip_git`` leaves ``.git`` out of both sides. Returns how many trees were compared and
    equal, and a few differences (from fixtures.diff_snapshots).
    """
    compared = equal = 0
    missing: list[str] = []
    samples: list[str] = []
    for instance_id, expected in sorted(reference.items()):
        folder = cache / instance_id
        if not folder.is_dir():
            missing.append(instance_id)
            continue
        if skip_git:
            expected = {
                k: v for k, v in expected.items() if k != ".git" and not k.startswith(".git/")
            }
        actual = tree_manifest(folder, skip_git)
        compared += 1
        if actual == expected:
            equal += 1
        elif len(samples) < limit:
            samples.append(f"{instance_id}: {fx.diff_snapshots(expected, actual, limit=4)}")
    return {
        "compared": compared,
        "equal": equal,
        "missing": missing,
        "skip_git": skip_git,
        "samples": samples,
    }


def _walk_files(root: Path) -> Iterable[os.stat_result]:
    stack = [str(root)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                info = entry.stat(follow_symlinks=False)
                if stat.S_ISDIR(info.st_mode):
                    stack.append(entry.path)
                yield info


def cache_usage(cache: Path) -> dict[str, Any]:
    """Logical against physical size of a cache folder (``.layers`` and work folders left out).

    logical: regular files of the cached trees, each path counted, and their sizes; created:
    distinct regular-file inodes in the whole folder (cached trees, a content store, ``.meta``);
    physical: blocks allocated to distinct inodes (files, folders, symlinks), as ``du`` counts.
    """
    logical_files = logical_bytes = 0
    for folder in instance_folders(cache):
        for info in _walk_files(folder):
            if stat.S_ISREG(info.st_mode):
                logical_files += 1
                logical_bytes += info.st_size
    seen: set[tuple[int, int]] = set()
    created = physical = 0
    if cache.is_dir():
        for entry in cache.iterdir():
            if entry.name in (".layers", ".tmp", ".peer-tmp"):
                continue
            infos = (
                _walk_files(entry) if entry.is_dir() and not entry.is_symlink() else [entry.lstat()]
            )
            for info in infos:
                key = (info.st_dev, info.st_ino)
                if key in seen:
                    continue
                seen.add(key)
                physical += info.st_blocks * 512
                if stat.S_ISREG(info.st_mode):
                    created += 1
    return {
        "logical_files": logical_files,
        "logical_bytes": logical_bytes,
        "files_created": created,
        "physical_bytes": physical,
        "physical_ratio": physical / logical_bytes if logical_bytes else None,
    }
