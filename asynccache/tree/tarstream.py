"""The members of a tar stream, read once from front to back.

Plain ustar header blocks (by far the most common) are parsed here; anything else (pax and
GNU extended headers, the end-of-archive blocks, damaged blocks) goes to tarfile's own
parser, fed from the same buffer, so both give the same members and the same errors.
"""

from __future__ import annotations

import struct
import tarfile
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, ClassVar, TypeVar, cast

from asynccache.errors import TruncatedArchive, UnsafeArchive

if TYPE_CHECKING:
    from typing import Self

__all__ = [
    "HEADER_BUDGET",
    "Malformed",
    "Source",
    "SourceError",
    "TarReader",
    "Truncated",
    "members",
    "plain_header",
]

#: Most bytes the headers of one member (ustar, pax, GNU long names) may take.
HEADER_BUDGET = 16 * 1024
#: Largest read from the source, and largest piece of member data handed out.
CHUNK = 1 << 20
_BLOCK = tarfile.BLOCKSIZE
#: Most pieces handed to a sink at once (a writev takes a bounded number).
_MAX_PIECES = 512
#: Member types whose plain header block needs nothing from tarfile's parser.
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
_EOFHeaderError: type[tarfile.HeaderError] = vars(tarfile)["EOFHeaderError"]
_EmptyHeaderError: type[tarfile.HeaderError] = vars(tarfile)["EmptyHeaderError"]
_TruncatedHeaderError: type[tarfile.HeaderError] = vars(tarfile)["TruncatedHeaderError"]
_SubsequentHeaderError: type[tarfile.HeaderError] = vars(tarfile)["SubsequentHeaderError"]
#: The fields of a ustar header block, the 12 bytes of padding left out.
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")

_T = TypeVar("_T")
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


class Source:
    """The raw stream: counts bytes, tells its end, tunnels the stream's own errors."""

    __slots__ = ("_read", "_spill", "at_eof", "consumed")

    def __init__(self, read: Callable[[int], bytes]) -> None:
        self._read = read
        self._spill = b""
        self.consumed = 0
        self.at_eof = False

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
        return data


def _octal(field: bytes) -> int:
    """A number field in octal text; ValueError for anything else (base-256 included)."""
    if field[0] in (0o200, 0o377):
        raise ValueError("base-256 number")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _text(field: bytes, encoding: str, errors: str) -> str:
    return field.split(b"\0", 1)[0].decode(encoding, errors)


def plain_header(
    cls: type[_InfoT], buf: bytes | bytearray, encoding: str, errors: str
) -> _InfoT | None:
    """TarInfo.frombuf for the common block, quicker; None leaves the rest to tarfile.

    Gives what frombuf gives for a complete block with a valid unsigned checksum, octal
    numbers and no old GNU sparse data; anything else (end-of-archive blocks, bad checksums,
    base-256 numbers) returns None, and tarfile's own parser decides.
    """
    if len(buf) != _BLOCK:
        return None
    fields = _HEADER.unpack(buf)
    (name, mode, uid, gid, size, mtime, chksum, kind, linkname) = fields[:9]
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
    lead = _text(prefix, encoding, errors)
    if lead and info.type not in tarfile.GNU_TYPES:
        text = lead + "/" + text
    info.name = text
    return info


class _ParseState:
    """What the header parser saw."""

    __slots__ = ("end_seen",)

    def __init__(self) -> None:
        self.end_seen = False


class _StrictInfo(tarfile.TarInfo):
    """TarInfo that reports truncation and malformed headers instead of ending the archive."""

    parse_state: ClassVar[_ParseState]

    @classmethod
    def frombuf(cls, buf: bytes | bytearray, encoding: str, errors: str) -> Self:
        """Parse one header block, rejecting negative sizes."""
        info = plain_header(cls, buf, encoding, errors)
        if info is None:
            info = super().frombuf(buf, encoding, errors)
        if info.size < 0:
            raise Malformed(f"negative size in the header of {info.name!r}")
        return info

    @classmethod
    def fromtarfile(cls, tf: tarfile.TarFile) -> Self:
        """Read the next member's headers; only a zero block ends the archive."""
        try:
            return super().fromtarfile(tf)
        except _EOFHeaderError:
            cls.parse_state.end_seen = True
            raise
        except _EmptyHeaderError:
            raise Truncated("the stream ended without the end-of-archive marker") from None
        except _TruncatedHeaderError:
            raise Truncated("the stream ended inside a member header") from None
        except _SubsequentHeaderError as exc:
            raise Malformed(f"extended header without a valid member header ({exc})") from None
        except tarfile.HeaderError as exc:
            raise Malformed(f"malformed tar header ({exc})") from None


