"""extract.py: fidelity with `docker cp`, hostile archives, the member writer's errors."""

from __future__ import annotations

import errno
import functools
import io
import os
import random
import tarfile
import tracemalloc
from pathlib import Path
from typing import BinaryIO, cast

import anyio
import pytest

from asynccache.errors import DiskFull, TruncatedArchive, UnsafeArchive
from asynccache.tree.digest import tree_stats
from asynccache.tree.extract import extract_stream, extract_tar
from tests.support.tars import (
    END,
    MTIME,
    NS,
    Extract,
    Trickle,
    assert_rejected,
    build,
    chunked,
    dirm,
    fix_checksum,
    hard,
    mode_of,
    padded,
    pax_record,
    raw_pax_member,
    reg,
    snapshot,
    special,
    sym,
)


def test_normal_tree_is_reproduced(extract: Extract, dest: Path) -> None:
    big = random.Random(1).randbytes(3 * 1024 * 1024 + 17)
    long_name = "testbed/" + "/".join(["d" * 80] * 3) + "/long.txt"
    unicode_name = "testbed/dir with space/ünïcödé ✓.txt"
    data = build(
        dirm("testbed"),
        dirm("testbed/src", mtime=MTIME + 2),
        reg("testbed/src/main.py", b"print('hi')\n", 0o644, MTIME + 3),
        reg("testbed/run.sh", b"#!/bin/sh\necho hi\n", 0o755, MTIME + 4),
        reg("testbed/secret.key", b"k", 0o600),
        reg("testbed/readonly.txt", b"r", 0o444),
        reg("testbed/empty.txt"),
        dirm("testbed/empty_dir", 0o750, MTIME + 5),
        sym("testbed/python", "/usr/bin/python3", MTIME + 6),
        sym("testbed/src/run_link", "../run.sh"),
        sym("testbed/dangling", "does/not/exist"),
        hard("testbed/src/main_copy.py", "testbed/src/main.py"),
        reg(unicode_name, "héllo".encode()),
        reg(long_name, b"long"),
        reg("testbed/big.bin", big, 0o644, MTIME + 7),
    )
    result = extract(data, dest)

    assert (dest / "src" / "main.py").read_bytes() == b"print('hi')\n"
    assert (dest / "run.sh").read_bytes() == b"#!/bin/sh\necho hi\n"
    assert (dest / "big.bin").read_bytes() == big
    assert (dest / "dir with space" / "ünïcödé ✓.txt").read_text() == "héllo"
    assert (dest / long_name.removeprefix("testbed/")).read_bytes() == b"long"
    assert (dest / "empty.txt").read_bytes() == b""
    assert mode_of(dest / "run.sh") == 0o755
    assert mode_of(dest / "src" / "main.py") == 0o644
    assert mode_of(dest / "secret.key") == 0o600
    assert mode_of(dest / "readonly.txt") == 0o444
    assert mode_of(dest / "empty_dir") == 0o750
    assert mode_of(dest / "dir with space") == 0o755
    assert list((dest / "empty_dir").iterdir()) == []
    assert os.stat(dest / "src" / "main.py").st_mtime_ns == (MTIME + 3) * NS
    assert os.stat(dest / "big.bin").st_mtime_ns == (MTIME + 7) * NS
    assert os.stat(dest / "src").st_mtime_ns == (MTIME + 2) * NS
    assert os.stat(dest / "empty_dir").st_mtime_ns == (MTIME + 5) * NS
    assert os.readlink(dest / "python") == "/usr/bin/python3"
    assert os.lstat(dest / "python").st_mtime_ns == (MTIME + 6) * NS
    assert os.readlink(dest / "src" / "run_link") == "../run.sh"
    assert os.readlink(dest / "dangling") == "does/not/exist"
    original, copy = os.stat(dest / "src" / "main.py"), os.stat(dest / "src" / "main_copy.py")
    assert original.st_ino == copy.st_ino
    assert original.st_nlink == 2
    assert result.file_count == 9
    assert result.size_bytes == 12 + 18 + 1 + 1 + 0 + 12 + len("héllo".encode()) + 4 + len(big)
    assert (result.file_count, result.size_bytes) == tree_stats(dest)
    assert result.warnings == ()


