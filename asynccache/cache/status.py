"""Status of a cache folder: cached, missing and failed instances, in all and per repository."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asynccache._fs import absolute_path
from asynccache.cache.layout import resolve_instance_path
from asynccache.cache.parts import all_failures, cached_records
from asynccache.cache.records import IndexRecord, record_exclude
from asynccache.cache.store import Store
from asynccache.cache.store_check import StoreUsage, store_usage
from asynccache.entries import entry_from_row
from asynccache.errors import InvalidEntry, SetupError

__all__ = ["RepoStatus", "StatusReport", "cache_status", "format_status", "human_bytes"]


@dataclass
class RepoStatus:
    """Counts of one repository."""

    cached: int = 0
    missing: int = 0
    failed: int = 0
    size_bytes: int = 0


@dataclass
class StatusReport:
    """Cached, missing and failed instances of a cache (against a split when rows are given)."""

    cache_dir: str
    rows_given: bool = False
    cached: int = 0
    missing: int = 0
    failed: int = 0
    size_bytes: int = 0
    invalid_rows: int = 0
    not_in_rows: int = 0
    #: Cached instances whose .git keeps the image's whole history (--keep_git_history, or
    #: cached before the guard existed): it can reach the fix.
    full_history: int = 0
    per_repo: dict[str, RepoStatus] = field(default_factory=dict)
    missing_ids: list[str] = field(default_factory=list)
    failed_ids: list[str] = field(default_factory=list)
    #: The whole folder: bytes of every cached tree as files (logical), and on disk with each
    #: stored object counted once (physical: store objects plus trees cached without dedup).
    logical_bytes: int = 0
    physical_bytes: int = 0
    store: StoreUsage = field(default_factory=StoreUsage)
    #: How many cached trees left paths out, by their --exclude patterns.
    excluded: dict[str, int] = field(default_factory=dict)


def _record_size(record: IndexRecord) -> int:
    if "size_bytes" in record:
        return int(record["size_bytes"])
    return int(float(record.get("size_mb", 0)) * 1024 * 1024)


def cache_status(
    cache_dir: str | os.PathLike[str], rows: Iterable[Mapping[str, Any]] | None = None
) -> StatusReport:
    """Count cached/missing/failed instances, total size and per repo.

    Without rows: every indexed or failed instance (missing = indexed, folder gone). With
    dataset rows: every row's instance (missing = neither cached nor failed yet).
    """
    root = absolute_path(cache_dir)
    if not root.is_dir():
        raise SetupError(f"cache folder {root} does not exist")
    records = cached_records(root)
    failures = all_failures(root)
    report = StatusReport(cache_dir=str(root), rows_given=rows is not None)
    repos: dict[str, str] = {}
    if rows is None:
        wanted = sorted(set(records) | set(failures))
    else:
        wanted = []
        for number, row in enumerate(rows, start=1):
            try:
                entry = entry_from_row(row, number)
            except InvalidEntry:
                report.invalid_rows += 1
                continue
            if entry.instance_id not in repos:
                repos[entry.instance_id] = entry.repo_name
                wanted.append(entry.instance_id)
        report.not_in_rows = len(set(records) - set(repos))
    _disk_usage(root, records, report)
    for instance_id in wanted:
        record = records.get(instance_id)
        repo = repos.get(instance_id) or (
            str(record["repo_name"]) if record else instance_id.rsplit("__", 1)[0]
        )
        counts = report.per_repo.setdefault(repo, RepoStatus())
        if record is not None and resolve_instance_path(root, record).is_dir():
            size = _record_size(record)
            report.cached += 1
            report.size_bytes += size
            if record.get("git_history") != "head":
                report.full_history += 1
            counts.cached += 1
            counts.size_bytes += size
        elif instance_id in failures:
            report.failed += 1
            counts.failed += 1
            report.failed_ids.append(instance_id)
        else:
            report.missing += 1
            counts.missing += 1
            report.missing_ids.append(instance_id)
    return report


def _disk_usage(root: Path, records: Mapping[str, IndexRecord], report: StatusReport) -> None:
    """Fill the logical and physical bytes of every cached tree present, and the store's."""
    unshared = 0
    for record in records.values():
        if not resolve_instance_path(root, record).is_dir():
            continue
        size = _record_size(record)
        report.logical_bytes += size
        if not record.get("dedup"):
            unshared += size
        patterns = record_exclude(record)
        if patterns:
            key = " ".join(patterns)
            report.excluded[key] = report.excluded.get(key, 0) + 1
    report.store = store_usage(Store(root))
    report.physical_bytes = report.store.bytes + unshared


def human_bytes(size: int) -> str:
    """A byte count as people read it: 512 B, 1.5 KiB, 2.0 GiB."""
    if size < 1024:
        return f"{size} B"
    value, unit = size / 1024, "KiB"
    for bigger in ("MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{value:.1f} {unit}"


def format_status(report: StatusReport) -> str:
    """The status as the command line prints it: totals, then one line per repository."""
    scope = "of the split" if report.rows_given else "indexed or failed"
    size = human_bytes(report.size_bytes)
    lines = [
        f"cache {report.cache_dir} ({scope}): {report.cached} cached ({size}),"
        f" {report.missing} missing, {report.failed} failed"
    ]
    if report.cached:
        lines.append(
            f"git history: {report.cached - report.full_history} up to HEAD only, "
            f"{report.full_history} full (as the image has it: may reach the fix)"
        )
    physical, logical = human_bytes(report.physical_bytes), human_bytes(report.logical_bytes)
    lines.append(
        f"on disk: {physical} physical for {logical} logical (every cached tree; store "
        f"{report.store.objects} objects, {human_bytes(report.store.bytes)})"
    )
    if report.store.unlinked_objects:
        lines.append(
            f"{report.store.unlinked_objects} stored objects "
            f"({human_bytes(report.store.unlinked_bytes)}) are linked by no tree; "
            "`asynccache gc` frees them"
        )
    for patterns, count in sorted(report.excluded.items()):
        lines.append(f"{count} trees cached with --exclude {patterns}")
    if report.invalid_rows:
        lines.append(f"{report.invalid_rows} invalid rows skipped")
    if report.not_in_rows:
        lines.append(f"{report.not_in_rows} cached instances are not in the split")
    if report.per_repo:
        width = max(len("repo"), *(len(name) for name in report.per_repo))
        lines.append(f"{'repo':<{width}}  {'cached':>7} {'missing':>7} {'failed':>7} {'size':>11}")
        for name in sorted(report.per_repo):
            counts = report.per_repo[name]
            lines.append(
                f"{name:<{width}}  {counts.cached:>7} {counts.missing:>7} {counts.failed:>7} "
                f"{human_bytes(counts.size_bytes):>11}"
            )
    return "\n".join(lines)
