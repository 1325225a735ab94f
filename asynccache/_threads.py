"""Thread bridges: async chunks read as a file by one thread, and a reader run ahead in its own."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import deque
from collections.abc import AsyncIterable, Callable
from typing import TypeVar

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

__all__ = ["READ_SIZE", "Read", "ReadAhead", "feed_thread"]

_T = TypeVar("_T")

#: A blocking reader: read(size) gives at most size bytes, b"" at the end.
Read = Callable[[int], bytes]
#: Most bytes queued between the event loop and the extracting thread.
_MAX_QUEUED_STREAM_BYTES = 2 << 20
#: A waiting extracting thread is woken once this many bytes of the stream are queued.
_WAKE_READER_BYTES = 256 << 10
#: Bytes asked of a blob per read.
READ_SIZE = 1 << 20
_READ_AHEAD_CHUNKS = 4


class _PipeAborted(Exception):
    """The async side stopped feeding the extracting thread."""


class _ChunkPipe:
    """A bounded queue of chunks, filled by the event loop and read as a file by one thread.

    The network hands out chunks of a few KiB; the reading thread is woken once a batch of
    them waits (or at the end), and the event loop once the queue is half empty, so that a
    stream costs a few thread switches per MiB, not one per chunk.
    """

    def __init__(self, max_bytes: int) -> None:
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._chunks: deque[bytes] = deque()
        self._queued = 0
        self._max = max_bytes
        self._reader_waiting = False
        self._closed = False
        self._aborted = False
        self._space: anyio.Event | None = None
        self._current = b""
        self._offset = 0
        # The reading thread may be any thread (see ReadAhead), not only an anyio one.
        self._loop = anyio.lowlevel.current_token()

    async def put(self, chunk: bytes) -> None:
        """Queue a chunk, waiting while the queue is full."""
        while True:
            with self._lock:
                if self._aborted:
                    return
                if self._queued < self._max:
                    self._chunks.append(chunk)
                    self._queued += len(chunk)
                    if self._reader_waiting and self._queued >= _WAKE_READER_BYTES:
                        self._ready.notify()
                    return
                if self._space is None:
                    self._space = anyio.Event()
                space = self._space
                if self._reader_waiting:
                    self._ready.notify()
            await space.wait()

    def close(self) -> None:
        """Mark the end of the stream."""
        with self._lock:
            self._closed = True
            self._ready.notify_all()

    def abort(self) -> None:
        """Make the reading thread fail at its next read."""
        with self._lock:
            self._aborted = True
            self._chunks.clear()
            self._queued = 0
            self._ready.notify_all()

    def _next_chunk(self) -> bytes:
        """Take the next chunk (b"" at the end), waking the producer when room frees up."""
        with self._lock:
            while not self._chunks and not self._closed and not self._aborted:
                self._reader_waiting = True
                self._ready.wait()
                self._reader_waiting = False
            if self._aborted:
                raise _PipeAborted("extraction cancelled")
            if not self._chunks:
                return b""
            chunk = self._chunks.popleft()
            self._queued -= len(chunk)
            wake = None
            if self._space is not None and self._queued <= self._max // 2:
                wake, self._space = self._space, None
        if wake is not None:
            anyio.from_thread.run_sync(wake.set, token=self._loop)
        return chunk

    def read(self, size: int) -> bytes:
        """Read at most size bytes (thread side)."""
        if self._aborted:
            raise _PipeAborted("extraction cancelled")
        current, offset = self._current, self._offset
        if offset >= len(current):
            current = self._current = self._next_chunk()
            offset = 0
            if not current:
                self._offset = 0
                return b""
        end = offset + size
        if offset == 0 and end >= len(current):
            self._offset = len(current)
            return current
        self._offset = min(end, len(current))
        return current[offset:end]


async def feed_thread(chunks: AsyncIterable[bytes], consume: Callable[[Read], _T]) -> _T:
    """Run consume(read) in a thread, read() giving the bytes of chunks (the rest left unread)."""
    pipe = _ChunkPipe(_MAX_QUEUED_STREAM_BYTES)
    results: list[_T] = []
    failures: list[Exception] = []
    feed_error: Exception | None = None

    async def run_consumer(scope: anyio.CancelScope) -> None:
        try:
            results.append(await anyio.to_thread.run_sync(consume, pipe.read))
        except Exception as exc:
            failures.append(exc)
        finally:
            scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run_consumer, tg.cancel_scope)
        try:
            async for chunk in chunks:
                if chunk:
                    await pipe.put(bytes(chunk))
            pipe.close()
            await anyio.sleep_forever()
        except Exception as exc:
            pipe.abort()
            feed_error = exc
        except BaseException:
            pipe.abort()
            raise
    if feed_error is not None:
        raise feed_error
    if failures:
        raise failures[0]
    if not results:
        raise RuntimeError("the reading thread stopped without a result")
    return results[0]


class ReadAhead:
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
                data = read(READ_SIZE)
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
