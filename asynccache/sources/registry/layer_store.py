"""Image layers applied to a tree: decompression, digest checks, shared fetches, a blob cache."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

import anyio
import anyio.to_thread
from isal import isal_zlib

from asynccache.errors import DigestMismatch, TransferFailed, TruncatedArchive, UnsafeArchive
from asynccache.tree.extract import LayerResult, LayerTree, feed_thread

log = logging.getLogger(__name__)

#: Default bound of the blob cache under cache_dir/.layers.
DEFAULT_CACHE_BYTES = 2 << 30
LAYERS_DIR_NAME = ".layers"
_PARTIAL_DIR = ".partial"
_UNTOUCHED_FILE = "untouched"
_READ_SIZE = 1 << 20
_READ_AHEAD_CHUNKS = 4
_GZIP_MAGIC = b"\x1f\x8b"
_INFLATE_ERROR: type[Exception] = getattr(isal_zlib, "error")  # noqa: B009 (typed as an instance)
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

Read = Callable[[int], bytes]
#: Opens a layer blob and gives its chunks.
BlobOpener = Callable[[], AbstractAsyncContextManager[AsyncIterator[bytes]]]


def compression_of(head: bytes) -> str:
    """The compression a layer blob starts with: "gzip", "zstd" or "tar" (none)."""
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    if len(head) >= 4 and head[0] & 0xF0 == 0x50 and head[1:4] == b"\x2a\x4d\x18":
        return "zstd"
    return "tar"


class _Blob:
    """The compressed bytes of a blob as read: counted, hashed, capped at the size, teed."""

    def __init__(self, read: Read, image: str, digest: str, size: int, tee: int | None) -> None:
        algorithm, _, self.expected = digest.partition(":")
        self._hash = hashlib.new(algorithm)
        self._read = read
        self.image = image
        self.digest = digest
        self.size = size
        self.remaining = size
        self.tee = tee

    def read(self, size: int) -> bytes:
        """Read at most size bytes of the blob."""
        data = self._read(size)
        if data:
            if len(data) > self.remaining:
                raise DigestMismatch(
                    self.image, self.digest, f"more than the {self.size} bytes of its descriptor"
                )
            self.remaining -= len(data)
            self._hash.update(data)
            if self.tee is not None:
                view = memoryview(data)
                while view:
                    view = view[os.write(self.tee, view) :]
        return data

    def mismatch(self) -> DigestMismatch | None:
        """After a failed parse: the DigestMismatch that explains it, if the blob is corrupt."""
        try:
            self.finish()
        except DigestMismatch as exc:
            return exc
        except Exception:
            return None
        return None

    def finish(self) -> None:
        """Read the rest of the blob, then check its size and digest."""
        while self.read(_READ_SIZE):
            pass
        if self.remaining:
            raise TransferFailed(
                f"blob {self.digest} of {self.image} ended after "
                f"{self.size - self.remaining} of {self.size} bytes"
            )
        actual = self._hash.hexdigest()
        if actual != self.expected:
            raise DigestMismatch(self.image, self.digest, f"got {self._hash.name}:{actual}")


class _Head:
    """A reader that gives some bytes already read before the rest."""

    def __init__(self, head: bytes, read: Read) -> None:
        self._head = head
        self._read = read

    def read(self, size: int = -1) -> bytes:
        """Read at most size bytes."""
        if self._head:
            if size < 0 or size >= len(self._head):
                data, self._head = self._head, b""
            else:
                data, self._head = self._head[:size], self._head[size:]
            return data
        return self._read(size if size > 0 else _READ_SIZE)


def _gunzipper() -> isal_zlib.Decompress:
    """A streaming gzip decompressor: ISA-L's, zlib's interface, about three times as fast."""
    return isal_zlib.decompressobj(31)


class _Gunzip:
    """Streaming gzip decompression (concatenated members too) with bounded output per read."""

    def __init__(self, source: Read, name: str) -> None:
        self._source = source
        self._name = name
        self._inflate = _gunzipper()
        self._pending = b""

    def read(self, size: int) -> bytes:
        """Read at most size decompressed bytes (b"" at the end)."""
        size = max(size, 1)
        while True:
            inflate = self._inflate
            if inflate.eof:
                rest = inflate.unused_data + self._pending
                self._pending = b""
                if not rest:
                    rest = self._source(_READ_SIZE)
                if not rest.startswith(_GZIP_MAGIC[: len(rest)]) or not rest:
                    return b""
                self._inflate = _gunzipper()
                self._pending = rest
                continue
            if not self._pending:
                self._pending = self._source(_READ_SIZE)
                if not self._pending:
                    return b""
            try:
                data = inflate.decompress(self._pending, size)
            except _INFLATE_ERROR as exc:
                raise UnsafeArchive(self._name, f"corrupt gzip data ({exc})") from None
            self._pending = inflate.unconsumed_tail
            if data:
                return data


def decompressed(blob: _Blob | Read, name: str) -> Read:
    """A reader of the uncompressed layer tar, the compression found from the magic bytes."""
    read = blob.read if isinstance(blob, _Blob) else blob
    head = b""
    while len(head) < 4:
        data = read(4 - len(head))
        if not data:
            break
        head += data
    source = _Head(head, read)
    kind = compression_of(head)
    if kind == "gzip":
        return _Gunzip(source.read, name).read
    if kind == "zstd":
        try:
            import zstandard
        except ImportError:
            raise UnsafeArchive(name, "zstd layer: install the zstandard package") from None
        reader = zstandard.ZstdDecompressor().stream_reader(
            cast("IO[bytes]", source), read_size=_READ_SIZE, read_across_frames=True
        )

        def read_zstd(size: int) -> bytes:
            try:
                return bytes(reader.read(max(size, 1)))
            except zstandard.ZstdError as exc:
                raise UnsafeArchive(name, f"corrupt zstd data ({exc})") from None

        return read_zstd
    return source.read


@dataclass
class _Cached:
    size: int
    used: float


class LayerStore:
    """A run's layers: empty ones remembered, one fetch at a time, a bounded blob cache."""

    def __init__(
        self, folder: Path | None, *, root: str = "testbed", max_bytes: int = DEFAULT_CACHE_BYTES
    ) -> None:
        self.folder = folder
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
        partial = self.folder / _PARTIAL_DIR
        partial.mkdir(parents=True, exist_ok=True)
        for stale in partial.iterdir():
            with contextlib.suppress(OSError):
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
                self.folder / _PARTIAL_DIR / f"{digest.replace(':', '-')}.{secrets.token_hex(4)}"
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


