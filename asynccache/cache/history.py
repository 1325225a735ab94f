"""An extracted tree's last step before it is named: its git history past HEAD removed (with
the object store told what the guard wrote and what it released), and its digest taken.

It runs where the tree was extracted (a worker process, beside its siblings), so that neither
the guard's bookkeeping nor the digest waits on the main process.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from asynccache._fs import remove_tree
from asynccache.cache.layout import scratch_of
from asynccache.cache.store import Store
from asynccache.tree.digest import (
    FileHash,
    digest_of_lines,
    entries_under,
    entry_line,
    identity_of,
    tree_digest,
    tree_lines,
)
from asynccache.tree.extract import ExtractResult
from asynccache.tree.git_guard import guard_tree
from asynccache.tree.unstored import store_unstored

__all__ = ["HistoryCloser", "close_history"]

_GIT = b".git"


@dataclass(frozen=True)
class _Held:
    """A file of .git as extracted that is a stored object."""

    name: bytes  # its path under .git
    inode: int
    digest: str
    mode: int
    size: int


@dataclass(frozen=True)
class HistoryCloser:
    """The tree finisher of a run (see tree/options.py): the guard unless the run keeps git
    history, then the digest, read back only where the extraction could not follow."""

    keep_git_history: bool = False
    store: Store | None = None

    def __call__(self, tree: Path, result: ExtractResult) -> ExtractResult:
        if not self.keep_git_history:
            result = close_history(tree, result, self.store)
        digest = result.digest
        if digest is None:
            digest = tree_digest(tree, result.file_hashes)
        # what the digest needed stays here: a worker's result crosses a pipe
        return dataclasses.replace(result, digest=digest, file_hashes={}, digest_lines=None)


def close_history(tree: Path, result: ExtractResult, store: Store | None = None) -> ExtractResult:
    """Remove the git history past HEAD from an extracted tree (git_guard); return its result
    with .git's files and bytes counted anew and its digest taken again (.git read back, the
    rest from the extraction's lines when it kept them, else None).

    The guard's shadow repositories live in the tree's scratch folder (layout.scratch_of),
    removed here, and by the main process with the tree if this process dies first.
    """
    dotgit = tree / ".git"
    if not dotgit.is_dir() or dotgit.is_symlink():
        guard_tree(tree)  # nothing to do, or the error naming what is wrong
        return result
    files, size, held = _git_as_extracted(dotgit, result)
    scratch = scratch_of(tree)
    scratch.mkdir(exist_ok=True)
    try:
        guard_tree(tree, scratch=scratch)
    finally:
        remove_tree(scratch)
    known = dict(result.file_hashes)
    if store is not None:
        known.update(_restore(store, dotgit, held))
    git_lines, files_now, size_now = tree_lines(os.fsencode(dotgit), known, prefix=_GIT + b"/")
    return dataclasses.replace(
        result,
        file_count=result.file_count - files + files_now,
        size_bytes=result.size_bytes - size + size_now,
        digest=_digest_with_git(result, dotgit, git_lines),
        digest_lines=None,
    )


def _digest_with_git(result: ExtractResult, dotgit: Path, git_lines: list[bytes]) -> str | None:
    """The digest of the tree from the extraction's lines outside .git and .git's as read."""
    if result.digest_lines is None:
        return None
    outside = [line for line in result.digest_lines if not _in_git(line)]
    mode = stat.S_IMODE(os.lstat(dotgit).st_mode)
    return digest_of_lines([*outside, entry_line(_GIT, b"d", mode, b""), *git_lines])


def _in_git(line: bytes) -> bool:
    """True for the digest line of .git itself or of anything under it."""
    return line.startswith(_GIT + b"\0") or line.startswith(_GIT + b"/")


def _git_as_extracted(dotgit: Path, result: ExtractResult) -> tuple[int, int, list[_Held]]:
    """.git's regular files and bytes before the guard, in one walk, with those that are
    stored objects, as the extraction hashed them: what the guard removes of them is released
    to the store."""
    known = result.file_hashes
    files = size = 0
    held: list[_Held] = []
    for name, entry in entries_under(os.fsencode(dotgit)):
        info = entry.stat(follow_symlinks=False)
        if not stat.S_ISREG(info.st_mode):
            continue
        files += 1
        size += info.st_size
        hashed = known.get(_GIT + b"/" + name)
        if hashed is not None and hashed[0] == identity_of(info):
            mode = stat.S_IMODE(info.st_mode)
            held.append(_Held(name, info.st_ino, hashed[1], mode, info.st_size))
    return files, size, held


def _restore(store: Store, dotgit: Path, held: list[_Held]) -> dict[bytes, FileHash]:
    """After the git guard: store what it wrote, and release to the store what it removed or
    replaced (freed once nothing else links it: see Store.release).

    Returns the content hash of each file stored, by its path in the tree (for the digest).
    """
    stored: dict[bytes, FileHash] = {}

    def keep(path: bytes, _mode: int, digest: str, found: os.stat_result) -> None:
        stored[_GIT + b"/" + path] = (identity_of(found), digest)

    store_unstored(os.fsencode(dotgit), store, keep)
    base = os.path.join(os.fsencode(dotgit), b"")
    for file in held:
        try:
            still = os.lstat(base + file.name).st_ino == file.inode
        except (FileNotFoundError, NotADirectoryError):
            still = False
        if not still:
            store.release(file.digest, file.mode, file.size)
    return stored
