"""Decoding a tar member's header: its header block and the extended records before it.

Plain ustar header blocks (by far the most common) are parsed here in one step; header blocks
that are not plain (base-256 numbers, old checksums) go through tarfile's block parser. Where tar
readers differ, GNU tar and Go's archive/tar (which Docker uses) decide:

- only a POSIX ustar header has a name prefix (an old GNU header holds times there);
- a malformed pax record or number (``size``, ``mtime``, ...) makes the archive malformed;
- GNU sparse maps (old GNU, pax 0.0, 0.1 and 1.0) are checked as Go checks them.

``tarstream.py`` reads the stream and decides which header comes with which member.
"""

from __future__ import annotations

import re
import struct
import tarfile
import zlib
from typing import TypeVar

__all__ = [
    "POSIX_MAGIC",
    "SPARSE_MAP",
    "Malformed",
    "Member",
    "apply_pax",
    "byte_sum",
    "checked_segments",
    "header_block",
    "number_field",
    "pairs",
    "pax_integer",
    "pax_records",
    "pax_sparse_size",
    "plain_header",
    "sparse_entries",
    "sparse_map_0x",
    "sparse_version",
    "text_field",
]

_BLOCK = tarfile.BLOCKSIZE
#: The magic of a POSIX ustar header (the only kind whose name has a prefix).
POSIX_MAGIC = b"ustar\0"
_HEADER = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")
_INTEGER = re.compile(r"[-+]?[0-9]+", re.ASCII)
_TIME = re.compile(r"[-+]?[0-9]+(\.[0-9]*)?", re.ASCII)
_RECORD_LENGTH = re.compile(rb"([0-9]+) ")
_SPARSE_OFFSET = "GNU.sparse.offset"
_SPARSE_NUMBYTES = "GNU.sparse.numbytes"
#: The pax record of a GNU sparse 0.1 map (0.0's repeated records are joined into it).
SPARSE_MAP = "GNU.sparse.map"

_InfoT = TypeVar("_InfoT", bound=tarfile.TarInfo)


class Malformed(Exception):
    """A header cannot be parsed or breaks a limit."""


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


def byte_sum(block: bytes | bytearray) -> int:
    """The sum of a header block's bytes (what its checksum is made of), computed in C.

    Adler-32's first half is 1 + the sum of the bytes modulo 65521; a 256-byte half of a block
    sums to at most 65,280, so each half's is its exact sum. Six times as quick as ``sum()``,
    which a tree of thousands of small files would pay on every header.
    """
    view = memoryview(block)
    return (zlib.adler32(view[:256]) & 0xFFFF) + (zlib.adler32(view[256:]) & 0xFFFF) - 2


