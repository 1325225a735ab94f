"""Where a registry's API is served: HTTPS, or plain HTTP for loopback and --insecure_registry."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import anyio

from asynccache.errors import one_line
from asynccache.reference import DOCKER_HUB, Reference
from asynccache.sources.registry.http_errors import NETWORK_ERRORS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Endpoint:
    """Where a registry's API is served: base URL, whose credentials go there, TLS checks."""

    base: str
    #: The registry (a host) whose credentials go with requests to this endpoint.
    registry: str
    verify_tls: bool = True

    @property
    def origin(self) -> tuple[str, str, int | None]:
        """(scheme, host, port) of the base URL."""
        return origin(self.base)


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) of a URL, the port filled in from the scheme."""
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), port


def _host_name(host: str) -> str:
    """The host part of ``host[:port]`` (brackets of an IPv6 address removed)."""
    if host.startswith("["):
        return host[1 : host.find("]")]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    """True for localhost, 127.0.0.0/8 and ::1 (with or without a port)."""
    name = _host_name(host).lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def is_insecure(host: str, insecure: Iterable[str]) -> bool:
    """True when ``host[:port]`` is named (or its address covered) by --insecure_registry."""
    name = _host_name(host)
    for item in insecure:
        entry = item.split("://", 1)[-1].rstrip("/")
        if entry in (host, name):
            return True
        if "/" in entry:
            try:
                if ipaddress.ip_address(name) in ipaddress.ip_network(entry, strict=False):
                    return True
            except ValueError:
                continue
    return False


def plain_http_allowed(host: str, insecure: Iterable[str]) -> bool:
    """True when secrets may travel to ``host`` over plain HTTP: loopback or named insecure."""
    return is_loopback(host) or is_insecure(host, insecure)


class Endpoints:
    """The endpoints of each registry, the scheme of insecure ones probed once."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        insecure_registries: Iterable[str] = (),
        registry_mirror: str | None = None,
    ) -> None:
        self.session = session
        self.insecure_registries = tuple(insecure_registries)
        self.registry_mirror = registry_mirror.rstrip("/") if registry_mirror else None
        self._schemes: dict[str, Endpoint] = {}
        self._scheme_lock = anyio.Lock()

    async def of(self, ref: Reference) -> list[Endpoint]:
        """The endpoints to try for ``ref``: the mirror first for Docker Hub images."""
        found: list[Endpoint] = []
        if ref.domain == DOCKER_HUB and self.registry_mirror:
            mirror = self.registry_mirror
            if "://" not in mirror:
                mirror = f"https://{mirror}"
            host = urlsplit(mirror).netloc
            found.append(
                Endpoint(mirror, host, verify_tls=not is_insecure(host, self.insecure_registries))
            )
        found.append(await self._endpoint(ref.api_host, ref.domain))
        return found

    async def _endpoint(self, host: str, registry: str) -> Endpoint:
        if is_loopback(host):
            return Endpoint(f"http://{host}", registry)
        if not is_insecure(host, self.insecure_registries):
            return Endpoint(f"https://{host}", registry)
        async with self._scheme_lock:
            known = self._schemes.get(host)
            if known is None:
                known = await self._probe_insecure(host, registry)
                self._schemes[host] = known
        return known

    async def _probe_insecure(self, host: str, registry: str) -> Endpoint:
        """An insecure registry: HTTPS without verification when it answers, else plain HTTP."""
        secure = Endpoint(f"https://{host}", registry, verify_tls=False)
        try:
            async with self.session.get(
                f"{secure.base}/v2/", ssl=False, allow_redirects=False
            ) as response:
                await response.read()
        except NETWORK_ERRORS as exc:
            log.info("%s: no HTTPS (%s); using plain HTTP", host, one_line(exc))
            return Endpoint(f"http://{host}", registry)
        return secure
