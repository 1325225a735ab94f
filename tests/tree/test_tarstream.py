"""The tar stream reader gives the members and data that tarfile's own stream parser gives.

Except where tarfile differs from GNU tar and Go's archive/tar (global pax headers, old GNU
headers, repeated extended headers, malformed pax numbers, sparse members): see
test_tar_fidelity.py.
"""

from __future__ import annotations

import functools
import io
import random
import tarfile
from collections.abc import Callable

import pytest

import asynccache.tree.tarstream as tarstream
from asynccache.errors import TruncatedArchive, UnsafeArchive
from asynccache.tree.tar_headers import byte_sum, plain_header
from asynccache.tree.tarstream import HEADER_BUDGET, Source, Truncated, members
from tests.support.tars import MTIME, lines_run, pax_record

FIELDS = (
    "name",
    "type",
    "size",
    "mode",
    "mtime",
    "uid",
    "gid",
    "uname",
    "gname",
    "linkname",
    "devmajor",
    "devminor",
    "offset",
    "offset_data",
    "pax_headers",
)
TYPES = (
    tarfile.REGTYPE,
    tarfile.AREGTYPE,
    tarfile.DIRTYPE,
    tarfile.SYMTYPE,
    tarfile.LNKTYPE,
    tarfile.CHRTYPE,
    tarfile.FIFOTYPE,
    b"Z",  # a type tarfile does not know: its data is skipped
)


def random_member(rng: random.Random, index: int) -> tuple[tarfile.TarInfo, bytes]:
    depth = rng.choice((1, 1, 2, 5, 40))
    name = "/".join(rng.choice(("d", "ü", "x" * 60, "sp ace")) for _ in range(depth))
    info = tarfile.TarInfo(f"testbed/{name}/{index}")
    info.type = rng.choice(TYPES)
    if info.type == tarfile.AREGTYPE and len(info.name) > 90:
        # a cut ustar name ending in "/" makes tarfile read it as a folder, its data as headers
        info.type = tarfile.REGTYPE
    info.mode = rng.choice((0o644, 0o755, 0o4755, 0o1777))
    info.mtime = rng.choice((0, 1_600_000_000, 2**33 + 5))
    info.uid = rng.choice((0, 1000, 2**22))
    info.uname = rng.choice(("", "root", "ü" * 40))
    data = b""
    if info.type in (tarfile.REGTYPE, tarfile.AREGTYPE, b"Z"):
        data = rng.randbytes(rng.choice((0, 1, 511, 512, 513, 70_000)))
        info.size = len(data)
    elif info.type in (tarfile.SYMTYPE, tarfile.LNKTYPE):
        info.linkname = rng.choice(("a", "../b", "ü/" * 60, "/abs/" + "y" * 120))
    elif info.type == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3
    if rng.random() < 0.2:
        info.pax_headers = {"comment": "x" * rng.randrange(1, 300)}
    return info, data


def random_archive(seed: int) -> bytes:
    rng = random.Random(seed)
    fmt = rng.choice((tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT))
    out = io.BytesIO()
    pax = {"comment": "global"} if fmt == tarfile.PAX_FORMAT and rng.random() < 0.3 else None
    with tarfile.open(fileobj=out, mode="w", format=fmt, pax_headers=pax, encoding="utf-8") as tar:
        for index in range(rng.randrange(1, 60)):
            info, data = random_member(rng, index)
            try:
                tar.addfile(info, io.BytesIO(data))
            except ValueError:  # a name or number the format cannot hold
                continue
    return out.getvalue()


def short_reads(data: bytes, rng: random.Random) -> Callable[[int], bytes]:
    """A read function that gives random short reads of data."""
    stream = io.BytesIO(data)
    return lambda size: stream.read(rng.randint(1, max(1, min(size, 5000))))


def collect(into: list[bytes], more: list[bytes], _size: int) -> None:
    into.extend(more)


def ours(data: bytes, rng: random.Random | None = None) -> list[tuple[object, ...]]:
    read: Callable[[int], bytes] = short_reads(data, rng) if rng else io.BytesIO(data).read
    found = []
    for reader, info in members(Source(read)):
        pieces: list[bytes] = []
        if info.isreg():
            reader.copy(info, functools.partial(collect, pieces))
        found.append((*(getattr(info, key) for key in FIELDS), b"".join(pieces)))
    return found


def theirs(data: bytes) -> list[tuple[object, ...]]:
    found = []
    with tarfile.open(
        fileobj=io.BytesIO(data), mode="r|", encoding="utf-8", errors="surrogateescape"
    ) as tar:
        for info in tar:
            content = b""
            if info.isreg():
                handle = tar.extractfile(info)
                assert handle is not None
                content = handle.read()
            fields = {key: getattr(info, key) for key in FIELDS}
            # Docker's extraction (and so ours) never applies a global pax header
            fields["pax_headers"] = {
                key: value
                for key, value in info.pax_headers.items()
                if (key, value) != ("comment", "global")
            }
            found.append((*fields.values(), content))
    return found


@pytest.mark.parametrize("seed", range(60))
def test_members_and_data_equal_tarfiles(seed: int) -> None:
    data = random_archive(seed)
    expected = theirs(data)
    assert ours(data) == expected
    assert ours(data, random.Random(seed)) == expected


def test_members_whose_data_is_not_read_are_skipped() -> None:
    data = random_archive(7)
    names = [info.name for _reader, info in members(Source(io.BytesIO(data).read))]
    assert names == [entry[0] for entry in theirs(data)]


