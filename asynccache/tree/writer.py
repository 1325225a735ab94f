"""A thread that creates folders and small files, in member order, while the parser reads on.

Creating a file is mostly kernel work done without the GIL, so on a second core it overlaps
the parsing of the next tar headers. The extracting thread stays in charge: it queues only
fresh regular files whose data it has read, waits for the queue to drain before any other
kind of change that could meet a queued path, and replays itself whatever the writer could
not do (see :meth:`FileWriter.flush`), so that every error is reported where it always was.
"""

from __future__ import annotations

import itertools
import os
import stat
import threading
from collections import deque
from dataclasses import dataclass

from asynccache.tree.dedup import ContentStore
from asynccache.tree.digest import FileHash, identity_of, sha256_of
from asynccache.tree.file_data import (
    FILE_FLAGS,
    removed_unless_done,
    unlinked_unless_done,
    write_all,
)

#: Largest file handed to the writer; bigger ones are written by the extracting thread.
MAX_QUEUED_FILE = 1 << 20
#: Largest file handed to the writer when a content store may hold it: its data is read into
#: memory and hashed before anything is created, so that a stored copy is linked instead of
#: written (a shared library or the repository's pack of several MiB is the same in every
#: image of a repository). Bigger ones are hashed while written, then stored or replaced by a
#: link to the stored copy.
MAX_LINKED_FILE = 16 << 20
_MAX_QUEUED_BYTES = 16 << 20
_MAX_QUEUED_JOBS = 256
#: Most paths remembered between flushes (the extracting thread flushes beyond).
_MAX_PENDING = 1024
#: A sleeping writer is woken once this many jobs or bytes wait (or by a flush): waking it
#: for every small file would cost a thread switch per file.
_WAKE_JOBS = 32
_WAKE_BYTES = 1 << 20
#: Most jobs and bytes the writer does between two turns of the lock: the queue is told of
#: them together, not one lock and one wake-up check per small file, and a thread waiting for
#: room hears of it after a MiB or so, not after many large files.
_BATCH_JOBS = 32
_BATCH_BYTES = 1 << 20


@dataclass(slots=True)
class FileJob:
    """One regular file to create: where, with what mode, mtime and data."""

    name: str
    rel: bytes
    full: bytes
    mode: int
    mtime: int | None
    pieces: list[bytes]
    size: int


def create_file(job: FileJob, umask: int, *, stat_after: bool) -> os.stat_result | None:
    """Create job's file where nothing is (FileExistsError else) with its mode, data and mtime.

    A file it created but could not complete is removed (see file_data.removed_unless_done).
    """
    fd = os.open(job.full, FILE_FLAGS, job.mode)
    with unlinked_unless_done(fd, job.full):  # closes fd either way
        if job.mode & umask:
            os.fchmod(fd, job.mode)
        if job.size:
            write_all(fd, job.pieces, job.size)
        if job.mtime is not None:
            os.utime(fd, ns=(job.mtime, job.mtime))
        found = os.fstat(fd) if stat_after else None
    return found


def place_file(
    job: FileJob, umask: int, store: ContentStore | None, *, hashing: bool
) -> tuple[FileHash | None, bool]:
    """Create job's file where nothing is (FileExistsError else), linked from store if it can.

    With a store, the content is hashed first and a stored copy is linked instead of writing
    one (the file then has the stored copy's mtime); a written file is handed to the store.
    Returns the file's content hash (when hashing or storing) and whether it was linked.
    """
    if store is None:
        written = create_file(job, umask, stat_after=hashing)
        if written is None:
            return None, False
        return (identity_of(written), sha256_of(job.pieces)), False
    digest = sha256_of(job.pieces)
    found = store.link(digest, job.mode, job.size, job.full)
    if found is not None:
        return (identity_of(found), digest), True
    create_file(job, umask, stat_after=False)  # FileExistsError leaves what is there alone
    with removed_unless_done(job.full):  # a file written but not stored is done again
        _, found = store.put(job.full, digest, job.mode)
    return (identity_of(found), digest), False


def _batch(jobs: deque[Job]) -> list[Job]:
    """The first jobs of the queue for one turn: at most _BATCH_JOBS, and past the first, no
    more than _BATCH_BYTES of file data in all."""
    batch: list[Job] = []
    size = 0
    for job in itertools.islice(jobs, _BATCH_JOBS):
        size += job.size
        if batch and size > _BATCH_BYTES:
            break
        batch.append(job)
    return batch


@dataclass(slots=True)
class DirJob:
    """One folder to create."""

    name: str
    rel: bytes
    full: bytes
    mode: int
    size: int = 0


Job = FileJob | DirJob


