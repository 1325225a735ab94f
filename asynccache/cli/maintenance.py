"""Command line of the maintenance commands: ``verify``, ``status``, ``merge`` and ``gc``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from asynccache import config
from asynccache.cache.gc import collect_garbage
from asynccache.cache.merge import format_merge, merge_cache
from asynccache.cache.status import cache_status, format_status, human_bytes
from asynccache.cache.verify import format_verify, verify_cache
from asynccache.cli.common import (
    EXIT_OK,
    Parser,
    Subparsers,
    add_global_flags,
    cache_dir,
    guarded,
)

__all__ = [
    "COMMANDS",
    "add_gc_parser",
    "add_merge_parser",
    "add_status_parser",
    "add_verify_parser",
    "build_parser",
    "main",
    "run_gc",
    "run_merge",
    "run_status",
    "run_verify",
]

#: The maintenance commands (``python -m asynccache verify ...``).
COMMANDS = ("verify", "status", "merge", "gc")


def add_verify_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add the ``verify`` command (its handler is ``args.func``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "verify",
        help="check every cached tree against index.json (exit 1 when one is damaged)",
        description="Check every indexed instance: folder present, file count and size as "
        "recorded; with --deep, content against the digest recorded at extraction.",
    )
    parser.add_argument(
        "--deep", action="store_true", help="also hash every file and compare digests"
    )
    parser.add_argument(
        "--repair",
        action="store_true",
        help="drop damaged and missing instances from index.json so the next run re-extracts",
    )
    parser.add_argument("--jobs", type=int, default=None, help="parallel checks (default: cores)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run_verify)
    return parser


def add_status_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add the ``status`` command (its handler is ``args.func``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "status",
        help="cached, missing and failed counts, total size, per repository",
        description="Count cached, missing and failed instances of a cache folder, optionally "
        "against a dataset split.",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help="count against this dataset (Hub id or local folder) instead of the index",
    )
    parser.add_argument("--split", default=config.dataset_split, help="dataset split")
    parser.add_argument(
        "--revision", default=None, metavar="REV", help="Hub dataset version (tag, branch, commit)"
    )
    parser.add_argument(
        "--max_entries", "--max-entries", type=int, default=None, help="first N rows only"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run_status)
    return parser


def add_merge_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add the ``merge`` command (its handler is ``args.func``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "merge",
        help="write index.json from every shard's index part; report shards not done "
        "(exit 1 when one is missing, running or incomplete)",
        description="Fold every shard's index part (and failures) into index.json and "
        "failures.json, atomically; safe while shards still run, and idempotent. With --from, "
        "first gather the instances of cache folders that shards filled on other disks.",
    )
    parser.add_argument(
        "--from",
        dest="sources",
        nargs="+",
        default=[],
        metavar="DIR",
        help="cache folders to gather in first (renamed on one filesystem, copied across)",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run_merge)
    return parser


def run_verify(args: argparse.Namespace) -> int:
    """Run ``verify``; 0 healthy, 1 something missing or damaged (even if repaired), 2 error."""

    def run(args: argparse.Namespace) -> int:
        report = verify_cache(cache_dir(args), deep=args.deep, repair=args.repair, jobs=args.jobs)
        if args.json:
            data: dict[str, Any] = dataclasses.asdict(report)
            data["healthy"] = report.healthy
            print(json.dumps(data, indent=2))
        else:
            print(format_verify(report))
        return report.exit_code

    return guarded(run, args)


def run_status(args: argparse.Namespace) -> int:
    """Run ``status``; 0, or 2 on an error."""

    def run(args: argparse.Namespace) -> int:
        rows = None
        if args.dataset is not None:
            from asynccache.api import dataset_rows

            rows = dataset_rows(args.dataset, args.split, args.max_entries, args.revision)
        report = cache_status(cache_dir(args), rows)
        if args.json:
            print(json.dumps(dataclasses.asdict(report), indent=2))
        else:
            print(format_status(report))
        return EXIT_OK

    return guarded(run, args)


def add_gc_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add the ``gc`` command (its handler is ``args.func``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "gc",
        help="free stored files that no cached tree links any more",
        description="Free every file of cache_dir/.store that no cached tree links (left by "
        "trees replaced, removed or interrupted). A file a tree links is never freed.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run_gc)
    return parser


def run_gc(args: argparse.Namespace) -> int:
    """Run ``gc``; 0, or 2 on an error (a run holding the folder, ...)."""

    def run(args: argparse.Namespace) -> int:
        report = collect_garbage(cache_dir(args))
        if args.json:
            print(json.dumps(dataclasses.asdict(report), indent=2))
        else:
            print(
                f"gc {report.cache_dir}: freed {report.freed_objects} objects "
                f"({human_bytes(report.freed_bytes)}); the store holds {report.store.objects} "
                f"objects ({human_bytes(report.store.bytes)})"
            )
        return EXIT_OK

    return guarded(run, args)


def run_merge(args: argparse.Namespace) -> int:
    """Run ``merge``; 0 every shard done, 1 some shard not done (index written), 2 error."""

    def run(args: argparse.Namespace) -> int:
        report = merge_cache(cache_dir(args), [Path(source) for source in args.sources])
        if args.json:
            data: dict[str, Any] = dataclasses.asdict(report)
            data["complete"] = report.exit_code == 0
            print(json.dumps(data, indent=2))
        else:
            print(format_merge(report))
        return report.exit_code

    return guarded(run, args)


def build_parser() -> argparse.ArgumentParser:
    """A parser of the maintenance commands alone (``python -m asynccache.cli.maintenance``)."""
    parser = Parser(prog="asynccache", description="Maintenance commands of a cache folder.")
    subparsers: Subparsers = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="command",
    )
    for add in (add_verify_parser, add_status_parser, add_merge_parser, add_gc_parser):
        add_global_flags(add(subparsers))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse a maintenance command (``verify ...``, ``gc ...``) and run it; return its exit code."""
    args = build_parser().parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.func
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
