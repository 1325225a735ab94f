"""layered.py: OCI whiteouts, opaque folders, replacements across layers, hostile layers."""

from __future__ import annotations

import io
import os
import stat
import tarfile
from pathlib import Path

import pytest

import asynccache.tree.folder as folder_module
import asynccache.tree.layered as layered
from asynccache._fs import remove_tree
from asynccache.errors import UnsafeArchive
from asynccache.tree.digest import tree_stats
from asynccache.tree.layered import LayerTree
from tests.support.oci_fixtures import (
    device,
    file,
    folder,
    hardlink,
    opaque,
    symlink,
    tar_bytes,
    whiteout,
)
from tests.support.tars import apply_all, lines_run, listing, victim_intact


def test_whiteouts_remove_a_lower_file_and_directory(dest: Path) -> None:
    lower = tar_bytes(
        [
            folder("testbed"),
            file("testbed/keep.txt", "keep"),
            file("testbed/gone.txt", "gone"),
            folder("testbed/gone_dir"),
            file("testbed/gone_dir/a", "a"),
        ]
    )
    upper = tar_bytes(
        [folder("testbed"), whiteout("testbed/gone.txt"), whiteout("testbed/gone_dir")]
    )
    _, result = apply_all(dest, lower, upper)
    assert listing(dest) == {"keep.txt": "keep"}
    assert (result.file_count, result.size_bytes) == tree_stats(dest) == (1, 4)


def test_whiteout_spares_what_its_own_layer_wrote(dest: Path) -> None:
    lower = tar_bytes([folder("testbed"), file("testbed/a", "old")])
    upper = tar_bytes([file("testbed/b", "new"), whiteout("testbed/b")])
    apply_all(dest, lower, upper)
    assert listing(dest) == {"a": "old", "b": "new"}


@pytest.mark.parametrize("marker_first", [True, False])
def test_opaque_directory_hides_lower_children_whatever_its_place(
    dest: Path, marker_first: bool
) -> None:
    lower = tar_bytes(
        [
            folder("testbed"),
            folder("testbed/opq"),
            file("testbed/opq/old1", "1"),
            folder("testbed/opq/sub"),
            file("testbed/opq/sub/old2", "2"),
            file("testbed/outside_opq", "o"),
        ]
    )
    entries = [
        folder("testbed/opq"),
        file("testbed/opq/new1", "n"),
        folder("testbed/opq/sub"),
        file("testbed/opq/sub/new2", "m"),
    ]
    marker = opaque("testbed/opq")
    upper = tar_bytes([marker, *entries] if marker_first else [*entries, marker])
    apply_all(dest, lower, upper)
    assert listing(dest) == {
        "opq": "dir",
        "opq/new1": "n",
        "opq/sub": "dir",
        "opq/sub/new2": "m",
        "outside_opq": "o",
    }


def test_opaque_marker_of_a_missing_directory_creates_it_empty(dest: Path) -> None:
    apply_all(dest, tar_bytes([folder("testbed"), opaque("testbed/fresh")]))
    assert listing(dest) == {"fresh": "dir"}


def test_file_replaced_by_a_directory_and_back(dest: Path) -> None:
    layers = [
        tar_bytes([folder("testbed"), file("testbed/flip", "file-1")]),
        tar_bytes([folder("testbed/flip", 0o700), file("testbed/flip/inside", "in")]),
        tar_bytes([file("testbed/flip", "file-2", 0o600)]),
    ]
    _, result = apply_all(dest, *layers)
    assert listing(dest) == {"flip": "file-2"}
    assert stat.S_IMODE((dest / "flip").lstat().st_mode) == 0o600
    assert (result.file_count, result.size_bytes) == (1, 6)


def test_directory_replaced_by_a_symlink_then_a_directory(dest: Path) -> None:
    layers = [
        tar_bytes([folder("testbed"), folder("testbed/d"), file("testbed/d/x", "x")]),
        tar_bytes([symlink("testbed/d", "/etc")]),
        tar_bytes([folder("testbed/d"), file("testbed/d/y", "y")]),
    ]
    apply_all(dest, *layers)
    assert listing(dest) == {"d": "dir", "d/y": "y"}


def test_symlink_replaced_by_a_file_is_not_written_through(sandbox: Path) -> None:
    dest = sandbox / "dest"
    target = str(sandbox / "victim" / "secret.txt")
    layers = [
        tar_bytes([folder("testbed"), symlink("testbed/link", target)]),
        tar_bytes([file("testbed/link", "replaced")]),
    ]
    apply_all(dest, *layers)
    assert listing(dest) == {"link": "replaced"}
    assert victim_intact(sandbox)


