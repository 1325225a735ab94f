"""budget.py: an entry reads a bounded number of archive bytes and members, whatever headers say."""

from __future__ import annotations

import functools
import io
import os
import pickle
import tarfile
from pathlib import Path

import anyio
import pytest

from asynccache.errors import LimitExceeded
from asynccache.tree.budget import Budget
from asynccache.tree.extract import extract_stream, extract_tar
from tests.support.oci_fixtures import file, folder, tar_bytes
from tests.support.tars import END, apply_all, build, chunked, dirm, padded, pax_record, reg

MiB = 1 << 20


def entries(root: Path) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, n), root) for d, ds, fs in os.walk(root) for n in ds + fs
    )


def test_bytes_past_the_budget_fail_and_leave_no_partial_file(dest: Path) -> None:
    data = build(dirm("testbed"), reg("testbed/small", b"s"), reg("testbed/big", b"b" * (3 * MiB)))
    with pytest.raises(LimitExceeded, match=r"more than 1\.0 MiB of uncompressed archive data"):
        extract_tar(io.BytesIO(data), dest, budget=Budget(max_bytes=MiB))
    assert "big" not in entries(dest)


def test_the_message_names_the_option_and_the_fix(dest: Path) -> None:
    data = build(dirm("testbed"), reg("testbed/big", b"b" * (2 * MiB)))
    with pytest.raises(LimitExceeded) as caught:
        extract_tar(io.BytesIO(data), dest, budget=Budget(max_bytes=MiB))
    assert str(caught.value) == (
        "refused: more than 1.0 MiB of uncompressed archive data (--max_testbed_bytes 1048576); "
        "raise --max_testbed_bytes if the image is genuine"
    )


def test_a_flood_of_members_fails(dest: Path) -> None:
    data = build(dirm("testbed"), *(reg(f"testbed/f{i}") for i in range(300)))
    with pytest.raises(LimitExceeded, match=r"more than 100 archive members \(--max_testbed_files"):
        extract_tar(io.BytesIO(data), dest, budget=Budget(max_members=100))
    assert len(entries(dest)) <= 100


def test_within_the_budget_nothing_changes(dest: Path) -> None:
    data = build(dirm("testbed"), reg("testbed/a", b"a" * 1000), end=False) + END
    budget = Budget(max_bytes=len(data), max_members=3)
    result = anyio.run(functools.partial(extract_stream, chunked(data), dest, budget=budget))
    assert result.file_count == 1
    assert budget.bytes == len(data)
    assert budget.members == 3  # the folder, the file and the end-of-archive marker


def test_a_header_that_lies_about_its_size_is_counted_by_what_is_read(dest: Path) -> None:
    # a size field of 8 GiB over a few bytes of data: the budget counts what arrives
    info = tarfile.TarInfo("testbed/liar")
    info.size = 8 << 30
    data = build(dirm("testbed"), end=False) + info.tobuf(tarfile.GNU_FORMAT) + b"x" * 4096
    budget = Budget(max_bytes=1 << 40)
    with pytest.raises(Exception, match="inside the data"):
        extract_tar(io.BytesIO(data), dest, budget=budget)
    assert budget.bytes == len(data)
    assert "liar" not in entries(dest)


def sparse_member(size: int, data: bytes) -> bytes:
    records = pax_record(b"GNU.sparse.major", b"0") + pax_record(b"GNU.sparse.minor", b"1")
    records += pax_record(b"GNU.sparse.name", b"testbed/holes")
    records += pax_record(b"GNU.sparse.size", str(size).encode())
    records += pax_record(b"GNU.sparse.numblocks", b"1")
    records += pax_record(b"GNU.sparse.map", f"0,{len(data)}".encode())
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, len(records)
    info = tarfile.TarInfo("testbed/GNUSparseFile.0/holes")
    info.size = len(data)
    return header.tobuf(tarfile.USTAR_FORMAT) + padded(records) + info.tobuf() + padded(data)


def test_the_holes_of_a_sparse_file_count_at_their_full_size(dest: Path) -> None:
    data = build(dirm("testbed"), end=False) + sparse_member(1 << 40, b"tiny") + END
    with pytest.raises(LimitExceeded, match="max_testbed_bytes"):
        extract_tar(io.BytesIO(data), dest, budget=Budget(max_bytes=64 * MiB))
    assert entries(dest) == []


def test_layers_share_one_budget_and_skipped_data_counts(tmp_path: Path) -> None:
    # nothing of the first layer's big file is under the root, and it still costs its bytes
    outside = tar_bytes([folder("usr"), file("usr/big", b"u" * (2 * MiB))])
    inside = tar_bytes([folder("testbed"), file("testbed/a", b"a" * MiB)])
    alone, both = tmp_path / "alone", tmp_path / "both"
    alone.mkdir()
    both.mkdir()
    apply_all(alone, inside, budget=Budget(max_bytes=3 * MiB))  # one layer alone fits
    with pytest.raises(LimitExceeded, match="max_testbed_bytes"):
        apply_all(both, outside, inside, budget=Budget(max_bytes=3 * MiB))
    assert entries(both) == []


def test_members_of_every_layer_count(dest: Path) -> None:
    layer = tar_bytes([folder("testbed"), *(file(f"testbed/f{i}", "x") for i in range(60))])
    with pytest.raises(LimitExceeded, match="max_testbed_files"):
        apply_all(dest, layer, layer, budget=Budget(max_members=100))


def test_the_error_travels_between_processes_as_itself() -> None:
    budget = Budget(max_members=1)
    budget.take_member()
    with pytest.raises(LimitExceeded) as caught:
        budget.take_member()
    again = pickle.loads(pickle.dumps(caught.value))
    assert type(again) is LimitExceeded
    assert str(again) == str(caught.value)
    assert again.transient is False
