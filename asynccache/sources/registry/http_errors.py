"""Registry answers as domain errors: status and error codes, Retry-After, bounded body reads."""

from __future__ import annotations

import json
import time
from email.utils import parsedate_to_datetime

import aiohttp

from asynccache.errors import (
    CacheError,
    ImageNotFound,
    PullFailed,
    RateLimited,
    RegistryError,
    Unauthorized,
    one_line,
)

CHUNK_SIZE = 1 << 20
#: Most redirects followed for one request.
MAX_REDIRECTS = 10
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
NETWORK_ERRORS = (aiohttp.ClientError, ConnectionError, TimeoutError, OSError)
_NOT_FOUND_CODES = frozenset({"MANIFEST_UNKNOWN", "NAME_UNKNOWN", "BLOB_UNKNOWN", "NOT_FOUND"})
_RATE_LIMIT_CODES = frozenset({"TOOMANYREQUESTS"})
_TRANSIENT_STATUSES = frozenset({408, 425, 500, 502, 503, 504})


def error_codes(body: bytes) -> tuple[set[str], str]:
    """The distribution error codes of an error body, and its messages joined (or its start)."""
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


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After value (seconds or an HTTP date), if it says."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


async def read_limited(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """Read at most limit + 1 bytes of a body (network failures become PullFailed)."""
    chunks: list[bytes] = []
    total = 0
    try:
        async for chunk in response.content.iter_chunked(CHUNK_SIZE):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                break
    except NETWORK_ERRORS as exc:
        raise PullFailed(str(response.url), one_line(exc)) from None
    return b"".join(chunks)


async def raise_for_status(response: aiohttp.ClientResponse, image: str, what: str) -> None:
    """Raise the domain error of a non-2xx answer (the response is released)."""
    status = response.status
    if 200 <= status < 300:
        return
    try:
        body = await read_limited(response, 64 << 10) if response.method != "HEAD" else b""
    except CacheError:
        body = b""
    finally:
        response.release()
    codes, message = error_codes(body)
    detail = f"{what}: HTTP {status}" + (f" ({message})" if message else "")
    if status == 429 or codes & _RATE_LIMIT_CODES:
        raise RateLimited(image, detail, retry_after(response.headers.get("Retry-After")))
    if status == 404 or codes & _NOT_FOUND_CODES:
        raise ImageNotFound(image, detail)
    if status in (401, 403) or codes & {"UNAUTHORIZED", "DENIED"}:
        raise Unauthorized(image, detail)
    if status in _TRANSIENT_STATUSES or status >= 500:
        raise PullFailed(image, detail)
    raise RegistryError(image, detail)
