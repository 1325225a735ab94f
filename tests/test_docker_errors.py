"""Daemon error messages become domain errors: permanent ones are never retried."""

from __future__ import annotations

import pytest

from asynccache.docker import classify_pull_error
from asynccache.errors import ImageNotFound, PullFailed, RateLimited, Unauthorized
from asynccache.pipeline import is_transient

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