def test_root_member_mode_and_mtime_apply_to_dest(extract: Extract, dest: Path) -> None:
    data = build(dirm("testbed/", 0o750, MTIME + 9), reg("testbed/a.txt", b"a"))
    extract(data, dest)
    assert mode_of(dest) == 0o750
    assert os.stat(dest).st_mtime_ns == (MTIME + 9) * NS
    assert (dest / "a.txt").read_bytes() == b"a"


def test_read_only_directory_keeps_its_children(extract: Extract, dest: Path) -> None:
    data = build(
        dirm("testbed"),
        dirm("testbed/ro", 0o555),
        dirm("testbed/ro/locked", 0o500),
        reg("testbed/ro/locked/f.txt", b"f"),
        reg("testbed/ro/g.txt", b"g"),
    )
    extract(data, dest)
    assert mode_of(dest / "ro") == 0o555
    assert mode_of(dest / "ro" / "locked") == 0o500
    assert (dest / "ro" / "locked" / "f.txt").read_bytes() == b"f"
    assert (dest / "ro" / "g.txt").read_bytes() == b"g"
    os.chmod(dest / "ro" / "locked", 0o700)
    os.chmod(dest / "ro", 0o700)


def test_directory_mtime_survives_later_children(extract: Extract, dest: Path) -> None:
    data = build(
        dirm("testbed"),
        dirm("testbed/a", mtime=MTIME + 1),
        dirm("testbed/a/b", mtime=MTIME + 2),
        reg("testbed/a/b/c.txt", b"c", mtime=MTIME + 3),
        reg("testbed/a/d.txt", b"d", mtime=MTIME + 4),
    )
    extract(data, dest)
    assert os.stat(dest / "a").st_mtime_ns == (MTIME + 1) * NS
    assert os.stat(dest / "a" / "b").st_mtime_ns == (MTIME + 2) * NS
    assert os.stat(dest / "a" / "b" / "c.txt").st_mtime_ns == (MTIME + 3) * NS


def test_modes_survive_a_restrictive_umask(extract: Extract, dest: Path) -> None:
    data = build(
        dirm("testbed"),
        dirm("testbed/shared", 0o775),
        reg("testbed/shared/open.txt", b"o", 0o664),
        reg("testbed/tool", b"t", 0o755),
    )
    previous = os.umask(0o077)
    try:
        extract(data, dest)
    finally:
        os.umask(previous)
    assert mode_of(dest / "shared") == 0o775
    assert mode_of(dest / "shared" / "open.txt") == 0o664
    assert mode_of(dest / "tool") == 0o755


def test_nothing_is_left_writable_by_others(extract: Extract, dest: Path) -> None:
    data = build(
        dirm("testbed", 0o777),
        dirm("testbed/shared", 0o777),
        reg("testbed/shared/open.txt", b"o", 0o666),
        reg("testbed/shared/big.bin", b"b" * (2 << 20), 0o646),
        reg("testbed/tool", b"t", 0o757),
        dirm("testbed/kept", 0o755),
        sym("testbed/link", "tool"),
    )
    previous = os.umask(0)
    try:
        result = extract(data, dest)
    finally:
        os.umask(previous)
    assert mode_of(dest) == 0o775
    assert mode_of(dest / "shared") == 0o775
    assert mode_of(dest / "shared" / "open.txt") == 0o664
    assert mode_of(dest / "shared" / "big.bin") == 0o644
    assert mode_of(dest / "tool") == 0o755
    assert mode_of(dest / "kept") == 0o755
    assert result.warnings == (
        "dropped write permission for others from 5 members "
        "(testbed, testbed/shared, testbed/shared/open.txt, ...)",
    )


def test_undecodable_pax_name_round_trips(extract: Extract, dest: Path) -> None:
    name = "testbed/bad\udcff name.txt"
    extract(build(dirm("testbed"), reg(name, b"x")), dest)
    assert b"bad\xff name.txt" in os.listdir(os.fsencode(dest))
    assert (dest / "bad\udcff name.txt").read_bytes() == b"x"


