"""A tree's content: file identities and hashes, counts, and its digest."""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path

__all__ = [
    "FileHash",
    "FileIdentity",
    "digest_of_lines",
    "entries_under",
    "entry_line",
    "file_sha256",
    "identity_of",
    "sha256_of",
    "tree_digest",
    "tree_lines",
    "tree_stats",
    "walk",
]

_BLOCK = 1 << 20

#: (st_ino, st_size, st_mtime_ns) of a file as written: its content hash holds while they do.
FileIdentity = tuple[int, int, int]
#: A file's identity and the sha256 (hex) of its content.
FileHash = tuple[FileIdentity, str]


def identity_of(found: os.stat_result) -> FileIdentity:
    """The identity of a file as stat found it."""
    return (found.st_ino, found.st_size, found.st_mtime_ns)


def sha256_of(pieces: list[bytes]) -> str:
    """The sha256 (hex) of the concatenated pieces."""
    content = hashlib.sha256()
    for piece in pieces:
        content.update(piece)
    return content.hexdigest()


def entries_under(top: bytes) -> Iterator[tuple[bytes, os.DirEntry[bytes]]]:
    """Every entry under ``top`` (not top itself) with its path relative to top, depth first.

    The one tree walk: symlinks are never followed, one folder is open at a time.
    """
    stack = [b""]
    while stack:
        rel = stack.pop()
        with os.scandir(os.path.join(top, rel) if rel else top) as entries:
            for entry in entries:
                name = os.path.join(rel, entry.name) if rel else entry.name
                yield name, entry
                if entry.is_dir(follow_symlinks=False):
                    stack.append(name)


def walk(top: bytes, paths: list[bytes] | None = None) -> tuple[int, int, list[bytes]]:
    """Regular files and their total size under top, and every folder (top included).

    The paths of everything but folders are appended to ``paths`` when it is given.
    """
    files = size = 0
    folders = [top]
    for _, entry in entries_under(top):
        if entry.is_dir(follow_symlinks=False):
            folders.append(entry.path)
            continue
        if entry.is_file(follow_symlinks=False):
            files += 1
            size += entry.stat(follow_symlinks=False).st_size
        if paths is not None:
            paths.append(entry.path)
    return files, size, folders


def tree_stats(path: Path) -> tuple[int, int]:
    """(file_count, size_bytes) of regular files under path, by lstat, never following symlinks."""
    target = os.fsencode(path)
    info = os.lstat(target)
    if stat.S_ISREG(info.st_mode):
        return 1, info.st_size
    if not stat.S_ISDIR(info.st_mode):
        return 0, 0
    files, size, _ = walk(target)
    return files, size


def tree_digest(
    path: Path,
    known: Mapping[bytes, FileHash] | None = None,
    by_inode: Mapping[tuple[int, int], FileHash] | None = None,
) -> str:
    """sha256 (hex) over the sorted (path, type, mode, content sha256 or link target) list.

    The root itself, times, owners and hard-link structure are left out, so a faithful copy
    of a tree has the tree's digest. ``known`` gives content hashes taken while the files
    were written, by relative path, and ``by_inode`` hashes of files read already (by
    (st_dev, st_ino)); each is used only while the file's inode, size and mtime are still
    those it was taken with, else the file is read.
    """
    lines, _, _ = tree_lines(os.fsencode(path), known, by_inode)
    return digest_of_lines(lines)


def tree_lines(
    top: bytes,
    known: Mapping[bytes, FileHash] | None = None,
    by_inode: Mapping[tuple[int, int], FileHash] | None = None,
    prefix: bytes = b"",
) -> tuple[list[bytes], int, int]:
    """The digest lines of everything under ``top`` (see tree_digest), and its regular files'
    count and total size. Paths, and the keys of ``known``, are relative to the digested tree:
    ``prefix`` is top's own path in it (b".git/" for its .git folder)."""
    known = known or {}
    by_inode = by_inode or {}
    lines: list[bytes] = []
    files = size = 0
    for rel, entry in entries_under(top):
        name = prefix + rel
        info = entry.stat(follow_symlinks=False)
        hashed = None
        if stat.S_ISREG(info.st_mode):
            files += 1
            size += info.st_size
            identity = identity_of(info)
            for candidate in (known.get(name), by_inode.get((info.st_dev, info.st_ino))):
                if candidate is not None and candidate[0] == identity:
                    hashed = candidate[1]
                    break
        if hashed is not None:
            kind, detail = b"f", hashed.encode()
        else:
            kind, detail = _describe(entry.path, info)
        mode = 0 if kind == b"l" else stat.S_IMODE(info.st_mode)
        lines.append(entry_line(name, kind, mode, detail))
    return lines, files, size


def entry_line(name: bytes, kind: bytes, mode: int, detail: bytes) -> bytes:
    """One entry's line in a tree digest: path, type, mode (0 for symlinks), hash or target."""
    return b"\0".join((name, kind, b"%o" % mode, detail)) + b"\n"


def digest_of_lines(lines: list[bytes]) -> str:
    """The tree digest of its entries' lines, in any order (they are sorted here)."""
    lines.sort()
    digest = hashlib.sha256()
    for line in lines:
        digest.update(line)
    return digest.hexdigest()


def _describe(path: bytes, info: os.stat_result) -> tuple[bytes, bytes]:
    mode = info.st_mode
    if stat.S_ISREG(mode):
        return b"f", file_sha256(path).encode()
    if stat.S_ISDIR(mode):
        return b"d", b""
    if stat.S_ISLNK(mode):
        return b"l", os.readlink(path)
    if stat.S_ISFIFO(mode):
        return b"p", b""
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return (b"c" if stat.S_ISCHR(mode) else b"b"), b"%d" % info.st_rdev
    return b"s", b""


def file_sha256(path: bytes | str) -> str:
    """The sha256 (hex) of a file's content, never following a symlink."""
    digest = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        while block := os.read(fd, _BLOCK):
            digest.update(block)
    finally:
        os.close(fd)
    return digest.hexdigest()
