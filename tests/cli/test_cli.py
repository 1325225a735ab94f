"""The command line: progress display, event loop, configuration from the environment."""

from __future__ import annotations

import os
import pty
import subprocess
from pathlib import Path
from typing import Any

from tests.support.cli_runner import ROOT, cli_command, cli_env, run_cli
from tests.support.fixtures import FixtureImage


def test_terminal_gets_a_live_progress_bar(
    tmp_path: Path,
    sample_dataset: tuple[Path, str, list[dict[str, Any]]],
    fixture_images: list[FixtureImage],
) -> None:
    dataset_dir, split, _rows = sample_dataset
    main, child = pty.openpty()
    run = subprocess.Popen(
        cli_command(
            "--dataset",
            dataset_dir,
            "--split",
            split,
            "--cache_dir",
            tmp_path / "cache",
            "--concurrency",
            "4",
        ),
        stdin=child,
        stdout=child,
        stderr=child,
        env=cli_env(COLUMNS="160"),
        cwd=ROOT,
    )
    os.close(child)
    output = b""
    while True:
        try:
            data = os.read(main, 65536)
        except OSError:
            break
        if not data:
            break
        output += data
    assert run.wait(120) == 0
    text = output.decode(errors="replace")
    total = len(fixture_images)
    assert f"{total}/{total}" in text
    assert f"{total} cached, 0 skipped, 0 failed" in text
    assert "/min" in text and "ETA" in text
    assert "progress:" not in text, "a terminal gets the bar, not log lines"


def test_plain_log_lines_when_not_a_terminal_and_uvloop_is_the_loop(
    tmp_path: Path,
    sample_dataset: tuple[Path, str, list[dict[str, Any]]],
    fixture_images: list[FixtureImage],
) -> None:
    dataset_dir, split, _rows = sample_dataset
    done = run_cli(
        "--dataset", dataset_dir, "--split", split, "--cache_dir", tmp_path / "cache", "-v"
    )
    assert done.returncode == 0, done.stderr
    total = len(fixture_images)
    assert f"progress: {total}/{total} done ({total} cached, 0 skipped, 0 failed)" in done.stderr
    assert "event loop: uvloop" in done.stderr


def test_cache_dir_comes_from_the_environment_when_not_given(
    tmp_path: Path, sample_dataset: tuple[Path, str, list[dict[str, Any]]]
) -> None:
    dataset_dir, split, _rows = sample_dataset
    done = run_cli(
        "--dataset",
        dataset_dir,
        "--split",
        split,
        "--dry-run",
        ASYNCCACHE_CACHE_DIR=str(tmp_path / "envcache"),
    )
    assert done.returncode == 0, done.stderr
    assert f"cache {tmp_path / 'envcache'}" in done.stdout


def test_bad_flag_values_are_usage_errors(tmp_path: Path) -> None:
    for args in (["--concurrency", "0"], ["--cp_timeout", "-1"], ["--bogus"]):
        done = run_cli("--cache_dir", tmp_path, *args, timeout=60)
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr
