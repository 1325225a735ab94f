"""How an extraction writes a regular file's data into the file it opened.

In as few system calls as possible, hashed as it goes when the digest needs it, a sparse
member's segments at their offsets; and no partial file is left when the data ends early.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

__all__ = [
    "FILE_FLAGS",
    "SparseWriter",
    "removed_unless_done",
    "unlinked_unless_done",
    "write_all",
    "write_hashed",
]

#: Flags of every regular file an extraction creates.
FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: Most buffers gathered into one writev.
MAX_IOV = 512


def write_all(fd: int, pieces: list[bytes], total: int) -> None:
    """Write pieces to fd in one system call when the kernel takes them all."""
    if len(pieces) > MAX_IOV:
        pieces = [b"".join(pieces)]
    written = os.writev(fd, pieces) if len(pieces) > 1 else os.write(fd, pieces[0])
    if written < total:
        rest = memoryview(b"".join(pieces))[written:]
        while rest:
            rest = rest[os.write(fd, rest) :]


class SparseWriter:
    """A sink that writes a sparse member's data, as it is read, at its segments' offsets.

    The holes between segments are never written: the file gets them as holes, as GNU tar
    gives them (the caller sets the file's full size at the end).
    """

    def __init__(self, fd: int, segments: list[tuple[int, int]]) -> None:
        self.fd = fd
        self._segments = [segment for segment in segments if segment[1]]
        self._index = 0
        self._done = 0  # bytes of the current segment written

    def __call__(self, pieces: list[bytes], total: int) -> None:
        for piece in pieces:
            view = memoryview(piece)
            while view:
                offset, length = self._segments[self._index]
                take = min(len(view), length - self._done)
                part, at = view[:take], offset + self._done
                while part:
                    written = os.pwrite(self.fd, part, at)
                    part, at = part[written:], at + written
                self._done += take
                view = view[take:]
                if self._done == length:
                    self._index += 1
                    self._done = 0


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...


def write_hashed(fd: int, content: _Hasher, pieces: list[bytes], total: int) -> None:
    """Write pieces to fd and add them to the content hash."""
    write_all(fd, pieces, total)
    for piece in pieces:
        content.update(piece)


@contextmanager
def removed_unless_done(full: bytes) -> Iterator[None]:
    """Remove the file at full when the block fails: whoever does the work again must not find
    it there and take it for what an earlier layer left."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(full)
        raise


@contextmanager
def unlinked_unless_done(fd: int, full: bytes) -> Iterator[None]:
    """Close fd at the end; remove the file when its data could not all be written.

    A stream that ends or fails inside a file's data leaves no partial file behind.
    """
    with removed_unless_done(full):
        try:
            yield
        finally:
            os.close(fd)
