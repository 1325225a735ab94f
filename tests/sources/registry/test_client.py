"""The registry client's requests: redirects followed without leaking the Authorization."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.fake_registry import (
    Cdn,
    FakeRegistry,
    backend,
    extract,
    fake_registry,
    sample_image,
    serving,
)


@pytest.mark.anyio
async def test_blob_redirect_to_another_host_drops_the_authorization(tmp_path: Path) -> None:
    registry = FakeRegistry()
    image = sample_image()
    registry.add("proj/app", "v1", image)
    cdn = Cdn(image.blobs)
    async with serving(cdn.handle) as cdn_base, fake_registry(registry) as host:
        registry.redirect_blobs_to = cdn_base
        async with backend(tmp_path) as source:
            got = await extract(source, f"{host}/proj/app:v1", tmp_path / "d")
    assert got == {"a.txt": "a-one", "c.txt": "c"}
    assert len(cdn.seen) == 3
    assert cdn.seen == [None, None, None]
