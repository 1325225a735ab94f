"""Filesystem helpers, once each: atomic JSON writes, durable renames, tree removal, umask."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from asynccache.errors import CheckoutError


def write_json_atomic(path: Path, data: Any) -> int:
    """Write JSON to a temp file beside ``path``, fsync it, rename over ``path``; return bytes."""
    payload = json.dumps(data, indent=2, ensure_ascii=False).encode("utf-8") + b"\n"
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
    return len(payload)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_tree(path: Path) -> None:
    """Delete a file or folder tree without following symlinks; read-only dirs included."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return

    def make_writable_and_retry(func: object, name: str, _exc: object) -> None:
        parent = os.path.dirname(name)
        os.chmod(parent, 0o700)
        if os.path.isdir(name) and not os.path.islink(name):
            os.chmod(name, 0o700)
            shutil.rmtree(name, onerror=make_writable_and_retry)
        else:
            os.unlink(name)

    shutil.rmtree(path, onerror=make_writable_and_retry)


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


def claim_empty_dir(dest: Path) -> bool:
    """Create ``dest`` (True), or accept it as an existing empty folder (False)."""
    try:
        os.mkdir(dest, 0o755)
        return True
    except FileExistsError:
        if dest.is_dir() and not dest.is_symlink():
            with os.scandir(dest) as entries:
                if next(entries, None) is None:
                    return False
        raise CheckoutError(
            f"checkout destination {dest} exists and is not an empty folder"
        ) from None
