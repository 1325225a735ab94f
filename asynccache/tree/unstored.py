"""Storing after the fact: the regular files of a tree that were written past the content store."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

from asynccache.tree.dedup import ContentStore
from asynccache.tree.digest import file_sha256

__all__ = ["store_unstored"]


def store_unstored(
    root: bytes,
    store: ContentStore,
    keep: Callable[[bytes, int, str, os.stat_result], None] | None = None,
) -> tuple[int, int]:
    """Hand the store every regular file under root that it does not hold; (files, bytes).

    For what was written past the store (placeholders of hardlinks filled from a layer's data,
    the git guard's new packs): each inode that no name outside root links is read, hashed and
    stored, or replaced (with every path under root that shares it) by the stored copy.
    ``keep(path, mode, sha256, stat)`` hears of each file so stored.
    """
    base = os.path.join(root, b"")
    groups: dict[int, tuple[os.stat_result, list[bytes]]] = {}
    files = size = 0
    stack = [b""]
    while stack:
        rel = stack.pop()
        with os.scandir(base + rel if rel else root) as entries:
            for entry in entries:
                name = rel + b"/" + entry.name if rel else entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append(name)
                    continue
                found = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(found.st_mode):
                    files += 1
                    size += found.st_size
                    groups.setdefault(found.st_ino, (found, []))[1].append(name)
    for found, names in groups.values():
        if found.st_nlink != len(names):
            continue  # linked from outside: by the store
        first = base + names[0]
        digest, mode = file_sha256(first), stat.S_IMODE(found.st_mode)
        linked, stored = store.put(first, digest, mode)
        now = {names[0]: stored}
        for name in names[1:] if linked else ():
            os.unlink(base + name)
            again = store.link(digest, mode, found.st_size, base + name)
            if again is None:
                raise FileNotFoundError(errno.ENOENT, "the stored copy vanished", name)
            now[name] = again
        if keep is not None:
            for name in names:
                keep(name, mode, digest, now.get(name, stored))
    return files, size
