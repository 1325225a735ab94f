"""Cache the /testbed repository of every R2E-Gym task image, concurrently and safely."""

from importlib.metadata import PackageNotFoundError, version

from asynccache.api import cache_repos, cache_repos_stream, dataset_rows
from asynccache.config import CacheOptions
from asynccache.entries import Entry, entry_from_row, make_instance_id
from asynccache.errors import CacheError, EnsureFailed, MissingInstance
from asynccache.pipeline import Outcome, Summary
from asynccache.trainer.repo_cache import RepoCache

try:
    __version__ = version("asynccache")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "CacheError",
    "CacheOptions",
    "EnsureFailed",
    "Entry",
    "MissingInstance",
    "Outcome",
    "RepoCache",
    "Summary",
    "cache_repos",
    "cache_repos_stream",
    "dataset_rows",
    "entry_from_row",
    "make_instance_id",
]
