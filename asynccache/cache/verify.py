"""Checking a cache folder: every indexed tree against its record and digest; status counts."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from asynccache._fs import absolute_path
from asynccache.cache.index import write_index
from asynccache.cache.layout import CacheDir, resolve_instance_path
from asynccache.cache.parts import all_failures, cached_records, drop_from_parts
from asynccache.cache.records import IndexRecord, forget, read_digest, size_mb
from asynccache.entries import entry_from_row
from asynccache.errors import InvalidEntry, SetupError
from asynccache.tree.digest import tree_digest, tree_stats

__all__ = [
    "InstanceCheck",
    "RepoStatus",
    "StatusReport",
    "VerifyReport",
    "cache_status",
    "check_instance",
    "format_status",
    "format_verify",
    "verify_cache",
]

CheckStatus = Literal["ok", "missing", "damaged"]


# --- verify ------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceCheck:
    """The verdict on one indexed instance."""

    instance_id: str
    path: str
    status: CheckStatus
    detail: str = ""
    digest_checked: bool = False


@dataclass
class VerifyReport:
    """What verify_cache found (and repaired)."""

    cache_dir: str
    deep: bool
    checks: list[InstanceCheck] = field(default_factory=list)
    no_digest: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[InstanceCheck]:
        """Missing and damaged instances."""
        return [check for check in self.checks if check.status != "ok"]

    @property
    def ok(self) -> int:
        """How many instances passed."""
        return sum(1 for check in self.checks if check.status == "ok")

    @property
    def healthy(self) -> bool:
        """True when no instance is missing or damaged."""
        return not self.problems

    @property
    def exit_code(self) -> int:
        """0 when healthy, 1 when something was missing or damaged (repaired or not)."""
        return 0 if self.healthy else 1


def check_instance(cache_dir: Path, record: Mapping[str, Any], deep: bool = False) -> InstanceCheck:
    """Check one instance's folder against its record (and, with deep, its digest)."""
    instance_id = str(record["instance_id"])
    path = resolve_instance_path(cache_dir, record)
    if not path.is_dir():
        return InstanceCheck(instance_id, str(path), "missing", "folder is missing")
    files, size = tree_stats(path)
    problems: list[str] = []
    recorded_files = int(record["file_count"])
    if files != recorded_files:
        problems.append(f"{files} files, {recorded_files} recorded")
    if "size_bytes" in record:
        if size != int(record["size_bytes"]):
            problems.append(f"{size} bytes, {int(record['size_bytes'])} recorded")
    elif abs(size_mb(size) - float(record["size_mb"])) > 0.005:
        problems.append(f"{size_mb(size)} MiB, {record['size_mb']} recorded")
    if problems:
        return InstanceCheck(instance_id, str(path), "damaged", "; ".join(problems))
    if not deep:
        return InstanceCheck(instance_id, str(path), "ok")
    recorded = read_digest(cache_dir, instance_id)
    if recorded is None:
        return InstanceCheck(instance_id, str(path), "ok", "no digest recorded")
    if tree_digest(path) != recorded:
        return InstanceCheck(
            instance_id,
            str(path),
            "damaged",
            "content differs from the digest recorded at extraction",
            digest_checked=True,
        )
    return InstanceCheck(instance_id, str(path), "ok", digest_checked=True)


def verify_cache(
    cache_dir: str | os.PathLike[str],
    deep: bool = False,
    repair: bool = False,
    jobs: int | None = None,
) -> VerifyReport:
    """Check every indexed instance; with repair, drop the bad ones so the next run redoes them.

    The instances are index.json's and every shard's index part's. Repair takes the cache
    folder's lock (CacheLocked while a run or a shard holds it), removes the bad records from
    index.json (and the parts) atomically and deletes their .meta files; their folders are
    left for the next run to replace.
    """
    cache = CacheDir(Path(cache_dir))
    if not cache.root.is_dir():
        raise SetupError(f"cache folder {cache.root} does not exist")
    report = VerifyReport(cache_dir=str(cache.root), deep=deep)
    if repair:
        cache.lock()
    try:
        records = cached_records(cache.root)
        workers = max(1, min(jobs or (os.cpu_count() or 1), 8, len(records) or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            report.checks = list(
                pool.map(
                    lambda key: check_instance(cache.root, records[key], deep), sorted(records)
                )
            )
        report.no_digest = [
            c.instance_id for c in report.checks if c.detail == "no digest recorded"
        ]
        if repair and report.problems:
            bad = sorted({check.instance_id for check in report.problems})
            kept = {key: record for key, record in records.items() if key not in bad}
            write_index(cache.root, kept)
            drop_from_parts(cache.root, bad)
            for instance_id in bad:
                forget(cache.root, instance_id)
            report.repaired = bad
    finally:
        if repair:
            cache.unlock()
    return report


def format_verify(report: VerifyReport) -> str:
    """The report as the command line prints it."""
    lines = [
        f"{check.status.upper():8} {check.instance_id}: {check.detail}" for check in report.problems
    ]
    kind = "deep" if report.deep else "quick"
    lines.append(
        f"Verified {len(report.checks)} instances ({kind}) in {report.cache_dir}: "
        f"{report.ok} ok, {sum(1 for c in report.problems if c.status == 'damaged')} damaged, "
        f"{sum(1 for c in report.problems if c.status == 'missing')} missing"
    )
    if report.deep and report.no_digest:
        lines.append(f"no digest recorded for {len(report.no_digest)} instances (not compared)")
    if report.repaired:
        lines.append(
            f"repaired: dropped {len(report.repaired)} instances from index.json; "
            "the next caching run extracts them again"
        )
    elif report.problems:
        lines.append("run again with --repair to drop them so the next run re-extracts them")
    return "\n".join(lines)


# --- status ------------------------------------------------------------------------------


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
    per_repo: dict[str, RepoStatus] = field(default_factory=dict)
    missing_ids: list[str] = field(default_factory=list)
    failed_ids: list[str] = field(default_factory=list)


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


def _human(size: int) -> str:
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
    lines = [
        f"cache {report.cache_dir} ({scope}): {report.cached} cached ({_human(report.size_bytes)}),"
        f" {report.missing} missing, {report.failed} failed"
    ]
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
                f"{_human(counts.size_bytes):>11}"
            )
    return "\n".join(lines)
