"""Registry auth: challenges, Bearer tokens, Basic; credentials only for their own registry."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlencode, urljoin, urlsplit

import aiohttp
import anyio
import anyio.to_thread

from asynccache.errors import (
    CredentialsWithheld,
    PullFailed,
    RateLimited,
    RegistryError,
    Unauthorized,
    one_line,
)
from asynccache.reference import DOCKER_HUB, Reference
from asynccache.sources.credentials import Credentials, CredentialsLookup, registry_credentials
from asynccache.sources.registry.endpoints import Endpoint, origin, plain_http_allowed
from asynccache.sources.registry.http_errors import (
    MAX_REDIRECTS,
    NETWORK_ERRORS,
    REDIRECT_STATUSES,
    retry_after,
)

#: Seconds before its expiry that a token is no longer used.
TOKEN_MARGIN = 10.0
#: Lifetime of a token whose answer gives none (the distribution token spec's default).
TOKEN_DEFAULT_LIFETIME = 60.0
#: Largest token answer read.
_MAX_TOKEN_ANSWER = 1 << 20


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


def basic_authorization(creds: Credentials) -> str:
    """The Basic Authorization value of a username and password."""
    raw = f"{creds['username']}:{creds.get('password', '')}".encode()
    return "Basic " + base64.b64encode(raw).decode()


@dataclass
class _Token:
    value: str
    expires: float


@dataclass
class _EndpointAuth:
    """What one endpoint asked for (its challenge) and the tokens it gave, by scope."""

    challenge: Challenge | None = None
    tokens: dict[str, _Token] = field(default_factory=dict)
    locks: dict[str, anyio.Lock] = field(default_factory=dict)


class RegistryAuth:
    """The Authorization of each registry request: nothing until asked, then Basic or a token.

    Credentials are looked up for the registry an endpoint belongs to (a Docker Hub mirror
    may also use Docker Hub's, as dockerd does) and never cross plain HTTP to a host that is
    neither loopback nor named by --insecure_registry.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        credentials: CredentialsLookup | None = None,
        insecure_registries: Iterable[str] = (),
    ) -> None:
        self.session = session
        self.insecure_registries = tuple(insecure_registries)
        self._lookup: CredentialsLookup = credentials or registry_credentials
        self._credentials: dict[str, Credentials | None] = {}
        self._state: dict[str, _EndpointAuth] = {}
        #: Token requests made (for tests and diagnostics).
        self.token_requests = 0

    def challenged(self, endpoint: Endpoint, header: str, image: str) -> None:
        """Remember the challenge of a 401 answer (its WWW-Authenticate value)."""
        usable = [c for c in parse_www_authenticate(header) if c.scheme in ("bearer", "basic")]
        if not usable:
            raise Unauthorized(image, "the registry answered 401 without a usable challenge")
        self._endpoint_state(endpoint).challenge = usable[0]

    async def authorization(
        self, endpoint: Endpoint, ref: Reference, *, refused: str | None = None
    ) -> str | None:
        """The Authorization value for requests about ref (None until the registry asks).

        ``refused`` is a value the registry just answered 401 to: a token equal to it is renewed.
        """
        state = self._endpoint_state(endpoint)
        challenge = state.challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            creds = await self._creds(endpoint.registry)
            if not creds or not creds.get("username"):
                raise Unauthorized(str(ref), "the registry asks for a login (Basic auth)")
            return basic_authorization(creds)
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

    def _endpoint_state(self, endpoint: Endpoint) -> _EndpointAuth:
        return self._state.setdefault(endpoint.base, _EndpointAuth())

    async def _creds(self, registry: str) -> Credentials | None:
        if registry not in self._credentials:
            self._credentials[registry] = await anyio.to_thread.run_sync(self._lookup, registry)
        return self._credentials[registry]

    async def _endpoint_creds(self, endpoint: Endpoint, ref: Reference) -> Credentials | None:
        """The credentials for a token from this endpoint's realm."""
        creds = await self._creds(endpoint.registry)
        if creds is None and ref.domain == DOCKER_HUB and endpoint.registry != DOCKER_HUB:
            # A Docker Hub mirror the user configured: dockerd gives it Docker Hub's login too.
            creds = await self._creds(DOCKER_HUB)
        return creds

    async def _fetch_token(
        self, endpoint: Endpoint, ref: Reference, challenge: Challenge, scope: str
    ) -> _Token:
        image = str(ref)
        realm = challenge.params.get("realm")
        if not realm or urlsplit(realm).scheme not in ("http", "https"):
            raise Unauthorized(
                image, f"the registry's Bearer challenge has no usable realm ({realm!r})"
            )
        creds = await self._endpoint_creds(endpoint, ref)
        if creds and (creds.get("identitytoken") or creds.get("username")):
            realm_host = urlsplit(realm).netloc.rpartition("@")[2]
            if urlsplit(realm).scheme == "http" and not plain_http_allowed(
                realm_host, self.insecure_registries
            ):
                raise CredentialsWithheld(image, realm, realm_host)
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
                response = await self._post_form(image, realm, form, endpoint.verify_tls)
            else:
                query = [("scope", s) for s in scopes]
                if service:
                    query.insert(0, ("service", service))
                headers = {}
                if creds and creds.get("username"):
                    headers["Authorization"] = basic_authorization(creds)
                sep = "&" if "?" in realm else "?"
                # aiohttp drops the Authorization header on a redirect to another origin.
                response = await self.session.get(
                    f"{realm}{sep}{urlencode(query)}", headers=headers, ssl=endpoint.verify_tls
                )
            try:
                body = await response.content.read(_MAX_TOKEN_ANSWER)
                status = response.status
                wait = response.headers.get("Retry-After")
            finally:
                response.release()
        except NETWORK_ERRORS as exc:
            raise PullFailed(image, f"token service {realm}: {one_line(exc)}") from None
        if status == 429:
            raise RateLimited(image, "token service: too many requests", retry_after(wait))
        if status in (401, 403):
            raise Unauthorized(image, f"the token service {realm} refused the credentials")
        if status >= 500:
            raise PullFailed(image, f"token service {realm} answered HTTP {status}")
        if status != 200:
            raise Unauthorized(image, f"the token service {realm} answered HTTP {status}")
        try:
            data = json.loads(body)
            value = data.get("token") or data.get("access_token")
            lifetime = float(data.get("expires_in") or TOKEN_DEFAULT_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            raise Unauthorized(image, "the token service answered no token") from None
        if not isinstance(value, str) or not value:
            raise Unauthorized(image, "the token service answered no token")
        expires = time.monotonic() + max(lifetime - TOKEN_MARGIN, lifetime / 2)
        return _Token(value, expires)

    async def _post_form(
        self, image: str, realm: str, form: dict[str, str], verify_tls: bool
    ) -> aiohttp.ClientResponse:
        """POST a token form, following redirects only within the realm's own origin.

        The form carries a refresh token: a redirect to another origin must not get it again
        (aiohttp would resend the body on a 307 or 308 to any host).
        """
        url = realm
        for _ in range(MAX_REDIRECTS):
            response = await self.session.post(
                url, data=form, ssl=verify_tls, allow_redirects=False
            )
            if response.status not in REDIRECT_STATUSES:
                return response
            location = response.headers.get("Location")
            response.release()
            if not location:
                raise RegistryError(image, f"the token service {realm} redirected nowhere")
            url = urljoin(url, location)
            if origin(url) != origin(realm):
                raise RegistryError(
                    image,
                    f"the token service {realm} redirected the refresh-token request to "
                    f"another origin ({urlsplit(url).netloc}); not followed",
                )
        raise RegistryError(image, f"the token service {realm} redirected too many times")
