"""Checkouts cannot be turned against their caller: swapped paths, foreign folders, privileges."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from asynccache.errors import CheckoutError
from asynccache.trainer import copy as copy_module
from asynccache.trainer import destination
from asynccache.trainer import overlay as overlay_module
from asynccache.trainer.checkout import checkout_tree, release_tree
from tests.support.checkouts import MODES, OVERLAY_OK


def swap_after(monkeypatch: pytest.MonkeyPatch, module: object, swap: Callable[[], None]) -> None:
    """Make ``swap`` run right after the checkout has claimed its destination."""
    claim = destination.claim_destination

    def claim_then_swap(dest: Path) -> destination.Destination:
        held = claim(dest)
        swap()
        return held

    monkeypatch.setattr(module, "claim_destination", claim_then_swap)


@pytest.mark.parametrize("mode", MODES)
def test_dest_swapped_for_a_link_during_the_call_lands_in_the_claimed_folder(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    rollouts = tmp_path / "rollouts"
    rollouts.mkdir()
    dest = rollouts / "r1"
    moved = rollouts / "r1.moved"

    def swap() -> None:
        os.rename(dest, moved)
        os.symlink(victim, dest)

    module = copy_module if mode == "copy" else overlay_module
    swap_after(monkeypatch, module, swap)
    checkout_tree(source, dest, mode)  # type: ignore[arg-type]
    try:
        assert os.listdir(victim) == []
        assert (moved / "README.md").is_file()
    finally:
        if mode == "overlay":
            overlay_module.unmount(moved)


def test_a_parent_swapped_for_a_link_on_the_way_is_refused(
    source: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    parent = tmp_path / "rollouts"
    parent.mkdir()
    real_parent = str(parent)

    def realpath_then_swap(path: object) -> str:
        # The parent is resolved, then replaced by a link before it is opened.
        os.rename(parent, tmp_path / "rollouts.moved")
        os.symlink(victim, parent)
        return real_parent

    monkeypatch.setattr(destination.os.path, "realpath", realpath_then_swap)
    with pytest.raises(CheckoutError, match="changed while a checkout was being made"):
        checkout_tree(source, parent / "r1", "copy")
    monkeypatch.undo()
    assert os.listdir(victim) == []


def test_a_legitimate_symlinked_parent_still_works(source: Path, tmp_path: Path) -> None:
    real = tmp_path / "real-rollouts"
    real.mkdir()
    (tmp_path / "rollouts").symlink_to(real)
    dest = tmp_path / "rollouts" / "r1"
    assert checkout_tree(source, dest, "copy") == "copy"
    assert (real / "r1" / "README.md").is_file()
    release_tree(dest)
    assert not (real / "r1").exists()


@pytest.mark.parametrize("mode", MODES)
def test_an_existing_folder_of_another_user_is_refused(
    source: Path, tmp_path: Path, mode: str
) -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("this test needs root in CI to hand a folder to another user")
        pytest.skip("needs root")
    dest = tmp_path / "r1"
    dest.mkdir()
    os.chown(dest, 12345, 12345)
    with pytest.raises(CheckoutError, match="not an empty folder of yours"):
        checkout_tree(source, dest, mode)  # type: ignore[arg-type]
    assert os.listdir(dest) == []


def test_an_existing_link_as_dest_is_refused(source: Path, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "r1").symlink_to(victim)
    with pytest.raises(CheckoutError, match="exists and is not an empty folder"):
        checkout_tree(source, tmp_path / "r1", "copy")
    assert os.listdir(victim) == []


@pytest.mark.skipif(not OVERLAY_OK, reason="this process may not mount overlays")
def test_overlay_mounts_are_nosuid_and_nodev(source: Path, tmp_path: Path) -> None:
    dest = tmp_path / "r1"
    checkout_tree(source, dest, "overlay")
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as table:
            options = [line.split()[5] for line in table if line.split()[4] == str(dest)]
        assert options, "the checkout is not mounted"
        assert {"nosuid", "nodev"} <= set(options[-1].split(","))
    finally:
        release_tree(dest)


def test_copy_never_recreates_devices_or_privilege_bits(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("this test needs root in CI to make a device node")
        pytest.skip("needs root")
    tree = tmp_path / "cache" / "dev__0"
    tree.mkdir(parents=True)
    os.mknod(tree / "null-copy", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    (tree / "tool").write_text("#!/bin/sh\n")
    os.chmod(tree / "tool", 0o6755)
    (tree / "group-dir").mkdir()
    os.chmod(tree / "group-dir", 0o2775)
    dest = tmp_path / "r1"
    checkout_tree(tree, dest, "copy")
    assert not (dest / "null-copy").exists()
    assert stat.S_IMODE(os.stat(dest / "tool").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(dest / "group-dir").st_mode) == 0o775
