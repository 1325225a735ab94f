"""Worker processes run with the collector and the allocator set for a caching run."""

from __future__ import annotations

import gc
import json
import resource
import threading
from pathlib import Path

import anyio

from asynccache.api import make_options
from asynccache.config import CacheOptions
from asynccache.sources import worker_memory
from asynccache.sources.pool import ProcessPoolSource
from asynccache.tree.options import TreeOptions

#: Rounds of eight 1 MiB buffers made and freed by one thread, as a layer's reader does.
_ROUNDS = 6


def _faults_per_round() -> list[int]:
    """Page faults of each round of buffers made and freed in a thread of this process."""
    faults: list[int] = []

    def rounds() -> None:
        for _ in range(_ROUNDS):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            held = [bytes(1 << 20) for _ in range(8)]
            del held
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    thread = threading.Thread(target=rounds)
    thread.start()
    thread.join()
    return faults


def _report(options: CacheOptions, cache_root: Path) -> TreeOptions:
    """A tree factory (run in the worker once it is set up) that writes down what it sees."""
    state = {
        "threshold": list(gc.get_threshold()),
        "frozen": gc.get_freeze_count(),
        "faults": _faults_per_round(),
    }
    (cache_root / "worker.json").write_text(json.dumps(state))
    return TreeOptions()


def _worker_state(tmp_path: Path) -> dict[str, list[int] | int]:
    options = make_options(cache_dir=tmp_path, backend="registry", processes=1, concurrency=1)

    async def start_and_stop() -> None:
        async with ProcessPoolSource(options, tmp_path, tree_factory=_report):
            pass

    anyio.run(start_and_stop)
    state: dict[str, list[int] | int] = json.loads((tmp_path / "worker.json").read_text())
    return state


def test_a_worker_collects_less_often_and_never_walks_its_set_up(tmp_path: Path) -> None:
    state = _worker_state(tmp_path)
    older = worker_memory.OLDER_GENERATIONS
    assert state["threshold"] == [worker_memory.YOUNG_GENERATION, older, older]
    assert isinstance(state["frozen"], int) and state["frozen"] > 1000  # modules, set-up
    assert list(gc.get_threshold()) != state["threshold"]  # this process is left as it was


def test_a_worker_keeps_freed_buffers_for_the_next_ones(tmp_path: Path) -> None:
    faults = _worker_state(tmp_path)["faults"]
    assert isinstance(faults, list)
    # the first rounds fault the heap in; after that its pages are reused, not given back
    # and faulted in again (glibc's default: ~1,760 faults a round of 8 MiB)
    assert max(faults[2:]) < 100, faults
