"""Extract the tar stream of a container folder exactly as `docker cp`, and safely."""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import shutil
import stat
import tarfile
from collections.abc import AsyncIterable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from asynccache._fs import current_umask
from asynccache._threads import feed_thread
from asynccache.errors import DiskFull, TruncatedArchive, UnsafeArchive
from asynccache.tree.digest import digest_of_lines, entry_line
from asynccache.tree.tarstream import (
    CHUNK,
    Sink,
    Source,
    SourceError,
    TarReader,
    Truncated,
    members,
)
from asynccache.tree.writer import (
    FILE_FLAGS,
    MAX_QUEUED_FILE,
    DirJob,
    FileHash,
    FileJob,
    FileWriter,
    Job,
    create_file,
    identity_of,
    sha256_of,
    write_all,
)

__all__ = [
    "ExtractResult",
    "LayerResult",
    "LayerTree",
    "extract_stream",
    "extract_tar",
    "tree_stats",
]

#: Most file hashes an extraction keeps for its digest (the other files are read again).
MAX_KEPT_HASHES = 50_000
#: Most warnings kept; the rest are counted.
_MAX_WARNINGS = 100
_NAME_MAX = 255
_PATH_MAX = 4095
_IMPLICIT_DIR_MODE = 0o755
#: Name prefix of an OCI whiteout entry.
_WHITEOUT = ".wh."
#: Name prefix of whiteout metadata (aufs); such entries are never materialised.
_WHITEOUT_META = ".wh..wh."
#: Name of the entry that makes its folder opaque.
_OPAQUE = ".wh..wh..opq"
_WHITEOUT_BYTES = _WHITEOUT.encode()
_WHITEOUT_META_BYTES = _WHITEOUT_META.encode()
_OPAQUE_BYTES = _OPAQUE.encode()
_DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass(frozen=True)
class ExtractResult:
    """What an extraction wrote: regular files, their total size, what was skipped or altered."""

    file_count: int
    size_bytes: int
    warnings: tuple[str, ...]
    #: Content hashes of files as written, by path under the tree (see digest.tree_digest).
    file_hashes: Mapping[bytes, FileHash] = field(default_factory=dict, repr=False, compare=False)
    #: The tree's content digest (digest.tree_digest) from what was written, when known.
    digest: str | None = field(default=None, compare=False)


class _BadName(Exception):
    """A member name that must not be extracted."""


class _Outside(_BadName):
    """A well-formed member name that lies outside the extracted root."""


def _walk(top: bytes, paths: list[bytes] | None = None) -> tuple[int, int, list[bytes]]:
    """Regular files and their total size under top, and every folder (top included).

    The paths of everything but folders are appended to ``paths`` when it is given.
    """
    files = size = 0
    folders = [top]
    stack = [top]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                    stack.append(entry.path)
                else:
                    if entry.is_file(follow_symlinks=False):
                        files += 1
                        size += entry.stat(follow_symlinks=False).st_size
                    if paths is not None:
                        paths.append(entry.path)
    return files, size, folders


def tree_stats(path: Path) -> tuple[int, int]:
    """(file_count, size_bytes) of regular files under path, by lstat, never following symlinks."""
    target = os.fsencode(path)
    info = os.lstat(target)
    if stat.S_ISREG(info.st_mode):
        return 1, info.st_size
    if not stat.S_ISDIR(info.st_mode):
        return 0, 0
    files, size, _ = _walk(target)
    return files, size


def _kind(mode: int) -> str:
    """A file type in words."""
    if stat.S_ISLNK(mode):
        return "a symlink"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "a special file"


def _member_kind(info: tarfile.TarInfo) -> str:
    """A member's type in words."""
    if info.issym():
        return "a symlink"
    if info.isreg() or info.islnk():
        return "a file"
    return "a special file"


def _copy_file(source: bytes, fd: int) -> None:
    """Copy the content of the file at source into fd."""
    with open(source, "rb") as handle:
        while True:
            data = handle.read(CHUNK)
            if not data:
                return
            write_all(fd, [data], len(data))


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...


def _write_hashed(fd: int, content: _Hasher, pieces: list[bytes], total: int) -> None:
    """Write pieces to fd and add them to the content hash."""
    write_all(fd, pieces, total)
    for piece in pieces:
        content.update(piece)


