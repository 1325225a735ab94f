"""Where tar readers differ, the tree is what GNU tar (run here) or Go's archive/tar gives.

GNU tar 1.34 is the reference for sparse members, old GNU headers and repeated extended
headers; Go's archive/tar (which Docker's extraction uses) for global pax headers, which it
never applies to later members.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from asynccache.errors import TruncatedArchive, UnsafeArchive
from asynccache.tree.tarstream import Source, members
from tests.support.tars import (
    END,
    MTIME,
    NS,
    Extract,
    apply_all,
    assert_rejected,
    build,
    dirm,
    fix_checksum,
    listing,
    mode_of,
    padded,
    pax_record,
    reg,
)

SPARSE_FORMATS = {
    "oldgnu": ["--format=oldgnu"],
    "pax-0.0": ["--format=posix", "--sparse-version=0.0"],
    "pax-0.1": ["--format=posix", "--sparse-version=0.1"],
    "pax-1.0": ["--format=posix", "--sparse-version=1.0"],
}


def gnu_tar(*args: str | Path, cwd: Path) -> None:
    tar = shutil.which("tar")
    assert tar is not None, "GNU tar is the reference of these tests"
    subprocess.run([tar, *map(str, args)], cwd=cwd, check=True, capture_output=True)


def sparse_file(path: Path, pieces: dict[int, bytes], size: int) -> None:
    """A file of size bytes with data at the given offsets and holes elsewhere."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        for offset, data in pieces.items():
            os.pwrite(fd, data, offset)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


@pytest.fixture
def sparse_tree(tmp_path: Path) -> Path:
    """A testbed of sparse files: a hole inside, at either end, only holes, many segments."""
    source = tmp_path / "source"
    (source / "testbed" / "sub").mkdir(parents=True)
    testbed = source / "testbed"
    sparse_file(testbed / "inside", {0: b"head", 300_000: b"middle"}, 1 << 20)
    sparse_file(testbed / "ends", {65_536: b"x" * 5000}, 3 << 20)
    sparse_file(testbed / "sub" / "holes", {}, 5 << 20)
    # 60 segments: more than an old GNU header and its first extension block hold
    sparse_file(testbed / "many", {i * 65_536: bytes([i]) * (100 + i) for i in range(60)}, 4 << 20)
    (testbed / "plain.txt").write_text("not sparse")
    assert os.stat(testbed / "many").st_blocks * 512 < 1 << 20  # the file system keeps holes
    return source


def gnu_sparse_archive(source: Path, fmt: str) -> bytes:
    archive = source.parent / f"{fmt}.tar"
    gnu_tar("--sparse", *SPARSE_FORMATS[fmt], "-cf", archive, "testbed", cwd=source)
    return archive.read_bytes()


def gnu_extracted(data: bytes, where: Path) -> Path:
    """Where GNU tar extracts data: the testbed folder."""
    where.mkdir()
    (where / "in.tar").write_bytes(data)
    gnu_tar("-xf", "in.tar", cwd=where)
    return where / "testbed"


@pytest.mark.parametrize("fmt", list(SPARSE_FORMATS))
def test_sparse_members_give_what_gnu_tar_gives(
    extract: Extract, sparse_tree: Path, tmp_path: Path, fmt: str
) -> None:
    data = gnu_sparse_archive(sparse_tree, fmt)
    sparse = {
        info.name: info.segments
        for _reader, info in members(Source(io.BytesIO(data).read))
        if info.segments is not None
    }
    assert len(sparse) == 4  # GNU tar did write them as sparse members
    assert len(sparse["testbed/many"] or ()) >= 60
    expected = gnu_extracted(data, tmp_path / "gnu")
    dest = tmp_path / "dest"
    dest.mkdir()
    result = extract(data, dest)
    assert listing(dest) == listing(expected)
    for name in ("inside", "ends", "sub/holes", "many"):
        assert (dest / name).read_bytes() == (expected / name).read_bytes()
        assert os.stat(dest / name).st_size == os.stat(expected / name).st_size
        assert mode_of(dest / name) == 0o640
        # the holes stay holes
        assert os.stat(dest / name).st_blocks <= os.stat(expected / name).st_blocks + 16
    assert result.file_count == 5
    assert result.size_bytes == (1 << 20) + (3 << 20) + (5 << 20) + (4 << 20) + 10


