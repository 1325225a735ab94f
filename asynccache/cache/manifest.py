"""A tree as the transfer stream lists it: made from a folder, checked by digest, rebuilt."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from asynccache.cache.store import Store
from asynccache.cache.store_layout import Inode, StoredObject
from asynccache.cache.transfer import Entry, StreamTree, TransferError
from asynccache.tree.digest import digest_of_lines, entry_line, file_sha256

__all__ = ["TreeScan", "build_tree", "entries_digest", "scan_tree"]


@dataclass
class TreeScan:
    """A tree as the stream describes it, and where each of its objects can be read."""

    root: list[int | None]
    entries: list[Entry]
    #: (sha256, mode) -> a path holding that content (a store object or the tree's own file).
    sources: dict[tuple[str, int], bytes]


def scan_tree(
    top: Path, store: Store | None = None, stored: Mapping[Inode, StoredObject] | None = None
) -> TreeScan:
    """Describe the tree at ``top``: files ``store`` holds are named by their object (``stored``
    maps inodes to objects, see Store.inodes), the others are read and hashed.

    Raises TransferError for a special file (extraction never makes one).
    """
    base = os.fsencode(top)
    info = os.lstat(base)
    scan = TreeScan(root=[stat.S_IMODE(info.st_mode), info.st_mtime_ns], entries=[], sources={})
    stack = [b""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(base, rel) if rel else base) as listing:
            children = sorted(listing, key=lambda child: child.name)
        for child in children:
            name = os.path.join(rel, child.name) if rel else child.name
            found = child.stat(follow_symlinks=False)
            path = os.fsdecode(name)
            mode = stat.S_IMODE(found.st_mode)
            if stat.S_ISDIR(found.st_mode):
                scan.entries.append(["d", path, mode, found.st_mtime_ns])
                stack.append(name)
            elif stat.S_ISLNK(found.st_mode):
                target = os.fsdecode(os.readlink(child.path))
                scan.entries.append(["l", path, target, found.st_mtime_ns])
            elif stat.S_ISREG(found.st_mode):
                known = stored.get((found.st_dev, found.st_ino)) if stored else None
                if known is not None and known.mode == mode and store is not None:
                    digest, source = known.digest, store.path(known.digest, known.mode, known.copy)
                else:
                    digest, source = file_sha256(child.path), child.path
                scan.entries.append(["f", path, mode, found.st_size, digest])
                scan.sources.setdefault((digest, mode), source)
            else:
                raise TransferError(f"{os.fsdecode(child.path)} is a special file; not exported")
    scan.entries.sort(key=lambda entry: str(entry[1]))
    return scan


def entries_digest(entries: Sequence[Entry]) -> str:
    """The tree digest (digest.tree_digest) of a tree's entries."""
    lines: list[bytes] = []
    for entry in entries:
        kind, path = entry[0], os.fsencode(entry[1])
        if kind == "d":
            lines.append(entry_line(path, b"d", entry[2], b""))
        elif kind == "f":
            lines.append(entry_line(path, b"f", entry[2], entry[4].encode()))
        else:
            lines.append(entry_line(path, b"l", 0, os.fsencode(entry[2])))
    return digest_of_lines(lines)


def build_tree(tree: StreamTree, dest: Path, store: Store) -> tuple[int, int, str]:
    """Make tree under the empty folder dest, linking files from store.

    Returns (regular files, their bytes, the tree digest computed from the entries). Folders
    are created before anything inside them; nothing is ever written through a symlink.
    """
    base = os.path.join(os.fsencode(dest), b"")
    folders: dict[bytes, tuple[int, int | None]] = {}
    files = size = 0
    for entry in sorted(tree.entries, key=lambda item: (item[0] != "d", item[1])):
        kind, rel = entry[0], os.fsencode(entry[1])
        parent = rel.rpartition(b"/")[0]
        if parent and parent not in folders:
            raise TransferError(f"{tree.instance_id}: {entry[1]!r} has no folder in the tree")
        full = base + rel
        try:
            if kind == "d":
                os.mkdir(full, 0o700)
                folders[rel] = (entry[2], entry[3])
            elif kind == "f":
                if store.link(entry[4], entry[2], entry[3], full) is None:
                    raise TransferError(
                        f"{tree.instance_id}: object {entry[4]} of {entry[1]!r} is neither in "
                        "the stream nor in the store"
                    )
                files += 1
                size += entry[3]
            else:
                os.symlink(os.fsencode(entry[2]), full)
                if entry[3] is not None:
                    os.utime(full, ns=(entry[3], entry[3]), follow_symlinks=False)
        except FileExistsError:
            raise TransferError(f"{tree.instance_id}: {entry[1]!r} listed twice") from None
    for rel in sorted(folders, key=lambda item: item.count(b"/"), reverse=True):
        mode, mtime = folders[rel]
        os.chmod(base + rel, mode)
        if mtime is not None:
            os.utime(base + rel, ns=(mtime, mtime), follow_symlinks=False)
    mode, mtime = tree.root
    os.chmod(dest, mode)
    if mtime is not None:
        os.utime(dest, ns=(mtime, mtime), follow_symlinks=False)
    return files, size, entries_digest(tree.entries)
