"""OCI layer rules on top of the member writer: whiteouts, opaque dirs, outside hardlinks."""

from __future__ import annotations

import dataclasses
import os
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

from asynccache._threads import Read
from asynccache.errors import UnsafeArchive
from asynccache.tree.budget import Budget
from asynccache.tree.dedup import ContentStore
from asynccache.tree.digest import walk
from asynccache.tree.exclude import ExcludeRules
from asynccache.tree.extract import Extractor, ExtractResult, domain_errors
from asynccache.tree.file_data import FILE_FLAGS, write_all
from asynccache.tree.folder import Folder
from asynccache.tree.paths import BadName, parts
from asynccache.tree.tar_headers import Member
from asynccache.tree.tarstream import CHUNK, TarReader, members

__all__ = ["LayerResult", "LayerRules", "LayerTree"]

#: Name prefix of an OCI whiteout entry.
_WHITEOUT = ".wh."
#: Name prefix of whiteout metadata (aufs); such entries are never materialised.
_WHITEOUT_META = ".wh..wh."
#: Name of the entry that makes its folder opaque.
_OPAQUE = ".wh..wh..opq"
_WHITEOUT_BYTES = _WHITEOUT.encode()
_WHITEOUT_META_BYTES = _WHITEOUT_META.encode()
_OPAQUE_BYTES = _OPAQUE.encode()


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


