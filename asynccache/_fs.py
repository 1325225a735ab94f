"""Filesystem helpers, once each: atomic writes, durable renames, tree removal, umask, paths."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any) -> int:
    """Write JSON to a temp file beside ``path``, fsync it, rename over ``path``; return bytes."""
    payload = json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8") + b"\n"
    write_bytes_atomic(path, payload)
    return len(payload)


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    """Write bytes to a temp file beside ``path``, fsync it, rename over ``path`` durably."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(payload)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)


def absolute_path(path: str | os.PathLike[str]) -> Path:
    """``path`` with ``~`` expanded, made absolute without resolving symlinks."""
    return Path(os.path.abspath(os.path.expanduser(path)))


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Delete a file or folder tree without recursion, symlinks or crossing a mount point.

    Works at any depth (one open folder at a time, a name list per level), makes read-only
    folders writable on the way, and leaves mount points inside the tree and their contents
    alone: it then raises ``OSError(EBUSY)`` naming them, after removing everything else.
    """
    try:
        top = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(top.st_mode):
        os.unlink(path)
        return
    mounts = _mount_points_under(os.path.abspath(path))
    kept: list[str] = []
    fd = _open_dir(os.fspath(path), None, top)
    # Each level: (device, inode, path from the top, subfolder names still to remove).
    levels: list[tuple[int, int, str, list[str]]] = []
    current = (top.st_dev, top.st_ino, os.path.abspath(path))
    try:
        pending = _empty_but_folders(fd, current[2], top.st_dev, mounts, kept)
        while True:
            if pending:
                name = pending.pop()
                child_stat = os.stat(name, dir_fd=fd, follow_symlinks=False)
                child = _open_dir(name, fd, child_stat)
                levels.append((*current, pending))
                os.close(fd)
                fd = child
                current = (child_stat.st_dev, child_stat.st_ino, os.path.join(current[2], name))
                pending = _empty_but_folders(fd, current[2], top.st_dev, mounts, kept)
                continue
            if not levels:
                break
            parent = os.open("..", _DIR_OPEN, dir_fd=fd)
            device, inode, parent_path, pending = levels.pop()
            seen = os.fstat(parent)
            if (seen.st_dev, seen.st_ino) != (device, inode):
                os.close(parent)
                raise OSError(errno.ESTALE, f"{parent_path} moved during removal")
            os.close(fd)
            fd = parent
            name = os.path.basename(current[2])
            current = (device, inode, parent_path)
            _remove_empty_dir(name, fd, kept, os.path.join(parent_path, name))
    finally:
        os.close(fd)
    if not kept:
        os.rmdir(path)
        return
    raise OSError(errno.EBUSY, f"left mount points in place: {', '.join(sorted(kept))}")


_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(name: str, dir_fd: int | None, seen: os.stat_result) -> int:
    """Open a folder (never through a symlink), making it listable and writable first."""
    if seen.st_mode & 0o700 != 0o700:
        os.chmod(name, stat.S_IMODE(seen.st_mode) | 0o700, dir_fd=dir_fd)
    fd = os.open(name, _DIR_OPEN, dir_fd=dir_fd)
    opened = os.fstat(fd)
    if (opened.st_dev, opened.st_ino) != (seen.st_dev, seen.st_ino):
        os.close(fd)
        raise OSError(errno.ESTALE, f"{name} changed during removal")
    return fd


def _empty_but_folders(
    fd: int, where: str, device: int, mounts: frozenset[str], kept: list[str]
) -> list[str]:
    """Unlink every non-folder in ``fd``; return its subfolders to descend into."""
    folders: list[str] = []
    with os.scandir(fd) as entries:
        names = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
    for name, is_dir in names:
        if not is_dir:
            os.unlink(name, dir_fd=fd)
            continue
        full = os.path.join(where, name)
        if full in mounts or os.stat(name, dir_fd=fd, follow_symlinks=False).st_dev != device:
            kept.append(full)
            continue
        folders.append(name)
    return folders


def _remove_empty_dir(name: str, dir_fd: int, kept: list[str], full: str) -> None:
    """Remove an emptied folder, unless a mount point inside it is being kept."""
    if any(path.startswith(full + os.sep) for path in kept):
        return
    os.rmdir(name, dir_fd=dir_fd)


def _mount_points_under(top: str) -> frozenset[str]:
    """Mount points strictly inside ``top``, as this process sees them (bind mounts included)."""
    found: set[str] = set()
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as table:
            for line in table:
                fields = line.split()
                if len(fields) > 4:
                    # The mount point is octal-escaped (space as \040 and so on).
                    point = fields[4].encode().decode("unicode_escape")
                    if point.startswith(top + os.sep):
                        found.add(point)
    except OSError:
        pass
    return frozenset(found)


def current_umask() -> int:
    """The process umask, read without changing it when /proc allows."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
