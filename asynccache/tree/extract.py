"""Safe tar -> folder: the member writer, exactly as `docker cp` extracts, under a rules object.

The :class:`Extractor` reads what each member is and checks it (names in paths.py); a
:class:`~asynccache.tree.folder.Folder` makes it so on disk. What a member means beyond
"write this here" is its rules' call: :class:`PlainRules` for the archive of one container
folder, :class:`~asynccache.tree.layered.LayerRules` for OCI image layers.
"""

from __future__ import annotations

import errno
import functools
import os
import stat
import tarfile
from collections.abc import AsyncIterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from asynccache._threads import Read, feed_thread
from asynccache.errors import DiskFull, TruncatedArchive, UnsafeArchive
from asynccache.tree.budget import Budget
from asynccache.tree.dedup import ContentStore
from asynccache.tree.digest import FileHash, digest_of_lines
from asynccache.tree.exclude import ExcludeRules
from asynccache.tree.file_data import write_all
from asynccache.tree.folder import Folder, FolderRules, kind_of
from asynccache.tree.paths import BadName, MemberPaths, Outside, link_target
from asynccache.tree.tar_headers import Member
from asynccache.tree.tarstream import (
    Sink,
    Source,
    SourceError,
    TarReader,
    Truncated,
    members,
)
from asynccache.tree.writer import FileJob

__all__ = [
    "ExtractResult",
    "Extractor",
    "PlainRules",
    "Rules",
    "domain_errors",
    "extract_stream",
    "extract_tar",
]

#: Permission bits a file keeps: setuid, setgid, sticky and write for others are dropped (with a
#: warning, see Extractor.mode).
_KEPT_MODE_BITS = 0o775
_DROPPED_MODE_BITS = 0o7777 & ~_KEPT_MODE_BITS
#: Nanosecond mtimes are signed 64-bit; seconds from this one on no longer fit.
_NS_LIMIT = 2**63
_MAX_SECONDS = _NS_LIMIT // 1_000_000_000
#: Most warnings kept; the rest are counted.
_MAX_WARNINGS = 100
#: Members named in the one warning about dropped write permission for others.
_NAMED_WRITABLE = 3
#: The pax record of a file's capabilities (as `docker cp`'s archive carries them).
_CAPABILITIES = "SCHILY.xattr.security.capability"
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
    #: The sorted lines that digest was taken over (so that a later change to one part of
    #: the tree, such as the git guard's to .git, need not read the rest back).
    digest_lines: Sequence[bytes] | None = field(default=None, repr=False, compare=False)
    #: Regular files created and written, and those linked from a content store instead.
    files_written: int = field(default=0, compare=False)
    files_linked: int = field(default=0, compare=False)


class Rules(FolderRules, Protocol):
    """What the members of an archive mean beyond "write this here" (see layered.py)."""

    def outside(self, extractor: Extractor, info: tarfile.TarInfo, reason: str) -> None:
        """A member whose name lies outside the root."""

    def special(self, extractor: Extractor, info: tarfile.TarInfo, rel: bytes) -> bool:
        """Before the member at rel is written: True when the rules dealt with it instead."""

    def written(self, rel: bytes) -> None:
        """The member at rel was written."""

    def outside_link(
        self, extractor: Extractor, info: tarfile.TarInfo, rel: bytes, reason: str
    ) -> None:
        """A hardlink at rel whose target lies outside the root."""


class PlainRules:
    """One folder's archive into an empty folder: nothing outside the root, the root a folder."""

    def outside(self, extractor: Extractor, info: tarfile.TarInfo, reason: str) -> None:
        raise UnsafeArchive(info.name, reason)

    def special(self, extractor: Extractor, info: tarfile.TarInfo, rel: bytes) -> bool:
        if not rel and not info.isdir():
            raise UnsafeArchive(info.name, "the root member must be a directory")
        return False

    def written(self, rel: bytes) -> None:
        pass

    def outside_link(
        self, extractor: Extractor, info: tarfile.TarInfo, rel: bytes, reason: str
    ) -> None:
        raise UnsafeArchive(info.name, f"hardlink target {info.linkname!r}: {reason}")

    def replaceable(self, rel: bytes) -> bool:
        return False

    def removed(self, rel: bytes) -> None:
        pass