def test_raw_bytes_pax_path_round_trips(extract: Extract, dest: Path) -> None:
    records = pax_record(b"path", b"testbed/caf\xe9 \xff.txt")
    data = build(dirm("testbed"), end=False)
    data += raw_pax_member(records, reg("placeholder", b"raw")) + END
    extract(data, dest)
    assert os.listdir(os.fsencode(dest)) == [b"caf\xe9 \xff.txt"]


def test_gnu_long_names_and_undecodable_bytes(extract: Extract, dest: Path) -> None:
    long_name = "testbed/" + "x" * 150 + "/f\udce9.txt"
    long_target = "../" + "t" * 200
    data = build(
        dirm("testbed"),
        reg(long_name, b"gnu"),
        sym("testbed/long_link", long_target),
        fmt=tarfile.GNU_FORMAT,
    )
    result = extract(data, dest)
    assert (dest / ("x" * 150) / "f\udce9.txt").read_bytes() == b"gnu"
    assert os.readlink(dest / "long_link") == long_target
    assert result.file_count == 1


def test_same_file_twice_later_wins(extract: Extract, dest: Path) -> None:
    data = build(
        dirm("testbed"),
        reg("testbed/a.txt", b"first version", 0o644),
        reg("testbed/a.txt", b"second", 0o755),
    )
    result = extract(data, dest)
    assert (dest / "a.txt").read_bytes() == b"second"
    assert mode_of(dest / "a.txt") == 0o755
    assert (result.file_count, result.size_bytes) == (1, 6) == tree_stats(dest)


def test_file_replaced_by_directory(extract: Extract, dest: Path) -> None:
    data = build(
        dirm("testbed"),
        reg("testbed/x", b"file"),
        dirm("testbed/x", 0o700),
        reg("testbed/x/inner.txt", b"in"),
    )
    result = extract(data, dest)
    assert mode_of(dest / "x") == 0o700
    assert (dest / "x" / "inner.txt").read_bytes() == b"in"
    assert (result.file_count, result.size_bytes) == (1, 2) == tree_stats(dest)


def test_directory_replaced_by_file(extract: Extract, dest: Path) -> None:
    data = build(
        dirm("testbed"),
        dirm("testbed/x"),
        dirm("testbed/x/sub"),
        reg("testbed/x/sub/f.txt", b"ffff"),
        reg("testbed/x", b"now a file"),
    )
    result = extract(data, dest)
    assert (dest / "x").read_bytes() == b"now a file"
    assert (result.file_count, result.size_bytes) == (1, 10) == tree_stats(dest)


def test_directory_replaced_by_symlink(extract: Extract, sandbox: Path) -> None:
    dest = sandbox / "dest"
    victim = sandbox / "victim"
    data = build(
        dirm("testbed"),
        dirm("testbed/x"),
        reg("testbed/x/f.txt", b"ffff"),
        sym("testbed/x", str(victim)),
    )
    before = snapshot(sandbox)
    result = extract(data, dest)
    assert snapshot(sandbox) == before
    assert os.readlink(dest / "x") == str(victim)
    assert (result.file_count, result.size_bytes) == (0, 0) == tree_stats(dest)


def test_directory_twice_keeps_content_and_later_attributes(extract: Extract, dest: Path) -> None:
    data = build(
        dirm("testbed"),
        dirm("testbed/x", 0o755, MTIME + 1),
        reg("testbed/x/f.txt", b"f"),
        dirm("testbed/x", 0o700, MTIME + 2),
    )
    extract(data, dest)
    assert (dest / "x" / "f.txt").read_bytes() == b"f"
    assert mode_of(dest / "x") == 0o700
    assert os.stat(dest / "x").st_mtime_ns == (MTIME + 2) * NS


def test_symlink_replaced_by_file_is_not_written_through(extract: Extract, sandbox: Path) -> None:
    dest = sandbox / "dest"
    secret = sandbox / "victim" / "secret.txt"
    data = build(dirm("testbed"), sym("testbed/s", str(secret)), reg("testbed/s", b"pwned"))
    before = snapshot(sandbox)
    extract(data, dest)
    assert snapshot(sandbox) == before
    assert not os.path.islink(dest / "s")
    assert (dest / "s").read_bytes() == b"pwned"


