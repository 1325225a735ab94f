"""Fixtures of the trainer tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.checkouts import sample_cached_tree


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A cached tree with every shape a /testbed has."""
    return sample_cached_tree(tmp_path)