def test_lower_symlinked_folder_becomes_a_real_folder(sandbox: Path) -> None:
    dest = sandbox / "dest"
    layers = [
        tar_bytes([folder("testbed"), symlink("testbed/lib", str(sandbox / "victim"))]),
        tar_bytes([file("testbed/lib/secret.txt", "mine"), whiteout("testbed/lib/other")]),
    ]
    apply_all(dest, *layers)
    assert listing(dest) == {"lib": "dir", "lib/secret.txt": "mine"}
    assert victim_intact(sandbox)


def test_whiteout_under_a_lower_symlink_deletes_nothing_outside(sandbox: Path) -> None:
    dest = sandbox / "dest"
    layers = [
        tar_bytes([folder("testbed"), symlink("testbed/v", "../victim")]),
        tar_bytes([whiteout("testbed/v/secret.txt")]),
    ]
    apply_all(dest, *layers)
    assert victim_intact(sandbox)
    assert listing(dest) == {"v": "dir"}


def test_hardlink_to_a_lower_layer_file(dest: Path) -> None:
    layers = [
        tar_bytes([folder("testbed"), file("testbed/base.txt", "base", 0o640)]),
        tar_bytes([hardlink("testbed/sub/hard", "testbed/base.txt")]),
    ]
    _, result = apply_all(dest, *layers)
    base, hard = (dest / "base.txt").lstat(), (dest / "sub" / "hard").lstat()
    assert base.st_ino == hard.st_ino
    assert (dest / "sub" / "hard").read_text() == "base"
    assert (result.file_count, result.size_bytes) == tree_stats(dest) == (2, 8)


def test_members_outside_the_root_are_skipped_and_the_layer_is_untouched(dest: Path) -> None:
    tree = LayerTree(dest)
    base = tar_bytes(
        [
            folder("etc"),
            file("etc/passwd", "root"),
            device("dev/null"),
            file("usr/bin/tool", "t", 0o4755),
            file("testbedx/f", "sibling"),
            whiteout("usr/old"),
            opaque("var"),
        ]
    )
    done = tree.apply(io.BytesIO(base).read)
    assert not done.touched and not tree.present
    assert listing(dest) == {}
    done = tree.apply(io.BytesIO(tar_bytes([file("./testbed/a", "a")])).read)
    assert done.touched and tree.present
    result = tree.finish()
    assert listing(dest) == {"a": "a"}
    assert result.warnings == ()


def test_whiteout_of_the_root_hides_the_testbed(dest: Path) -> None:
    tree, _ = apply_all(dest, tar_bytes([folder("testbed"), file("testbed/a", "a")]))
    done = tree.apply(io.BytesIO(tar_bytes([whiteout("testbed")])).read)
    assert done.touched and not tree.present
    assert listing(dest) == {}
    tree.apply(io.BytesIO(tar_bytes([folder("testbed"), file("testbed/b", "b")])).read)
    assert tree.present and listing(dest) == {"b": "b"}


def test_opaque_marker_at_the_top_hides_the_testbed(dest: Path) -> None:
    tree, _ = apply_all(dest, tar_bytes([folder("testbed"), file("testbed/a", "a")]))
    done = tree.apply(io.BytesIO(tar_bytes([opaque("."), file("etc/x", "x")])).read)
    assert done.touched and not tree.present
    assert listing(dest) == {}


def test_root_mode_comes_from_the_last_layer_that_sets_it(dest: Path) -> None:
    layers = [
        tar_bytes([folder("testbed", 0o755), file("testbed/a", "a")]),
        tar_bytes([folder("testbed", 0o750)]),
        tar_bytes([file("testbed/b", "b")]),
    ]
    apply_all(dest, *layers)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o750


def test_aufs_metadata_is_never_written(dest: Path) -> None:
    layer = tar_bytes(
        [
            folder("testbed"),
            file("testbed/.wh..wh.aufs", ""),
            folder("testbed/.wh..wh.plnk"),
            file("testbed/.wh..wh.plnk/123.456", "x"),
            file("testbed/real", "r"),
        ]
    )
    apply_all(dest, layer)
    assert listing(dest) == {"real": "r"}