def test_symlink_replaced_by_directory(extract: Extract, sandbox: Path) -> None:
    dest = sandbox / "dest"
    data = build(
        dirm("testbed"),
        sym("testbed/d", str(sandbox / "victim")),
        dirm("testbed/d"),
        reg("testbed/d/new.txt", b"new"),
    )
    before = snapshot(sandbox)
    extract(data, dest)
    assert snapshot(sandbox) == before
    assert (dest / "d" / "new.txt").read_bytes() == b"new"
    assert not os.path.islink(dest / "d")


def test_hardlink_keeps_old_content_when_its_source_is_replaced(
    extract: Extract, dest: Path
) -> None:
    data = build(
        dirm("testbed"),
        reg("testbed/a", b"old"),
        hard("testbed/b", "testbed/a"),
        reg("testbed/a", b"newer"),
    )
    result = extract(data, dest)
    assert (dest / "a").read_bytes() == b"newer"
    assert (dest / "b").read_bytes() == b"old"
    assert (result.file_count, result.size_bytes) == (2, 8) == tree_stats(dest)


def test_implicit_parent_directories_are_created(extract: Extract, dest: Path) -> None:
    result = extract(build(reg("testbed/a/b/c.txt", b"c")), dest)
    assert (dest / "a" / "b" / "c.txt").read_bytes() == b"c"
    assert mode_of(dest / "a") == 0o755
    assert result.file_count == 1


def test_dot_slash_prefix_is_accepted(extract: Extract, dest: Path) -> None:
    extract(build(dirm("./testbed"), reg("./testbed/./a.txt", b"a")), dest)
    assert (dest / "a.txt").read_bytes() == b"a"


def test_custom_root(dest: Path) -> None:
    data = build(dirm("src"), reg("src/a.txt", b"a"))
    extract_tar(io.BytesIO(data), dest, root="src")
    assert (dest / "a.txt").read_bytes() == b"a"


MIB = 1 << 20


BOUNDARY_SIZES = [0, 1, 511, 512, 513, 10239, 10240, 10241, MIB - 1, MIB, MIB + 1, 3 * MIB - 5]


def boundary_archive() -> tuple[bytes, dict[str, bytes]]:
    rng = random.Random(3)
    files = {f"f{size}": rng.randbytes(size) for size in BOUNDARY_SIZES}
    members = [reg(f"testbed/{name}", content) for name, content in files.items()]
    return build(dirm("testbed"), *members), files


def assert_files(dest: Path, files: dict[str, bytes]) -> None:
    assert sorted(os.listdir(dest)) == sorted(files)
    for name, content in files.items():
        assert (dest / name).read_bytes() == content, name


@pytest.mark.parametrize("step", [509, 10240, 65536, 3 << 20])
def test_data_survives_any_read_size(dest: Path, step: int) -> None:
    data, files = boundary_archive()
    result = extract_tar(cast(BinaryIO, Trickle(data, step)), dest)
    assert_files(dest, files)
    assert result.size_bytes == sum(map(len, files.values()))


@pytest.mark.parametrize("size", [509, 10240, 65536, 3 << 20])
def test_data_survives_any_chunk_size(dest: Path, size: int) -> None:
    data, files = boundary_archive()
    anyio.run(functools.partial(extract_stream, chunked(data, size), dest))
    assert_files(dest, files)


def test_source_returning_more_than_asked_is_handled(dest: Path) -> None:
    data, files = boundary_archive()

    class Greedy(Trickle):
        def read(self, size: int = -1) -> bytes:
            return super().read(2 * size + 7)

    extract_tar(cast(BinaryIO, Greedy(data, 1 << 30)), dest)
    assert_files(dest, files)


def test_many_tiny_members(extract: Extract, fast_dest: Path) -> None:
    members = [dirm("testbed")]
    members += [dirm(f"testbed/d{index}") for index in range(50)]
    members += [reg(f"testbed/d{index % 50}/f{index}") for index in range(50_000)]
    result = extract(build(*members, fmt=tarfile.USTAR_FORMAT), fast_dest)
    assert result.file_count == 50_000
    assert result.size_bytes == 0
    assert tree_stats(fast_dest) == (50_000, 0)


