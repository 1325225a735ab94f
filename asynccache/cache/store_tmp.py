"""The store's work folders under ``.tmp``: one per process, swept once its process is gone.

A process links and renames through a folder of its own (see ``Store.temp_path``). It holds an
owner lock in it while it lives, so another process removes the folder only once that lock is
free, or once it was left half made long ago.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import time
from pathlib import Path

__all__ = ["make_work_folder", "remove_work_folder", "sweep_work_folders"]

_OWNER_NAME = ".owner"
#: A work folder without its owner lock this long after it was made was left half made.
_ABANDONED = 3600.0


def make_work_folder(tmp_dir: Path) -> tuple[Path, int]:
    """A new work folder of this process in tmp_dir, and the owner lock it holds (an fd)."""
    own = tmp_dir / f"{os.getpid()}.{secrets.token_hex(4)}"
    own.mkdir()
    # The owner lock gets its name only once locked: another process's sweep must never
    # find it free while this one is still taking it.
    taking = own / f"{_OWNER_NAME}.new"
    fd = os.open(taking, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.rename(taking, own / _OWNER_NAME)
    return own, fd


def remove_work_folder(folder: Path) -> None:
    """Remove a work folder of links (no subfolders)."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(folder):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)
        os.rmdir(folder)


def sweep_work_folders(tmp_dir: Path) -> None:
    """Remove what processes that are gone left in tmp_dir; live processes' folders stay."""
    for entry in os.scandir(tmp_dir):
        # Other processes sweep and finish at the same time: what is gone is passed over.
        with contextlib.suppress(FileNotFoundError):
            _sweep_entry(entry)


def _sweep_entry(entry: os.DirEntry[str]) -> None:
    if not entry.is_dir(follow_symlinks=False):
        os.unlink(entry.path)
        return
    try:
        fd = os.open(
            os.path.join(entry.path, _OWNER_NAME), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC
        )
    except FileNotFoundError:
        # being set up by its process right now, or left half made long ago
        if time.time() - entry.stat(follow_symlinks=False).st_mtime > _ABANDONED:
            remove_work_folder(Path(entry.path))
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return  # its process is alive
    finally:
        os.close(fd)
    remove_work_folder(Path(entry.path))
