"""The hook through which an extraction links files that a content store already holds.

An extraction that is given a :class:`ContentStore` hashes each regular file before creating
it when it can (small files, whose data is in memory) and links the stored copy instead of
writing one; a file it had to write (large ones, hashed while written) is handed to the store
afterwards. The tree package defines the hook; ``cache/store.py`` implements it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from asynccache.config import CacheOptions
from asynccache.tree.exclude import ExcludeRules

__all__ = ["ContentStore", "TreeFactory", "TreeOptions"]


class ContentStore(Protocol):
    """Content-addressed files that an extraction may hard-link into its tree."""

    def link(self, digest: str, mode: int, size: int | None, dest: bytes) -> os.stat_result | None:
        """Link the stored file with this sha256 and mode at dest (FileExistsError if taken).

        Returns the stored file's stat, or None when the store has no usable copy.
        """
        ...

    def put(self, path: bytes, digest: str, mode: int) -> tuple[bool, os.stat_result]:
        """Store the complete file at path, or replace it by a link to the stored copy.

        Returns (replaced by a link, the stat of the file now at path).
        """
        ...

    def close(self) -> None:
        """This process is done with the store."""
        ...


@dataclass(frozen=True)
class TreeOptions:
    """What a source gives each of its extractions: a store to link from, paths to leave out."""

    store: ContentStore | None = None
    exclude: ExcludeRules | None = None

    def close(self) -> None:
        """Close the store (the process is done extracting)."""
        if self.store is not None:
            self.store.close()


#: Makes one process's TreeOptions for a run (its options, the cache folder). A module-level
#: function, so that worker processes are given it by name.
TreeFactory = Callable[[CacheOptions, Path], TreeOptions]
