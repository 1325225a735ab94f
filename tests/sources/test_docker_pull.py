"""The Docker source pulls a reference from its own registry, with that registry's login only."""

from __future__ import annotations

from pathlib import Path

import pytest

from asynccache.errors import InvalidReference
from asynccache.reference import parse_reference
from asynccache.sources.docker import DockerBackend, pull_params

ZERO = "sha256:" + "0" * 64


@pytest.mark.anyio
@pytest.mark.parametrize("image", ["LOCALHOST/x:1", "Evil/img:1"])
async def test_a_reference_naming_no_host_is_refused_before_any_auth_header(
    tmp_path: Path, image: str
) -> None:
    # Never connected: the refusal comes before the daemon, or any header, is reached.
    source = DockerBackend(tmp_path)
    with pytest.raises(InvalidReference, match="must be lowercase"):
        await source.pull(image)


@pytest.mark.parametrize(
    ("image", "params"),
    [
        ("busybox", {"fromImage": "docker.io/library/busybox", "tag": "latest"}),
        ("namanjain12/x_final:abc", {"fromImage": "docker.io/namanjain12/x_final", "tag": "abc"}),
        ("127.0.0.1:5000/a/b:c", {"fromImage": "127.0.0.1:5000/a/b", "tag": "c"}),
        ("localhost/x", {"fromImage": "localhost/x", "tag": "latest"}),
        (f"ghcr.io/o/r:t@{ZERO}", {"fromImage": "ghcr.io/o/r", "tag": ZERO}),
    ],
)
def test_pull_parameters_name_the_registry_of_the_reference(
    image: str, params: dict[str, str]
) -> None:
    assert pull_params(parse_reference(image)) == params
