"""The git guard end to end, through both backends, checked with the git CLI.

The fixture images' /testbed is a clone whose .git reaches past HEAD as R2E-Gym's do. A default
run must publish the same working tree as ``docker cp`` and a .git holding HEAD's whole history
and nothing past it; ``--keep_git_history`` must publish .git exactly as ``docker cp`` gives it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli_runner import instance_id, run_cli
from tests.support.fixtures import (
    FixtureImage,
    ReferenceTrees,
    diff_deduplicated,
    diff_snapshots,
    snapshot_tree,
    ungrouped,
    without_git,
)
from tests.support.leaky_repo import git_env

Dataset = tuple[Path, str, list[dict[str, Any]]]

#: Extra command-line arguments and environment of each backend (the registry one runs with
#: no reachable Docker daemon).
BACKENDS: dict[str, tuple[tuple[str, ...], dict[str, str]]] = {
    "docker": ((), {}),
    "registry": (("--backend", "registry"), {"DOCKER_HOST": "unix:///nonexistent"}),
}


def cache_with(
    backend: str, dataset: Dataset, cache_dir: Path, *args: str
) -> dict[str, dict[str, Any]]:
    """Run the CLI over the sample dataset; return index.json."""
    dataset_dir, split, rows = dataset
    extra, env = BACKENDS[backend]
    done = run_cli(
        *extra, "--dataset", dataset_dir, "--split", split, "--cache_dir", cache_dir,
        "--concurrency", "4", *args, **env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"Done: {len(rows)} cached, 0 skipped, 0 failed" in done.stdout
    return dict(json.loads((cache_dir / "index.json").read_text()))


def git(repo: Path, *args: str, check: bool = True) -> str:
    """git in a repository without writing to it (no index refresh by `git status`)."""
    proc = subprocess.run(
        ["git", *args],
        cwd=repo,
        env={**git_env(), "GIT_OPTIONAL_LOCKS": "0"},
        capture_output=True,
        text=True,
        check=False,
    )
    if check:
        assert proc.returncode == 0, f"git {' '.join(args)} in {repo}: {proc.stderr}"
    return proc.stdout


def assert_nothing_past_head(cached: Path, reference: Path) -> None:
    """One repository (a tree's or a submodule's) checked point by point with the git CLI."""
    head = git(reference, "rev-parse", "HEAD")
    assert git(cached, "rev-parse", "HEAD") == head
    assert git(cached, "rev-list", "HEAD") == git(reference, "rev-list", "HEAD")
    assert git(cached, "show", "--stat", "HEAD~2") == git(reference, "show", "--stat", "HEAD~2")
    assert git(cached, "status") == git(reference, "status")
    assert git(cached, "status", "--porcelain") == git(reference, "status", "--porcelain")
    for ref in git(cached, "for-each-ref", "--format=%(refname)").split():
        git(cached, "merge-base", "--is-ancestor", ref, "HEAD")
    assert git(cached, "remote") == ""
    later = set(git(reference, "rev-list", "--all").split()) - set(
        git(reference, "rev-list", "HEAD").split()
    )
    assert later, "the image's repository should reach past HEAD"
    proc = subprocess.run(
        ["git", "cat-file", "--batch-check"],
        cwd=cached,
        env=git_env(),
        input="".join(f"{oid}\n" for oid in sorted(later)),
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout == "".join(f"{oid} missing\n" for oid in sorted(later))
    assert git(cached, "stash", "list") == "" and git(cached, "notes", "list") == ""
    assert git(cached, "rev-parse", "--verify", "-q", "ORIG_HEAD", check=False) == ""
    assert git(cached, "rev-parse", "--verify", "-q", "FETCH_HEAD", check=False) == ""
    assert git(cached, "fsck", "--unreachable", "--no-progress") == ""
    git(cached, "fsck", "--full", "--no-progress")


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_published_repositories_reach_nothing_past_head(
    backend: str,
    tmp_path: Path,
    sample_dataset: Dataset,
    fixture_images: list[FixtureImage],
    reference_trees: ReferenceTrees,
) -> None:
    cache_dir = tmp_path / "cache"
    index = cache_with(backend, sample_dataset, cache_dir)
    for image in fixture_images:
        key = instance_id(image.repo, image.commit_hash)
        cached, reference = cache_dir / key, reference_trees.path(image.ref)
        assert index[key]["git_history"] == "head"
        # equal files share an inode (dedup): compared without hardlink groups, then the
        # image's own groups checked to stay
        working_tree = ungrouped(without_git(reference_trees[image.ref]))
        actual = without_git(snapshot_tree(cached, hardlinks=False))
        assert actual == working_tree, diff_snapshots(working_tree, actual)
        found = diff_deduplicated(reference_trees.guarded(image.ref), cached)
        assert not found, found
        assert (cached / ".git/index").read_bytes() == (reference / ".git/index").read_bytes()
        assert_nothing_past_head(cached, reference)
        if (reference / ".git/modules").is_dir():
            assert_nothing_past_head(cached / "vendor/lib", reference / "vendor/lib")
    verify = run_cli("verify", "--cache_dir", cache_dir)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    status = run_cli("status", "--cache_dir", cache_dir)
    assert f"git history: {len(fixture_images)} up to HEAD only, 0 full" in status.stdout


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_keep_git_history_publishes_git_as_docker_cp_gives_it(
    backend: str,
    tmp_path: Path,
    sample_dataset: Dataset,
    fixture_images: list[FixtureImage],
    reference_trees: ReferenceTrees,
) -> None:
    cache_dir = tmp_path / "cache"
    index = cache_with(backend, sample_dataset, cache_dir, "--keep_git_history")
    for image in fixture_images:
        key = instance_id(image.repo, image.commit_hash)
        assert index[key]["git_history"] == "full"
        found = diff_deduplicated(reference_trees[image.ref], cache_dir / key)
        assert not found, found
    verify = run_cli("verify", "--cache_dir", cache_dir, "--deep")
    assert verify.returncode == 0, verify.stdout + verify.stderr
    status = run_cli("status", "--cache_dir", cache_dir)
    assert f"git history: 0 up to HEAD only, {len(fixture_images)} full" in status.stdout