def _depth(item: tuple[bytes, tuple[int, int | None, int]]) -> int:
    """How deep a folder is, for the final deepest-first pass."""
    return item[0].count(b"/")


class _Extractor:
    """Writes members under dest with os calls, tracking the folders it created."""

    def __init__(
        self,
        dest: Path,
        root: str,
        source: Source,
        *,
        layered: bool = False,
        keep_hashes: bool = False,
    ) -> None:
        self.dest = os.fsencode(dest)
        self.base = os.path.join(self.dest, b"")
        self.root = root
        self.root_parts = [part for part in root.split("/") if part not in ("", ".")]
        if not self.root_parts or ".." in self.root_parts:
            raise ValueError(f"root must name a folder, not {root!r}")
        self.source = source
        self.umask = current_umask()
        # folder relative path -> (final mode, mtime in ns or None, mode it has now)
        self.dirs: dict[bytes, tuple[int, int | None, int]] = {}
        self.root_attrs: tuple[int, int | None] | None = None
        self.files = 0
        self.size = 0
        self.warnings: list[str] = []
        self.dropped = 0
        # Layer mode: members outside the root are skipped, whiteouts apply to lower layers.
        self.layered = layered
        # paths the current layer wrote (with their ancestors), kept by its opaque markers
        self.created: set[bytes] = set()
        # target name outside the root -> placeholders (path, inode) that wait for its data
        self.deferred: dict[str, list[tuple[bytes, int]]] = {}
        self.touched = False
        self.present = False
        # placeholders of hardlinks were filled after they were counted: count on disk at the end
        self.recount = False
        # creates small files in a thread of its own while a stream is read (see writer.py)
        self.writer: FileWriter | None = None
        # content hashes of the files the writer wrote, while nothing else replaced them
        self.keep_hashes = keep_hashes
        self.hashes: dict[bytes, FileHash] = {}
        # every file and symlink written, as its digest line needs it: path -> (kind, mode,
        # content hash or link target); None once an event it cannot follow happened
        self.entries: dict[bytes, tuple[bytes, int, bytes]] | None = {} if keep_hashes else None

    def add_all(self, source: Source) -> None:
        """Extract every member of source, small files through the writer thread."""
        self.start_writer()
        completed = False
        try:
            for tar, info in members(source):
                self.add(tar, info)
            completed = True
        finally:
            self.stop_writer(completed=completed)

    def start_writer(self) -> None:
        """Hand small regular files to a writer thread until stop_writer."""
        if self.writer is None:
            self.writer = FileWriter(self.umask, hashing=self.keep_hashes)

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

    def flush(self) -> None:
        """Wait until every queued file is written; write here what the writer could not."""
        writer = self.writer
        if writer is None or not writer.pending:
            return
        failed, removed_files, removed_bytes, hashes = writer.flush()
        self.files -= removed_files
        self.size -= removed_bytes
        for rel, mode, taken in hashes:
            self.keep_hash(rel, mode, taken)
        for job in failed:
            self.write_now(job)

    def flush_for(self, rel: bytes) -> None:
        """Flush when a file is queued at rel."""
        writer = self.writer
        if writer is not None and rel in writer.pending:
            self.flush()

    def record(self, rel: bytes, kind: bytes, mode: int, detail: bytes) -> None:
        """Remember what rel now is, for the tree's digest."""
        if self.entries is not None:
            self.entries[rel] = (kind, mode, detail)

    def forget(self, rel: bytes) -> None:
        """rel is about to change: its content hash and digest entry no longer hold."""
        self.hashes.pop(rel, None)
        if self.entries is not None:
            self.entries.pop(rel, None)

    def lose_track(self) -> None:
        """Something changed that the entries do not follow: the digest will read the tree."""
        self.entries = None

    def tree_digest(self) -> str | None:
        """digest.tree_digest of the tree, from the entries and folders; None when unknown."""
        entries = self.entries
        if entries is None:
            return None
        lines = [entry_line(rel, *entry) for rel, entry in entries.items()]
        lines += [entry_line(rel, b"d", attrs[0], b"") for rel, attrs in self.dirs.items() if rel]
        return digest_of_lines(lines)

    def warn(self, message: str) -> None:
        """Record a warning, keeping at most _MAX_WARNINGS."""
        if len(self.warnings) < _MAX_WARNINGS:
            self.warnings.append(message)
        else:
            self.dropped += 1

    def parts(self, name: str) -> list[str]:
        """The components of a safe member name (no empty, "." or ".." component)."""
        if not name:
            raise _BadName("empty name")
        if "\x00" in name:
            raise _BadName("NUL byte in name")
        if name[0] == "/":
            raise _BadName("absolute name")
        parts = [part for part in name.split("/") if part and part != "."]
        if ".." in parts:
            raise _BadName("'..' component")
        return parts

    def relative(self, name: str) -> bytes:
        """The path under dest that a member name maps to (b"" for the root)."""
        parts = self.parts(name)
        count = len(self.root_parts)
        if parts[:count] != self.root_parts:
            raise _Outside(f"outside {self.root}/")
        try:
            rel = os.fsencode("/".join(parts[count:]))
        except UnicodeError:
            raise _BadName("name cannot be encoded") from None
        if len(rel) > _NAME_MAX and any(len(part) > _NAME_MAX for part in rel.split(b"/")):
            raise _BadName(f"a path component is longer than {_NAME_MAX} bytes")
        if len(self.base) + len(rel) > _PATH_MAX:
            raise _BadName(f"path longer than {_PATH_MAX} bytes once extracted")
        return rel

    def mode(self, info: tarfile.TarInfo) -> int:
        """The permission bits to apply, without setuid/setgid/sticky."""
        mode = info.mode
        if mode & 0o7000:
            self.warn(f"{info.name}: dropped setuid/setgid/sticky bits (mode {mode & 0o7777:04o})")
        return mode & 0o777

    def mtime(self, info: tarfile.TarInfo) -> int | None:
        """The member's mtime in nanoseconds, or None when it cannot be applied."""
        value = info.mtime
        try:
            ns = value * 1_000_000_000 if isinstance(value, int) else round(value * 1e9)
        except (ValueError, OverflowError):
            ns = None
        if ns is None or not -(2**63) <= ns < 2**63:
            self.warn(f"{info.name}: mtime {value!r} out of range, left unset")
            return None
        return ns

    def add(self, tar: TarReader, info: tarfile.TarInfo) -> None:
        """Extract one member."""
        name = info.name
        try:
            rel = self.relative(name)
        except _Outside as exc:
            if not self.layered:
                raise UnsafeArchive(name, str(exc)) from None
            self.add_outside(info)
            return
        except _BadName as exc:
            raise UnsafeArchive(name, str(exc)) from None
        if info.size < 0:
            raise UnsafeArchive(name, "negative size")
        if self.layered:
            self.touched = True
            if self.add_layer_special(info, rel):
                return
            if not rel and not info.isdir():
                self.warn(f"{name}: the root replaced by {_member_kind(info)}; its content hidden")
                self.hide_lower(b"")
                self.present = False
                self.root_attrs = None
                return
            self.present = True
        elif not rel and not info.isdir():
            raise UnsafeArchive(name, "the root member must be a directory")
        try:
            if info.isreg():
                self.add_file(tar, info, rel)
            elif info.isdir():
                self.add_dir(info, rel)
            elif info.issym():
                self.flush()
                self.add_symlink(info, rel)
            elif info.islnk():
                self.flush()
                self.add_hardlink(info, rel)
            elif info.ischr() or info.isblk():
                kind = "character" if info.ischr() else "block"
                self.warn(f"{name}: skipped {kind} device")
            elif info.isfifo():
                self.warn(f"{name}: skipped FIFO")
            else:
                self.warn(f"{name}: skipped member of unknown type {info.type!r}")
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                raise UnsafeArchive(name, "name too long for the filesystem") from None
            raise
        if self.layered:
            self.mark_created(rel)

    def mark_created(self, rel: bytes) -> None:
        """Record that the current layer holds rel (and so every folder above it)."""
        created = self.created
        while rel not in created:
            created.add(rel)
            if not rel:
                return
            rel = rel.rpartition(b"/")[0]

    def add_outside(self, info: tarfile.TarInfo) -> None:
        """Layer mode: skip a member outside the root, unless it whites out the root itself."""
        parts = self.parts(info.name)
        if not parts:
            return
        base, folder = parts[-1], parts[:-1]
        count = len(folder)
        if base == _OPAQUE:
            hides_root = folder == self.root_parts[:count]
        elif base.startswith(_WHITEOUT_META):
            return
        elif base.startswith(_WHITEOUT):
            target = base[len(_WHITEOUT) :]
            if target in ("", ".", ".."):
                raise UnsafeArchive(info.name, f"whiteout of {target!r} points outside its folder")
            hides_root = [*folder, target] == self.root_parts[: count + 1]
        else:
            return
        if hides_root:
            self.flush()
            self.touched = True
            self.hide_lower(b"")
            if b"" not in self.created:
                self.present = False
                self.root_attrs = None

    def add_layer_special(self, info: tarfile.TarInfo, rel: bytes) -> bool:
        """Layer mode: apply a whiteout or skip whiteout metadata; False for an ordinary member."""
        parent, _, base = rel.rpartition(b"/")
        if _WHITEOUT_META_BYTES in parent and any(
            part.startswith(_WHITEOUT_META_BYTES) for part in parent.split(b"/")
        ):
            return True
        if not base.startswith(_WHITEOUT_BYTES):
            return False
        self.flush()
        if base == _OPAQUE_BYTES:
            self.add_opaque(info, parent)
            return True
        if base.startswith(_WHITEOUT_META_BYTES):
            return True
        target = base[len(_WHITEOUT_BYTES) :]
        if target in (b"", b".", b".."):
            raise UnsafeArchive(info.name, f"whiteout of {os.fsdecode(target)!r} points outside")
        self.ensure_parent(rel, info.name)
        self.present = True
        path = parent + b"/" + target if parent else target
        if path not in self.created:
            full = self.base + path
            try:
                os.lstat(full)
            except FileNotFoundError:
                pass
            else:
                self.remove(full, path)
        if parent:
            self.mark_created(parent)
        else:
            self.mark_created(b"")
        return True

    def add_opaque(self, info: tarfile.TarInfo, folder: bytes) -> None:
        """Hide every child of folder that a lower layer wrote."""
        self.present = True
        if folder:
            self.ensure_parent(folder + b"/" + _OPAQUE_BYTES, info.name)
        self.mark_created(folder)
        self.hide_lower(folder)

    def hide_lower(self, folder: bytes) -> None:
        """Remove what lower layers wrote under folder, keeping the current layer's paths."""
        full = self.base + folder if folder else self.dest
        with os.scandir(full) as entries:
            children = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
        for name, is_dir in children:
            child = folder + b"/" + os.fsencode(name) if folder else os.fsencode(name)
            if child in self.created:
                if is_dir:
                    self.hide_lower(child)
                continue
            self.remove(self.base + child, child)

    def defer_hardlink(self, info: tarfile.TarInfo, rel: bytes) -> None:
        """Layer mode: a hardlink to a file outside the root waits for that file's data."""
        key = "/".join(self.parts(info.linkname))
        self.recount = True
        self.lose_track()
        self.ensure_parent(rel, info.name)
        self.forget(rel)
        full = self.base + rel
        for first, inode in self.deferred.get(key, ()):
            try:
                found = os.lstat(self.base + first)
            except FileNotFoundError:
                continue
            if found.st_ino == inode and stat.S_ISREG(found.st_mode) and first != rel:
                try:
                    os.link(self.base + first, full, follow_symlinks=False)
                except FileExistsError:
                    self.remove(full, rel)
                    os.link(self.base + first, full, follow_symlinks=False)
                self.files += 1
                return
        try:
            fd = os.open(full, FILE_FLAGS, 0o600)
        except FileExistsError:
            self.remove(full, rel)
            fd = os.open(full, FILE_FLAGS, 0o600)
        try:
            inode = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        self.files += 1
        self.deferred.setdefault(key, []).append((rel, inode))

    def fill_deferred(self, tar: TarReader, info: tarfile.TarInfo) -> bool:
        """Write a target's data into the placeholders waiting for it; True once none wait."""
        try:
            key = "/".join(self.parts(info.name))
        except _BadName:
            return not self.deferred
        waiting = self.deferred.pop(key, None)
        if waiting is None:
            return not self.deferred
        if not info.isreg() or info.sparse is not None:
            raise UnsafeArchive(info.name, "hardlink target is not a regular file")
        mode = self.mode(info)
        mtime = self.mtime(info)
        filled: bytes | None = None
        for rel, inode in waiting:
            self.forget(rel)
            parent = rel.rpartition(b"/")[0]
            if parent and parent not in self.dirs:
                continue
            full = self.base + rel
            try:
                fd = os.open(full, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                found = os.fstat(fd)
                if found.st_ino != inode or not stat.S_ISREG(found.st_mode):
                    continue
                os.ftruncate(fd, 0)
                if filled is None:
                    if info.size:
                        self.copy(tar, info, fd)
                    filled = full
                else:
                    _copy_file(filled, fd)
                os.fchmod(fd, mode)
                if mtime is not None:
                    os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)
        return not self.deferred

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
            if self.layered and prefix not in self.created:
                self.remove(full, prefix)
                os.mkdir(full, _IMPLICIT_DIR_MODE)
                self.dirs[prefix] = (_IMPLICIT_DIR_MODE, None, _IMPLICIT_DIR_MODE & ~self.umask)
                continue
            where = os.fsdecode(prefix)
            raise UnsafeArchive(name, f"parent {where!r} is {_kind(info.st_mode)}")

    def remove(self, full: bytes, rel: bytes) -> None:
        """Remove what is at full (a folder with its content), never following symlinks."""
        info = os.lstat(full)
        self.forget(rel)
        if stat.S_ISDIR(info.st_mode):
            tracked = self.hashes or self.entries
            removed: list[bytes] | None = [] if tracked else None
            files, size, folders = _walk(full, removed)
            shutil.rmtree(full)
            self.files -= files
            self.size -= size
            cut = len(self.base)
            for path in removed or ():
                self.forget(path[cut:])
            for folder in folders:
                self.dirs.pop(folder[cut:], None)
            if self.created:
                inside = rel + b"/"
                self.created = {p for p in self.created if not p.startswith(inside)}
            return
        if stat.S_ISREG(info.st_mode):
            self.files -= 1
            self.size -= info.st_size
        os.unlink(full)

    def add_file(self, tar: TarReader, info: tarfile.TarInfo, rel: bytes) -> None:
        """Write a regular file with its mode and mtime."""
        if info.sparse is not None:
            raise UnsafeArchive(info.name, "sparse files are not supported")
        mode = self.mode(info)
        mtime = self.mtime(info)
        self.ensure_parent(rel, info.name)
        full = self.base + rel
        writer = self.writer
        if writer is not None and info.size <= MAX_QUEUED_FILE and rel not in self.dirs:
            pieces = self.read_data(tar, info)
            job = FileJob(info.name, rel, full, mode, mtime, pieces, info.size)
            while not writer.submit(job):
                self.flush()
        else:
            self.flush()
            self.forget(rel)
            try:
                fd = os.open(full, FILE_FLAGS, mode)
            except FileExistsError:
                self.remove(full, rel)
                fd = os.open(full, FILE_FLAGS, mode)
            content = hashlib.sha256() if self.keep_hashes else None
            try:
                if mode & self.umask:
                    os.fchmod(fd, mode)
                if info.size:
                    if content is None:
                        self.copy(tar, info, fd)
                    else:
                        tar.copy(info, functools.partial(_write_hashed, fd, content))
                if mtime is not None:
                    os.utime(fd, ns=(mtime, mtime))
                if content is not None:
                    self.keep_hash(rel, mode, (identity_of(os.fstat(fd)), content.hexdigest()))
            finally:
                os.close(fd)
        self.files += 1
        self.size += info.size

    def keep_hash(self, rel: bytes, mode: int, taken: FileHash) -> None:
        """Remember the content hash of a file just written (within the budget)."""
        # past the budget, only newer hashes of known paths (an old one must not stay)
        if len(self.hashes) >= MAX_KEPT_HASHES and rel not in self.hashes:
            self.lose_track()
            return
        self.hashes[rel] = taken
        self.record(rel, b"f", mode, taken[1].encode())

    def write_now(self, job: Job) -> None:
        """Create a file or folder the writer gave back, here (counted when it was queued)."""
        if isinstance(job, DirJob):
            attributes = self.dirs.get(job.rel)
            self.make_dir(job.full, job.rel, job.mode)
            if attributes is not None:
                self.dirs[job.rel] = attributes
            return
        self.forget(job.rel)
        hashing = self.keep_hashes
        try:
            try:
                found = create_file(job, self.umask, stat_after=hashing)
            except FileExistsError:
                self.remove(job.full, job.rel)
                found = create_file(job, self.umask, stat_after=hashing)
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG:
                raise UnsafeArchive(job.name, "name too long for the filesystem") from None
            raise
        if found is not None:
            self.keep_hash(job.rel, job.mode, (identity_of(found), sha256_of(job.pieces)))

    def read_data(self, tar: TarReader, info: tarfile.TarInfo) -> list[bytes]:
        """Read a member's data into memory (small members only)."""
        pieces: list[bytes] = []
        if info.size:
            self.copy(tar, info, lambda more, _size: pieces.extend(more))
        return pieces

    def copy(self, tar: TarReader, info: tarfile.TarInfo, out: int | Sink) -> None:
        """Copy a member's data from the stream to a file descriptor, or collect its pieces."""
        tar.copy(info, out if callable(out) else functools.partial(write_all, out))

    def add_dir(self, info: tarfile.TarInfo, rel: bytes) -> None:
        """Create a folder; its mode and mtime are applied at the end."""
        mode = self.mode(info)
        mtime = self.mtime(info)
        if not rel:
            self.root_attrs = (mode, mtime)
            return
        known = self.dirs.get(rel)
        if known is not None:
            self.dirs[rel] = (mode, mtime, known[2])
            return
        self.flush_for(rel)
        self.ensure_parent(rel, info.name)
        full = self.base + rel
        create = mode | 0o700
        writer = self.writer
        if writer is None:
            self.make_dir(full, rel, create)
        else:
            while not writer.submit(DirJob(info.name, rel, full, create)):
                self.flush()
        self.dirs[rel] = (mode, mtime, create & ~self.umask)

    def make_dir(self, full: bytes, rel: bytes, create: int) -> None:
        """Create a folder, replacing what a lower layer left there."""
        self.forget(rel)
        try:
            os.mkdir(full, create)
        except FileExistsError:
            self.remove(full, rel)
            os.mkdir(full, create)

    def add_symlink(self, info: tarfile.TarInfo, rel: bytes) -> None:
        """Create a symlink with the member's target text, verbatim."""
        target = info.linkname
        if not target:
            raise UnsafeArchive(info.name, "empty symlink target")
        if "\x00" in target:
            raise UnsafeArchive(info.name, "NUL byte in symlink target")
        try:
            raw_target = os.fsencode(target)
        except UnicodeError:
            raise UnsafeArchive(info.name, "symlink target cannot be encoded") from None
        if len(raw_target) > _PATH_MAX:
            raise UnsafeArchive(info.name, f"symlink target longer than {_PATH_MAX} bytes")
        mtime = self.mtime(info)
        self.ensure_parent(rel, info.name)
        self.forget(rel)
        full = self.base + rel
        try:
            os.symlink(raw_target, full)
        except FileExistsError:
            self.remove(full, rel)
            os.symlink(raw_target, full)
        self.record(rel, b"l", 0, raw_target)
        if mtime is not None:
            os.utime(full, ns=(mtime, mtime), follow_symlinks=False)

    def add_hardlink(self, info: tarfile.TarInfo, rel: bytes) -> None:
        """Link to a regular file already extracted in this tree."""
        name, target = info.name, info.linkname
        try:
            source = self.relative(target)
        except _Outside as exc:
            if not self.layered:
                raise UnsafeArchive(name, f"hardlink target {target!r}: {exc}") from None
            self.defer_hardlink(info, rel)
            return
        except _BadName as exc:
            raise UnsafeArchive(name, f"hardlink target {target!r}: {exc}") from None
        if not source:
            raise UnsafeArchive(name, "hardlink to the root folder")
        parent = source.rpartition(b"/")[0]
        if parent and parent not in self.dirs:
            raise UnsafeArchive(name, f"hardlink target {target!r} is not an extracted file")
        source_full = self.base + source
        try:
            found = os.lstat(source_full)
        except FileNotFoundError:
            raise UnsafeArchive(name, f"hardlink target {target!r} is not extracted yet") from None
        if not stat.S_ISREG(found.st_mode):
            kind = _kind(found.st_mode)
            raise UnsafeArchive(name, f"hardlink target {target!r} is {kind}, not a regular file")
        if source == rel:
            return
        self.ensure_parent(rel, name)
        self.forget(rel)
        full = self.base + rel
        try:
            os.link(source_full, full, follow_symlinks=False)
        except FileExistsError:
            self.remove(full, rel)
            try:
                os.link(source_full, full, follow_symlinks=False)
            except FileNotFoundError:
                raise UnsafeArchive(name, f"hardlink target {target!r} was removed") from None
        self.files += 1
        self.size += found.st_size
        if self.entries is not None:
            shared = self.entries.get(source)
            if shared is None:
                self.lose_track()
            else:
                self.entries[rel] = shared
                if source in self.hashes:
                    self.hashes[rel] = self.hashes[source]

    def finish(self) -> ExtractResult:
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
        warnings = tuple(self.warnings)
        if self.dropped:
            warnings += (f"{self.dropped} more warnings not shown",)
        if self.recount:
            self.files, self.size, _ = _walk(self.dest)
        return ExtractResult(
            file_count=self.files,
            size_bytes=self.size,
            warnings=warnings,
            file_hashes=self.hashes,
            digest=self.tree_digest(),
        )


