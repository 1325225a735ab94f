"""The registry backend's blob cache lives apart from the cache folder that gets shipped."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from asynccache.config import default_layer_cache_dir
from tests.support.cli_runner import run_cli
from tests.support.fixtures import FixtureImage

DOWNLOADED = re.compile(r"registry backend: (\d+) bytes downloaded; layers fetched (\d+)")


def test_the_default_is_under_the_user_cache_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ASYNCCACHE_LAYER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_layer_cache_dir() == tmp_path / "xdg" / "asynccache" / "layers"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_layer_cache_dir() == tmp_path / "home" / ".cache" / "asynccache" / "layers"
    monkeypatch.setenv("ASYNCCACHE_LAYER_CACHE_DIR", str(tmp_path / "mine"))
    assert default_layer_cache_dir() == tmp_path / "mine"


def registry_run(*args: str | Path, **env: str) -> tuple[int, str, str, int, int]:
    done = run_cli("--backend", "registry", *args, DOCKER_HOST="unix:///nonexistent", **env)
    found = DOWNLOADED.search(done.stderr)
    assert found, done.stderr
    # One line for the run, the workers' counts summed (the default is a worker per core).
    assert len(DOWNLOADED.findall(done.stderr)) == 1, done.stderr
    return done.returncode, done.stdout, done.stderr, int(found[1]), int(found[2])


def test_blobs_go_to_the_user_cache_home_and_serve_the_next_run(
    tmp_path: Path, sample_dataset: tuple[Path, str, list[dict[str, Any]]],
    fixture_images: list[FixtureImage],
) -> None:  # fmt: skip
    dataset_dir, split, _rows = sample_dataset
    cache_dir = tmp_path / "cache"
    (cache_dir / ".layers").mkdir(parents=True)  # where earlier versions kept them
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "ASYNCCACHE_LAYER_CACHE_DIR": ""}
    args = ("--dataset", dataset_dir, "--split", split, "--cache_dir", cache_dir, "-v")
    code, _out, err, first_bytes, first_fetches = registry_run(*args, **env)
    assert code == 0, err
    assert f"{cache_dir / '.layers'} is no longer used" in err
    layers = tmp_path / "xdg" / "asynccache" / "layers"
    assert (layers / "untouched").is_file()
    assert list((cache_dir / ".layers").iterdir()) == []
    # The cache folder holds the trees, their bookkeeping and their files' store: no layer blobs.
    hidden = {p.name for p in cache_dir.iterdir() if p.name.startswith(".")}
    assert hidden <= {".meta", ".tmp", ".lock", ".layers", ".store"}
    # A second run over the same images finds their layers known: fewer bytes, fewer fetches.
    code, _out, err, again_bytes, again_fetches = registry_run(*args, "--no-skip_existing", **env)
    assert code == 0, err
    assert again_bytes < first_bytes and again_fetches < first_fetches
    assert f"Done: {len(fixture_images)} cached" in _out


def test_the_flag_wins_over_the_variable(
    tmp_path: Path,
    sample_dataset: tuple[Path, str, list[dict[str, Any]]],
    own_layer_cache: Path,
) -> None:
    dataset_dir, split, _rows = sample_dataset
    chosen = tmp_path / "blobs"
    code, _out, err, _bytes, _fetches = registry_run(
        "--dataset", dataset_dir, "--split", split, "--cache_dir", tmp_path / "cache",
        "--max_entries", "1", "--layer_cache_dir", chosen,
    )  # fmt: skip
    assert code == 0, err
    assert (chosen / "untouched").is_file() or any(chosen.glob("sha256-*"))
    assert list(own_layer_cache.iterdir()) == []  # ASYNCCACHE_LAYER_CACHE_DIR's folder
