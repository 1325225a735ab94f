"""``export`` and ``import``: cached trees as one stream on stdout, and back from stdin."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import zstandard

from asynccache import config
from asynccache.cache.exchange import ExportReport, ImportReport, export_cache, import_cache
from asynccache.cache.layout import CacheDir
from asynccache.cache.parts import cached_records
from asynccache.cache.status import human_bytes
from asynccache.cli.common import (
    EXIT_FAILURES,
    EXIT_OK,
    Subparsers,
    cache_dir,
    flag,
    guarded,
)
from asynccache.entries import entry_from_row
from asynccache.errors import IndexCorrupt, InvalidEntry, SetupError
from asynccache.shards import Shard, parse_shard, shard_positions

__all__ = ["add_export_parser", "add_import_parser", "run_export", "run_import"]


def add_export_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add the ``export`` command (its handler is ``args.func``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "export",
        help="write cached trees to stdout as one zstd stream (each stored file once)",
        description="Write the cached trees (all, a split's, a shard's or those listed) to "
        "stdout as one zstd-compressed tar stream carrying each distinct file once: "
        "`asynccache export --cache_dir C > cache.tar.zst`, or "
        "`asynccache export ... | ssh node asynccache import --cache_dir D`.",
    )
    parser.add_argument(
        "--dataset",
        default=config.dataset_name,
        help="with --split: the dataset (Hub id or local folder) whose rows name the trees",
    )
    parser.add_argument(
        "--split", default=None, help="only the trees of this split's rows (default: all)"
    )
    parser.add_argument(
        "--shard",
        default=None,
        metavar="K/N",
        help="only shard K of N (as `--shard` of a caching run splits the same rows), or auto",
    )
    parser.add_argument(
        "--ids",
        type=Path,
        default=None,
        metavar="FILE",
        help="only the instance ids listed in FILE, one per line (- for stdin)",
    )
    parser.add_argument(
        *flag("zstd_level"),
        type=zstd_level,
        default=3,
        help="zstd compression level, 1 to 22 (default 3)",
    )
    parser.set_defaults(func=run_export)
    return parser


def zstd_level(text: str) -> int:
    """A zstd compression level (1 to 22: zstd would quietly clamp anything else)."""
    try:
        level = int(text)
    except ValueError:
        level = 0
    if not 1 <= level <= zstandard.MAX_COMPRESSION_LEVEL:
        raise argparse.ArgumentTypeError(
            f"not a zstd level: {text!r} (1 to {zstandard.MAX_COMPRESSION_LEVEL}; 3 is quick, "
            "19 small)"
        )
    return level


def add_import_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add the ``import`` command (its handler is ``args.func``)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "import",
        help="read an export stream from stdin into a cache folder (resumable)",
        description="Read a stream written by `asynccache export` from stdin: store each "
        "file it lacks (checking its digest), rebuild each tree by hard links, check the "
        "tree's digest and publish it atomically with its record. Trees already cached are "
        "skipped, so rerunning a broken transfer resumes it.",
    )
    parser.set_defaults(func=run_import)
    return parser


def run_export(args: argparse.Namespace) -> int:
    """Run ``export``; 0 when every selected tree was sent, 1 when one was left out, 2 error."""

    def run(args: argparse.Namespace) -> int:
        if os.isatty(sys.stdout.fileno()):
            raise SetupError(
                "export writes a binary stream: redirect it (> cache.tar.zst) or pipe it "
                "(| ssh node asynccache import --cache_dir DIR)"
            )
        folder = cache_dir(args)
        ids, not_cached = select_ids(args, folder)
        report = export_cache(folder, sys.stdout.buffer, ids, level=args.zstd_level)
        sys.stdout.buffer.flush()
        _print_export(report, not_cached)
        return EXIT_FAILURES if report.skipped else EXIT_OK

    return guarded(run, args)


def select_ids(args: argparse.Namespace, folder: Path) -> tuple[list[str], int]:
    """The cached instance ids to export, in order, and how many selected ones are not cached."""
    try:
        records = cached_records(CacheDir(folder).root)
    except IndexCorrupt as exc:
        raise SetupError(f"index.json of {folder} is damaged ({exc}); run a caching run") from None
    if args.ids is not None:
        wanted = _read_ids(args.ids)
        groups = [records[i]["repo_name"] if i in records else i for i in wanted]
    elif args.split is not None:
        from asynccache.api import dataset_rows

        wanted, groups = [], []
        for number, row in enumerate(dataset_rows(args.dataset, args.split), start=1):
            try:
                entry = entry_from_row(row, number)
            except InvalidEntry:
                continue
            wanted.append(entry.instance_id)
            groups.append(entry.repo_name)
    else:
        wanted = sorted(records)
        groups = [str(records[i]["repo_name"]) for i in wanted]
    if args.shard is not None:
        shard: Shard = parse_shard(args.shard, os.environ)
        positions = shard_positions(groups, shard)
        wanted = [wanted[position] for position in positions]
    cached = [instance_id for instance_id in dict.fromkeys(wanted) if instance_id in records]
    return cached, len(set(wanted)) - len(cached)


def _read_ids(path: Path) -> list[str]:
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SetupError(f"--ids {path}: cannot be read ({exc})") from None
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def _print_export(report: ExportReport, not_cached: int) -> None:
    for instance_id, reason in report.skipped.items():
        print(f"LEFT OUT {instance_id}: {reason}", file=sys.stderr)
    note = f"; {not_cached} selected trees are not cached" if not_cached else ""
    print(
        f"exported {report.trees} trees, {report.objects} distinct files "
        f"({human_bytes(report.object_bytes)} before compression){note}",
        file=sys.stderr,
    )


def run_import(args: argparse.Namespace) -> int:
    """Run ``import``; 0 when the whole stream was imported, 1 otherwise, 2 set-up error."""

    def run(args: argparse.Namespace) -> int:
        if os.isatty(sys.stdin.fileno()):
            raise SetupError("import reads an export stream: give it on stdin (< cache.tar.zst)")
        report = import_cache(cache_dir(args), sys.stdin.buffer)
        _print_import(report)
        return report.exit_code

    return guarded(run, args)


def _print_import(report: ImportReport) -> None:
    for instance_id, reason in report.failed.items():
        print(f"FAILED {instance_id}: {reason}", file=sys.stderr)
    print(
        f"imported {len(report.imported)} trees into {report.cache_dir}, "
        f"{len(report.skipped)} already there, {len(report.failed)} failed; "
        f"{report.objects_received} files stored ({human_bytes(report.bytes_received)}), "
        f"{report.objects_present} already stored"
    )
    if report.error:
        print(f"asynccache: error: {report.error}", file=sys.stderr)
        print("what arrived complete is kept; rerun the same transfer to resume", file=sys.stderr)
