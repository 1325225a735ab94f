"""Work folder -> history past HEAD removed -> .meta record -> final name -> digest; failures."""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

from asynccache._fs import remove_tree, write_json_atomic
from asynccache.cache.layout import CacheDir
from asynccache.cache.records import IndexRecord, remove_digest, size_mb, write_digest, write_meta
from asynccache.cache.store import Store
from asynccache.entries import Entry
from asynccache.errors import DiskFull
from asynccache.tree.digest import entries_under, identity_of, tree_digest, tree_stats
from asynccache.tree.extract import ExtractResult
from asynccache.tree.folder import store_unstored
from asynccache.tree.git_guard import guard_tree

__all__ = ["Failure", "Publisher", "close_history", "make_record"]

#: One failed entry of a run: (instance_id, docker_image, reason).
Failure = tuple[str, str, str]


def make_record(
    entry: Entry,
    final: Path,
    result: ExtractResult,
    seconds: float,
    extra: Mapping[str, object] | None = None,
) -> IndexRecord:
    """The index record of an entry extracted in ``seconds`` and published at ``final``.

    ``extra``: fields every record of the run carries (the dataset, its revision, the schema).
    """
    return {
        "instance_id": entry.instance_id,
        "repo_name": entry.repo_name,
        "docker_image": entry.docker_image,
        "commit_hash": entry.commit_hash,
        "cache_path": str(final),
        "file_count": result.file_count,
        "size_mb": size_mb(result.size_bytes),
        "size_bytes": result.size_bytes,
        "seconds": round(seconds, 3),
        "cached_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **(extra or {}),
        "files_written": result.files_written,
        "files_linked": result.files_linked,
    }


def close_history(tree: Path, result: ExtractResult, scratch: Path) -> ExtractResult:
    """Remove the git history past HEAD from an extracted tree (git_guard); return its result
    with .git's files and bytes counted anew and no digest (the tree is read back for it)."""
    dotgit = tree / ".git"
    if not dotgit.is_dir() or dotgit.is_symlink():
        guard_tree(tree, scratch=scratch)  # nothing to do, or the error naming what is wrong
        return result
    files, size = tree_stats(dotgit)
    guard_tree(tree, scratch=scratch)
    files_now, size_now = tree_stats(dotgit)
    return dataclasses.replace(
        result,
        file_count=result.file_count - files + files_now,
        size_bytes=result.size_bytes - size + size_now,
        digest=None,
    )


def _stored_only_here(dotgit: Path, result: ExtractResult) -> list[tuple[str, int]]:
    """Objects (sha256, mode) that only this tree's .git links, as the extraction hashed them."""
    known = result.file_hashes
    found: list[tuple[str, int]] = []
    for name, entry in entries_under(os.fsencode(dotgit)):
        info = entry.stat(follow_symlinks=False)
        if stat.S_ISREG(info.st_mode) and info.st_nlink == 2:
            hashed = known.get(b".git/" + name)
            if hashed is not None and hashed[0] == identity_of(info):
                found.append((hashed[1], stat.S_IMODE(info.st_mode)))
    return found


def _restore(store: Store, dotgit: Path, held: list[tuple[str, int]]) -> None:
    """After the git guard: store what it wrote, free what only the packs it replaced held."""
    store_unstored(os.fsencode(dotgit), store)
    for digest, mode in held:
        store.free_object(digest, mode)


class Publisher:
    """Puts extracted trees into a locked cache folder; nothing partial ever has a final name.

    A tree is extracted into a work folder under ``.tmp``; its record is written to ``.meta``
    before the folder is renamed to its final name (so a crash between the two is repaired
    from ``.meta`` by the next run); its content digest is recorded last.
    """

    def __init__(
        self,
        cache: CacheDir,
        record_fields: Mapping[str, object] | None = None,
        *,
        keep_git_history: bool = False,
        store: Store | None = None,
    ) -> None:
        self.cache = cache
        self.record_fields = dict(record_fields or {})
        self.keep_git_history = keep_git_history
        #: The object store trees link from: what only a replaced tree linked is freed with it.
        self.store = store

    @asynccontextmanager
    async def work_dir(self, instance_id: str) -> AsyncIterator[Path]:
        """A fresh, empty work folder for one extraction, removed on exit unless published."""
        path = self.cache.new_work_dir(instance_id)
        try:
            yield path
        except (DiskFull, OSError) as exc:
            full = isinstance(exc, DiskFull) or exc.errno in (errno.ENOSPC, errno.EDQUOT)
            if full and self.store is not None and path.exists():
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._discard_stored, path)
            raise
        finally:
            with anyio.CancelScope(shield=True):
                if path.exists():
                    await anyio.to_thread.run_sync(remove_tree, path)

    async def close_history(self, work_dir: Path, result: ExtractResult) -> ExtractResult:
        """Unless the run keeps git history: remove what reaches past HEAD (in a thread)."""
        if self.keep_git_history:
            return result
        dotgit = work_dir / ".git"
        store = self.store if dotgit.is_dir() and not dotgit.is_symlink() else None
        held = []
        if store is not None:
            held = await anyio.to_thread.run_sync(_stored_only_here, dotgit, result)
        result = await anyio.to_thread.run_sync(close_history, work_dir, result, self.cache.tmp_dir)
        if store is not None:
            await anyio.to_thread.run_sync(_restore, store, dotgit, held)
        return result

    def _discard_stored(self, path: Path) -> None:
        """Remove a failed work folder and free what it alone stored: the disk is full."""
        assert self.store is not None
        unlinked = self.store.sole_links(path)
        remove_tree(path)
        self.store.free_unlinked(unlinked)

    async def publish(
        self, entry: Entry, work_dir: Path, result: ExtractResult, seconds: float
    ) -> IndexRecord:
        """Record the tree in ``work_dir`` and give it its final name; return its record."""
        final = self.cache.instance_path(entry.instance_id)
        record = make_record(entry, final, result, seconds, self.record_fields)
        await anyio.to_thread.run_sync(self._publish, work_dir, record)
        return record

    def _publish(self, work_dir: Path, record: IndexRecord) -> None:
        remove_digest(self.cache.root, record["instance_id"])
        write_meta(self.cache.root, record)
        self.cache.publish(work_dir, record["instance_id"], self.store)

    async def record_digest(self, instance_id: str, result: ExtractResult) -> None:
        """Record the tree's digest: the extraction's own when it knows it, else read back."""
        with anyio.CancelScope(shield=True):
            digest = result.digest
            if digest is None:
                folder = self.cache.instance_path(instance_id)
                known = result.file_hashes
                digest = await anyio.to_thread.run_sync(tree_digest, folder, known)
            await anyio.to_thread.run_sync(write_digest, self.cache.root, instance_id, digest)

    def write_failures(self, failures: Iterable[Failure]) -> None:
        """Write failures.json (each failed id's image and reason); leave none if none ever was."""
        found = {
            instance_id: {"docker_image": image, "reason": reason}
            for instance_id, image, reason in failures
        }
        if found or self.cache.failures_path.exists():
            write_json_atomic(self.cache.failures_path, found)
