"""Shards' index parts: what each shard's run has cached, and the cache seen over all of them.

A shard's run never writes index.json (other shards run beside it); its IndexWriter keeps
``.shards/K-of-N.json`` instead: the shard's own records (cached now or found cached) in an
envelope saying how far the shard got. ``merge`` folds the parts into index.json; until then
readers that must see every shard's entries (RepoCache, ``status``, ``verify``) read index.json
and every part.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from asynccache._fs import write_json_atomic
from asynccache.cache.index import read_index
from asynccache.cache.layout import CacheDir, parse_shard_tag
from asynccache.cache.records import IndexRecord, read_meta_records, validate_record
from asynccache.config import FAILURES_NAME
from asynccache.errors import IndexCorrupt
from asynccache.shards import Shard

log = logging.getLogger(__name__)

#: The version of the part files' envelope.
PART_FORMAT = 1

#: running: the run has not finished (or was killed); done: every row cached; failed: the run
#: finished with failures; stopped: it stopped early (a signal, a full disk, a rate limit).
PartState = Literal["running", "done", "failed", "stopped"]
#: The states from least to most finished.
PART_STATES: tuple[str, ...] = ("running", "stopped", "failed", "done")


@dataclass
class PartProgress:
    """How far a shard's run got: the envelope its IndexWriter writes around the records."""

    shard: Shard
    rows: int | None = None
    state: PartState = "running"
    failed: int = 0
    stopped: str = ""

    def render(self, records: dict[str, IndexRecord]) -> dict[str, Any]:
        """The part file's content for ``records``."""
        return {
            "format": PART_FORMAT,
            "shard": str(self.shard),
            "state": self.state,
            "rows": self.rows,
            "cached": len(records),
            "failed": self.failed,
            "stopped": self.stopped,
            "host": socket.gethostname(),
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "records": records,
        }


@dataclass(frozen=True)
class IndexPart:
    """One shard's part as read back."""

    shard: Shard
    state: PartState
    rows: int | None
    failed: int
    stopped: str
    host: str
    updated_at: str
    records: dict[str, IndexRecord]


def parse_part(shard: Shard, text: str) -> IndexPart:
    """Parse and validate a part file's text; IndexCorrupt when it is not a part of ``shard``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise IndexCorrupt(f"not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != PART_FORMAT:
        raise IndexCorrupt(f"not an index part of format {PART_FORMAT}")
    if data.get("shard") != str(shard):
        raise IndexCorrupt(f"names shard {data.get('shard')!r}, not {shard}")
    state = data.get("state")
    if state not in PART_STATES:
        raise IndexCorrupt(f"unknown state {state!r}")
    records = data.get("records")
    if not isinstance(records, dict):
        raise IndexCorrupt("records is not an object")
    rows = data.get("rows")
    return IndexPart(
        shard=shard,
        state=state,
        rows=rows if isinstance(rows, int) else None,
        failed=int(data.get("failed") or 0),
        stopped=str(data.get("stopped") or ""),
        host=str(data.get("host") or ""),
        updated_at=str(data.get("updated_at") or ""),
        records={key: validate_record(key, value) for key, value in records.items()},
    )


def part_files(root: Path, suffix: str = ".json") -> dict[Shard, Path]:
    """Every shard's file with ``suffix`` under ``.shards/``, by shard."""
    found: dict[Shard, Path] = {}
    folder = CacheDir(root).shards_dir
    if not folder.is_dir():
        return found
    for path in folder.iterdir():
        if not path.name.endswith(suffix):
            continue
        shard = parse_shard_tag(path.name[: -len(suffix)])
        if shard is not None:
            found[shard] = path
    return dict(sorted(found.items()))


def read_parts(root: Path) -> dict[Shard, IndexPart]:
    """Every readable index part, by shard; an unreadable one is logged and left out."""
    parts: dict[Shard, IndexPart] = {}
    for shard, path in part_files(root).items():
        try:
            parts[shard] = parse_part(shard, path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, IndexCorrupt) as exc:
            log.warning("ignoring the unreadable index part %s: %s", path, exc)
    return parts


def newest(records: Iterable[IndexRecord]) -> IndexRecord:
    """Of several records of one instance, the one cached last (the first on a tie)."""
    best: IndexRecord | None = None
    for record in records:
        if best is None or str(record.get("cached_at", "")) > str(best.get("cached_at", "")):
            best = record
    if best is None:
        raise ValueError("no records")
    return best


def combine(*sources: Mapping[str, IndexRecord]) -> dict[str, IndexRecord]:
    """The records of several sources, the newest of each instance."""
    combined: dict[str, IndexRecord] = {}
    for source in sources:
        for key, record in source.items():
            known = combined.get(key)
            combined[key] = record if known is None else newest((known, record))
    return combined


def cached_records(root: Path) -> dict[str, IndexRecord]:
    """index.json with every shard's part folded in: what readers see while shards run.

    A damaged index.json raises IndexCorrupt, as read_index does.
    """
    index = read_index(CacheDir(root).index_path)
    parts = read_parts(root)
    if not parts:
        return index
    return combine(index, *(part.records for part in parts.values()))


def known_records(root: Path) -> tuple[dict[str, IndexRecord], list[str]]:
    """Every instance a cache folder holds, read without writing anything.

    index.json (a damaged one is left for ``merge`` to set aside), every part, and every
    complete folder's metadata: what a starting shard skips, and what ``merge --from`` takes.
    """
    notes: list[str] = []
    try:
        index = read_index(CacheDir(root).index_path)
    except IndexCorrupt as exc:
        notes.append(f"index.json is damaged ({exc}); `asynccache merge` will rebuild it")
        index = {}
    parts = read_parts(root)
    return combine(index, *(p.records for p in parts.values()), read_meta_records(root)), notes


def drop_from_parts(root: Path, instance_ids: Iterable[str]) -> None:
    """Remove instances from every part that lists them (``verify --repair``, no shard live)."""
    doomed = set(instance_ids)
    for shard, part in read_parts(root).items():
        if doomed & set(part.records):
            kept = {key: value for key, value in part.records.items() if key not in doomed}
            reason = f"verify --repair dropped {len(part.records) - len(kept)} damaged instances"
            progress = PartProgress(shard, part.rows, "stopped", part.failed, reason)
            write_json_atomic(CacheDir(root).shard_path(shard, ".json"), progress.render(kept))


def read_failures(path: Path) -> dict[str, Any]:
    """A failures file's entries; an absent or unreadable one has none."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def all_failures(root: Path) -> dict[str, Any]:
    """failures.json with every shard's failures: the last reason of each failed instance."""
    failures = read_failures(root / FAILURES_NAME)
    for path in part_files(root, ".failures.json").values():
        failures.update(read_failures(path))
    return failures
