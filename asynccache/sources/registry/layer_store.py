"""Image layers applied to a tree: shared fetches, empty-layer memory, a bounded blob cache.

A layer's blob is kept in the cache once a second image needs it: the first fetch only notes the
layer (in the ``fetched`` list, which every run and worker sharing the folder reads), unless
another entry is already waiting for it. R2E-Gym images each have ``/testbed`` layers of their
own; keeping every blob would write each one to disk for nothing.

The blob cache folder is shared, and reached without following links (``blob_folder.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.to_thread

from asynccache._threads import Read, ReadAhead, feed_thread
from asynccache.errors import (
    DigestMismatch,
    TransferFailed,
    TruncatedArchive,
    UnsafeArchive,
)
from asynccache.sources.registry.blob_folder import (
    APPEND_FLAGS,
    Tee,
    open_regular,
    own_folder,
    read_all,
    top_folder,
)
from asynccache.sources.registry.compression import Blob, decompressed
from asynccache.tree.layered import LayerResult, LayerTree

log = logging.getLogger(__name__)

#: Default bound of the blob cache (``--layer_cache_dir``).
DEFAULT_CACHE_BYTES = 2 << 30
_PARTIAL_DIR = ".partial"
#: A partial download untouched this long belongs to no live run (runs share the folder).
_STALE_PARTIAL_SECONDS = 3600.0
_UNTOUCHED_FILE = "untouched"
#: Layers fetched once and not kept: a second fetch keeps the blob.
_FETCHED_FILE = "fetched"
#: A longer list of layers fetched once (some 50,000) is started afresh.
_MAX_FETCHED_BYTES = 4 << 20
_MAX_FETCHED_NAMES = 60_000
#: A line of the fetched list: one digest.
_DIGEST_LINE = re.compile(r"^(sha(?:256|384|512):[0-9a-f]{64,128})$", re.MULTILINE)
_MAX_LINE = 160
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
        #: The folder of this run's partial downloads under .partial (a shard's name), if any.
        self.work_name = work_name or None
        self.root = root
        self.max_bytes = max_bytes if folder is not None else 0
        # the folder and its partial-download folder, held open while the store is
        self._dir: int | None = None
        self._partial: int | None = None
        self.untouched: set[str] = set()
        #: Layers some run or worker fetched once without keeping the blob.
        self.fetched_once: set[str] = set()
        self._fetched_read = 0  # bytes of the fetched list read so far
        self._fetched_lock = anyio.Lock()
        self._cached: dict[str, _Cached] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self.fetches = 0
        self.cache_hits = 0
        self.skipped = 0

    def open(self) -> None:
        """Sync: create the folder, drop partial downloads, load what earlier runs learnt."""
        if self.folder is None:
            return
        self._dir = folder = top_folder(self.folder)
        partial = own_folder(_PARTIAL_DIR, folder)
        for part in (self.work_name or "").split("/"):
            if part:  # a shard's or a worker's partial downloads live apart
                shared, partial = partial, own_folder(part, partial)
                os.close(shared)
        self._partial = partial
        # Other runs may be writing theirs right now: only long-untouched ones are stale.
        cutoff = time.time() - _STALE_PARTIAL_SECONDS
        with os.scandir(partial) as entries:
            stale = [
                entry.name
                for entry in entries
                if not entry.is_dir(follow_symlinks=False)
                and entry.stat(follow_symlinks=False).st_mtime < cutoff
            ]
        for name in stale:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=partial)
        fd = open_regular(_UNTOUCHED_FILE, folder)
        if fd is not None:
            try:
                lines = read_all(fd).decode("utf-8", "replace").splitlines()
            finally:
                os.close(fd)
            for line in lines:
                root, _, digest = line.strip().partition(" ")
                if root == self.root and digest:
                    self.untouched.add(digest)
        self._read_fetched()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False) and entry.name.startswith("sha"):
                    info = entry.stat(follow_symlinks=False)
                    used = _Cached(info.st_size, info.st_mtime)
                    self._cached[entry.name.replace("-", ":", 1)] = used
        self._unlink_all(self._evict())

    def close(self) -> None:
        """Sync: let go of the folder."""
        for fd in (self._partial, self._dir):
            if fd is not None:
                os.close(fd)
        self._dir = self._partial = None

    @staticmethod
    def _name(digest: str) -> str:
        """The name of a digest's blob in the folder."""
        return digest.replace(":", "-", 1)

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
        tee: Tee | None = None
        if (
            self._partial is not None
            and size <= self.max_bytes
            and await self._wanted_again(digest)
        ):
            tee = Tee(self._partial, f"{self._name(digest)}.{secrets.token_hex(4)}")
        kept = False
        try:
            async with open_blob() as chunks:
                result = await feed_thread(
                    chunks, lambda read: _apply_stream(tree, image, digest, size, tee, read)
                )
            if result.links_pending:
                # hardlinks to files outside the root: their data comes from a second read
                self.fetches += 1
                async with open_blob() as chunks:
                    await feed_thread(
                        chunks, lambda read: _fill_stream(tree, image, digest, size, read)
                    )
            if not result.touched:
                await self._remember_untouched(digest)
            elif tee is not None:
                kept = await self._keep(digest, tee.name, size)
            else:
                await self._remember_fetched(digest)
        finally:
            if tee is not None and not kept:
                with anyio.CancelScope(shield=True), contextlib.suppress(OSError):
                    await anyio.to_thread.run_sync(tee.remove)

    async def _wanted_again(self, digest: str) -> bool:
        """Keep this layer's blob? Yes once it was fetched before (by any run or worker sharing
        the folder: their notes are read as they come) or when another entry waits for it."""
        lock = self._locks.get(digest)
        if lock is not None and lock.statistics().tasks_waiting > 0:
            return True
        if digest not in self.fetched_once:
            async with self._fetched_lock:
                await anyio.to_thread.run_sync(self._read_fetched)
        return digest in self.fetched_once

    def _read_fetched(self) -> None:
        """Sync: read what was added to the fetched list since the last read.

        The folder may be shared with other users: only digests are taken, and a list grown
        past its bound (or holding that many names) is started afresh.
        """
        if self._dir is None:
            return
        fd = open_regular(_FETCHED_FILE, self._dir)
        if fd is None:
            return
        try:
            size = os.fstat(fd).st_size
            if size > _MAX_FETCHED_BYTES or len(self.fetched_once) > _MAX_FETCHED_NAMES:
                with contextlib.suppress(OSError):
                    os.unlink(_FETCHED_FILE, dir_fd=self._dir)
                self._fetched_read = 0
                self.fetched_once.clear()
                return
            if size < self._fetched_read:
                self._fetched_read = 0  # started afresh by another run
            if size == self._fetched_read:
                return
            data = os.pread(fd, size - self._fetched_read, self._fetched_read)
        finally:
            os.close(fd)
        end = data.rfind(b"\n") + 1  # a line being appended right now is read later...
        if not end and len(data) > _MAX_LINE:
            end = len(data)  # ...unless it is no line of ours at all
        self._fetched_read += end
        self.fetched_once.update(_DIGEST_LINE.findall(data[:end].decode("ascii", "replace")))

    async def _apply_cached(self, tree: LayerTree, image: str, digest: str, size: int) -> bool:
        """Apply a cached blob; False when it vanished (then it is forgotten)."""
        assert self._dir is not None
        name = self._name(digest)
        try:
            result = await anyio.to_thread.run_sync(
                _apply_file, tree, image, digest, size, name, self._dir
            )
        except DigestMismatch:
            log.warning("cached layer %s is corrupt; it will be fetched again", digest)
            self._cached.pop(digest, None)
            await anyio.to_thread.run_sync(self._unlink_all, [name])
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
        await self._append(_UNTOUCHED_FILE, f"{self.root} {digest}\n")

    async def _remember_fetched(self, digest: str) -> None:
        self.fetched_once.add(digest)
        await self._append(_FETCHED_FILE, f"{digest}\n")

    async def _append(self, name: str, line: str) -> None:
        """Append a line to one of the folder's lists (a link planted there is replaced)."""
        if self._dir is None:
            return
        data = line.encode()

        def append() -> None:
            assert self._dir is not None
            fd = open_regular(name, self._dir, APPEND_FLAGS)
            if fd is None:
                # a link or something else planted in its place: replaced, never followed
                os.unlink(name, dir_fd=self._dir)
                fd = open_regular(name, self._dir, APPEND_FLAGS)
                if fd is None:
                    return
            try:
                os.write(fd, data)
            finally:
                os.close(fd)

        with contextlib.suppress(OSError):
            await anyio.to_thread.run_sync(append)

    async def _keep(self, digest: str, partial: str, size: int) -> bool:
        """Keep a partial download as the digest's blob; False when it cannot take that name."""
        assert self._dir is not None and self._partial is not None
        source, folder = self._partial, self._dir
        try:
            await anyio.to_thread.run_sync(
                lambda: os.replace(
                    partial, self._name(digest), src_dir_fd=source, dst_dir_fd=folder
                )
            )
        except OSError as exc:  # e.g. a folder planted under that name
            log.warning("layer %s is not kept in the blob cache: %s", digest, exc)
            return False
        self._cached[digest] = _Cached(size, time.time())
        doomed = self._evict()
        if doomed:
            await anyio.to_thread.run_sync(self._unlink_all, doomed)
        return True

    def _evict(self) -> list[str]:
        """Forget the least recently used blobs beyond the bound; return their names."""
        total = sum(entry.size for entry in self._cached.values())
        doomed: list[str] = []
        for digest, entry in sorted(self._cached.items(), key=lambda item: item[1].used):
            if total <= self.max_bytes:
                break
            doomed.append(self._name(digest))
            del self._cached[digest]
            total -= entry.size
        return doomed

    def _unlink_all(self, names: list[str]) -> None:
        """Unlink the names in the folder (a link is removed itself, never followed)."""
        for name in names:
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=self._dir)


