"""The object store: each distinct (content, mode) once, hard-linked into every tree that has it.

Objects are named by their content and mode (``store_layout.py``). Every change is a single
link, rename or unlink, so threads and processes may share a store without a lock: an object is
visible under its name only once complete, and one is freed only when nothing but the store
links it (see :meth:`Store.collect`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from asynccache.cache.store_layout import (
    HEX_DIGITS,
    Inode,
    StoredObject,
    object_name,
    parse_object_name,
)
from asynccache.cache.store_tmp import make_work_folder, remove_work_folder, sweep_work_folders
from asynccache.config import STORE_DIR_NAME, store_max_links
from asynccache.tree.digest import file_sha256

__all__ = ["DEFAULT_MAX_LINKS", "STORE_DIR_NAME", "Store"]

#: Links per object before a new copy starts: below ext4's 65,000, and a filesystem that
#: allows fewer is met with EMLINK, which starts a new copy too.
DEFAULT_MAX_LINKS = store_max_links
#: Bytes of released objects (see Store.release) one Store keeps for its process's next trees
#: before it frees the oldest (objects linked again meanwhile count too, and are kept).
RELEASED_BYTES = 1 << 30
#: Released objects smaller than this are freed at once: writing them again costs little, and
#: a repack can release thousands of loose objects.
RELEASED_MIN_SIZE = 64 << 10
_TMP_NAME = ".tmp"


class Store:
    """The content-addressed object store of one cache folder."""

    def __init__(
        self,
        cache_dir: Path | str,
        *,
        max_links: int = DEFAULT_MAX_LINKS,
        released_bytes: int = RELEASED_BYTES,
        released_min_size: int = RELEASED_MIN_SIZE,
    ) -> None:
        if max_links < 2:
            raise ValueError("max_links must be at least 2")
        self.root = Path(os.path.abspath(cache_dir)) / STORE_DIR_NAME
        self.max_links = max_links
        self.released_bytes = released_bytes
        self.released_min_size = released_min_size
        # released objects, oldest first, with their sizes (see release)
        self._released: OrderedDict[tuple[str, int], int] = OrderedDict()
        self._released_total = 0
        self._released_lock = threading.Lock()
        self._base = os.path.join(os.fsencode(self.root), b"")
        self.tmp_dir = self.root / _TMP_NAME
        # this process's work folder, and the lock that tells other processes it is alive
        self._own: Path | None = None
        self._owner_fd: int | None = None
        self._fanouts: set[bytes] = set()
        # the copy to try first, for objects whose first copies are full (a hint: races only
        # cost a few more probes)
        self._first_copy: dict[tuple[str, int], int] = {}

    def open(self) -> None:
        """Create the store's folders and this process's own work folder.

        Work folders of processes that are gone (their owner lock is free) are removed; those
        of live processes (other shards, worker processes) are left alone.
        """
        self.root.mkdir(exist_ok=True)
        self.tmp_dir.mkdir(exist_ok=True)
        sweep_work_folders(self.tmp_dir)
        if self._own is None:
            self._own, self._owner_fd = make_work_folder(self.tmp_dir)

    def close(self) -> None:
        """Free the released objects nothing links, then remove this process's work folder
        (links it still holds, such as pins, go with it)."""
        own, fd = self._own, self._owner_fd
        try:
            if own is not None:
                # what cannot be freed now is left to gc: closing must not fail over it
                with contextlib.suppress(OSError):
                    self.free_released()
        finally:
            self._own = self._owner_fd = None
            if own is not None:
                remove_work_folder(own)
            if fd is not None:
                os.close(fd)

    def path(self, digest: str, mode: int, copy: int = 0) -> bytes:
        """The absolute path of an object."""
        return self._base + object_name(digest, mode, copy).encode()

    def temp_path(self) -> bytes:
        """A fresh name in this process's work folder (see :meth:`open`)."""
        if self._own is None:
            raise RuntimeError("open the store before changing it")
        return os.path.join(os.fsencode(self._own), secrets.token_hex(8).encode())

    def _make_fanout(self, digest: str) -> None:
        fanout = self._base + digest[:2].encode()
        if fanout not in self._fanouts:
            os.makedirs(fanout, exist_ok=True)
            self._fanouts.add(fanout)

    def _usable(self, found: os.stat_result, mode: int, size: int | None) -> bool:
        """True for a regular file of this mode and size within the ceiling (link included)."""
        return (
            stat.S_ISREG(found.st_mode)
            and stat.S_IMODE(found.st_mode) == mode
            and (size is None or found.st_size == size)
            and found.st_nlink <= self.max_links
        )

    def link(self, digest: str, mode: int, size: int | None, dest: bytes) -> os.stat_result | None:
        """Hard-link the stored object with this content and mode at ``dest``.

        ``dest`` must not exist (FileExistsError). Returns the stat of the file now at
        ``dest``, or None when the store has no usable copy: none, or each one full or not of
        this mode and size (changed; ``verify --deep`` reports it). A link that finds the copy
        past the ceiling (threads or processes linking at once) is undone: the ceiling holds.
        """
        key = (digest, mode)
        copy = self._first_copy.get(key, 0)
        while True:
            source = self.path(digest, mode, copy)
            try:
                os.link(source, dest, follow_symlinks=False)
            except FileNotFoundError:
                if not os.path.isdir(os.path.dirname(dest)):
                    raise  # dest's folder is missing: the caller's error
                if os.path.lexists(source):
                    continue  # stored just now by another thread or process
                return None
            except OSError as exc:
                if exc.errno != errno.EMLINK:
                    raise
                copy = self._full(key, copy)
                continue
            found = os.lstat(dest)
            if self._usable(found, mode, size):
                return found
            os.unlink(dest)
            copy = self._full(key, copy) if found.st_nlink > self.max_links else copy + 1

    def _full(self, key: tuple[str, int], copy: int) -> int:
        """Copy ``copy`` of key is full: the next one, remembered as the first to try."""
        self._first_copy[key] = max(self._first_copy.get(key, 0), copy + 1)
        return copy + 1

    def put(self, path: bytes, digest: str, mode: int) -> tuple[bool, os.stat_result]:
        """Store the complete file at ``path`` (content ``digest``, mode ``mode``).

        The file becomes the object when the store has no usable copy; else it is replaced
        (atomically) by a link to the stored copy. Returns (replaced by a link, the stat of
        the file now at ``path``). The caller must not write to ``path`` afterwards.
        """
        key = (digest, mode)
        copy = self._first_copy.get(key, 0)
        self._make_fanout(digest)
        while True:
            target = self.path(digest, mode, copy)
            try:
                os.link(path, target, follow_symlinks=False)
            except FileExistsError:
                try:
                    replaced, found = self._replace_with(target, path, mode)
                except FileNotFoundError:
                    continue  # freed meanwhile: take the name
                if replaced and found is not None:
                    return True, found
                full = found is None or found.st_nlink > self.max_links
                copy = self._full(key, copy) if full else copy + 1
                continue
            return False, os.lstat(path)

    def _replace_with(
        self, target: bytes, path: bytes, mode: int
    ) -> tuple[bool, os.stat_result | None]:
        """Make ``path`` a link to ``target`` (atomically) when it is usable.

        Returns (done, the target's stat with the new link counted, None when the filesystem
        refused one more link); FileNotFoundError when the target is gone.
        """
        temp = self.temp_path()
        try:
            os.link(target, temp, follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.EMLINK:
                raise
            return False, None
        try:
            found = os.lstat(temp)
            if not self._usable(found, mode, None):
                os.unlink(temp)
                return False, found
            os.rename(temp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
            raise
        return True, found

    def has(self, digest: str, mode: int, size: int | None = None) -> bool:
        """True when a copy of the object with room for one more link is stored."""
        copy = self._first_copy.get((digest, mode), 0)
        while True:
            try:
                found = os.lstat(self.path(digest, mode, copy))
            except FileNotFoundError:
                return False
            if found.st_nlink < self.max_links and self._usable(found, mode, size):
                return True
            copy += 1

    def fanouts(self) -> list[str]:
        """The fan-out folders present, sorted."""
        try:
            entries = list(os.scandir(self.root))
        except FileNotFoundError:
            return []
        return sorted(
            entry.name
            for entry in entries
            if len(entry.name) == 2
            and HEX_DIGITS.issuperset(entry.name)
            and entry.is_dir(follow_symlinks=False)
        )

    def objects_in(self, fanout: str) -> list[StoredObject]:
        """The objects of one fan-out folder (other files there are ignored)."""
        found: list[StoredObject] = []
        folder = self.root / fanout
        try:
            entries = list(os.scandir(folder))
        except FileNotFoundError:
            return found
        for entry in entries:
            parsed = parse_object_name(fanout, entry.name)
            if parsed is None:
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(info.st_mode):
                continue
            digest, mode, copy = parsed
            found.append(
                StoredObject(
                    name=f"{fanout}/{entry.name}",
                    digest=digest,
                    mode=mode,
                    copy=copy,
                    size=info.st_size,
                    links=info.st_nlink,
                    inode=(info.st_dev, info.st_ino),
                    mtime_ns=info.st_mtime_ns,
                )
            )
        return found

    def objects(self, jobs: int = 8) -> Iterator[StoredObject]:
        """Every object, fan-out folder by fan-out folder (folders listed in parallel)."""
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for batch in pool.map(self.objects_in, self.fanouts()):
                yield from batch

    def inodes(self) -> dict[Inode, StoredObject]:
        """Every object by its inode."""
        return {item.inode: item for item in self.objects()}

    def free(self, name: str) -> int | None:
        """Remove one object if nothing but the store links it; its size, or None when kept.

        The object is first renamed away, so no new link to it can start, and put back when
        a link was made before the rename.
        """
        source = self._base + name.encode()
        temp = self.temp_path()
        try:
            os.rename(source, temp)
        except FileNotFoundError:
            return None
        found = os.lstat(temp)
        if found.st_nlink == 1:
            os.unlink(temp)
            return found.st_size
        # a new copy may have taken the name: this one lives on in the trees that link it
        with contextlib.suppress(FileExistsError):
            os.link(temp, source, follow_symlinks=False)
        os.unlink(temp)
        return None

    def collect(self, jobs: int = 8) -> tuple[int, int]:
        """Free every object nothing links any more; return (objects, bytes) freed."""
        objects = freed = 0
        for item in self.objects(jobs):
            if item.links == 1:
                size = self.free(item.name)
                if size is not None:
                    objects += 1
                    freed += size
        return objects, freed

    def sole_links(self, tree: Path) -> list[str]:
        """Objects that only ``tree`` and the store link: free them after removing the tree.

        Each file of the tree linked twice is hashed to find its object's name.
        """
        names: list[str] = []
        stack = [os.fsencode(tree)]
        seen: set[int] = set()
        while stack:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                        continue
                    info = entry.stat(follow_symlinks=False)
                    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 2 or info.st_ino in seen:
                        continue
                    seen.add(info.st_ino)
                    name = self._name_of(entry.path, info)
                    if name is not None:
                        names.append(name)
        return names

    def _copies(self, digest: str, mode: int) -> Iterator[tuple[str, os.stat_result]]:
        """Each stored copy of (digest, mode), in order, with what lstat says of it."""
        copy = 0
        while True:
            name = object_name(digest, mode, copy)
            try:
                yield name, os.lstat(self._base + name.encode())
            except FileNotFoundError:
                return
            copy += 1

    def _name_of(self, path: bytes, info: os.stat_result) -> str | None:
        """The object name of a tree's file when it is a stored object, else None."""
        for name, found in self._copies(file_sha256(path), stat.S_IMODE(info.st_mode)):
            if (found.st_dev, found.st_ino) == (info.st_dev, info.st_ino):
                return name
        return None

    def free_unlinked(self, names: Iterable[str]) -> tuple[int, int]:
        """Free the named objects that nothing links any more; return (objects, bytes)."""
        objects = freed = 0
        for name in names:
            try:
                found = os.lstat(self._base + name.encode())
            except FileNotFoundError:
                continue
            if found.st_nlink == 1:
                size = self.free(name)
                if size is not None:
                    objects += 1
                    freed += size
        return objects, freed

    def release(self, digest: str, mode: int, size: int) -> None:
        """This process's trees no longer link (digest, mode): free it later rather than now.

        The leak guard replaces a repository's pack with one of its own, and the next image of
        the same repository often has the very same pack: kept a while, it is linked into that
        tree instead of written again. Released objects wait up to ``released_bytes`` in all
        (the oldest are freed first) and the rest at :meth:`close`; each is freed only when
        nothing but the store links it by then. One smaller than ``released_min_size`` is freed
        at once.
        """
        if size < self.released_min_size:
            self.free_object(digest, mode)
            return
        key = (digest, mode)
        due: list[tuple[str, int]] = []
        with self._released_lock:
            self._released_total += size - self._released.pop(key, 0)
            self._released[key] = size
            while self._released_total > self.released_bytes and self._released:
                oldest, oldest_size = self._released.popitem(last=False)
                self._released_total -= oldest_size
                due.append(oldest)
        for oldest in due:
            self.free_object(*oldest)

    def free_released(self) -> int:
        """Free every released object that nothing but the store links; the bytes freed."""
        with self._released_lock:
            due = list(self._released)
            self._released.clear()
            self._released_total = 0
        return sum(self.free_object(digest, mode) for digest, mode in due)

    def free_object(self, digest: str, mode: int) -> int:
        """Free each copy of (digest, mode) that nothing but the store links; the bytes freed."""
        freed = 0
        for name, found in list(self._copies(digest, mode)):
            if found.st_nlink == 1:
                freed += self.free(name) or 0
        return freed

    def discard(self, name: str) -> None:
        """Take an object out of the store (trees that link it keep their copy of the inode)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._base + name.encode())
