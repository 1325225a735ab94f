"""``export`` and ``import``: move cached trees between cache folders in one stream.

The exporting side sends each stored object once, then each tree as a list of entries. The
importing side stores every object it lacks (checking its digest), rebuilds each tree in a work
folder by linking objects from its own store, checks the tree's digest, and publishes the tree
atomically with its record; a tree it already has (same digest) is skipped, so rerunning a broken
transfer resumes it. Records name paths in the receiving folder.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from asynccache._fs import remove_tree
from asynccache.cache.index import load_and_repair, write_index
from asynccache.cache.layout import CacheDir, resolve_instance_path
from asynccache.cache.manifest import build_tree, scan_tree
from asynccache.cache.parts import cached_records
from asynccache.cache.records import (
    IndexRecord,
    read_digest,
    remove_digest,
    validate_record,
    write_digest,
    write_meta,
)
from asynccache.cache.store import Store
from asynccache.cache.transfer import (
    ObjectDamaged,
    StreamBroken,
    StreamEnd,
    StreamObject,
    StreamTree,
    StreamWriter,
    TransferError,
    read_stream,
)
from asynccache.config import store_max_links
from asynccache.entries import validate_instance_id
from asynccache.errors import IndexCorrupt, SetupError

__all__ = ["ExportReport", "ImportReport", "export_cache", "import_cache", "receive_object"]

#: Index rewrites while importing: at most one per this many seconds (and one at the end).
_INDEX_INTERVAL = 2.0


@dataclass
class ExportReport:
    """What an export sent, and the trees it could not."""

    trees: int = 0
    objects: int = 0
    object_bytes: int = 0
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class ImportReport:
    """What an import published, skipped and refused."""

    cache_dir: str
    imported: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    objects_received: int = 0
    objects_present: int = 0
    bytes_received: int = 0
    #: The stream's end marker arrived: nothing was cut off.
    complete: bool = False
    #: Why the stream could not be read to its end ("" when it could).
    error: str = ""

    @property
    def exit_code(self) -> int:
        """0 when the whole stream was imported, 1 otherwise."""
        return 0 if self.complete and not self.failed and not self.error else 1


def export_cache(
    cache_dir: str | os.PathLike[str],
    out: BinaryIO,
    ids: Iterable[str] | None = None,
    *,
    level: int = 3,
) -> ExportReport:
    """Write the trees of ``ids`` (default: every indexed one) to ``out`` as a transfer stream.

    A tree that is not cached or cannot be read is left out and reported; a file that changes
    while it is sent ends the stream without its end marker (TransferError).
    """
    cache = CacheDir(Path(cache_dir))
    if not cache.root.is_dir():
        raise SetupError(f"cache folder {cache.root} does not exist")
    try:
        records = cached_records(cache.root)
    except IndexCorrupt as exc:
        raise SetupError(
            f"index.json of {cache.root} is damaged ({exc}); a caching run rebuilds it"
        ) from None
    store = Store(cache.root)
    stored = store.inodes() if store.root.is_dir() else {}
    report = ExportReport()
    writer = StreamWriter(out, level=level)
    sent: set[tuple[str, int]] = set()
    for instance_id in records if ids is None else ids:
        record = records.get(instance_id)
        if record is None:
            report.skipped[instance_id] = "not in index.json"
            continue
        folder = resolve_instance_path(cache.root, record)
        try:
            scan = scan_tree(folder, store, stored)
            for key, source in scan.sources.items():
                if key not in sent:
                    report.object_bytes += writer.add_object(key[0], key[1], source)
                    sent.add(key)
                    report.objects += 1
        except StreamBroken:
            raise
        except (OSError, TransferError) as exc:
            # nothing of this tree was sent but whole objects, which the receiver may keep
            report.skipped[instance_id] = str(exc)
            continue
        portable = dict(record, cache_path=instance_id)
        digest = read_digest(cache.root, instance_id)
        writer.add_tree(instance_id, portable, digest, scan.root, scan.entries)
        report.trees += 1
    writer.close()
    return report


def receive_object(item: StreamObject, store: Store) -> bytes | None:
    """Put a streamed object into the store unless it has a copy; check its digest.

    Returns a pin: a second link in the store's work folder that keeps the object from being
    freed until the trees that need it are built (the caller removes it); None when the
    store had the object (its content is then left unread). TransferError when the content
    does not match its name (nothing is kept).
    """
    if store.has(item.digest, item.mode, item.size):
        return None
    temp = store.temp_path()
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            found = item.copy_into(fd)
            os.fchmod(fd, item.mode)
            os.utime(fd, (item.mtime, item.mtime))
        finally:
            os.close(fd)
        if found != item.digest:
            raise ObjectDamaged(
                f"object {item.digest} arrived with other content (sha256 {found}): the "
                "sending store is damaged; run `asynccache verify --deep --repair` there"
            )
    except BaseException:
        os.unlink(temp)
        raise
    store.put(temp, item.digest, item.mode)
    return temp


class _Importer:
    """One import into a locked cache folder."""

    def __init__(self, cache: CacheDir, store: Store, records: dict[str, IndexRecord]) -> None:
        self.cache, self.store, self.records = cache, store, records
        self.report = ImportReport(cache_dir=str(cache.root))
        self.damaged: dict[str, str] = {}
        self._changed = False
        self._written = time.monotonic()

    def run(self, source: BinaryIO) -> None:
        try:
            for item in read_stream(source):
                if isinstance(item, StreamObject):
                    self.add_object(item)
                elif isinstance(item, StreamTree):
                    self.add_tree(item)
                elif isinstance(item, StreamEnd):
                    self.report.complete = True
        except TransferError as exc:
            self.report.error = str(exc)
        finally:
            self.write_index(final=True)

    def add_object(self, item: StreamObject) -> None:
        try:
            pin = receive_object(item, self.store)
        except ObjectDamaged as exc:
            self.damaged[item.digest] = str(exc)
            return
        if pin is None:
            self.report.objects_present += 1
        else:  # the pin stays in the store's work folder until the store is closed
            self.report.objects_received += 1
            self.report.bytes_received += item.size

    def add_tree(self, tree: StreamTree) -> None:
        instance_id = tree.instance_id
        try:
            validate_instance_id(instance_id)
            record = validate_record(instance_id, dict(tree.record))
        except (ValueError, IndexCorrupt) as exc:
            self.report.failed[instance_id] = f"not imported: {exc}"
            return
        if self.has(instance_id, tree.digest):
            self.report.skipped.append(instance_id)
            return
        bad = [entry[4] for entry in tree.entries if entry[0] == "f" and entry[4] in self.damaged]
        if bad:
            self.report.failed[instance_id] = self.damaged[bad[0]]
            return
        work = self.cache.new_work_dir(instance_id)
        try:
            self.publish(tree, record, work)
        except TransferError as exc:
            self.report.failed[instance_id] = str(exc)
        finally:
            if work.exists():
                remove_tree(work)

    def has(self, instance_id: str, digest: str | None) -> bool:
        """True when the folder holds this tree already (same recorded digest)."""
        record = self.records.get(instance_id)
        return (
            record is not None
            and digest is not None
            and read_digest(self.cache.root, instance_id) == digest
            and self.cache.instance_path(instance_id).is_dir()
        )

    def publish(self, tree: StreamTree, record: dict[str, Any], work: Path) -> None:
        files, size, digest = build_tree(tree, work, self.store)
        instance_id = tree.instance_id
        if tree.digest is not None and digest != tree.digest:
            raise TransferError(
                f"{instance_id}: the tree sent does not match the digest recorded at its "
                "extraction; run `asynccache verify --deep` on the sending side"
            )
        if (files, size) != (record.get("file_count"), record.get("size_bytes", size)):
            raise TransferError(f"{instance_id}: {files} files of {size} bytes, not as recorded")
        record = dict(record, cache_path=str(self.cache.instance_path(instance_id)), dedup=True)
        remove_digest(self.cache.root, instance_id)
        write_meta(self.cache.root, record)
        self.cache.publish(work, instance_id, self.store)
        write_digest(self.cache.root, instance_id, digest)
        self.records[instance_id] = record
        self.report.imported.append(instance_id)
        self._changed = True
        self.write_index()

    def write_index(self, *, final: bool = False) -> None:
        """Rewrite index.json when something changed, at most every few seconds till the end."""
        now = time.monotonic()
        if self._changed and (final or now - self._written >= _INDEX_INTERVAL):
            write_index(self.cache.root, self.records)
            self._changed = False
            self._written = now


def import_cache(
    cache_dir: str | os.PathLike[str],
    source: BinaryIO,
    *,
    max_links: int = store_max_links,
) -> ImportReport:
    """Import a transfer stream into a cache folder (created if its parent exists).

    Takes the folder's lock for the whole import. Each tree is published atomically with its
    record; what arrived before a broken stream ended is kept, and an import of the same
    stream again skips it.
    """
    cache = CacheDir(Path(cache_dir))
    cache.check_usable()
    cache.lock()
    try:
        cache.meta_dir.mkdir(exist_ok=True)
        cache.remove_stale_work()
        records, _notes = load_and_repair(cache.root)
        store = Store(cache.root, max_links=max_links)
        store.open()
        try:
            importer = _Importer(cache, store, records)
            importer.run(source)
        finally:
            store.close()
        return importer.report
    finally:
        cache.unlock()
