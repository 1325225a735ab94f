"""status: cached, missing and failed instances, in all and per repository."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

from asynccache._fs import write_json_atomic
from asynccache.cache.index import read_index
from asynccache.cache.status import cache_status, format_status
from asynccache.cli import maintenance as maintenance_cli
from tests.support.cache_trees import cache_instance
from tests.support.cli_runner import run_cli
from tests.support.fixtures import row_for

GAMMA = "gamma__cccccccccccc"


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, timeout=120, module="asynccache.cli.maintenance")


def test_status_counts_cached_missing_failed_per_repo(cache_dir: Path) -> None:
    cache_instance(cache_dir, "alpha", "d" * 40)
    shutil.rmtree(cache_dir / GAMMA)
    failures = {
        "delta__eeeeeeeeeeee": {"docker_image": "x/delta:e", "reason": "image not found"},
        "alpha__ffffffffffff": {"docker_image": "x/alpha:f", "reason": "no /testbed"},
    }
    write_json_atomic(cache_dir / "failures.json", failures)
    report = cache_status(cache_dir)
    assert (report.cached, report.missing, report.failed) == (3, 1, 2)
    index = read_index(cache_dir / "index.json")
    cached_size = sum(index[key]["size_bytes"] for key in index if key != GAMMA)
    assert report.size_bytes == cached_size
    alpha = report.per_repo["alpha"]
    assert (alpha.cached, alpha.missing, alpha.failed) == (2, 0, 1)
    assert (report.per_repo["gamma"].missing, report.per_repo["delta"].failed) == (1, 1)
    assert report.missing_ids == [GAMMA]
    text = format_status(report)
    assert "3 cached" in text and "1 missing" in text and "2 failed" in text
    assert any(line.startswith("alpha") for line in text.splitlines())


def test_status_against_dataset_rows(cache_dir: Path) -> None:
    write_json_atomic(
        cache_dir / "failures.json",
        {"delta__eeeeeeeeeeee": {"docker_image": "x/delta:e", "reason": "image not found"}},
    )
    image = "127.0.0.1:5000/namanjain12/{}_final:{}"
    rows = [
        row_for(image.format("alpha", "a" * 40), "alpha", "a" * 40),
        row_for(image.format("delta", "e" * 40), "delta", "e" * 40),
        row_for(image.format("omega", "0" * 40), "omega", "0" * 40),
        row_for(image.format("omega", "0" * 40), "omega", "0" * 40),
        {**row_for(image.format("x", "1" * 40), "x", "1" * 40), "docker_image": "Not A Ref"},
    ]
    report = cache_status(cache_dir, rows)
    assert (report.cached, report.missing, report.failed) == (1, 1, 1)
    assert report.invalid_rows == 1 and report.not_in_rows == 2
    assert report.missing_ids == ["omega__000000000000"]
    assert "2 cached instances are not in the split" in format_status(report)


def test_status_command(cache_dir: Path, tmp_path: Path) -> None:
    done = run("status", "--cache_dir", cache_dir)
    assert done.returncode == 0, done.stderr
    assert "3 cached" in done.stdout and "beta" in done.stdout
    as_json = run("status", "--cache_dir", cache_dir, "--json")
    assert json.loads(as_json.stdout)["cached"] == 3
    assert maintenance_cli.main(["verify", "--cache_dir", str(cache_dir), "--json"]) == 0


def test_status_counts_the_trees_that_keep_full_git_history(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache_instance(cache, "alpha", "a" * 40, extra={"git_history": "head"})
    cache_instance(cache, "alpha", "b" * 40, extra={"git_history": "head"})
    cache_instance(cache, "beta", "c" * 40, extra={"git_history": "full"})
    cache_instance(cache, "beta", "d" * 40)  # cached before the guard: history as the image had
    report = cache_status(cache)
    assert (report.cached, report.full_history) == (4, 2)
    assert "git history: 2 up to HEAD only, 2 full" in format_status(report)
    as_json = run("status", "--cache_dir", cache, "--json")
    assert json.loads(as_json.stdout)["full_history"] == 2