def test_sparse_members_in_layers(sparse_tree: Path, tmp_path: Path) -> None:
    data = gnu_sparse_archive(sparse_tree, "pax-1.0")
    expected = gnu_extracted(data, tmp_path / "gnu")
    dest = tmp_path / "dest"
    dest.mkdir()
    lower = build(dirm("testbed"), reg("testbed/many", b"lower"))
    _tree, result = apply_all(dest, lower, data)
    assert listing(dest) == listing(expected)
    assert (dest / "many").read_bytes() == (expected / "many").read_bytes()
    assert result.file_count == 5


def sparse_member(entries: list[tuple[int, int]], size: int, data: bytes) -> bytes:
    """A pax 0.1 sparse member with a hand-made map."""
    records = pax_record(b"GNU.sparse.major", b"0") + pax_record(b"GNU.sparse.minor", b"1")
    records += pax_record(b"GNU.sparse.name", b"testbed/s")
    records += pax_record(b"GNU.sparse.size", str(size).encode())
    records += pax_record(b"GNU.sparse.numblocks", str(len(entries)).encode())
    numbers = ",".join(f"{offset},{length}" for offset, length in entries)
    records += pax_record(b"GNU.sparse.map", numbers.encode())
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, len(records)
    info = tarfile.TarInfo("testbed/GNUSparseFile.0/s")
    info.size = len(data)
    return (
        header.tobuf(tarfile.USTAR_FORMAT)
        + padded(records)
        + info.tobuf(tarfile.USTAR_FORMAT)
        + padded(data)
    )


def test_a_hand_made_sparse_map_is_followed(extract: Extract, dest: Path) -> None:
    data = build(dirm("testbed"), end=False)
    data += sparse_member([(0, 2), (10, 3), (20, 0)], 20, b"abXYZ") + END
    extract(data, dest)
    assert (dest / "s").read_bytes() == b"ab" + b"\0" * 8 + b"XYZ" + b"\0" * 7


@pytest.mark.parametrize(
    ("entries", "size", "stored", "match"),
    [
        ([(10, 3), (0, 2)], 20, 5, "out of order"),
        ([(0, 5), (3, 2)], 20, 7, "out of order"),
        ([(18, 5)], 20, 5, "past the file's size"),
        ([(0, 2)], 20, 5, "covers 2 bytes, its data is 5"),
    ],
)
def test_a_bad_sparse_map_is_rejected(
    extract: Extract,
    sandbox: Path,
    entries: list[tuple[int, int]],
    size: int,
    stored: int,
    match: str,
) -> None:
    data = build(dirm("testbed"), end=False)
    data += sparse_member(entries, size, b"d" * stored) + END
    assert_rejected(extract, sandbox, data, UnsafeArchive, match)


def test_old_gnu_header_times_are_not_a_name_prefix(
    extract: Extract, tmp_path: Path, dest: Path
) -> None:
    # GNU tar writes atime and ctime where a POSIX header has its name prefix
    source = tmp_path / "source"
    (source / "testbed").mkdir(parents=True)
    (source / "testbed" / "f.txt").write_text("kept")
    archive = source / "incremental.tar"
    gnu_tar("--format=oldgnu", "--incremental", "-cf", archive, "testbed/f.txt", cwd=source)
    data = archive.read_bytes()
    assert data[257:265] == b"ustar  \0" and data[345] != 0  # old GNU, with times
    expected = gnu_extracted(data, tmp_path / "gnu")
    extract(build(dirm("testbed"), end=False) + data, dest)
    assert listing(dest) == listing(expected) == {"f.txt": "kept"}


def test_old_gnu_header_times_in_a_layer(dest: Path) -> None:
    block = bytearray(build(reg("testbed/f.txt", b"kept"), fmt=tarfile.GNU_FORMAT))
    block[345:369] = b"15303104753\x0015303104753\x00"
    fix_checksum(block, 0)
    apply_all(dest, build(dirm("testbed")), bytes(block))
    assert listing(dest) == {"f.txt": "kept"}


def test_a_posix_name_prefix_still_applies(extract: Extract, dest: Path) -> None:
    name = "testbed/" + "p" * 120 + "/file.txt"
    extract(build(dirm("testbed"), reg(name, b"deep"), fmt=tarfile.USTAR_FORMAT), dest)
    assert (dest / ("p" * 120) / "file.txt").read_bytes() == b"deep"


def long_name(kind: bytes, text: bytes) -> bytes:
    header = tarfile.TarInfo("././@LongLink")
    header.type, header.size = kind, len(text) + 1
    return header.tobuf(tarfile.GNU_FORMAT) + padded(text + b"\0")


def pax_header(records: bytes) -> bytes:
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, len(records)
    return header.tobuf(tarfile.USTAR_FORMAT) + padded(records)


