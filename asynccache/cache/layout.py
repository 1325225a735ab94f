"""The cache folder's layout: its lock, work-in-progress folders and atomic publishing.

A run of one shard (``--shard K/N``) shares the folder with the other shards: it holds the
folder's lock shared and its own shard's lock exclusively, works under ``.tmp/K-of-N/`` and
keeps its index part and failures under ``.shards/``; a run of the whole split holds the
folder's lock exclusively, so it never meets a live shard.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import secrets
import socket
import stat
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from asynccache._fs import absolute_path, fsync_dir, remove_tree
from asynccache.cache.store import Store
from asynccache.config import (
    FAILURES_NAME,
    INDEX_NAME,
    LOCK_NAME,
    META_DIR_NAME,
    SHARDS_DIR_NAME,
    TMP_DIR_NAME,
)
from asynccache.entries import validate_instance_id
from asynccache.errors import CacheLocked, SetupError
from asynccache.shards import Shard

log = logging.getLogger(__name__)

#: Below this much free space the disk counts as full.
MIN_FREE_BYTES = 64 * 1024 * 1024
#: A /testbed with .git and .venv takes this much on disk, roughly, for free-space warnings.
TYPICAL_INSTANCE_BYTES = 300 * 1024 * 1024
#: A shard's lock is tried this long before it counts as held: a check of whether the shard
#: runs (``merge``, ``status``) holds it for an instant.
SHARD_LOCK_PATIENCE = 2.0

_SHARD_TAG = re.compile(r"^(\d+)-of-(\d+)$")


def scratch_of(work_dir: Path) -> Path:
    """A work folder's scratch folder (the git guard's shadow repositories), beside it: whoever
    removes the work folder removes it too, so a worker killed mid-entry leaves neither."""
    return work_dir.with_name(work_dir.name + ".scratch")


def shard_tag(shard: Shard) -> str:
    """The name of a shard's files and work folder: ``3-of-16``."""
    return f"{shard.index}-of-{shard.count}"


def parse_shard_tag(name: str) -> Shard | None:
    """The shard a ``K-of-N`` name stands for, or None."""
    match = _SHARD_TAG.match(name)
    if match is None:
        return None
    index, count = int(match.group(1)), int(match.group(2))
    return Shard(index, count) if 0 <= index < count else None


