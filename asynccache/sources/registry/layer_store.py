"""Image layers applied to a tree: shared fetches, empty-layer memory, a bounded blob cache."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread

from asynccache._threads import Read, ReadAhead, feed_thread
from asynccache.errors import DigestMismatch, TransferFailed, TruncatedArchive, UnsafeArchive
from asynccache.sources.registry.compression import Blob, decompressed
from asynccache.tree.layered import LayerResult, LayerTree

log = logging.getLogger(__name__)

#: Default bound of the blob cache (``--layer_cache_dir``).
DEFAULT_CACHE_BYTES = 2 << 30
_PARTIAL_DIR = ".partial"
#: A partial download untouched this long belongs to no live run (runs share the folder).
_STALE_PARTIAL_SECONDS = 3600.0
_UNTOUCHED_FILE = "untouched"

#: Opens a layer blob and gives its chunks.
BlobOpener = Callable[[], AbstractAsyncContextManager[AsyncIterator[bytes]]]


@dataclass
class _Cached:
    size: int
    used: float


class LayerStore:
    """A run's layers: empty ones remembered, one fetch at a time, a bounded blob cache."""

    def __init__(
        self,
        folder: Path | None,
        *,
        root: str = "testbed",
        max_bytes: int = DEFAULT_CACHE_BYTES,
        work_name: str | None = None,
    ) -> None:
        self.folder = folder
        # Partial downloads of a shard's run live apart: other shards share the folder.
        self.partial = f"{_PARTIAL_DIR}/{work_name}" if work_name else _PARTIAL_DIR
        self.root = root
        self.max_bytes = max_bytes if folder is not None else 0
        self.untouched: set[str] = set()
        self._cached: dict[str, _Cached] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self.fetches = 0
        self.cache_hits = 0
        self.skipped = 0

    def open(self) -> None:
        """Sync: create the folder, drop partial downloads, load what earlier runs learnt."""
        if self.folder is None:
            return
        partial = self.folder / self.partial
        partial.mkdir(parents=True, exist_ok=True)
        # Other runs may be writing theirs right now: only long-untouched ones are stale.
        cutoff = time.time() - _STALE_PARTIAL_SECONDS
        for stale in partial.iterdir():
            with contextlib.suppress(OSError):
                if stale.stat(follow_symlinks=False).st_mtime < cutoff:
                    stale.unlink()
        with (
            contextlib.suppress(OSError),
            open(self.folder / _UNTOUCHED_FILE, encoding="utf-8") as f,
        ):
            for line in f:
                root, _, digest = line.strip().partition(" ")
                if root == self.root and digest:
                    self.untouched.add(digest)
        for entry in os.scandir(self.folder):
            if entry.is_file(follow_symlinks=False) and entry.name.startswith("sha"):
                info = entry.stat(follow_symlinks=False)
                self._cached[entry.name.replace("-", ":", 1)] = _Cached(info.st_size, info.st_mtime)
        _unlink_all(self._evict())

    def _path(self, digest: str) -> Path:
        assert self.folder is not None
        return self.folder / digest.replace(":", "-", 1)

    async def apply(
        self, tree: LayerTree, image: str, digest: str, size: int, open_blob: BlobOpener
    ) -> None:
        """Apply one layer to tree: skipped when known empty, from the cache, or fetched once."""
        if digest in self.untouched:
            self.skipped += 1
            return
        if digest not in self._cached:
            lock = self._locks.setdefault(digest, anyio.Lock())
            async with lock:
                if digest in self.untouched:
                    self.skipped += 1
                    return
                if digest not in self._cached:
                    await self._fetch(tree, image, digest, size, open_blob)
                    return
        if not await self._apply_cached(tree, image, digest, size):
            await self.apply(tree, image, digest, size, open_blob)

    async def _fetch(
        self, tree: LayerTree, image: str, digest: str, size: int, open_blob: BlobOpener
    ) -> None:
        self.fetches += 1
        tee_path: Path | None = None
        if self.folder is not None and size <= self.max_bytes:
            tee_path = (
                self.folder / self.partial / f"{digest.replace(':', '-')}.{secrets.token_hex(4)}"
            )
        kept = False
        try:
            async with open_blob() as chunks:
                result = await feed_thread(
                    chunks, lambda read: _apply_stream(tree, image, digest, size, tee_path, read)
                )
            if not result.touched:
                await self._remember_untouched(digest)
            elif tee_path is not None:
                await self._keep(digest, tee_path, size)
                kept = True
        finally:
            if tee_path is not None and not kept:
                with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
                    await anyio.to_thread.run_sync(tee_path.unlink)

    async def _apply_cached(self, tree: LayerTree, image: str, digest: str, size: int) -> bool:
        """Apply a cached blob; False when it vanished (then it is forgotten)."""
        path = self._path(digest)
        try:
            result = await anyio.to_thread.run_sync(_apply_file, tree, image, digest, size, path)
        except DigestMismatch:
            log.warning("cached layer %s is corrupt; it will be fetched again", digest)
            self._cached.pop(digest, None)
            with contextlib.suppress(OSError):
                await anyio.to_thread.run_sync(path.unlink)
            raise TransferFailed(f"cached layer {digest} was corrupt and is dropped") from None
        if result is None:
            self._cached.pop(digest, None)
            return False
        self.cache_hits += 1
        entry = self._cached.get(digest)
        if entry is not None:
            entry.used = time.time()
        return True

    async def _remember_untouched(self, digest: str) -> None:
        self.untouched.add(digest)
        if self.folder is None:
            return
        line = f"{self.root} {digest}\n".encode()

        def append() -> None:
            assert self.folder is not None
            fd = os.open(
                self.folder / _UNTOUCHED_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
            )
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

        with contextlib.suppress(OSError):
            await anyio.to_thread.run_sync(append)

    async def _keep(self, digest: str, partial: Path, size: int) -> None:
        await anyio.to_thread.run_sync(os.replace, partial, self._path(digest))
        self._cached[digest] = _Cached(size, time.time())
        doomed = self._evict()
        if doomed:
            await anyio.to_thread.run_sync(_unlink_all, doomed)

    def _evict(self) -> list[Path]:
        """Forget the least recently used blobs beyond the bound; return their paths."""
        total = sum(entry.size for entry in self._cached.values())
        doomed: list[Path] = []
        for digest, entry in sorted(self._cached.items(), key=lambda item: item[1].used):
            if total <= self.max_bytes:
                break
            doomed.append(self._path(digest))
            del self._cached[digest]
            total -= entry.size
        return doomed