def test_memory_does_not_grow_with_member_count(fast_dest: Path) -> None:
    members = [dirm("testbed")] + [reg(f"testbed/f{index}", b"x") for index in range(20_000)]
    data = build(*members, fmt=tarfile.USTAR_FORMAT)
    tracemalloc.start()
    try:
        result = extract_tar(cast(BinaryIO, Trickle(data, 65536)), fast_dest)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.file_count == 20_000
    assert peak < 1024 * 1024


def test_root_member_must_be_a_directory(extract: Extract, sandbox: Path) -> None:
    data = build(sym("testbed", str(sandbox / "victim")), reg("testbed/pwned.txt", b"x"))
    assert_rejected(extract, sandbox, data, UnsafeArchive, "root member must be a directory")


def test_write_through_symlink_to_absolute_dir_is_rejected(extract: Extract, sandbox: Path) -> None:
    data = build(
        dirm("testbed"),
        sym("testbed/etc", str(sandbox / "victim")),
        reg("testbed/etc/secret.txt", b"pwned"),
    )
    assert_rejected(extract, sandbox, data, UnsafeArchive, "'etc' is a symlink")


def test_write_through_symlink_to_dotdot_is_rejected(extract: Extract, sandbox: Path) -> None:
    data = build(
        dirm("testbed"),
        sym("testbed/up", ".."),
        reg("testbed/up/victim/pwned.txt", b"pwned"),
    )
    assert_rejected(extract, sandbox, data, UnsafeArchive, "'up' is a symlink")


def test_directory_through_symlink_is_rejected(extract: Extract, sandbox: Path) -> None:
    data = build(
        dirm("testbed"),
        sym("testbed/up", ".."),
        dirm("testbed/up/victim/newdir"),
    )
    assert_rejected(extract, sandbox, data, UnsafeArchive, "is a symlink")


def test_write_through_symlink_chain_is_rejected(extract: Extract, sandbox: Path) -> None:
    data = build(
        dirm("testbed"),
        dirm("testbed/sub"),
        sym("testbed/sub/b", str(sandbox / "victim")),
        sym("testbed/a", "sub/b"),
        reg("testbed/a/secret.txt", b"pwned"),
    )
    assert_rejected(extract, sandbox, data, UnsafeArchive, "'a' is a symlink")


def test_write_through_symlinked_deep_parent_is_rejected(extract: Extract, sandbox: Path) -> None:
    data = build(
        dirm("testbed"),
        sym("testbed/link", str(sandbox)),
        reg("testbed/link/victim/deeper/pwned.txt", b"pwned"),
    )
    assert_rejected(extract, sandbox, data, UnsafeArchive, "'link' is a symlink")


def test_file_under_a_regular_file_is_rejected(extract: Extract, sandbox: Path) -> None:
    data = build(dirm("testbed"), reg("testbed/f", b"f"), reg("testbed/f/g", b"g"))
    assert_rejected(extract, sandbox, data, UnsafeArchive, "'f' is a regular file")


@pytest.mark.parametrize(
    "target",
    ["/etc/passwd", "SANDBOX/victim/secret.txt", "testbed/../victim/secret.txt", "victim/x"],
)
def test_hardlink_to_outside_is_rejected(extract: Extract, sandbox: Path, target: str) -> None:
    target = target.replace("SANDBOX", str(sandbox))
    data = build(dirm("testbed"), hard("testbed/link", target))
    assert_rejected(extract, sandbox, data, UnsafeArchive, "hardlink target")


def test_hardlink_to_symlink_is_rejected(extract: Extract, sandbox: Path) -> None:
    data = build(
        dirm("testbed"),
        sym("testbed/s", str(sandbox / "victim" / "secret.txt")),
        hard("testbed/link", "testbed/s"),
    )
    assert_rejected(extract, sandbox, data, UnsafeArchive, "is a symlink, not a regular file")


def test_hardlink_through_symlinked_parent_is_rejected(extract: Extract, sandbox: Path) -> None:
    data = build(
        dirm("testbed"),
        sym("testbed/v", str(sandbox / "victim")),
        hard("testbed/link", "testbed/v/secret.txt"),
    )
    assert_rejected(extract, sandbox, data, UnsafeArchive, "not an extracted file")


