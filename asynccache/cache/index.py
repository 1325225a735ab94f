"""index.json: load, validate, repair; the only code that writes it (and shards' parts)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import anyio
from anyio.abc import ObjectReceiveStream

from asynccache import config
from asynccache._fs import write_json_atomic
from asynccache.cache.records import IndexRecord, read_meta_records, validate_record
from asynccache.config import INDEX_NAME, META_DIR_NAME
from asynccache.errors import IndexCorrupt

__all__ = [
    "IndexWriter",
    "load_and_repair",
    "parse_index",
    "read_index",
    "update_index",
    "write_index",
]


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
        write_index(cache_dir, records)
    return records, notes


def update_index(cache_dir: Path, put: Iterable[IndexRecord]) -> dict[str, IndexRecord]:
    """Read index.json, add the records ``put``, write it back; return the new records.

    For whoever is alone on the cache folder; a run's records go through its IndexWriter.
    """
    records = read_index(cache_dir / INDEX_NAME)
    for record in put:
        records[record["instance_id"]] = record
    write_index(cache_dir, records)
    return records


def write_index(cache_dir: Path, records: Mapping[str, IndexRecord]) -> int:
    """Replace index.json whole, atomically (temp file, fsync, rename); return the bytes.

    The one write of index.json: loading with repair, ``update_index``, ``merge`` and the
    IndexWriter of a run of the whole split all come here.
    """
    return write_json_atomic(cache_dir / INDEX_NAME, dict(records))


class IndexWriter:
    """A run's writer of index.json: coalesces records, rewrites atomically.

    ``run`` is the task that consumes a run's records; ``put`` writes one record at once (for
    entries cached on demand, outside a run). Writes never overlap, and each one holds every
    record added before it. A shard's run points it at the shard's index part instead
    (``path``), and ``render`` wraps the records in what the file holds besides them.
    """

    def __init__(
        self,
        cache_dir: Path,
        records: Mapping[str, IndexRecord],
        *,
        min_interval: float = config.index_min_interval,
        path: Path | None = None,
        render: Callable[[dict[str, IndexRecord]], object] | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        self._part = path
        self.path = path or cache_dir / INDEX_NAME
        self.render = render
        self.records: dict[str, IndexRecord] = dict(records)
        self.min_interval = min_interval
        self.writes = 0
        self.bytes_written = 0
        self._pending = 0
        self._last_write = 0.0
        self._lock = anyio.Lock()

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

    async def put(self, record: IndexRecord) -> None:
        """Record one cached entry and write the file now."""
        self.add(record)
        await self.flush()

    async def flush(self, *, force: bool = False) -> None:
        """Write the file now if anything is pending (or anyway, with ``force``)."""
        async with self._lock:
            if not self._pending and not force:
                return
            self._pending = 0
            records = dict(self.records)
            if self._part is None:
                written = await anyio.to_thread.run_sync(write_index, self.cache_dir, records)
            else:
                content = records if self.render is None else self.render(records)
                written = await anyio.to_thread.run_sync(write_json_atomic, self._part, content)
            self.bytes_written += written
            self.writes += 1
            self._last_write = time.monotonic()
