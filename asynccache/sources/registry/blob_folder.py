"""The shared blob cache folder, reached without following links.

The folder may hold links that another user planted (runs share it, and it may be a shared
folder): it is held by a descriptor, and every folder and file in it is reached through that
descriptor without following links (``O_NOFOLLOW``), so nothing outside it is ever read,
unlinked, truncated or appended to. The folder itself may be a link of the user's own (to
another disk), never one of another user's.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path

from asynccache.errors import SetupError

__all__ = ["APPEND_FLAGS", "Tee", "open_regular", "own_folder", "read_all", "top_folder"]

#: Attempts at making a folder whose name something else keeps taking.
_OWN_FOLDER_TRIES = 8
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: Flags of every file opened in the cache (a FIFO planted there must not block the open).
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def top_folder(path: Path) -> int:
    """Open the blob cache folder (creating it); a link there is followed if it is the user's.

    A link owned by another user (planted before this run made the folder) is refused.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o755)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) and info.st_uid not in (0, os.geteuid()):
        raise SetupError(
            f"the layer cache folder {path} is a link owned by another user (uid "
            f"{info.st_uid}); remove it or choose another --layer_cache_dir"
        )
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except NotADirectoryError:
        raise SetupError(
            f"the layer cache folder {path} is not a folder; choose another --layer_cache_dir"
        ) from None


def own_folder(name: str | Path, dir_fd: int | None = None) -> int:
    """Open the folder name (creating it) without following a link: what else is there goes.

    Other processes (a pool's workers, other runs) may do the same at once: whichever removes
    a planted link first, the others open the folder it made. Bounded: a name that keeps being
    replaced fails.
    """
    for _ in range(_OWN_FOLDER_TRIES):
        with contextlib.suppress(FileExistsError):
            os.mkdir(name, 0o755, dir_fd=dir_fd)
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            continue  # removed by another process between the two calls
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
        # a link or a file planted in its place: removed (never followed), made anew; gone
        # already, or a folder again, when another process did it first
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            os.unlink(name, dir_fd=dir_fd)
    raise OSError(errno.ELOOP, "replaced again each time it was made", os.fspath(name))


def open_regular(name: str, dir_fd: int, flags: int = _READ_FLAGS) -> int | None:
    """A descriptor of the regular file name in dir_fd; None when there is none (or not one)."""
    try:
        fd = os.open(name, flags, 0o644, dir_fd=dir_fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENXIO):
            return None  # a link, or a FIFO nobody reads
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def read_all(fd: int) -> bytes:
    """The content of an open regular file."""
    with open(fd, "rb", buffering=0, closefd=False) as handle:
        return handle.read()


class Tee:
    """A partial download: a new file in the partial folder, written as the blob streams in."""

    def __init__(self, folder: int, name: str) -> None:
        self.folder = folder
        self.name = name

    def create(self) -> int:
        """The new file's descriptor (never a file that was there, never through a link)."""
        return os.open(self.name, _NEW_FILE_FLAGS, 0o644, dir_fd=self.folder)

    def reopen(self) -> int:
        """The file written so far, to read again."""
        return os.open(self.name, _READ_FLAGS, dir_fd=self.folder)

    def remove(self) -> None:
        """Sync: drop the partial download."""
        os.unlink(self.name, dir_fd=self.folder)