def test_hardlink_to_member_not_yet_extracted_is_rejected(extract: Extract, sandbox: Path) -> None:
    data = build(
        dirm("testbed"),
        hard("testbed/link", "testbed/later.txt"),
        reg("testbed/later.txt", b"later"),
    )
    assert_rejected(extract, sandbox, data, UnsafeArchive, "not extracted yet")


def test_hardlink_to_directory_is_rejected(extract: Extract, sandbox: Path) -> None:
    data = build(dirm("testbed"), dirm("testbed/d"), hard("testbed/link", "testbed/d"))
    assert_rejected(extract, sandbox, data, UnsafeArchive, "is a directory")


def test_hardlink_to_root_is_rejected(extract: Extract, sandbox: Path) -> None:
    data = build(dirm("testbed"), hard("testbed/link", "testbed"))
    assert_rejected(extract, sandbox, data, UnsafeArchive, "root folder")


def test_device_and_fifo_members_are_skipped_with_warnings(extract: Extract, sandbox: Path) -> None:
    dest = sandbox / "dest"
    data = build(
        dirm("testbed"),
        special("testbed/null", tarfile.CHRTYPE),
        special("testbed/disk", tarfile.BLKTYPE),
        special("testbed/pipe", tarfile.FIFOTYPE),
        reg("testbed/after.txt", b"after"),
    )
    before = snapshot(sandbox)
    result = extract(data, dest)
    assert snapshot(sandbox) == before
    assert sorted(os.listdir(dest)) == ["after.txt"]
    assert result.warnings == (
        "testbed/null: skipped character device",
        "testbed/disk: skipped block device",
        "testbed/pipe: skipped FIFO",
    )


def test_unknown_member_type_is_skipped_with_warning(extract: Extract, dest: Path) -> None:
    odd, _ = reg("testbed/odd", b"")
    odd.type, odd.size = b"Z", 700
    data = build(dirm("testbed"), end=False)
    data += odd.tobuf(tarfile.USTAR_FORMAT) + padded(b"?" * 700)
    data += build(reg("testbed/after.txt", b"after"))
    result = extract(data, dest)
    assert os.listdir(dest) == ["after.txt"]
    assert (dest / "after.txt").read_bytes() == b"after"
    assert result.warnings == ("testbed/odd: skipped member of unknown type b'Z'",)


def test_setuid_setgid_sticky_bits_are_dropped_with_warnings(extract: Extract, dest: Path) -> None:
    data = build(
        dirm("testbed"),
        reg("testbed/suid", b"s", 0o4755),
        reg("testbed/sgid", b"g", 0o2750),
        dirm("testbed/tmp", 0o1775),
    )
    result = extract(data, dest)
    assert mode_of(dest / "suid") == 0o755
    assert mode_of(dest / "sgid") == 0o750
    assert mode_of(dest / "tmp") == 0o775
    assert len(result.warnings) == 3
    assert all("dropped setuid/setgid/sticky" in warning for warning in result.warnings)


def test_warnings_are_capped(dest: Path) -> None:
    members = [dirm("testbed")] + [special(f"testbed/p{i}", tarfile.FIFOTYPE) for i in range(150)]
    result = extract_tar(io.BytesIO(build(*members)), dest)
    assert len(result.warnings) == 101
    assert result.warnings[-1] == "50 more warnings not shown"


def test_truncated_inside_member_data(extract: Extract, sandbox: Path) -> None:
    data = build(dirm("testbed"), reg("testbed/big", b"b" * 20_000))
    assert_rejected(extract, sandbox, data[: 1536 + 5000], TruncatedArchive, "inside the data")


