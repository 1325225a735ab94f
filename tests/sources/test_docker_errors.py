"""Daemon error messages become domain errors: permanent ones are never retried."""

from __future__ import annotations

import pytest

from asynccache.errors import ImageNotFound, PullFailed, RateLimited, Unauthorized
from asynccache.pipeline import is_transient
from asynccache.sources.docker import classify_pull_error

IMAGE = "namanjain12/x_final:abc"


@pytest.mark.parametrize(
    ("message", "status", "kind", "transient"),
    [
        (
            "manifest for x:abc not found: manifest unknown: manifest unknown",
            404,
            ImageNotFound,
            False,
        ),
        (
            "pull access denied for x, repository does not exist or may require 'docker login'",
            0,
            ImageNotFound,
            False,
        ),
        ("unauthorized: authentication required", 401, Unauthorized, False),
        ("toomanyrequests: You have reached your pull rate limit.", 0, RateLimited, True),
        ("received unexpected HTTP status: 503 Service Unavailable", 500, PullFailed, True),
        ('Get "https://registry/v2/": dial tcp: connection refused', 500, PullFailed, True),
    ],
)
def test_pull_errors_are_classified(
    message: str, status: int, kind: type[Exception], transient: bool
) -> None:
    error = classify_pull_error(IMAGE, message, status)
    assert isinstance(error, kind)
    assert is_transient(error) is transient
    assert IMAGE in str(error)


@pytest.mark.parametrize(
    ("image", "message", "status"),
    [
        (
            "127.0.0.1:42909/namanjain12/x_final:abc",
            "No such image: 127.0.0.1:42909/namanjain12/x_final:abc",
            404,
        ),
        ("ratelimit/app:1", "manifest for ratelimit/app:1 not found: manifest unknown", 404),
        ("toomanyrequests/app:1", "pull access denied for toomanyrequests/app", 0),
    ],
)
def test_the_image_reference_never_decides_the_kind_of_error(
    image: str, message: str, status: int
) -> None:
    error = classify_pull_error(image, message, status)
    assert isinstance(error, ImageNotFound), error
    assert is_transient(error) is False
