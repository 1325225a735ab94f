"""``merge``: one index.json from every shard's part, and how far each shard got.

Safe while shards still run: merge holds the folder's lock shared (as shards do), so it never
meets a run of the whole split; it reads parts each shard replaced atomically and replaces
index.json atomically; merges take turns. Running it again writes nothing unless a shard has
progressed meanwhile. Folders of shards that ran on other disks come in first (gather.py).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from asynccache._fs import write_json_atomic
from asynccache.cache.gather import gather
from asynccache.cache.index import read_index, write_index
from asynccache.cache.layout import CacheDir, resolve_instance_path
from asynccache.cache.parts import combine, part_files, read_failures, read_parts
from asynccache.cache.records import IndexRecord, read_meta_records
from asynccache.config import INDEX_NAME
from asynccache.errors import IndexCorrupt, SetupError
from asynccache.shards import Shard

#: done: every row cached; failed: finished with failures; stopped: stopped early;
#: running: its run is live; interrupted: its run died; missing: never started here.
ShardVerdict = Literal["done", "failed", "stopped", "running", "interrupted", "missing"]


@dataclass(frozen=True)
class ShardState:
    """How far one shard got, as merge found it."""

    shard: str
    state: ShardVerdict
    rows: int | None = None
    cached: int = 0
    failed: int = 0
    detail: str = ""


@dataclass
class MergeReport:
    """What merge wrote and found."""

    cache_dir: str
    records: int = 0
    added: int = 0
    dropped: list[str] = field(default_factory=list)
    failures: int = 0
    shards: list[ShardState] = field(default_factory=list)
    gathered: int = 0
    present: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def incomplete(self) -> list[ShardState]:
        """Shards that are not done (missing, running, failed, stopped, interrupted)."""
        return [state for state in self.shards if state.state != "done"]

    @property
    def exit_code(self) -> int:
        """0 when every shard is done and everything gathered; 1 otherwise (index written)."""
        return 1 if self.incomplete or self.problems else 0


def merge_cache(
    cache_dir: str | os.PathLike[str], sources: Sequence[str | os.PathLike[str]] = ()
) -> MergeReport:
    """Gather ``sources`` (cache folders of other disks), then write index.json from every part."""
    cache = CacheDir(Path(cache_dir))
    if sources:
        cache.check_usable()
    elif not cache.root.is_dir():
        raise SetupError(f"cache folder {cache.root} does not exist")
    report = MergeReport(cache_dir=str(cache.root))
    cache.lock(shared=True)
    try:
        with _merge_turn(cache):
            for source in sources:
                gathered = gather(Path(source), cache)
                report.gathered += gathered.moved + gathered.copied
                report.present += gathered.present
                report.problems += gathered.problems
            _merge_index(cache, report)
            _merge_failures(cache, report)
            report.shards = shard_states(cache)
    finally:
        cache.unlock()
    return report


@contextmanager
def _merge_turn(cache: CacheDir) -> Iterator[None]:
    """One merge at a time in a folder (a second one waits its turn)."""
    cache.make_shards_dir()
    with open(cache.shards_dir / "merge.lock", "a+", encoding="utf-8") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def _merge_index(cache: CacheDir, report: MergeReport) -> None:
    try:
        index = read_index(cache.index_path)
    except IndexCorrupt as exc:
        aside = cache.index_path.with_name(f"{INDEX_NAME}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        shutil.copyfile(cache.index_path, aside)
        report.notes.append(f"index.json was damaged ({exc}); kept it as {aside.name}")
        index = {}
    parts = read_parts(cache.root)
    merged = combine(index, *(p.records for p in parts.values()), read_meta_records(cache.root))
    kept: dict[str, IndexRecord] = {}
    for key in sorted(merged):
        if resolve_instance_path(cache.root, merged[key]).is_dir():
            kept[key] = merged[key]
        elif key in index:
            report.dropped.append(key)
    report.records = len(kept)
    report.added = len(set(kept) - set(index))
    if kept != index or not cache.index_path.exists():
        write_index(cache.root, kept)


def _merge_failures(cache: CacheDir, report: MergeReport) -> None:
    """failures.json: every shard's failures that are still not cached."""
    files = part_files(cache.root, ".failures.json")
    if not files:
        return
    records = read_index(cache.index_path)
    failures: dict[str, object] = {}
    for path in files.values():
        failures.update(read_failures(path))
    failures = {key: value for key, value in sorted(failures.items()) if key not in records}
    report.failures = len(failures)
    if failures != read_failures(cache.failures_path) or not cache.failures_path.exists():
        write_json_atomic(cache.failures_path, failures)


def shard_states(cache: CacheDir) -> list[ShardState]:
    """Every shard of every shard count seen in the folder, with how far it got."""
    parts = read_parts(cache.root)
    seen: set[Shard] = set(parts) | set(part_files(cache.root, ".lock"))
    states: list[ShardState] = []
    for count in sorted({shard.count for shard in seen}):
        for index in range(count):
            shard = Shard(index, count)
            part = parts.get(shard)
            running = cache.shard_running(shard)
            if part is None:
                # A lock file without a part: the run died before writing anything.
                started = cache.shard_path(shard, ".lock").exists()
                verdict: ShardVerdict = (
                    "running" if running else "interrupted" if started else "missing"
                )
                states.append(ShardState(str(shard), verdict))
                continue
            verdict = "running" if running else part.state
            if verdict == "running" and not running:
                verdict = "interrupted"
            detail = part.stopped or (f"on {part.host}" if part.host else "")
            states.append(
                ShardState(str(shard), verdict, part.rows, len(part.records), part.failed, detail)
            )
    return states


def format_merge(report: MergeReport) -> str:
    """The report as the command line prints it."""
    lines = [f"note: {note}" for note in report.notes]
    lines += [f"PROBLEM {problem}" for problem in report.problems]
    if report.gathered or report.present:
        lines.append(f"gathered {report.gathered} instances ({report.present} were already here)")
    for state in report.incomplete:
        counts = "" if state.rows is None else f": {state.cached}/{state.rows} cached"
        failed = f", {state.failed} failed" if state.failed else ""
        detail = f" ({state.detail})" if state.detail and state.state != "done" else ""
        lines.append(f"shard {state.shard} {state.state}{counts}{failed}{detail}")
    done = sum(1 for state in report.shards if state.state == "done")
    shards = f"; shards: {done}/{len(report.shards)} done" if report.shards else ""
    dropped = f", {len(report.dropped)} dropped (folder gone)" if report.dropped else ""
    lines.append(
        f"Merged {report.records} instances into {Path(report.cache_dir) / INDEX_NAME} "
        f"({report.added} new{dropped}), {report.failures} failures{shards}"
    )
    if report.incomplete:
        lines.append("rerun the shards that are not done, then merge again")
    return "\n".join(lines)
