"""``merge --from``: shards that ran on node-local disks gathered into one cache folder.

Each complete instance of a source folder comes over with its record and digest, never
extracted again: renamed when both folders are on one filesystem (the source then no longer
holds it), copied otherwise (modes, times, symlinks and hard links kept). As in a run, the
record is written first and the final name appears last; an instance the destination already
holds is left alone, so gathering twice changes nothing. The source's index parts and
failures come along, so ``merge`` can tell which shards are done.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asynccache._fs import fsync_dir, remove_tree, write_json_atomic
from asynccache.cache.layout import CacheDir, resolve_instance_path
from asynccache.cache.parts import (
    PART_STATES,
    PartProgress,
    combine,
    known_records,
    part_files,
    read_failures,
    read_parts,
)
from asynccache.cache.records import (
    IndexRecord,
    meta_path,
    read_digest,
    remove_digest,
    write_digest,
    write_meta,
)
from asynccache.errors import SetupError


@dataclass
class Gathered:
    """What one source folder gave."""

    moved: int = 0
    copied: int = 0
    present: int = 0
    problems: list[str] = field(default_factory=list)


def gather(source: Path, dest: CacheDir) -> Gathered:
    """Bring every complete instance of the cache folder ``source`` into ``dest``.

    Takes ``source``'s lock exclusively: no run may be live there (CacheLocked otherwise).
    """
    src = CacheDir(source)
    if not src.root.is_dir():
        raise SetupError(f"--from {src.root}: no such cache folder")
    if os.path.samefile(src.root, dest.root):
        raise SetupError(f"--from {src.root} is the cache folder itself")
    result = Gathered()
    src.lock()
    try:
        records, _ = known_records(src.root)
        same_filesystem = os.stat(src.root).st_dev == os.stat(dest.root).st_dev
        dest.tmp_dir.mkdir(exist_ok=True)
        here: dict[str, IndexRecord] = {}
        for key in sorted(records):
            folder = resolve_instance_path(src.root, records[key])
            final = dest.instance_path(key)
            record = {**records[key], "cache_path": str(final)}
            if final.is_dir():
                result.present += 1
                here[key] = record
                continue
            if not folder.is_dir():
                continue
            try:
                if same_filesystem and _move(src, dest, folder, record):
                    result.moved += 1
                else:
                    _copy(src, dest, folder, record)
                    result.copied += 1
            except OSError as exc:
                result.problems.append(f"{key} from {src.root}: {_reason(exc)}")
                continue
            here[key] = record
        _bring_parts(src, dest, here)
    finally:
        src.unlock()
    return result


def _reason(exc: OSError) -> str:
    """One line for a failed move or copy (copytree gathers every file's error in a list)."""
    errors = exc.args[0] if isinstance(exc, shutil.Error) and exc.args else None
    if isinstance(errors, list) and errors and len(errors[0]) == 3:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return f"{errors[0][2]}{more}"
    return str(exc)


def _move(src: CacheDir, dest: CacheDir, folder: Path, record: IndexRecord) -> bool:
    """Rename the instance over; False when the two are different filesystems after all."""
    key = str(record["instance_id"])
    write_meta(dest.root, record)
    digest = read_digest(src.root, key)
    if digest is not None:
        write_digest(dest.root, key, digest)
    try:
        os.rename(folder, dest.instance_path(key))
    except OSError as exc:
        meta_path(dest.root, key).unlink(missing_ok=True)
        remove_digest(dest.root, key)
        if exc.errno == errno.EXDEV:
            return False
        raise
    fsync_dir(dest.root)
    # The instance has left the source folder: so have its record and digest.
    meta_path(src.root, key).unlink(missing_ok=True)
    remove_digest(src.root, key)
    return True


def _copy(src: CacheDir, dest: CacheDir, folder: Path, record: IndexRecord) -> None:
    key = str(record["instance_id"])
    work = dest.new_work_dir(key)
    try:
        copy_tree(folder, work)
        write_meta(dest.root, record)
        digest = read_digest(src.root, key)
        if digest is not None:
            write_digest(dest.root, key, digest)
        dest.publish(work, key)
    finally:
        if work.exists():
            remove_tree(work)


def copy_tree(source: Path, dest: Path) -> None:
    """Copy a cached tree into the empty folder ``dest`` on another filesystem.

    Modes and file times as in the source, symlinks as symlinks, files hard-linked together
    in the source hard-linked together in the copy (so counts and digests stay the same).
    """
    first_copy: dict[tuple[int, int], str] = {}

    def copy_file(src: str, dst: str) -> str:
        info = os.lstat(src)
        key = (info.st_dev, info.st_ino)
        if info.st_nlink > 1 and key in first_copy:
            os.link(first_copy[key], dst)
            return dst
        if stat.S_ISFIFO(info.st_mode):
            os.mkfifo(dst, stat.S_IMODE(info.st_mode))
            shutil.copystat(src, dst, follow_symlinks=False)
        elif stat.S_ISREG(info.st_mode):
            shutil.copy2(src, dst, follow_symlinks=False)
        else:
            # Never read a device (it may never end): an extraction does not make them.
            raise shutil.SpecialFileError(f"{src} is a device or a socket")
        if info.st_nlink > 1:
            first_copy[key] = dst
        return dst

    shutil.copytree(source, dest, symlinks=True, copy_function=copy_file, dirs_exist_ok=True)


def _bring_parts(src: CacheDir, dest: CacheDir, here: dict[str, IndexRecord]) -> None:
    """The source's index parts and failures, for the instances now in ``dest``."""
    dest.make_shards_dir()
    existing = read_parts(dest.root)
    for shard, part in read_parts(src.root).items():
        records = {key: here[key] for key in part.records if key in here}
        state, rows = part.state, part.rows
        failed, stopped = part.failed, part.stopped
        known = existing.get(shard)
        if known is not None:
            records = combine(known.records, records)
            if PART_STATES.index(known.state) > PART_STATES.index(state):
                state, rows = known.state, known.rows
                failed, stopped = known.failed, known.stopped
        progress = PartProgress(shard, rows=rows, state=state, failed=failed, stopped=stopped)
        write_json_atomic(dest.shard_path(shard, ".json"), progress.render(records))
    for shard, path in part_files(src.root, ".failures.json").items():
        target = dest.shard_path(shard, ".failures.json")
        failures: dict[str, Any] = {**read_failures(target), **read_failures(path)}
        kept = {key: value for key, value in failures.items() if key not in here}
        write_json_atomic(target, kept)
