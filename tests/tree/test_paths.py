"""paths.py: member names and symlink targets that must not be extracted are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from asynccache.errors import UnsafeArchive
from asynccache.tree.paths import BadName, MemberPaths, Outside, link_target
from tests.support.tars import (
    END,
    Extract,
    assert_rejected,
    build,
    dirm,
    pax_record,
    raw_pax_member,
    reg,
    sym,
)


def test_absolute_name_is_rejected(extract: Extract, sandbox: Path) -> None:
    data = build(dirm("testbed"), reg(f"{sandbox}/victim/pwned.txt", b"x"))
    assert_rejected(extract, sandbox, data, UnsafeArchive, "absolute name")


def test_dotdot_traversal_is_rejected(extract: Extract, sandbox: Path) -> None:
    data = build(dirm("testbed"), reg("testbed/../victim/pwned.txt", b"x"))
    assert_rejected(extract, sandbox, data, UnsafeArchive, r"'\.\.' component")


def test_name_outside_root_is_rejected(extract: Extract, sandbox: Path) -> None:
    data = build(dirm("testbed"), reg("testbedx/a.txt", b"x"))
    assert_rejected(extract, sandbox, data, UnsafeArchive, "outside testbed/")


def test_sibling_folder_name_is_rejected(extract: Extract, sandbox: Path) -> None:
    data = build(reg("victim/pwned.txt", b"x"))
    assert_rejected(extract, sandbox, data, UnsafeArchive, "outside testbed/")


def test_empty_name_is_rejected(extract: Extract, sandbox: Path) -> None:
    data = build(dirm("testbed"), reg("", b"x"))
    assert_rejected(extract, sandbox, data, UnsafeArchive, "empty name")


def test_nul_in_name_is_rejected(extract: Extract, sandbox: Path) -> None:
    records = pax_record(b"path", b"testbed/a\x00/../../victim/pwned.txt")
    data = build(dirm("testbed"), end=False) + raw_pax_member(records, reg("p", b"x")) + END
    assert_rejected(extract, sandbox, data, UnsafeArchive, "NUL")


def test_overlong_component_is_rejected(extract: Extract, sandbox: Path) -> None:
    data = build(dirm("testbed"), reg("testbed/" + "a" * 5000, b"x"))
    assert_rejected(extract, sandbox, data, UnsafeArchive, "longer than 255 bytes")


def test_overlong_path_is_rejected(extract: Extract, sandbox: Path) -> None:
    name = "testbed/" + "/".join(["p" * 200] * 22) + "/f.txt"
    data = build(dirm("testbed"), reg(name, b"x"))
    assert_rejected(extract, sandbox, data, UnsafeArchive, "path longer than 4095 bytes")


def test_overlong_symlink_target_is_rejected(extract: Extract, sandbox: Path) -> None:
    data = build(dirm("testbed"), sym("testbed/s", "t/" * 2100))
    assert_rejected(extract, sandbox, data, UnsafeArchive, "symlink target longer")


def test_empty_symlink_target_is_rejected(extract: Extract, sandbox: Path) -> None:
    data = build(dirm("testbed"), sym("testbed/s", ""))
    assert_rejected(extract, sandbox, data, UnsafeArchive, "empty symlink target")


def test_nul_in_symlink_target_is_rejected(extract: Extract, sandbox: Path) -> None:
    records = pax_record(b"linkpath", b"ok\x00/../../victim")
    data = build(dirm("testbed"), end=False)
    data += raw_pax_member(records, sym("testbed/s", "placeholder")) + END
    assert_rejected(extract, sandbox, data, UnsafeArchive, "NUL byte in symlink target")


def test_member_names_map_to_paths_under_the_root(tmp_path: Path) -> None:
    paths = MemberPaths(tmp_path, "./testbed/")
    assert paths.relative("testbed") == b""
    assert paths.relative("./testbed/") == b""
    assert paths.relative("testbed//a/./b/") == b"a/b"
    assert paths.relative("testbed/d\udcff.txt") == b"d\xff.txt"
    with pytest.raises(Outside, match=r"outside \./testbed/"):
        paths.relative("etc/passwd")
    with pytest.raises(BadName, match=r"'\.\.' component"):
        paths.relative("testbed/a/../../etc")


@pytest.mark.parametrize("root", ["", ".", "/", "testbed/.."])
def test_a_root_must_name_a_folder(tmp_path: Path, root: str) -> None:
    with pytest.raises(ValueError, match="root must name a folder"):
        MemberPaths(tmp_path, root)


def test_symlink_targets_are_kept_verbatim() -> None:
    assert link_target("../../etc/passwd") == b"../../etc/passwd"
    assert link_target("/abs\udcff") == b"/abs\xff"
    with pytest.raises(BadName, match="empty symlink target"):
        link_target("")
