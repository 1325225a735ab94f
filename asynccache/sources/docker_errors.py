"""What the Docker daemon's failures mean: each one as a domain error (permanent or not)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiodocker
import aiohttp

from asynccache.errors import (
    CacheError,
    DaemonUnavailable,
    ImageNotFound,
    InvalidReference,
    PullFailed,
    RateLimited,
    Unauthorized,
    one_line,
)
from asynccache.reference import parse_reference

_NOT_FOUND_MARKERS = ("manifest unknown", "not found", "does not exist", "no such image")
_AUTH_MARKERS = ("unauthorized", "authentication required", "denied")
_RATE_MARKERS = ("toomanyrequests", "too many requests", "rate limit")


@asynccontextmanager
async def translated(address: str, image: str) -> AsyncIterator[None]:
    """Raise a daemon call's failure about ``image`` as a domain error."""
    try:
        yield
    except aiodocker.DockerError as exc:
        if exc.status == 900:
            raise DaemonUnavailable(address, one_line(exc)) from None
        raise classify_pull_error(image, str(exc.message), exc.status) from None
    except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError) as exc:
        raise DaemonUnavailable(address, one_line(exc)) from None


def classify_pull_error(image: str, message: str, status: int = 0) -> CacheError:
    """Turn a daemon's pull error message into a domain error.

    Markers are looked for in the message with the image reference taken out, so that a
    name or a port (``127.0.0.1:42909``, ``ratelimit/app``) never decides the kind of error.
    """
    lowered = _without_references(message, image).lower()
    if status == 429 or any(marker in lowered for marker in _RATE_MARKERS):
        return RateLimited(image, message)
    if "pull access denied" in lowered or "repository does not exist" in lowered:
        return ImageNotFound(image, f"{message} (check the name, or `docker login`)")
    if status == 404 or any(marker in lowered for marker in _NOT_FOUND_MARKERS):
        return ImageNotFound(image, message)
    if status == 401 or any(marker in lowered for marker in _AUTH_MARKERS):
        return Unauthorized(image, message)
    return PullFailed(image, message)


def _without_references(message: str, image: str) -> str:
    names = {image}
    try:
        ref = parse_reference(image)
    except InvalidReference:
        pass  # a container id or another name that is not an image reference
    else:
        written = image.partition("@")[0]
        if written.rfind(":") > written.rfind("/"):
            written = written[: written.rfind(":")]
        names |= {written, ref.name, ref.repository, ref.repository.split("/", 1)[-1]}
    for reference in sorted(names, key=len, reverse=True):
        message = message.replace(reference, "<image>")
    return message


def raise_on_stream_error(image: str, line: bytes) -> None:
    """Raise the error a line of the pull's progress stream reports, if it reports one."""
    line = line.strip()
    if not line:
        return
    try:
        message = json.loads(line)
    except ValueError:
        return
    if isinstance(message, dict) and (message.get("error") or message.get("errorDetail")):
        detail = message.get("errorDetail") or {}
        text = detail.get("message") or message.get("error") or "unknown error"
        raise classify_pull_error(image, str(text), int(detail.get("code") or 0))
