"""The ``run`` command (the default): caching a dataset split, its progress, summary, exit code."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import anyio

from asynccache import config
from asynccache.api import dataset_split, open_pipeline
from asynccache.cache.index import read_index
from asynccache.cache.layout import TYPICAL_INSTANCE_BYTES, CacheDir
from asynccache.cache.parts import known_records
from asynccache.cache.records import record_exclude
from asynccache.cli import common, logs
from asynccache.cli.common import EXIT_OK, EXIT_PIPE, EXIT_USAGE, Subparsers
from asynccache.cli.progress import ProgressReporter, resolve_mode
from asynccache.cli.report import (
    Output,
    dataset_line,
    dry_run_json,
    exit_code,
    summary_json,
    summary_lines,
    summary_prefix,
)
from asynccache.cli.run_flags import add_run_flags, ignored_flags, validate
from asynccache.config import CacheOptions
from asynccache.dataset import SplitRows, iterate_in_thread
from asynccache.entries import Entry, entry_from_row
from asynccache.errors import CacheError, IndexCorrupt, InvalidEntry
from asynccache.pipeline import Pipeline, Summary, numbered_rows
from asynccache.shards import Shard, parse_shard, shard_size

log = logging.getLogger("asynccache")


def add_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    """Add ``run``, the caching job (the default command); its handler is ``args.func``."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "run",
        usage="asynccache [run] [options]",
        help="cache /testbed of every entry of a dataset split (the default command)",
        description="Cache /testbed of every R2E-Gym image into a folder, concurrently and safely.",
    )
    add_run_flags(parser)
    parser.set_defaults(func=run_command)
    return parser


async def open_rows(args: argparse.Namespace) -> SplitRows:
    """The rows the arguments name (loaded in a worker thread: the Hub may be slow)."""
    return await anyio.to_thread.run_sync(
        dataset_split, args.dataset, args.split, args.max_entries, args.revision
    )


async def dry_run(
    args: argparse.Namespace, cache_dir: Path, output: Output, shard: Shard | None = None
) -> int:
    """List each entry that would be cached (of the shard) and count those cached already."""
    split = await open_rows(args)
    cache = CacheDir(cache_dir)
    if shard is not None:
        records, notes = known_records(cache.root) if cache.root.is_dir() else ({}, [])
        for note in notes:
            _say(args, output, f"note: {note}")
    else:
        try:
            records = read_index(cache.index_path)
        except IndexCorrupt as exc:
            note = f"index.json is damaged ({exc}); a real run would set it aside and rebuild it"
            _say(args, output, f"note: {note}")
            records = {}
    todo: list[tuple[str, str]] = []
    invalid: list[str] = []
    cached = 0
    async for row_number, row in numbered_rows(iterate_in_thread(split.rows), shard):
        try:
            entry = row if isinstance(row, Entry) else entry_from_row(row, row_number)
        except InvalidEntry as exc:
            invalid.append(str(exc))
            if not _say(args, output, f"invalid  {exc}"):
                return EXIT_PIPE
            continue
        record = records.get(entry.instance_id)
        if (
            args.skip_existing
            and record is not None
            and record_exclude(record) == args.exclude
            and cache.instance_path(entry.instance_id).is_dir()
        ):
            cached += 1
            continue
        todo.append((entry.instance_id, entry.docker_image))
        if not _say(args, output, f"would cache  {entry.instance_id}  {entry.docker_image}"):
            return EXIT_PIPE
    scope = f"Dry run, {shard.label}" if shard is not None else "Dry run"
    counts = (
        f"{scope}: {len(todo)} to cache, {cached} already cached, {len(invalid)} invalid rows; "
        f"cache {cache.root}"
    )
    for line in (counts, dataset_line(split)):
        if not _say(args, output, line):
            return EXIT_PIPE
    if args.json:
        output.json(dry_run_json(split, cache.root, todo, cached, invalid, shard=shard))
    return EXIT_OK


def _say(args: argparse.Namespace, output: Output, line: str) -> bool:
    """A result line: on stdout, or on stderr when stdout carries the JSON object."""
    if args.json:
        print(line, file=sys.stderr)
        return True
    return output.line(line)


def report(
    args: argparse.Namespace, output: Output, summary: Summary, split: SplitRows, code: int
) -> None:
    """The end of a run: failures on stderr; the summary lines, or them on stderr and JSON."""
    prefix = summary_prefix(summary)
    for outcome in summary.failures:
        print(f"{prefix}FAILED {outcome.instance_id}: {outcome.reason}", file=sys.stderr)
    for line in summary_lines(summary, split):
        _say(args, output, line)
    if args.json:
        output.json(summary_json(summary, split, code))


