"""The caching job as coroutines, for trainers and for the command line."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from itertools import islice
from pathlib import Path
from typing import Any

from asynccache import config
from asynccache.config import CacheOptions
from asynccache.docker import DockerBackend
from asynccache.entries import (
    Entry,
    InstanceIdFn,
    iterate_in_thread,
    load_rows,
    make_instance_id,
)
from asynccache.pipeline import (
    ArchiveSource,
    OutcomeCallback,
    Pipeline,
    RowSource,
    Summary,
    TreeSource,
)
from asynccache.ratelimit import PullGate, StatusCallback


def dataset_rows(
    dataset: str, split: str, max_entries: int | None = None
) -> Iterator[Mapping[str, Any]]:
    """Rows of a dataset split (Hub id or local folder), the first ``max_entries`` only."""
    rows = load_rows(dataset, split)
    return islice(rows, max_entries) if max_entries is not None else rows


async def cache_repos(
    entries: RowSource | None = None,
    *,
    dataset: str | None = None,
    split: str = config.dataset_split,
    max_entries: int | None = None,
    cache_dir: str | Path | None = None,
    concurrency: int = config.concurrency,
    skip_existing: bool = True,
    skip_pull: bool = False,
    keep_images: bool = False,
    pull_timeout: float = config.pull_timeout,
    cp_timeout: float = config.cp_timeout,
    rate_limit_max_wait: float = config.rate_limit_max_wait,
    instance_id_fn: InstanceIdFn = make_instance_id,
    on_outcome: OutcomeCallback | None = None,
    on_status: StatusCallback | None = None,
    source: ArchiveSource | TreeSource | None = None,
) -> Summary:
    """Cache every entry (rows, Entry objects, or a dataset split) and return the summary."""
    options = CacheOptions(
        cache_dir=Path(cache_dir) if cache_dir is not None else config.default_cache_dir(),
        concurrency=concurrency,
        skip_existing=skip_existing,
        skip_pull=skip_pull,
        keep_images=keep_images,
        pull_timeout=pull_timeout,
        cp_timeout=cp_timeout,
        rate_limit_max_wait=rate_limit_max_wait,
    )
    if entries is None:
        if dataset is None:
            dataset = config.dataset_name
        entries = iterate_in_thread(dataset_rows(dataset, split, max_entries))
    elif max_entries is not None:
        entries = _take(entries, max_entries)
    async with open_pipeline(
        options,
        instance_id_fn=instance_id_fn,
        on_outcome=on_outcome,
        on_status=on_status,
        source=source,
    ) as pipeline:
        return await pipeline.run(entries)


async def _take(rows: RowSource, count: int) -> Any:
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
    pipeline.prepare()
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
            from asynccache.registry import RegistryBackend

            async with RegistryBackend(
                pipeline.cache.root,
                platform=options.platform,
                insecure_registries=options.insecure_registries,
                registry_mirror=options.registry_mirror,
                pull_gate=gate,
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
