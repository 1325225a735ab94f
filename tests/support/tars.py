"""Tar archives built member by member for the extractor's tests, and ways to run them."""

from __future__ import annotations

import functools
import hashlib
import io
import os
import stat
import sys
import tarfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any, BinaryIO, cast

import anyio
import pytest

import asynccache.tree.extract as extract_module
import asynccache.tree.tarstream as tarstream
from asynccache.tree.budget import Budget
from asynccache.tree.digest import tree_digest
from asynccache.tree.extract import ExtractResult, extract_stream, extract_tar
from asynccache.tree.layered import LayerTree

MTIME = 1_600_000_000
NS = 1_000_000_000
END = b"\0" * 1024

Member = tuple[tarfile.TarInfo, bytes]
Extract = Callable[[bytes, Path], ExtractResult]


def reg(name: str, data: bytes = b"", mode: int = 0o644, mtime: int = MTIME) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), mode, mtime
    return info, data


def dirm(name: str, mode: int = 0o755, mtime: int = MTIME) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, mtime
    return info, b""


def sym(name: str, target: str, mtime: int = MTIME) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, target, 0o777, mtime
    return info, b""


def hard(name: str, target: str) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mtime = tarfile.LNKTYPE, target, MTIME
    return info, b""


def special(name: str, kind: bytes) -> Member:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = kind, 1, 3
    return info, b""


def build(*members: Member, fmt: int = tarfile.PAX_FORMAT, end: bool = True) -> bytes:
    """A tar archive of members; without its end-of-archive marker when end is False."""
    out = io.BytesIO()
    with tarfile.open(
        fileobj=out, mode="w", format=fmt, encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
        without_end = out.getvalue()
    return out.getvalue() if end else without_end


def tar_of(members: list[tuple[Any, bytes]]) -> bytes:
    """A pax archive of (TarInfo, data) pairs."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out.getvalue()


def padded(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def raw_pax_member(records: bytes, member: Member) -> bytes:
    """A pax extended header with raw records, then member (its name is a placeholder)."""
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, len(records)
    info, data = member
    return (
        header.tobuf(tarfile.USTAR_FORMAT)
        + padded(records)
        + info.tobuf(tarfile.USTAR_FORMAT)
        + padded(data)
    )


def fix_checksum(archive: bytearray, at: int) -> None:
    block = archive[at : at + 512]
    block[148:156] = b" " * 8
    archive[at + 148 : at + 156] = b"%06o\0 " % sum(block)


class Trickle:
    """A non-seekable stream that hands out small reads."""

    def __init__(self, data: bytes, step: int = 4099) -> None:
        self._data = memoryview(data)
        self._pos = 0
        self._step = step

    def read(self, size: int = -1) -> bytes:
        size = self._step if size < 0 else min(size, self._step)
        chunk = bytes(self._data[self._pos : self._pos + size])
        self._pos += len(chunk)
        return chunk


async def chunked(data: bytes, size: int = 7001) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def run_tar(data: bytes, dest: Path) -> ExtractResult:
    result = extract_tar(cast(BinaryIO, Trickle(data)), dest, keep_hashes=True)
    # the digest of what was written, when the extraction knows it, is the tree's
    assert result.digest is None or result.digest == tree_digest(dest)
    return result


def run_stream(data: bytes, dest: Path) -> ExtractResult:
    return anyio.run(functools.partial(extract_stream, chunked(data), dest))


Snapshot = dict[str, tuple[object, ...]]


def snapshot(box: Path) -> Snapshot:
    """Everything in box except dest: type, mode, size, mtime, content or link target."""
    info = os.lstat(box)
    found: Snapshot = {".": (info.st_mode, info.st_mtime_ns)}
    for folder, dirnames, filenames in os.walk(box):
        if Path(folder) == box:
            dirnames[:] = [name for name in dirnames if name != "dest"]
        for name in dirnames + filenames:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                extra: object = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                extra = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            else:
                extra = None
            found[os.path.relpath(path, box)] = (
                info.st_mode,
                info.st_size,
                info.st_mtime_ns,
                info.st_nlink,
                extra,
            )
    return found


def assert_rejected(
    extract: Extract, sandbox: Path, data: bytes, error: type[Exception], match: str
) -> None:
    """The archive fails with error and nothing outside dest changed."""
    before = snapshot(sandbox)
    with pytest.raises(error, match=match):
        extract(data, sandbox / "dest")
    assert snapshot(sandbox) == before


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def extract_threads() -> list[int]:
    """Threads currently running code of asynccache/tree/extract.py."""
    busy = []
    for ident, frame in sys._current_frames().items():
        current: FrameType | None = frame
        while current is not None:
            if current.f_code.co_filename in (extract_module.__file__, tarstream.__file__):
                busy.append(ident)
                break
            current = current.f_back
    return busy


def apply_all(
    dest: Path, *layers: bytes, budget: Budget | None = None
) -> tuple[LayerTree, ExtractResult]:
    tree = LayerTree(dest, budget=budget)
    for data in layers:
        tree.apply(io.BytesIO(data).read)
    return tree, tree.finish()


def listing(root: Path) -> dict[str, str]:
    """rel path -> "dir" | "link:<target>" | file content (text; sha256 when large)."""
    found: dict[str, str] = {}
    for current, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(current, name)
            rel = path.relative_to(root).as_posix()
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                found[rel] = f"link:{os.readlink(path)}"
            elif stat.S_ISDIR(info.st_mode):
                found[rel] = "dir"
            else:
                data = path.read_bytes()
                found[rel] = data.decode() if len(data) < 1000 else hashlib.sha256(data).hexdigest()
    return found


def lines_run(call: Callable[[], object], *modules: ModuleType) -> int:
    """How many lines of the modules' code call() runs in this thread: a count of work done.

    Tests bound work by this count rather than by time (the same on any machine and load).
    """
    files = {module.__file__ for module in modules}
    count = 0

    def local(frame: FrameType, event: str, arg: object) -> object:
        nonlocal count
        if event == "line":
            count += 1
        return local

    def start(frame: FrameType, event: str, arg: object) -> object:
        return local if frame.f_code.co_filename in files else None

    sys.settrace(start)
    try:
        call()
    finally:
        sys.settrace(None)
    return count


def victim_intact(box: Path) -> bool:
    return (box / "victim" / "secret.txt").read_text() == "secret"
