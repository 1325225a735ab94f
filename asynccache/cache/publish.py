"""Work folder -> .meta record -> final name -> digest; failures (the tree's history past HEAD
is removed before, where it was extracted: see history.py)."""

from __future__ import annotations

import errno
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

import anyio

from asynccache._fs import remove_tree, write_json_atomic
from asynccache.cache.layout import CacheDir, scratch_of
from asynccache.cache.records import IndexRecord, remove_digest, size_mb, write_digest, write_meta
from asynccache.cache.store import Store
from asynccache.entries import Entry
from asynccache.errors import DiskFull
from asynccache.tree.digest import tree_digest
from asynccache.tree.extract import ExtractResult

__all__ = ["Failure", "Publisher", "make_record"]

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
        store: Store | None = None,
    ) -> None:
        self.cache = cache
        self.record_fields = dict(record_fields or {})
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
                for leftover in (path, scratch_of(path)):
                    if leftover.exists():
                        await anyio.to_thread.run_sync(remove_tree, leftover)

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
