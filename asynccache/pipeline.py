"""Wires producer, workers, collector and the index writer; retries; per-entry outcomes."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import stamina
from anyio.abc import ObjectReceiveStream, ObjectSendStream, TaskGroup

from asynccache import config
from asynccache.cache.index import IndexWriter
from asynccache.cache.layout import CacheDir
from asynccache.cache.parts import PartProgress
from asynccache.cache.publish import Publisher
from asynccache.cache.records import IndexRecord, record_exclude
from asynccache.cache.store import Store
from asynccache.config import CacheOptions
from asynccache.entries import Entry, InstanceIdFn, entry_from_row, make_instance_id
from asynccache.errors import CacheError, DaemonInterrupted, DiskFull, InvalidEntry
from asynccache.shards import Shard, shard_positions
from asynccache.sources.base import Source

log = logging.getLogger(__name__)

#: Times one entry may start again because its source went away mid-way (each needs an outage
#: the source confirmed and waited out); beyond that the entry fails.
MAX_RESTARTS = 10

Status = Literal["cached", "skipped", "failed"]


@dataclass(frozen=True)
class Outcome:
    """What happened to one entry."""

    instance_id: str
    status: Status
    docker_image: str = ""
    reason: str = ""
    record: IndexRecord | None = None
    seconds: float = 0.0
    warnings: tuple[str, ...] = ()
    disk_full: bool = False
    #: The run's conditions failed it (see CacheError.retry_later): a later run may cache it.
    retry_later: bool = False


@dataclass
class Summary:
    """Totals of a run and every entry's outcome."""

    cache_dir: str
    #: The shard this run cached (``3/16``), or "" for the whole split.
    shard: str = ""
    cached: int = 0
    skipped: int = 0
    failed: int = 0
    cached_bytes: int = 0
    seconds: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Why the run stopped before the end of its entries ("" when it did not).
    stopped: str = ""

    def add(self, outcome: Outcome) -> None:
        """Count one outcome."""
        self.outcomes.append(outcome)
        if outcome.status == "cached":
            self.cached += 1
            if outcome.record:
                self.cached_bytes += int(outcome.record.get("size_bytes", 0))
        elif outcome.status == "skipped":
            self.skipped += 1
        else:
            self.failed += 1

    @property
    def failures(self) -> list[Outcome]:
        """The failed outcomes."""
        return [o for o in self.outcomes if o.status == "failed"]


OutcomeCallback = Callable[[Outcome], Awaitable[None] | None]
RowSource = AsyncIterable[Mapping[str, Any] | Entry] | Iterable[Mapping[str, Any] | Entry]


def is_transient(exc: Exception) -> bool:
    """Retry only errors that say a later try may succeed."""
    return isinstance(exc, CacheError) and exc.transient


async def _aiter(rows: RowSource) -> AsyncIterator[Mapping[str, Any] | Entry]:
    if isinstance(rows, AsyncIterable):
        async for row in rows:
            yield row
    else:
        for row in rows:
            yield row


def repository_of(row: Mapping[str, Any] | Entry) -> str:
    """The repository a row belongs to, for the shard partition ("" when it has none)."""
    if isinstance(row, Entry):
        return row.repo_name
    value = row.get("repo_name")
    return value.strip() if isinstance(value, str) else ""


async def numbered_rows(
    rows: RowSource,
    shard: Shard | None = None,
    on_share: Callable[[int], None] | None = None,
) -> AsyncIterator[tuple[int, Mapping[str, Any] | Entry]]:
    """The rows with their row numbers (from 1): all of them, or ``shard``'s share.

    A shard reads every row first, since the partition depends on all of them, and tells
    ``on_share`` how many rows it has.
    """
    if shard is None:
        row_number = 0
        async for row in _aiter(rows):
            row_number += 1
            yield row_number, row
        return
    everything = [row async for row in _aiter(rows)]
    positions = shard_positions([repository_of(row) for row in everything], shard)
    if on_share is not None:
        on_share(len(positions))
    for position in positions:
        yield position + 1, everything[position]