def plain(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.mtime, info.mode = kind, MTIME, 0o644
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info.tobuf(tarfile.USTAR_FORMAT) + (padded(data) if info.size else b"")


REPEATED = {
    "two long names": long_name(tarfile.GNUTYPE_LONGNAME, b"testbed/first")
    + long_name(tarfile.GNUTYPE_LONGNAME, b"testbed/second")
    + plain("testbed/plain"),
    "two pax headers": pax_header(pax_record(b"path", b"testbed/first"))
    + pax_header(pax_record(b"path", b"testbed/second"))
    + plain("testbed/plain"),
    "a pax header replaces the one before": pax_header(pax_record(b"mtime", b"1700000000"))
    + pax_header(pax_record(b"path", b"testbed/second"))
    + plain("testbed/plain"),
    "long name then pax path": long_name(tarfile.GNUTYPE_LONGNAME, b"testbed/long")
    + pax_header(pax_record(b"path", b"testbed/second"))
    + plain("testbed/plain"),
    "pax path then long name": pax_header(pax_record(b"path", b"testbed/second"))
    + long_name(tarfile.GNUTYPE_LONGNAME, b"testbed/long")
    + plain("testbed/plain"),
    "two long link names": long_name(tarfile.GNUTYPE_LONGLINK, b"first")
    + long_name(tarfile.GNUTYPE_LONGLINK, b"second")
    + plain("testbed/link", kind=tarfile.SYMTYPE),
}


def mtimes(root: Path) -> dict[str, int]:
    return {
        os.path.relpath(os.path.join(folder, name), root): os.lstat(
            os.path.join(folder, name)
        ).st_mtime_ns
        for folder, dirs, files in os.walk(root)
        for name in dirs + files
    }


@pytest.mark.parametrize("case", list(REPEATED))
def test_repeated_extended_headers_the_last_wins_as_in_gnu_tar(
    extract: Extract, tmp_path: Path, dest: Path, case: str
) -> None:
    data = build(dirm("testbed"), end=False) + REPEATED[case] + END
    expected = gnu_extracted(data, tmp_path / "gnu")
    extract(data, dest)
    assert listing(dest) == listing(expected)
    assert mtimes(dest) == mtimes(expected)
    assert set(listing(dest)) <= {"second", "link"}
    assert listing(dest).get("link", "link:second") == "link:second"


def test_global_pax_headers_are_skipped_as_docker_does(extract: Extract, dest: Path) -> None:
    records = pax_record(b"mtime", b"1700000000") + pax_record(b"path", b"testbed/elsewhere")
    header = tarfile.TarInfo("././@PaxGlobal")
    header.type, header.size = tarfile.XGLTYPE, len(records)
    glob = header.tobuf(tarfile.USTAR_FORMAT) + padded(records)
    data = build(dirm("testbed"), end=False) + glob + plain("testbed/a", b"a") + END
    extract(data, dest)
    assert listing(dest) == {"a": "a"}
    assert os.stat(dest / "a").st_mtime_ns == MTIME * NS


def test_a_malformed_global_header_is_rejected(extract: Extract, sandbox: Path) -> None:
    header = tarfile.TarInfo("././@PaxGlobal")
    header.type, header.size = tarfile.XGLTYPE, 9
    glob = header.tobuf(tarfile.USTAR_FORMAT) + padded(b"99 junk=\n")
    data = build(dirm("testbed"), end=False) + glob + plain("testbed/a", b"a") + END
    assert_rejected(extract, sandbox, data, UnsafeArchive, "malformed pax record")


def test_extended_attributes_are_dropped_capabilities_with_a_warning(
    extract: Extract, dest: Path
) -> None:
    info = tarfile.TarInfo("testbed/tool")
    info.size, info.mode, info.mtime = 1, 0o755, MTIME
    info.pax_headers = {
        "SCHILY.xattr.user.origin": "image",
        "SCHILY.xattr.security.capability": "\x01\x00\x00\x02",
    }
    result = extract(build(dirm("testbed"), (info, b"t")), dest)
    assert os.listxattr(dest / "tool") == []
    assert result.warnings == ("testbed/tool: dropped its file capabilities (security.capability)",)


def test_a_truncated_sparse_member_leaves_no_partial_file(extract: Extract, dest: Path) -> None:
    member = sparse_member([(0, 3000), (1 << 20, 3000)], 2 << 20, b"d" * 6000)
    data = build(dirm("testbed"), end=False) + member
    with pytest.raises(TruncatedArchive, match="inside the data of 'testbed/s'"):
        extract(data[: len(data) - 3000], dest)
    assert listing(dest) == {}
