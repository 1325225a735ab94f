"""Defaults for every option, with environment overrides."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from asynccache.shards import Shard

#: Where the cache lives unless --cache_dir or ASYNCCACHE_CACHE_DIR says otherwise.
repo_cache_dir = os.environ.get("ASYNCCACHE_CACHE_DIR", "/data/repo-cache")
dataset_name = os.environ.get("ASYNCCACHE_DATASET", "R2E-Gym/R2E-Gym-Lite")
dataset_split = "train"
concurrency = 16


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


#: Worker processes that do the per-entry work (1: all in the main process): by default one per
#: core this process may use, since one process is bound by its GIL to about 1.5 cores.
processes = usable_cores()
#: Extractions running at once (CPU-bound); pulls are not limited by this.
extract_slots = max(2, 2 * (os.cpu_count() or 1))
pull_timeout = 600.0
cp_timeout = 120.0
testbed_path = "/testbed"
#: Where /testbed is read from: "docker" (a daemon) or "registry" (image layers, no daemon).
backend = "docker"
#: The image picked from multi-platform images.
platform = "linux/amd64"
#: Most bytes of uncompressed archive data one entry may read (every layer's, for the registry
#: backend; sparse files count at their full size), and most archive members it may read.
max_testbed_bytes = 64 << 30
max_testbed_files = 5_000_000
#: Longest total pause for a registry rate limit before the remaining pulls fail.
rate_limit_max_wait = 6 * 3600.0
#: First pause after a rate limit answer (doubles up to rate_limit_pause_max).
rate_limit_pause = float(os.environ.get("ASYNCCACHE_RATE_LIMIT_PAUSE", "60"))
rate_limit_pause_max = 900.0
#: Tries per entry for transient errors, and their time budget and waits (stamina's).
retry_attempts = 6
retry_timeout = 600.0
retry_wait_initial = 0.5
retry_wait_max = 10.0
#: Shortest pause between two rewrites of index.json during a run.
index_min_interval = 0.5
#: Longest time to wait for a Docker daemon that went away mid-run (a restart) before the
#: remaining entries fail.
daemon_wait = 600.0
#: Seconds between pings of a Docker daemon that went away.
daemon_ping_interval = 2.0

#: Label put on every container we create; its value is the absolute cache folder.
CONTAINER_LABEL = "io.asynccache.cache_dir"
#: Label naming the shard (``3-of-16``) whose run created the container, when sharded.
SHARD_LABEL = "io.asynccache.shard"

#: The version of the index record format, recorded in each record as ``schema_version``:
#: 1 is the original script's; 2 adds it, the dataset and its revision, and the byte count;
#: 3 adds ``git_history`` ("head": nothing past HEAD was kept; "full": .git as the image has it).
INDEX_SCHEMA_VERSION = 3

INDEX_NAME = "index.json"
FAILURES_NAME = "failures.json"
TMP_DIR_NAME = ".tmp"
META_DIR_NAME = ".meta"
LOCK_NAME = ".lock"
#: Each shard's lock, index part and failures (``3-of-16.lock``, ``.json``, ``.failures.json``).
SHARDS_DIR_NAME = ".shards"
#: The object store of deduplicated files (see cache/store.py; its names: store_layout.py).
STORE_DIR_NAME = ".store"
#: Links per stored object before a new copy starts (ext4 allows 65,000).
store_max_links = 60_000


def default_cache_dir() -> Path:
    """The cache folder used when none is given."""
    return Path(os.environ.get("ASYNCCACHE_CACHE_DIR", repo_cache_dir))


def default_layer_cache_dir() -> Path:
    """The registry backend's blob cache: ASYNCCACHE_LAYER_CACHE_DIR, else under the user's
    cache home (``$XDG_CACHE_HOME/asynccache/layers``, ``~/.cache/asynccache/layers``), outside
    any cache folder, so that copying a cache to training nodes takes no blobs along."""
    given = os.environ.get("ASYNCCACHE_LAYER_CACHE_DIR")
    if given:
        return Path(given).expanduser()
    home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(home) / "asynccache" / "layers"


@dataclass(frozen=True)
class CacheOptions:
    """Everything a caching run needs besides its entries."""

    cache_dir: Path = field(default_factory=default_cache_dir)
    concurrency: int = concurrency
    processes: int = processes
    extract_slots: int = extract_slots
    skip_existing: bool = True
    skip_pull: bool = False
    keep_images: bool = False
    pull_timeout: float = pull_timeout
    cp_timeout: float = cp_timeout
    testbed_path: str = testbed_path
    max_testbed_bytes: int = max_testbed_bytes
    max_testbed_files: int = max_testbed_files
    backend: str = backend
    platform: str = platform
    insecure_registries: tuple[str, ...] = ()
    registry_mirror: str | None = None
    #: The registry backend's blob cache (None: :func:`default_layer_cache_dir`).
    layer_cache_dir: Path | None = None
    rate_limit_max_wait: float = rate_limit_max_wait
    rate_limit_pause: float = rate_limit_pause
    daemon_wait: float = daemon_wait
    retry_attempts: int = retry_attempts
    retry_timeout: float = retry_timeout
    retry_wait_initial: float = retry_wait_initial
    retry_wait_max: float = retry_wait_max
    #: Where the rows come from, recorded in every index record (None: not recorded).
    dataset: str | None = None
    #: The Hub commit of the dataset the rows come from (None for rows of no known revision).
    dataset_revision: str | None = None
    #: Cache only this shard of the rows (an array job's task), beside the other shards.
    shard: Shard | None = None
    #: Keep each repository's .git as the image has it; by default every ref, reflog and object
    #: past HEAD is removed before the tree is published (the fix is reachable otherwise).
    keep_git_history: bool = False
    #: Store each distinct (content, mode) once, hard-linked into every tree (--no_dedup).
    dedup: bool = True
    #: gitignore-style patterns of paths left out of every tree (--exclude).
    exclude: tuple[str, ...] = ()
    store_max_links: int = store_max_links

    def record_fields(self) -> dict[str, object]:
        """Fields every index record of this run carries besides the entry's own."""
        fields: dict[str, object] = {
            "schema_version": INDEX_SCHEMA_VERSION,
            "git_history": "full" if self.keep_git_history else "head",
        }
        if self.dataset is not None:
            fields["dataset"] = self.dataset
        if self.dataset_revision is not None:
            fields["dataset_revision"] = self.dataset_revision
        fields["dedup"] = self.dedup
        if self.exclude:
            fields["exclude"] = list(self.exclude)
        return fields