@contextmanager
def _domain_errors(dest: Path) -> Iterator[None]:
    """Turn the parser's internal failures and a full disk into domain errors."""
    try:
        yield
    except SourceError as exc:
        raise exc.error from None
    except Truncated as exc:
        raise TruncatedArchive(str(exc)) from None
    except OSError as exc:
        if exc.errno in _DISK_FULL_ERRNOS:
            where = os.fsdecode(dest)
            raise DiskFull(f"no space left while extracting into {where}: {exc.strerror}") from exc
        raise


def _extract(
    read: Callable[[int], bytes], dest: Path, root: str, keep_hashes: bool = False
) -> ExtractResult:
    """Extract the tar stream that read() yields under dest."""
    source = Source(read)
    extractor = _Extractor(dest, root, source, keep_hashes=keep_hashes)
    with _domain_errors(dest):
        extractor.add_all(source)
        return extractor.finish()


@dataclass(frozen=True)
class LayerResult:
    """What applying one layer did to the tree."""

    #: The layer held something under the root (an entry or a whiteout hiding it).
    touched: bool
    #: Hardlinks to files outside the root wait for :meth:`LayerTree.fill_links`.
    links_pending: bool


class LayerTree:
    """Applies image layers in order to one folder: only ``root``, OCI whiteouts, safe writes."""

    def __init__(self, dest: Path, *, root: str = "testbed", keep_hashes: bool = False) -> None:
        self.dest = dest
        self._extractor = _Extractor(
            dest, root, Source(_no_data), layered=True, keep_hashes=keep_hashes
        )

    @property
    def present(self) -> bool:
        """True when the root exists after the layers applied so far."""
        return self._extractor.present

    def apply(self, read: Callable[[int], bytes]) -> LayerResult:
        """Sync: apply the uncompressed layer tar that read() yields (in a worker thread)."""
        extractor = self._extractor
        source = Source(read)
        extractor.source = source
        extractor.created = set()
        extractor.deferred = {}
        extractor.touched = False
        with _domain_errors(self.dest):
            extractor.add_all(source)
        return LayerResult(touched=extractor.touched, links_pending=bool(extractor.deferred))

    def fill_links(self, read: Callable[[int], bytes]) -> None:
        """Sync: read the last applied layer again to fill hardlinks to files outside the root."""
        extractor = self._extractor
        if not extractor.deferred:
            return
        source = Source(read)
        extractor.source = source
        with _domain_errors(self.dest):
            for tar, info in members(source):
                if extractor.fill_deferred(tar, info):
                    return
        missing = next(iter(extractor.deferred))
        raise UnsafeArchive(missing, "hardlink target not found earlier in its layer")

    def finish(self) -> ExtractResult:
        """Apply folder modes and mtimes; count the regular files of the final tree."""
        with _domain_errors(self.dest):
            return self._extractor.finish()


def _no_data(size: int) -> bytes:
    """A source that is empty."""
    return b""


def extract_tar(
    fileobj: BinaryIO, dest: Path, *, root: str = "testbed", keep_hashes: bool = False
) -> ExtractResult:
    """Sync: read a tar stream (non-seekable, tarfile mode "r|") and write it under dest."""
    return _extract(fileobj.read, dest, root, keep_hashes)


async def extract_stream(
    chunks: AsyncIterable[bytes], dest: Path, *, root: str = "testbed", keep_hashes: bool = False
) -> ExtractResult:
    """Extract an async stream of tar chunks under dest in a worker thread, with bounded memory.

    ``keep_hashes``: also return the content hashes of the files written (for tree_digest).
    """
    extract = functools.partial(_extract, dest=dest, root=root, keep_hashes=keep_hashes)
    return await feed_thread(chunks, extract)
