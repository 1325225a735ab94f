"""Endpoints: loopback hosts, the Docker Hub mirror, insecure registries over HTTP or TLS."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from aiohttp import web

from asynccache.errors import (
    TlsFailed,
)
from asynccache.sources.registry.endpoints import is_loopback
from tests.support.fake_registry import (
    FakeRegistry,
    backend,
    extract,
    fake_registry,
    non_loopback_address,
    sample_image,
    self_signed_tls,
    serving,
)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1:5000", True),
        ("127.1.2.3", True),
        ("localhost:80", True),
        ("[::1]:5000", True),
        ("10.0.0.1:5000", False),
        ("registry-1.docker.io", False),
        ("localhost.example.com", False),
    ],
)
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.anyio
async def test_docker_hub_images_come_from_the_mirror(tmp_path: Path) -> None:
    registry = FakeRegistry()
    registry.add("library/sample", "latest", sample_image("hub"))
    registry.add("namanjain12/proj_final", "abc", sample_image("nj"))
    async with (
        fake_registry(registry) as host,
        backend(tmp_path, registry_mirror=f"http://{host}") as source,
    ):
        assert (await extract(source, "sample", tmp_path / "a"))["a.txt"] == "a-hub"
        got = await extract(source, "namanjain12/proj_final:abc", tmp_path / "b")
        assert got["a.txt"] == "a-nj"


@pytest.mark.anyio
async def test_an_insecure_registry_without_tls_is_reached_over_plain_http(tmp_path: Path) -> None:
    registry = FakeRegistry(auth="none")
    registry.add("proj/app", "v1", sample_image("plain"))
    address = non_loopback_address()
    async with serving(registry.handle, host=address) as base:
        host = base.removeprefix("http://")
        image = f"{host}/proj/app:v1"
        async with backend(tmp_path, insecure_registries=[host]) as source:
            assert (await extract(source, image, tmp_path / "a"))["a.txt"] == "a-plain"
        assert registry.counts["GET manifests"] == 1
        # not named insecure: HTTPS only, so this plain HTTP registry cannot be used
        async with backend(tmp_path) as source:
            advice = re.escape(f"pass --insecure_registry {host}")
            with pytest.raises(TlsFailed, match=advice) as refused:
                await extract(source, image, tmp_path / "b")
        assert not refused.value.transient
        assert registry.counts["GET manifests"] == 1


@pytest.mark.anyio
async def test_an_insecure_registry_with_a_self_signed_certificate_keeps_tls(
    tmp_path: Path,
) -> None:
    registry = FakeRegistry(auth="none")
    registry.add("proj/app", "v1", sample_image("tls"))
    schemes: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        schemes.append(request.scheme)
        return await registry.handle(request)

    address = non_loopback_address()
    async with serving(handle, host=address, tls=self_signed_tls(tmp_path, address)) as base:
        host = base.removeprefix("https://")
        image = f"{host}/proj/app:v1"
        async with backend(tmp_path, insecure_registries=[host]) as source:
            assert (await extract(source, image, tmp_path / "a"))["a.txt"] == "a-tls"
        assert registry.counts["GET manifests"] == 1
        assert schemes and set(schemes) == {"https"}
        # not named insecure: the certificate is verified, and refused
        async with backend(tmp_path) as source:
            with pytest.raises(TlsFailed, match=r"certificate verify failed.*--insecure_registry"):
                await extract(source, image, tmp_path / "b")
        assert registry.counts["GET manifests"] == 1
