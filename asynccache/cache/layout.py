"""The cache folder's layout: its lock, work-in-progress folders and atomic publishing."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from asynccache._fs import fsync_dir, remove_tree
from asynccache.config import FAILURES_NAME, INDEX_NAME, LOCK_NAME, META_DIR_NAME, TMP_DIR_NAME
from asynccache.entries import validate_instance_id
from asynccache.errors import CacheLocked, SetupError

log = logging.getLogger(__name__)

#: Below this much free space the disk counts as full.
MIN_FREE_BYTES = 64 * 1024 * 1024
#: A /testbed with .git and .venv takes this much on disk, roughly, for free-space warnings.
TYPICAL_INSTANCE_BYTES = 300 * 1024 * 1024


class CacheDir:
    """Paths inside one cache folder, and the operations that keep it consistent."""

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.abspath(os.path.expanduser(root)))
        self._lock_file: IO[str] | None = None

    @property
    def index_path(self) -> Path:
        """index.json."""
        return self.root / INDEX_NAME

    @property
    def failures_path(self) -> Path:
        """failures.json: the reason of every failed entry of the last run."""
        return self.root / FAILURES_NAME

    @property
    def tmp_dir(self) -> Path:
        """Where work in progress lives; nothing here is ever complete."""
        return self.root / TMP_DIR_NAME

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

    def lock(self) -> None:
        """Take the folder's exclusive lock or raise CacheLocked naming the holder."""
        path = self.root / LOCK_NAME
        handle = open(_open_lock_file(path), "r+", encoding="utf-8")  # noqa: SIM115
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise CacheLocked(
                f"cache folder {self.root} is in use by process {holder}; wait for that "
                "run to finish or use another --cache_dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._lock_file = handle

    def unlock(self) -> None:
        """Release the lock (the kernel also releases it when the process dies)."""
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def free_bytes(self) -> int:
        """Bytes free for this user on the cache folder's filesystem."""
        stats = os.statvfs(self.root)
        return stats.f_bavail * stats.f_frsize

    def has_free_space(self, needed: int = MIN_FREE_BYTES) -> bool:
        """True when at least ``needed`` bytes are free (after a moment for deletions to land)."""
        return self.free_bytes() >= needed

    def remove_stale_work(self) -> int:
        """Delete every leftover work-in-progress folder; return how many went.

        A folder that cannot be removed (a mount point inside it, a permission the process
        lacks) is reported and skipped: it never stops this run or a later one.
        """
        if self.tmp_dir.is_symlink() or (self.tmp_dir.exists() and not self.tmp_dir.is_dir()):
            # Never follow a planted link out of the cache folder.
            self.tmp_dir.unlink()
        if not self.tmp_dir.exists():
            self.tmp_dir.mkdir()
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

    def publish(self, work_dir: Path, instance_id: str) -> Path:
        """Give a complete folder its final name, replacing an older one atomically enough.

        The final name never points at a partial tree: an existing folder is first moved
        into .tmp (so a crash leaves it to the stale-work sweep), then the new one is renamed.
        """
        final = self.instance_path(instance_id)
        old: Path | None = None
        if final.exists() or final.is_symlink():
            old = self.tmp_dir / f"{instance_id}.old.{secrets.token_hex(4)}"
            os.rename(final, old)
        os.rename(work_dir, final)
        fsync_dir(self.root)
        if old is not None:
            remove_tree(old)
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
