"""A registry in-process on loopback that demands tokens and misbehaves on request; helpers."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import ssl
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from asynccache.entries import Entry, entry_from_row
from asynccache.sources.ratelimit import PullGate
from asynccache.sources.registry.backend import RegistryBackend
from asynccache.tree.digest import tree_stats
from tests.support import oci_fixtures as oci
from tests.support.oci_fixtures import file, folder, layer, whiteout

ZERO = "sha256:" + "0" * 64


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
    #: The token service named in challenges (default: this registry's own /token).
    realm: str = ""
    #: Where /token redirects (307) when set.
    redirect_token_to: str = ""
    #: (method, body) of every token request that was answered with a token.
    token_requests: list[tuple[str, bytes]] = field(default_factory=list)
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
                f'Bearer realm="{self.realm or self.base + "/token"}",service="fake",'
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
        if path == "/token" and self.redirect_token_to:
            raise web.HTTPTemporaryRedirect(self.redirect_token_to)
        if path.startswith("/token"):
            self.token_requests.append((request.method, await request.read()))
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
    return RegistryBackend(tmp_path / "cache" / ".layers", **kwargs)


async def extract(source: RegistryBackend, image: str, dest: Path) -> dict[str, str]:
    dest.mkdir(parents=True)
    result = await source.extract_into(entry_for(image), dest)
    assert (result.file_count, result.size_bytes) == tree_stats(dest)
    return {p.name: p.read_text() for p in dest.iterdir() if p.is_file()}
