"""A reference that names no registry host fails its own row, with nothing pulled or sent."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.cli_runner import instance_id, run_cli
from tests.support.fixtures import FixtureImage, row_for, write_dataset


@pytest.mark.parametrize("backend", ["docker", "registry"])
def test_upper_case_first_components_fail_their_rows_and_the_others_go_on(
    tmp_path: Path,
    backend: str,
    fixture_images: list[FixtureImage],
    leftover_containers: Callable[[Path], list[str]],
) -> None:
    image = fixture_images[0]
    config = tmp_path / "docker" / "config.json"
    config.parent.mkdir()
    hub_login = base64.b64encode(b"hub-user:hub-secret").decode()
    config.write_text(json.dumps({"auths": {"https://index.docker.io/v1/": {"auth": hub_login}}}))
    rows = [
        row_for("LOCALHOST/x:1", "upper", "a" * 40),
        row_for("Evil/img:1", "evil", "b" * 40),
        row_for(image.ref, image.repo, image.commit_hash),
    ]
    write_dataset(tmp_path / "dataset", rows)
    cache_dir = tmp_path / "cache"
    env = {"DOCKER_CONFIG": str(config.parent)}
    if backend == "registry":
        env["DOCKER_HOST"] = "unix:///nonexistent"
    done = run_cli(
        *("--dataset", tmp_path / "dataset", "--cache_dir", cache_dir, "--backend", backend),
        **env,
    )
    assert done.returncode == 1, done.stderr
    assert "Done: 1 cached, 0 skipped, 2 failed" in done.stdout
    failures = json.loads((cache_dir / "failures.json").read_text())
    assert sorted(failures) == ["row-1", "row-2"]
    for key, written in (("row-1", "LOCALHOST/x:1"), ("row-2", "Evil/img:1")):
        reason = failures[key]["reason"]
        assert f"malformed image reference {written!r}" in reason
        assert "must be lowercase" in reason and "\n" not in reason
        assert f"FAILED {key}: row {key[4:]}: malformed image reference {written!r}" in done.stderr
    index = json.loads((cache_dir / "index.json").read_text())
    assert list(index) == [instance_id(image.repo, image.commit_hash)]
    assert leftover_containers(cache_dir) == []