class Pipeline:
    """Caching runs over a locked cache folder: producer, workers, collector, retries."""

    def __init__(
        self,
        options: CacheOptions,
        source: Source,
        cache: CacheDir,
        records: Mapping[str, IndexRecord],
        *,
        notes: Iterable[str] = (),
        instance_id_fn: InstanceIdFn = make_instance_id,
        on_outcome: OutcomeCallback | None = None,
        index_min_interval: float = config.index_min_interval,
        store: Store | None = None,
    ) -> None:
        """A run over ``cache``, whose lock the caller holds, with ``records`` its index."""
        self.options = options
        self.source = source
        self.instance_id_fn = instance_id_fn
        self.on_outcome = on_outcome
        self.cache = cache
        shard = cache.shard
        self.summary = Summary(
            cache_dir=str(cache.root), shard=str(shard) if shard else "", notes=list(notes)
        )
        #: A shard's run keeps its own index part (index.json is for ``merge``).
        self.part = PartProgress(shard) if shard is not None else None
        self.index_min_interval = index_min_interval
        self.records: dict[str, IndexRecord] = dict(records)
        self.index = self._index_writer()
        self.publisher = Publisher(
            cache,
            options.record_fields(),
            store=store,
        )
        self._scope: anyio.CancelScope | None = None
        self._releases: TaskGroup | None = None
        self._intake_open = True
        self._extract_slots = anyio.Semaphore(max(1, options.extract_slots))

    def is_cached(self, entry: Entry) -> bool:
        """True when the entry is in the index, as this run would cache it, and on disk."""
        record = self.records.get(entry.instance_id)
        return (
            record is not None
            and record_exclude(record) == list(self.options.exclude)
            and self.cache.instance_path(entry.instance_id).is_dir()
        )

    async def run(self, rows: RowSource) -> Summary:
        """Cache every row; return the summary (failures are outcomes, not exceptions)."""
        started = time.monotonic()
        jobs_send, jobs_receive = anyio.create_memory_object_stream[Entry](
            max(1, self.options.concurrency)
        )
        results_send, results_receive = anyio.create_memory_object_stream[Outcome](
            max(1, self.options.concurrency)
        )
        index_send, index_receive = anyio.create_memory_object_stream[IndexRecord](100)
        if self.part is not None:
            await self.index.flush(force=True)
        try:
            async with anyio.create_task_group() as releases, anyio.create_task_group() as tg:
                self._releases = releases
                self._scope = tg.cancel_scope
                if self.summary.stopped:
                    tg.cancel_scope.cancel()
                tg.start_soon(self.index.run, index_receive)
                tg.start_soon(self._collect, results_receive, index_send)
                async with jobs_receive, results_send:
                    for _ in range(max(1, self.options.concurrency)):
                        tg.start_soon(self._worker, jobs_receive.clone(), results_send.clone())
                    tg.start_soon(self._produce, rows, jobs_send, results_send.clone())
        finally:
            self._releases = None
            self.summary.seconds = time.monotonic() - started
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(self._write_failures)
        if self.part is not None:
            # Written last: a part says "done" only once the shard's failures are on disk.
            self.part.failed = self.summary.failed
            self.part.stopped = self.summary.stopped
            self.part.state = (
                "stopped" if self.summary.stopped else "failed" if self.summary.failed else "done"
            )
            with anyio.CancelScope(shield=True):
                await self.index.flush(force=True)
        return self.summary

    def _index_writer(self) -> IndexWriter:
        if self.part is None:
            return IndexWriter(self.cache.root, self.records, min_interval=self.index_min_interval)
        assert self.cache.shard is not None
        return IndexWriter(
            self.cache.root,
            {},
            min_interval=self.index_min_interval,
            path=self.cache.shard_path(self.cache.shard, ".json"),
            render=self.part.render,
        )

    def stop(self, reason: str) -> None:
        """Stop the run: no new entries, in-flight work cancelled and cleaned up."""
        if not self.summary.stopped:
            self.summary.stopped = reason
        self._intake_open = False
        if self._scope is not None:
            self._scope.cancel()

    async def cache_one(self, entry: Entry) -> Outcome:
        """Cache one entry outside run() and write the index at once (for on-demand callers)."""
        outcome = await self.process(entry)
        if outcome.record is not None:
            self.records[entry.instance_id] = outcome.record
            await self.index.put(outcome.record)
        return outcome

    async def _produce(
        self,
        rows: RowSource,
        jobs: ObjectSendStream[Entry],
        results: ObjectSendStream[Outcome],
    ) -> None:
        async with jobs, results:
            async for row_number, row in numbered_rows(rows, self.options.shard, self._share):
                if not self._intake_open:
                    return
                try:
                    entry = (
                        row
                        if isinstance(row, Entry)
                        else entry_from_row(row, row_number, self.instance_id_fn)
                    )
                except InvalidEntry as exc:
                    await results.send(
                        Outcome(
                            instance_id=f"row-{row_number}",
                            status="failed",
                            docker_image=str(row.get("docker_image", ""))
                            if isinstance(row, Mapping)
                            else "",
                            reason=f"{exc}; fix or drop this row",
                        )
                    )
                    continue
                if self.options.skip_existing and self.is_cached(entry):
                    await results.send(
                        Outcome(entry.instance_id, "skipped", entry.docker_image, "already cached")
                    )
                    continue
                await jobs.send(entry)

    def _share(self, rows: int) -> None:
        if self.part is not None:
            self.part.rows = rows

    async def _worker(
        self, jobs: ObjectReceiveStream[Entry], results: ObjectSendStream[Outcome]
    ) -> None:
        async with jobs, results:
            async for entry in jobs:
                await results.send(await self.process(entry))

    async def process(self, entry: Entry) -> Outcome:
        """Cache one entry with retries; never raise for its failure; release what it needed."""
        try:
            return await self._attempt(entry)
        finally:
            if self._releases is not None:
                # Image removal runs beside the workers instead of stalling this one.
                self._releases.start_soon(self._release, entry)
            else:
                await self._release(entry)

    async def _release(self, entry: Entry) -> None:
        with anyio.CancelScope(shield=True):
            await self.source.after_extraction(entry)

    async def _attempt(self, entry: Entry) -> Outcome:
        started = time.monotonic()
        try:
            record, warnings = await self._retried(entry)
        except CacheError as exc:
            disk_full = isinstance(exc, DiskFull)
            return self._failed(
                entry, str(exc), started, disk_full=disk_full, retry_later=exc.retry_later
            )
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                reason = f"no space left in {self.cache.root}: {exc}"
                return self._failed(entry, reason, started, disk_full=True)
            return self._failed(entry, f"{type(exc).__name__}: {exc}", started)
        except Exception as exc:
            # An error no layer translated still fails only its own entry.
            log.debug("unexpected error caching %s", entry.instance_id, exc_info=True)
            return self._failed(entry, f"unexpected {type(exc).__name__}: {exc}", started)
        return Outcome(
            entry.instance_id,
            "cached",
            entry.docker_image,
            record=record,
            seconds=time.monotonic() - started,
            warnings=warnings,
        )

    async def _retried(self, entry: Entry) -> tuple[IndexRecord, tuple[str, ...]]:
        """cache_entry with retries of transient errors; an entry its source cut off mid-way
        (the daemon went away, DaemonInterrupted) starts again with a fresh retry budget, since
        the time spent waiting for the source is no failure of the entry."""
        restarts = 0
        while True:
            try:
                async for attempt in stamina.retry_context(
                    on=is_transient,
                    attempts=self.options.retry_attempts,
                    timeout=self.options.retry_timeout,
                    wait_initial=self.options.retry_wait_initial,
                    wait_max=self.options.retry_wait_max,
                ):
                    with attempt:
                        return await self.cache_entry(entry)
            except DaemonInterrupted as exc:
                restarts += 1
                if restarts > MAX_RESTARTS:
                    raise DaemonInterrupted(f"{exc.detail}; {MAX_RESTARTS} times") from None
                log.info("%s: %s; starting it again", entry.instance_id, exc)

    @staticmethod
    def _failed(
        entry: Entry,
        reason: str,
        started: float,
        *,
        disk_full: bool = False,
        retry_later: bool = False,
    ) -> Outcome:
        return Outcome(
            entry.instance_id,
            "failed",
            entry.docker_image,
            reason,
            seconds=time.monotonic() - started,
            disk_full=disk_full,
            retry_later=retry_later or disk_full,
        )

    async def cache_entry(self, entry: Entry) -> tuple[IndexRecord, tuple[str, ...]]:
        """Extract one entry into a work folder and publish it under its final name."""
        started = time.monotonic()
        async with self.publisher.work_dir(entry.instance_id) as work_dir:
            await self.source.prepare(entry)
            # Pulls overlap freely; extractions are CPU work, so only a few run at once.
            async with self._extract_slots:
                # The source also removes the history past HEAD (cache/history.py): no ref
                # or object past HEAD may be published.
                result = await self.source.extract_into(entry, work_dir)
            seconds = time.monotonic() - started
            record = await self.publisher.publish(entry, work_dir, result, seconds)
            if self._releases is not None:
                # The content digest (for `verify --deep`) is read back beside the workers.
                self._releases.start_soon(self.publisher.record_digest, entry.instance_id, result)
            else:
                await self.publisher.record_digest(entry.instance_id, result)
        return record, result.warnings

    async def _collect(
        self, results: ObjectReceiveStream[Outcome], index: ObjectSendStream[IndexRecord]
    ) -> None:
        async with results, index:
            async for outcome in results:
                self.summary.add(outcome)
                for warning in outcome.warnings:
                    log.warning("%s: %s", outcome.instance_id, warning)
                if outcome.record is not None:
                    self.records[outcome.instance_id] = outcome.record
                    await index.send(outcome.record)
                elif self.part is not None and outcome.status == "skipped":
                    # A shard's part lists every entry of the shard that is cached.
                    await index.send(self.records[outcome.instance_id])
                if self.part is not None:
                    self.part.failed = self.summary.failed
                if outcome.status == "failed":
                    log.warning("%s failed: %s", outcome.instance_id, outcome.reason)
                    if outcome.disk_full and not self.cache.has_free_space():
                        self.stop(f"the disk of {self.cache.root} stays full; free space and rerun")
                if self.on_outcome is not None:
                    maybe = self.on_outcome(outcome)
                    if maybe is not None:
                        await maybe

    def _write_failures(self) -> None:
        self.publisher.write_failures(
            (o.instance_id, o.docker_image, o.reason) for o in self.summary.failures
        )
