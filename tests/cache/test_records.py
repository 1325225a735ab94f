"""One instance's record: validation, .meta/<id>.json and .meta/<id>.digest."""

from __future__ import annotations

from pathlib import Path

import pytest

from asynccache.cache.records import (
    digest_path,
    forget,
    meta_path,
    read_digest,
    read_meta_records,
    remove_digest,
    size_mb,
    validate_record,
    write_digest,
    write_meta,
)
from asynccache.errors import IndexCorrupt
from tests.support.cache_trees import minimal_record as record


def test_size_mb_rounds_to_two_decimals() -> None:
    assert size_mb(0) == 0.0
    assert size_mb(1024 * 1024) == 1.0
    assert size_mb(1536 * 1024 + 1) == 1.5


def test_a_record_must_name_its_key(tmp_path: Path) -> None:
    good = record("a__1", tmp_path)
    assert validate_record("a__1", good) is good
    with pytest.raises(IndexCorrupt, match="has instance_id 'a__1'"):
        validate_record("b__2", good)


def test_meta_records_count_only_complete_folders(tmp_path: Path) -> None:
    write_meta(tmp_path, record("a__1", tmp_path))
    write_meta(tmp_path, record("b__2", tmp_path))
    (tmp_path / "a__1").mkdir()
    meta_path(tmp_path, "c__3").write_text("{not json")
    (tmp_path / "c__3").mkdir()
    assert sorted(read_meta_records(tmp_path)) == ["a__1"]


def test_a_digest_is_written_whole_and_read_back(tmp_path: Path) -> None:
    assert read_digest(tmp_path, "a__1") is None
    write_digest(tmp_path, "a__1", "ab" * 32)
    write_digest(tmp_path, "a__1", "cd" * 32)
    assert read_digest(tmp_path, "a__1") == "cd" * 32
    assert digest_path(tmp_path, "a__1").read_text() == "cd" * 32 + "\n"
    assert sorted(p.name for p in (tmp_path / ".meta").iterdir()) == ["a__1.digest"]
    remove_digest(tmp_path, "a__1")
    assert read_digest(tmp_path, "a__1") is None


def test_forget_removes_metadata_and_digest(tmp_path: Path) -> None:
    write_meta(tmp_path, record("a__1", tmp_path))
    write_digest(tmp_path, "a__1", "ab" * 32)
    forget(tmp_path, "a__1")
    assert list((tmp_path / ".meta").iterdir()) == []
    forget(tmp_path, "a__1")
