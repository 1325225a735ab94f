"""OCI distribution client: image references, registry auth, manifests, platform choice, blobs."""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp
import anyio

from asynccache.errors import (
    CacheError,
    DigestMismatch,
    ImageNotFound,
    InvalidReference,
    PullFailed,
    RateLimited,
    RegistryError,
    TlsFailed,
    TransferFailed,
    Unauthorized,
)
from asynccache.sources.credentials import credentials_for

log = logging.getLogger(__name__)

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"

MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
MEDIA_DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
MANIFEST_TYPES = (MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST, MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST)
INDEX_TYPES = frozenset({MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST})
IMAGE_TYPES = frozenset({MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST})

#: Largest manifest accepted (containerd's limit).
MAX_MANIFEST_BYTES = 4 << 20
#: Most redirects followed for one request.
MAX_REDIRECTS = 10
#: Seconds before its expiry that a token is no longer used.
TOKEN_MARGIN = 10.0
#: Lifetime of a token whose answer gives none (the distribution token spec's default).
TOKEN_DEFAULT_LIFETIME = 60.0
CHUNK_SIZE = 1 << 20

_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_DOMAIN = re.compile(
    r"(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
    r"(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
)
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})")
_NOT_FOUND_CODES = frozenset({"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN", "NOT_FOUND"})
_RATE_LIMIT_CODES = frozenset({"TOOMANYREQUESTS"})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_TRANSIENT_STATUSES = frozenset({408, 425, 500, 502, 503, 504})
_NETWORK_ERRORS = (aiohttp.ClientError, ConnectionError, TimeoutError, OSError)

#: Credentials as asynccache.sources.credentials gives them (username/password or identitytoken).
Credentials = Mapping[str, str]
CredentialsLookup = Callable[[str], Credentials | None]


@dataclass(frozen=True)
class Reference:
    """An image reference as Docker normalises it."""

    domain: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """The host (with port) serving the registry API for this domain."""
        return DOCKER_HUB_API if self.domain == DOCKER_HUB else self.domain

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = f"{self.domain}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(image: str) -> Reference:
    """Parse ``image`` like ``docker pull`` does (Docker Hub and ``library/`` by default)."""
    text = image.strip()
    if not text or text != image:
        raise InvalidReference(image, "empty or surrounded by spaces")
    name, at, digest = text.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        raise InvalidReference(image, f"bad digest {digest!r}")
    tag: str | None = None
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name, tag = name[:colon], name[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise InvalidReference(image, f"bad tag {tag!r}")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first.lower() != first):
        domain, path = first, rest
        if not _DOMAIN.fullmatch(domain):
            raise InvalidReference(image, f"bad registry host {domain!r}")
    else:
        domain, path = DOCKER_HUB, name
    if domain == "index.docker.io":
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not path or not all(_PATH_COMPONENT.fullmatch(part) for part in path.split("/")):
        raise InvalidReference(image, f"bad repository name {path!r} (lowercase, digits, ._-)")
    if len(domain) + 1 + len(path) > 255:
        raise InvalidReference(image, "repository name longer than 255 characters")
    return Reference(domain, path, tag, digest or None)


@dataclass(frozen=True)
class Challenge:
    """One challenge of a WWW-Authenticate header."""

    scheme: str
    params: dict[str, str]


_TOKEN68 = re.compile(r"\s*([!#$%&'*+\-.^_`|~0-9A-Za-z]+)")
_PARAM = re.compile(r'\s*([!#$%&\'*+\-.^_`|~0-9A-Za-z]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s,]*)\s*')


def parse_www_authenticate(header: str) -> list[Challenge]:
    """The challenges of a WWW-Authenticate value (``Bearer realm="...",service="..."``)."""
    challenges: list[Challenge] = []
    pos = 0
    while pos < len(header):
        while pos < len(header) and header[pos] in ", \t":
            pos += 1
        scheme_match = _TOKEN68.match(header, pos)
        if scheme_match is None:
            break
        scheme = scheme_match.group(1).lower()
        pos = scheme_match.end()
        params: dict[str, str] = {}
        while True:
            param = _PARAM.match(header, pos)
            if param is None:
                break
            key, value = param.group(1).lower(), param.group(2)
            if value.startswith('"'):
                value = re.sub(r"\\(.)", r"\1", value[1:-1])
            params[key] = value
            pos = param.end()
            if pos < len(header) and header[pos] == ",":
                pos += 1
                continue
            break
        challenges.append(Challenge(scheme, params))
    return challenges


