"""RepoCache: an RL trainer's coroutine view of a cache folder (lookups, checkouts, ensure)."""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections.abc import Generator, Iterator, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from asynccache._fs import absolute_path
from asynccache.cache.layout import resolve_instance_path
from asynccache.cache.parts import cached_records
from asynccache.cache.records import IndexRecord
from asynccache.config import INDEX_NAME, SHARDS_DIR_NAME, CacheOptions
from asynccache.entries import Entry, InstanceIdFn, entry_from_row, make_instance_id
from asynccache.errors import CacheError, EnsureFailed, IndexCorrupt, MissingInstance
from asynccache.trainer.checkout import MODES, Mode, checkout_tree, overlay_side_dir, release_tree

if TYPE_CHECKING:
    from asynccache.pipeline import Pipeline
    from asynccache.sources.base import Source

__all__ = ["Checkout", "RepoCache"]

log = logging.getLogger(__name__)


_Identity = tuple[int, int, int, int]
#: index.json's identity (replaced, never rewritten in place) and the shards folder's (a part
#: replaced in it changes its time).
_Stamp = tuple[_Identity | None, _Identity | None]
#: How recent a change of the shards folder must be for its time not to be trusted yet.
_FRESH_NS = 1_000_000_000


def _identity(path: Path) -> _Identity | None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return (info.st_ino, info.st_dev, info.st_size, info.st_mtime_ns)


class _Flight:
    """One extraction in progress that any number of ensure calls wait for."""

    __slots__ = ("done", "error", "path")

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.path: Path | None = None
        self.error: EnsureFailed | None = None


class Checkout:
    """A pending checkout: ``await`` it for the path, or ``async with`` it to release on exit."""

    def __init__(self, cache: RepoCache, instance_id: str, dest: Path, mode: Mode) -> None:
        self._cache = cache
        self._instance_id = instance_id
        self._dest = dest
        self._mode = mode
        self._path: Path | None = None

    def __await__(self) -> Generator[Any, None, Path]:
        return self._cache._checkout(self._instance_id, self._dest, self._mode).__await__()

    async def __aenter__(self) -> Path:
        self._path = await self._cache._checkout(self._instance_id, self._dest, self._mode)
        return self._path

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._path is not None:
            path, self._path = self._path, None
            await self._cache.release(path)