class Extractor:
    """Writes tar members under dest, as its rules say, into a :class:`Folder`."""

    def __init__(
        self,
        dest: Path,
        root: str,
        rules: Rules,
        *,
        keep_hashes: bool = False,
        budget: Budget | None = None,
        store: ContentStore | None = None,
        exclude: ExcludeRules | None = None,
    ) -> None:
        self.paths = MemberPaths(dest, root)
        self.rules = rules
        self.folder = Folder(self.paths.dest, rules, keep_hashes=keep_hashes, store=store)
        #: What the entry may still read (sources made for this extraction are charged).
        self.budget = budget
        # paths left out of the tree (--exclude)
        self.exclude = exclude or None
        self.warnings: list[str] = []
        self.dropped = 0
        # members that were writable by others, and the first few of their names
        self.world_writable = 0
        self.writable_names: list[str] = []

    def source(self, read: Read) -> Source:
        """A tar source reading read(), charged to this extraction's budget."""
        return Source(read, self.budget)

    def add_all(self, source: Source) -> None:
        """Extract every member of source, small files through the writer thread."""
        folder = self.folder
        folder.start_writer()
        completed = False
        try:
            for tar, info in members(source):
                self.add(tar, info)
            completed = True
        finally:
            folder.stop_writer(completed=completed)

    def warn(self, message: str) -> None:
        """Record a warning, keeping at most _MAX_WARNINGS."""
        if len(self.warnings) < _MAX_WARNINGS:
            self.warnings.append(message)
        else:
            self.dropped += 1

    def mode(self, info: tarfile.TarInfo) -> int:
        """The permission bits to apply, without setuid/setgid/sticky or write for others."""
        mode = info.mode
        if mode & 0o7000:
            self.warn(f"{info.name}: dropped setuid/setgid/sticky bits (mode {mode & 0o7777:04o})")
        if mode & 0o002:
            # a tree others may write to could be altered under the trainers that run it
            self.world_writable += 1
            if len(self.writable_names) < _NAMED_WRITABLE:
                self.writable_names.append(info.name)
        return mode & _KEPT_MODE_BITS

    def mtime(self, info: tarfile.TarInfo) -> int | None:
        """The member's mtime in nanoseconds, or None when it cannot be applied."""
        value = info.mtime
        try:
            ns = value * 1_000_000_000 if isinstance(value, int) else round(value * 1e9)
        except (ValueError, OverflowError):
            ns = None
        if ns is None or not -_NS_LIMIT <= ns < _NS_LIMIT:
            self.warn(f"{info.name}: mtime {value!r} out of range, left unset")
            return None
        return ns

    def add(self, tar: TarReader, info: Member) -> None:
        """Extract one member."""
        name = info.name
        try:
            rel = self.paths.relative(name)
        except Outside as exc:
            self.rules.outside(self, info, str(exc))
            return
        except BadName as exc:
            raise UnsafeArchive(name, str(exc)) from None
        if info.size < 0:
            raise UnsafeArchive(name, "negative size")
        if self.rules.special(self, info, rel):
            return
        if info.pax_headers and _CAPABILITIES in info.pax_headers:
            self.warn(f"{name}: dropped its file capabilities (security.capability)")
        if rel and self.exclude is not None and self.excluded(info, rel):
            return
        try:
            if info.isreg():
                self.add_file(tar, info, rel)
            elif info.isdir():
                self.add_dir(info, rel)
            elif info.issym():
                self.folder.flush()
                self.add_symlink(info, rel)
            elif info.islnk():
                self.folder.flush()
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
        self.rules.written(rel)

    def excluded(self, info: Member, rel: bytes) -> bool:
        """True when --exclude leaves the member out (a hardlink to a left-out file too)."""
        assert self.exclude is not None
        if self.exclude.excludes(rel, info.isdir()):
            return True
        if not info.islnk():
            return False
        try:
            target = self.paths.relative(info.linkname)
        except BadName:
            return False  # add_hardlink reports it
        if not target or not self.exclude.excludes(target, False):
            return False
        self.warn(f"{info.name}: left out, its hardlink target {info.linkname!r} is excluded")
        return True

    def add_file(self, tar: TarReader, info: Member, rel: bytes) -> None:
        """Write a regular file with its mode and mtime."""
        # the common case without a call each: plain permission bits, an mtime in range
        mode = info.mode
        mode = self.mode(info) if mode & _DROPPED_MODE_BITS else mode & _KEPT_MODE_BITS
        seconds = info.mtime
        if type(seconds) is int and 0 <= seconds < _MAX_SECONDS:
            mtime: int | None = seconds * 1_000_000_000
        else:
            mtime = self.mtime(info)
        folder = self.folder
        folder.ensure_parent(rel, info.name)
        size = info.size
        segments = info.segments
        if segments is not None:
            if self.budget is not None:
                self.budget.take_bytes(size - info.stored)  # its holes, at their full size
            fill = functools.partial(tar.copy, info)
            folder.write_sparse(rel, mode, mtime, size, segments, fill)
        elif folder.queues(rel, size):
            # its data is in memory before it is created (the writer hashes it first, and
            # links the store's copy when there is one)
            pieces = tar.read_data(info)
            folder.queue_file(FileJob(info.name, rel, folder.base + rel, mode, mtime, pieces, size))
        else:
            folder.write_file(rel, mode, mtime, size, functools.partial(tar.copy, info))
        folder.count(1, size)

    def copy(self, tar: TarReader, info: Member, out: int | Sink) -> None:
        """Copy a member's data from the stream to a file descriptor, or collect its pieces."""
        tar.copy(info, out if callable(out) else functools.partial(write_all, out))

    def add_dir(self, info: tarfile.TarInfo, rel: bytes) -> None:
        """Create a folder; its mode and mtime are applied at the end."""
        mode = self.mode(info)
        mtime = self.mtime(info)
        if rel:
            self.folder.add_folder(info.name, rel, mode, mtime)
        else:
            self.folder.set_root(mode, mtime)

    def add_symlink(self, info: tarfile.TarInfo, rel: bytes) -> None:
        """Create a symlink with the member's target text, verbatim."""
        try:
            target = link_target(info.linkname)
        except BadName as exc:
            raise UnsafeArchive(info.name, str(exc)) from None
        mtime = self.mtime(info)
        self.folder.ensure_parent(rel, info.name)
        self.folder.symlink(rel, target, mtime)

    def add_hardlink(self, info: tarfile.TarInfo, rel: bytes) -> None:
        """Link to a regular file already extracted in this tree."""
        name, target = info.name, info.linkname
        try:
            source = self.paths.relative(target)
        except Outside as exc:
            self.rules.outside_link(self, info, rel, str(exc))
            return
        except BadName as exc:
            raise UnsafeArchive(name, f"hardlink target {target!r}: {exc}") from None
        if not source:
            raise UnsafeArchive(name, "hardlink to the root folder")
        folder = self.folder
        if not folder.is_folder(source.rpartition(b"/")[0]):
            raise UnsafeArchive(name, f"hardlink target {target!r} is not an extracted file")
        try:
            found = os.lstat(folder.base + source)
        except FileNotFoundError:
            raise UnsafeArchive(name, f"hardlink target {target!r} is not extracted yet") from None
        if not stat.S_ISREG(found.st_mode):
            kind = kind_of(found.st_mode)
            raise UnsafeArchive(name, f"hardlink target {target!r} is {kind}, not a regular file")
        if source == rel:
            return
        folder.ensure_parent(rel, name)
        if not folder.link(rel, source, found.st_size):
            raise UnsafeArchive(name, f"hardlink target {target!r} was removed")

    def finish(self) -> ExtractResult:
        """Apply folder modes and mtimes; what was written."""
        folder = self.folder
        folder.apply_attributes()
        warnings = tuple(self.warnings)
        if self.dropped:
            warnings += (f"{self.dropped} more warnings not shown",)
        if self.world_writable:
            names = ", ".join(self.writable_names)
            more = ", ..." if self.world_writable > len(self.writable_names) else ""
            warnings += (
                f"dropped write permission for others from {self.world_writable} members "
                f"({names}{more})",
            )
        lines = folder.digest_lines()
        return ExtractResult(
            file_count=folder.files,
            size_bytes=folder.size,
            warnings=warnings,
            file_hashes=folder.record.hashes,
            digest=None if lines is None else digest_of_lines(lines),
            digest_lines=lines,
            files_written=folder.files_written,
            files_linked=folder.files_linked,
        )


