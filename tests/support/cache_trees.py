"""Synthetic cache folders (trees and index.json records in the real format) for tests."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from asynccache.cache.index import update_index
from asynccache.cache.records import size_mb, write_digest, write_meta
from asynccache.entries import make_instance_id
from asynccache.tree.digest import tree_digest, tree_stats

TreeBuilder = Callable[[Path], None]

#: Files of the sample tree that are hard-linked together (two names, one inode).
HARDLINKED = ("pkg/data/shared.bin", "pkg/data/shared-link.bin")


def _write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)


def build_sample_tree(root: Path) -> None:
    """A small tree with every shape a /testbed has: modes, symlinks, hard links, empty dirs."""
    root.mkdir(parents=True, exist_ok=True)
    _write(root / "README.md", b"# sample\n")
    _write(root / "setup.py", b"from setuptools import setup\nsetup()\n")
    _write(root / "run_tests.sh", b"#!/bin/sh\nexec pytest\n", 0o755)
    _write(root / "secret.cfg", b"token = none\n", 0o600)
    _write(root / "shared-writable.txt", b"group and others may write\n", 0o666)
    _write(root / "readonly.txt", b"read only\n", 0o444)
    _write(root / "setuid-tool", b"#!/bin/sh\n", 0o4755)
    _write(root / "empty.txt", b"")
    _write(root / "pkg" / "__init__.py", b"")
    _write(root / "pkg" / "core.py", b"def answer():\n    return 41\n")
    _write(root / "pkg" / "data" / "blob.bin", hashlib.sha256(b"x").digest() * 40000)
    _write(root / HARDLINKED[0], b"one inode, two names\n")
    os.link(root / HARDLINKED[0], root / HARDLINKED[1])
    _write(root / "name with spaces" / "caf\u00e9 \u2603.txt", b"unicode\n")
    deep = root.joinpath(*[f"d{i}" for i in range(12)])
    _write(deep / "leaf.txt", b"deep\n")
    (root / "empty-dir" / "nested-empty").mkdir(parents=True)
    (root / "private-dir").mkdir(mode=0o700)
    _write(root / "private-dir" / "inside.txt", b"private\n")
    locked = root / "locked-dir"
    _write(locked / "inside.txt", b"in a read-only folder\n")
    os.chmod(locked, 0o555)
    sticky = root / "sticky-dir"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    os.symlink("pkg/core.py", root / "rel-link")
    os.symlink("../README.md", root / "pkg" / "up-link")
    os.symlink("/etc/hostname", root / "abs-link")
    os.symlink("does/not/exist", root / "dangling-link")
    os.symlink("pkg", root / "dir-link")
    os.mkfifo(root / "a-fifo", 0o640)
    os.utime(root / "pkg" / "core.py", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))


def build_generated_tree(
    root: Path, *, files: int, total_bytes: int, venv_share: float = 0.7, seed: str = "tree"
) -> None:
    """A repository-like tree of ``files`` files and about ``total_bytes`` bytes.

    ``venv_share`` of the files sit in a ``.venv/lib/python3.11/site-packages`` subtree (many
    small modules with __pycache__), the rest in the project's own packages.
    """
    root.mkdir(parents=True, exist_ok=True)
    venv_files = int(files * venv_share)
    sizes = _sizes(files, total_bytes)
    block = hashlib.sha256(seed.encode()).digest() * 2048
    site = root / ".venv" / "lib" / "python3.11" / "site-packages"
    (root / ".venv" / "bin").mkdir(parents=True)
    os.symlink("/usr/bin/python3", root / ".venv" / "bin" / "python")
    os.symlink("python", root / ".venv" / "bin" / "python3")
    for number in range(files):
        if number < venv_files:
            package = site / f"lib{number // 60:03d}"
            name = f"mod{number % 60:02d}.py" if number % 3 else f"__pycache__/m{number}.pyc"
        else:
            own = number - venv_files
            package = root / "src" / f"pkg{own // 40:03d}"
            name = f"module_{own % 40:02d}.py"
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        size = sizes[number]
        data = (block * (size // len(block) + 1))[:size]
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o755 if number % 50 == 0 else 0o644
        )
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    _write(root / "run_tests.sh", b"#!/bin/sh\n", 0o755)
    (root / "build" / "empty").mkdir(parents=True)


def _sizes(files: int, total_bytes: int) -> list[int]:
    """File sizes that add up to about total_bytes: mostly small, a few large."""
    large = max(1, files // 200)
    small_total = total_bytes // 4
    small = max(1, small_total // max(1, files - large))
    big = max(1, (total_bytes - small_total) // large)
    return [big if number % 200 == 199 else small for number in range(files)]


def minimal_record(instance_id: str, cache_dir: Path) -> dict[str, Any]:
    """A record with only the fields an index record needs, for an id like ``repo__n``."""
    return {
        "instance_id": instance_id,
        "repo_name": instance_id.split("__")[0],
        "docker_image": f"namanjain12/{instance_id}:x",
        "commit_hash": "c" * 40,
        "cache_path": str(cache_dir / instance_id),
        "file_count": 3,
        "size_mb": 0.01,
    }


def cache_instance(
    cache_dir: Path,
    repo_name: str,
    commit_hash: str,
    build: TreeBuilder = build_sample_tree,
    *,
    docker_image: str | None = None,
    digest: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build one instance's tree in ``cache_dir`` and index it like a caching run would."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    row = {"repo_name": repo_name, "commit_hash": commit_hash}
    instance_id = make_instance_id(row)
    folder = cache_dir / instance_id
    build(folder)
    files, size = tree_stats(folder)
    record: dict[str, Any] = {
        "instance_id": instance_id,
        "repo_name": repo_name,
        "docker_image": docker_image
        or f"127.0.0.1:5000/namanjain12/{repo_name}_final:{commit_hash}",
        "commit_hash": commit_hash,
        "cache_path": str(folder),
        "file_count": files,
        "size_mb": size_mb(size),
        "size_bytes": size,
        "seconds": 0.0,
        "cached_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
    }
    if digest:
        write_digest(cache_dir, instance_id, tree_digest(folder))
    write_meta(cache_dir, record)
    update_index(cache_dir, put=[record])
    return record