@pytest.mark.parametrize(
    "name",
    ["testbed/.wh..", "testbed/sub/.wh...", "testbed/../.wh.victim", ".wh..", "usr/.wh..."],
)
def test_whiteout_pointing_outside_is_rejected(sandbox: Path, name: str) -> None:
    dest = sandbox / "dest"
    tree = LayerTree(dest)
    tree.apply(io.BytesIO(tar_bytes([folder("testbed"), file("testbed/a", "a")])).read)
    with pytest.raises(UnsafeArchive):
        tree.apply(io.BytesIO(tar_bytes([file(name)])).read)
    assert victim_intact(sandbox)
    assert (dest / "a").read_text() == "a"


@pytest.mark.parametrize("name", ["/testbed/x", "/etc/passwd", "testbed/../../victim/x"])
def test_absolute_and_dotdot_names_are_rejected(sandbox: Path, name: str) -> None:
    tree = LayerTree(sandbox / "dest")
    with pytest.raises(UnsafeArchive):
        tree.apply(io.BytesIO(tar_bytes([folder("testbed"), file(name, "evil")])).read)
    assert victim_intact(sandbox)
    assert not (sandbox / "victim" / "x").exists()


def test_hardlink_escaping_through_dotdot_is_rejected(sandbox: Path) -> None:
    tree = LayerTree(sandbox / "dest")
    layer = tar_bytes([folder("testbed"), hardlink("testbed/h", "testbed/../../victim/secret.txt")])
    with pytest.raises(UnsafeArchive):
        tree.apply(io.BytesIO(layer).read)
    assert victim_intact(sandbox)


def test_device_files_are_skipped_with_a_warning(dest: Path) -> None:
    layer = tar_bytes(
        [
            folder("testbed"),
            device("testbed/null"),
            device("testbed/disk", tarfile.BLKTYPE),
            device("dev/console"),
            file("testbed/ok", "ok"),
        ]
    )
    _, result = apply_all(dest, layer)
    assert listing(dest) == {"ok": "ok"}
    assert result.warnings == (
        "testbed/null: skipped character device",
        "testbed/disk: skipped block device",
    )


def test_setuid_bits_are_dropped_in_layers(dest: Path) -> None:
    _, result = apply_all(dest, tar_bytes([folder("testbed"), file("testbed/s", "s", 0o4755)]))
    assert stat.S_IMODE((dest / "s").lstat().st_mode) == 0o755
    assert len(result.warnings) == 1


def test_write_through_a_symlink_of_the_same_layer_is_rejected(sandbox: Path) -> None:
    tree = LayerTree(sandbox / "dest")
    layer = tar_bytes(
        [folder("testbed"), symlink("testbed/l", str(sandbox / "victim")), file("testbed/l/x", "e")]
    )
    with pytest.raises(UnsafeArchive, match="is a symlink"):
        tree.apply(io.BytesIO(layer).read)
    assert not (sandbox / "victim" / "x").exists()


def folders_replaced(dest: Path, count: int) -> None:
    """A layer of count folders, then one that writes a file and replaces a folder, count times."""
    lower = [folder("testbed")]
    for i in range(count):
        lower += [folder(f"testbed/d{i}"), file(f"testbed/d{i}/f", "f")]
    upper = []
    for i in range(count):
        upper += [file(f"testbed/keep{i}", "k"), file(f"testbed/d{i}", "now a file")]
    _, result = apply_all(dest, tar_bytes(lower), tar_bytes(upper))
    assert result.file_count == 2 * count


def test_replacing_folders_across_layers_takes_linear_work(tmp_path: Path) -> None:
    def work(count: int) -> int:
        dest = tmp_path / str(count)
        dest.mkdir()
        return lines_run(lambda: folders_replaced(dest, count), layered, folder_module)

    small, large = work(600), work(1800)
    # three times the folders, three times the work (nine times when it was quadratic)
    assert large < 3.5 * small


def test_an_opaque_marker_over_a_deep_tree_of_its_own_layer(dest: Path) -> None:
    depth = 1200  # deeper than Python's recursion limit
    path = "testbed/" + "/".join(["d"] * depth)
    lower = tar_bytes([folder("testbed"), file(path + "/old", "old")])
    upper = tar_bytes([file(path + "/new", "new"), opaque("testbed")])
    try:
        apply_all(dest, lower, upper)
        assert os.listdir(os.path.join(dest, *["d"] * depth)) == ["new"]
    finally:
        remove_tree(dest)  # pytest's own clean-up recurses
