"""The caching job as coroutines, for trainers and for the command line."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import replace
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from asynccache import config
from asynccache.cache.history import HistoryCloser
from asynccache.cache.index import load_and_repair
from asynccache.cache.layout import CacheDir, shard_tag
from asynccache.cache.parts import known_records
from asynccache.cache.records import IndexRecord
from asynccache.cache.store import Store
from asynccache.config import CacheOptions
from asynccache.dataset import SplitRows, iterate_in_thread, open_split
from asynccache.entries import Entry, InstanceIdFn, make_instance_id
from asynccache.errors import DaemonUnavailable, SetupError
from asynccache.pipeline import Outcome, OutcomeCallback, Pipeline, RowSource, Summary
from asynccache.shards import parse_shard
from asynccache.sources.base import Source
from asynccache.sources.factory import make_backend, pull_gate
from asynccache.sources.finishing import finishing
from asynccache.sources.pool import ProcessPoolSource
from asynccache.sources.ratelimit import StatusCallback
from asynccache.tree.exclude import ExcludeRules
from asynccache.tree.git_guard import git_executable
from asynccache.tree.options import TreeOptions

if TYPE_CHECKING:
    from asynccache.sources.docker import DockerBackend

log = logging.getLogger(__name__)


def dataset_rows(
    dataset: str, split: str, max_entries: int | None = None, revision: str | None = None
) -> Iterator[Mapping[str, Any]]:
    """Rows of a dataset split (Hub id or local folder), the first ``max_entries`` only.

    ``revision`` pins a Hub dataset's version (a tag, branch or commit). Blocking.
    """
    return open_split(dataset, split, revision).take(max_entries).rows


def dataset_split(
    dataset: str, split: str, max_entries: int | None = None, revision: str | None = None
) -> SplitRows:
    """Like :func:`dataset_rows`, with the split's row count and resolved revision. Blocking."""
    return open_split(dataset, split, revision).take(max_entries)


def make_options(**options: Any) -> CacheOptions:
    """CacheOptions from keyword arguments (the CLI's flags as names); unknown names raise.

    ``shard`` takes a Shard, ``"K/N"`` or ``"auto"`` (read from the scheduler's environment).
    """
    if options.get("cache_dir") is not None:
        options["cache_dir"] = Path(options["cache_dir"])
    else:
        options.pop("cache_dir", None)
    if isinstance(options.get("shard"), str):
        options["shard"] = parse_shard(options["shard"], os.environ)
    return CacheOptions(**options)


async def _entries(
    entries: RowSource | None,
    dataset: str | None,
    split: str,
    max_entries: int | None,
    revision: str | None,
    settings: CacheOptions,
) -> tuple[RowSource, CacheOptions]:
    if entries is None:
        name = dataset or config.dataset_name
        rows = await anyio.to_thread.run_sync(dataset_split, name, split, max_entries, revision)
        provenance = replace(settings, dataset=name, dataset_revision=rows.revision)
        return iterate_in_thread(rows.rows), provenance
    if max_entries is not None:
        return _take(entries, max_entries), settings
    return entries, settings


async def cache_repos(
    entries: RowSource | None = None,
    *,
    dataset: str | None = None,
    split: str = config.dataset_split,
    revision: str | None = None,
    max_entries: int | None = None,
    instance_id_fn: InstanceIdFn = make_instance_id,
    on_outcome: OutcomeCallback | None = None,
    on_status: StatusCallback | None = None,
    source: Source | None = None,
    **options: Any,
) -> Summary:
    """Cache every entry (rows, Entry objects, or a dataset split); return the summary.

    With a dataset split, ``revision`` pins the Hub dataset's version, and the dataset and the
    commit its rows came from are recorded in every index record.

    ``options`` are CacheOptions fields, named like the CLI's flags: ``cache_dir``,
    ``concurrency``, ``skip_existing``, ``skip_pull``, ``keep_images``, ``cp_timeout``,
    ``pull_timeout``, ``backend``, ``keep_git_history``, ``shard`` (``"3/16"`` or ``"auto"``:
    cache only that shard of the rows, beside the other shards' runs), ...
    """
    rows, settings = await _entries(
        entries, dataset, split, max_entries, revision, make_options(**options)
    )
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
    source: Source | None = None,
) -> AsyncIterator[Pipeline]:
    """A ready pipeline until exit: the folder locked and its index loaded, then the source open.

    ``source`` is used as given (already open); without one, the backend ``options`` name is
    opened here and closed on exit.
    """
    if not options.keep_git_history and git_executable() is None:
        raise SetupError(
            "git is not installed: it removes each repository's history past HEAD before the "
            "tree is published; install git (Debian: apt-get install git) or pass "
            "--keep_git_history"
        )
    exclude_rules(options)  # a bad pattern is a set-up error before anything is locked
    cache = CacheDir(options.cache_dir, options.shard)
    await anyio.to_thread.run_sync(cache.check_usable)
    await anyio.to_thread.run_sync(cache.lock)
    tree = TreeOptions()
    try:
        records, notes = await anyio.to_thread.run_sync(_load, cache)
        tree = await anyio.to_thread.run_sync(tree_options, options, cache.root)
        store = tree.store if isinstance(tree.store, Store) else None
        async with _open_source(options, cache, notes, on_status, source, tree) as opened:
            yield Pipeline(
                options,
                opened,
                cache,
                records,
                notes=notes,
                instance_id_fn=instance_id_fn,
                on_outcome=on_outcome,
                store=store,
            )
    finally:
        tree.close()
        cache.unlock()


