"""Checking a cache folder: every indexed tree against its record and digest; repair."""

from __future__ import annotations

import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from asynccache.cache.index import write_index
from asynccache.cache.layout import CacheDir, resolve_instance_path
from asynccache.cache.parts import cached_records, drop_from_parts
from asynccache.cache.records import forget, read_digest, size_mb
from asynccache.cache.store import Store
from asynccache.cache.store_check import DamagedObject, check_store, linked_from
from asynccache.cache.store_layout import Inode
from asynccache.errors import SetupError
from asynccache.tree.digest import FileHash, tree_digest, tree_stats
from asynccache.tree.git_check import check_tree

__all__ = [
    "InstanceCheck",
    "ObjectCheck",
    "VerifyReport",
    "check_instance",
    "format_verify",
    "verify_cache",
]

CheckStatus = Literal["ok", "missing", "damaged"]


@dataclass(frozen=True)
class InstanceCheck:
    """The verdict on one indexed instance."""

    instance_id: str
    path: str
    status: CheckStatus
    detail: str = ""
    digest_checked: bool = False


@dataclass(frozen=True)
class ObjectCheck:
    """A store object changed in place, and every instance whose tree links it."""

    name: str
    reason: str
    shared_by: list[str]


@dataclass
class VerifyReport:
    """What verify_cache found (and repaired)."""

    cache_dir: str
    deep: bool
    checks: list[InstanceCheck] = field(default_factory=list)
    no_digest: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    #: Damaged store objects (deep only); with repair, taken out of the store.
    objects: list[ObjectCheck] = field(default_factory=list)
    objects_checked: int = 0
    repaired_objects: list[str] = field(default_factory=list)

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
        """True when no instance is missing or damaged, nor any store object."""
        return not self.problems and not self.objects

    @property
    def exit_code(self) -> int:
        """0 when healthy, 1 when something was missing or damaged (repaired or not)."""
        return 0 if self.healthy else 1


def check_instance(
    cache_dir: Path,
    record: Mapping[str, Any],
    deep: bool = False,
    by_inode: Mapping[Inode, FileHash] | None = None,
) -> InstanceCheck:
    """Check one instance's folder against its record (and, with deep, its digest).

    A tree recorded with ``"git_history": "head"`` must hold no ref or object past HEAD.
    ``by_inode``: content hashes of store objects read already, so shared files are read once.
    """
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
    if record.get("git_history") == "head":
        leaks = check_tree(path)
        if leaks:
            more = f"; and {len(leaks) - 3} more" if len(leaks) > 3 else ""
            detail = f"git history past HEAD: {'; '.join(leaks[:3])}{more}"
            return InstanceCheck(instance_id, str(path), "damaged", detail)
    if not deep:
        return InstanceCheck(instance_id, str(path), "ok")
    recorded = read_digest(cache_dir, instance_id)
    if recorded is None:
        return InstanceCheck(instance_id, str(path), "ok", "no digest recorded")
    if tree_digest(path, by_inode=by_inode) != recorded:
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
    left for the next run to replace. With deep, every store object is read once and compared
    with its name; a damaged one is reported with every instance that links it, and repair
    takes it out of the store (so no new tree links it) and drops those instances too.
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
        store = Store(cache.root)
        checked = check_store(store, max(workers, 4)) if deep and store.root.is_dir() else None
        hashes = checked.hashes if checked is not None else None
        with ThreadPoolExecutor(max_workers=workers) as pool:
            report.checks = list(
                pool.map(
                    lambda key: check_instance(cache.root, records[key], deep, hashes),
                    sorted(records),
                )
            )
        if checked is not None:
            report.objects_checked = checked.checked
            if checked.damaged:
                _find_sharers(report, checked.damaged)
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
        if repair:
            for damaged in report.objects:
                store.discard(damaged.name)
                report.repaired_objects.append(damaged.name)
    finally:
        if repair:
            cache.unlock()
    return report


def _find_sharers(report: VerifyReport, damaged: list[DamagedObject]) -> None:
    """Name the instances linking each damaged object; those that passed become damaged.

    Only trees whose digest did not match (or was not recorded) can link one.
    """
    by_inode = {item.object.inode: item for item in damaged}
    sharers: dict[Inode, list[str]] = {inode: [] for inode in by_inode}
    for number, check in enumerate(report.checks):
        if check.status == "missing" or (check.status == "ok" and check.digest_checked):
            continue
        linked = linked_from(Path(check.path), by_inode)
        for inode in sorted(linked):
            sharers[inode].append(check.instance_id)
        if linked:
            names = ", ".join(by_inode[inode].object.name for inode in sorted(linked))
            detail = f"links store objects changed in place: {names}"
            if check.detail and check.detail != "no digest recorded":
                detail = f"{check.detail}; {detail}"
            report.checks[number] = InstanceCheck(
                check.instance_id, check.path, "damaged", detail, check.digest_checked
            )
    report.objects = [
        ObjectCheck(item.object.name, item.reason, sorted(sharers[inode]))
        for inode, item in sorted(by_inode.items(), key=lambda pair: pair[1].object.name)
    ]


def format_verify(report: VerifyReport) -> str:
    """The report as the command line prints it."""
    lines = [
        f"DAMAGED  store object {item.name}: {item.reason}; linked by "
        f"{len(item.shared_by)} instances: {', '.join(item.shared_by) or '-'}"
        for item in report.objects
    ]
    lines += [
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
    if report.deep and report.objects_checked:
        lines.append(
            f"store: {report.objects_checked} objects read, {len(report.objects)} changed in place"
        )
    if report.repaired_objects:
        lines.append(
            f"repaired: took {len(report.repaired_objects)} changed objects out of the store"
        )
    if report.repaired:
        lines.append(
            f"repaired: dropped {len(report.repaired)} instances from index.json; "
            "the next caching run extracts them again"
        )
    elif report.problems or report.objects:
        lines.append("run again with --repair to drop them so the next run re-extracts them")
    return "\n".join(lines)
