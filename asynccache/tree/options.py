"""What a run gives each of its extractions: a store to link from, paths to leave out, and a
last step for each finished tree (the git guard), all made anew in every process."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from asynccache.config import CacheOptions
from asynccache.tree.dedup import ContentStore
from asynccache.tree.exclude import ExcludeRules
from asynccache.tree.extract import ExtractResult

__all__ = ["TreeFactory", "TreeFinisher", "TreeOptions"]

#: The last step of an extraction, in the process that extracted: given the tree's folder and
#: what was written, it changes the tree if it must and returns what the tree now holds.
TreeFinisher = Callable[[Path, ExtractResult], ExtractResult]


@dataclass(frozen=True)
class TreeOptions:
    """What a source gives each of its extractions, and what is done to each tree it made."""

    store: ContentStore | None = None
    exclude: ExcludeRules | None = None
    finish: TreeFinisher | None = None

    def close(self) -> None:
        """Close the store (the process is done extracting)."""
        if self.store is not None:
            self.store.close()


#: Makes one process's TreeOptions for a run (its options, the cache folder). A module-level
#: function, so that worker processes are given it by name.
TreeFactory = Callable[[CacheOptions, Path], TreeOptions]
