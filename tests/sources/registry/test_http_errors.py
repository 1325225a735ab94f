"""Registry answers become domain errors: not found, transient server errors, refused hosts."""

from __future__ import annotations

from pathlib import Path

import pytest

from asynccache.errors import (
    ImageNotFound,
    NoTestbed,
    PullFailed,
)
from tests.support import oci_fixtures as oci
from tests.support.fake_registry import (
    FakeRegistry,
    backend,
    extract,
    fake_registry,
    sample_image,
)
from tests.support.oci_fixtures import file, layer


@pytest.mark.anyio
async def test_registry_errors_become_domain_errors(tmp_path: Path) -> None:
    registry = FakeRegistry()
    registry.add("proj/app", "v1", sample_image())
    registry.add("proj/empty", "v1", oci.build_image([layer(file("etc/x", "x"))]))
    async with fake_registry(registry) as host, backend(tmp_path) as source:
        with pytest.raises(ImageNotFound, match="HTTP 404"):
            await extract(source, f"{host}/proj/app:missing", tmp_path / "a")
        registry.server_errors = 1
        with pytest.raises(PullFailed, match="503") as caught:
            await extract(source, f"{host}/proj/app:v1", tmp_path / "b")
        assert caught.value.transient
        with pytest.raises(NoTestbed, match="has no /testbed"):
            await extract(source, f"{host}/proj/empty:v1", tmp_path / "c")
    async with backend(tmp_path) as source:
        with pytest.raises(PullFailed) as refused:
            await extract(source, "127.0.0.1:9/proj/app:v1", tmp_path / "d")
        assert refused.value.transient
