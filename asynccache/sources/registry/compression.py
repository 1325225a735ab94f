"""Layer blobs as read: counted and checked against their digest, gzip or zstd inflated."""

from __future__ import annotations

import hashlib
import os
from typing import IO, cast

from isal import isal_zlib

from asynccache._threads import READ_SIZE, Read
from asynccache.errors import DigestMismatch, TransferFailed, UnsafeArchive

__all__ = ["Blob", "compression_of", "decompressed"]

_GZIP_MAGIC = b"\x1f\x8b"
_INFLATE_ERROR: type[Exception] = getattr(isal_zlib, "error")  # noqa: B009 (typed as an instance)
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def compression_of(head: bytes) -> str:
    """The compression a layer blob starts with: "gzip", "zstd" or "tar" (none)."""
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    if len(head) >= 4 and head[0] & 0xF0 == 0x50 and head[1:4] == b"\x2a\x4d\x18":
        return "zstd"
    return "tar"


class Blob:
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
        while self.read(READ_SIZE):
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
        return self._read(size if size > 0 else READ_SIZE)


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
                    rest = self._source(READ_SIZE)
                if not rest.startswith(_GZIP_MAGIC[: len(rest)]) or not rest:
                    return b""
                self._inflate = _gunzipper()
                self._pending = rest
                continue
            if not self._pending:
                self._pending = self._source(READ_SIZE)
                if not self._pending:
                    return b""
            try:
                data = inflate.decompress(self._pending, size)
            except _INFLATE_ERROR as exc:
                raise UnsafeArchive(self._name, f"corrupt gzip data ({exc})") from None
            self._pending = inflate.unconsumed_tail
            if data:
                return data


def decompressed(blob: Blob | Read, name: str) -> Read:
    """A reader of the uncompressed layer tar, the compression found from the magic bytes."""
    read = blob.read if isinstance(blob, Blob) else blob
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
            cast("IO[bytes]", source), read_size=READ_SIZE, read_across_frames=True
        )

        def read_zstd(size: int) -> bytes:
            try:
                return bytes(reader.read(max(size, 1)))
            except zstandard.ZstdError as exc:
                raise UnsafeArchive(name, f"corrupt zstd data ({exc})") from None

        return read_zstd
    return source.read
