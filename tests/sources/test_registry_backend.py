"""The registry backend: references, auth, redirects, rate limits, and trees equal to docker cp."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import socket
import ssl
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web

from asynccache.api import cache_repos
from asynccache.entries import Entry, entry_from_row
from asynccache.errors import (
    DigestMismatch,
    ImageNotFound,
    InvalidReference,
    NoTestbed,
    PullFailed,
    TlsFailed,
    Unauthorized,
)
from asynccache.sources.ratelimit import PullGate
from asynccache.sources.registry.backend import RegistryBackend
from asynccache.sources.registry.client import (
    Descriptor,
    Platform,
    Reference,
    is_loopback,
    parse_platform,
    parse_reference,
    parse_www_authenticate,
    select_platform,
)
from asynccache.tree.digest import tree_stats
from tests.support import oci_fixtures as oci
from tests.support.cli_runner import instance_id
from tests.support.cli_runner import run_cli as run_asynccache
from tests.support.fixtures import (
    FixtureError,
    FixtureImage,
    ReferenceTrees,
    diff_snapshots,
    row_for,
    snapshot_tree,
    write_dataset,
)
from tests.support.oci_fixtures import file, folder, hardlink, layer, opaque, symlink, whiteout

Dataset = tuple[Path, str, list[dict[str, Any]]]
ZERO = "sha256:" + "0" * 64


# --- references, challenges, platforms --------------------------------------------------------


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ("namanjain12/x_final:abc", Reference("docker.io", "namanjain12/x_final", "abc")),
        ("ubuntu", Reference("docker.io", "library/ubuntu")),
        ("ubuntu:22.04", Reference("docker.io", "library/ubuntu", "22.04")),
        ("docker.io/library/ubuntu:1", Reference("docker.io", "library/ubuntu", "1")),
        ("index.docker.io/foo/bar", Reference("docker.io", "foo/bar")),
        ("docker.io/busybox", Reference("docker.io", "library/busybox")),
        ("127.0.0.1:5000/ns/x:t", Reference("127.0.0.1:5000", "ns/x", "t")),
        ("localhost/x", Reference("localhost", "x")),
        ("localhost:5000/a/b/c:v1.2-rc_3", Reference("localhost:5000", "a/b/c", "v1.2-rc_3")),
        ("ghcr.io/o/r@" + ZERO, Reference("ghcr.io", "o/r", None, ZERO)),
        ("ghcr.io/o/r:t@" + ZERO, Reference("ghcr.io", "o/r", "t", ZERO)),
        ("[::1]:5000/x:y", Reference("[::1]:5000", "x", "y")),
        ("Registry/x", Reference("Registry", "x")),
        ("a.b/c__d/e-f.g", Reference("a.b", "c__d/e-f.g")),
    ],
)
def test_references_parse_as_docker_does(image: str, expected: Reference) -> None:
    assert parse_reference(image) == expected


def test_reference_properties() -> None:
    hub = parse_reference("namanjain12/pandas_final:1234")
    assert hub.api_host == "registry-1.docker.io"
    assert hub.reference == "1234"
    assert parse_reference("ubuntu").reference == "latest"
    pinned = parse_reference("ghcr.io/o/r:t@" + ZERO)
    assert pinned.reference == ZERO and pinned.api_host == "ghcr.io"
    assert str(pinned) == "ghcr.io/o/r:t@" + ZERO


@pytest.mark.parametrize(
    "image",
    ["", "UPPER", "x:bad tag", "a@sha256:zz", "a//b", "-x", "x/", "a:", " a", "x@md5:" + "0" * 32],
)
def test_malformed_references_are_refused(image: str) -> None:
    with pytest.raises(InvalidReference):
        parse_reference(image)


def test_www_authenticate_bearer_and_basic() -> None:
    (bearer,) = parse_www_authenticate(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/ubuntu:pull"'
    )
    assert bearer.scheme == "bearer"
    assert bearer.params == {
        "realm": "https://auth.docker.io/token",
        "service": "registry.docker.io",
        "scope": "repository:library/ubuntu:pull",
    }
    (basic,) = parse_www_authenticate('Basic realm="Registry Realm"')
    assert basic == type(basic)("basic", {"realm": "Registry Realm"})


def test_www_authenticate_quoting_and_several_challenges() -> None:
    found = parse_www_authenticate(
        'Bearer realm="https://a/t",scope="repository:x:pull,push",error="insufficient_scope", '
        'Basic realm="say \\"hi\\"", Negotiate'
    )
    assert [c.scheme for c in found] == ["bearer", "basic", "negotiate"]
    assert found[0].params["scope"] == "repository:x:pull,push"
    assert found[0].params["error"] == "insufficient_scope"
    assert found[1].params["realm"] == 'say "hi"'
    assert parse_www_authenticate("") == []
    (unquoted,) = parse_www_authenticate("Bearer realm=https://r/t, service=svc")
    assert unquoted.params == {"realm": "https://r/t", "service": "svc"}


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


# --- a fake registry on loopback --------------------------------------------------------------


@dataclass
class FakeRegistry:
    """An in-process registry that demands tokens and can misbehave on request."""

    auth: str = "bearer"
    users: dict[str, str] = field(default_factory=dict)
    token_lifetime: int = 300
    accept_tokens: bool = True
    manifest_429: int = 0
    blob_429: int = 0
    server_errors: int = 0
    redirect_blobs_to: str = ""
    corrupt: set[str] = field(default_factory=set)
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    counts: Counter[str] = field(default_factory=Counter)
    token_auth: list[str | None] = field(default_factory=list)
    issued: set[str] = field(default_factory=set)
    base: str = ""

    def add(self, repository: str, tag: str, image: oci.Built) -> None:
        self.blobs.update(image.blobs)
        self.manifests[(repository, tag)] = (image.manifest, image.media_type)
        self.manifests[(repository, image.digest)] = (image.manifest, image.media_type)

    def challenge(self, repository: str) -> web.Response:
        if self.auth == "basic":
            header = 'Basic realm="fake"'
        else:
            header = (
                f'Bearer realm="{self.base}/token",service="fake",'
                f'scope="repository:{repository}:pull"'
            )
        body = json.dumps(
            {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]}
        )
        return web.Response(status=401, text=body, headers={"WWW-Authenticate": header})

    def authorized(self, request: web.Request) -> bool:
        given = request.headers.get("Authorization", "")
        if self.auth == "none":
            return True
        if self.auth == "basic":
            for user, password in self.users.items():
                if given == "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode():
                    return True
            return False
        return self.accept_tokens and given.removeprefix("Bearer ") in self.issued

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        if path == "/token":
            self.counts["token"] += 1
            self.token_auth.append(request.headers.get("Authorization"))
            token = f"tok-{self.counts['token']}"
            self.issued.add(token)
            return web.json_response({"token": token, "expires_in": self.token_lifetime})
        match = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/([^/]+)", path)
        if match is None:
            return web.Response(status=404)
        repository, kind, reference = match.groups()
        if not self.authorized(request):
            return self.challenge(repository)
        self.counts[f"{request.method} {kind}"] += 1
        if self.server_errors:
            self.server_errors -= 1
            return web.Response(status=503, text="busy")
        limit = {"ratelimit-limit": "100;w=21600", "ratelimit-remaining": "42;w=21600"}
        if kind == "manifests":
            if request.method == "GET" and self.manifest_429:
                self.manifest_429 -= 1
                body = json.dumps({"errors": [{"code": "TOOMANYREQUESTS", "message": "slow"}]})
                return web.Response(status=429, text=body)
            found = self.manifests.get((repository, reference))
            if found is None:
                text = json.dumps({"errors": [{"code": "MANIFEST_UNKNOWN", "message": "nope"}]})
                return web.Response(status=404, text=text)
            body_bytes, media_type = found
            headers = {
                "Content-Type": media_type,
                "Docker-Content-Digest": oci.sha256(body_bytes),
                **limit,
            }
            if request.method == "HEAD":
                headers["Content-Length"] = str(len(body_bytes))
                return web.Response(status=200, headers=headers)
            return web.Response(status=200, body=body_bytes, headers=headers)
        if self.blob_429:
            self.blob_429 -= 1
            return web.Response(status=429, text="{}", headers={"Retry-After": "0.05"})
        if reference not in self.blobs:
            return web.Response(status=404, text='{"errors":[{"code":"BLOB_UNKNOWN"}]}')
        if self.redirect_blobs_to:
            raise web.HTTPTemporaryRedirect(f"{self.redirect_blobs_to}/data/{reference}")
        data = self.blobs[reference]
        if reference in self.corrupt:
            data = bytes([data[0] ^ 1]) + data[1:]
        return web.Response(status=200, body=data)


@dataclass
class Cdn:
    """Another host serving blobs by digest; remembers the Authorization headers it saw."""

    blobs: dict[str, bytes]
    seen: list[str | None] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(request.headers.get("Authorization"))
        digest = request.path.rpartition("/")[2]
        return web.Response(status=200, body=self.blobs[digest])


@asynccontextmanager
async def serving(
    handler: Callable[[web.Request], Any],
    host: str = "127.0.0.1",
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, 0, ssl_context=tls)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"{'https' if tls else 'http'}://{host}:{port}"
    finally:
        await runner.cleanup()


def non_loopback_address() -> str:
    """An IPv4 address of this machine that is not loopback (the default route's source)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("198.51.100.1", 9))  # no packet is sent
        address: str = probe.getsockname()[0]
    assert not address.startswith("127."), address
    return address


def self_signed_tls(folder: Path, address: str) -> ssl.SSLContext:
    """A server TLS context with a fresh self-signed certificate for address."""
    key, cert = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=registry"),
            *("-addext", f"subjectAltName=IP:{address}"),
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@asynccontextmanager
async def fake_registry(registry: FakeRegistry) -> AsyncIterator[str]:
    async with serving(registry.handle) as base:
        registry.base = base
        yield base.removeprefix("http://")


def sample_image(marker: str = "one") -> oci.Built:
    return oci.build_image(
        [
            layer(folder("etc"), file("etc/os-release", "fake")),
            layer(folder("testbed"), file("testbed/a.txt", f"a-{marker}"), file("testbed/b", "b")),
            layer(file("testbed/c.txt", "c"), whiteout("testbed/b")),
        ]
    )


def entry_for(image: str, name: str = "proj") -> Entry:
    commit = hashlib.sha1(image.encode()).hexdigest()
    return entry_from_row({"repo_name": name, "docker_image": image, "commit_hash": commit}, 1)


def fast_gate() -> PullGate:
    return PullGate(first_pause=0.05, max_pause=0.2, max_wait=30)


def backend(tmp_path: Path, **kwargs: Any) -> RegistryBackend:
    kwargs.setdefault("pull_gate", fast_gate())
    kwargs.setdefault("credentials", lambda image: None)
    return RegistryBackend(tmp_path / "cache", **kwargs)


async def extract(source: RegistryBackend, image: str, dest: Path) -> dict[str, str]:
    dest.mkdir(parents=True)
    result = await source.extract_into(entry_for(image), dest)
    assert (result.file_count, result.size_bytes) == tree_stats(dest)
    return {p.name: p.read_text() for p in dest.iterdir() if p.is_file()}


@pytest.mark.anyio
async def test_bearer_tokens_are_fetched_once_and_reused(tmp_path: Path) -> None:
    registry = FakeRegistry()
    registry.add("proj/app", "v1", sample_image("one"))
    registry.add("proj/app", "v2", sample_image("two"))
    async with fake_registry(registry) as host, backend(tmp_path) as source:
        async with anyio.create_task_group() as tg:
            for tag in ("v1", "v2"):
                tg.start_soon(extract, source, f"{host}/proj/app:{tag}", tmp_path / tag)
        assert await extract(source, f"{host}/proj/app:v1", tmp_path / "again") == {
            "a.txt": "a-one",
            "c.txt": "c",
        }
    assert registry.counts["token"] == 1
    assert registry.token_auth == [None]
    assert (
        registry.counts["GET blobs"]
        == len({*sample_image("one").blobs, *sample_image("two").blobs}) - 2
    )
    assert registry.counts["GET manifests"] == 2


@pytest.mark.anyio
async def test_expired_tokens_are_renewed(tmp_path: Path) -> None:
    registry = FakeRegistry(token_lifetime=1)
    registry.add("proj/app", "v1", sample_image())
    async with fake_registry(registry) as host, backend(tmp_path, layer_cache_bytes=0) as source:
        await extract(source, f"{host}/proj/app:v1", tmp_path / "one")
        first = registry.counts["token"]
        await anyio.sleep(0.6)
        source.layers.untouched.clear()
        await source.after_extraction(entry_for(f"{host}/proj/app:v1"))
        await extract(source, f"{host}/proj/app:v1", tmp_path / "two")
    assert first == 1
    assert registry.counts["token"] == 2


@pytest.mark.anyio
async def test_credentials_go_to_the_token_service_and_basic_registries(tmp_path: Path) -> None:
    registry = FakeRegistry()
    registry.add("proj/app", "v1", sample_image())
    creds = {"username": "me", "password": "secret"}
    async with fake_registry(registry) as host:
        async with backend(tmp_path, credentials=lambda image: creds) as source:
            await extract(source, f"{host}/proj/app:v1", tmp_path / "bearer")
        expected = "Basic " + base64.b64encode(b"me:secret").decode()
        assert registry.token_auth == [expected]
        registry.auth, registry.users = "basic", {"me": "secret"}
        async with backend(tmp_path, credentials=lambda image: creds) as source:
            assert await extract(source, f"{host}/proj/app:v1", tmp_path / "basic") == {
                "a.txt": "a-one",
                "c.txt": "c",
            }
        async with backend(tmp_path) as source:
            with pytest.raises(Unauthorized, match="asks for a login"):
                await extract(source, f"{host}/proj/app:v1", tmp_path / "anonymous")


@pytest.mark.anyio
async def test_401_after_auth_is_unauthorized(tmp_path: Path) -> None:
    registry = FakeRegistry(accept_tokens=False)
    registry.add("proj/app", "v1", sample_image())
    async with fake_registry(registry) as host, backend(tmp_path) as source:
        with pytest.raises(Unauthorized, match="authentication required"):
            await extract(source, f"{host}/proj/app:v1", tmp_path / "d")


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


@pytest.mark.anyio
async def test_rate_limits_pause_the_gate_then_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = FakeRegistry(manifest_429=2, blob_429=1)
    registry.add("proj/app", "v1", sample_image())
    gate = fast_gate()
    caplog.set_level(logging.INFO, logger="asynccache")
    async with fake_registry(registry) as host, backend(tmp_path, pull_gate=gate) as source:
        got = await extract(source, f"{host}/proj/app:v1", tmp_path / "d")
    assert got == {"a.txt": "a-one", "c.txt": "c"}
    assert gate.pauses == 3
    assert registry.counts["GET manifests"] == 3
    assert "42 pulls left of 100 (ratelimit-remaining)" in caplog.text


@pytest.mark.anyio
async def test_manifest_is_fetched_once_per_image_across_retries(tmp_path: Path) -> None:
    registry = FakeRegistry()
    image = sample_image()
    registry.add("proj/app", "v1", image)
    registry.corrupt.add(oci.sha256(oci.layer(folder("etc"), file("etc/os-release", "fake")).blob))
    async with fake_registry(registry) as host, backend(tmp_path) as source:
        for attempt in range(2):
            with pytest.raises(DigestMismatch):
                await extract(source, f"{host}/proj/app:v1", tmp_path / f"try{attempt}")
        assert registry.counts["GET manifests"] == 1
        assert registry.counts["HEAD manifests"] == 1
        await source.after_extraction(entry_for(f"{host}/proj/app:v1"))
        registry.corrupt.clear()
        await extract(source, f"{host}/proj/app:v1", tmp_path / "ok")
    assert registry.counts["GET manifests"] == 2


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


@pytest.mark.anyio
async def test_blob_with_a_wrong_digest_fails_and_nothing_is_published(tmp_path: Path) -> None:
    registry = FakeRegistry()
    image = sample_image()
    registry.add("proj/app", "v1", image)
    registry.add("proj/app", "good", sample_image("good"))
    testbed_layer = oci.layer(
        folder("testbed"), file("testbed/a.txt", "a-one"), file("testbed/b", "b")
    )
    registry.corrupt.add(oci.sha256(testbed_layer.blob))
    cache_dir = tmp_path / "cache"
    async with fake_registry(registry) as host:
        bad, good = f"{host}/proj/app:v1", f"{host}/proj/app:good"
        rows = [
            {"repo_name": "bad", "docker_image": bad, "commit_hash": "b" * 40},
            {"repo_name": "good", "docker_image": good, "commit_hash": "c" * 40},
        ]
        async with backend(tmp_path) as source:
            summary = await cache_repos(rows, cache_dir=cache_dir, source=source, concurrency=2)
    assert (summary.cached, summary.failed) == (1, 1)
    (failure,) = summary.failures
    assert failure.instance_id == "bad__bbbbbbbbbbbb"
    assert "does not match its digest" in failure.reason
    assert sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith(".")) == [
        "failures.json",
        "good__cccccccccccc",
        "index.json",
    ]
    assert list(json.loads((cache_dir / "index.json").read_text())) == ["good__cccccccccccc"]
    assert list((cache_dir / ".tmp").iterdir()) == []
    cached_blobs = [p.name for p in (cache_dir / ".layers").iterdir() if p.name.startswith("sha")]
    assert oci.sha256(testbed_layer.blob).replace(":", "-") not in cached_blobs


