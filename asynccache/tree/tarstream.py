"""The members of a tar stream, read once from front to back.

Which extended headers (pax, GNU long names, GNU sparse maps) belong to which member, and each
member's data; the blocks and records themselves are decoded in ``tar_headers.py``. Where tar
readers differ, GNU tar and Go's archive/tar (which Docker uses) decide:

- of two GNU long names (or long link names, or pax headers) before one member the last
  wins, and a pax ``path`` wins over a GNU long name, as GNU tar has it;
- global pax headers are checked and skipped, as Docker's layer extraction does;
- GNU sparse members (old GNU, pax 0.0, 0.1 and 1.0) give their data segments.
"""

from __future__ import annotations

import re
import tarfile
from collections.abc import Callable, Iterator

from asynccache.errors import CacheError, TruncatedArchive, UnsafeArchive
from asynccache.tree.budget import Budget
from asynccache.tree.tar_headers import (
    Malformed,
    Member,
    apply_pax,
    checked_segments,
    header_block,
    number_field,
    pairs,
    pax_records,
    pax_sparse_size,
    plain_header,
    sparse_entries,
    sparse_map_0x,
    sparse_version,
    text_field,
)

__all__ = [
    "CHUNK",
    "HEADER_BUDGET",
    "SPARSE_MAP_BUDGET",
    "Sink",
    "Source",
    "SourceError",
    "TarReader",
    "Truncated",
    "members",
]

#: Most bytes the headers of one member (ustar, pax, GNU long names) may take.
HEADER_BUDGET = 16 * 1024
#: Most bytes a sparse member's map may take besides (old GNU extension blocks, pax 1.0 map).
SPARSE_MAP_BUDGET = 1 << 20
#: Largest read from the source, and largest piece of member data handed out.
CHUNK = 1 << 20
_BLOCK = tarfile.BLOCKSIZE
#: Most pieces handed to a sink at once (a writev takes a bounded number).
_MAX_PIECES = 512
#: Member types whose plain header block needs nothing more.
_QUICK_TYPES = frozenset(
    (
        *tarfile.REGULAR_TYPES,
        tarfile.DIRTYPE,
        tarfile.SYMTYPE,
        tarfile.LNKTYPE,
        tarfile.CHRTYPE,
        tarfile.BLKTYPE,
        tarfile.FIFOTYPE,
    )
)
_LONG_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
_PAX_TYPES = (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE)
#: The magic of a POSIX ustar header, the only kind with a name prefix field.
#: The fields of a ustar header block, the 12 bytes of padding left out.
_DIGITS = re.compile(rb"[0-9]+")

#: Takes the pieces of a member's data and their total size.
Sink = Callable[[list[bytes], int], object]


class Truncated(Exception):
    """The stream ended too early."""