def exclude_rules(options: CacheOptions) -> ExcludeRules | None:
    """The run's --exclude patterns, checked; SetupError naming a bad one."""
    try:
        return ExcludeRules(options.exclude) if options.exclude else None
    except ValueError as exc:
        raise SetupError(f"{exc}; give gitignore-style patterns such as .venv") from None


def tree_options(options: CacheOptions, cache_root: Path) -> TreeOptions:
    """One process's TreeOptions for a run: its own open view of the store, the exclusions,
    and each tree's last step (history past HEAD removed, digest taken: cache/history.py).

    Each process (the main one, every worker) opens the store for itself: each changes it
    through a work folder of its own (see cache/store_tmp.py).
    """
    store = None
    if options.dedup:
        store = Store(cache_root, max_links=options.store_max_links)
        store.open()
    closer = HistoryCloser(keep_git_history=options.keep_git_history, store=store)
    return TreeOptions(store, exclude_rules(options), closer)


def _load(cache: CacheDir) -> tuple[dict[str, IndexRecord], list[str]]:
    """Sweep an earlier run's unfinished work, then load (and repair) the index.

    A shard's run repairs nothing (other shards run beside it): it reads what the folder
    holds, index.json, every shard's part and every complete folder's record.
    """
    notes: list[str] = []
    stale = cache.remove_stale_work()
    if stale:
        notes.append(f"removed {stale} unfinished folders of an earlier run")
    if cache.shard is not None:
        records, found = known_records(cache.root)
    else:
        records, found = load_and_repair(cache.root)
    return records, notes + found


@asynccontextmanager
async def _open_source(
    options: CacheOptions,
    cache: CacheDir,
    notes: list[str],
    on_status: StatusCallback | None,
    given: Source | None,
    tree: TreeOptions,
) -> AsyncIterator[Source]:
    """The given source, or the backend options name, open until exit (notes what it swept)."""
    if given is not None:
        yield finishing(given, tree.finish)
        return
    work_name = shard_tag(cache.shard) if cache.shard is not None else None
    if min(options.processes, options.concurrency) > 1:
        async with _open_pool(options, cache, notes, on_status, work_name) as pool:
            yield pool
        return
    gate = pull_gate(options, on_status)
    backend = make_backend(options, cache.root, gate, work_name, on_status=on_status, tree=tree)
    if options.backend != "docker":
        async with backend as registry:
            yield finishing(registry, tree.finish)
        return
    # the Docker source (and the HTTP stack under it) is imported only when it is the backend
    from asynccache.sources.docker import DockerBackend

    assert isinstance(backend, DockerBackend)
    async with backend:
        leaked = await backend.remove_leaked_containers()
        if leaked:
            notes.append(f"removed {leaked} containers of an earlier run")
        yield finishing(backend, tree.finish)
        await _sweep_late(backend)


async def _sweep_late(backend: DockerBackend) -> None:
    """Sweep again at the end: a create that a killed earlier run had sent can land after the
    first sweep. With the daemon away the next run's first sweep does it."""
    if backend.daemon.waiting or backend.daemon.exhausted:
        log.warning("the Docker daemon is away: the next run removes this run's containers")
        return
    try:
        late = await backend.remove_leaked_containers()
    except DaemonUnavailable as exc:
        log.warning("%s; the next run removes this run's containers", exc)
        return
    if late:
        log.info("removed %d containers of an earlier run that appeared late", late)


@asynccontextmanager
async def _open_pool(
    options: CacheOptions,
    cache: CacheDir,
    notes: list[str],
    on_status: StatusCallback | None,
    work_name: str | None,
) -> AsyncIterator[Source]:
    """Worker processes running the backend; with Docker, the container sweeps stay here."""
    pool = ProcessPoolSource(
        options, cache.root, work_name=work_name, on_status=on_status, tree_factory=tree_options
    )
    if options.backend != "docker":
        async with pool:
            yield pool
        return
    # The sweeper sees the workers' daemon gate: it knows when the daemon is away.
    sweeper = make_backend(
        options, cache.root, pull_gate(options, None), work_name, daemon_state=pool.daemon_state
    )
    from asynccache.sources.docker import DockerBackend

    assert isinstance(sweeper, DockerBackend)
    async with sweeper:
        leaked = await sweeper.remove_leaked_containers()
        if leaked:
            notes.append(f"removed {leaked} containers of an earlier run")
        async with pool:
            yield pool
        await _sweep_late(sweeper)
