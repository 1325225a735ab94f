"""Fixtures of the tree tests: both ways to extract, an empty dest, a sandbox around it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.tars import Extract, run_stream, run_tar


@pytest.fixture(params=["extract_tar", "extract_stream"])
def extract(request: pytest.FixtureRequest) -> Extract:
    return run_tar if request.param == "extract_tar" else run_stream


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    folder = tmp_path / "dest"
    folder.mkdir()
    return folder


@pytest.fixture
def fast_dest(tmp_path: Path) -> Iterator[Path]:
    """An empty dest on tmpfs when /dev/shm has room (many-file tests), else under tmp_path."""
    shm = Path("/dev/shm")
    try:
        usable = os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev
        info = os.statvfs(shm)
        usable = usable and info.f_bavail * info.f_frsize > 256 * 1024 * 1024
    except OSError:
        usable = False
    if not usable:
        folder = tmp_path / "dest"
        folder.mkdir()
        yield folder
        return
    with tempfile.TemporaryDirectory(dir=shm, prefix="test_extract_") as scratch:
        folder = Path(scratch) / "dest"
        folder.mkdir()
        yield folder


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """A folder holding an empty dest plus a victim folder and file next to it."""
    box = tmp_path / "sandbox"
    (box / "victim").mkdir(parents=True)
    (box / "victim" / "secret.txt").write_text("secret")
    (box / "sibling.txt").write_text("sibling")
    (box / "dest").mkdir()
    return box
