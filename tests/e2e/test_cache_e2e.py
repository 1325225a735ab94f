"""The cache pipeline end to end: the real CLI against the real dockerd and loopback registry."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli_runner import instance_id as default_instance_id
from tests.support.cli_runner import run_cli
from tests.support.fixtures import (
    FixtureImage,
    ReferenceTrees,
    assert_deduplicated,
    diff_deduplicated,
    diff_snapshots,
    image_exists,
    remove_local_image,
    row_for,
    snapshot_tree,
    ungrouped,
    without_git,
    write_dataset,
)

Dataset = tuple[Path, str, list[dict[str, Any]]]


def read_index(cache_dir: Path) -> dict[str, dict[str, Any]]:
    return dict(json.loads((cache_dir / "index.json").read_text()))


def assert_clean(cache_dir: Path, leftover_containers: Callable[[Path], list[str]]) -> None:
    """No container of ours and no work in progress remain."""
    assert leftover_containers(cache_dir) == []
    tmp = cache_dir / ".tmp"
    assert not tmp.exists() or list(tmp.iterdir()) == []


def instance_id(image: FixtureImage) -> str:
    return default_instance_id(image.repo, image.commit_hash)


@pytest.mark.parametrize("dedup", [True, False], ids=["dedup", "no_dedup"])
def test_every_cached_tree_is_docker_cp_s_without_the_history_past_head(
    tmp_path: Path,
    sample_dataset: Dataset,
    fixture_images: list[FixtureImage],
    reference_trees: ReferenceTrees,
    leftover_containers: Callable[[Path], list[str]],
    dedup: bool,
) -> None:
    """With --no_dedup, exactly; with dedup, the same but for equal files sharing an inode."""
    dataset_dir, split, _rows = sample_dataset
    cache_dir = tmp_path / "cache"
    flags = [] if dedup else ["--no_dedup"]
    done = run_cli(
        "--dataset",
        dataset_dir,
        "--split",
        split,
        "--cache_dir",
        cache_dir,
        "--concurrency",
        "16",
        *flags,
    )
    assert done.returncode == 0, done.stderr
    assert f"Done: {len(fixture_images)} cached, 0 skipped, 0 failed" in done.stdout
    index = read_index(cache_dir)
    assert sorted(index) == sorted(instance_id(image) for image in fixture_images)
    for image in fixture_images:
        record = index[instance_id(image)]
        cached = cache_dir / instance_id(image)
        assert record["cache_path"] == str(cached)
        assert record["docker_image"] == image.ref
        assert record["commit_hash"] == image.commit_hash
        assert record["repo_name"] == image.repo
        assert record["git_history"] == "head"
        expected = reference_trees.guarded(image.ref)
        actual = snapshot_tree(cached)
        if dedup:
            assert not diff_deduplicated(expected, cached), diff_deduplicated(expected, cached)
        else:
            assert actual == expected, diff_snapshots(expected, actual)
        working_tree = without_git(reference_trees[image.ref])
        if dedup:  # equal files share an inode; the image's own groups were checked above
            working_tree = ungrouped(working_tree)
            actual = snapshot_tree(cached, hardlinks=False)
        assert without_git(actual) == working_tree, diff_snapshots(working_tree, actual)
        regular = [value for value in actual.values() if value[0] == "file"]
        assert record["file_count"] == len(regular)
        assert abs(record["size_mb"] - record["size_bytes"] / 2**20) < 0.01
        assert record["dedup"] is dedup
    if dedup:
        trees = [cache_dir / instance_id(image) for image in fixture_images]
        assert_deduplicated(cache_dir, trees, [index[tree.name] for tree in trees])
    assert_clean(cache_dir, leftover_containers)
    for image in fixture_images:
        assert not image_exists(image.ref), "an image this run pulled was not removed"


def test_resume_caches_only_the_entries_left(
    tmp_path: Path,
    sample_dataset: Dataset,
    fixture_images: list[FixtureImage],
    leftover_containers: Callable[[Path], list[str]],
) -> None:
    dataset_dir, split, _rows = sample_dataset
    cache_dir = tmp_path / "cache"
    first = run_cli(
        "--dataset",
        dataset_dir,
        "--split",
        split,
        "--cache-dir",
        cache_dir,
        "--max_entries",
        "2",
        "--concurrency",
        "2",
    )
    assert first.returncode == 0, first.stderr
    assert "Done: 2 cached, 0 skipped, 0 failed" in first.stdout
    first_index = read_index(cache_dir)
    assert len(first_index) == 2
    mtimes = {key: (cache_dir / key).stat().st_mtime_ns for key in first_index}

    second = run_cli("--dataset", dataset_dir, "--split", split, "--cache_dir", cache_dir)
    assert second.returncode == 0, second.stderr
    rest = len(fixture_images) - 2
    assert f"Done: {rest} cached, 2 skipped, 0 failed" in second.stdout
    assert len(read_index(cache_dir)) == len(fixture_images)
    assert {key: (cache_dir / key).stat().st_mtime_ns for key in first_index} == mtimes
    assert_clean(cache_dir, leftover_containers)


def test_missing_image_and_bad_row_fail_only_their_entries(
    tmp_path: Path,
    fixture_images: list[FixtureImage],
    missing_image: str,
    no_testbed_image: FixtureImage,
    leftover_containers: Callable[[Path], list[str]],
) -> None:
    good = fixture_images[0]
    rows = [
        row_for(good.ref, good.repo, good.commit_hash),
        row_for(missing_image, "ghostproj", "f" * 40),
        {**row_for(good.ref, "../evil", "e" * 40)},
        {**row_for(good.ref, "badimage", "d" * 40), "docker_image": "Not A Reference"},
        row_for(no_testbed_image.ref, no_testbed_image.repo, no_testbed_image.commit_hash),
    ]
    dataset_dir = tmp_path / "dataset"
    write_dataset(dataset_dir, rows, "train")
    cache_dir = tmp_path / "cache"
    done = run_cli("--dataset", dataset_dir, "--cache_dir", cache_dir, "--concurrency", "4")
    assert done.returncode == 1, done.stderr
    assert "Done: 1 cached, 0 skipped, 4 failed" in done.stdout
    failures = json.loads((cache_dir / "failures.json").read_text())
    assert set(failures) == {
        "ghostproj__ffffffffffff",
        "row-3",
        "row-4",
        instance_id(no_testbed_image),
    }
    assert "not found" in failures["ghostproj__ffffffffffff"]["reason"]
    assert "not a safe folder name" in failures["row-3"]["reason"]
    assert "malformed image reference" in failures["row-4"]["reason"]
    assert "has no /testbed" in failures[instance_id(no_testbed_image)]["reason"]
    assert list(read_index(cache_dir)) == [instance_id(good)]
    assert sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith(".")) == sorted(
        [instance_id(good), "index.json", "failures.json"]
    )
    assert_clean(cache_dir, leftover_containers)


def test_dry_run_lists_entries_and_needs_no_daemon(
    tmp_path: Path, sample_dataset: Dataset, fixture_images: list[FixtureImage]
) -> None:
    dataset_dir, split, _rows = sample_dataset
    cache_dir = tmp_path / "cache"
    env_backup = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = "unix:///nonexistent/docker.sock"
    try:
        done = run_cli(
            "--dataset",
            dataset_dir,
            "--split",
            split,
            "--cache_dir",
            cache_dir,
            "--dry_run",
            "--max-entries",
            "3",
        )
    finally:
        if env_backup is None:
            del os.environ["DOCKER_HOST"]
        else:
            os.environ["DOCKER_HOST"] = env_backup
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("would cache")]
    assert len(lines) == 3
    assert instance_id(fixture_images[0]) in lines[0] and fixture_images[0].ref in lines[0]
    assert "Dry run: 3 to cache, 0 already cached" in done.stdout
    assert not (cache_dir / "index.json").exists()


def test_skip_pull_uses_local_images_only(
    tmp_path: Path,
    fixture_images: list[FixtureImage],
    leftover_containers: Callable[[Path], list[str]],
) -> None:
    present, absent = fixture_images[0], fixture_images[1]
    subprocess.run(["docker", "pull", "-q", present.ref], check=True, capture_output=True)
    remove_local_image(absent.ref)
    rows = [row_for(image.ref, image.repo, image.commit_hash) for image in (present, absent)]
    dataset_dir = tmp_path / "dataset"
    write_dataset(dataset_dir, rows, "train")
    cache_dir = tmp_path / "cache"
    try:
        done = run_cli("--dataset", dataset_dir, "--cache_dir", cache_dir, "--skip_pull")
        assert done.returncode == 1, done.stderr
        failures = json.loads((cache_dir / "failures.json").read_text())
        assert list(failures) == [instance_id(absent)]
        assert "--skip_pull" in failures[instance_id(absent)]["reason"]
        assert list(read_index(cache_dir)) == [instance_id(present)]
        assert image_exists(present.ref), "an image this run did not pull was removed"
        assert not image_exists(absent.ref)
    finally:
        remove_local_image(present.ref)
    assert_clean(cache_dir, leftover_containers)


def test_no_skip_existing_re_extracts_and_replaces_the_folder(
    tmp_path: Path,
    fixture_images: list[FixtureImage],
    reference_trees: ReferenceTrees,
    leftover_containers: Callable[[Path], list[str]],
) -> None:
    image = fixture_images[0]
    dataset_dir = tmp_path / "dataset"
    write_dataset(dataset_dir, [row_for(image.ref, image.repo, image.commit_hash)], "train")
    cache_dir = tmp_path / "cache"
    assert run_cli("--dataset", dataset_dir, "--cache_dir", cache_dir).returncode == 0
    cached = cache_dir / instance_id(image)
    (cached / "stray-file-from-a-rollout").write_text("x")

    skipped = run_cli("--dataset", dataset_dir, "--cache_dir", cache_dir)
    assert "Done: 0 cached, 1 skipped, 0 failed" in skipped.stdout
    assert (cached / "stray-file-from-a-rollout").exists()

    again = run_cli("--dataset", dataset_dir, "--cache_dir", cache_dir, "--no-skip_existing")
    assert again.returncode == 0, again.stderr
    assert "Done: 1 cached, 0 skipped, 0 failed" in again.stdout
    assert not (cached / "stray-file-from-a-rollout").exists()
    expected = reference_trees.guarded(image.ref)
    assert not diff_deduplicated(expected, cached), diff_deduplicated(expected, cached)
    assert_clean(cache_dir, leftover_containers)


def test_unknown_split_is_a_one_line_usage_error(tmp_path: Path, sample_dataset: Dataset) -> None:
    dataset_dir, _split, _rows = sample_dataset
    done = run_cli("--dataset", dataset_dir, "--split", "nope", "--cache_dir", tmp_path / "c")
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "unknown split 'nope'" in done.stderr and "train" in done.stderr


def test_missing_cache_parent_is_a_usage_error_before_any_pull(
    tmp_path: Path, sample_dataset: Dataset
) -> None:
    dataset_dir, split, _rows = sample_dataset
    done = run_cli(
        "--dataset",
        dataset_dir,
        "--split",
        split,
        "--cache_dir",
        tmp_path / "no" / "such" / "parent",
    )
    assert done.returncode == 2
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr


def test_keep_images_leaves_the_pulled_images(
    tmp_path: Path,
    fixture_images: list[FixtureImage],
    leftover_containers: Callable[[Path], list[str]],
) -> None:
    images = fixture_images[:2]
    dataset_dir = tmp_path / "dataset"
    write_dataset(dataset_dir, [row_for(i.ref, i.repo, i.commit_hash) for i in images], "train")
    cache_dir = tmp_path / "cache"
    try:
        done = run_cli("--dataset", dataset_dir, "--cache_dir", cache_dir, "--keep-images")
        assert done.returncode == 0, done.stderr
        assert all(image_exists(image.ref) for image in images)
    finally:
        for image in images:
            remove_local_image(image.ref)
    assert_clean(cache_dir, leftover_containers)
