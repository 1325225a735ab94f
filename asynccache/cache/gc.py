"""``asynccache gc``: free the stored objects that no cached tree links any more."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from asynccache.cache.layout import CacheDir
from asynccache.cache.store import Store
from asynccache.cache.store_check import StoreUsage, store_usage
from asynccache.errors import SetupError

__all__ = ["GcReport", "collect_garbage"]


@dataclass(frozen=True)
class GcReport:
    """What gc freed and what the store holds after it."""

    cache_dir: str
    freed_objects: int
    freed_bytes: int
    store: StoreUsage


def collect_garbage(cache_dir: str | os.PathLike[str]) -> GcReport:
    """Free every object linked by nothing but the store (holding the folder's lock).

    Trees keep every object they link: an object is removed only while its link count shows
    the store's own name alone, checked again after it was renamed away.
    """
    cache = CacheDir(Path(cache_dir))
    if not cache.root.is_dir():
        raise SetupError(f"cache folder {cache.root} does not exist")
    cache.lock()
    try:
        store = Store(cache.root)
        if not store.root.is_dir():
            return GcReport(str(cache.root), 0, 0, StoreUsage())
        store.open()
        try:
            objects, freed = store.collect()
        finally:
            store.close()
        return GcReport(str(cache.root), objects, freed, store_usage(store))
    finally:
        cache.unlock()
