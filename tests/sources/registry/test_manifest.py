"""Manifests: platform selection in an index, manifests checked against their digest."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from asynccache.errors import (
    DigestMismatch,
    ImageNotFound,
)
from asynccache.sources.registry.manifest import (
    Descriptor,
    Platform,
    parse_platform,
    select_platform,
)
from tests.support import oci_fixtures as oci
from tests.support.fake_registry import (
    ZERO,
    FakeRegistry,
    backend,
    extract,
    fake_registry,
    sample_image,
)


def test_platform_selection() -> None:
    def entry(name: str, os_: str, arch: str, variant: str = "") -> Descriptor:
        digest = "sha256:" + hashlib.sha256(name.encode()).hexdigest()
        return Descriptor(oci.OCI_MANIFEST, digest, 1, Platform(os_, arch, variant))

    amd, arm, arm7 = (
        entry("a", "linux", "amd64"),
        entry("b", "linux", "arm64", "v8"),
        entry("c", "linux", "arm", "v7"),
    )
    attestation = entry("d", "unknown", "unknown")
    index = [attestation, arm7, arm, amd]
    assert select_platform(index, parse_platform("linux/amd64"), "i") == amd
    assert select_platform(index, parse_platform("linux/arm64"), "i") == arm
    assert select_platform(index, parse_platform("linux/aarch64/v8"), "i") == arm
    assert select_platform(index, parse_platform("linux/arm"), "i") == arm7
    with pytest.raises(ImageNotFound, match="no linux/s390x image"):
        select_platform(index, parse_platform("linux/s390x"), "i")
    with pytest.raises(ValueError):
        parse_platform("amd64")


@pytest.mark.anyio
async def test_manifest_not_matching_its_digest_is_refused(tmp_path: Path) -> None:
    registry = FakeRegistry()
    image = sample_image()
    registry.add("proj/app", "v1", image)
    registry.manifests[("proj/app", ZERO)] = (image.manifest, image.media_type)
    async with fake_registry(registry) as host, backend(tmp_path) as source:
        with pytest.raises(DigestMismatch):
            await extract(source, f"{host}/proj/app@{ZERO}", tmp_path / "d")
        assert await extract(source, f"{host}/proj/app@{image.digest}", tmp_path / "e") == {
            "a.txt": "a-one",
            "c.txt": "c",
        }