def number_field(field: bytes) -> int:
    """A number field: octal text or GNU base-256 (Malformed for anything else)."""
    if field[0] in (0o200, 0o377):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    try:
        return int(field.split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        raise Malformed(f"invalid number {field!r} in a header") from None


def text_field(field: bytes, encoding: str, errors: str) -> str:
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
    (name, mode, uid, gid, size, mtime, chksum, kind, linkname, magic, _, uname, gname,
     devmajor, devminor, prefix) = _HEADER.unpack(buf)  # fmt: skip
    if kind == tarfile.GNUTYPE_SPARSE:
        return None
    # Each number inline, as int(field with its trailing NULs and spaces cut, 8): what
    # frombuf reads (the text before the first NUL, stripped) whenever int() takes it; a NUL
    # inside the text or a base-256 number makes int() fail, and the slow path decides.
    # Eight numbers a member, thousands of members a layer: no call per field.
    try:
        checksum = int(chksum.rstrip(b"\0 ") or b"0", 8)
        if checksum != 256 + byte_sum(buf) - sum(chksum):
            return None
        info = cls()
        info.mode = int(mode.rstrip(b"\0 ") or b"0", 8)
        info.uid = int(uid.rstrip(b"\0 ") or b"0", 8)
        info.gid = int(gid.rstrip(b"\0 ") or b"0", 8)
        info.size = int(size.rstrip(b"\0 ") or b"0", 8)
        info.mtime = int(mtime.rstrip(b"\0 ") or b"0", 8)
        info.devmajor = int(devmajor.rstrip(b"\0 ") or b"0", 8)
        info.devminor = int(devminor.rstrip(b"\0 ") or b"0", 8)
    except ValueError:
        return None
    info.chksum = checksum
    info.type = kind
    text = name.split(b"\0", 1)[0].decode(encoding, errors)
    info.linkname = linkname.split(b"\0", 1)[0].decode(encoding, errors)
    info.uname = uname.split(b"\0", 1)[0].decode(encoding, errors)
    info.gname = gname.split(b"\0", 1)[0].decode(encoding, errors)
    if kind == tarfile.AREGTYPE and text.endswith("/"):
        info.type = tarfile.DIRTYPE
    if info.type == tarfile.DIRTYPE:
        text = text.rstrip("/")
    if prefix[0] and magic == POSIX_MAGIC and info.type not in tarfile.GNU_TYPES:
        text = prefix.split(b"\0", 1)[0].decode(encoding, errors) + "/" + text
    info.name = text
    return info


def header_block(block: bytes, encoding: str, errors: str) -> Member:
    """Any complete, non-zero header block as a Member (Malformed when it cannot be one)."""
    info = plain_header(Member, block, encoding, errors)
    if info is None:
        try:
            info = Member.frombuf(block, encoding, errors)
        except tarfile.HeaderError as exc:
            raise Malformed(f"malformed tar header ({exc})") from None
        if block[345] and block[257:263] != POSIX_MAGIC and info.type not in tarfile.GNU_TYPES:
            # tarfile joins a prefix whatever the magic; an old GNU header holds times there
            name = text_field(block[:100], encoding, errors)
            info.name = name.rstrip("/") if info.isdir() else name
    if info.size < 0:
        raise Malformed(f"negative size in the header of {info.name!r}")
    return info


def pax_records(data: bytes) -> dict[str, str]:
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
        records[SPARSE_MAP] = ",".join(sparse)
    return records


def pax_integer(key: str, value: str) -> int:
    if not _INTEGER.fullmatch(value):
        raise Malformed(f"malformed pax {key} {value!r}")
    return int(value)


def pax_time(key: str, value: str) -> int | float:
    """A pax time: seconds, maybe with a fraction (an int when it has none)."""
    match = _TIME.fullmatch(value)
    if match is None:
        raise Malformed(f"malformed pax {key} {value!r}")
    return int(value) if match.group(1) is None else float(value)


def apply_pax(info: Member, records: dict[str, str]) -> None:
    """Give the member the fields of its pax header."""
    for key, value in records.items():
        if key == "path":
            info.name = value.rstrip("/")
        elif key == "linkpath":
            info.linkname = value
        elif key == "size":
            info.size = pax_integer(key, value)
        elif key == "mtime":
            info.mtime = pax_time(key, value)
        elif key == "uid":
            info.uid = pax_integer(key, value)
        elif key == "gid":
            info.gid = pax_integer(key, value)
        elif key == "uname":
            info.uname = value
        elif key == "gname":
            info.gname = value
        elif key in ("atime", "ctime"):
            pax_time(key, value)
    info.pax_headers = records
    if info.size < 0:
        raise Malformed(f"negative size in the header of {info.name!r}")


def sparse_version(records: dict[str, str]) -> str | None:
    """The GNU sparse format a pax header names ("0.x" or "1.0"), as Go tells it; None if none."""
    major, minor = records.get("GNU.sparse.major"), records.get("GNU.sparse.minor")
    if major == "0" and minor in ("0", "1"):
        return "0.x"
    if major == "1" and minor == "0":
        return "1.0"
    if major is not None or minor is not None:
        return None  # an unknown version: the member is read as a plain file, as Go does
    return "0.x" if records.get(SPARSE_MAP) else None


def sparse_entries(block: bytes, start: int, count: int, into: list[tuple[int, int]]) -> None:
    """The (offset, length) entries of an old GNU sparse block, up to the first empty one."""
    for index in range(count):
        at = start + 24 * index
        if block[at] == 0:
            return
        into.append((number_field(block[at : at + 12]), number_field(block[at + 12 : at + 24])))


def pairs(numbers: list[int]) -> list[tuple[int, int]]:
    return list(zip(numbers[::2], numbers[1::2], strict=True))


def checked_segments(
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


def pax_sparse_size(info: Member, records: dict[str, str]) -> int:
    """The size of a pax sparse file, and its name, from its records."""
    name = records.get("GNU.sparse.name")
    if name:
        info.name = name
    text = records.get("GNU.sparse.size") or records.get("GNU.sparse.realsize")
    return info.size if text is None else pax_integer("GNU.sparse.size", text)


def sparse_map_0x(records: dict[str, str]) -> list[tuple[int, int]]:
    """The map of a GNU sparse 0.0 or 0.1 pax header."""
    count = pax_integer("GNU.sparse.numblocks", records.get("GNU.sparse.numblocks", ""))
    text = records.get(SPARSE_MAP, "")
    fields = text.split(",") if text else []
    if count < 0 or len(fields) != 2 * count:
        raise Malformed("GNU sparse map does not match its number of blocks")
    return pairs([pax_integer(SPARSE_MAP, field) for field in fields])
