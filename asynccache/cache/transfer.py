"""The transfer stream's format: a zstd-compressed tar of objects (each once), then trees.

Members, in this order (nothing else is accepted):

``asynccache-export.json``
    ``{"format": "asynccache-export", "version": 1}``
``objects/<sha256>.<mode in octal>``
    an object's content, sent before the first tree that needs it and never twice
``trees/<instance_id>.json``
    ``{"record": ..., "digest": ..., "root": [mode, mtime_ns], "entries": [...]}``: the index
    record (``cache_path`` relative), the tree digest recorded at extraction, and every folder
    ``["d", path, mode, mtime_ns]``, file ``["f", path, mode, size, sha256]`` and symlink
    ``["l", path, target, mtime_ns]`` of the tree, paths relative to it
``end.json``
    ``{"trees": N, "objects": M}``: a stream without it was cut short

A tree names its files by content, so the receiving side links them from its own store and
checks the tree's digest without reading a file back (see manifest.py and exchange.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, BinaryIO

import zstandard

from asynccache.cache.store_layout import is_digest
from asynccache.errors import CacheError

__all__ = [
    "FORMAT",
    "VERSION",
    "ObjectDamaged",
    "StreamBroken",
    "StreamEnd",
    "StreamObject",
    "StreamTree",
    "StreamWriter",
    "TransferError",
    "read_stream",
]

FORMAT = "asynccache-export"
VERSION = 1
HEADER_NAME = "asynccache-export.json"
END_NAME = "end.json"
OBJECTS_PREFIX = "objects/"
TREES_PREFIX = "trees/"
#: Largest tree description accepted (a tree of a few million files).
MAX_TREE_JSON = 1 << 30
_MAX_SMALL_JSON = 1 << 20
_BLOCK = 1 << 20
#: zstd's window: the largest that ``zstd -d`` and zstd's libraries take by default, so a stream
#: needs no option to be read (the reader holds that much memory; HTTP's zstd encoding allows
#: only 8 MiB, so a stream is no web resource).
WINDOW_LOG = 27
_PATH_MAX = 4095

#: A tree entry as the stream carries it.
Entry = list[Any]


class TransferError(CacheError):
    """A transfer stream that cannot be read or written as this format says."""


class ObjectDamaged(TransferError):
    """An object whose content does not match its name; only trees that need it fail."""


class StreamBroken(TransferError):
    """Writing stopped inside a member: the stream cannot go on (it has no end marker)."""


def _json_bytes(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=True).encode("ascii")


class StreamWriter:
    """Writes a transfer stream to a binary file, compressed with zstd on every core.

    Long-distance matching over a 128 MiB window finds what trees share beyond their stored
    files, above all the packs of one repository's clones (each tree's own after the leak
    guard, yet mostly the same objects): on the 24 bench trees the stream is 0.55x what plain
    level 3 gives, for no more CPU.
    """

    def __init__(self, out: BinaryIO, *, level: int = 3, threads: int = -1) -> None:
        params = zstandard.ZstdCompressionParameters.from_level(
            level, window_log=WINDOW_LOG, enable_ldm=True, threads=threads
        )
        compressor = zstandard.ZstdCompressor(compression_params=params)
        self._zstd = compressor.stream_writer(out, closefd=False)
        self._tar = tarfile.open(  # noqa: SIM115
            fileobj=self._zstd, mode="w|", format=tarfile.PAX_FORMAT, bufsize=_BLOCK
        )
        self.objects = 0
        self.trees = 0
        self._member(HEADER_NAME, _json_bytes({"format": FORMAT, "version": VERSION}))

    def _member(self, name: str, data: bytes, mtime: float = 0) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, mtime
        self._tar.addfile(info, _BytesReader(data))

    def add_object(self, digest: str, mode: int, source: bytes) -> int:
        """Send the content of the file at ``source`` as object (digest, mode); its size.

        OSError when the file cannot be opened (nothing is sent); StreamBroken when it
        cannot be read to the end once sending began.
        """
        fd = os.open(source, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            found = os.fstat(fd)
            info = tarfile.TarInfo(f"{OBJECTS_PREFIX}{digest}.{mode:o}")
            info.size, info.mode, info.mtime = found.st_size, mode, found.st_mtime_ns // 10**9
            with os.fdopen(os.dup(fd), "rb") as handle:
                try:
                    self._tar.addfile(info, _Exact(handle, found.st_size, source))
                except OSError as exc:
                    raise StreamBroken(f"reading {os.fsdecode(source)} failed: {exc}") from None
        finally:
            os.close(fd)
        self.objects += 1
        return found.st_size

    def add_tree(
        self,
        instance_id: str,
        record: Mapping[str, Any],
        digest: str | None,
        root: Sequence[int | None],
        entries: list[Entry],
    ) -> None:
        """Send one tree (its objects must have been sent, or be in the receiving store)."""
        body = {"record": dict(record), "digest": digest, "root": list(root), "entries": entries}
        self._member(f"{TREES_PREFIX}{instance_id}.json", _json_bytes(body))
        self.trees += 1

    def close(self) -> None:
        """Write the end marker and flush every compressed byte."""
        self._member(END_NAME, _json_bytes({"trees": self.trees, "objects": self.objects}))
        self._tar.close()
        self._zstd.close()  # type: ignore[no-untyped-call]


class _BytesReader:
    """Enough of a file for tarfile.addfile."""

    def __init__(self, data: bytes) -> None:
        self._view = memoryview(data)

    def read(self, size: int = -1) -> bytes:
        chunk = self._view[:size] if size >= 0 else self._view
        self._view = self._view[len(chunk) :]
        return bytes(chunk)


class _Exact:
    """A file read to exactly ``size`` bytes: a file that shrank while sent is an error."""

    def __init__(self, handle: IO[bytes], size: int, path: bytes) -> None:
        self._handle, self._left, self._path = handle, size, path

    def read(self, size: int = -1) -> bytes:
        want = self._left if size < 0 else min(size, self._left)
        data = self._handle.read(want)
        if len(data) < want:
            where = os.fsdecode(self._path)
            raise StreamBroken(f"{where} shrank while it was exported; export again")
        self._left -= len(data)
        return data


@dataclass(frozen=True)
class StreamObject:
    """An object member: read its content with ``copy_into`` (or leave it to be skipped)."""

    digest: str
    mode: int
    size: int
    mtime: int
    _read: Callable[[int], bytes]

    def copy_into(self, fd: int) -> str:
        """Write the content to fd; return its sha256 (hex)."""
        digest = hashlib.sha256()
        left = self.size
        while left:
            try:
                block = self._read(min(left, _BLOCK))
            except (tarfile.TarError, EOFError, zstandard.ZstdError):
                block = b""
            if not block:
                raise TransferError("the stream ended inside an object; rerun the transfer")
            digest.update(block)
            view = memoryview(block)
            while view:
                view = view[os.write(fd, view) :]
            left -= len(block)
        return digest.hexdigest()


@dataclass(frozen=True)
class StreamTree:
    """A tree member."""

    instance_id: str
    record: dict[str, Any]
    digest: str | None
    root: tuple[int, int | None]
    entries: list[Entry]


@dataclass(frozen=True)
class StreamEnd:
    """The end marker: the stream is complete."""

    trees: int
    objects: int


StreamItem = StreamObject | StreamTree | StreamEnd


def read_stream(source: BinaryIO) -> Iterator[StreamItem]:
    """The members of a transfer stream, checked for form; TransferError on anything else.

    An object's content must be read (or not) before the next item is asked for.
    """
    # the bound is ours, not the library's default: what a hostile stream can make us hold
    decompressor = zstandard.ZstdDecompressor(max_window_size=1 << WINDOW_LOG)
    reader = decompressor.stream_reader(source, read_across_frames=True)
    try:
        tar = tarfile.open(fileobj=reader, mode="r|", bufsize=_BLOCK)  # noqa: SIM115
        yield from _members(tar)
    except zstandard.ZstdError as exc:
        if "window" in str(exc).lower() or "too much memory" in str(exc).lower():
            raise TransferError(
                f"the stream's zstd window is larger than {1 << WINDOW_LOG >> 20} MiB, which no "
                "export writes; refused"
            ) from None
        raise TransferError(f"not a zstd-compressed transfer stream ({exc})") from None
    except (tarfile.TarError, EOFError) as exc:
        raise TransferError(f"the stream ended early or is damaged ({exc}); rerun it") from None


def _members(tar: tarfile.TarFile) -> Iterator[StreamItem]:
    started = ended = False
    for member in tar:
        name = member.name
        if not member.isreg():
            raise TransferError(f"unexpected member {name!r}: not a regular file")
        if not started:
            header = _small_json(tar, member, HEADER_NAME)
            if header.get("format") != FORMAT:
                raise TransferError("not an asynccache export stream")
            if header.get("version") != VERSION:
                raise TransferError(
                    f"export stream version {header.get('version')!r}; this asynccache reads "
                    f"version {VERSION}: use the same asynccache version on both sides"
                )
            started = True
        elif ended:
            raise TransferError(f"unexpected member {name!r} after the end marker")
        elif name.startswith(OBJECTS_PREFIX):
            yield _object(tar, member)
        elif name.startswith(TREES_PREFIX):
            yield _tree(tar, member)
        elif name == END_NAME:
            end = _small_json(tar, member, END_NAME)
            ended = True
            yield StreamEnd(trees=int(end.get("trees", 0)), objects=int(end.get("objects", 0)))
        else:
            raise TransferError(f"unexpected member {name!r} in the transfer stream")
    if not started:
        raise TransferError("the stream is empty; was the export cut off?")
    if not ended:
        raise TransferError("the stream ended early (no end marker); rerun the transfer")


def _read_all(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    if member.size > limit:
        raise TransferError(f"member {member.name!r} is larger than {limit} bytes")
    handle = tar.extractfile(member)
    data = handle.read() if handle is not None else b""
    if len(data) != member.size:
        raise TransferError("the stream ended early; rerun the transfer")
    return data


def _small_json(tar: tarfile.TarFile, member: tarfile.TarInfo, name: str) -> dict[str, Any]:
    if member.name != name:
        raise TransferError(f"expected {name}, found {member.name!r}: not an export stream")
    return _json_object(_read_all(tar, member, _MAX_SMALL_JSON), name)


def _json_object(data: bytes, name: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise TransferError(f"{name} in the stream is not JSON") from None
    if not isinstance(value, dict):
        raise TransferError(f"{name} in the stream is not a JSON object")
    return value


def _object(tar: tarfile.TarFile, member: tarfile.TarInfo) -> StreamObject:
    digest, _, mode_text = member.name[len(OBJECTS_PREFIX) :].partition(".")
    try:
        mode = int(mode_text, 8)
    except ValueError:
        mode = -1
    if not is_digest(digest) or not 0 <= mode <= 0o777 or mode_text != f"{mode:o}":
        raise TransferError(f"malformed object name {member.name!r} in the stream")
    handle = tar.extractfile(member)
    read: Callable[[int], bytes] = handle.read if handle is not None else (lambda _size: b"")
    return StreamObject(digest, mode, member.size, int(member.mtime), read)


def _tree(tar: tarfile.TarFile, member: tarfile.TarInfo) -> StreamTree:
    name = member.name
    instance_id = name[len(TREES_PREFIX) :].removesuffix(".json")
    if "/" in instance_id or not name.endswith(".json") or not instance_id:
        raise TransferError(f"malformed tree name {name!r} in the stream")
    body = _json_object(_read_all(tar, member, MAX_TREE_JSON), name)
    record, digest, root, entries = (body.get(k) for k in ("record", "digest", "root", "entries"))
    if not isinstance(record, dict) or not isinstance(entries, list):
        raise TransferError(f"{name}: record or entries missing")
    if digest is not None and (not isinstance(digest, str) or not is_digest(digest)):
        raise TransferError(f"{name}: malformed digest")
    if (
        not isinstance(root, list)
        or len(root) != 2
        or not _is_mode(root[0])
        or not _is_time(root[1])
    ):
        raise TransferError(f"{name}: malformed root attributes")
    for entry in entries:
        _check_entry(name, entry)
    return StreamTree(instance_id, record, digest, (root[0], root[1]), entries)


def _is_mode(value: Any) -> bool:
    return type(value) is int and 0 <= value <= 0o777


def _is_time(value: Any) -> bool:
    return value is None or (type(value) is int and -(2**63) <= value < 2**63)


def _check_entry(where: str, entry: Any) -> None:
    """Raise TransferError unless entry is a well-formed entry with a safe relative path."""
    ok = isinstance(entry, list) and len(entry) >= 4 and isinstance(entry[1], str)
    if ok:
        kind = entry[0]
        if kind == "d":
            ok = len(entry) == 4 and _is_mode(entry[2]) and _is_time(entry[3])
        elif kind == "f":
            ok = (
                len(entry) == 5
                and _is_mode(entry[2])
                and type(entry[3]) is int
                and entry[3] >= 0
                and isinstance(entry[4], str)
                and is_digest(entry[4])
            )
        elif kind == "l":
            ok = (
                len(entry) == 4
                and isinstance(entry[2], str)
                and 0 < len(entry[2]) <= _PATH_MAX
                and "\x00" not in entry[2]
                and _is_time(entry[3])
            )
        else:
            ok = False
    if not ok:
        raise TransferError(f"{where}: malformed entry {str(entry)[:200]}")
    path = entry[1]
    parts = path.split("/")
    if (
        not path
        or "\x00" in path
        or len(path) > _PATH_MAX
        or any(part in ("", ".", "..") for part in parts)
    ):
        raise TransferError(f"{where}: unsafe path {path[:200]!r}")