class FileWriter:
    """Creates queued files in order in its own thread; stops at the first one it cannot."""

    def __init__(
        self, umask: int, *, hashing: bool = False, store: ContentStore | None = None
    ) -> None:
        self.umask = umask
        self.hashing = hashing
        self.store = store
        #: Regular files written, and linked from the store instead (read once closed).
        self.files_written = 0
        self.files_linked = 0
        #: Paths queued since the last flush (read and written by the extracting thread only).
        self.pending: set[bytes] = set()
        self._lock = threading.Lock()
        # the writer waits on _work, the extracting thread on _done (same lock)
        self._work = threading.Condition(self._lock)
        self._done = threading.Condition(self._lock)
        self._jobs: deque[Job] = deque()
        self._queued_bytes = 0
        self._failed: list[Job] = []
        self._closed = False
        self._writer_asleep = False
        self._waiting_for_room = False
        self._removed_files = 0
        self._removed_bytes = 0
        self._hashes: list[tuple[bytes, int, FileHash]] = []
        self._thread = threading.Thread(target=self._run, name="asynccache-writer", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> bool:
        """Queue job, waiting while the queue is full; False when the caller must flush first."""
        if len(self.pending) >= _MAX_PENDING:
            return False
        with self._lock:
            # the bytes bound counts the job itself (it may be as large as the bound), except
            # on an empty queue, which takes any job
            while (
                len(self._jobs) >= _MAX_QUEUED_JOBS
                or (self._jobs and self._queued_bytes + job.size > _MAX_QUEUED_BYTES)
            ) and not self._failed:
                self._waiting_for_room = True  # woken when the queue is half empty
                if self._writer_asleep:
                    self._work.notify()  # what waits may be below the marks that wake it
                self._done.wait()
            self._waiting_for_room = False
            if self._failed:
                return False
            self._jobs.append(job)
            self._queued_bytes += job.size
            if self._writer_asleep and (
                len(self._jobs) >= _WAKE_JOBS or self._queued_bytes >= _WAKE_BYTES
            ):
                self._work.notify()
        self.pending.add(job.rel)
        return True

    def flush(self) -> tuple[list[Job], int, int, list[tuple[bytes, int, FileHash]]]:
        """Wait for the queue to drain.

        Returns the jobs to replay in order (the one that failed and every later one), the
        regular files and bytes the writer removed to replace them, and the path, mode and
        content hash of each file it wrote, in order.
        """
        with self._lock:
            if self._jobs and not self._failed:
                self._work.notify()  # the last few jobs may not have woken the writer
                while self._jobs and not self._failed:
                    self._done.wait()
            failed, self._failed = self._failed, []
            removed = (self._removed_files, self._removed_bytes)
            self._removed_files = self._removed_bytes = 0
            hashes, self._hashes = self._hashes, []
        self.pending.clear()
        return failed, *removed, hashes

    def close(self) -> None:
        """Drop what is still queued and stop the thread (after the jobs it is doing now)."""
        with self._lock:
            self._closed = True
            self._jobs.clear()
            self._work.notify_all()
            self._done.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._jobs and not self._closed:
                    self._writer_asleep = True
                    self._work.wait()
                self._writer_asleep = False
                if self._closed:
                    return
                # the jobs stay queued while written (a failure replays them from the queue)
                batch = _batch(self._jobs)
            done: list[tuple[tuple[int, int], FileHash | None]] = []
            failed = False
            for job in batch:
                try:
                    done.append(self._write(job))
                except Exception:  # replayed by the extracting thread, which reports it
                    failed = True
                    break
            with self._lock:
                if self._closed:
                    return
                for job, (removed, written) in zip(batch, done, strict=False):
                    self._jobs.popleft()
                    self._queued_bytes -= job.size
                    self._removed_files += removed[0]
                    self._removed_bytes += removed[1]
                    if written is not None:
                        self._hashes.append((job.rel, job.mode, written))
                if failed:
                    self._failed = list(self._jobs)
                    self._jobs.clear()
                    self._queued_bytes = 0
                if not self._jobs or (
                    self._waiting_for_room
                    and len(self._jobs) <= _MAX_QUEUED_JOBS // 2
                    and self._queued_bytes <= _MAX_QUEUED_BYTES // 2
                ):
                    self._done.notify()
            del job, batch, done  # a sleeping writer must not hold the last files' data

    def _write(self, job: Job) -> tuple[tuple[int, int], FileHash | None]:
        """Create job's file, replacing a regular file or symlink; a folder there is an error.

        A folder is created where nothing is; anything already there is an error. Returns
        the regular file and bytes removed, and the new file's hash.
        """
        if isinstance(job, DirJob):
            os.mkdir(job.full, job.mode)
            return (0, 0), None
        removed = (0, 0)
        try:
            written, linked = place_file(job, self.umask, self.store, hashing=self.hashing)
        except FileExistsError:
            found = os.lstat(job.full)
            if stat.S_ISDIR(found.st_mode):
                raise
            if stat.S_ISREG(found.st_mode):
                removed = (1, found.st_size)
            os.unlink(job.full)
            written, linked = place_file(job, self.umask, self.store, hashing=self.hashing)
        if linked:
            self.files_linked += 1
        else:
            self.files_written += 1
        return removed, written
