"""A cache folder built by hand, shared by the verify and status tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.cache_trees import cache_instance


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """Three healthy instances (alpha, beta, gamma) with digests recorded."""
    root = tmp_path / "cache"
    cache_instance(root, "alpha", "a" * 40, digest=True)
    cache_instance(root, "beta", "b" * 40, digest=True)
    cache_instance(root, "gamma", "c" * 40, digest=True)
    return root