def _info_class(state: _ParseState) -> type[_StrictInfo]:
    """A TarInfo class bound to one stream's parse state."""

    class _Info(_StrictInfo):
        parse_state = state

    return _Info


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


class TarReader:
    """Headers and data of a tar stream, in order, from one buffer.

    Also the file object (``fileobj``, ``offset``, ``pax_headers``...) that tarfile's
    ``TarInfo.fromtarfile`` reads headers from when a block is not a plain one.
    """

    encoding = "utf-8"
    errors = "surrogateescape"

    def __init__(self, source: Source) -> None:
        self.source = source
        self.fileobj = self
        #: Where the next member header starts (tarfile's parser moves it the same way).
        self.offset = 0
        #: Global pax headers met so far (tarfile's parser fills it).
        self.pax_headers: dict[str, str] = {}
        self.state = _ParseState()
        self._info = _info_class(self.state)
        self._buf = b""
        self._pos = 0
        self._position = 0
        self._limit: int | None = None

    def tell(self) -> int:
        """The stream offset of the next byte to read."""
        return self._position

    def read(self, size: int) -> bytes:
        """Read size bytes (fewer only at the end of the stream), within the header budget."""
        if self._limit is not None and self._position + size > self._limit:
            raise Malformed(f"member headers larger than {HEADER_BUDGET} bytes")
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

    def _unread(self, data: bytes) -> None:
        self._buf = data + self._buf[self._pos :]
        self._pos = 0
        self._position -= len(data)

    def _skip_to(self, offset: int) -> None:
        while self._position < offset:
            if not self._take(offset - self._position):
                raise Truncated(f"the stream ended before the header at byte {offset}")

    def next(self) -> tarfile.TarInfo | None:
        """The next member, or None at the end-of-archive marker."""
        at = self.offset
        self._skip_to(at)
        self._limit = at + HEADER_BUDGET
        try:
            block = self.read(_BLOCK)
            if not self.pax_headers:
                info = plain_header(self._info, block, self.encoding, self.errors)
                if info is not None and info.type in _QUICK_TYPES:
                    if info.size < 0:
                        raise Malformed(f"negative size in the header of {info.name!r}")
                    info.offset = at
                    info.offset_data = at + _BLOCK
                    self.offset = info.offset_data
                    if info.type in tarfile.REGULAR_TYPES:
                        self.offset += _padded(info.size)
                    return info
            self._unread(block)
            try:
                return self._info.fromtarfile(cast("tarfile.TarFile", self))
            except _EOFHeaderError:
                return None
        finally:
            self._limit = None

    def copy(self, info: tarfile.TarInfo, sink: Sink) -> None:
        """Hand the member's data to sink, in pieces of at most CHUNK bytes in all."""
        if self._position != info.offset_data:
            raise UnsafeArchive(info.name, "data read out of order")
        remaining = info.size
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


def _parse(call: Callable[[], _T], source: Source, at: int) -> _T:
    """Run one parsing step, mapping its failures to domain errors."""
    try:
        return call()
    except (SourceError, Truncated):
        raise
    except Malformed as exc:
        raise UnsafeArchive(f"<header at byte {at}>", str(exc)) from None
    except Exception as exc:
        if source.at_eof:
            raise Truncated(f"the stream ended before the header at byte {at}") from None
        raise UnsafeArchive(f"<header at byte {at}>", f"malformed tar header ({exc})") from None


def members(source: Source) -> Iterator[tuple[TarReader, tarfile.TarInfo]]:
    """Each member of the tar stream source reads, checking that the archive ends properly."""
    reader = TarReader(source)
    while True:
        info = _parse(reader.next, source, reader.offset)
        if info is None:
            break
        yield reader, info
    if not reader.state.end_seen:
        raise Truncated("the stream ended without the end-of-archive marker")