# --- against the loopback registry ------------------------------------------------------------


def run_cli(
    *args: str | Path, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_asynccache(
        "--backend", "registry", *args, DOCKER_HOST="unix:///nonexistent", **(env or {})
    )


def test_cli_registry_backend_gives_the_docker_cp_tree_of_every_fixture_image(
    tmp_path: Path,
    sample_dataset: Dataset,
    fixture_images: list[FixtureImage],
    reference_trees: ReferenceTrees,
) -> None:
    dataset_dir, split, _rows = sample_dataset
    cache_dir = tmp_path / "cache"
    done = run_cli(
        "--dataset", dataset_dir, "--split", split, "--cache_dir", cache_dir, "--concurrency", "4"
    )
    assert done.returncode == 0, done.stderr
    assert f"Done: {len(fixture_images)} cached, 0 skipped, 0 failed" in done.stdout
    index = json.loads((cache_dir / "index.json").read_text())
    for image in fixture_images:
        key = instance_id(image.repo, image.commit_hash)
        cached = cache_dir / key
        expected = reference_trees[image.ref]
        actual = snapshot_tree(cached)
        assert actual == expected, diff_snapshots(expected, actual)
        assert (index[key]["file_count"], index[key]["size_bytes"]) == tree_stats(cached)
    assert list((cache_dir / ".tmp").iterdir()) == []


# Hand-built images: (tag, image or index, expected tree, can dockerd 20.10 pull it).
Expected = dict[str, tuple[Any, ...]]


def expected_snapshot(spec: Expected) -> dict[str, tuple[Any, ...]]:
    """spec values: ("file", mode, content[, group]) | ("dir", mode) | ("symlink", target)."""
    out: dict[str, tuple[Any, ...]] = {}
    for rel, value in spec.items():
        if value[0] == "file":
            group = value[3] if len(value) > 3 else None
            out[rel] = ("file", value[1], hashlib.sha256(value[2]).hexdigest(), group)
        elif value[0] == "dir":
            out[rel] = ("dir", value[1], None, None)
        else:
            out[rel] = ("symlink", None, value[1], None)
    return out


def _whiteouts_image() -> oci.Built:
    return oci.build_image(
        [
            layer(
                folder("etc"), file("etc/os-release", "ocitest"), file("usr/bin/tool", "t", 0o755)
            ),
            layer(
                folder("testbed"),
                file("testbed/keep.txt", "keep"),
                file("testbed/gone.txt", "gone"),
                folder("testbed/gone_dir"),
                file("testbed/gone_dir/a", "a"),
                folder("testbed/opaque"),
                file("testbed/opaque/old1", "old1"),
                folder("testbed/opaque/sub"),
                file("testbed/opaque/sub/old2", "old2"),
                file("testbed/flip", "flip-1"),
                folder("testbed/flop"),
                file("testbed/flop/inner.txt", "inner"),
                symlink("testbed/link", "keep.txt"),
                folder("testbed/.venv"),
                folder("testbed/.venv/bin"),
                symlink("testbed/.venv/bin/python", "/usr/bin/python3"),
                folder("testbed/private", 0o700),
                file("testbed/private/key", "k", 0o600),
            ),
            layer(
                folder("testbed"),
                whiteout("testbed/gone.txt"),
                whiteout("testbed/gone_dir"),
                folder("testbed/opaque"),
                file("testbed/opaque/new1", "new1"),
                opaque("testbed/opaque"),
                folder("testbed/flip"),
                file("testbed/flip/inside.txt", "inside"),
                file("testbed/flop", "flop-file"),
                file("testbed/link", "now a file"),
                folder("testbed/new_dir"),
                folder("testbed/new_dir/deep"),
                file("testbed/new_dir/deep/file.txt", "deep"),
            ),
            layer(
                folder("testbed"),
                file("testbed/flip", "flip-2", 0o755),
                folder("testbed/flop", 0o750),
                file("testbed/flop/again.txt", "again"),
            ),
        ]
    )


WHITEOUTS_TREE: Expected = {
    "keep.txt": ("file", 0o644, b"keep"),
    "opaque": ("dir", 0o755),
    "opaque/new1": ("file", 0o644, b"new1"),
    "flip": ("file", 0o755, b"flip-2"),
    "flop": ("dir", 0o750),
    "flop/again.txt": ("file", 0o644, b"again"),
    "link": ("file", 0o644, b"now a file"),
    ".venv": ("dir", 0o755),
    ".venv/bin": ("dir", 0o755),
    ".venv/bin/python": ("symlink", "/usr/bin/python3"),
    "private": ("dir", 0o700),
    "private/key": ("file", 0o600, b"k"),
    "new_dir": ("dir", 0o755),
    "new_dir/deep": ("dir", 0o755),
    "new_dir/deep/file.txt": ("file", 0o644, b"deep"),
}


def _uvlinks_image() -> oci.Built:
    return oci.build_image(
        [
            layer(folder("etc"), file("etc/os-release", "ocitest")),
            layer(
                folder("root"),
                folder("root/.cache"),
                folder("root/.cache/uv"),
                file("root/.cache/uv/mod.py", "mod = 1\n", 0o644),
                file("root/.cache/uv/data.bin", "data"),
                folder("testbed"),
                file("testbed/own.txt", "own"),
                hardlink("testbed/own_link", "testbed/own.txt"),
                folder("testbed/.venv"),
                hardlink("testbed/.venv/data.bin", "root/.cache/uv/data.bin"),
                hardlink("testbed/.venv/mod.py", "root/.cache/uv/mod.py"),
                hardlink("testbed/.venv/mod2.py", "root/.cache/uv/mod.py"),
            ),
        ]
    )


UVLINKS_TREE: Expected = {
    "own.txt": ("file", 0o644, b"own", "own.txt"),
    "own_link": ("file", 0o644, b"own", "own.txt"),
    ".venv": ("dir", 0o755),
    ".venv/data.bin": ("file", 0o644, b"data"),
    ".venv/mod.py": ("file", 0o644, b"mod = 1\n", ".venv/mod.py"),
    ".venv/mod2.py": ("file", 0o644, b"mod = 1\n", ".venv/mod.py"),
}


def _lowerlink_image() -> oci.Built:
    return oci.build_image(
        [
            layer(folder("testbed"), file("testbed/base.txt", "base")),
            layer(folder("testbed"), hardlink("testbed/hard", "testbed/base.txt")),
        ]
    )


LOWERLINK_TREE: Expected = {
    "base.txt": ("file", 0o644, b"base", "base.txt"),
    "hard": ("file", 0o644, b"base", "base.txt"),
}


def _compressions_image(second: oci.Compression, oci_manifest: bool) -> oci.Built:
    return oci.build_image(
        [
            layer(folder("testbed"), file("testbed/a.txt", "a"), file("testbed/z.txt", "z")),
            layer(
                folder("testbed"),
                file("testbed/b.txt", f"b-{second}"),
                whiteout("testbed/a.txt"),
                compression=second,
            ),
            layer(file("etc/hostname", "h"), compression="none"),
        ],
        oci=oci_manifest,
    )


def compressions_tree(second: str) -> Expected:
    return {
        "b.txt": ("file", 0o644, f"b-{second}".encode()),
        "z.txt": ("file", 0o644, b"z"),
    }


def _arch_image(arch: str, variant: str = "") -> oci.Built:
    return oci.build_image(
        [layer(folder("testbed"), file("testbed/arch.txt", arch))],
        oci=True,
        architecture=arch,
        variant=variant,
    )


@dataclass(frozen=True)
class HandBuilt:
    """A pushed hand-built image and what its /testbed must be."""

    name: str
    ref: str
    tree: Expected
    dockerd_can_pull: bool

    @property
    def commit(self) -> str:
        return hashlib.sha1(self.ref.encode()).hexdigest()

    @property
    def instance_id(self) -> str:
        return instance_id(self.name, self.commit)


@pytest.fixture(scope="module")
def hand_built(docker_services: str) -> dict[str, HandBuilt]:
    """Hand-built images pushed under {registry}/ocitest/layers with the registry's HTTP API."""
    registry, repo = docker_services, f"{oci.NAMESPACE}/layers"
    specs: list[tuple[str, Any, Expected, bool]] = [
        ("whiteouts", _whiteouts_image(), WHITEOUTS_TREE, True),
        ("uvlinks", _uvlinks_image(), UVLINKS_TREE, True),
        ("lowerlink", _lowerlink_image(), LOWERLINK_TREE, False),
        ("zstd", _compressions_image("zstd", True), compressions_tree("zstd"), False),
        ("plain", _compressions_image("none", False), compressions_tree("none"), True),
        (
            "multiarch",
            {"linux/amd64": _arch_image("amd64"), "linux/arm64/v8": _arch_image("arm64", "v8")},
            {"arch.txt": ("file", 0o644, b"amd64")},
            True,
        ),
    ]
    found: dict[str, HandBuilt] = {}
    for name, image, tree, pullable in specs:
        if isinstance(image, dict):
            ref = oci.push_index(registry, repo, name, image)
        else:
            ref = oci.push_image(registry, repo, name, image)
        found[name] = HandBuilt(name, ref, tree, pullable)
    return found


def test_hand_built_layers_give_the_stated_trees(
    tmp_path: Path, hand_built: dict[str, HandBuilt]
) -> None:
    rows = [row_for(item.ref, item.name, item.commit) for item in hand_built.values()]
    write_dataset(tmp_path / "dataset", rows, "train")
    cache_dir = tmp_path / "cache"
    done = run_cli(
        "--dataset", tmp_path / "dataset", "--cache_dir", cache_dir, "--concurrency", "4"
    )
    assert done.returncode == 0, done.stderr
    assert f"Done: {len(rows)} cached, 0 skipped, 0 failed" in done.stdout
    for item in hand_built.values():
        actual = snapshot_tree(cache_dir / item.instance_id)
        expected = expected_snapshot(item.tree)
        assert actual == expected, f"{item.name}:\n{diff_snapshots(expected, actual)}"

    arm = run_cli(
        "--dataset",
        tmp_path / "dataset",
        "--cache_dir",
        tmp_path / "arm",
        "--platform",
        "linux/arm64",
    )
    assert arm.returncode == 0, arm.stderr
    multiarch = hand_built["multiarch"]
    assert (tmp_path / "arm" / multiarch.instance_id / "arch.txt").read_text() == "arm64"


def test_hand_built_layers_match_docker_cp_where_dockerd_pulls_them(
    hand_built: dict[str, HandBuilt], reference_trees: ReferenceTrees
) -> None:
    compared = []
    for item in hand_built.values():
        if not item.dockerd_can_pull:
            continue
        try:
            reference = reference_trees[item.ref]
        except FixtureError as exc:
            pytest.fail(f"dockerd could not give {item.name}: {exc}")
        expected = expected_snapshot(item.tree)
        assert reference == expected, f"{item.name}:\n{diff_snapshots(expected, reference)}"
        compared.append(item.name)
    assert compared == ["whiteouts", "uvlinks", "plain", "multiarch"]