@pytest.mark.parametrize("size", [100, 3 * 1024 * 1024])
def test_truncation_leaves_no_partial_file(extract: Extract, dest: Path, size: int) -> None:
    # small files are written once their data is read, large ones as it arrives
    data = build(dirm("testbed"), reg("testbed/done", b"d"), reg("testbed/cut", b"c" * size))
    with pytest.raises(TruncatedArchive, match="inside the data of 'testbed/cut'"):
        extract(data[: 1536 + 512 + size // 2], dest)
    assert not (dest / "cut").exists()


def test_truncated_inside_member_padding(extract: Extract, sandbox: Path) -> None:
    data = build(dirm("testbed"), reg("testbed/a", b"abc"), fmt=tarfile.USTAR_FORMAT)
    assert_rejected(extract, sandbox, data[: 1024 + 100], TruncatedArchive, "ended")


def test_truncated_at_header_boundary_without_end_marker(extract: Extract, sandbox: Path) -> None:
    data = build(dirm("testbed"), reg("testbed/a.txt", b"a"), end=False)
    assert_rejected(extract, sandbox, data, TruncatedArchive, "end-of-archive marker")


def test_truncated_inside_a_header(extract: Extract, sandbox: Path) -> None:
    data = build(dirm("testbed"), reg("testbed/a.txt", b"a"), fmt=tarfile.USTAR_FORMAT)
    assert_rejected(extract, sandbox, data[: 512 + 300], TruncatedArchive, "inside a member header")


def test_empty_stream_is_truncated(extract: Extract, sandbox: Path) -> None:
    assert_rejected(extract, sandbox, b"", TruncatedArchive, "end-of-archive marker")


def test_bad_checksum_is_rejected(extract: Extract, sandbox: Path) -> None:
    data = bytearray(build(dirm("testbed"), reg("testbed/a.txt", b"a"), fmt=tarfile.USTAR_FORMAT))
    data[512 + 10] ^= 0x01
    assert_rejected(extract, sandbox, bytes(data), UnsafeArchive, "bad checksum")


def test_non_numeric_size_is_rejected(extract: Extract, sandbox: Path) -> None:
    data = bytearray(build(dirm("testbed"), reg("testbed/a.txt", b"a"), fmt=tarfile.USTAR_FORMAT))
    data[512 + 124 : 512 + 136] = b"zzzzzzzzzzz\0"
    fix_checksum(data, 512)
    assert_rejected(extract, sandbox, bytes(data), UnsafeArchive, "invalid header")


def test_negative_size_is_rejected(extract: Extract, sandbox: Path) -> None:
    data = bytearray(build(dirm("testbed"), reg("testbed/a.txt", b"a"), fmt=tarfile.USTAR_FORMAT))
    data[512 + 124 : 512 + 136] = b"\xff" * 12
    fix_checksum(data, 512)
    assert_rejected(extract, sandbox, bytes(data), UnsafeArchive, "negative size")


def test_size_beyond_the_stream_is_truncated(extract: Extract, sandbox: Path) -> None:
    data = bytearray(build(dirm("testbed"), reg("testbed/a.txt", b"a"), fmt=tarfile.USTAR_FORMAT))
    data[512 + 124 : 512 + 136] = b"77777777777\0"
    fix_checksum(data, 512)
    assert_rejected(extract, sandbox, bytes(data), TruncatedArchive, "inside the data")


def test_negative_pax_size_is_rejected(extract: Extract, sandbox: Path) -> None:
    records = pax_record(b"size", b"-5")
    data = build(dirm("testbed"), end=False) + raw_pax_member(records, reg("testbed/a")) + END
    assert_rejected(extract, sandbox, data, UnsafeArchive, "negative size")


def test_out_of_range_mtime_is_left_unset_with_warning(extract: Extract, dest: Path) -> None:
    records = pax_record(b"mtime", b"1" + b"0" * 30)
    data = build(dirm("testbed"), end=False)
    data += raw_pax_member(records, reg("testbed/a.txt", b"a")) + END
    result = extract(data, dest)
    assert (dest / "a.txt").read_bytes() == b"a"
    assert result.warnings == (f"testbed/a.txt: mtime {10**30} out of range, left unset",)


@pytest.mark.parametrize(
    ("seconds", "kept"), [(2**63 // NS - 1, True), (2**63 // NS, True), (2**63 // NS + 1, False)]
)
def test_an_mtime_is_kept_while_its_nanoseconds_fit_in_64_bits(
    extract: Extract, dest: Path, seconds: int, kept: bool
) -> None:
    records = pax_record(b"mtime", b"%d" % seconds)
    data = build(dirm("testbed"), end=False)
    data += raw_pax_member(records, reg("testbed/a.txt", b"a")) + END
    result = extract(data, dest)
    if kept:
        assert os.stat(dest / "a.txt").st_mtime_ns == seconds * NS
        assert result.warnings == ()
    else:
        assert result.warnings == (f"testbed/a.txt: mtime {seconds} out of range, left unset",)


@pytest.mark.parametrize("value", [b"1e30", b"", b"12x", b"0x10", b"1.5.2", b"-", b" 12", b".5"])
def test_a_malformed_pax_mtime_is_rejected(extract: Extract, sandbox: Path, value: bytes) -> None:
    # as GNU tar and Go's archive/tar: never read as 0 (the epoch) and extracted anyway
    records = pax_record(b"mtime", value)
    data = build(dirm("testbed"), end=False)
    data += raw_pax_member(records, reg("testbed/a.txt", b"a")) + END
    assert_rejected(extract, sandbox, data, UnsafeArchive, "malformed pax mtime")


@pytest.mark.parametrize(
    ("value", "ns"),
    [(b"1600000000", MTIME * NS), (b"1600000000.5", MTIME * NS + NS // 2), (b"-1.5", -3 * NS // 2)],
)
def test_pax_mtimes_with_fractions(extract: Extract, dest: Path, value: bytes, ns: int) -> None:
    records = pax_record(b"mtime", value)
    data = build(dirm("testbed"), end=False)
    data += raw_pax_member(records, reg("testbed/a.txt", b"a")) + END
    extract(data, dest)
    assert os.stat(dest / "a.txt").st_mtime_ns == ns


@pytest.mark.parametrize("key", [b"size", b"uid", b"gid", b"atime"])
def test_other_malformed_pax_numbers_are_rejected(
    extract: Extract, sandbox: Path, key: bytes
) -> None:
    records = pax_record(key, b"12abc")
    data = build(dirm("testbed"), end=False)
    data += raw_pax_member(records, reg("testbed/a.txt", b"a")) + END
    assert_rejected(extract, sandbox, data, UnsafeArchive, f"malformed pax {key.decode()}")


@pytest.mark.parametrize(
    "records",
    [b"5 a=b\n", b"12 path=abc", b"9 =value\n", b"x path=a\n", b"99 path=a\n", b"6 novalue\n"],
)
def test_malformed_pax_records_are_rejected(
    extract: Extract, sandbox: Path, records: bytes
) -> None:
    data = build(dirm("testbed"), end=False)
    data += raw_pax_member(records, reg("testbed/a.txt", b"a")) + END
    assert_rejected(extract, sandbox, data, UnsafeArchive, "malformed pax record")


def test_oversized_pax_header_is_rejected(extract: Extract, sandbox: Path) -> None:
    header = tarfile.TarInfo("././@PaxHeader")
    header.type, header.size = tarfile.XHDTYPE, 100 * 1024 * 1024
    data = build(dirm("testbed"), end=False)
    data += header.tobuf(tarfile.USTAR_FORMAT) + b"1" * 200_000
    assert_rejected(extract, sandbox, data, UnsafeArchive, "member headers larger than")


def test_garbage_stream_is_rejected(extract: Extract, sandbox: Path) -> None:
    garbage = random.Random(7).randbytes(8192)
    assert_rejected(extract, sandbox, garbage, UnsafeArchive, "malformed tar header")


def test_metadata_header_followed_by_end_marker_is_rejected(
    extract: Extract, sandbox: Path
) -> None:
    header = tarfile.TarInfo("././@LongLink")
    header.type, header.size = tarfile.GNUTYPE_LONGNAME, 20
    data = build(dirm("testbed"), end=False)
    data += header.tobuf(tarfile.USTAR_FORMAT) + padded(b"testbed/long_name.txt") + END
    assert_rejected(extract, sandbox, data, UnsafeArchive, "extended header without")


def test_disk_full_is_reported(
    extract: Extract, dest: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", no_space)
    monkeypatch.setattr(os, "writev", no_space)
    with pytest.raises(DiskFull, match=str(dest)):
        extract(build(dirm("testbed"), reg("testbed/a.txt", b"abc")), dest)


def test_stream_errors_propagate_unchanged(dest: Path) -> None:
    class Broken:
        def read(self, size: int) -> bytes:
            raise ConnectionResetError("peer went away")

    with pytest.raises(ConnectionResetError, match="peer went away"):
        extract_tar(cast(BinaryIO, Broken()), dest)
