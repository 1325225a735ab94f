"""The caching job as coroutines, for trainers and for the command line."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from itertools import islice
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from asynccache import config
from asynccache.config import CacheOptions
from asynccache.entries import (
    Entry,
    InstanceIdFn,
    iterate_in_thread,
    load_rows,
    make_instance_id,
)
from asynccache.pipeline import (
    ArchiveSource,
    Outcome,
    OutcomeCallback,
    Pipeline,
    RowSource,
    Summary,
    TreeSource,
)
from asynccache.sources.docker import DockerBackend
from asynccache.sources.ratelimit import PullGate, StatusCallback

log = logging.getLogger(__name__)


def dataset_rows(
    dataset: str, split: str, max_entries: int | None = None
) -> Iterator[Mapping[str, Any]]:
    """Rows of a dataset split (Hub id or local folder), the first ``max_entries`` only."""
    rows = load_rows(dataset, split)
    return islice(rows, max_entries) if max_entries is not None else rows


def make_options(**options: Any) -> CacheOptions:
    """CacheOptions from keyword arguments (the CLI's flags as names); unknown names raise."""
    if options.get("cache_dir") is not None:
        options["cache_dir"] = Path(options["cache_dir"])
    else:
        options.pop("cache_dir", None)
    return CacheOptions(**options)


async def _entries(
    entries: RowSource | None, dataset: str | None, split: str, max_entries: int | None
) -> RowSource:
    if entries is None:
        rows = await anyio.to_thread.run_sync(
            dataset_rows, dataset or config.dataset_name, split, max_entries
        )
        return iterate_in_thread(rows)
    if max_entries is not None:
        return _take(entries, max_entries)
    return entries


async def cache_repos(
    entries: RowSource | None = None,
    *,
    dataset: str | None = None,
    split: str = config.dataset_split,
    max_entries: int | None = None,
    instance_id_fn: InstanceIdFn = make_instance_id,
    on_outcome: OutcomeCallback | None = None,
    on_status: StatusCallback | None = None,
    source: ArchiveSource | TreeSource | None = None,
    **options: Any,
) -> Summary:
    """Cache every entry (rows, Entry objects, or a dataset split); return the summary.

    ``options`` are CacheOptions fields, named like the CLI's flags: ``cache_dir``,
    ``concurrency``, ``skip_existing``, ``skip_pull``, ``keep_images``, ``cp_timeout``,
    ``pull_timeout``, ``backend``, ...
    """
    settings = make_options(**options)
    rows = await _entries(entries, dataset, split, max_entries)
    async with open_pipeline(
        settings,
        instance_id_fn=instance_id_fn,
        on_outcome=on_outcome,
        on_status=on_status,
        source=source,
    ) as pipeline:
        return await pipeline.run(rows)


@asynccontextmanager
async def cache_repos_stream(
    entries: RowSource | None = None,
    *,
    buffer: int = 64,
    **kwargs: Any,
) -> AsyncIterator[MemoryObjectReceiveStream[Outcome]]:
    """``cache_repos`` yielding each outcome as it completes.

    ``async with cache_repos_stream(rows, cache_dir=...) as outcomes: async for o in outcomes``.
    Leaving the block early cancels the run (in-flight entries are cleaned up).
    """
    send, receive = anyio.create_memory_object_stream[Outcome](buffer)

    async def produce() -> None:
        async with send:
            await cache_repos(entries, on_outcome=send.send, **kwargs)

    async with anyio.create_task_group() as tg, receive:
        tg.start_soon(produce)
        yield receive
        tg.cancel_scope.cancel()


async def _take(rows: RowSource, count: int) -> AsyncIterator[Mapping[str, Any] | Entry]:
    taken = 0
    if count <= 0:
        return
    if hasattr(rows, "__aiter__"):
        async for row in rows:
            yield row
            taken += 1
            if taken >= count:
                return
    else:
        for row in islice(rows, count):
            yield row


@asynccontextmanager
async def open_pipeline(
    options: CacheOptions,
    *,
    instance_id_fn: InstanceIdFn = make_instance_id,
    on_outcome: OutcomeCallback | None = None,
    on_status: StatusCallback | None = None,
    source: ArchiveSource | TreeSource | None = None,
) -> AsyncIterator[Pipeline]:
    """A prepared pipeline (folder locked, index loaded, source connected) until exit."""
    pipeline = Pipeline(options, _NoSource(), instance_id_fn=instance_id_fn, on_outcome=on_outcome)
    await anyio.to_thread.run_sync(pipeline.prepare)
    try:
        if source is not None:
            pipeline.source = source
            yield pipeline
            return
        gate = PullGate(
            first_pause=options.rate_limit_pause,
            max_pause=config.rate_limit_pause_max,
            max_wait=options.rate_limit_max_wait,
            on_status=on_status,
        )
        if options.backend == "registry":
            from asynccache.sources.registry.backend import RegistryBackend

            async with RegistryBackend(
                pipeline.cache.root,
                platform=options.platform,
                insecure_registries=options.insecure_registries,
                registry_mirror=options.registry_mirror,
                pull_gate=gate,
                testbed_path=options.testbed_path,
            ) as registry:
                pipeline.source = registry
                yield pipeline
            return
        backend = DockerBackend(
            pipeline.cache.root,
            pull_timeout=options.pull_timeout,
            skip_pull=options.skip_pull,
            keep_images=options.keep_images,
            testbed_path=options.testbed_path,
            pull_gate=gate,
        )
        async with backend:
            leaked = await backend.remove_leaked_containers()
            if leaked:
                pipeline.summary.notes.append(f"removed {leaked} containers of an earlier run")
            pipeline.source = backend
            yield pipeline
            # A create that a killed earlier run had sent can land after the first sweep.
            late = await backend.remove_leaked_containers()
            if late:
                log.info("removed %d containers of an earlier run that appeared late", late)
    finally:
        pipeline.close()


class _NoSource:
    """Placeholder source until the real one is connected."""

    @asynccontextmanager
    async def testbed_archive(self, entry: Entry) -> AsyncIterator[AsyncIterator[bytes]]:
        raise RuntimeError("the pipeline's source is not connected")
        yield  # pragma: no cover

    async def after_extraction(self, entry: Entry) -> None:
        """Nothing to release."""