@contextmanager
def domain_errors(dest: Path) -> Iterator[None]:
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
    read: Read,
    dest: Path,
    root: str,
    keep_hashes: bool = False,
    budget: Budget | None = None,
    store: ContentStore | None = None,
    exclude: ExcludeRules | None = None,
) -> ExtractResult:
    """Extract the tar stream that read() yields under dest."""
    extractor = Extractor(
        dest,
        root,
        PlainRules(),
        keep_hashes=keep_hashes,
        budget=budget,
        store=store,
        exclude=exclude,
    )
    with domain_errors(dest):
        extractor.add_all(extractor.source(read))
        return extractor.finish()


def extract_tar(
    fileobj: BinaryIO,
    dest: Path,
    *,
    root: str = "testbed",
    keep_hashes: bool = False,
    budget: Budget | None = None,
    store: ContentStore | None = None,
    exclude: ExcludeRules | None = None,
) -> ExtractResult:
    """Sync: read a tar stream (non-seekable, tarfile mode "r|") and write it under dest."""
    return _extract(fileobj.read, dest, root, keep_hashes, budget, store, exclude)


async def extract_stream(
    chunks: AsyncIterable[bytes],
    dest: Path,
    *,
    root: str = "testbed",
    keep_hashes: bool = False,
    budget: Budget | None = None,
    store: ContentStore | None = None,
    exclude: ExcludeRules | None = None,
) -> ExtractResult:
    """Extract an async stream of tar chunks under dest in a worker thread, with bounded memory.

    ``keep_hashes``: also return the content hashes of the files written (for tree_digest).
    ``budget``: the bytes and members the extraction may read (LimitExceeded beyond).
    ``store``: link regular files it holds instead of writing them (see dedup.py).
    ``exclude``: leave out the paths it matches.
    """
    extract = functools.partial(
        _extract,
        dest=dest,
        root=root,
        keep_hashes=keep_hashes,
        budget=budget,
        store=store,
        exclude=exclude,
    )
    return await feed_thread(chunks, extract)
