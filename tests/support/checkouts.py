"""What checkout tests share: the modes this process can use, and a sample cached tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from asynccache.trainer.checkout import overlay_probe
from tests.support.cache_trees import build_sample_tree

#: True when this process may mount overlays (root, or a user namespace that allows it).
OVERLAY_OK = overlay_probe().available

#: Both checkout modes, overlay skipped where this process may not mount one.
MODES = [
    pytest.param(
        "overlay",
        marks=pytest.mark.skipif(not OVERLAY_OK, reason="this process may not mount overlays"),
    ),
    "copy",
]


def sample_cached_tree(tmp_path: Path) -> Path:
    """A cached tree with every shape a /testbed has."""
    tree = tmp_path / "cache" / "sample__0123456789ab"
    build_sample_tree(tree)
    return tree
