"""Moving a cache folder to a training node: asynccache export|import against tar and rsync.

Two cache folders of the same bench images are made first (not timed): ``dedup`` (asynccache's
default) and ``plain`` (``--no_dedup``; while deduplication does not exist, the default cache
is plain and serves as both). Then, each on the same tmpfs (the network and the disk left out:
what is measured is the format and the CPU), every method copies one of them into a new folder:

* ``export|import``: ``asynccache export --cache_dir DEDUP | asynccache import --cache_dir NEW``
  (when the code under test has both subcommands);
* ``tar czf|tar xzf``: ``tar czf - -C PLAIN . | tar xzf - -C NEW``, the original walkthrough's
  transfer, of the cache made without deduplication;
* ``rsync -a``: ``rsync -a PLAIN/ NEW/``, the walkthrough's other transfer;
* ``rsync -aH``: ``rsync -aH DEDUP/ NEW/`` (keeps the hard links), when the two caches differ.

``.layers/`` (the registry backend's blob cache) is left out everywhere, as the README says to.
Recorded per method: wall seconds, bytes through the pipe (the stream), CPU seconds of both
ends, and the new folder's logical and physical size (bench_trees.cache_usage).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts import bench_trees as bt  # noqa: E402

MIB = 1024 * 1024
CHUNK = 1 << 20


def transfer_methods(
    dedup: Path, plain: Path, dest: Path, has_export: bool, python: str = sys.executable
) -> dict[str, tuple[list[str], list[str] | None]]:
    """method -> (producer command, consumer command or None for a single command)."""
    methods: dict[str, tuple[list[str], list[str] | None]] = {}
    if has_export:
        methods["export|import"] = (
            [python, "-m", "asynccache", "export", "--cache_dir", str(dedup)],
            [python, "-m", "asynccache", "import", "--cache_dir", str(dest)],
        )
    methods["tar czf|tar xzf"] = (
        ["tar", "czf", "-", "--exclude=./.layers", "-C", str(plain), "."],
        ["tar", "xzf", "-", "-C", str(dest)],
    )
    methods["rsync -a"] = (["rsync", "-a", "--exclude=/.layers", f"{plain}/", f"{dest}/"], None)
    if dedup != plain:
        methods["rsync -aH"] = (
            ["rsync", "-aH", "--exclude=/.layers", f"{dedup}/", f"{dest}/"],
            None,
        )
    return methods


def _cpu(usage: Any) -> float:
    return float(usage.ru_utime + usage.ru_stime)


def run_method(
    producer: Sequence[str],
    consumer: Sequence[str] | None,
    dest: Path,
    env: dict[str, str],
    log: Path,
) -> dict[str, Any]:
    """Run one transfer into dest (created empty first); measure it."""
    dest.mkdir(parents=True)
    started = time.perf_counter()
    streamed: int | None = None
    with open(log, "ab") as err:
        if consumer is None:
            proc = subprocess.Popen(producer, stdout=err, stderr=err, env=env)
            _, status, usage = os.wait4(proc.pid, 0)
            codes = [os.waitstatus_to_exitcode(status)]
            cpu = _cpu(usage)
        else:
            # relayed through this process, so that the stream's bytes are counted
            first = subprocess.Popen(producer, stdout=subprocess.PIPE, stderr=err, env=env)
            second = subprocess.Popen(consumer, stdin=subprocess.PIPE, stderr=err, env=env)
            assert first.stdout is not None and second.stdin is not None
            streamed = 0
            try:
                while chunk := first.stdout.read1(CHUNK):
                    streamed += len(chunk)
                    second.stdin.write(chunk)
            except BrokenPipeError:
                pass
            finally:
                first.stdout.close()
                with contextlib.suppress(BrokenPipeError):
                    second.stdin.close()
            _, status_one, usage_one = os.wait4(first.pid, 0)
            _, status_two, usage_two = os.wait4(second.pid, 0)
            codes = [os.waitstatus_to_exitcode(status_one), os.waitstatus_to_exitcode(status_two)]
            cpu = _cpu(usage_one) + _cpu(usage_two)
    wall = time.perf_counter() - started
    usage_counts = bt.cache_usage(dest)
    return {
        "wall_s": wall,
        "cpu_s": cpu,
        "stream_mib": streamed / MIB if streamed is not None else None,
        "exit_codes": codes,
        "ok": all(code == 0 for code in codes),
        "tree_count": len(bt.instance_folders(dest)),
        "logical_mib": usage_counts["logical_bytes"] / MIB,
        "logical_files": usage_counts["logical_files"],
        "physical_mib": usage_counts["physical_bytes"] / MIB,
        "files_created": usage_counts["files_created"],
    }
