"""Subcommands, global flags and configuration by environment: the command line as users meet it."""

from __future__ import annotations

import argparse
from importlib.metadata import version
from pathlib import Path

import pytest

from asynccache.cli.app import CommandLine
from asynccache.errors import SetupError
from tests.support.cli_runner import run_cli
from tests.support.fixtures import row_for, write_dataset


def parse(*argv: str | Path, **environ: str) -> argparse.Namespace:
    return CommandLine().parse([str(a) for a in argv], environ)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    """A local dataset of two splits with two rows each (no image needs to exist)."""
    folder = tmp_path / "dataset"
    for split in ("train", "dev"):
        rows = [
            row_for(f"127.0.0.1:5000/{split}/proj{i}:{i:040x}", f"proj{i}", f"{i:040x}")
            for i in range(2)
        ]
        write_dataset(folder, rows, split)
    return folder


# --- subcommands ----------------------------------------------------------------------------------


def test_caching_is_the_default_command() -> None:
    args = parse("--split", "dev", "--concurrency", "3")
    assert args.command == "run" and args.split == "dev" and args.concurrency == 3
    assert parse().command == "run"
    assert parse("run", "--split", "dev").split == "dev"


def test_global_flags_go_before_or_after_the_subcommand(tmp_path: Path) -> None:
    before = parse("-v", "--cache_dir", tmp_path, "--log_format", "json", "verify", "--deep")
    after = parse("verify", "--deep", "-v", "--cache-dir", tmp_path, "--log-format", "json")
    for args in (before, after):
        assert args.command == "verify" and args.deep
        assert args.cache_dir == tmp_path and args.log_format == "json" and args.verbose == 1
    assert parse("-v", "status", "-v", "-q").verbose == 2
    assert parse("-q", "status", "-q").quiet == 2
    # A value given before the subcommand stays when none is given after it.
    assert parse("--cache_dir", tmp_path, "status").cache_dir == tmp_path
    # The default command takes them anywhere among its own flags.
    args = parse("-q", "--split", "dev", "-q", "--cache_dir", tmp_path)
    assert args.command == "run" and args.quiet == 2 and args.cache_dir == tmp_path


def test_a_mistyped_command_is_an_invalid_choice_with_usage_and_a_suggestion() -> None:
    done = run_cli("vrify", "--cache_dir", "/nowhere", timeout=60)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[0].startswith("usage: asynccache")
    assert "invalid choice: 'vrify'" in lines[-1] and "did you mean 'verify'?" in lines[-1]
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_an_unknown_flag_of_the_default_command_is_a_usage_error() -> None:
    done = run_cli("--bogus", timeout=60)
    assert done.returncode == 2
    assert "unrecognized arguments: --bogus" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("level", ["0", "23", "x"])
def test_a_zstd_level_zstd_would_clamp_is_a_usage_error(level: str, tmp_path: Path) -> None:
    done = run_cli("export", "--cache_dir", tmp_path, "--zstd_level", level, timeout=60)
    assert done.returncode == 2 and done.stdout == ""
    last = done.stderr.strip().splitlines()[-1]
    assert last.endswith(f"not a zstd level: '{level}' (1 to 22; 3 is quick, 19 small)")
    assert parse("export", "--cache_dir", tmp_path, "--zstd_level", "19").zstd_level == 19


