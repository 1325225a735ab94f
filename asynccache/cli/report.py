"""What a run tells its caller at the end: the summary lines or one JSON object, the exit code."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from asynccache.cache.layout import CacheDir
from asynccache.cli.common import EXIT_FAILURES, EXIT_OK, EXIT_TEMPFAIL
from asynccache.dataset import SplitRows
from asynccache.pipeline import Outcome, Summary
from asynccache.shards import Shard, parse_shard


class Output:
    """Stdout for results; when its reader goes away (``| head``), later writes go nowhere."""

    def __init__(self) -> None:
        self.closed = False

    def line(self, text: str) -> bool:
        """Print one line on stdout; False once stdout is closed."""
        if self.closed:
            return False
        try:
            print(text, flush=True)
        except BrokenPipeError:
            self.close()
        return not self.closed

    def close(self) -> None:
        """Point stdout at /dev/null: Python flushes it again at exit and must not fail."""
        self.closed = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass

    def json(self, data: dict[str, Any]) -> None:
        """Print one JSON object on one line."""
        self.line(json.dumps(data, ensure_ascii=False))


def retry_later(outcome: Outcome) -> bool:
    """True when a later run may cache the entry: the cause was the run's, not the entry's."""
    return outcome.retry_later or outcome.disk_full


def exit_code(summary: Summary) -> int:
    """0 all done; 75 stopped for something a later retry can fix; 1 some entries failed."""
    if any(retry_later(outcome) for outcome in summary.failures):
        return EXIT_TEMPFAIL
    return EXIT_FAILURES if summary.failed else EXIT_OK


def dataset_line(rows: SplitRows) -> str:
    """``Dataset NAME split S at revision SHA`` (no revision for a local copy)."""
    revision = f" at revision {rows.revision}" if rows.revision else ""
    return f"Dataset {rows.dataset} split {rows.split}{revision}"


def _shard_of(summary: Summary) -> Shard | None:
    return parse_shard(summary.shard, {}) if summary.shard else None


def summary_prefix(summary: Summary) -> str:
    """What starts each line of a shard's summary (``shard 3/16: ``); "" for a whole split."""
    shard = _shard_of(summary)
    return f"{shard.label}: " if shard is not None else ""


def summary_lines(summary: Summary, split: SplitRows | None) -> list[str]:
    """The final lines of a run, each naming the shard for a shard's run (the failures
    themselves go to stderr separately)."""
    shard = _shard_of(summary)
    prefix = summary_prefix(summary)
    cache = CacheDir(Path(summary.cache_dir), shard)
    index = cache.shard_path(shard, ".json") if shard is not None else cache.index_path
    lines = [f"{prefix}note: {note}" for note in summary.notes]
    lines.append(
        f"{prefix}Done: {summary.cached} cached, {summary.skipped} skipped, {summary.failed} "
        f"failed in {summary.seconds:.1f} s; {'index part' if shard else 'index'} {index}; "
        f"{summary.cached_bytes / (1024 * 1024):.1f} MiB extracted"
    )
    if split is not None:
        lines.append(f"{prefix}{dataset_line(split)}")
    if summary.failed:
        lines.append(f"{prefix}Failure reasons: {cache.failures_path}")
    if summary.stopped:
        lines.append(
            f"{prefix}Stopped early: {summary.stopped}; rerun to finish (cached entries are kept)"
        )
    if shard is not None:
        lines.append(f"{prefix}when every shard is done: asynccache merge --cache_dir {cache.root}")
    return lines


def _source(split: SplitRows | None, shard: Shard | None) -> dict[str, Any]:
    return {
        "dataset": split.dataset if split else None,
        "split": split.split if split else None,
        "revision": split.revision if split else None,
        "shard": None if shard is None else str(shard),
    }


def summary_json(summary: Summary, split: SplitRows | None, code: int) -> dict[str, Any]:
    """The run as one JSON object: counts, bytes, seconds, source, failures, why it stopped."""
    shard = _shard_of(summary)
    cache = CacheDir(Path(summary.cache_dir), shard)
    index = cache.shard_path(shard, ".json") if shard is not None else cache.index_path
    return {
        "command": "run",
        "exit_code": code,
        **_source(split, shard),
        "cache_dir": str(cache.root),
        "index": str(index),
        "failures_file": str(cache.failures_path),
        "cached": summary.cached,
        "skipped": summary.skipped,
        "failed": summary.failed,
        "cached_bytes": summary.cached_bytes,
        "seconds": round(summary.seconds, 3),
        "stopped": summary.stopped or None,
        "retry_later": code == EXIT_TEMPFAIL,
        "failures": [
            {
                "instance_id": outcome.instance_id,
                "docker_image": outcome.docker_image,
                "reason": outcome.reason,
                "retry_later": retry_later(outcome),
            }
            for outcome in summary.failures
        ],
        "notes": list(summary.notes),
    }


def dry_run_json(
    split: SplitRows,
    cache_dir: Path,
    todo: list[tuple[str, str]],
    cached: int,
    invalid: list[str],
    *,
    shard: Shard | None = None,
) -> dict[str, Any]:
    """A dry run as one JSON object: what would be cached, what is cached, invalid rows."""
    return {
        "command": "dry_run",
        "exit_code": EXIT_OK,
        **_source(split, shard),
        "cache_dir": str(cache_dir),
        "to_cache": len(todo),
        "cached": cached,
        "invalid": len(invalid),
        "entries": [{"instance_id": iid, "docker_image": image} for iid, image in todo],
        "invalid_rows": invalid,
    }
