"""Cache folders shared by the tests of this package: one built by hand (verify, status) and an
empty one ready for a run's work folders (history, publish)."""

from __future__ import annotations

from pathlib import Path

import pytest

from asynccache.cache.layout import CacheDir
from tests.support.cache_trees import cache_instance


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """Three healthy instances (alpha, beta, gamma) with digests recorded."""
    root = tmp_path / "cache"
    cache_instance(root, "alpha", "a" * 40, digest=True)
    cache_instance(root, "beta", "b" * 40, digest=True)
    cache_instance(root, "gamma", "c" * 40, digest=True)
    return root


@pytest.fixture
def empty_cache(tmp_path: Path) -> CacheDir:
    """An empty cache folder, checked and swept as a run starts."""
    made = CacheDir(tmp_path / "cache")
    made.check_usable()
    made.remove_stale_work()
    return made
