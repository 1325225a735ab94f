"""Worker processes run with the collector set for a caching run."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import anyio

from asynccache import _collector
from asynccache.api import make_options
from asynccache.config import CacheOptions
from asynccache.sources.pool import ProcessPoolSource
from asynccache.tree.options import TreeOptions


def _report_collector(options: CacheOptions, cache_root: Path) -> TreeOptions:
    """A tree factory (run in the worker) that writes down the worker's collector setting."""
    state = {"threshold": list(gc.get_threshold()), "frozen": gc.get_freeze_count()}
    (cache_root / "collector.json").write_text(json.dumps(state))
    return TreeOptions()


def test_a_worker_process_collects_less_often_and_never_walks_its_set_up(
    tmp_path: Path,
) -> None:
    options = make_options(cache_dir=tmp_path, backend="registry", processes=1, concurrency=1)

    async def start_and_stop() -> None:
        async with ProcessPoolSource(options, tmp_path, tree_factory=_report_collector):
            pass

    anyio.run(start_and_stop)
    state = json.loads((tmp_path / "collector.json").read_text())
    older = _collector.OLDER_GENERATIONS
    assert state["threshold"] == [_collector.YOUNG_GENERATION, older, older]
    assert state["frozen"] > 1000  # the modules and the set-up, never walked again
    assert gc.get_threshold() != tuple(state["threshold"])  # this process is left as it was
