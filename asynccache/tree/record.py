"""What an extraction wrote, as the tree digest needs it: content hashes and digest lines."""

from __future__ import annotations

from collections.abc import Iterable

from asynccache.tree.digest import FileHash, entry_line

__all__ = ["MAX_KEPT_HASHES", "TreeRecord"]

#: Most file hashes an extraction keeps for its digest (the other files are read again).
MAX_KEPT_HASHES = 50_000


class TreeRecord:
    """The content hashes of files as written, and every file's and symlink's digest line.

    Paths are relative to the extracted folder. The record follows the changes the
    extraction reports; after one it cannot follow, it stops (see :meth:`lose_track`) and
    the digest is taken by reading the tree.
    """

    def __init__(self, *, keep_hashes: bool) -> None:
        #: Hashes are taken at all (else nothing is recorded).
        self.keep_hashes = keep_hashes
        #: Content hashes of the files written, while nothing else replaced them.
        self.hashes: dict[bytes, FileHash] = {}
        # every file and symlink written, as its digest line needs it: path -> (kind, mode,
        # content hash or link target); None once an event it cannot follow happened
        self._entries: dict[bytes, tuple[bytes, int, bytes]] | None = {} if keep_hashes else None

    @property
    def tracking(self) -> bool:
        """Something is recorded that a removal must forget."""
        return bool(self.hashes or self._entries)

    def symlink(self, rel: bytes, target: bytes) -> None:
        """rel is now a symlink to target."""
        if self._entries is not None:
            self._entries[rel] = (b"l", 0, target)

    def forget(self, rel: bytes) -> None:
        """rel is about to change: its content hash and digest entry no longer hold."""
        self.hashes.pop(rel, None)
        if self._entries is not None:
            self._entries.pop(rel, None)

    def lose_track(self) -> None:
        """Something changed that the entries do not follow: the digest will read the tree."""
        self._entries = None

    def keep_hash(self, rel: bytes, mode: int, taken: FileHash) -> None:
        """Remember the content hash of a file just written (within the budget)."""
        # past the budget, only newer hashes of known paths (an old one must not stay)
        if len(self.hashes) >= MAX_KEPT_HASHES and rel not in self.hashes:
            self.lose_track()
            return
        self.hashes[rel] = taken
        if self._entries is not None:
            self._entries[rel] = (b"f", mode, taken[1].encode())

    def link(self, rel: bytes, source: bytes) -> None:
        """rel is now a hardlink to the file at source."""
        entries = self._entries
        if entries is None:
            return
        shared = entries.get(source)
        if shared is None:
            self.lose_track()
        else:
            entries[rel] = shared
            if source in self.hashes:
                self.hashes[rel] = self.hashes[source]

    def digest_lines(self, folders: Iterable[tuple[bytes, int]]) -> list[bytes] | None:
        """digest.tree_lines of the tree, given its folders and final modes; None when unknown.

        ``folders`` may include the root (b""), which a tree digest leaves out.
        """
        entries = self._entries
        if entries is None:
            return None
        lines = [entry_line(rel, *entry) for rel, entry in entries.items()]
        lines += [entry_line(rel, b"d", mode, b"") for rel, mode in folders if rel]
        return lines
