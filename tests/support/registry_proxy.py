"""A loopback reverse proxy in front of the real registry that can throttle and inject faults."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "trailer",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
    "host",
    "content-length",
}
TOO_MANY_REQUESTS = (
    b'{"errors":[{"code":"TOOMANYREQUESTS","message":"You have reached your pull rate limit. '
    b'You may increase the limit by authenticating and upgrading"}]}'
)


@dataclass
class ProxyFaults:
    """What the proxy does to requests; tests change it while the proxy runs."""

    #: Answer 429 to manifest requests until this time.monotonic() value.
    rate_limited_until: float = 0.0
    #: Answer this many manifest requests with 503 first.
    server_errors: int = 0
    #: Cut this many blob responses off after a few bytes first.
    resets: int = 0
    #: Bytes per second for response bodies (0: unthrottled).
    bytes_per_second: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    #: Every request served, by (method, path): how often each image's manifest was fetched.
    requests: Counter[tuple[str, str]] = field(default_factory=Counter)

    def count(self, key: str) -> None:
        """Count one event."""
        self.counts[key] = self.counts.get(key, 0) + 1

    def manifest_gets(self) -> Counter[str]:
        """GETs of manifests by ``name:reference`` (what a pull counts against a quota)."""
        gets: Counter[str] = Counter()
        for (method, path), times in self.requests.items():
            name, sep, reference = path.removeprefix("/v2/").partition("/manifests/")
            if method == "GET" and sep:
                gets[f"{name}:{reference}"] += times
        return gets


class RegistryProxy:
    """Serves 127.0.0.1:<port>, forwarding to the upstream registry with faults applied."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.faults = ProxyFaults()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def address(self) -> str:
        """host:port to use as the registry part of image references."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start serving in a background thread."""
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("registry proxy did not start")

    def stop(self) -> None:
        """Stop serving."""
        if self._loop is not None and self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
            asyncio.run_coroutine_threadsafe(self._session.close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._session = aiohttp.ClientSession(auto_decompress=False)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        faults = self.faults
        path = request.path
        faults.requests[(request.method, path)] += 1
        is_manifest = "/manifests/" in path
        if is_manifest:
            faults.count("manifest")
            if time.monotonic() < faults.rate_limited_until:
                faults.count("429")
                return web.Response(
                    status=429, body=TOO_MANY_REQUESTS, content_type="application/json"
                )
            if faults.server_errors > 0:
                faults.server_errors -= 1
                faults.count("503")
                return web.Response(status=503, text="upstream temporarily unavailable")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        async with self._session.request(
            request.method,
            f"http://{self.upstream}{request.path_qs}",
            headers=headers,
            data=await request.read() if request.can_read_body else None,
            allow_redirects=False,
        ) as upstream:
            response = web.StreamResponse(status=upstream.status)
            for key, value in upstream.headers.items():
                if key.lower() not in HOP_BY_HOP:
                    response.headers[key] = value
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            if request.method == "HEAD":
                return response
            cut = "/blobs/" in path and faults.resets > 0
            if cut:
                faults.resets -= 1
                faults.count("reset")
            sent = 0
            async for chunk in upstream.content.iter_chunked(64 * 1024):
                if cut and sent > 1024:
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                rate = faults.bytes_per_second
                # throttled: about ten writes a second (a byte a second at rate 1)
                step = max(1, rate // 10) if rate else len(chunk)
                for start in range(0, len(chunk), step):
                    piece = chunk[start : start + step]
                    await response.write(piece)
                    if rate:
                        await asyncio.sleep(len(piece) / rate)
                sent += len(chunk)
            await response.write_eof()
            return response


@contextmanager
def registry_proxy(upstream: str) -> Iterator[RegistryProxy]:
    """A running proxy in front of ``upstream`` for the duration of the block."""
    proxy = RegistryProxy(upstream)
    proxy.start()
    # Ports are reused: images an earlier proxy on this port left would make pulls no-ops.
    remove_local_images(proxy.address)
    try:
        yield proxy
    finally:
        proxy.stop()


def remove_local_images(registry: str) -> None:
    """Remove the Docker daemon's images named after registry (host:port), if it runs."""
    try:
        listed = subprocess.run(
            ["docker", "images", "--format", "{{.Repository}}:{{.Tag}}"],
            capture_output=True,
            text=True,
            check=False,
        )
    except FileNotFoundError:  # no docker CLI: no images to remove
        return
    ours = [name for name in listed.stdout.split() if name.startswith(registry + "/")]
    if listed.returncode == 0 and ours:
        subprocess.run(["docker", "rmi", "-f", *ours], capture_output=True, check=True)