async def run(args: argparse.Namespace, output: Output) -> int:
    """Run the caching job for parsed arguments; return the exit code."""
    validate(args)
    log.debug("event loop: %s", type(asyncio.get_running_loop()).__module__)
    cache_dir = common.cache_dir(args)
    mode = resolve_mode(args.progress, terminal=sys.stderr.isatty(), quiet=args.quiet > 0)
    if mode != "bar":
        # Download bars of datasets and huggingface_hub would land in logs as CR-ridden lines.
        for variable in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
            os.environ.setdefault(variable, "1")
    ignored = ignored_flags(args)
    if ignored:
        log.warning("%s: ignored with --backend %s", ", ".join(ignored), args.backend)
    shard = parse_shard(args.shard, os.environ) if args.shard else None
    if args.dry_run:
        return await dry_run(args, cache_dir, output, shard)
    if args.backend == "registry":
        _note_old_layers(cache_dir, args.layer_cache_dir or config.default_layer_cache_dir())
    split = await open_rows(args)
    total = split.total
    if total is not None and shard is not None:
        total = shard_size(total, shard)
    rows = iterate_in_thread(split.rows)
    options = CacheOptions(
        cache_dir=cache_dir,
        concurrency=args.concurrency,
        processes=args.processes,
        skip_existing=args.skip_existing,
        skip_pull=args.skip_pull,
        keep_images=args.keep_images,
        pull_timeout=args.pull_timeout,
        cp_timeout=args.cp_timeout,
        max_testbed_bytes=args.max_testbed_bytes,
        max_testbed_files=args.max_testbed_files,
        rate_limit_max_wait=args.rate_limit_max_wait,
        daemon_wait=args.daemon_wait,
        backend=args.backend,
        platform=args.platform,
        insecure_registries=tuple(args.insecure_registry),
        registry_mirror=args.registry_mirror,
        layer_cache_dir=args.layer_cache_dir,
        dataset=split.dataset,
        dataset_revision=split.revision,
        shard=shard,
        keep_git_history=args.keep_git_history,
        dedup=args.dedup,
        exclude=tuple(args.exclude),
    )
    reporter = ProgressReporter(
        total=total,
        mode=mode,
        handler=logs.current_handler(),
        label=shard.label if shard is not None else "",
    )
    signalled: list[int] = []
    async with anyio.create_task_group() as tg:
        holder: list[Pipeline] = []
        tg.start_soon(_watch_signals, holder, signalled, tg.cancel_scope)
        with reporter:
            async with open_pipeline(
                options, on_outcome=reporter.update, on_status=reporter.set_status
            ) as pipeline:
                holder.append(pipeline)
                if signalled:
                    pipeline.stop(f"stopped by {signal.Signals(signalled[0]).name}")
                _warn_if_disk_small(pipeline, total)
                summary = await pipeline.run(rows)
        code = 128 + signalled[0] if signalled else exit_code(summary)
        report(args, output, summary, split, code)
        tg.cancel_scope.cancel()
    # Removing the loop's handler may leave SIGINT at SIG_DFL; make it an exception again.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return code


async def _watch_signals(
    holder: list[Pipeline], signalled: list[int], scope: anyio.CancelScope
) -> None:
    """First SIGINT/SIGTERM: stop cleanly. A second SIGINT: leave at once."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if signalled and signum == signal.SIGINT:
                print("asynccache: second interrupt, leaving now", file=sys.stderr)
                os._exit(128 + signum)
            if signalled:
                continue
            signalled.append(signum)
            name = signal.Signals(signum).name
            print(
                f"asynccache: {name}: stopping; cleaning up (press Ctrl-C again to leave now)",
                file=sys.stderr,
            )
            if holder:
                holder[0].stop(f"stopped by {name}")


def _note_old_layers(cache_dir: Path, layers: Path) -> None:
    """Earlier versions kept the blob cache in cache_dir/.layers: say it is no longer used."""
    old = cache_dir / ".layers"
    if old.is_dir() and old.resolve() != layers.resolve():
        log.warning(
            "%s is no longer used (layer blobs are kept in %s); remove it, or pass "
            "--layer_cache_dir %s to keep using it",
            old,
            layers,
            old,
        )


def _warn_if_disk_small(pipeline: Pipeline, total: int | None) -> None:
    todo = total if total is not None else 1
    needed = min(todo, pipeline.options.concurrency * 4) * TYPICAL_INSTANCE_BYTES
    free = pipeline.cache.free_bytes()
    if free < needed:
        log.warning(
            "only %.1f GiB free in %s; a /testbed takes ~%d MiB, so this run may fill the disk",
            free / 2**30,
            pipeline.cache.root,
            TYPICAL_INSTANCE_BYTES // 2**20,
        )


def _backend_options() -> dict[str, object]:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


def run_command(args: argparse.Namespace) -> int:
    """Run the caching job (or the dry run) for parsed arguments; return the exit code."""
    output = Output()
    try:
        code = anyio.run(run, args, output, backend="asyncio", backend_options=_backend_options())
    except KeyboardInterrupt:
        code = 128 + signal.SIGINT
    except (CacheError, BaseExceptionGroup) as exc:
        error = _cache_error(exc)
        if error is None:
            raise
        print(f"asynccache: error: {error}", file=sys.stderr)
        if args.json:
            output.json({"command": "run", "exit_code": EXIT_USAGE, "error": str(error)})
        return EXIT_USAGE
    if code > 128:
        # Stopped by a signal: everything is written; skip the interpreter's slow teardown,
        # during which a further Ctrl-C would kill the process without our exit code.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _cache_error(exc: BaseException) -> CacheError | None:
    """The CacheError behind ``exc``, looking inside exception groups."""
    if isinstance(exc, CacheError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _cache_error(inner)
            if found is not None:
                return found
    return None
