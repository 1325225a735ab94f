"""The hook through which an extraction links files that a content store already holds.

An extraction that is given a :class:`ContentStore` hashes each regular file before creating
it when it can (small files, whose data is in memory) and links the stored copy instead of
writing one; a file it had to write (large ones, hashed while written) is handed to the store
afterwards. The tree package defines the hook; ``cache/store.py`` implements it.
"""

from __future__ import annotations

import os
from typing import Protocol

__all__ = ["ContentStore"]


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
