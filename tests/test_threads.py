"""_threads.py: the async chunks -> thread bridge, as extract_stream uses it."""

from __future__ import annotations

import os
import tarfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from asynccache.errors import UnsafeArchive
from asynccache.tree.extract import ExtractResult, extract_stream
from tests.support.tars import build, chunked, dirm, extract_threads, reg, sym


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    folder = tmp_path / "dest"
    folder.mkdir()
    return folder


@pytest.mark.anyio
async def test_stream_accepts_tiny_and_empty_chunks(dest: Path) -> None:
    data = build(dirm("testbed"), reg("testbed/a.txt", b"hello"), sym("testbed/l", "a.txt"))

    async def dribble() -> AsyncIterator[bytes]:
        for index in range(len(data)):
            yield b""
            yield data[index : index + 1]

    result = await extract_stream(dribble(), dest)
    assert (dest / "a.txt").read_bytes() == b"hello"
    assert result.file_count == 1


@pytest.mark.anyio
async def test_stream_cancellation_stops_the_worker_thread(dest: Path) -> None:
    data = build(dirm("testbed"), reg("testbed/big", b"b" * 100_000))
    fed = anyio.Event()

    async def stalled() -> AsyncIterator[bytes]:
        yield data[:50_000]
        fed.set()
        await anyio.sleep_forever()

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(extract_stream, stalled(), dest)
        await fed.wait()
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    assert time.monotonic() - started < 5
    assert extract_threads() == []


@pytest.mark.anyio
async def test_stream_cancellation_with_a_full_queue(
    dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write, real_writev = os.write, os.writev
    written = 0

    def slow_write(fd: int, data: bytes) -> int:
        nonlocal written
        time.sleep(0.01)
        count = real_write(fd, data)
        written += count
        return count

    def slow_writev(fd: int, buffers: list[bytes]) -> int:
        nonlocal written
        time.sleep(0.01)
        count = real_writev(fd, buffers)
        written += count
        return count

    monkeypatch.setattr(os, "write", slow_write)
    monkeypatch.setattr(os, "writev", slow_writev)
    header = build(dirm("testbed"), end=False)
    info, _ = reg("testbed/huge")
    info.size = 1 << 32
    header += info.tobuf(tarfile.USTAR_FORMAT)
    produced = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal produced
        yield header
        block = b"z" * 65536
        while True:
            produced += 1
            yield block

    started = time.monotonic()
    with anyio.move_on_after(0.5) as scope:
        await extract_stream(endless(), dest)
    assert scope.cancelled_caught
    assert time.monotonic() - started < 5
    assert extract_threads() == []
    assert written > 0
    assert produced * 65536 - written < 4 * 1024 * 1024


@pytest.mark.anyio
async def test_stream_iterator_error_propagates(dest: Path) -> None:
    data = build(dirm("testbed"), reg("testbed/big", b"b" * 100_000))

    async def broken() -> AsyncIterator[bytes]:
        yield data[:30_000]
        raise ConnectionResetError("connection reset by peer")

    with pytest.raises(ConnectionResetError, match="connection reset by peer"):
        await extract_stream(broken(), dest)
    assert extract_threads() == []


@pytest.mark.anyio
async def test_stream_thread_error_propagates_unwrapped(dest: Path) -> None:
    data = build(dirm("testbed"), reg("/abs.txt", b"x"))

    async def endless() -> AsyncIterator[bytes]:
        yield data
        await anyio.sleep_forever()

    with anyio.fail_after(10), pytest.raises(UnsafeArchive, match="absolute name"):
        await extract_stream(endless(), dest)


@pytest.mark.anyio
async def test_stream_returns_at_end_marker_without_draining(dest: Path) -> None:
    data = build(dirm("testbed"), reg("testbed/a.txt", b"a"))

    async def lingering() -> AsyncIterator[bytes]:
        yield data
        await anyio.sleep_forever()

    with anyio.fail_after(10):
        result = await extract_stream(lingering(), dest)
    assert result.file_count == 1


@pytest.mark.anyio
async def test_concurrent_streams_do_not_interfere(tmp_path: Path) -> None:
    results: dict[int, ExtractResult] = {}

    async def one(index: int) -> None:
        target = tmp_path / f"dest{index}"
        target.mkdir()
        data = build(
            dirm("testbed"), *(reg(f"testbed/f{n}", b"%d" % index * 1000) for n in range(50))
        )
        results[index] = await extract_stream(chunked(data, 3000), target)

    async with anyio.create_task_group() as tg:
        for index in range(6):
            tg.start_soon(one, index)
    for index in range(6):
        assert results[index].file_count == 50
        assert (tmp_path / f"dest{index}" / "f7").read_bytes() == b"%d" % index * 1000
