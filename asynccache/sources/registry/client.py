"""The registry client: manifests and blobs over one aiohttp session, with auth and redirects."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from urllib.parse import urljoin, urlsplit

import aiohttp

from asynccache.errors import (
    ImageNotFound,
    PullFailed,
    RegistryError,
    TlsFailed,
    TransferFailed,
    Unauthorized,
    one_line,
)
from asynccache.reference import Reference, is_digest
from asynccache.sources.credentials import CredentialsLookup
from asynccache.sources.registry.auth import RegistryAuth
from asynccache.sources.registry.endpoints import Endpoint, Endpoints, origin
from asynccache.sources.registry.http_errors import (
    MAX_REDIRECTS,
    NETWORK_ERRORS,
    REDIRECT_STATUSES,
    error_codes,
    raise_for_status,
    read_limited,
)
from asynccache.sources.registry.manifest import (
    IMAGE_TYPES,
    INDEX_TYPES,
    MANIFEST_TYPES,
    MAX_MANIFEST_BYTES,
    MEDIA_DOCKER_SCHEMA1,
    MEDIA_DOCKER_SCHEMA1_SIGNED,
    ImageManifest,
    Platform,
    descriptor,
    manifest_json,
    media_type,
    select_platform,
    verify,
)

log = logging.getLogger(__name__)


class RegistryClient:
    """Talks to registries over one aiohttp session: manifests and blobs, auth and redirects."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        insecure_registries: Iterable[str] = (),
        registry_mirror: str | None = None,
        credentials: CredentialsLookup | None = None,
    ) -> None:
        self.session = session
        self.endpoints = Endpoints(
            session, insecure_registries=insecure_registries, registry_mirror=registry_mirror
        )
        self.auth = RegistryAuth(
            session, credentials=credentials, insecure_registries=insecure_registries
        )
        #: Bytes of manifests and blobs read from the network.
        self.bytes_downloaded = 0

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
        authorization = await self.auth.authorization(endpoint, ref)
        response = await self._send(image, method, url, headers, authorization, endpoint)
        if response.status == 401:
            challenge = response.headers.get("WWW-Authenticate", "")
            response.release()
            self.auth.challenged(endpoint, challenge, image)
            authorization = await self.auth.authorization(endpoint, ref, refused=authorization)
            response = await self._send(image, method, url, headers, authorization, endpoint)
            if response.status == 401:
                body = await read_limited(response, 64 << 10)
                _codes, message = error_codes(body)
                detail = message or "authentication required"
                raise Unauthorized(
                    image, f"{detail} (the repository may not exist, or needs a login)"
                )
        for _ in range(MAX_REDIRECTS):
            if response.status not in REDIRECT_STATUSES:
                return response
            location = response.headers.get("Location")
            response.release()
            if not location:
                raise RegistryError(image, f"redirect without a Location from {url}")
            url = urljoin(url, location)
            target = origin(url)
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
        verify_tls = endpoint.verify_tls if endpoint is not None else True
        try:
            return await self.session.request(
                method, url, headers=sent, allow_redirects=False, ssl=verify_tls
            )
        except aiohttp.ClientSSLError as exc:
            where = urlsplit(url).netloc
            raise TlsFailed(
                image,
                f"{where}: {one_line(exc)}; if this registry serves plain HTTP or a self-signed "
                f"certificate, pass --insecure_registry {where}",
            ) from None
        except NETWORK_ERRORS as exc:
            where = urlsplit(url).netloc
            raise PullFailed(image, f"{where}: {one_line(exc)}") from None

    # --- manifests ---------------------------------------------------------------------------

    async def resolve(self, ref: Reference, platform: Platform) -> ImageManifest:
        """The image manifest of ``ref`` for ``platform`` (an index resolved to one image)."""
        endpoints = await self.endpoints.of(ref)
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
        body, kind, digest = await self._get_manifest(endpoint, ref, ref.reference, accept)
        if head_digest and digest != head_digest and not ref.digest:
            log.info("%s: tag moved between HEAD and GET (%s -> %s)", image, head_digest, digest)
        data = manifest_json(body, image)
        if kind in INDEX_TYPES:
            entries = data.get("manifests")
            if not isinstance(entries, list):
                raise RegistryError(image, "index without manifests")
            chosen = select_platform((descriptor(e, image) for e in entries), platform, image)
            body, kind, digest = await self._get_manifest(endpoint, ref, chosen.digest, accept)
            data = manifest_json(body, image)
            if kind in INDEX_TYPES:
                raise RegistryError(image, "an index nested in an index")
        if kind not in IMAGE_TYPES:
            raise RegistryError(image, f"unsupported manifest type {kind!r}")
        layers = data.get("layers")
        if not isinstance(layers, list):
            raise RegistryError(image, "manifest without layers")
        return ImageManifest(
            ref, digest, kind, tuple(descriptor(layer, image) for layer in layers), endpoint
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
            await raise_for_status(response, str(ref), "manifest")
        digest = response.headers.get("Docker-Content-Digest")
        response.release()
        return digest if digest and is_digest(digest) else None

    async def _get_manifest(
        self, endpoint: Endpoint, ref: Reference, reference: str, accept: Mapping[str, str]
    ) -> tuple[bytes, str, str]:
        image = str(ref)
        response = await self._request("GET", endpoint, ref, f"manifests/{reference}", accept)
        await raise_for_status(response, image, "manifest")
        try:
            body = await read_limited(response, MAX_MANIFEST_BYTES)
        finally:
            response.release()
        if len(body) > MAX_MANIFEST_BYTES:
            raise RegistryError(image, f"manifest larger than {MAX_MANIFEST_BYTES} bytes")
        self.bytes_downloaded += len(body)
        header_type = response.headers.get("Content-Type", "").split(";")[0].strip()
        kind = media_type(body) or header_type
        if kind in (MEDIA_DOCKER_SCHEMA1, MEDIA_DOCKER_SCHEMA1_SIGNED):
            raise RegistryError(image, "Docker schema 1 manifests are not supported")
        if is_digest(reference):
            digest = reference
        else:
            header = response.headers.get("Docker-Content-Digest", "")
            digest = header if is_digest(header) else ""
            if not digest:
                digest = "sha256:" + hashlib.sha256(body).hexdigest()
        verify(image, digest, body)
        return body, kind, digest

    # --- blobs -------------------------------------------------------------------------------

    async def open_blob(self, manifest: ImageManifest, digest: str) -> aiohttp.ClientResponse:
        """The 200 response streaming a blob (redirects followed); release it when done."""
        ref = manifest.reference
        response = await self._request(
            "GET", manifest.endpoint, ref, f"blobs/{digest}", {"Accept": "*/*"}
        )
        await raise_for_status(response, str(ref), f"blob {digest}")
        return response

    async def iter_blob(self, response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
        """The chunks of a blob response, counted; stream failures become TransferFailed.

        Chunks as they arrived: gathering them into fixed sizes would copy every byte once more
        in the event loop (2% of a run's CPU); the reading thread takes any size.
        """
        try:
            async for chunk in response.content.iter_any():
                self.bytes_downloaded += len(chunk)
                yield chunk
        except (
            aiohttp.ClientPayloadError,
            aiohttp.ClientConnectionError,
            ConnectionError,
            TimeoutError,
        ) as exc:
            raise TransferFailed(
                f"blob download from {response.url.host} broke: {one_line(exc)}"
            ) from None
