"""What the object store holds and whether it is sound: usage, a deep check, who links what."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from asynccache.cache.store import Store
from asynccache.cache.store_layout import Inode, StoredObject
from asynccache.tree.digest import FileHash, file_sha256

__all__ = [
    "DamagedObject",
    "StoreCheck",
    "StoreUsage",
    "check_store",
    "linked_from",
    "store_usage",
]


@dataclass(frozen=True, slots=True)
class DamagedObject:
    """An object whose content or mode no longer matches its name."""

    object: StoredObject
    #: What is wrong, in words.
    reason: str


@dataclass(frozen=True, slots=True)
class StoreUsage:
    """What the store holds, and what nothing but the store links (``asynccache gc`` frees it)."""

    objects: int = 0
    bytes: int = 0
    unlinked_objects: int = 0
    unlinked_bytes: int = 0


@dataclass
class StoreCheck:
    """What a deep check of the store found."""

    checked: int = 0
    damaged: list[DamagedObject] = field(default_factory=list)
    #: Each object's content hash as read, by inode (for tree_digest's ``by_inode``).
    hashes: dict[Inode, FileHash] = field(default_factory=dict)


def store_usage(store: Store) -> StoreUsage:
    """Objects and bytes held, and those nothing but the store links."""
    objects = size = unlinked = unlinked_size = 0
    for item in store.objects():
        objects += 1
        size += item.size
        if item.links == 1:
            unlinked += 1
            unlinked_size += item.size
    return StoreUsage(objects, size, unlinked, unlinked_size)


def check_store(store: Store, jobs: int = 8) -> StoreCheck:
    """Read every object and compare its content and mode with its name."""
    result = StoreCheck()
    objects = list(store.objects(jobs))
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        checks = pool.map(lambda item: _check_one(store, item), objects)
        for item, (digest, reason) in zip(objects, checks, strict=True):
            result.checked += 1
            if digest is not None:
                identity = (item.inode[1], item.size, item.mtime_ns)
                result.hashes[item.inode] = (identity, digest)
            if reason:
                result.damaged.append(DamagedObject(item, reason))
    return result


def _check_one(store: Store, item: StoredObject) -> tuple[str | None, str]:
    path = os.fsencode(store.root / item.name)
    try:
        before = os.lstat(path)
        digest = file_sha256(path)
    except FileNotFoundError:
        return None, ""  # freed meanwhile
    except OSError as exc:
        return None, f"unreadable: {exc.strerror}"
    problems: list[str] = []
    if digest != item.digest:
        problems.append("content changed in place")
    mode = stat.S_IMODE(before.st_mode)
    if mode != item.mode:
        problems.append(f"mode changed to {mode:o}")
    return digest, "; ".join(problems)


def linked_from(tree: Path, inodes: Iterable[Inode]) -> set[Inode]:
    """Which of ``inodes`` the regular files under ``tree`` link."""
    wanted = set(inodes)
    found: set[Inode] = set()
    stack = [os.fsencode(tree)]
    while stack and wanted:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    info = entry.stat(follow_symlinks=False)
                    inode = (info.st_dev, info.st_ino)
                    if inode in wanted:
                        found.add(inode)
    return found
