"""The command line of shards: ``--shard`` (and its errors), ``--dry_run`` of a shard, ``merge``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from asynccache.shards import SHARD_COUNT_VAR
from tests.support.cli_runner import run_cli
from tests.support.fixtures import row_for, write_dataset

REPOS = ("alpha", "beta", "gamma", "delta")


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A local split of 11 rows over four repositories (never pulled: dry runs only)."""
    rows = []
    for number in range(11):
        repo = REPOS[number % len(REPOS)]
        commit = f"{number + 1:012x}" + "e" * 28
        rows.append(row_for(f"registry.test/ns/{repo}_final:{commit}", repo, commit))
    folder = tmp_path / "dataset"
    write_dataset(folder, rows, "train")
    return folder


def would_cache(stdout: str) -> list[str]:
    return re.findall(r"^would cache  (\S+)", stdout, flags=re.MULTILINE)


def test_dry_run_of_each_shard_lists_its_share_and_together_all(
    tmp_path: Path, dataset: Path
) -> None:
    everything = run_cli("--dry_run", "--dataset", dataset, "--cache_dir", tmp_path / "c")
    assert everything.returncode == 0, everything.stderr
    shares = []
    for index in range(3):
        run = run_cli(
            "--dry_run",
            "--dataset",
            dataset,
            "--cache_dir",
            tmp_path / "c",
            "--shard",
            f"{index}/3",
        )
        assert run.returncode == 0, run.stderr
        assert f"Dry run, shard {index}/3: " in run.stdout
        shares.append(would_cache(run.stdout))
    assert sorted(len(share) for share in shares) == [3, 4, 4]
    assert sorted(i for share in shares for i in share) == sorted(would_cache(everything.stdout))


def test_shard_auto_reads_a_kubernetes_indexed_job_and_a_slurm_array(
    tmp_path: Path, dataset: Path
) -> None:
    args = ("--dry_run", "--dataset", dataset, "--cache_dir", tmp_path / "c")
    explicit = run_cli(*args, "--shard", "2/3")
    kubernetes = run_cli(
        *args, "--shard", "auto", JOB_COMPLETION_INDEX="2", **{SHARD_COUNT_VAR: "3"}
    )
    slurm = run_cli(
        *args,
        "--shard",
        "auto",
        SLURM_ARRAY_TASK_ID="3",
        SLURM_ARRAY_TASK_MIN="1",
        SLURM_ARRAY_TASK_MAX="3",
        SLURM_ARRAY_TASK_COUNT="3",
    )
    for run in (explicit, kubernetes, slurm):
        assert run.returncode == 0, run.stderr
    assert would_cache(kubernetes.stdout) == would_cache(explicit.stdout)
    assert would_cache(slurm.stdout) == would_cache(explicit.stdout)


@pytest.mark.parametrize(
    ("value", "env", "needle"),
    [
        ("3/3", {}, "--shard 3/3: expected K/N"),
        ("auto", {}, "--shard auto: not a Slurm array task"),
        ("auto", {"JOB_COMPLETION_INDEX": "1"}, f"set {SHARD_COUNT_VAR}"),
    ],
)
def test_a_bad_shard_is_a_one_line_usage_error(
    tmp_path: Path, dataset: Path, value: str, env: dict[str, str], needle: str
) -> None:
    for var in ("SLURM_ARRAY_TASK_ID", "JOB_COMPLETION_INDEX", SHARD_COUNT_VAR):
        env.setdefault(var, "")
    run = run_cli("--dataset", dataset, "--cache_dir", tmp_path / "c", "--shard", value, **env)
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("asynccache: error: ")
    assert needle in lines[0]


def test_merge_of_a_folder_without_shards_and_of_none(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    run = run_cli("merge", "--cache_dir", empty)
    assert run.returncode == 0, run.stderr
    assert f"Merged 0 instances into {empty / 'index.json'} (0 new), 0 failures" in run.stdout
    report = json.loads(run_cli("merge", "--cache_dir", empty, "--json").stdout)
    assert report["records"] == 0 and report["complete"] is True
    missing = run_cli("merge", "--cache_dir", tmp_path / "absent")
    assert missing.returncode == 2
    assert (
        missing.stderr.strip()
        == f"asynccache: error: cache folder {tmp_path / 'absent'} does not exist"
    )


def test_merge_names_shards_that_are_not_done(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / ".shards").mkdir(parents=True)
    part = {"format": 1, "shard": "0/2", "state": "done", "rows": 0, "records": {}}
    (cache / ".shards" / "0-of-2.json").write_text(json.dumps(part))
    run = run_cli("merge", "--cache_dir", cache)
    assert run.returncode == 1
    assert "shard 1/2 missing" in run.stdout
    assert "shards: 1/2 done" in run.stdout