class RepoCache:
    """The cached trees of one cache folder, as a trainer uses them.

    Lookups re-read index.json whenever it changed on disk (one stat per access), so entries
    a running cacher adds show up. ``checkout`` gives each rollout a private writable tree;
    ``ensure`` extracts a missing instance first (one extraction per id however many callers
    wait). The first ``ensure`` that must extract opens a pipeline, which holds the cache
    folder's lock until ``aclose()``.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        *,
        mode: Mode = "auto",
        options: CacheOptions | None = None,
        source: Source | None = None,
        instance_id_fn: InstanceIdFn = make_instance_id,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown checkout mode {mode!r}; use one of {', '.join(MODES)}")
        self.root = absolute_path(cache_dir)
        self.mode: Mode = mode
        # One entry at a time on demand: in this process unless the caller's options say more.
        self.options = dataclasses.replace(
            options or CacheOptions(processes=1), cache_dir=self.root
        )
        self._source = source
        self._instance_id_fn = instance_id_fn
        self._index_path = self.root / INDEX_NAME
        self._shards_dir = self.root / SHARDS_DIR_NAME
        self._records: dict[str, IndexRecord] = {}
        self._ids: list[str] = []
        self._stamp: _Stamp | None = None
        self._loaded = False
        self._reload_lock = threading.Lock()
        self._checkouts: dict[Path, str] = {}
        self._flights: dict[str, _Flight] = {}
        self._pipeline: Pipeline | None = None
        self._stack: AsyncExitStack | None = None
        self._pipeline_lock = anyio.Lock()

    def __repr__(self) -> str:
        return f"RepoCache({str(self.root)!r})"

    # --- the index -------------------------------------------------------------------

    def refresh(self) -> bool:
        """Re-read index.json (and shards' index parts) if they changed on disk since the last
        read; True when re-read."""
        stamp = self._stat_index()
        if self._loaded and stamp == self._stamp:
            return False
        with self._reload_lock:
            if self._loaded and stamp == self._stamp:
                return False
            try:
                records = cached_records(self.root)
            except IndexCorrupt:
                if not self._loaded:
                    raise
                log.warning("index.json of %s is unreadable; keeping the last good one", self.root)
                return False
            self._records = records
            self._ids = sorted(records)
            # A part replaced within the clock's tick of the last one leaves the folder's time
            # unchanged: while the folder is that fresh, the next access reads again.
            fresh = stamp[1] is not None and time.time_ns() - stamp[1][3] < _FRESH_NS
            self._stamp = None if fresh else stamp
            self._loaded = True
            return True

    def _stat_index(self) -> _Stamp:
        return _identity(self._index_path), _identity(self._shards_dir)

    @property
    def instance_ids(self) -> list[str]:
        """Every indexed instance id, sorted."""
        self.refresh()
        return list(self._ids)

    def __contains__(self, instance_id: object) -> bool:
        self.refresh()
        return instance_id in self._records

    def __len__(self) -> int:
        self.refresh()
        return len(self._records)

    def __iter__(self) -> Iterator[str]:
        return iter(self.instance_ids)

    def entry(self, instance_id: str) -> IndexRecord:
        """The index record of an instance (a copy); MissingInstance when it is not indexed."""
        return dict(self._record(instance_id))

    def path(self, instance_id: str) -> Path:
        """The cached folder of an instance (never write into it; check it out instead)."""
        return resolve_instance_path(self.root, self._record(instance_id))

    def _record(self, instance_id: str) -> IndexRecord:
        self.refresh()
        record = self._records.get(instance_id)
        if record is None:
            raise MissingInstance(
                instance_id,
                self.root,
                f"instance {instance_id!r} is not in the cache at {self.root} "
                f"({len(self._records)} instances indexed)",
            )
        return record

    def _present_path(self, instance_id: str) -> Path:
        """The folder of an indexed instance; MissingInstance when either is missing."""
        path = self.path(instance_id)
        if not path.is_dir():
            raise MissingInstance(
                instance_id,
                self.root,
                f"instance {instance_id!r} is indexed in {self.root} but its folder {path} is "
                "missing; run `python -m asynccache verify --repair` and cache it again",
            )
        return path

    def _cached_path(self, instance_id: str) -> Path | None:
        try:
            return self._present_path(instance_id)
        except MissingInstance:
            return None

    # --- checkouts -------------------------------------------------------------------

    def checkout(
        self, instance_id: str, dest: str | os.PathLike[str], mode: Mode | None = None
    ) -> Checkout:
        """A private writable tree of ``instance_id`` at ``dest``: await it or ``async with`` it.

        ``mode`` is "overlay", "copy" or "auto" (the cache's default). Writes in dest never
        reach the cache. dest must not exist or be an empty folder, outside the cache folder.
        """
        chosen = self.mode if mode is None else mode
        if chosen not in MODES:
            raise ValueError(f"unknown checkout mode {chosen!r}; use one of {', '.join(MODES)}")
        target = absolute_path(dest)
        self._check_outside(target, "check out into")
        return Checkout(self, instance_id, target, chosen)

    async def _checkout(self, instance_id: str, dest: Path, mode: Mode) -> Path:
        used = await anyio.to_thread.run_sync(self._checkout_sync, instance_id, dest, mode)
        self._checkouts[dest] = used
        return dest

    def _checkout_sync(self, instance_id: str, dest: Path, mode: Mode) -> str:
        return checkout_tree(self._present_path(instance_id), dest, mode)

    async def release(self, path: str | os.PathLike[str], *, force: bool = False) -> None:
        """Unmount (overlay) and delete a checkout (``force`` for a copy another process made)."""
        target = absolute_path(path)
        self._check_outside(target, "release")
        if not force and target not in self._checkouts and not overlay_side_dir(target).is_dir():
            raise ValueError(
                f"refusing to release {target}: this RepoCache did not check it out and it is "
                "not an overlay checkout; pass force=True to delete it anyway"
            )
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(release_tree, target)
        self._checkouts.pop(target, None)

    async def release_all(self) -> int:
        """Release every checkout this object made and has not released; return how many."""
        paths = list(self._checkouts)
        for path in paths:
            await self.release(path)
        return len(paths)

    @property
    def checkouts(self) -> dict[Path, str]:
        """Checkouts made and not yet released: path -> mode used ("overlay" or "copy")."""
        return dict(self._checkouts)

    def _check_outside(self, target: Path, action: str) -> None:
        root = self.root
        if target == root or root in target.parents or target in root.parents:
            raise ValueError(f"refusing to {action} {target}: it overlaps the cache folder {root}")

    # --- ensure ----------------------------------------------------------------------

    async def ensure(self, entry: Entry | Mapping[str, Any]) -> Path:
        """The cached folder of ``entry``, extracting its image first when it is missing.

        Concurrent calls for one instance share a single extraction; when it fails every
        caller gets EnsureFailed, and a later call tries again.
        """
        if not isinstance(entry, Entry):
            entry = entry_from_row(entry, 0, self._instance_id_fn)
        instance_id = entry.instance_id
        while True:
            cached = await anyio.to_thread.run_sync(self._cached_path, instance_id)
            if cached is not None:
                return cached
            flight = self._flights.get(instance_id)
            if flight is None:
                return await self._lead(entry)
            await flight.done.wait()
            if flight.path is not None:
                return flight.path
            if flight.error is not None:
                raise EnsureFailed(instance_id, flight.error.reason) from flight.error

    async def _lead(self, entry: Entry) -> Path:
        flight = _Flight()
        self._flights[entry.instance_id] = flight
        try:
            flight.path = await self._extract(entry)
            return flight.path
        except EnsureFailed as exc:
            flight.error = exc
            raise
        except Exception as exc:
            flight.error = EnsureFailed(entry.instance_id, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            del self._flights[entry.instance_id]
            flight.done.set()

    async def _extract(self, entry: Entry) -> Path:
        instance_id = entry.instance_id
        try:
            pipeline = await self._open_pipeline()
        except (CacheError, OSError) as exc:
            raise EnsureFailed(instance_id, str(exc)) from exc
        if not pipeline.is_cached(entry):
            outcome = await pipeline.cache_one(entry)
            if outcome.status != "cached" or outcome.record is None:
                raise EnsureFailed(instance_id, outcome.reason or outcome.status)
        path = await anyio.to_thread.run_sync(self._cached_path, instance_id)
        if path is None:
            raise EnsureFailed(instance_id, f"{instance_id} was cached but is not in {self.root}")
        return path

    async def _open_pipeline(self) -> Pipeline:
        # Loaded here: a trainer that only reads the cache never loads the Docker client.
        from asynccache.api import open_pipeline

        async with self._pipeline_lock:
            if self._pipeline is None:
                stack = AsyncExitStack()
                try:
                    self._pipeline = await stack.enter_async_context(
                        open_pipeline(
                            self.options, instance_id_fn=self._instance_id_fn, source=self._source
                        )
                    )
                except BaseException:
                    await stack.aclose()
                    raise
                self._stack = stack
            return self._pipeline

    async def aclose(self) -> None:
        """Close the pipeline ensure opened (releasing the cache folder's lock); keep checkouts."""
        with anyio.CancelScope(shield=True):
            async with self._pipeline_lock:
                stack, self._stack, self._pipeline = self._stack, None, None
                if stack is not None:
                    await stack.aclose()

    async def __aenter__(self) -> RepoCache:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
