"""The folder an extraction writes: every create and removal, counts, folder attributes, the writer.

The extractor decides what a member means; a :class:`Folder` does it on disk, by relative
path, never following a symlink: files (small ones through the writer thread, whose work it
replays when the thread could not do it), folders whose final mode and mtime it applies at the
end, symlinks, hardlinks, removals, with the regular files and bytes they add up to.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import shutil
import stat
from collections.abc import Callable
from typing import Protocol

from asynccache._fs import current_umask
from asynccache.errors import UnsafeArchive
from asynccache.tree.dedup import ContentStore
from asynccache.tree.digest import identity_of, walk
from asynccache.tree.file_data import (
    FILE_FLAGS,
    SparseWriter,
    unlinked_unless_done,
    write_all,
    write_hashed,
)
from asynccache.tree.record import TreeRecord
from asynccache.tree.tarstream import Sink
from asynccache.tree.unstored import store_unstored
from asynccache.tree.writer import (
    MAX_LINKED_FILE,
    MAX_QUEUED_FILE,
    DirJob,
    FileJob,
    FileWriter,
    Job,
    place_file,
)

__all__ = ["Folder", "FolderRules", "kind_of"]

_IMPLICIT_DIR_MODE = 0o755


class FolderRules(Protocol):
    """What may be replaced in the folder, and what a removal takes with it (see extract.Rules)."""

    def replaceable(self, rel: bytes) -> bool:
        """May what is not a folder at rel be replaced by one, as a parent of a member?"""

    def removed(self, rel: bytes) -> None:
        """The folder at rel was removed with everything under it."""


def kind_of(mode: int) -> str:
    """A file type in words."""
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "a special file"


def _depth(item: tuple[bytes, tuple[int, int | None, int]]) -> int:
    """How deep a folder is, for the final deepest-first pass."""
    return item[0].count(b"/")


class Folder:
    """Writes under dest by relative path, tracking the folders it created and what it wrote."""

    def __init__(
        self,
        dest: bytes,
        rules: FolderRules,
        *,
        keep_hashes: bool = False,
        store: ContentStore | None = None,
    ) -> None:
        self.dest = dest
        #: dest with a trailing slash: ``base + rel`` is the path of rel on disk.
        self.base = os.path.join(dest, b"")
        self.rules = rules
        self.umask = current_umask()
        # folder relative path -> (final mode, mtime in ns or None, mode it has now)
        self.dirs: dict[bytes, tuple[int, int | None, int]] = {}
        self.root_attrs: tuple[int, int | None] | None = None
        #: Regular files (and their bytes) in the folder.
        self.files = 0
        self.size = 0
        # creates small files in a thread of its own while a stream is read (see writer.py)
        self.writer: FileWriter | None = None
        # regular files are linked from this store when it has their content (see dedup.py);
        # storing needs every file's hash
        self.store = store
        self.record = TreeRecord(keep_hashes=keep_hashes or store is not None)
        #: Regular files created and written, and those linked from the store instead.
        self.files_written = 0
        self.files_linked = 0

    def start_writer(self) -> None:
        """Hand small regular files to a writer thread until stop_writer."""
        if self.writer is None:
            self.writer = FileWriter(self.umask, hashing=self.record.keep_hashes, store=self.store)

    def stop_writer(self, *, completed: bool) -> None:
        """Finish the writer's work (when completed) and stop its thread."""
        writer = self.writer
        if writer is None:
            return
        try:
            if completed:
                self.flush()
        finally:
            self.writer = None
            writer.close()
            self.files_written += writer.files_written
            self.files_linked += writer.files_linked

    def flush(self) -> None:
        """Wait until every queued file is written; write here what the writer could not."""
        writer = self.writer
        if writer is None or not writer.pending:
            return
        failed, removed_files, removed_bytes, hashes = writer.flush()
        self.files -= removed_files
        self.size -= removed_bytes
        for rel, mode, taken in hashes:
            self.record.keep_hash(rel, mode, taken)
        for job in failed:
            self.write_now(job)

    def flush_for(self, rel: bytes) -> None:
        """Flush when a file is queued at rel."""
        writer = self.writer
        if writer is not None and rel in writer.pending:
            self.flush()

    def count(self, files: int, size: int = 0) -> None:
        """Count regular files created (or removed, when negative) and their bytes."""
        self.files += files
        self.size += size

    def is_folder(self, rel: bytes) -> bool:
        """rel is a folder this extraction made or checked (b"" is dest)."""
        return not rel or rel in self.dirs

    def set_root(self, mode: int, mtime: int | None) -> None:
        """The mode and mtime dest gets at the end."""
        self.root_attrs = (mode, mtime)

    def forget_root(self) -> None:
        """The root was hidden: the mode and mtime an earlier member gave it no longer apply."""
        self.root_attrs = None

    def queues(self, rel: bytes, size: int) -> bool:
        """A file of size bytes at rel goes to the writer thread (its data read into memory):
        a small one, or one the store may hold (see writer.MAX_LINKED_FILE)."""
        limit = MAX_QUEUED_FILE if self.store is None else MAX_LINKED_FILE
        return self.writer is not None and size <= limit and rel not in self.dirs

    def queue_file(self, job: FileJob) -> None:
        """Hand a small file, its data in memory, to the writer thread (see :meth:`queues`)."""
        writer = self.writer
        assert writer is not None
        while not writer.submit(job):
            self.flush()

    def _create(self, rel: bytes, mode: int) -> tuple[int, bytes]:
        """Open a new, empty file at rel with mode (whatever was there replaced): (fd, path)."""
        self.flush()
        self.record.forget(rel)
        full = self.base + rel
        try:
            fd = os.open(full, FILE_FLAGS, mode)
        except FileExistsError:
            self.remove(full, rel)
            fd = os.open(full, FILE_FLAGS, mode)
        if mode & self.umask:
            try:
                os.fchmod(fd, mode)
            except BaseException:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(full)
                raise
        return fd, full

    def write_file(
        self, rel: bytes, mode: int, mtime: int | None, size: int, fill: Callable[[Sink], None]
    ) -> None:
        """Create the file at rel here, fill(sink) giving its data to sink as it is read."""
        fd, full = self._create(rel, mode)
        content = hashlib.sha256() if self.record.keep_hashes else None
        with unlinked_unless_done(fd, full):
            if size:
                if content is None:
                    fill(functools.partial(write_all, fd))
                else:
                    fill(functools.partial(write_hashed, fd, content))
            if mtime is not None:
                os.utime(fd, ns=(mtime, mtime))
            written = os.fstat(fd) if content is not None else None
        self.files_written += 1
        if content is not None and written is not None:
            digest = content.hexdigest()
            if self.store is not None:
                # hashed only while written: stored now, or replaced by the stored copy
                _, written = self.store.put(full, digest, mode)
            self.record.keep_hash(rel, mode, (identity_of(written), digest))

    def write_sparse(
        self,
        rel: bytes,
        mode: int,
        mtime: int | None,
        size: int,
        segments: list[tuple[int, int]],
        fill: Callable[[Sink], None],
    ) -> None:
        """Create the sparse file at rel: each segment's data at its offset, holes between.

        Its content hash is left to the digest, which reads the file back (hashing its holes
        here would cost as much).
        """
        fd, full = self._create(rel, mode)
        self.record.lose_track()
        with unlinked_unless_done(fd, full):
            fill(SparseWriter(fd, segments))
            os.ftruncate(fd, size)
            if mtime is not None:
                os.utime(fd, ns=(mtime, mtime))
        self.files_written += 1

    def write_now(self, job: Job) -> None:
        """Create a file or folder the writer gave back, here (counted when it was queued)."""
        if isinstance(job, DirJob):
            attributes = self.dirs.get(job.rel)
            self.make_dir(job.full, job.rel, job.mode)
            if attributes is not None:
                self.dirs[job.rel] = attributes
            return
        self.record.forget(job.rel)
        hashing, store = self.record.keep_hashes, self.store
        try:
            try:
                taken, linked = place_file(job, self.umask, store, hashing=hashing)
            except FileExistsError:
                self.remove(job.full, job.rel)
                taken, linked = place_file(job, self.umask, store, hashing=hashing)
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                raise UnsafeArchive(job.name, "name too long for the filesystem") from None
            raise
        if linked:
            self.files_linked += 1
        else:
            self.files_written += 1
        if taken is not None:
            self.record.keep_hash(job.rel, job.mode, taken)

    def add_folder(self, name: str, rel: bytes, mode: int, mtime: int | None) -> None:
        """Create the folder at rel (not the root); its mode and mtime are applied at the end."""
        known = self.dirs.get(rel)
        if known is not None:
            self.dirs[rel] = (mode, mtime, known[2])
            return
        self.flush_for(rel)
        self.ensure_parent(rel, name)
        full = self.base + rel
        create = mode | 0o700
        writer = self.writer
        if writer is None:
            self.make_dir(full, rel, create)
        else:
            while not writer.submit(DirJob(name, rel, full, create)):
                self.flush()
        self.dirs[rel] = (mode, mtime, create & ~self.umask)

    def make_dir(self, full: bytes, rel: bytes, create: int) -> None:
        """Create a folder, replacing what a lower layer left there."""
        self.record.forget(rel)
        try:
            os.mkdir(full, create)
        except FileExistsError:
            self.remove(full, rel)
            os.mkdir(full, create)

    def symlink(self, rel: bytes, target: bytes, mtime: int | None) -> None:
        """Create a symlink to target at rel (its parent made sure of)."""
        self.record.forget(rel)
        full = self.base + rel
        try:
            os.symlink(target, full)
        except FileExistsError:
            self.remove(full, rel)
            os.symlink(target, full)
        self.record.symlink(rel, target)
        if mtime is not None:
            os.utime(full, ns=(mtime, mtime), follow_symlinks=False)

    def link(self, rel: bytes, source: bytes, size: int) -> bool:
        """Hardlink rel to the regular file at source; False when source vanished meanwhile."""
        self.record.forget(rel)
        full, source_full = self.base + rel, self.base + source
        try:
            os.link(source_full, full, follow_symlinks=False)
        except FileExistsError:
            self.remove(full, rel)
            try:
                os.link(source_full, full, follow_symlinks=False)
            except FileNotFoundError:
                return False
        self.count(1, size)
        self.record.link(rel, source)
        return True

    def ensure_parent(self, rel: bytes, name: str) -> None:
        """Make sure every parent folder of rel is a real folder created by this extraction."""
        parent = rel.rpartition(b"/")[0]
        if not parent or parent in self.dirs:
            return
        parts = parent.split(b"/")
        for end in range(1, len(parts) + 1):
            prefix = b"/".join(parts[:end])
            if prefix in self.dirs:
                continue
            self.flush()  # what is on disk must be what the members so far made
            full = self.base + prefix
            try:
                info = os.lstat(full)
            except FileNotFoundError:
                os.mkdir(full, _IMPLICIT_DIR_MODE)
                self.dirs[prefix] = (_IMPLICIT_DIR_MODE, None, _IMPLICIT_DIR_MODE & ~self.umask)
                continue
            if stat.S_ISDIR(info.st_mode):
                mode = stat.S_IMODE(info.st_mode)
                self.dirs[prefix] = (mode, None, mode)
                continue
            if self.rules.replaceable(prefix):
                self.remove(full, prefix)
                os.mkdir(full, _IMPLICIT_DIR_MODE)
                self.dirs[prefix] = (_IMPLICIT_DIR_MODE, None, _IMPLICIT_DIR_MODE & ~self.umask)
                continue
            where = os.fsdecode(prefix)
            raise UnsafeArchive(name, f"parent {where!r} is {kind_of(info.st_mode)}")

    def remove(self, full: bytes, rel: bytes) -> None:
        """Remove what is at full (a folder with its content), never following symlinks."""
        info = os.lstat(full)
        record = self.record
        record.forget(rel)
        if stat.S_ISDIR(info.st_mode):
            removed: list[bytes] | None = [] if record.tracking else None
            files, size, folders = walk(full, removed)
            shutil.rmtree(full)
            self.files -= files
            self.size -= size
            cut = len(self.base)
            for path in removed or ():
                record.forget(path[cut:])
            for folder in folders:
                self.dirs.pop(folder[cut:], None)
            self.rules.removed(rel)
            return
        if stat.S_ISREG(info.st_mode):
            self.files -= 1
            self.size -= info.st_size
        os.unlink(full)

    def store_unstored(self) -> tuple[int, int]:
        """Hand the store every regular file it does not hold yet; (files, bytes) of the tree.

        Call it before :meth:`apply_attributes` (folders may become read-only).
        """
        assert self.store is not None
        return store_unstored(self.dest, self.store, self.keep_found)

    def keep_found(self, rel: bytes, mode: int, digest: str, found: os.stat_result) -> None:
        """Remember the content hash of a file as stat found it."""
        self.record.keep_hash(rel, mode, (identity_of(found), digest))

    def apply_attributes(self) -> None:
        """Apply folder modes and mtimes, deepest first, then the root's to dest."""
        for rel, (mode, mtime, now) in sorted(self.dirs.items(), key=_depth, reverse=True):
            full = self.base + rel
            if mode != now:
                os.chmod(full, mode)
            if mtime is not None:
                os.utime(full, ns=(mtime, mtime), follow_symlinks=False)
        if self.root_attrs is not None:
            mode, mtime = self.root_attrs
            os.chmod(self.dest, mode)
            if mtime is not None:
                os.utime(self.dest, ns=(mtime, mtime), follow_symlinks=False)

    def digest_lines(self) -> list[bytes] | None:
        """The tree digest's lines of what was written, when the record followed every change."""
        return self.record.digest_lines((rel, attrs[0]) for rel, attrs in self.dirs.items())
