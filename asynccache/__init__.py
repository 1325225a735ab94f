"""Cache the /testbed repository of every R2E-Gym task image, concurrently and safely.

The caching job (``cache_repos``, ``Outcome``, ``Summary``) and ``RepoCache`` load on first
use, so ``import asynccache`` stays cheap, and a trainer that only reads a cache never loads
the Docker and HTTP clients.
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from asynccache.config import CacheOptions
from asynccache.entries import Entry, entry_from_row, make_instance_id
from asynccache.errors import CacheError, EnsureFailed, MissingInstance

if TYPE_CHECKING:
    from asynccache.api import cache_repos, cache_repos_stream, dataset_rows
    from asynccache.pipeline import Outcome, Summary
    from asynccache.trainer.repo_cache import RepoCache

try:
    __version__ = version("asynccache")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

#: Public names loaded on first use -> the module that defines them.
_LAZY = {
    "cache_repos": "asynccache.api",
    "cache_repos_stream": "asynccache.api",
    "dataset_rows": "asynccache.api",
    "Outcome": "asynccache.pipeline",
    "Summary": "asynccache.pipeline",
    "RepoCache": "asynccache.trainer.repo_cache",
}


def __getattr__(name: str) -> Any:
    """Load a public name's module on first use (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'asynccache' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "CacheError",
    "CacheOptions",
    "EnsureFailed",
    "Entry",
    "MissingInstance",
    "Outcome",
    "RepoCache",
    "Summary",
    "__version__",
    "cache_repos",
    "cache_repos_stream",
    "dataset_rows",
    "entry_from_row",
    "make_instance_id",
]
