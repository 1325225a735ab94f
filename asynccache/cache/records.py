"""One instance's record: its schema, and ``.meta/<id>.json`` and ``.meta/<id>.digest``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from asynccache._fs import write_bytes_atomic, write_json_atomic
from asynccache.config import META_DIR_NAME
from asynccache.entries import validate_instance_id
from asynccache.errors import IndexCorrupt

log = logging.getLogger(__name__)

IndexRecord = dict[str, Any]

REQUIRED_FIELDS = (
    "instance_id",
    "repo_name",
    "docker_image",
    "commit_hash",
    "cache_path",
    "file_count",
    "size_mb",
)

DIGEST_SUFFIX = ".digest"


def size_mb(size_bytes: int) -> float:
    """Bytes as MiB, rounded to two decimals as the original index shows them."""
    return round(size_bytes / (1024 * 1024), 2)


def record_exclude(record: IndexRecord) -> list[str]:
    """The --exclude patterns a record's tree was cached with (none for older records)."""
    patterns = record.get("exclude", [])
    return [str(pattern) for pattern in patterns] if isinstance(patterns, list) else []


def validate_record(key: str, record: Any) -> IndexRecord:
    """Return ``record`` when it is a complete index record for ``key``, else raise IndexCorrupt."""
    try:
        validate_instance_id(key)
    except ValueError as exc:
        raise IndexCorrupt(f"record key: {exc}") from None
    if not isinstance(record, dict):
        raise IndexCorrupt(f"record {key!r} is not an object")
    missing = [name for name in REQUIRED_FIELDS if name not in record]
    if missing:
        raise IndexCorrupt(f"record {key!r} lacks {', '.join(missing)}")
    if record["instance_id"] != key:
        raise IndexCorrupt(f"record {key!r} has instance_id {record['instance_id']!r}")
    return record


def meta_path(cache_dir: Path, instance_id: str) -> Path:
    """Where the metadata of one cached folder lives (beside it, never inside it)."""
    return cache_dir / META_DIR_NAME / f"{instance_id}.json"


def write_meta(cache_dir: Path, record: IndexRecord) -> None:
    """Persist one record beside its folder, before the folder gets its final name."""
    path = meta_path(cache_dir, record["instance_id"])
    path.parent.mkdir(exist_ok=True)
    write_json_atomic(path, record)


def read_meta_records(cache_dir: Path) -> dict[str, IndexRecord]:
    """Records of every complete folder that has valid metadata."""
    records: dict[str, IndexRecord] = {}
    meta_dir = cache_dir / META_DIR_NAME
    if not meta_dir.is_dir():
        return records
    for path in meta_dir.glob("*.json"):
        instance_id = path.stem
        try:
            record = validate_record(instance_id, json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, IndexCorrupt) as exc:
            log.warning("ignoring unreadable metadata %s: %s", path, exc)
            continue
        if (cache_dir / instance_id).is_dir():
            records[instance_id] = record
    return records


def digest_path(cache_dir: Path, instance_id: str) -> Path:
    """Where the digest of one cached tree is kept: ``cache_dir/.meta/<id>.digest``."""
    return Path(cache_dir) / META_DIR_NAME / f"{instance_id}{DIGEST_SUFFIX}"


def write_digest(cache_dir: Path, instance_id: str, digest: str) -> None:
    """Record a tree's digest (atomically), beside its metadata."""
    path = digest_path(cache_dir, instance_id)
    path.parent.mkdir(exist_ok=True)
    write_bytes_atomic(path, f"{digest}\n".encode("ascii"))


def remove_digest(cache_dir: Path, instance_id: str) -> None:
    """Forget a tree's digest (its folder is about to be replaced)."""
    digest_path(cache_dir, instance_id).unlink(missing_ok=True)


def read_digest(cache_dir: Path, instance_id: str) -> str | None:
    """The recorded digest of a tree, or None when none was recorded."""
    try:
        text = digest_path(cache_dir, instance_id).read_text(encoding="ascii").strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return text or None


def forget(cache_dir: Path, instance_id: str) -> None:
    """Delete an instance's metadata and digest (its index entry is the index's business)."""
    meta_path(cache_dir, instance_id).unlink(missing_ok=True)
    remove_digest(cache_dir, instance_id)
