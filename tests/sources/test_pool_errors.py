"""Errors raised in a worker process reach the main process with what the pipeline acts on."""

from __future__ import annotations

import inspect
import pickle
from pathlib import Path
from typing import Any

import pytest

from asynccache import errors
from asynccache.errors import CacheError
from asynccache.sources.pool_worker import error_payload

#: A value for each kind of constructor parameter the errors take.
SAMPLES: dict[str, Any] = {
    "str": "x",
    "float": 3.0,
    "int": 3,
    "Path": Path("/cache"),
    "list[str]": ["/var/run/docker.sock"],
    "float | None": None,
}


def _every_error() -> list[CacheError]:
    made: list[CacheError] = []
    for _name, cls in inspect.getmembers(errors, inspect.isclass):
        if not issubclass(cls, CacheError) or cls.__module__ != errors.__name__:
            continue
        params = list(inspect.signature(cls.__init__).parameters.values())[1:]
        if any(p.kind is p.VAR_POSITIONAL for p in params):
            made.append(cls("something went wrong"))
            continue
        made.append(cls(*(SAMPLES[str(p.annotation)] for p in params if p.default is p.empty)))
    return made


@pytest.mark.parametrize("error", _every_error(), ids=lambda e: type(e).__name__)
def test_every_error_keeps_its_message_and_what_a_retry_depends_on(error: CacheError) -> None:
    travelled = pickle.loads(error_payload(error))
    assert isinstance(travelled, CacheError)
    assert str(travelled) == str(error)
    assert travelled.transient == error.transient
    assert travelled.retry_later == error.retry_later


def test_an_error_that_is_not_ours_arrives_as_a_permanent_failure_naming_its_type() -> None:
    class Odd(Exception):
        def __init__(self, a: int, b: int) -> None:
            super().__init__(f"{a}/{b}")

    travelled = pickle.loads(error_payload(Odd(1, 2)))
    assert isinstance(travelled, CacheError)
    assert str(travelled) == "Odd: 1/2"
    assert not travelled.transient and not travelled.retry_later