class SourceError(Exception):
    """Carries an exception raised by the underlying stream through the parser unchanged."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class Source:
    """The raw stream: counts bytes (against a budget), tells its end, tunnels its errors."""

    __slots__ = ("_read", "_spill", "at_eof", "budget", "consumed")

    def __init__(self, read: Callable[[int], bytes], budget: Budget | None = None) -> None:
        self._read = read
        self._spill = b""
        self.consumed = 0
        self.at_eof = False
        #: Charged with every byte read and every member header (None: unbounded).
        self.budget = budget

    def read(self, size: int) -> bytes:
        """Read at most size bytes."""
        if self._spill:
            data, self._spill = self._spill[:size], self._spill[size:]
        else:
            try:
                data = self._read(size)
            except Exception as exc:
                raise SourceError(exc) from exc
            if not data:
                if size:
                    self.at_eof = True
                return b""
            if len(data) > size:
                data, self._spill = data[:size], data[size:]
        self.consumed += len(data)
        if self.budget is not None:
            self.budget.take_bytes(len(data))
        return data


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


class TarReader:
    """Headers and data of a tar stream, in order, from one buffer."""

    encoding = "utf-8"
    errors = "surrogateescape"

    def __init__(self, source: Source) -> None:
        self.source = source
        #: Where the next member header starts.
        self.offset = 0
        #: The end-of-archive marker was read.
        self.end_seen = False
        self._buf = b""
        self._pos = 0
        self._position = 0
        # where header reads must stop, and the budget that end stands for
        self._limit: int | None = None
        self._limit_size = 0

    def tell(self) -> int:
        """The stream offset of the next byte to read."""
        return self._position

    def read(self, size: int) -> bytes:
        """Read size bytes (fewer only at the end of the stream), within the header budget."""
        if self._limit is not None and self._position + size > self._limit:
            raise Malformed(f"member headers larger than {self._limit_size} bytes")
        data = self._take(size)
        if len(data) == size or not data:
            return data
        parts = [data]
        got = len(data)
        while got < size:
            more = self._take(size - got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def _take(self, size: int) -> bytes:
        """At most size bytes: what is buffered, or one more read of the source."""
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            buf = self.source.read(CHUNK)
            self._buf, pos = buf, 0
            if not buf:
                self._pos = 0
                return b""
        end = pos + size
        data = buf if pos == 0 and end >= len(buf) else buf[pos:end]
        self._pos = pos + len(data)
        self._position += len(data)
        return data

    def _skip_to(self, offset: int) -> None:
        while self._position < offset:
            if not self._take(offset - self._position):
                raise Truncated(f"the stream ended before the header at byte {offset}")

    def _bound(self, start: int, size: int) -> None:
        self._limit = start + size
        self._limit_size = size

    def next(self) -> Member | None:
        """The next member, or None at the end-of-archive marker."""
        budget = self.source.budget
        while True:
            at = self.offset
            buf = self._buf
            start = self._pos + at - self._position  # past the last member's padding
            if self._position <= at and start + _BLOCK <= len(buf):
                # the block is buffered where the header starts: most members of a layer
                block = buf[start : start + _BLOCK]
                self._pos = start + _BLOCK
                self._position = at + _BLOCK
            else:
                self._skip_to(at)
                block = self.read(_BLOCK)  # one block is within the header budget
            if budget is not None:
                budget.take_member()
            info = plain_header(Member, block, self.encoding, self.errors)
            if info is not None and info.type in _QUICK_TYPES:
                if info.size < 0:
                    raise Malformed(f"negative size in the header of {info.name!r}")
                info.offset = at
                info.offset_data = at + _BLOCK
                self.offset = info.offset_data
                if info.type in tarfile.REGULAR_TYPES:
                    self.offset += _padded(info.size)
                return info
            self._bound(at, HEADER_BUDGET)
            try:
                if info is not None and info.type == tarfile.XGLTYPE and info.size >= 0:
                    # a global header on its own: checked, skipped, and the next member is read
                    # within a budget of its own (Docker's extraction never applies one)
                    pax_records(self._special(info))
                    self.offset = self._position
                    continue
                return self._extended(at, block, info)
            finally:
                self._limit = None

    def _block(self, block: bytes, pending: bool) -> Member | None:
        """The header in block; None for a zero block (the end-of-archive marker)."""
        if len(block) < _BLOCK:
            if not block and not pending:
                raise Truncated("the stream ended without the end-of-archive marker")
            raise Truncated("the stream ended inside a member header")
        if block.count(0) == _BLOCK:
            if pending:
                raise Malformed("extended header without a member header")
            self.end_seen = True
            return None
        return header_block(block, self.encoding, self.errors)

    def _special(self, info: tarfile.TarInfo) -> bytes:
        """The data of an extended header (within the header budget)."""
        size = info.size
        data = self.read(_padded(size))
        if len(data) < _padded(size):
            raise Truncated("the stream ended inside a member header")
        return data[:size]

    def _extended(self, at: int, block: bytes, info: Member | None) -> Member | None:
        """A member whose header block is not a plain one, or comes after extended headers."""
        long_name: str | None = None
        long_link: str | None = None
        records: dict[str, str] | None = None
        pending = False
        while True:
            if info is None:
                info = self._block(block, pending)
                if info is None:
                    return None
            if info.size < 0:
                raise Malformed(f"negative size in the header of {info.name!r}")
            kind = info.type
            if kind in _LONG_TYPES:
                text = text_field(self._special(info), self.encoding, self.errors)
                if kind == tarfile.GNUTYPE_LONGNAME:
                    long_name = text
                else:
                    long_link = text
            elif kind in _PAX_TYPES:
                records = pax_records(self._special(info))
            elif kind == tarfile.XGLTYPE:
                pax_records(self._special(info))
            else:
                break
            pending = True
            block = self.read(_BLOCK)
            info = None
        return self._member(at, block, info, long_name, long_link, records)

    def _member(
        self,
        at: int,
        block: bytes,
        info: Member,
        long_name: str | None,
        long_link: str | None,
        records: dict[str, str] | None,
    ) -> Member:
        """Complete a member from its extended headers: names, pax fields, sparse map."""
        info.offset = at
        entries: list[tuple[int, int]] | None = None
        realsize = 0
        if info.type == tarfile.GNUTYPE_SPARSE:
            entries, realsize = self._old_gnu_sparse(block)
        if long_name is not None:
            info.name = long_name
        if long_link is not None:
            info.linkname = long_link
        version = None
        if records is not None:
            apply_pax(info, records)
            version = sparse_version(records)
        if info.isdir():
            info.name = info.name.rstrip("/")
        start = self._position
        has_data = info.type in tarfile.REGULAR_TYPES or info.type not in tarfile.SUPPORTED_TYPES
        self.offset = start + (_padded(info.size) if has_data else 0)
        info.offset_data = start
        stored = info.size
        if records is not None and version is not None:
            if not info.isreg():
                raise Malformed(f"sparse map on {info.name!r}, which is not a regular file")
            realsize = pax_sparse_size(info, records)
            if version == "1.0":
                numbers, used = self._sparse_map_10()
                info.offset_data = start + used
                stored -= used
                entries = pairs(numbers)
            else:
                entries = sparse_map_0x(records)
        if entries is not None:
            if stored < 0:
                raise Malformed(f"sparse map of {info.name!r} larger than its member")
            info.segments = checked_segments(info.name, entries, realsize, stored)
            info.size = realsize
        return info

    def _old_gnu_sparse(self, block: bytes) -> tuple[list[tuple[int, int]], int]:
        """The map and size of an old GNU sparse member, with its extension blocks."""
        entries: list[tuple[int, int]] = []
        sparse_entries(block, 386, 4, entries)
        extended = block[482]
        realsize = number_field(block[483:495])
        self._bound(self._position, SPARSE_MAP_BUDGET)
        while extended:
            more = self.read(_BLOCK)
            if len(more) < _BLOCK:
                raise Truncated("the stream ended inside a member header")
            sparse_entries(more, 0, 21, entries)
            extended = more[504]
        self._limit = None
        return entries, realsize

    def _sparse_map_10(self) -> tuple[list[int], int]:
        """The numbers of a GNU sparse 1.0 map at the start of the data, and the bytes it takes."""
        start = self._position
        self._bound(start, SPARSE_MAP_BUDGET)
        text = bytearray()
        at = 0
        numbers: list[int] = []
        count = -1
        while count < 0 or len(numbers) < 2 * count:
            end = text.find(b"\n", at)
            if end < 0:
                more = self.read(_BLOCK)
                if len(more) < _BLOCK:
                    raise Truncated("the stream ended inside a sparse map")
                text += more
                continue
            field = bytes(text[at:end])
            at = end + 1
            if not _DIGITS.fullmatch(field):
                raise Malformed(f"malformed GNU sparse 1.0 map field {field[:40]!r}")
            if count < 0:
                count = int(field)
            else:
                numbers.append(int(field))
        self._limit = None
        return numbers, self._position - start

    def read_data(self, info: Member) -> list[bytes]:
        """The member's data in memory, one piece per hand-over of :meth:`copy`: a stream read
        a few bytes at a time (a layer of 1-byte gzip members, say) would otherwise cost ~60
        bytes of memory per byte of the file."""
        pieces: list[bytes] = []
        stored = info.stored
        if not stored:
            return pieces
        start = self._pos
        if self._position == info.offset_data and start + stored <= len(self._buf):
            # all buffered (most small files): one slice, as copy would hand it over
            pieces.append(self._buf[start : start + stored])
            self._pos = start + stored
            self._position += stored
            return pieces

        def keep(more: list[bytes], _size: int) -> None:
            pieces.append(more[0] if len(more) == 1 else b"".join(more))

        try:
            self.copy(info, keep)
        except BaseException:
            pieces.clear()  # the traceback keeps this frame, not the data read so far
            raise
        return pieces

    def copy(self, info: Member, sink: Sink) -> None:
        """Hand the member's data to sink, in pieces of at most CHUNK bytes in all."""
        if self._position != info.offset_data:
            raise UnsafeArchive(info.name, "data read out of order")
        remaining = info.stored
        pieces: list[bytes] = []
        pending = 0
        while remaining:
            data = self._take(min(remaining, CHUNK))
            if not data:
                raise TruncatedArchive(f"the stream ended inside the data of {info.name!r}")
            remaining -= len(data)
            pieces.append(data)
            pending += len(data)
            if pending >= CHUNK or len(pieces) >= _MAX_PIECES:
                sink(pieces, pending)
                pieces = []
                pending = 0
        if pieces:
            sink(pieces, pending)


def members(source: Source) -> Iterator[tuple[TarReader, Member]]:
    """Each member of the tar stream source reads, up to its end-of-archive marker.

    A parsing step's failures become domain errors here, without a call of its own per member.
    """
    reader = TarReader(source)
    while True:
        at = reader.offset
        try:
            info = reader.next()
        except (SourceError, Truncated, CacheError):
            raise
        except Malformed as exc:
            raise UnsafeArchive(f"<header at byte {at}>", str(exc)) from None
        except Exception as exc:
            if source.at_eof:
                raise Truncated(f"the stream ended before the header at byte {at}") from None
            raise UnsafeArchive(f"<header at byte {at}>", f"malformed tar header ({exc})") from None
        if info is None:
            return
        yield reader, info