@dataclass(frozen=True)
class Platform:
    """An os/architecture[/variant] triple."""

    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(part for part in (self.os, self.architecture, self.variant) if part)


_ARCH_ALIASES = {"x86_64": "amd64", "x86-64": "amd64", "aarch64": "arm64", "armhf": "arm"}
_DEFAULT_VARIANTS = {"arm64": "v8", "arm": "v7", "amd64": "v1"}


def parse_platform(text: str) -> Platform:
    """Parse ``linux/amd64`` or ``linux/arm64/v8`` (architecture aliases normalised)."""
    parts = [part.strip().lower() for part in text.split("/")]
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"platform must be os/arch[/variant], not {text!r}")
    arch = _ARCH_ALIASES.get(parts[1], parts[1])
    return Platform(parts[0], arch, parts[2] if len(parts) == 3 else "")


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor of a manifest: media type, digest, size (and platform in an index)."""

    media_type: str
    digest: str
    size: int
    platform: Platform | None = None


def _descriptor(raw: Any, image: str) -> Descriptor:
    if not isinstance(raw, dict):
        raise RegistryError(image, "a descriptor is not an object")
    digest, size = raw.get("digest"), raw.get("size")
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise RegistryError(image, f"unsupported or malformed digest {digest!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RegistryError(image, f"bad size {size!r} for {digest}")
    platform = None
    spec = raw.get("platform")
    if isinstance(spec, dict):
        arch = str(spec.get("architecture", "")).lower()
        platform = Platform(
            str(spec.get("os", "")).lower(),
            _ARCH_ALIASES.get(arch, arch),
            str(spec.get("variant", "")).lower(),
        )
    return Descriptor(str(raw.get("mediaType", "")), digest, size, platform)


def select_platform(manifests: Iterable[Descriptor], want: Platform, image: str) -> Descriptor:
    """The index entry for ``want`` (variants compared with their defaults filled in)."""
    offered: list[Descriptor] = [d for d in manifests if d.platform is not None]
    wanted_variant = want.variant or _DEFAULT_VARIANTS.get(want.architecture, "")
    fallback: Descriptor | None = None
    for item in offered:
        got = item.platform
        if got is None or got.os != want.os or got.architecture != want.architecture:
            continue
        variant = got.variant or _DEFAULT_VARIANTS.get(got.architecture, "")
        if variant == wanted_variant:
            return item
        if not want.variant and fallback is None:
            fallback = item
    if fallback is not None:
        return fallback
    have = ", ".join(sorted({str(d.platform) for d in offered})) or "none"
    raise ImageNotFound(image, f"no {want} image in its index (platforms: {have}); see --platform")


@dataclass(frozen=True)
class Endpoint:
    """Where a registry's API is served: base URL and whether to verify TLS."""

    base: str
    verify_tls: bool = True

    @property
    def origin(self) -> tuple[str, str, int | None]:
        """(scheme, host, port) of the base URL."""
        return _origin(self.base)


@dataclass(frozen=True)
class ImageManifest:
    """A resolved image manifest: its digest, its layers, and the endpoint it came from."""

    reference: Reference
    digest: str
    media_type: str
    layers: tuple[Descriptor, ...]
    endpoint: Endpoint


@dataclass
class _Token:
    value: str
    expires: float


@dataclass
class _RegistryAuth:
    """What a registry asked for: its challenge (Bearer or Basic)."""

    challenge: Challenge | None = None
    tokens: dict[str, _Token] = field(default_factory=dict)
    locks: dict[str, anyio.Lock] = field(default_factory=dict)


def _origin(url: str) -> tuple[str, str, int | None]:
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


def _is_insecure(host: str, insecure: Iterable[str]) -> bool:
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