def test_a_header_past_the_budget_is_malformed() -> None:
    info = tarfile.TarInfo("testbed/f")
    info.pax_headers = {"comment": "x" * (2 * HEADER_BUDGET)}
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(UnsafeArchive, match="member headers larger than"):
        list(members(Source(io.BytesIO(out.getvalue()).read)))


def test_data_cut_short_is_truncated() -> None:
    info = tarfile.TarInfo("testbed/f")
    info.size = 10_000
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(b"z" * 10_000))
    cut = out.getvalue()[: 512 + 4000]
    with pytest.raises(TruncatedArchive, match="inside the data of 'testbed/f'"):
        for reader, member in members(Source(io.BytesIO(cut).read)):
            reader.copy(member, lambda _more, _size: None)
    with pytest.raises(Truncated, match="before the header at byte"):
        list(members(Source(io.BytesIO(cut).read)))


HEADER_FIELDS = (
    "name", "mode", "uid", "gid", "size", "mtime", "chksum", "type",
    "linkname", "uname", "gname", "devmajor", "devminor",
)  # fmt: skip


def random_header(rng: random.Random) -> bytes:
    """One header block as tarfile writes it, sometimes with a few bytes changed."""
    depth = rng.randint(1, 6)
    name = "/".join(rng.choice(("testbed", "ä", "x" * 60, "a b", "d")) for _ in range(depth))
    info = tarfile.TarInfo(name + rng.choice(("", "/")))
    info.type = rng.choice(
        (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE)
    )
    info.linkname = rng.choice(("", "target", "../x"))
    info.mode = rng.choice((0o644, 0o755, 0o4755, 0o7777))
    info.size = rng.choice((0, 1, 4096, 8**11 - 1)) if info.type in tarfile.REGULAR_TYPES else 0
    info.mtime = rng.choice((0, MTIME, 8**11 - 1))
    info.uid = info.gid = rng.choice((0, 1000, 8**7 - 1))
    info.uname = rng.choice(("", "root", "ü"))
    fmt = rng.choice((tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT))
    try:
        block = info.tobuf(fmt, "utf-8", "surrogateescape")[-512:]
    except ValueError:  # a name too long for ustar
        block = info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")[-512:]
    data = bytearray(block)
    for _ in range(rng.choice((0, 0, 1, 3))):
        # NUL, space, tab, digits, 8, '_', '-', base-256 and UTF-8 lead bytes: what int() and
        # the fields' NUL and space trimming could read differently from tarfile
        data[rng.randrange(512)] = rng.choice(
            (0, 0x20, 0x09, 0x30, 0x37, 0x38, 0x5F, 0x2D, 0x80, 0xFF, 0xC3)
        )
    return bytes(data)


@pytest.mark.parametrize("seed", range(20))
def test_the_quick_header_parser_agrees_with_tarfile(seed: int) -> None:
    rng = random.Random(seed)
    quick = 0
    for _ in range(500):
        block = random_header(rng)
        ours = plain_header(tarfile.TarInfo, block, "utf-8", "surrogateescape")
        if ours is None:
            continue
        quick += 1
        theirs = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        if block[257:263] != b"ustar\0":  # only a POSIX header has a prefix (GNU tar, Go)
            name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            theirs.name = name.rstrip("/") if theirs.isdir() else name
        assert {key: getattr(ours, key) for key in HEADER_FIELDS} == {
            key: getattr(theirs, key) for key in HEADER_FIELDS
        }
    assert quick > 200  # most blocks take the quick path


@pytest.mark.parametrize("fill", [0x00, 0x7F, 0xFF])
def test_the_byte_sum_of_a_block_is_exact(fill: int) -> None:
    rng = random.Random(fill)
    for block in (bytes([fill]) * 512, bytes(rng.randrange(256) for _ in range(512))):
        assert byte_sum(block) == sum(block)


def globals_then_members(count: int) -> bytes:
    """count members, each after a global pax header with a key of its own."""
    out = io.BytesIO()
    for index in range(count):
        record = pax_record(f"x.key{index}".encode(), b"1")
        header = tarfile.TarInfo("././@PaxGlobal")
        header.type, header.size = tarfile.XGLTYPE, len(record)
        out.write(header.tobuf(tarfile.USTAR_FORMAT) + record.ljust(512, b"\0"))
        info = tarfile.TarInfo(f"testbed/f{index}")
        out.write(info.tobuf(tarfile.USTAR_FORMAT))
    out.write(b"\0" * 1024)
    return out.getvalue()


def test_many_global_headers_take_linear_work() -> None:
    def work(count: int) -> int:
        data = globals_then_members(count)
        found: list[str] = []

        def read_all() -> None:
            found.extend(info.name for _reader, info in members(Source(io.BytesIO(data).read)))

        lines = lines_run(read_all, tarstream, tarfile)
        assert found == [f"testbed/f{index}" for index in range(count)]
        return lines

    small, large = work(500), work(1500)
    # three times the headers, three times the work (nine times when every global header
    # was applied again to every later member)
    assert large < 3.5 * small


def test_a_global_header_keeps_the_quick_path_for_later_members() -> None:
    data = globals_then_members(3)
    infos = [info for _reader, info in members(Source(io.BytesIO(data).read))]
    assert [info.pax_headers for info in infos] == [{}, {}, {}]
