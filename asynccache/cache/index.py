"""index.json: load, validate, repair, write atomically; the writer task that owns it."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream

from asynccache._fs import write_json_atomic
from asynccache.config import INDEX_NAME, META_DIR_NAME
from asynccache.entries import validate_instance_id
from asynccache.errors import IndexCorrupt

log = logging.getLogger(__name__)

IndexRecord = dict[str, Any]

REQUIRED_FIELDS = (
    "instance_id",
    "repo_name",
    "docker_image",
    "commit_hash",
    "cache_path",
    "file_count",
    "size_mb",
)


def size_mb(size_bytes: int) -> float:
    """Bytes as MiB, rounded to two decimals as the original index shows them."""
    return round(size_bytes / (1024 * 1024), 2)


def validate_record(key: str, record: Any) -> IndexRecord:
    """Return ``record`` when it is a complete index record for ``key``, else raise IndexCorrupt."""
    try:
        validate_instance_id(key)
    except ValueError as exc:
        raise IndexCorrupt(f"record key: {exc}") from None
    if not isinstance(record, dict):
        raise IndexCorrupt(f"record {key!r} is not an object")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise IndexCorrupt(f"record {key!r} lacks {', '.join(missing)}")
    if record["instance_id"] != key:
        raise IndexCorrupt(f"record {key!r} has instance_id {record['instance_id']!r}")
    return record


def parse_index(text: str) -> dict[str, IndexRecord]:
    """Parse and validate the text of an index.json."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise IndexCorrupt(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise IndexCorrupt(f"expected a JSON object, found {type(data).__name__}")
    return {key: validate_record(key, value) for key, value in data.items()}


def read_index(path: Path) -> dict[str, IndexRecord]:
    """Read index.json; an absent file is an empty index; a damaged one raises IndexCorrupt."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError as exc:
        raise IndexCorrupt(f"not UTF-8: {exc}") from None
    return parse_index(text)


def meta_path(cache_dir: Path, instance_id: str) -> Path:
    """Where the metadata of one cached folder lives (beside it, never inside it)."""
    return cache_dir / META_DIR_NAME / f"{instance_id}.json"


def write_meta(cache_dir: Path, record: IndexRecord) -> None:
    """Persist one record beside its folder, before the folder gets its final name."""
    path = meta_path(cache_dir, record["instance_id"])
    path.parent.mkdir(exist_ok=True)
    write_json_atomic(path, record)


def read_meta_records(cache_dir: Path) -> dict[str, IndexRecord]:
    """Records of every complete folder that has valid metadata."""
    records: dict[str, IndexRecord] = {}
    meta_dir = cache_dir / META_DIR_NAME
    if not meta_dir.is_dir():
        return records
    for path in meta_dir.glob("*.json"):
        instance_id = path.stem
        try:
            record = validate_record(instance_id, json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, IndexCorrupt) as exc:
            log.warning("ignoring unreadable metadata %s: %s", path, exc)
            continue
        if (cache_dir / instance_id).is_dir():
            records[instance_id] = record
    return records


def load_and_repair(cache_dir: Path) -> tuple[dict[str, IndexRecord], list[str]]:
    """Load the index, set aside a damaged one, and fold in complete folders it misses.

    Returns the records and a list of human-readable notes on what was repaired.
    """
    path = cache_dir / INDEX_NAME
    notes: list[str] = []
    for stale in [
        *cache_dir.glob(f".{INDEX_NAME}.*.tmp"),
        *cache_dir.glob(f"{META_DIR_NAME}/.*.tmp"),
    ]:
        stale.unlink(missing_ok=True)
    try:
        records = read_index(path)
    except IndexCorrupt as exc:
        aside = path.with_name(f"{INDEX_NAME}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}")
        os.replace(path, aside)
        notes.append(f"index.json was damaged ({exc}); kept it as {aside.name} and rebuilt it")
        records = {}
    recovered = {
        key: record for key, record in read_meta_records(cache_dir).items() if key not in records
    }
    if recovered:
        notes.append(f"recovered {len(recovered)} cached folders missing from index.json")
        records.update(recovered)
    if notes:
        write_json_atomic(path, records)
    return records, notes


def write_index(cache_dir: Path, records: Mapping[str, IndexRecord]) -> int:
    """Replace index.json whole, atomically (``merge``); return the bytes written."""
    return write_json_atomic(cache_dir / INDEX_NAME, dict(records))


class IndexWriter:
    """The one task that writes index.json: coalesces records, rewrites atomically.

    A shard's run points it at the shard's index part instead (``path``), and ``render``
    wraps the records in what the file holds besides them.
    """

    def __init__(
        self,
        cache_dir: Path,
        records: Mapping[str, IndexRecord],
        *,
        min_interval: float = 0.5,
        path: Path | None = None,
        render: Callable[[dict[str, IndexRecord]], object] | None = None,
    ) -> None:
        self.path = path or cache_dir / INDEX_NAME
        self.render = render
        self.records: dict[str, IndexRecord] = dict(records)
        self.min_interval = min_interval
        self.writes = 0
        self.bytes_written = 0
        self._pending = 0
        self._last_write = 0.0

    def interval(self) -> float:
        """Seconds between rewrites; grows with the index so total bytes stay linear."""
        return max(self.min_interval, len(self.records) / 1000)

    async def run(self, receive: ObjectReceiveStream[IndexRecord]) -> None:
        """Consume records until the stream closes, then write a final index."""
        try:
            async with receive:
                async for record in receive:
                    self.add(record)
                    wait = self._last_write + self.interval() - time.monotonic()
                    if wait > 0:
                        with anyio.move_on_after(wait):
                            async for more in receive:
                                self.add(more)
                    await self.flush()
        finally:
            with anyio.CancelScope(shield=True):
                await self.flush()

    def add(self, record: IndexRecord) -> None:
        """Record one cached entry (written at the next flush)."""
        self.records[record["instance_id"]] = record
        self._pending += 1

    async def flush(self, *, force: bool = False) -> None:
        """Write the file now if anything is pending (or anyway, with ``force``)."""
        if not self._pending and not force:
            return
        self._pending = 0
        snapshot: object = dict(self.records)
        if self.render is not None:
            snapshot = self.render(dict(self.records))
        self.bytes_written += await anyio.to_thread.run_sync(write_json_atomic, self.path, snapshot)
        self.writes += 1
        self._last_write = time.monotonic()
