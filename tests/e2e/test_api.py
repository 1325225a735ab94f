"""The caching job as coroutines inside a trainer's own event loop."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from asynccache import Outcome, cache_repos, cache_repos_stream
from asynccache.config import CONTAINER_LABEL
from tests.support.fixtures import (
    FixtureImage,
    ReferenceTrees,
    diff_deduplicated,
    docker,
    image_exists,
    row_for,
)


def rows_of(images: list[FixtureImage]) -> list[dict[str, object]]:
    return [row_for(image.ref, image.repo, image.commit_hash) for image in images]


def test_cache_repos_never_blocks_a_running_asyncio_loop(
    tmp_path: Path,
    fixture_images: list[FixtureImage],
    reference_trees: ReferenceTrees,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def trainer() -> list[Outcome]:
        loop = asyncio.get_running_loop()
        loop.slow_callback_duration = 0.1
        summary = await cache_repos(
            rows_of(fixture_images), cache_dir=tmp_path / "cache", concurrency=4
        )
        return summary.outcomes

    with caplog.at_level(logging.WARNING, logger="asyncio"):
        outcomes = asyncio.run(trainer(), debug=True)
    slow = [record.getMessage() for record in caplog.records if "Executing" in record.getMessage()]
    assert slow == [], slow
    assert sorted(o.status for o in outcomes) == ["cached"] * len(fixture_images)
    for image in fixture_images:
        cached = tmp_path / "cache" / f"{image.repo}__{image.commit_hash[:12]}"
        expected = reference_trees.guarded(image.ref)
        assert not diff_deduplicated(expected, cached), diff_deduplicated(expected, cached)


def test_cache_repos_runs_on_uvloop_and_takes_the_cli_options(
    tmp_path: Path, fixture_images: list[FixtureImage]
) -> None:
    async def trainer() -> tuple[int, int]:
        first = await cache_repos(
            rows_of(fixture_images[:2]), cache_dir=tmp_path / "cache", max_entries=1
        )
        again = await cache_repos(
            rows_of(fixture_images[:2]), cache_dir=tmp_path / "cache", skip_existing=True
        )
        return first.cached, again.skipped

    assert anyio.run(trainer, backend_options={"use_uvloop": True}) == (1, 1)
    with pytest.raises(TypeError):
        anyio.run(lambda: cache_repos([], cache_dir=tmp_path / "c", no_such_option=1))


@pytest.mark.anyio
async def test_stream_yields_each_outcome_as_it_completes(
    tmp_path: Path, fixture_images: list[FixtureImage], missing_image: str
) -> None:
    rows = [*rows_of(fixture_images[:3]), row_for(missing_image, "ghostproj", "a" * 40)]
    seen: dict[str, str] = {}
    async with cache_repos_stream(rows, cache_dir=tmp_path / "cache", concurrency=2) as outcomes:
        async for outcome in outcomes:
            seen[outcome.instance_id] = outcome.status
    assert sorted(seen.values()) == ["cached", "cached", "cached", "failed"]
    assert seen["ghostproj__aaaaaaaaaaaa"] == "failed"


def test_a_container_an_earlier_run_left_late_is_removed_at_the_end(
    tmp_path: Path,
    fixture_images: list[FixtureImage],
    leftover_containers: Callable[[Path], list[str]],
) -> None:
    """A killed run's container create can land after the next run's first sweep."""
    cache_dir = tmp_path / "cache"
    image = fixture_images[0].ref
    pulled = not image_exists(image)
    if pulled:
        docker("pull", "--quiet", image)
    late: list[str] = []

    def create_late(_outcome: Outcome) -> None:
        if not late:  # as the daemon would, once the next run is under way
            created = docker("create", "--label", f"{CONTAINER_LABEL}={cache_dir}", image)
            late.append(created.stdout.decode().strip())

    try:
        summary = anyio.run(
            lambda: cache_repos(
                rows_of(fixture_images[:2]), cache_dir=cache_dir, on_outcome=create_late
            )
        )
        assert summary.cached == 2
        assert late and leftover_containers(cache_dir) == []
    finally:
        for container in late:
            docker("rm", "-f", container, check=False)
        if pulled:
            docker("rmi", image, check=False)