def test_version_prints_the_package_version() -> None:
    for argv in (["--version"], ["verify", "--version"]):
        done = run_cli(*argv, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"asynccache {version('asynccache')}"


def test_help_lists_the_commands_and_every_variable() -> None:
    done = run_cli("--help", timeout=60)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    for command in ("run:", "verify:", "status:"):
        assert command in text
    for name in ("CACHE_DIR", "CONCURRENCY", "SKIP_EXISTING", "INSECURE_REGISTRY", "VERBOSE"):
        assert f"[env ASYNCCACHE_{name}]" in text
    verify_help = " ".join(run_cli("verify", "--help", timeout=60).stdout.split())
    assert "[env ASYNCCACHE_DEEP]" in verify_help and "[env ASYNCCACHE_CACHE_DIR]" in verify_help


# --- configuration by environment -----------------------------------------------------------------


def test_every_option_has_a_variable_and_the_flag_wins() -> None:
    env = {
        "ASYNCCACHE_SPLIT": "dev",
        "ASYNCCACHE_CONCURRENCY": "5",
        "ASYNCCACHE_SKIP_EXISTING": "no",
        "ASYNCCACHE_SKIP_PULL": "1",
        "ASYNCCACHE_INSECURE_REGISTRY": "a:5000, b",
        "ASYNCCACHE_BACKEND": "registry",
        "ASYNCCACHE_VERBOSE": "2",
        "ASYNCCACHE_LOG_FORMAT": "json",
        "ASYNCCACHE_CACHE_DIR": "/from/env",
    }
    args = parse(**env)
    assert args.split == "dev" and args.concurrency == 5 and args.backend == "registry"
    assert args.skip_existing is False and args.skip_pull is True
    assert args.insecure_registry == ["a:5000", "b"]
    assert args.verbose == 2 and args.log_format == "json"
    assert args.cache_dir == Path("/from/env")
    flags = parse(
        "--split", "train", "--concurrency", "7", "--skip_existing", "--cache_dir", "/x", **env
    )
    assert flags.split == "train" and flags.concurrency == 7 and flags.skip_existing is True
    assert flags.cache_dir == Path("/x")
    assert parse("verify", ASYNCCACHE_DEEP="true", ASYNCCACHE_JOBS="3").jobs == 3


def test_a_variable_is_read_only_by_the_commands_that_have_its_option() -> None:
    # --deep belongs to verify: a bad value does not stop a caching run.
    assert parse("--split", "dev", ASYNCCACHE_DEEP="maybe").split == "dev"
    with pytest.raises(SetupError, match="ASYNCCACHE_DEEP='maybe'"):
        parse("verify", ASYNCCACHE_DEEP="maybe")


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("ASYNCCACHE_CONCURRENCY", "many", "not an integer"),
        ("ASYNCCACHE_CP_TIMEOUT", "soon", "not a number"),
        ("ASYNCCACHE_BACKEND", "podman", "expected one of docker, registry"),
        ("ASYNCCACHE_SKIP_PULL", "perhaps", "expected 1/true/yes/on or 0/false/no/off"),
        ("ASYNCCACHE_VERBOSE", "-1", "expected a count (0, 1, 2, ...)"),
        ("ASYNCCACHE_LOG_FORMAT", "xml", "expected one of text, json"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(
    tmp_path: Path, name: str, value: str, expected: str
) -> None:
    done = run_cli("--dry_run", "--cache_dir", tmp_path, timeout=60, **{name: value})
    assert done.returncode == 2
    assert done.stderr == f"asynccache: error: {name}={value!r}: {expected}\n"


def test_a_value_out_of_range_names_the_variable_it_came_from(
    tmp_path: Path, dataset: Path
) -> None:
    done = run_cli("--dataset", dataset, "--dry_run", timeout=60, ASYNCCACHE_CONCURRENCY="0")
    assert done.returncode == 2
    assert done.stderr == (
        "asynccache: error: --concurrency (from ASYNCCACHE_CONCURRENCY=0) must be at least 1\n"
    )
    flag = run_cli("--dataset", dataset, "--dry_run", "--concurrency", "0", timeout=60)
    assert flag.stderr == "asynccache: error: --concurrency must be at least 1\n"


def test_daemon_wait_comes_from_its_flag_or_variable_and_is_never_negative(dataset: Path) -> None:
    assert parse().daemon_wait == 600.0
    assert parse(ASYNCCACHE_DAEMON_WAIT="30").daemon_wait == 30.0
    assert parse("--daemon_wait", "5", ASYNCCACHE_DAEMON_WAIT="30").daemon_wait == 5.0
    assert parse("--daemon-wait", "0").daemon_wait == 0.0
    done = run_cli("--dataset", dataset, "--dry_run", timeout=60, ASYNCCACHE_DAEMON_WAIT="-1")
    assert done.returncode == 2
    assert done.stderr == (
        "asynccache: error: --daemon_wait (from ASYNCCACHE_DAEMON_WAIT=-1) must not be negative\n"
    )


def test_variables_configure_a_real_run(tmp_path: Path, dataset: Path) -> None:
    done = run_cli(
        timeout=60,
        ASYNCCACHE_DATASET=str(dataset),
        ASYNCCACHE_SPLIT="dev",
        ASYNCCACHE_DRY_RUN="1",
        ASYNCCACHE_CACHE_DIR=str(tmp_path / "cache"),
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("would cache") == 2 and "/dev/proj0:" in done.stdout
    assert f"cache {tmp_path / 'cache'}" in done.stdout
    # The flag wins over the variable.
    flag = run_cli(
        "--split",
        "train",
        timeout=60,
        ASYNCCACHE_DATASET=str(dataset),
        **{
            "ASYNCCACHE_SPLIT": "nosuch",
            "ASYNCCACHE_DRY_RUN": "yes",
            "ASYNCCACHE_CACHE_DIR": str(tmp_path / "cache"),
        },
    )
    assert flag.returncode == 0, flag.stderr
    assert "/train/proj1:" in flag.stdout


def test_maintenance_commands_read_the_cache_folder_from_before_or_after(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    for argv in (
        ["--cache_dir", tmp_path / "cache", "status"],
        ["status", "--cache_dir", tmp_path / "cache"],
    ):
        done = run_cli(*argv, timeout=60)
        assert done.returncode == 0, done.stderr
    missing = run_cli("-q", "verify", timeout=60, ASYNCCACHE_CACHE_DIR=str(tmp_path / "none"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