def _unlink_all(paths: list[Path]) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink()


def _apply_checked(tree: LayerTree, blob: Blob) -> LayerResult:
    """Apply a blob and check its digest; a corrupt blob is reported as such, not as bad tar."""
    ahead = ReadAhead(lambda: decompressed(blob, blob.digest))
    try:
        try:
            result = tree.apply(ahead.read)
        finally:
            ahead.close()
    except (UnsafeArchive, TruncatedArchive) as exc:
        mismatch = blob.mismatch()
        if mismatch is not None:
            raise mismatch from exc
        raise
    blob.finish()
    return result


def _apply_stream(
    tree: LayerTree, image: str, digest: str, size: int, tee_path: Path | None, read: Read
) -> LayerResult:
    """Thread: apply a blob as it streams in, teeing it to tee_path; check it at the end."""
    tee = None
    if tee_path is not None:
        tee = os.open(tee_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        blob = Blob(read, image, digest, size, tee)
        result = _apply_checked(tree, blob)
    finally:
        if tee is not None:
            os.close(tee)
    if result.links_pending:
        if tee_path is None:
            raise UnsafeArchive(digest, "hardlinks to files outside the root need the blob cache")
        with open(tee_path, "rb", buffering=0) as again:
            tree.fill_links(decompressed(again.read, digest))
    return result


def _apply_file(
    tree: LayerTree, image: str, digest: str, size: int, path: Path
) -> LayerResult | None:
    """Thread: apply a cached blob, checking its digest again; None when it is gone."""
    try:
        handle = open(path, "rb", buffering=0)  # noqa: SIM115
    except FileNotFoundError:
        return None
    with handle:
        os.utime(handle.fileno())
        blob = Blob(handle.read, image, digest, size, None)
        result = _apply_checked(tree, blob)
        if result.links_pending:
            handle.seek(0)
            tree.fill_links(decompressed(handle.read, digest))
    return result