def _error_codes(body: bytes) -> tuple[set[str], str]:
    try:
        data = json.loads(body)
    except ValueError:
        return set(), body[:200].decode(errors="replace").strip()
    errors = data.get("errors") if isinstance(data, dict) else None
    if not isinstance(errors, list):
        return set(), body[:200].decode(errors="replace").strip()
    codes = {str(e.get("code", "")).upper() for e in errors if isinstance(e, dict)}
    messages = [str(e.get("message", "")) for e in errors if isinstance(e, dict)]
    return codes, "; ".join(m for m in messages if m)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _short(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _basic(creds: Credentials) -> str:
    raw = f"{creds['username']}:{creds.get('password', '')}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def _verify(image: str, digest: str, body: bytes) -> None:
    algorithm, _, expected = digest.partition(":")
    actual = hashlib.new(algorithm, body).hexdigest()
    if actual != expected:
        raise DigestMismatch(image, digest, f"got {algorithm}:{actual}")


class RegistryClient:
    """Talks to registries over one aiohttp session: auth, manifests, blobs."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        insecure_registries: Iterable[str] = (),
        registry_mirror: str | None = None,
        credentials: CredentialsLookup | None = None,
    ) -> None:
        self.session = session
        self.insecure_registries = tuple(insecure_registries)
        self.registry_mirror = registry_mirror.rstrip("/") if registry_mirror else None
        self._credentials_lookup = credentials or _docker_credentials
        self._credentials: dict[str, Credentials | None] = {}
        self._auth: dict[str, _RegistryAuth] = {}
        self._schemes: dict[str, Endpoint] = {}
        self._scheme_lock = anyio.Lock()
        #: Bytes of manifests and blobs read from the network.
        self.bytes_downloaded = 0
        #: Token requests made (for tests and diagnostics).
        self.token_requests = 0

    # --- endpoints ---------------------------------------------------------------------------

    async def endpoints(self, ref: Reference) -> list[Endpoint]:
        """The endpoints to try for ``ref``: the mirror first for Docker Hub images."""
        found: list[Endpoint] = []
        if ref.domain == DOCKER_HUB and self.registry_mirror:
            mirror = self.registry_mirror
            if "://" not in mirror:
                mirror = f"https://{mirror}"
            found.append(Endpoint(mirror, verify_tls=not self._mirror_insecure(mirror)))
        found.append(await self._endpoint(ref.api_host))
        return found

    def _mirror_insecure(self, mirror: str) -> bool:
        host = urlsplit(mirror).netloc
        return _is_insecure(host, self.insecure_registries)

    async def _endpoint(self, host: str) -> Endpoint:
        if is_loopback(host):
            return Endpoint(f"http://{host}")
        if not _is_insecure(host, self.insecure_registries):
            return Endpoint(f"https://{host}")
        async with self._scheme_lock:
            known = self._schemes.get(host)
            if known is None:
                known = await self._probe_insecure(host)
                self._schemes[host] = known
        return known

    async def _probe_insecure(self, host: str) -> Endpoint:
        """An insecure registry: HTTPS without verification when it answers, else plain HTTP."""
        secure = Endpoint(f"https://{host}", verify_tls=False)
        try:
            async with self.session.get(
                f"{secure.base}/v2/", ssl=False, allow_redirects=False
            ) as response:
                await response.read()
        except _NETWORK_ERRORS as exc:
            log.info("%s: no HTTPS (%s); using plain HTTP", host, _short(exc))
            return Endpoint(f"http://{host}")
        return secure

    # --- auth --------------------------------------------------------------------------------

    async def _creds(self, key: str) -> Credentials | None:
        if key not in self._credentials:
            self._credentials[key] = await anyio.to_thread.run_sync(self._credentials_lookup, key)
        return self._credentials[key]

    def _auth_state(self, endpoint: Endpoint) -> _RegistryAuth:
        return self._auth.setdefault(endpoint.base, _RegistryAuth())

    async def _authorization(
        self, endpoint: Endpoint, ref: Reference, *, refused: str | None = None
    ) -> str | None:
        """The Authorization value for requests about ref (None until the registry asks).

        ``refused`` is a value the registry just answered 401 to: a token equal to it is renewed.
        """
        state = self._auth_state(endpoint)
        challenge = state.challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = await self._creds(self._credentials_key(endpoint, ref))
            if not creds or not creds.get("username"):
                raise Unauthorized(str(ref), "the registry asks for a login (Basic auth)")
            return _basic(creds)
        if challenge.scheme != "bearer":
            raise Unauthorized(str(ref), f"unsupported auth scheme {challenge.scheme!r}")
        scope = f"repository:{ref.repository}:pull"
        lock = state.locks.setdefault(scope, anyio.Lock())
        async with lock:
            token = state.tokens.get(scope)
            if (
                token is None
                or token.expires <= time.monotonic()
                or f"Bearer {token.value}" == refused
            ):
                token = await self._fetch_token(endpoint, ref, challenge, scope)
                state.tokens[scope] = token
        return f"Bearer {token.value}"

    def _credentials_key(self, endpoint: Endpoint, ref: Reference) -> str:
        """The image name the docker config is searched with for this endpoint."""
        host = urlsplit(endpoint.base).netloc
        if ref.domain == DOCKER_HUB and host == DOCKER_HUB_API:
            return f"{DOCKER_HUB}/{ref.repository}"
        return f"{host}/{ref.repository}"

    async def _fetch_token(
        self, endpoint: Endpoint, ref: Reference, challenge: Challenge, scope: str
    ) -> _Token:
        realm = challenge.params.get("realm")
        if not realm or urlsplit(realm).scheme not in ("http", "https"):
            raise Unauthorized(
                str(ref), f"the registry's Bearer challenge has no usable realm ({realm!r})"
            )
        creds = await self._creds(self._credentials_key(endpoint, ref))
        if creds is None and ref.domain == DOCKER_HUB and self.registry_mirror:
            creds = await self._creds(f"{DOCKER_HUB}/{ref.repository}")
        service = challenge.params.get("service", "")
        scopes = [scope]
        asked = challenge.params.get("scope")
        if asked and asked != scope:
            scopes.append(asked)
        self.token_requests += 1
        try:
            if creds and creds.get("identitytoken"):
                form = {
                    "grant_type": "refresh_token",
                    "refresh_token": creds["identitytoken"],
                    "service": service,
                    "scope": " ".join(scopes),
                    "client_id": "asynccache",
                }
                request = self.session.post(realm, data=form, ssl=endpoint.verify_tls)
            else:
                query = [("scope", s) for s in scopes]
                if service:
                    query.insert(0, ("service", service))
                headers = {}
                if creds and creds.get("username"):
                    headers["Authorization"] = _basic(creds)
                sep = "&" if "?" in realm else "?"
                request = self.session.get(
                    f"{realm}{sep}{urlencode(query)}", headers=headers, ssl=endpoint.verify_tls
                )
            async with request as response:
                body = await response.content.read(1 << 20)
                status = response.status
                retry_after = response.headers.get("Retry-After")
        except _NETWORK_ERRORS as exc:
            raise PullFailed(str(ref), f"token service {realm}: {_short(exc)}") from None
        if status == 429:
            raise RateLimited(
                str(ref), "token service: too many requests", _retry_after(retry_after)
            )
        if status in (401, 403):
            raise Unauthorized(str(ref), f"the token service {realm} refused the credentials")
        if status >= 500:
            raise PullFailed(str(ref), f"token service {realm} answered HTTP {status}")
        if status != 200:
            raise Unauthorized(str(ref), f"the token service {realm} answered HTTP {status}")
        try:
            data = json.loads(body)
            value = data.get("token") or data.get("access_token")
            lifetime = float(data.get("expires_in") or TOKEN_DEFAULT_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            raise Unauthorized(str(ref), "the token service answered no token") from None
        if not isinstance(value, str) or not value:
            raise Unauthorized(str(ref), "the token service answered no token")
        expires = time.monotonic() + max(lifetime - TOKEN_MARGIN, lifetime / 2)
        return _Token(value, expires)

    # --- requests ----------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        endpoint: Endpoint,
        ref: Reference,
        path: str,
        headers: Mapping[str, str],
    ) -> aiohttp.ClientResponse:
        """Send a request with auth (answering one 401 challenge) and follow redirects.

        The registry's Authorization goes only to URLs of the registry's own origin.
        """
        image = str(ref)
        url = f"{endpoint.base}/v2/{ref.repository}/{path}"
        authorization = await self._authorization(endpoint, ref)
        response = await self._send(image, method, url, headers, authorization, endpoint)
        if response.status == 401:
            challenges = parse_www_authenticate(response.headers.get("WWW-Authenticate", ""))
            response.release()
            usable = [c for c in challenges if c.scheme in ("bearer", "basic")]
            if not usable:
                raise Unauthorized(image, "the registry answered 401 without a usable challenge")
            state = self._auth_state(endpoint)
            state.challenge = usable[0]
            authorization = await self._authorization(endpoint, ref, refused=authorization)
            response = await self._send(image, method, url, headers, authorization, endpoint)
            if response.status == 401:
                body = await _read_limited(response, 64 << 10)
                _codes, message = _error_codes(body)
                detail = message or "authentication required"
                raise Unauthorized(
                    image, f"{detail} (the repository may not exist, or needs a login)"
                )
        for _ in range(MAX_REDIRECTS):
            if response.status not in _REDIRECTS:
                return response
            location = response.headers.get("Location")
            response.release()
            if not location:
                raise RegistryError(image, f"redirect without a Location from {url}")
            url = urljoin(url, location)
            target = _origin(url)
            same = target == endpoint.origin
            if target[0] not in ("http", "https"):
                raise RegistryError(image, f"redirect to a non-HTTP URL {url!r}")
            response = await self._send(
                image,
                "GET" if method != "HEAD" else "HEAD",
                url,
                headers,
                authorization if same else None,
                endpoint if same else None,
            )
        response.release()
        raise RegistryError(image, f"more than {MAX_REDIRECTS} redirects")

    async def _send(
        self,
        image: str,
        method: str,
        url: str,
        headers: Mapping[str, str],
        authorization: str | None,
        endpoint: Endpoint | None,
    ) -> aiohttp.ClientResponse:
        sent = {"Accept-Encoding": "identity", **headers}
        if authorization:
            sent["Authorization"] = authorization
        verify = endpoint.verify_tls if endpoint is not None else True
        try:
            return await self.session.request(
                method, url, headers=sent, allow_redirects=False, ssl=verify
            )
        except aiohttp.ClientSSLError as exc:
            where = urlsplit(url).netloc
            raise TlsFailed(
                image,
                f"{where}: {_short(exc)}; if this registry serves plain HTTP or a self-signed "
                f"certificate, pass --insecure_registry {where}",
            ) from None
        except _NETWORK_ERRORS as exc:
            where = urlsplit(url).netloc
            raise PullFailed(image, f"{where}: {_short(exc)}") from None

    async def _raise_for_status(
        self, response: aiohttp.ClientResponse, ref: Reference, what: str
    ) -> None:
        """Raise the domain error of a non-2xx answer (the response is released)."""
        status = response.status
        if 200 <= status < 300:
            return
        image = str(ref)
        try:
            body = await _read_limited(response, 64 << 10) if response.method != "HEAD" else b""
        except CacheError:
            body = b""
        finally:
            response.release()
        codes, message = _error_codes(body)
        detail = f"{what}: HTTP {status}" + (f" ({message})" if message else "")
        if status == 429 or codes & _RATE_LIMIT_CODES:
            raise RateLimited(image, detail, _retry_after(response.headers.get("Retry-After")))
        if status == 404 or codes & _NOT_FOUND_CODES:
            raise ImageNotFound(image, detail)
        if status in (401, 403) or codes & {"UNAUTHORIZED", "DENIED"}:
            raise Unauthorized(image, detail)
        if status in _TRANSIENT_STATUSES or status >= 500:
            raise PullFailed(image, detail)
        raise RegistryError(image, detail)

    # --- manifests ---------------------------------------------------------------------------

    async def resolve(self, ref: Reference, platform: Platform) -> ImageManifest:
        """The image manifest of ``ref`` for ``platform`` (an index resolved to one image)."""
        endpoints = await self.endpoints(ref)
        for number, endpoint in enumerate(endpoints):
            try:
                return await self._resolve_at(endpoint, ref, platform)
            except (ImageNotFound, PullFailed) as exc:
                if number == len(endpoints) - 1:
                    raise
                log.warning(
                    "mirror %s failed for %s (%s); using %s",
                    endpoint.base,
                    ref,
                    exc,
                    endpoints[-1].base,
                )
        raise AssertionError("unreachable")

    async def _resolve_at(
        self, endpoint: Endpoint, ref: Reference, platform: Platform
    ) -> ImageManifest:
        image = str(ref)
        accept = {"Accept": ", ".join(MANIFEST_TYPES)}
        head_digest = await self._head_manifest(endpoint, ref, accept)
        body, media_type, digest = await self._get_manifest(endpoint, ref, ref.reference, accept)
        if head_digest and digest != head_digest and not ref.digest:
            log.info("%s: tag moved between HEAD and GET (%s -> %s)", image, head_digest, digest)
        data = _manifest_json(body, image)
        if media_type in INDEX_TYPES:
            entries = data.get("manifests")
            if not isinstance(entries, list):
                raise RegistryError(image, "index without manifests")
            chosen = select_platform((_descriptor(e, image) for e in entries), platform, image)
            body, media_type, digest = await self._get_manifest(
                endpoint, ref, chosen.digest, accept
            )
            data = _manifest_json(body, image)
            if media_type in INDEX_TYPES:
                raise RegistryError(image, "an index nested in an index")
        if media_type not in IMAGE_TYPES:
            raise RegistryError(image, f"unsupported manifest type {media_type!r}")
        layers = data.get("layers")
        if not isinstance(layers, list):
            raise RegistryError(image, "manifest without layers")
        return ImageManifest(
            ref, digest, media_type, tuple(_descriptor(layer, image) for layer in layers), endpoint
        )

    async def _head_manifest(
        self, endpoint: Endpoint, ref: Reference, accept: Mapping[str, str]
    ) -> str | None:
        """HEAD the manifest (not a pull on Docker Hub): log the rate-limit headers, find 404s."""
        response = await self._request("HEAD", endpoint, ref, f"manifests/{ref.reference}", accept)
        remaining = response.headers.get("ratelimit-remaining")
        if remaining:
            limit = response.headers.get("ratelimit-limit", "?")
            log.info(
                "%s: %s pulls left of %s (ratelimit-remaining)",
                urlsplit(endpoint.base).netloc,
                remaining.split(";")[0],
                limit.split(";")[0],
            )
        if response.status in (404, 401, 403, 429) or response.status >= 500:
            await self._raise_for_status(response, ref, "manifest")
        digest = response.headers.get("Docker-Content-Digest")
        response.release()
        return digest if digest and _DIGEST.fullmatch(digest) else None

    async def _get_manifest(
        self, endpoint: Endpoint, ref: Reference, reference: str, accept: Mapping[str, str]
    ) -> tuple[bytes, str, str]:
        image = str(ref)
        response = await self._request("GET", endpoint, ref, f"manifests/{reference}", accept)
        await self._raise_for_status(response, ref, "manifest")
        try:
            body = await _read_limited(response, MAX_MANIFEST_BYTES)
        finally:
            response.release()
        if len(body) > MAX_MANIFEST_BYTES:
            raise RegistryError(image, f"manifest larger than {MAX_MANIFEST_BYTES} bytes")
        self.bytes_downloaded += len(body)
        header_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        media_type = _media_type(body) or header_type
        if media_type in (MEDIA_DOCKER_SCHEMA1, MEDIA_DOCKER_SCHEMA1_SIGNED):
            raise RegistryError(image, "Docker schema 1 manifests are not supported")
        if _DIGEST.fullmatch(reference):
            digest = reference
        else:
            header = response.headers.get("Docker-Content-Digest", "")
            digest = header if _DIGEST.fullmatch(header) else ""
            if not digest:
                digest = "sha256:" + hashlib.sha256(body).hexdigest()
        _verify(image, digest, body)
        return body, media_type, digest

    # --- blobs -------------------------------------------------------------------------------

    async def open_blob(self, manifest: ImageManifest, digest: str) -> aiohttp.ClientResponse:
        """The 200 response streaming a blob (redirects followed); release it when done."""
        ref = manifest.reference
        response = await self._request(
            "GET", manifest.endpoint, ref, f"blobs/{digest}", {"Accept": "*/*"}
        )
        await self._raise_for_status(response, ref, f"blob {digest}")
        return response

    async def iter_blob(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """The chunks of a blob response, counted; stream failures become TransferFailed."""
        try:
            async for chunk in response.content.iter_chunked(CHUNK_SIZE):
                self.bytes_downloaded += len(chunk)
                yield chunk
        except (
            aiohttp.ClientPayloadError,
            aiohttp.ClientConnectionError,
            ConnectionError,
            TimeoutError,
        ) as exc:
            raise TransferFailed(
                f"blob download from {response.url.host} broke: {_short(exc)}"
            ) from None


async def _read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """Read at most limit + 1 bytes of a body (network failures become PullFailed)."""
    chunks: list[bytes] = []
    total = 0
    try:
        async for chunk in response.content.iter_chunked(CHUNK_SIZE):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                break
    except _NETWORK_ERRORS as exc:
        raise PullFailed(str(response.url), _short(exc)) from None
    return b"".join(chunks)


def _media_type(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if isinstance(data, dict):
        value = data.get("mediaType")
        if isinstance(value, str):
            return value
        if data.get("schemaVersion") == 1:
            return MEDIA_DOCKER_SCHEMA1
        if isinstance(data.get("manifests"), list):
            return MEDIA_OCI_INDEX
        if isinstance(data.get("layers"), list):
            return MEDIA_OCI_MANIFEST
    return ""


def _manifest_json(body: bytes, image: str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        raise RegistryError(image, "manifest is not JSON") from None
    if not isinstance(data, dict):
        raise RegistryError(image, "manifest is not a JSON object")
    return data


def _docker_credentials(image: str) -> Credentials | None:
    return credentials_for(image)