@contextlib.contextmanager
def _corrupt_blob_named(blob: Blob) -> Iterator[None]:
    """A parse error of a corrupt blob is reported as the digest mismatch it is, not as bad tar."""
    try:
        yield
    except (UnsafeArchive, TruncatedArchive) as exc:
        mismatch = blob.mismatch()
        if mismatch is not None:
            raise mismatch from exc
        raise


def _apply_checked(tree: LayerTree, blob: Blob) -> LayerResult:
    """Apply a blob and check its digest."""
    ahead = ReadAhead(lambda: decompressed(blob, blob.digest))
    with _corrupt_blob_named(blob):
        try:
            result = tree.apply(ahead.read)
        finally:
            ahead.close()
    blob.finish()
    return result


def _apply_stream(
    tree: LayerTree, image: str, digest: str, size: int, tee: Tee | None, read: Read
) -> LayerResult:
    """Thread: apply a blob as it streams in, teeing it to tee; check it at the end."""
    out = tee.create() if tee is not None else None
    try:
        blob = Blob(read, image, digest, size, out)
        result = _apply_checked(tree, blob)
    finally:
        if out is not None:
            os.close(out)
    if result.links_pending and tee is not None:
        with open(tee.reopen(), "rb", buffering=0) as again:
            tree.fill_links(decompressed(again.read, digest))
        return LayerResult(result.touched, links_pending=False)
    return result


def _fill_stream(tree: LayerTree, image: str, digest: str, size: int, read: Read) -> None:
    """Thread: fill the last layer's hardlinks to files outside the root from the blob fetched
    again, read to its end and checked (what was written is not kept if it does not match)."""
    blob = Blob(read, image, digest, size, None)
    with _corrupt_blob_named(blob):
        tree.fill_links(decompressed(blob, digest))
    blob.finish()


def _apply_file(
    tree: LayerTree, image: str, digest: str, size: int, name: str, folder: int
) -> LayerResult | None:
    """Thread: apply a cached blob, checking its digest again; None when it is gone."""
    fd = open_regular(name, folder)
    if fd is None:
        return None
    with open(fd, "rb", buffering=0) as handle:
        os.utime(handle.fileno())
        blob = Blob(handle.read, image, digest, size, None)
        result = _apply_checked(tree, blob)
        if result.links_pending:
            handle.seek(0)
            tree.fill_links(decompressed(handle.read, digest))
    return result
