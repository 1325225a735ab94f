"""Checkout modes: the same tree as the cache, writes that never reach it, clean release."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from asynccache.trainer import copy as checkout_copy
from asynccache.trainer import overlay as checkout_overlay
from asynccache.trainer.checkout import (
    CheckoutError,
    OverlayProbe,
    checkout_tree,
    overlay_probe,
    overlay_side_dir,
    release_tree,
    resolve_mode,
)
from tests.support.cache_trees import HARDLINKED, build_sample_tree
from tests.support.checkouts import MODES, OVERLAY_OK
from tests.support.fixtures import as_copied, diff_snapshots, snapshot_tree

ROOT = Path(__file__).resolve().parents[2]


def fingerprint(root: Path) -> dict[str, Any]:
    """Everything about a tree that a write through a checkout could change."""
    result: dict[str, Any] = {".": (os.lstat(root).st_mode, os.lstat(root).st_mtime_ns)}
    snapshot = snapshot_tree(root)
    for rel, entry in snapshot.items():
        info = os.lstat(root / rel)
        result[rel] = (entry, info.st_size, info.st_mtime_ns, info.st_ino, info.st_nlink)
    return result


def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo", encoding="utf-8") as handle:
        return any(line.split()[4] == str(path) for line in handle)


def mutate(dest: Path, rename_dirs: bool = True) -> None:
    """Every kind of write a rollout does."""
    (dest / "new-file.txt").write_text("new\n")
    with open(dest / "README.md", "a") as handle:
        handle.write("appended\n")
    with open(dest / HARDLINKED[0], "r+b") as handle:
        handle.write(b"EDITED IN PLACE")
    os.chmod(dest / "readonly.txt", 0o644)
    with open(dest / "readonly.txt", "r+b") as handle:
        handle.write(b"WRITTEN")
    os.truncate(dest / "pkg" / "data" / "blob.bin", 10)
    os.chmod(dest / "setup.py", 0o600)
    os.chmod(dest / "locked-dir", 0o755)
    (dest / "locked-dir" / "inside.txt").unlink()
    (dest / "pkg" / "core.py").unlink()
    if rename_dirs:
        (dest / "name with spaces").rename(dest / "renamed")
    (dest / "README.md").rename(dest / "README.rst")
    (dest / "rel-link").unlink()
    os.symlink("elsewhere", dest / "rel-link")
    with open(dest / "dir-link" / "__init__.py", "w") as handle:
        handle.write("through a symlink\n")
    shutil.rmtree(dest / "d0")
    (dest / "empty-dir" / "nested-empty" / "filled.txt").write_text("x")
    os.utime(dest / "setup.py", ns=(0, 0))


@pytest.mark.parametrize("mode", MODES)
def test_checkout_is_the_same_tree(source: Path, tmp_path: Path, mode: str) -> None:
    dest = tmp_path / "rollouts" / "r1"
    assert checkout_tree(source, dest, mode) == mode  # type: ignore[arg-type]
    try:
        expected = snapshot_tree(source, hardlinks=False)
        if mode == "copy":
            expected = as_copied(expected)
        actual = snapshot_tree(dest, hardlinks=False)
        assert actual == expected, diff_snapshots(expected, actual)
        assert stat.S_IMODE(os.stat(dest).st_mode) == stat.S_IMODE(os.stat(source).st_mode)
        assert os.readlink(dest / "abs-link") == "/etc/hostname"
        assert os.readlink(dest / "pkg" / "up-link") == "../README.md"
        assert (dest / "empty-dir" / "nested-empty").is_dir()
        assert stat.S_IMODE(os.stat(dest / "sticky-dir").st_mode) == 0o1777
        # A copy never recreates setuid/setgid bits; an overlay shows them on a nosuid mount.
        setuid_mode = 0o755 if mode == "copy" else 0o4755
        assert stat.S_IMODE(os.stat(dest / "setuid-tool").st_mode) == setuid_mode
        core = os.stat(dest / "pkg" / "core.py")
        assert core.st_mtime_ns == os.stat(source / "pkg" / "core.py").st_mtime_ns
        if mode == "copy":
            cache_inodes = {(os.lstat(p).st_dev, os.lstat(p).st_ino) for p in source.rglob("*")}
            for path in dest.rglob("*"):
                info = os.lstat(path)
                assert (info.st_dev, info.st_ino) not in cache_inodes, path
            assert os.stat(dest / HARDLINKED[0]).st_nlink == 1
        else:
            assert mounted(dest)
    finally:
        release_tree(dest)


@pytest.mark.parametrize("mode", MODES)
def test_writes_in_a_checkout_never_change_the_cache(
    source: Path, tmp_path: Path, mode: str
) -> None:
    before = fingerprint(source)
    dest = tmp_path / "rollouts" / "r1"
    checkout_tree(source, dest, mode)  # type: ignore[arg-type]
    try:
        renames = mode == "copy" or overlay_probe().renames_dirs
        mutate(dest, rename_dirs=renames)
        assert (dest / HARDLINKED[0]).read_bytes().startswith(b"EDITED IN PLACE")
        assert (dest / "renamed").is_dir() == renames
        assert not (dest / "pkg" / "core.py").exists()
        after = fingerprint(source)
        assert after == before
        assert (source / HARDLINKED[1]).read_bytes() == b"one inode, two names\n"
        assert (source / "pkg" / "core.py").exists()
    finally:
        release_tree(dest)
    assert fingerprint(source) == before


@pytest.mark.parametrize("mode", MODES)
def test_release_removes_everything(source: Path, tmp_path: Path, mode: str) -> None:
    parent = tmp_path / "rollouts"
    parent.mkdir()
    dest = parent / "r1"
    checkout_tree(source, dest, mode)  # type: ignore[arg-type]
    mutate(dest, rename_dirs=mode == "copy" or overlay_probe().renames_dirs)
    release_tree(dest)
    assert list(parent.iterdir()) == []
    assert not mounted(dest)
    assert not overlay_side_dir(dest).exists()
    checkout_tree(source, dest, mode)  # type: ignore[arg-type]
    release_tree(dest)
    assert list(parent.iterdir()) == []


@pytest.mark.parametrize("mode", MODES)
def test_an_existing_empty_folder_is_a_valid_destination(
    source: Path, tmp_path: Path, mode: str
) -> None:
    dest = tmp_path / "made-by-mkdtemp"
    dest.mkdir()
    checkout_tree(source, dest, mode)  # type: ignore[arg-type]
    try:
        assert (dest / "README.md").read_bytes() == b"# sample\n"
    finally:
        release_tree(dest)
    assert not dest.exists()


@pytest.mark.parametrize("mode", MODES)
def test_a_non_empty_destination_is_refused_and_left_alone(
    source: Path, tmp_path: Path, mode: str
) -> None:
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(CheckoutError, match="not an empty folder"):
        checkout_tree(source, dest, mode)  # type: ignore[arg-type]
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert not overlay_side_dir(dest).exists()


def test_unknown_mode_is_rejected(source: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown checkout mode"):
        checkout_tree(source, tmp_path / "d", "hardlink")  # type: ignore[arg-type]


def test_a_failed_copy_leaves_nothing(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copied: list[str] = []
    original = checkout_copy._Copier._copy_file

    def failing(self: Any, src_fd: int, dst_fd: int, name: str, *rest: Any) -> None:
        copied.append(name)
        if len(copied) == 5:
            raise OSError(28, "No space left on device")
        original(self, src_fd, dst_fd, name, *rest)

    monkeypatch.setattr(checkout_copy._Copier, "_copy_file", failing)
    dest = tmp_path / "rollouts" / "r1"
    with pytest.raises(OSError, match="No space left"):
        checkout_tree(source, dest, "copy")
    assert not dest.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_auto_picks_overlay_as_root(source: Path, tmp_path: Path) -> None:
    assert overlay_probe().available, overlay_probe().reason
    assert resolve_mode("auto", tmp_path) == "overlay"
    dest = tmp_path / "r1"
    assert checkout_tree(source, dest) == "overlay"
    assert mounted(dest)
    release_tree(dest)


def test_auto_copies_when_mounting_is_not_permitted(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    refused = OverlayProbe(False, reason="mount: Operation not permitted")
    monkeypatch.setattr(checkout_overlay, "_probe_result", (os.getpid(), refused))
    assert resolve_mode("auto", tmp_path) == "copy"
    dest = tmp_path / "r1"
    assert checkout_tree(source, dest, "auto") == "copy"
    assert not mounted(dest)
    assert snapshot_tree(dest, hardlinks=False) == as_copied(snapshot_tree(source, hardlinks=False))
    release_tree(dest)
    assert not dest.exists()


@pytest.mark.skipif(not OVERLAY_OK, reason="this process may not mount overlays")
def test_auto_copies_when_a_mount_fails_on_that_filesystem(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*_args: object) -> None:
        raise CheckoutError("cannot mount an overlay: Invalid argument")

    monkeypatch.setattr(checkout_overlay, "_overlay_refused", set())
    monkeypatch.setattr(checkout_overlay, "_mount_overlay", refuse)
    dest = tmp_path / "r1"
    assert checkout_tree(source, dest, "auto") == "copy"
    assert not overlay_side_dir(dest).exists()
    assert resolve_mode("auto", tmp_path) == "copy"
    release_tree(dest)
    with pytest.raises(CheckoutError, match="Invalid argument"):
        checkout_tree(source, dest, "overlay")
    assert not dest.exists() and not overlay_side_dir(dest).exists()


@pytest.mark.skipif(not OVERLAY_OK, reason="this process may not mount overlays")
def test_overlay_paths_with_commas_and_colons(tmp_path: Path) -> None:
    source = tmp_path / "cache, with: odd\\chars"
    build_sample_tree(source)
    dest = tmp_path / "roll,out:1"
    checkout_tree(source, dest, "overlay")
    try:
        assert snapshot_tree(dest, hardlinks=False) == snapshot_tree(source, hardlinks=False)
        (dest / "README.md").write_text("changed")
        assert (source / "README.md").read_text() == "# sample\n"
    finally:
        release_tree(dest)
    assert not dest.exists()


@pytest.mark.skipif(not OVERLAY_OK, reason="this process may not mount overlays")
def test_release_of_a_busy_overlay_detaches_it(source: Path, tmp_path: Path) -> None:
    dest = tmp_path / "r1"
    checkout_tree(source, dest, "overlay")
    busy = subprocess.Popen(["sleep", "60"], cwd=dest)
    try:
        release_tree(dest)
    finally:
        busy.kill()
        busy.wait()
    assert not dest.exists() and not overlay_side_dir(dest).exists()
    assert not mounted(dest)
    assert (source / "README.md").read_bytes() == b"# sample\n"


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="no /dev/shm")
def test_copy_across_filesystems_into_tmpfs(source: Path) -> None:
    parent = Path(os.environ.get("ASYNCCACHE_SHM", "/dev/shm")) / f"asynccache-test-{os.getpid()}"
    dest = parent / "r1"
    try:
        assert checkout_tree(source, dest, "copy") == "copy"
        expected = as_copied(snapshot_tree(source, hardlinks=False))
        assert snapshot_tree(dest, hardlinks=False) == expected
        release_tree(dest)
        assert not dest.exists()
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def test_overlay_without_root_in_a_user_namespace(source: Path, tmp_path: Path) -> None:
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-Urm", "true"], check=False).returncode:
        pytest.skip("unshare -Urm is not permitted here")
    script = textwrap.dedent(
        f"""
        import os, sys
        from pathlib import Path
        from asynccache.trainer.checkout import checkout_tree, overlay_probe, release_tree
        probe = overlay_probe(Path({str(tmp_path)!r}))
        print("probe", probe.available, repr(probe.options), probe.reason)
        dest = Path({str(tmp_path / "userns")!r})
        print("mode", checkout_tree(Path({str(source)!r}), dest, "auto"))
        with open(dest / "README.md", "a") as handle:
            handle.write("userns write")
        (dest / "setup.py").unlink()
        release_tree(dest)
        print("released", dest.exists())
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [unshare, "-Urm", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    if not lines[0].startswith("probe True"):
        assert "mode copy" in lines
        pytest.skip(f"overlay not permitted in a user namespace here: {lines[0]}")
    assert "userxattr" in lines[0]
    assert "mode overlay" in lines
    assert "released False" in lines
    assert (source / "README.md").read_bytes() == b"# sample\n"
    assert (source / "setup.py").exists()
