"""The members of a tar stream, read once from front to back.

Plain ustar header blocks (by far the most common) are parsed here in one step. Extended
headers (pax, GNU long names, GNU sparse maps) are read here too, and header blocks that are
not plain (base-256 numbers, old checksums) go through tarfile's block parser. Where tar
readers differ, GNU tar and Go's archive/tar (which Docker uses) decide:

- only a POSIX ustar header has a name prefix (an old GNU header holds times there);
- of two GNU long names (or long link names, or pax headers) before one member the last
  wins, and a pax ``path`` wins over a GNU long name, as GNU tar has it;
- global pax headers are checked and skipped, as Docker's layer extraction does;
- a malformed pax record or number (``size``, ``mtime``, ...) makes the archive malformed;
- GNU sparse members (old GNU, pax 0.0, 0.1 and 1.0) give their data segments.
"""

from __future__ import annotations

import re
import struct
import tarfile
from collections.abc import Callable, Iterator
from typing import TypeVar

from asynccache.errors import CacheError, TruncatedArchive, UnsafeArchive
from asynccache.tree.budget import Budget

__all__ = [
    "CHUNK",
    "HEADER_BUDGET",
    "SPARSE_MAP_BUDGET",
    "Malformed",
    "Member",
    "Sink",
    "Source",
    "SourceError",
    "TarReader",
    "Truncated",
    "members",
    "plain_header",
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
_POSIX_MAGIC = b"ustar\0"
#: The fields of a ustar header block, the 12 bytes of padding left out.
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
_INTEGER = re.compile(r"[-+]?[0-9]+", re.ASCII)
_TIME = re.compile(r"[-+]?[0-9]+(\.[0-9]*)?", re.ASCII)
_DIGITS = re.compile(rb"[0-9]+")
_RECORD_LENGTH = re.compile(rb"([0-9]+) ")
_SPARSE_OFFSET = "GNU.sparse.offset"
_SPARSE_NUMBYTES = "GNU.sparse.numbytes"
_SPARSE_MAP = "GNU.sparse.map"

_InfoT = TypeVar("_InfoT", bound=tarfile.TarInfo)
#: Takes the pieces of a member's data and their total size.
Sink = Callable[[list[bytes], int], object]


class Truncated(Exception):
    """The stream ended too early."""


class Malformed(Exception):
    """A header cannot be parsed or breaks a limit."""


class SourceError(Exception):
    """Carries an exception raised by the underlying stream through the parser unchanged."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class Member(tarfile.TarInfo):
    """A member's header: tarfile's fields, and a sparse file's data segments.

    ``size`` is the size of the file as extracted; a sparse file's data in the archive is
    its segments only (see :attr:`stored`).
    """

    #: (offset, length) of each piece of a sparse file's data, in order; None when not sparse.
    segments: list[tuple[int, int]] | None = None

    @property
    def stored(self) -> int:
        """Bytes of file data the member holds in the archive."""
        segments = self.segments
        return self.size if segments is None else sum(length for _, length in segments)


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


def _octal(field: bytes) -> int:
    """A number field in octal text; ValueError for anything else (base-256 included)."""
    if field[0] in (0o200, 0o377):
        raise ValueError("base-256 number")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _number(field: bytes) -> int:
    """A number field: octal text or GNU base-256 (Malformed for anything else)."""
    if field[0] in (0o200, 0o377):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise Malformed(f"invalid number {field!r} in a header") from None


def _text(field: bytes, encoding: str, errors: str) -> str:
    return field.split(b"\0", 1)[0].decode(encoding, errors)


def plain_header(
    cls: type[_InfoT], buf: bytes | bytearray, encoding: str, errors: str
) -> _InfoT | None:
    """TarInfo.frombuf for the common block, quicker; None leaves the rest to the slow path.

    Gives what frombuf gives for a complete block with a valid unsigned checksum, octal
    numbers and no old GNU sparse data, except that only a POSIX ustar block has a name
    prefix; anything else (end-of-archive blocks, bad checksums, base-256 numbers) returns
    None.
    """
    if len(buf) != _BLOCK:
        return None
    fields = _HEADER.unpack(buf)
    (name, mode, uid, gid, size, mtime, chksum, kind, linkname, magic) = fields[:10]
    (uname, gname, devmajor, devminor, prefix) = fields[11:]
    if kind == tarfile.GNUTYPE_SPARSE:
        return None
    try:
        checksum = _octal(chksum)
        if checksum != 256 + sum(buf) - sum(chksum):
            return None
        info = cls()
        info.mode = _octal(mode)
        info.uid = _octal(uid)
        info.gid = _octal(gid)
        info.size = _octal(size)
        info.mtime = _octal(mtime)
        info.devmajor = _octal(devmajor)
        info.devminor = _octal(devminor)
    except ValueError:
        return None
    info.chksum = checksum
    info.type = kind
    text = _text(name, encoding, errors)
    info.linkname = _text(linkname, encoding, errors)
    info.uname = _text(uname, encoding, errors)
    info.gname = _text(gname, encoding, errors)
    if kind == tarfile.AREGTYPE and text.endswith("/"):
        info.type = tarfile.DIRTYPE
    if info.type == tarfile.DIRTYPE:
        text = text.rstrip("/")
    if prefix[0] and magic == _POSIX_MAGIC and info.type not in tarfile.GNU_TYPES:
        text = _text(prefix, encoding, errors) + "/" + text
    info.name = text
    return info


def _header_block(block: bytes, encoding: str, errors: str) -> Member:
    """Any complete, non-zero header block as a Member (Malformed when it cannot be one)."""
    info = plain_header(Member, block, encoding, errors)
    if info is None:
        try:
            info = Member.frombuf(block, encoding, errors)
        except tarfile.HeaderError as exc:
            raise Malformed(f"malformed tar header ({exc})") from None
        if block[345] and block[257:263] != _POSIX_MAGIC and info.type not in tarfile.GNU_TYPES:
            # tarfile joins a prefix whatever the magic; an old GNU header holds times there
            name = _text(block[:100], encoding, errors)
            info.name = name.rstrip("/") if info.isdir() else name
    if info.size < 0:
        raise Malformed(f"negative size in the header of {info.name!r}")
    return info


def _pax_records(data: bytes) -> dict[str, str]:
    """The records of a pax header, as GNU tar and Go read them (Malformed when they cannot be).

    GNU sparse 0.0 repeats ``GNU.sparse.offset`` and ``GNU.sparse.numbytes``; they are joined
    into ``GNU.sparse.map``, as Go does. NUL bytes after the last record are padding.
    """
    records: dict[str, str] = {}
    sparse: list[str] = []
    at, end = 0, len(data)
    while at < end:
        if data[at] == 0 and data.count(0, at) == end - at:
            break
        match = _RECORD_LENGTH.match(data, at)
        length = int(match.group(1)) if match else 0
        stop = at + length
        if match is None or stop > end or stop <= match.end() or data[stop - 1] != 0x0A:
            raise Malformed(f"malformed pax record at byte {at} of its header")
        key, equals, value = data[match.end() : stop - 1].partition(b"=")
        if not equals or not key or 0 in key:
            raise Malformed(f"malformed pax record at byte {at} of its header")
        name = key.decode("utf-8", "surrogateescape")
        text = value.decode("utf-8", "surrogateescape")
        if name in (_SPARSE_OFFSET, _SPARSE_NUMBYTES):
            wanted = _SPARSE_OFFSET if len(sparse) % 2 == 0 else _SPARSE_NUMBYTES
            if name != wanted or "," in text:
                raise Malformed("malformed GNU sparse 0.0 records")
            sparse.append(text)
        else:
            records[name] = text
        at = stop
    if sparse:
        records[_SPARSE_MAP] = ",".join(sparse)
    return records


def _pax_integer(key: str, value: str) -> int:
    if not _INTEGER.fullmatch(value):
        raise Malformed(f"malformed pax {key} {value!r}")
    return int(value)


def _pax_time(key: str, value: str) -> int | float:
    """A pax time: seconds, maybe with a fraction (an int when it has none)."""
    match = _TIME.fullmatch(value)
    if match is None:
        raise Malformed(f"malformed pax {key} {value!r}")
    return int(value) if match.group(1) is None else float(value)


def _apply_pax(info: Member, records: dict[str, str]) -> None:
    """Give the member the fields of its pax header."""
    for key, value in records.items():
        if key == "path":
            info.name = value.rstrip("/")
        elif key == "linkpath":
            info.linkname = value
        elif key == "size":
            info.size = _pax_integer(key, value)
        elif key == "mtime":
            info.mtime = _pax_time(key, value)
        elif key == "uid":
            info.uid = _pax_integer(key, value)
        elif key == "gid":
            info.gid = _pax_integer(key, value)
        elif key == "uname":
            info.uname = value
        elif key == "gname":
            info.gname = value
        elif key in ("atime", "ctime"):
            _pax_time(key, value)
    info.pax_headers = records
    if info.size < 0:
        raise Malformed(f"negative size in the header of {info.name!r}")


def _sparse_version(records: dict[str, str]) -> str | None:
    """The GNU sparse format a pax header names ("0.x" or "1.0"), as Go tells it; None if none."""
    major, minor = records.get("GNU.sparse.major"), records.get("GNU.sparse.minor")
    if major == "0" and minor in ("0", "1"):
        return "0.x"
    if major == "1" and minor == "0":
        return "1.0"
    if major is not None or minor is not None:
        return None  # an unknown version: the member is read as a plain file, as Go does
    return "0.x" if records.get(_SPARSE_MAP) else None


def _sparse_entries(block: bytes, start: int, count: int, into: list[tuple[int, int]]) -> None:
    """The (offset, length) entries of an old GNU sparse block, up to the first empty one."""
    for index in range(count):
        at = start + 24 * index
        if block[at] == 0:
            return
        into.append((_number(block[at : at + 12]), _number(block[at + 12 : at + 24])))


def _pairs(numbers: list[int]) -> list[tuple[int, int]]:
    return list(zip(numbers[::2], numbers[1::2], strict=True))


def _checked_segments(
    name: str, entries: list[tuple[int, int]], size: int, stored: int
) -> list[tuple[int, int]]:
    """A sparse map that is in order, within the file's size and matches its data, as Go checks."""
    end = total = 0
    for offset, length in entries:
        if offset < 0 or length < 0 or offset < end or offset + length > size:
            raise Malformed(f"sparse map of {name!r} out of order or past the file's size")
        end = offset + length
        total += length
    if total != stored:
        raise Malformed(f"sparse map of {name!r} covers {total} bytes, its data is {stored}")
    return entries


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
            self._skip_to(at)
            self._bound(at, HEADER_BUDGET)
            try:
                block = self.read(_BLOCK)
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
                if info is not None and info.type == tarfile.XGLTYPE and info.size >= 0:
                    # a global header on its own: checked, skipped, and the next member is read
                    # within a budget of its own (Docker's extraction never applies one)
                    _pax_records(self._special(info))
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
        return _header_block(block, self.encoding, self.errors)

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
                text = _text(self._special(info), self.encoding, self.errors)
                if kind == tarfile.GNUTYPE_LONGNAME:
                    long_name = text
                else:
                    long_link = text
            elif kind in _PAX_TYPES:
                records = _pax_records(self._special(info))
            elif kind == tarfile.XGLTYPE:
                _pax_records(self._special(info))
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
            _apply_pax(info, records)
            version = _sparse_version(records)
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
            realsize = self._pax_sparse_size(info, records)
            if version == "1.0":
                numbers, used = self._sparse_map_10()
                info.offset_data = start + used
                stored -= used
                entries = _pairs(numbers)
            else:
                entries = self._sparse_map_0x(records)
        if entries is not None:
            if stored < 0:
                raise Malformed(f"sparse map of {info.name!r} larger than its member")
            info.segments = _checked_segments(info.name, entries, realsize, stored)
            info.size = realsize
        return info

    @staticmethod
    def _pax_sparse_size(info: Member, records: dict[str, str]) -> int:
        """The size of a pax sparse file, and its name, from its records."""
        name = records.get("GNU.sparse.name")
        if name:
            info.name = name
        text = records.get("GNU.sparse.size") or records.get("GNU.sparse.realsize")
        return info.size if text is None else _pax_integer("GNU.sparse.size", text)

    @staticmethod
    def _sparse_map_0x(records: dict[str, str]) -> list[tuple[int, int]]:
        """The map of a GNU sparse 0.0 or 0.1 pax header."""
        count = _pax_integer("GNU.sparse.numblocks", records.get("GNU.sparse.numblocks", ""))
        text = records.get(_SPARSE_MAP, "")
        fields = text.split(",") if text else []
        if count < 0 or len(fields) != 2 * count:
            raise Malformed("GNU sparse map does not match its number of blocks")
        return _pairs([_pax_integer(_SPARSE_MAP, field) for field in fields])

    def _old_gnu_sparse(self, block: bytes) -> tuple[list[tuple[int, int]], int]:
        """The map and size of an old GNU sparse member, with its extension blocks."""
        entries: list[tuple[int, int]] = []
        _sparse_entries(block, 386, 4, entries)
        extended = block[482]
        realsize = _number(block[483:495])
        self._bound(self._position, SPARSE_MAP_BUDGET)
        while extended:
            more = self.read(_BLOCK)
            if len(more) < _BLOCK:
                raise Truncated("the stream ended inside a member header")
            _sparse_entries(more, 0, 21, entries)
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


def _parse(call: Callable[[], Member | None], source: Source, at: int) -> Member | None:
    """Run one parsing step, mapping its failures to domain errors."""
    try:
        return call()
    except (SourceError, Truncated, CacheError):
        raise
    except Malformed as exc:
        raise UnsafeArchive(f"<header at byte {at}>", str(exc)) from None
    except Exception as exc:
        if source.at_eof:
            raise Truncated(f"the stream ended before the header at byte {at}") from None
        raise UnsafeArchive(f"<header at byte {at}>", f"malformed tar header ({exc})") from None


def members(source: Source) -> Iterator[tuple[TarReader, Member]]:
    """Each member of the tar stream source reads, up to its end-of-archive marker."""
    reader = TarReader(source)
    while True:
        info = _parse(reader.next, source, reader.offset)
        if info is None:
            return
        yield reader, info
