"""What a run hands back: JSON for schedulers, exit codes, the terminal, a closed pipe."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from asynccache import Entry, cache_repos
from asynccache.cli.report import exit_code
from asynccache.errors import CacheError, DaemonUnavailable, PullFailed, RateLimitExhausted
from asynccache.sources.base import ExtractResult
from tests.support.cli_runner import (
    ROOT,
    cli_command,
    cli_env,
    instance_id,
    run_cli,
    run_in_pty,
    screen_lines,
)
from tests.support.fixtures import FixtureImage, row_for, rows_for, write_dataset

ISO_TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d ")


@pytest.fixture
def big_dataset(tmp_path: Path) -> Path:
    """A local split of 5,000 rows (no image needs to exist for a dry run)."""
    rows = [
        row_for(f"127.0.0.1:5000/acme/p{i}:{i:040x}", f"p{i}", f"{i:040x}") for i in range(5000)
    ]
    write_dataset(tmp_path / "big", rows, "train")
    return tmp_path / "big"


@pytest.fixture
def mixed_dataset(
    tmp_path: Path, fixture_images: list[FixtureImage], missing_image: str
) -> tuple[Path, list[FixtureImage]]:
    """Two fixture images and one image that does not exist, in this order."""
    images = fixture_images[:2]
    rows = [*rows_for(images), row_for(missing_image, "ghostproj", "f" * 40)]
    write_dataset(tmp_path / "mixed", rows, "train")
    return tmp_path / "mixed", images


# --- JSON for schedulers --------------------------------------------------------------------------


def test_dry_run_json_is_one_object_on_stdout(tmp_path: Path, big_dataset: Path) -> None:
    done = run_cli(
        "--dry_run", "--json", "--dataset", big_dataset, "--max_entries", "3",
        "--cache_dir", tmp_path / "cache", timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert done.stdout.count("\n") == 1
    assert report["command"] == "dry_run" and report["exit_code"] == 0
    assert report["dataset"] == str(big_dataset) and report["split"] == "train"
    assert report["revision"] is None and report["shard"] is None
    assert report["to_cache"] == 3 and report["cached"] == 0 and report["invalid"] == 0
    assert [e["instance_id"] for e in report["entries"]] == [f"p{i}__{'0' * 12}" for i in range(3)]
    # The human lines still come, on stderr.
    assert "Dry run: 3 to cache" in done.stderr
    shard = run_cli(
        "--dry_run", "--json", "--dataset", big_dataset, "--shard", "1/4",
        "--cache_dir", tmp_path / "cache", timeout=60,
    )  # fmt: skip
    assert shard.returncode == 0, shard.stderr
    sharded = json.loads(shard.stdout)
    assert sharded["shard"] == "1/4" and sharded["to_cache"] == 1250


def test_a_run_reports_as_json_with_every_failure(
    tmp_path: Path, mixed_dataset: tuple[Path, list[FixtureImage]]
) -> None:
    dataset, images = mixed_dataset
    cache_dir = tmp_path / "cache"
    done = run_cli("--dataset", dataset, "--cache_dir", cache_dir, "--json", "--concurrency", "3")
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["command"] == "run" and report["exit_code"] == 1
    assert (report["cached"], report["skipped"], report["failed"]) == (2, 0, 1)
    assert report["dataset"] == str(dataset) and report["split"] == "train"
    index = json.loads((cache_dir / "index.json").read_text())
    assert report["cached_bytes"] == sum(r["size_bytes"] for r in index.values())
    assert report["cached_bytes"] > 0 and report["seconds"] > 0
    assert report["stopped"] is None and report["retry_later"] is False
    [failure] = report["failures"]
    assert failure["instance_id"] == "ghostproj__ffffffffffff"
    assert "not found" in failure["reason"] and failure["retry_later"] is False
    assert sorted(index) == sorted(instance_id(i.repo, i.commit_hash) for i in images)
    # Logs and the summary lines are on stderr; stdout is the JSON object alone.
    assert "Done: 2 cached, 0 skipped, 1 failed" in done.stderr
    again = json.loads(run_cli("--dataset", dataset, "--cache_dir", cache_dir, "--json").stdout)
    assert (again["cached"], again["skipped"], again["failed"]) == (0, 2, 1)


def test_a_set_up_error_is_json_too(tmp_path: Path, big_dataset: Path) -> None:
    done = run_cli(
        "--json", "--dataset", big_dataset, "--split", "nosuch", "--cache_dir", tmp_path,
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    report = json.loads(done.stdout)
    assert report["exit_code"] == 2 and "unknown split 'nosuch'" in report["error"]
    assert done.stderr.startswith("asynccache: error: unknown split")


# --- exit codes -----------------------------------------------------------------------------------


class FailingSource:
    """Every entry fails with the given error while its image is fetched."""

    def __init__(self, error: CacheError) -> None:
        self.error = error

    async def prepare(self, entry: Entry) -> None:
        raise self.error

    async def extract_into(self, entry: Entry, dest: Path) -> ExtractResult:
        raise AssertionError("prepare failed: nothing to extract")

    async def after_extraction(self, entry: Entry) -> None:
        """Nothing to release."""


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("error", "code"),
    [
        (DaemonUnavailable("unix:///var/run/docker.sock", "connection refused"), 75),
        (RateLimitExhausted("acme/p:1", 3600), 75),
        (PullFailed("acme/p:1", "registry answered 500"), 1),
    ],
)
async def test_failures_a_later_run_can_fix_exit_75(
    tmp_path: Path, error: CacheError, code: int
) -> None:
    entries = [Entry("p__000000000001", "p", "acme/p:1", "1" * 40)]
    summary = await cache_repos(
        entries,
        cache_dir=tmp_path / "cache",
        source=FailingSource(error),
        retry_attempts=1,
    )
    assert summary.failed == 1
    [failure] = summary.failures
    assert failure.reason == str(error)
    assert failure.retry_later is (code == 75)
    assert exit_code(summary) == code


# --- the terminal ---------------------------------------------------------------------------------


def test_log_lines_print_above_the_live_bar_never_on_its_line(
    tmp_path: Path, mixed_dataset: tuple[Path, list[FixtureImage]]
) -> None:
    dataset, _images = mixed_dataset
    code, text = run_in_pty(
        "--dataset", dataset, "--cache_dir", tmp_path / "cache", "--concurrency", "1"
    )
    assert code == 1, text
    lines = screen_lines(text)
    bar = [line for line in lines if "caching" in line and "/min" in line]
    assert bar, text
    logged = [line for line in lines if "ghostproj__ffffffffffff failed:" in line]
    assert logged, text
    for line in logged:
        assert ISO_TIME.match(line), line
        assert "caching" not in line and "/min" not in line and "ETA" not in line, line
    assert "3/3" in bar[-1] and "2 cached, 0 skipped, 1 failed" in bar[-1]


def test_progress_modes(tmp_path: Path, mixed_dataset: tuple[Path, list[FixtureImage]]) -> None:
    dataset, _images = mixed_dataset
    cache_dir = tmp_path / "cache"
    first = run_cli("--dataset", dataset, "--cache_dir", cache_dir, "--progress", "none")
    assert first.returncode == 1, first.stderr
    assert "progress:" not in first.stderr and "caching" not in first.stderr
    # Later runs skip the cached entries: quick, and the display still counts them.
    code, text = run_in_pty("--dataset", dataset, "--cache_dir", cache_dir, "--progress", "plain")
    assert code == 1
    lines = screen_lines(text)
    assert any("progress: 3/3 done (0 cached, 2 skipped, 1 failed)" in line for line in lines)
    assert not any("━" in line for line in lines), text
    forced = run_cli("--dataset", dataset, "--cache_dir", cache_dir, "--progress", "bar")
    assert "━" in forced.stderr and "3/3" in forced.stderr
    assert "progress:" not in forced.stderr
    quiet_code, quiet = run_in_pty("-q", "--dataset", dataset, "--cache_dir", cache_dir)
    assert quiet_code == 1
    assert "━" not in quiet and "progress:" not in quiet
    assert "ghostproj__ffffffffffff failed:" in quiet  # warnings stay


def test_json_log_lines_carry_an_iso_time(tmp_path: Path, big_dataset: Path) -> None:
    done = run_cli(
        "--log_format", "json", "-v", "--dry_run", "--dataset", big_dataset,
        "--max_entries", "1", "--cache_dir", tmp_path, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    assert records, done.stderr
    for record in records:
        assert set(record) >= {"time", "level", "logger", "message"}
        assert ISO_TIME.match(record["time"] + " ")
    text = run_cli("-v", "--dry_run", "--dataset", big_dataset, "--max_entries", "1",
                   "--cache_dir", tmp_path, timeout=60)  # fmt: skip
    assert any(ISO_TIME.match(line) for line in text.stderr.splitlines()), text.stderr


# --- flags the backend ignores, a closed pipe -----------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "warning"),
    [
        (["--backend", "registry", "--skip_pull", "--keep_images"],
         "--skip_pull, --keep_images: ignored with --backend registry"),
        (["--registry_mirror", "http://mirror", "--platform", "linux/arm64"],
         "--platform, --registry_mirror: ignored with --backend docker"),
    ],
)  # fmt: skip
def test_flags_the_backend_ignores_get_one_line(
    tmp_path: Path, big_dataset: Path, flags: list[str], warning: str
) -> None:
    done = run_cli(
        "--dry_run", "--dataset", big_dataset, "--max_entries", "1", "--cache_dir", tmp_path,
        *flags, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "ignored with" in line]
    assert len(warnings) == 1 and warnings[0].endswith(warning)
    plain = run_cli("--dry_run", "--dataset", big_dataset, "--max_entries", "1",
                    "--cache_dir", tmp_path, timeout=60)  # fmt: skip
    assert "ignored with" not in plain.stderr
    # A variable is a standing setting: it applies where it can, without a warning.
    profile = run_cli("--dry_run", "--dataset", big_dataset, "--max_entries", "1",
                      "--cache_dir", tmp_path, "--backend", "registry", timeout=60,
                      ASYNCCACHE_SKIP_PULL="1", ASYNCCACHE_KEEP_IMAGES="yes")  # fmt: skip
    assert profile.returncode == 0 and "ignored with" not in profile.stderr


def test_a_closed_pipe_ends_quietly(tmp_path: Path, big_dataset: Path) -> None:
    command = " ".join(
        [*cli_command("--dry_run", "--dataset", big_dataset, "--cache_dir", tmp_path), "| head -1"]
    )
    done = subprocess.run(
        ["bash", "-c", f"{command}; echo exit=${{PIPESTATUS[0]}} >&2"],
        capture_output=True,
        text=True,
        env=cli_env(),
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert done.stdout.startswith("would cache  p0__000000000000")
    assert done.stdout.count("\n") == 1
    assert done.stderr == "exit=141\n", done.stderr


def test_a_reader_that_goes_away_midway_leaves_no_traceback(
    tmp_path: Path, big_dataset: Path
) -> None:
    process = subprocess.Popen(
        cli_command("--dry_run", "--dataset", big_dataset, "--cache_dir", tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
        cwd=ROOT,
    )
    assert process.stdout is not None and process.stderr is not None
    first: Any = process.stdout.readline()
    process.stdout.close()
    assert first.startswith(b"would cache")
    assert process.wait(120) == 141
    assert process.stderr.read() == b""
