"""A shard's run sweeps only its own leftover containers: the other shards share the daemon."""

from __future__ import annotations

from pathlib import Path

import anyio

from asynccache.config import CONTAINER_LABEL, SHARD_LABEL
from asynccache.sources.docker import DockerBackend
from tests.support.fixtures import FixtureImage, docker, image_exists


def labelled_container(image: str, cache_dir: Path, shard: str | None) -> str:
    labels = ["--label", f"{CONTAINER_LABEL}={cache_dir}"]
    if shard is not None:
        labels += ["--label", f"{SHARD_LABEL}={shard}"]
    return docker("create", *labels, image).stdout.decode().strip()


def exists(container: str) -> bool:
    return docker("container", "inspect", container, check=False).returncode == 0


def test_a_shard_sweeps_its_own_containers_and_a_whole_run_every_one(
    tmp_path: Path, fixture_images: list[FixtureImage]
) -> None:
    cache_dir = tmp_path / "cache"
    image = fixture_images[0].ref
    pulled = not image_exists(image)
    if pulled:
        docker("pull", "--quiet", image)
    created = {
        name: labelled_container(image, cache_dir, shard)
        for name, shard in (("mine", "0-of-2"), ("other", "1-of-2"), ("whole", None))
    }

    async def sweep(shard_name: str | None) -> int:
        async with DockerBackend(cache_dir, shard_name=shard_name) as backend:
            return await backend.remove_leaked_containers()

    try:
        assert anyio.run(sweep, "0-of-2") == 1
        assert not exists(created["mine"])
        assert exists(created["other"]) and exists(created["whole"])
        assert anyio.run(sweep, None) == 2  # a whole run holds the folder alone
        assert not exists(created["other"]) and not exists(created["whole"])
    finally:
        for container in created.values():
            docker("rm", "-f", container, check=False)
        if pulled:
            docker("rmi", image, check=False)
