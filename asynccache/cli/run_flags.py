"""The ``run`` command's flags: their definitions, their checks, which ones a backend ignores."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from asynccache import config
from asynccache.cli.common import byte_count, flag
from asynccache.cli.progress import MODES
from asynccache.errors import SetupError
from asynccache.shards import SHARD_COUNT_VAR
from asynccache.tree.exclude import ExcludeRules

__all__ = ["add_run_flags", "ignored_flags", "validate"]


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """Add every flag of ``run`` to its parser."""
    parser.add_argument(
        "--dataset",
        default=config.dataset_name,
        help="Hugging Face dataset id or a local copy's folder (data/{split}-*.parquet)",
    )
    parser.add_argument(
        "--split", default=config.dataset_split, help="dataset split (default train)"
    )
    parser.add_argument(
        "--revision",
        default=None,
        metavar="REV",
        help="Hub dataset version: a tag, branch or commit (default: the main branch); the "
        "commit is recorded in every index record",
    )
    parser.add_argument(
        *flag("max_entries"), type=int, default=None, help="take the first N rows only"
    )
    parser.add_argument(
        "--concurrency", type=int, default=config.concurrency, help="entries in flight at once"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=config.processes,
        help="worker processes sharing those entries (default: the cores this process may "
        f"use, {config.processes} here; 1 does everything in this process)",
    )
    parser.add_argument(
        *flag("skip_existing"),
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip entries already cached (default on; --no-skip_existing re-extracts)",
    )
    parser.add_argument(
        *flag("skip_pull"), action="store_true", help="never pull; use local images only"
    )
    parser.add_argument(
        *flag("keep_images"),
        action="store_true",
        help="keep images this run pulled (default: remove them after extraction)",
    )
    parser.add_argument(
        *flag("dry_run"),
        action="store_true",
        help="list what would be cached; needs no Docker daemon",
    )
    parser.add_argument(
        *flag("cp_timeout"),
        type=float,
        default=config.cp_timeout,
        help="seconds allowed to copy one /testbed out (default 120)",
    )
    parser.add_argument(
        *flag("pull_timeout"),
        type=float,
        default=config.pull_timeout,
        help="seconds allowed for one pull (default 600); with --backend registry, for one "
        "entry's manifest, layers and their extraction (rate-limit pauses not counted)",
    )
    parser.add_argument(
        *flag("max_testbed_bytes"),
        type=byte_count,
        default=config.max_testbed_bytes,
        metavar="BYTES",
        help="most uncompressed archive data one entry may read, e.g. 64G (default 64 GiB): "
        "every layer's with --backend registry, sparse files at their full size; a "
        "decompression bomb fails its own entry",
    )
    parser.add_argument(
        *flag("max_testbed_files"),
        type=int,
        default=config.max_testbed_files,
        metavar="N",
        help="most archive members one entry may read (default 5000000; every layer's with "
        "--backend registry)",
    )
    parser.add_argument(
        *flag("rate_limit_max_wait"),
        type=float,
        default=config.rate_limit_max_wait,
        help="seconds to wait out a registry's rate limit before failing the "
        "remaining entries (default 21600, Docker Hub's window)",
    )
    parser.add_argument(
        *flag("daemon_wait"),
        type=float,
        default=config.daemon_wait,
        help="seconds to wait for a Docker daemon that went away mid-run (a restart) before "
        "failing the remaining entries (default 600)",
    )
    parser.add_argument(
        "--backend",
        choices=("docker", "registry"),
        default=config.backend,
        help="docker: through a Docker daemon (default); registry: read image "
        "layers straight from the registry, no daemon needed",
    )
    parser.add_argument(
        "--platform",
        default=config.platform,
        help="with --backend registry: platform to pick from multi-platform images",
    )
    parser.add_argument(
        *flag("insecure_registry"),
        action="append",
        default=[],
        metavar="HOST[:PORT]",
        help="with --backend registry: reach this registry over plain HTTP "
        "(loopback registries always are); repeatable (comma-separated in the variable)",
    )
    parser.add_argument(
        *flag("registry_mirror"),
        default=None,
        metavar="URL",
        help="with --backend registry: pull Docker Hub images through this pull-through mirror",
    )
    parser.add_argument(
        *flag("layer_cache_dir"),
        type=Path,
        default=None,
        metavar="DIR",
        help="with --backend registry: where layer blobs are kept between runs (default "
        "$XDG_CACHE_HOME/asynccache/layers, i.e. ~/.cache/asynccache/layers), outside the "
        "cache folder",
    )
    parser.add_argument(
        "--shard",
        default=None,
        metavar="K/N|auto",
        help="cache only shard K (0-based) of N, beside the other shards' runs on the same "
        "cache folder; auto: from a Slurm array (SLURM_ARRAY_TASK_ID) or a Kubernetes Indexed "
        f"Job (JOB_COMPLETION_INDEX with {SHARD_COUNT_VAR}); then `asynccache merge`",
    )
    parser.add_argument(
        *flag("keep_git_history"),
        action="store_true",
        help="keep each repository's .git exactly as the image has it (default: remove every "
        "ref, reflog and object past HEAD, where the fix is, before the tree is published)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object on stdout at the end (counts, bytes, seconds, dataset "
        "and revision, every failure, why the run stopped); the lines go to stderr",
    )
    parser.add_argument(
        "--progress",
        choices=MODES,
        default="auto",
        help="auto: a live bar on a terminal, else progress lines every 10 s; bar; plain "
        "(lines); none",
    )
    parser.add_argument(
        "--dedup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="store each distinct file once, hard-linked from cache_dir/.store into every "
        "tree that has it (default on; --no_dedup writes every file of every tree)",
    )
    parser.add_argument(
        "--no_dedup",
        dest="dedup",
        action="store_false",
        default=argparse.SUPPRESS,
        help=argparse.SUPPRESS,
    )
    parser.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave out paths matching this gitignore-style pattern (e.g. .venv, "
        "**/__pycache__); repeatable; recorded in each index record",
    )


def validate(args: argparse.Namespace) -> None:
    """Refuse values no run can use, naming the flag (or the variable that gave it)."""
    if args.concurrency < 1:
        raise SetupError(f"{_named(args, 'concurrency')} must be at least 1")
    if args.processes < 1:
        raise SetupError(f"{_named(args, 'processes')} must be at least 1")
    if args.max_entries is not None and args.max_entries < 0:
        raise SetupError(f"{_named(args, 'max_entries')} must not be negative")
    if args.cp_timeout <= 0 or args.pull_timeout <= 0:
        raise SetupError(
            f"{_named(args, 'cp_timeout')} and {_named(args, 'pull_timeout')} must be positive"
        )
    if args.daemon_wait < 0:
        raise SetupError(f"{_named(args, 'daemon_wait')} must not be negative")
    for limit in ("max_testbed_bytes", "max_testbed_files"):
        if getattr(args, limit) < 1:
            raise SetupError(f"{_named(args, limit)} must be at least 1")
    try:
        ExcludeRules(args.exclude)
    except ValueError as exc:
        raise SetupError(f"{exc}; give gitignore-style patterns such as .venv") from None


def _named(args: argparse.Namespace, dest: str) -> str:
    """How an error names an option: its flag, or its variable when the value came from there."""
    variable = getattr(args, "from_env", {}).get(dest)
    if variable is not None and os.environ.get(variable) is not None:
        return f"--{dest} (from {variable}={os.environ[variable]})"
    return f"--{dest}"


def ignored_flags(args: argparse.Namespace) -> list[str]:
    """The flags given on the command line that the chosen backend ignores.

    A value from an ASYNCCACHE_<OPTION> variable is a standing setting (a cluster profile's,
    say) that applies when it can: it gets no warning.
    """
    if args.backend == "registry":
        given = {
            "skip_pull": args.skip_pull,
            "keep_images": args.keep_images,
            "cp_timeout": args.cp_timeout != config.cp_timeout,
        }
    else:
        given = {
            "platform": args.platform != config.platform,
            "insecure_registry": bool(args.insecure_registry),
            "registry_mirror": args.registry_mirror is not None,
            "layer_cache_dir": args.layer_cache_dir is not None,
        }
    from_env = getattr(args, "from_env", {})
    return [f"--{dest}" for dest, on in given.items() if on and dest not in from_env]
