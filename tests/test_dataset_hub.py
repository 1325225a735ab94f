"""Hub datasets through ``datasets`` and the Hugging Face cache: fetched once, then offline."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli_runner import instance_id, run_cli
from tests.support.fake_hub import HubRepo, fake_hub
from tests.support.fixtures import FixtureImage, row_for, rows_for

REPO_ID = "acme/tasks"
OLD, NEW = "1" * 40, "2" * 40


def fake_rows(count: int) -> list[dict[str, Any]]:
    return [
        row_for(f"127.0.0.1:5000/acme/proj{i}:{i:040x}", f"proj{i}", f"{i:040x}")
        for i in range(count)
    ]


@pytest.fixture
def repo() -> HubRepo:
    """Two commits: v1 (tag) holds 3 rows, main holds 4."""
    hub = HubRepo(REPO_ID)
    hub.add_commit(OLD, {"train": fake_rows(3), "dev": fake_rows(1)})
    hub.add_commit(NEW, {"train": fake_rows(4), "dev": fake_rows(1)})
    hub.refs.update(main=NEW, v1=OLD)
    return hub


def hf_env(tmp_path: Path, endpoint: str, **extra: str) -> dict[str, str]:
    """A fresh Hugging Face cache under tmp_path, and the Hub at ``endpoint``."""
    return {
        "HF_HOME": str(tmp_path / "hf"),
        "HF_ENDPOINT": endpoint,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        **extra,
    }


def dry_run(tmp_path: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(
        "--dry_run",
        "--dataset",
        REPO_ID,
        "--split",
        "train",
        "--cache_dir",
        tmp_path / "cache",
        *args,
        timeout=300,
        **env,
    )


def listed(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in done.stdout.splitlines() if line.startswith("would cache")]


def test_a_pinned_hub_split_is_fetched_once_then_read_offline(
    tmp_path: Path, repo: HubRepo
) -> None:
    with fake_hub(repo) as endpoint:
        online = dry_run(tmp_path, hf_env(tmp_path, endpoint), "--revision", "v1")
    assert online.returncode == 0, online.stderr
    assert "Generating" not in online.stderr and "\r" not in online.stderr  # no library bars
    assert len(listed(online)) == 3
    assert f"Dataset {REPO_ID} split train at revision {OLD}" in online.stdout
    assert any("/resolve/" in request and ".parquet" in request for request in repo.requests)
    assert list((tmp_path / "hf" / "hub").glob("datasets--acme--tasks/snapshots/*/data/*"))
    # Only the three needed columns went into the datasets cache.
    [info] = (tmp_path / "hf" / "datasets").glob("acme___tasks/*/*/*/dataset_info.json")
    features = json.loads(info.read_text())["features"]
    assert sorted(features) == ["commit_hash", "docker_image", "repo_name"]

    # The Hub is gone: the same rows come from the Hugging Face cache.
    repo.requests.clear()
    offline_env = hf_env(tmp_path, endpoint, HF_HUB_OFFLINE="1")
    for args in (["--revision", "v1"], ["--revision", OLD], []):
        offline = dry_run(tmp_path, offline_env, *args)
        assert offline.returncode == 0, (args, offline.stderr)
        assert listed(offline) == listed(online)
        assert f"at revision {OLD}" in offline.stdout
    assert repo.requests == []


def test_offline_a_revision_the_cache_does_not_hold_is_one_line(
    tmp_path: Path, repo: HubRepo
) -> None:
    with fake_hub(repo) as endpoint:
        assert dry_run(tmp_path, hf_env(tmp_path, endpoint), "--revision", "v1").returncode == 0
    offline_env = hf_env(tmp_path, endpoint, HF_HUB_OFFLINE="1")
    for revision in (NEW, "v2"):
        done = dry_run(tmp_path, offline_env, "--revision", revision)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
        assert f"--revision {revision}" in done.stderr
    never = dry_run(tmp_path, hf_env(tmp_path / "empty", endpoint, HF_HUB_OFFLINE="1"))
    assert never.returncode == 2 and "HF_HUB_OFFLINE" in never.stderr, never.stderr
    assert never.stderr.count("\n") == 1


def test_the_main_branch_is_the_default_and_an_unknown_revision_is_an_error(
    tmp_path: Path, repo: HubRepo
) -> None:
    with fake_hub(repo) as endpoint:
        env = hf_env(tmp_path, endpoint)
        latest = dry_run(tmp_path, env)
        unknown = dry_run(tmp_path, env, "--revision", "nosuch")
    assert latest.returncode == 0, latest.stderr
    assert len(listed(latest)) == 4 and f"at revision {NEW}" in latest.stdout
    assert unknown.returncode == 2
    assert "nosuch" in unknown.stderr and unknown.stderr.count("\n") == 1


def test_revision_is_refused_for_a_local_folder(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    done = run_cli("--dry_run", "--dataset", tmp_path, "--revision", "v1", timeout=60)
    assert done.returncode == 2 and "local folder" in done.stderr


def test_a_run_records_the_hub_revision_in_every_index_record(
    tmp_path: Path, fixture_images: list[FixtureImage]
) -> None:
    images = fixture_images[:2]
    repo = HubRepo(REPO_ID)
    repo.add_commit(OLD, {"train": rows_for(images)})
    repo.add_commit(NEW, {"train": rows_for(fixture_images)})
    repo.refs.update(main=NEW, v1=OLD)
    cache_dir = tmp_path / "cache"
    with fake_hub(repo) as endpoint:
        done = run_cli(
            "--dataset",
            REPO_ID,
            "--revision",
            "v1",
            "--cache_dir",
            cache_dir,
            "-v",
            **hf_env(tmp_path, endpoint),
        )
    assert done.returncode == 0, done.stderr
    assert f"Dataset {REPO_ID} split train at revision {OLD}" in done.stdout
    # The split's size is known before the first row: progress counts against it.
    assert f"progress: {len(images)}/{len(images)} done" in done.stderr
    index = json.loads((cache_dir / "index.json").read_text())
    assert sorted(index) == sorted(instance_id(i.repo, i.commit_hash) for i in images)
    for record in index.values():
        assert record["dataset"] == REPO_ID
        assert record["dataset_revision"] == OLD
        assert record["schema_version"] == 3
        meta = json.loads((cache_dir / ".meta" / f"{record['instance_id']}.json").read_text())
        assert meta["dataset_revision"] == OLD
