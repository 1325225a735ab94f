"""Daemon error messages become domain errors: permanent ones are never retried."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from asynccache.errors import ImageNotFound, PullFailed, RateLimited, Unauthorized
from asynccache.pipeline import is_transient
from asynccache.sources.docker_errors import classify_pull_error
from tests.support.cli_runner import ROOT, cli_command, cli_env
from tests.support.fixtures import write_dataset

IMAGE = "namanjain12/x_final:abc"


@pytest.mark.parametrize(
    ("message", "status", "kind", "transient"),
    [
        (
            "manifest for x:abc not found: manifest unknown: manifest unknown",
            404,
            ImageNotFound,
            False,
        ),
        (
            "pull access denied for x, repository does not exist or may require 'docker login'",
            0,
            ImageNotFound,
            False,
        ),
        ("unauthorized: authentication required", 401, Unauthorized, False),
        ("toomanyrequests: You have reached your pull rate limit.", 0, RateLimited, True),
        ("received unexpected HTTP status: 503 Service Unavailable", 500, PullFailed, True),
        ('Get "https://registry/v2/": dial tcp: connection refused', 500, PullFailed, True),
    ],
)
def test_pull_errors_are_classified(
    message: str, status: int, kind: type[Exception], transient: bool
) -> None:
    error = classify_pull_error(IMAGE, message, status)
    assert isinstance(error, kind)
    assert is_transient(error) is transient
    assert IMAGE in str(error)


@pytest.mark.parametrize(
    ("image", "message", "status"),
    [
        (
            "127.0.0.1:42909/namanjain12/x_final:abc",
            "No such image: 127.0.0.1:42909/namanjain12/x_final:abc",
            404,
        ),
        ("ratelimit/app:1", "manifest for ratelimit/app:1 not found: manifest unknown", 404),
        ("toomanyrequests/app:1", "pull access denied for toomanyrequests/app", 0),
    ],
)
def test_the_image_reference_never_decides_the_kind_of_error(
    image: str, message: str, status: int
) -> None:
    error = classify_pull_error(image, message, status)
    assert isinstance(error, ImageNotFound), error
    assert is_transient(error) is False


def test_no_daemon_at_all_is_one_line_naming_where_it_looked(tmp_path: Path) -> None:
    """Docker not installed or not started: no DOCKER_HOST, no socket anywhere it looks."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("this test hides the daemon's socket in a mount namespace: needs root")
        pytest.skip("needs root for a private mount namespace")
    dataset = tmp_path / "dataset"
    write_dataset(
        dataset,
        [{"repo_name": "r", "docker_image": "example.org/r:1", "commit_hash": "a" * 40}],
        split="test",
    )
    env = {k: v for k, v in cli_env().items() if k != "DOCKER_HOST"}
    env["HOME"] = str(tmp_path / "home")
    command = " ".join(
        shlex.quote(part)
        for part in cli_command(
            "--dataset", dataset, "--split", "test", "--cache_dir", tmp_path / "cache"
        )
    )
    done = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            f"mount -t tmpfs none /run && exec {command}",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if "no Docker daemon found" in line]
    assert len(errors) == 1, done.stderr
    assert "/var/run/docker.sock" in errors[0]
    assert "--backend registry" in errors[0]