class _ReadAhead:
    """Runs a reader in a thread of its own, a few chunks ahead of the consumer.

    Reading a blob, hashing it and inflating it release the GIL for most of their time, so
    on a machine with a second core they overlap the parsing and file writing of the layer.
    The reader's exceptions reach the consumer unchanged, in order.
    """

    def __init__(self, open_reader: Callable[[], Read], depth: int = _READ_AHEAD_CHUNKS) -> None:
        self._queue: queue.Queue[bytes | Exception] = queue.Queue(depth)
        self._stop = threading.Event()
        self._view = memoryview(b"")
        self._offset = 0
        self._ended = False
        self._thread = threading.Thread(
            target=self._produce, args=(open_reader,), name="asynccache-read-ahead", daemon=True
        )
        self._thread.start()

    def _produce(self, open_reader: Callable[[], Read]) -> None:
        try:
            read = open_reader()
            while not self._stop.is_set():
                data = read(_READ_SIZE)
                self._put(data)
                if not data:
                    return
        except Exception as exc:
            self._put(exc)

    def _put(self, item: bytes | Exception) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self, size: int) -> bytes:
        """Read at most size bytes (b"" at the end)."""
        if self._offset >= len(self._view):
            if self._ended:
                return b""
            item = self._queue.get()
            if isinstance(item, Exception):
                self._ended = True
                raise item
            if not item:
                self._ended = True
                return b""
            if size >= len(item):
                return item  # a whole chunk, handed over without a copy
            self._view, self._offset = memoryview(item), 0
        start = self._offset
        self._offset = min(start + max(size, 1), len(self._view))
        return bytes(self._view[start : self._offset])

    def close(self) -> None:
        """Stop the reading thread and wait for it (it may finish a read in progress)."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)
        self._thread.join()


def _apply_checked(tree: LayerTree, blob: _Blob) -> LayerResult:
    """Apply a blob and check its digest; a corrupt blob is reported as such, not as bad tar."""
    ahead = _ReadAhead(lambda: decompressed(blob, blob.digest))
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
        blob = _Blob(read, image, digest, size, tee)
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
        blob = _Blob(handle.read, image, digest, size, None)
        result = _apply_checked(tree, blob)
        if result.links_pending:
            handle.seek(0)
            tree.fill_links(decompressed(handle.read, digest))
    return result
