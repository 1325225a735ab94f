"""record.py: the hashes an extraction keeps are bounded and never stale; its digest lines."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

import asynccache.tree.record as record_module
from asynccache.tree.digest import entry_line, tree_digest
from asynccache.tree.extract import extract_tar
from asynccache.tree.record import TreeRecord
from tests.support.tars import tar_of


def test_hashes_kept_are_bounded_and_never_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(record_module, "MAX_KEPT_HASHES", 10)
    members = [(tarfile.TarInfo("testbed"), b"")]
    members[0][0].type = tarfile.DIRTYPE
    for round_ in range(2):  # the second round replaces every file with other content
        for index in range(30):
            info = tarfile.TarInfo(f"testbed/f{index}")
            data = f"{round_}-{index}".encode() * (round_ + 1)
            info.size = len(data)
            members.append((info, data))
    result = extract_tar(io.BytesIO(tar_of(members)), tmp_path, keep_hashes=True)
    assert len(result.file_hashes) == 10
    assert tree_digest(tmp_path, result.file_hashes) == tree_digest(tmp_path)


def test_a_hardlink_shares_its_source_line_and_hash() -> None:
    record = TreeRecord(keep_hashes=True)
    taken = ((1, 3, 5), "ab" * 32)
    record.keep_hash(b"a", 0o644, taken)
    record.link(b"b", b"a")
    assert record.hashes == {b"a": taken, b"b": taken}
    folders = [(b"", 0o755), (b"d", 0o700)]
    lines = [
        entry_line(b"a", b"f", 0o644, taken[1].encode()),
        entry_line(b"b", b"f", 0o644, taken[1].encode()),
        entry_line(b"d", b"d", 0o700, b""),
    ]
    found = record.digest_lines(folders)
    assert found is not None and sorted(found) == sorted(lines)


def test_an_event_it_cannot_follow_leaves_the_digest_to_a_walk() -> None:
    record = TreeRecord(keep_hashes=True)
    record.symlink(b"s", b"target")
    record.link(b"b", b"unknown")  # a hardlink to something it never recorded
    assert record.digest_lines([]) is None
    assert TreeRecord(keep_hashes=False).digest_lines([]) is None