class LayerRules:
    """Image layers applied in order to one folder: only the root, OCI whiteouts on what is below.

    Members outside the root are skipped, except whiteouts that hide the root itself and the
    targets of hardlinks from inside it (see :meth:`outside_link`).
    """

    def __init__(self) -> None:
        #: The root exists after the layers applied so far.
        self.present = False
        #: The current layer held something under the root (an entry or a whiteout hiding it).
        self.touched = False
        # paths the current layer wrote (with their ancestors), kept by its opaque markers
        self.created: set[bytes] = set()
        # folder -> its children in created: a removed folder's are forgotten in their number
        # of steps (rebuilding the set on each removal made replacing folders quadratic)
        self.children: dict[bytes, list[bytes]] = {}
        # target name outside the root -> placeholders (path, inode) that wait for its data
        self.deferred: dict[str, list[tuple[bytes, int]]] = {}
        #: Placeholders of hardlinks were filled after they were counted: count on disk.
        self.recount = False

    def start_layer(self) -> None:
        """A new layer begins: nothing of it is written yet."""
        self.created = set()
        self.children = {}
        self.deferred = {}
        self.touched = False

    def outside(self, extractor: Extractor, info: tarfile.TarInfo, reason: str) -> None:
        """Skip a member outside the root, unless it whites out the root itself."""
        names = parts(info.name)
        if not names:
            return
        base, above = names[-1], names[:-1]
        count = len(above)
        root_parts = extractor.paths.root_parts
        if base == _OPAQUE:
            hides_root = above == root_parts[:count]
        elif base.startswith(_WHITEOUT_META):
            return
        elif base.startswith(_WHITEOUT):
            target = base[len(_WHITEOUT) :]
            if target in ("", ".", ".."):
                raise UnsafeArchive(info.name, f"whiteout of {target!r} points outside its folder")
            hides_root = [*above, target] == root_parts[: count + 1]
        else:
            return
        if hides_root:
            folder = extractor.folder
            folder.flush()
            self.touched = True
            self.hide_lower(folder, b"")
            if b"" not in self.created:
                self.present = False
                folder.forget_root()

    def special(self, extractor: Extractor, info: tarfile.TarInfo, rel: bytes) -> bool:
        """Apply a whiteout, skip whiteout metadata, hide the root that a non-folder replaces."""
        self.touched = True
        if self.whiteout(extractor.folder, info, rel):
            return True
        if not rel and not info.isdir():
            kind = _member_kind(info)
            extractor.warn(f"{info.name}: the root replaced by {kind}; its content hidden")
            self.hide_lower(extractor.folder, b"")
            self.present = False
            extractor.folder.forget_root()
            return True
        self.present = True
        return False

    def written(self, rel: bytes) -> None:
        """Record that the current layer holds rel (and so every folder above it)."""
        created = self.created
        while rel not in created:
            created.add(rel)
            if not rel:
                return
            parent = rel.rpartition(b"/")[0]
            self.children.setdefault(parent, []).append(rel)
            rel = parent

    def replaceable(self, rel: bytes) -> bool:
        """What a lower layer left at rel may become a folder; what this layer wrote may not."""
        return rel not in self.created

    def removed(self, rel: bytes) -> None:
        """Nothing under rel is the current layer's any more."""
        children = self.children
        stack = children.pop(rel, None)
        created = self.created
        while stack:
            path = stack.pop()
            created.discard(path)
            below = children.pop(path, None)
            if below:
                stack.extend(below)

    def whiteout(self, folder: Folder, info: tarfile.TarInfo, rel: bytes) -> bool:
        """Apply a whiteout or skip whiteout metadata; False for an ordinary member."""
        parent, _, base = rel.rpartition(b"/")
        if _WHITEOUT_META_BYTES in parent and any(
            part.startswith(_WHITEOUT_META_BYTES) for part in parent.split(b"/")
        ):
            return True
        if not base.startswith(_WHITEOUT_BYTES):
            return False
        folder.flush()
        if base == _OPAQUE_BYTES:
            self.opaque(folder, info, parent)
            return True
        if base.startswith(_WHITEOUT_META_BYTES):
            return True
        target = base[len(_WHITEOUT_BYTES) :]
        if target in (b"", b".", b".."):
            raise UnsafeArchive(info.name, f"whiteout of {os.fsdecode(target)!r} points outside")
        folder.ensure_parent(rel, info.name)
        self.present = True
        path = parent + b"/" + target if parent else target
        if path not in self.created:
            full = folder.base + path
            try:
                os.lstat(full)
            except FileNotFoundError:
                pass
            else:
                folder.remove(full, path)
        self.written(parent)
        return True

    def opaque(self, folder: Folder, info: tarfile.TarInfo, rel: bytes) -> None:
        """Hide every child of the folder at rel that a lower layer wrote."""
        self.present = True
        if rel:
            folder.ensure_parent(rel + b"/" + _OPAQUE_BYTES, info.name)
        self.written(rel)
        self.hide_lower(folder, rel)

    def hide_lower(self, folder: Folder, rel: bytes) -> None:
        """Remove what lower layers wrote under rel, keeping the current layer's paths."""
        stack = [rel]
        while stack:
            current = stack.pop()
            full = folder.base + current if current else folder.dest
            with os.scandir(full) as entries:
                found = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
            for name, is_dir in found:
                child = current + b"/" + name if current else name
                if child in self.created:
                    if is_dir:
                        stack.append(child)
                    continue
                folder.remove(folder.base + child, child)

    def outside_link(
        self, extractor: Extractor, info: tarfile.TarInfo, rel: bytes, reason: str
    ) -> None:
        """A hardlink to a file outside the root waits for that file's data (see fill)."""
        key = "/".join(parts(info.linkname))
        folder = extractor.folder
        base = folder.base
        self.recount = True
        folder.record.lose_track()
        folder.ensure_parent(rel, info.name)
        folder.record.forget(rel)
        full = base + rel
        for first, inode in self.deferred.get(key, ()):
            try:
                found = os.lstat(base + first)
            except FileNotFoundError:
                continue
            if found.st_ino == inode and stat.S_ISREG(found.st_mode) and first != rel:
                try:
                    os.link(base + first, full, follow_symlinks=False)
                except FileExistsError:
                    folder.remove(full, rel)
                    os.link(base + first, full, follow_symlinks=False)
                folder.count(1)
                return
        try:
            fd = os.open(full, FILE_FLAGS, 0o600)
        except FileExistsError:
            folder.remove(full, rel)
            fd = os.open(full, FILE_FLAGS, 0o600)
        try:
            inode = os.fstat(fd).st_ino
        finally:
            os.close(fd)
        folder.count(1)
        self.deferred.setdefault(key, []).append((rel, inode))

    def fill(self, extractor: Extractor, tar: TarReader, info: Member) -> bool:
        """Write a target's data into the placeholders waiting for it; True once none wait."""
        try:
            key = "/".join(parts(info.name))
        except BadName:
            return not self.deferred
        waiting = self.deferred.pop(key, None)
        if waiting is None:
            return not self.deferred
        if not info.isreg():
            raise UnsafeArchive(info.name, "hardlink target is not a regular file")
        if info.segments is not None:
            raise UnsafeArchive(info.name, "hardlink target is a sparse file (not supported)")
        mode = extractor.mode(info)
        mtime = extractor.mtime(info)
        filled: bytes | None = None
        folder = extractor.folder
        for rel, inode in waiting:
            folder.record.forget(rel)
            if not folder.is_folder(rel.rpartition(b"/")[0]):
                continue
            full = folder.base + rel
            try:
                fd = os.open(full, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                found = os.fstat(fd)
                if found.st_ino != inode or not stat.S_ISREG(found.st_mode):
                    continue
                os.ftruncate(fd, 0)
                try:
                    if filled is None:
                        if info.size:
                            extractor.copy(tar, info, fd)
                        filled = full
                    else:
                        if extractor.budget is not None:
                            extractor.budget.take_bytes(info.size)  # a second copy written
                        _copy_file(filled, fd)
                except BaseException:
                    os.ftruncate(fd, 0)  # never a part of the data (the entry fails anyway)
                    raise
                os.fchmod(fd, mode)
                if mtime is not None:
                    os.utime(fd, ns=(mtime, mtime))
            finally:
                os.close(fd)
        return not self.deferred


@dataclass(frozen=True)
class LayerResult:
    """What applying one layer did to the tree."""

    #: The layer held something under the root (an entry or a whiteout hiding it).
    touched: bool
    #: Hardlinks to files outside the root wait for :meth:`LayerTree.fill_links`.
    links_pending: bool


class LayerTree:
    """Applies image layers in order to one folder: only ``root``, OCI whiteouts, safe writes."""

    def __init__(
        self,
        dest: Path,
        *,
        root: str = "testbed",
        keep_hashes: bool = False,
        budget: Budget | None = None,
        store: ContentStore | None = None,
        exclude: ExcludeRules | None = None,
    ) -> None:
        """``budget``: what all the layers applied may read together (LimitExceeded beyond)."""
        self.dest = dest
        self._rules = LayerRules()
        self._extractor = Extractor(
            dest,
            root,
            self._rules,
            keep_hashes=keep_hashes,
            budget=budget,
            store=store,
            exclude=exclude,
        )

    @property
    def present(self) -> bool:
        """True when the root exists after the layers applied so far."""
        return self._rules.present

    def apply(self, read: Read) -> LayerResult:
        """Sync: apply the uncompressed layer tar that read() yields (in a worker thread)."""
        rules = self._rules
        rules.start_layer()
        with domain_errors(self.dest):
            self._extractor.add_all(self._extractor.source(read))
        return LayerResult(touched=rules.touched, links_pending=bool(rules.deferred))

    def fill_links(self, read: Read) -> None:
        """Sync: read the last applied layer again to fill hardlinks to files outside the root."""
        rules = self._rules
        if not rules.deferred:
            return
        with domain_errors(self.dest):
            for tar, info in members(self._extractor.source(read)):
                if rules.fill(self._extractor, tar, info):
                    return
        missing = next(iter(rules.deferred))
        raise UnsafeArchive(missing, "hardlink target not found earlier in its layer")

    def finish(self) -> ExtractResult:
        """Apply folder modes and mtimes; count the regular files of the final tree."""
        folder = self._extractor.folder
        with domain_errors(self.dest):
            counted = None
            if self._rules.recount and folder.store is not None:
                # placeholders filled from a layer's data were written past the store
                counted = folder.store_unstored()
            result = self._extractor.finish()
            if not self._rules.recount:
                return result
            files, size = counted if counted is not None else walk(folder.dest)[:2]
        return dataclasses.replace(result, file_count=files, size_bytes=size)