class CacheDir:
    """Paths inside one cache folder, and the operations that keep it consistent."""

    def __init__(self, root: Path, shard: Shard | None = None) -> None:
        self.root = absolute_path(root)
        self.shard = shard
        self._lock_file: IO[str] | None = None
        self._shard_lock_file: IO[str] | None = None

    @property
    def index_path(self) -> Path:
        """index.json."""
        return self.root / INDEX_NAME

    @property
    def failures_path(self) -> Path:
        """failures.json: the reason of every failed entry of the last run (or of this shard)."""
        if self.shard is not None:
            return self.shard_path(self.shard, ".failures.json")
        return self.root / FAILURES_NAME

    @property
    def tmp_dir(self) -> Path:
        """Where this run's work in progress lives; nothing here is ever complete."""
        if self.shard is not None:
            return self.root / TMP_DIR_NAME / shard_tag(self.shard)
        return self.root / TMP_DIR_NAME

    @property
    def shards_dir(self) -> Path:
        """Every shard's lock, index part and failures."""
        return self.root / SHARDS_DIR_NAME

    def make_shards_dir(self) -> None:
        """Create ``.shards/`` (never through a link planted in its place)."""
        folder = self.shards_dir
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            folder.unlink()
        folder.mkdir(exist_ok=True)

    def shard_path(self, shard: Shard, suffix: str) -> Path:
        """One file of a shard: ``.lock``, ``.json`` (its index part) or ``.failures.json``."""
        return self.shards_dir / f"{shard_tag(shard)}{suffix}"

    @property
    def meta_dir(self) -> Path:
        """Per-instance metadata, beside (never inside) the instance folders."""
        return self.root / META_DIR_NAME

    def instance_path(self, instance_id: str) -> Path:
        """The final folder of one instance (ValueError for an id that is not one folder name)."""
        validate_instance_id(instance_id)
        return self.root / instance_id

    def check_usable(self) -> None:
        """Create the folder if its parent exists; raise SetupError when it cannot be written."""
        if not self.root.exists():
            if not self.root.parent.is_dir():
                raise SetupError(
                    f"cache folder {self.root} cannot be created: its parent "
                    f"{self.root.parent} does not exist; create it or choose another --cache_dir"
                )
            try:
                self.root.mkdir()
            except FileExistsError:
                pass  # the tasks of an array job start at once: another one made it
            except OSError as exc:
                raise SetupError(
                    f"cache folder {self.root} cannot be created ({exc.strerror}); "
                    "choose another --cache_dir"
                ) from None
        if not self.root.is_dir():
            raise SetupError(f"cache folder {self.root} is not a directory")
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise SetupError(
                f"cache folder {self.root} is not writable by this user; "
                "fix its permissions or choose another --cache_dir"
            )

    def lock(self, *, shared: bool = False) -> None:
        """Take the folder's lock or raise CacheLocked naming the holder.

        Exclusive for a run of the whole split (and repairs); shared for a shard's run, which
        then also takes its own shard's lock exclusively, and for ``merge``.
        """
        shared = shared or self.shard is not None
        path = self.root / LOCK_NAME
        handle = open(_open_lock_file(path), "r+", encoding="utf-8")  # noqa: SIM115
        try:
            fcntl.flock(
                handle.fileno(), (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB
            )
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            if shared:
                raise CacheLocked(
                    f"cache folder {self.root} is in use by process {holder} (a run of the "
                    "whole split or a repair); wait for it to finish or use another --cache_dir"
                ) from None
            running = self.running_shards()
            if running:
                names = ", ".join(str(shard) for shard in running)
                raise CacheLocked(
                    f"cache folder {self.root} is in use by shards {names}; wait for them to "
                    "finish or use another --cache_dir"
                ) from None
            raise CacheLocked(
                f"cache folder {self.root} is in use by process {holder}; wait for that "
                "run to finish or use another --cache_dir"
            ) from None
        if not shared:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
        self._lock_file = handle
        if self.shard is not None:
            try:
                self._shard_lock_file = self._lock_shard(self.shard)
            except BaseException:
                self.unlock()
                raise

    def _lock_shard(self, shard: Shard) -> IO[str]:
        self.make_shards_dir()
        handle = open(  # noqa: SIM115
            _open_lock_file(self.shard_path(shard, ".lock")), "r+", encoding="utf-8"
        )
        deadline = time.monotonic() + SHARD_LOCK_PATIENCE
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise CacheLocked(
                f"shard {shard} of cache folder {self.root} is already running ({holder}); "
                "wait for it to finish"
            )
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        return handle

    def shard_running(self, shard: Shard) -> bool:
        """True when a live process holds the shard's lock (checked without waiting)."""
        path = self.shard_path(shard, ".lock")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except (FileNotFoundError, NotADirectoryError):
            return False
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return False
            raise
        handle = open(fd, encoding="utf-8")  # noqa: SIM115
        with handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            return False

    def running_shards(self) -> list[Shard]:
        """The shards whose runs are live in this folder, in order."""
        if not self.shards_dir.is_dir():
            return []
        shards = [
            shard
            for path in self.shards_dir.glob("*.lock")
            if (shard := parse_shard_tag(path.name[: -len(".lock")])) is not None
        ]
        return sorted(shard for shard in shards if self.shard_running(shard))

    def unlock(self) -> None:
        """Release the locks (the kernel also releases them when the process dies)."""
        for handle in (self._shard_lock_file, self._lock_file):
            if handle is not None:
                handle.close()
        self._shard_lock_file = None
        self._lock_file = None

    def free_bytes(self) -> int:
        """Bytes free for this user on the cache folder's filesystem."""
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def has_free_space(self, needed: int = MIN_FREE_BYTES) -> bool:
        """True when at least ``needed`` bytes are free (after a moment for deletions to land)."""
        return self.free_bytes() >= needed

    def remove_stale_work(self) -> int:
        """Delete this run's leftover work-in-progress folders; return how many went.

        A shard sweeps only its own ``.tmp/K-of-N/``: other shards may be working beside it.
        A folder that cannot be removed (a mount point inside it, a permission the process
        lacks) is reported and skipped: it never stops this run or a later one.
        """
        for folder in dict.fromkeys((self.root / TMP_DIR_NAME, self.tmp_dir)):
            if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
                # Never follow a planted link out of the cache folder.
                folder.unlink()
        if self.shard is not None and self.shards_dir.is_dir():
            # The shard's own index part or failures half-written by a killed run.
            for stale in self.shards_dir.glob(f".{shard_tag(self.shard)}.*.tmp"):
                stale.unlink(missing_ok=True)
        if not self.tmp_dir.exists():
            self.tmp_dir.mkdir(parents=True)
            return 0
        removed = 0
        for path in list(self.tmp_dir.iterdir()):
            try:
                remove_tree(path)
            except OSError as exc:
                log.warning("cannot remove the unfinished folder %s (skipped): %s", path, exc)
                continue
            removed += 1
        return removed

    def new_work_dir(self, instance_id: str) -> Path:
        """A fresh, empty folder under .tmp for one extraction."""
        path = self.tmp_dir / f"{instance_id}.{secrets.token_hex(4)}"
        path.mkdir(parents=False)
        return path

    def publish(self, work_dir: Path, instance_id: str, store: Store | None = None) -> Path:
        """Give a complete folder its final name, replacing an older one atomically enough.

        The final name never points at a partial tree: an existing folder is first moved
        into .tmp (so a crash leaves it to the stale-work sweep), then the new one is renamed.
        Stored objects that only the old folder linked are freed with it.
        """
        final = self.instance_path(instance_id)
        old: Path | None = None
        if final.exists() or final.is_symlink():
            old = self.tmp_dir / f"{instance_id}.old.{secrets.token_hex(4)}"
            os.rename(final, old)
        os.rename(work_dir, final)
        fsync_dir(self.root)
        if old is not None:
            unlinked = store.sole_links(old) if store is not None else []
            remove_tree(old)
            if store is not None:
                store.free_unlinked(unlinked)
        return final


def _open_lock_file(path: Path) -> int:
    """Open (or create) the lock file itself, never a link planted in its place."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        path.unlink()
        fd = os.open(path, flags, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise SetupError(f"{path} is not a regular file; remove it and rerun")
    return fd


def resolve_instance_path(cache_dir: Path, record: Mapping[str, Any]) -> Path:
    """The recorded ``cache_path`` when it is a folder inside ``cache_dir``, else the instance's
    folder in ``cache_dir``: a record never names a place outside the cache folder."""
    instance_id = str(record["instance_id"])
    validate_instance_id(instance_id)
    own = cache_dir / instance_id
    text = str(record.get("cache_path", ""))
    if not text:
        return own
    recorded = Path(text) if os.path.isabs(text) else cache_dir / text
    root = os.path.realpath(cache_dir)
    real = os.path.realpath(recorded)
    if os.path.dirname(real) == root and os.path.isdir(real):
        return recorded
    return own
