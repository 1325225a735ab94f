"""Where an asynccache run spends its time: phase timers plus an optional sampling profile.

Runs ``python -m asynccache`` on the bench dataset (after the same clean-up as scripts/bench.py)
in a child whose asynccache functions are wrapped with timers (wall seconds summed over all
workers, and the extracting threads' CPU), and, when py-spy is installed and ``--py-spy`` is
given, under ``py-spy record`` in speedscope format. Prints the phase table and the top
functions by self time (all threads), and writes both to ``.bench/profile-<timestamp>.json``.

Usage::

    python scripts/bench_profile.py [--concurrency 16] [--images N] [--py-spy] [--idle]
"""

from __future__ import annotations

import argparse
import atexit
import collections
import functools
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PHASES_ENV = "ASYNCCACHE_BENCH_PHASES"


# --------------------------------------------------------------------------------------------
# Child side: wrap asynccache with timers, then run its command line
# --------------------------------------------------------------------------------------------


class _Totals:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.wall: dict[str, float] = collections.defaultdict(float)
        self.cpu: dict[str, float] = collections.defaultdict(float)
        self.count: dict[str, int] = collections.defaultdict(int)

    def add(self, name: str, wall: float, cpu: float = 0.0) -> None:
        with self.lock:
            self.wall[name] += wall
            self.cpu[name] += cpu
            self.count[name] += 1


def _wrap_async(owner: Any, attr: str, name: str, totals: _Totals) -> None:
    original = getattr(owner, attr)

    @functools.wraps(original)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            totals.add(name, time.perf_counter() - started)

    setattr(owner, attr, timed)


def _wrap_sync(owner: Any, attr: str, name: str, totals: _Totals) -> None:
    original = getattr(owner, attr)

    @functools.wraps(original)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            return original(*args, **kwargs)
        finally:
            totals.add(name, time.perf_counter() - started, time.thread_time() - cpu)

    setattr(owner, attr, timed)


def child_main(argv: list[str]) -> int:
    """Run asynccache's CLI with phase timers; dump the totals at exit."""
    import resource

    code = os.environ.get("ASYNCCACHE_BENCH_CODE")
    if code:
        sys.path.insert(0, code)

    from asynccache import _threads, cli
    from asynccache.cache import index, publish
    from asynccache.sources import docker
    from asynccache.tree import extract

    totals = _Totals()
    backend = docker.DockerBackend
    _wrap_async(backend, "image_present", "docker: image inspect", totals)
    _wrap_async(backend, "pull", "docker: pull (wait for dockerd)", totals)
    _wrap_async(backend, "create_container", "docker: create container", totals)
    _wrap_async(backend, "remove_container", "docker: remove container", totals)
    _wrap_async(backend, "remove_image", "docker: remove image", totals)
    _wrap_async(docker, "extract_stream", "archive: stream + extract (until done)", totals)
    _wrap_sync(extract, "_extract", "thread: tar parse + write (whole member loop)", totals)
    _wrap_sync(_threads._ChunkPipe, "_next_chunk", "thread: waiting for the next chunk", totals)
    _wrap_sync(extract.Extractor, "add_file", "thread: regular files (open/write/utime)", totals)
    _wrap_sync(extract.Extractor, "finish", "thread: folder modes/mtimes (finish)", totals)
    _wrap_sync(publish.Publisher, "_publish", "publish: meta + rename", totals)
    _wrap_async(index.IndexWriter, "flush", "index: IndexWriter.flush", totals)
    _wrap_sync(publish, "remove_tree", "cleanup: remove_tree", totals)

    original_do_query = docker.aiodocker.Docker._do_query

    async def timed_do_query(self: Any, path: str, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await original_do_query(self, path, *args, **kwargs)
        finally:
            if "/archive" in path:
                totals.add("docker: archive request until headers", time.perf_counter() - started)

    docker.aiodocker.Docker._do_query = timed_do_query  # type: ignore[method-assign]
    started = time.perf_counter()

    def dump() -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        out = {
            "wall_s": time.perf_counter() - started,
            "process_cpu_s": usage.ru_utime + usage.ru_stime,
            "process_user_s": usage.ru_utime,
            "process_sys_s": usage.ru_stime,
            "phases": {
                name: {
                    "wall_s": totals.wall[name],
                    "thread_cpu_s": totals.cpu[name],
                    "calls": totals.count[name],
                }
                for name in totals.wall
            },
        }
        Path(os.environ[PHASES_ENV]).write_text(json.dumps(out, indent=1), encoding="utf-8")

    atexit.register(dump)
    return cli.main(argv)


# --------------------------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------------------------


def summarize_speedscope(path: Path, top: int = 30) -> dict[str, Any]:
    """Self and inclusive sample counts by function over every thread of a speedscope file."""
    data = json.loads(path.read_text())
    frames = data["shared"]["frames"]
    self_counts: collections.Counter[str] = collections.Counter()
    incl_counts: collections.Counter[str] = collections.Counter()
    per_thread: collections.Counter[str] = collections.Counter()
    total = 0
    for profile in data["profiles"]:
        for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
            if not stack:
                continue
            total += weight
            per_thread[profile["name"]] += weight
            leaf = frames[stack[-1]]
            self_counts[f"{leaf['name']} ({Path(leaf['file']).name}:{leaf['line']})"] += weight
            seen = set()
            for index in stack:
                frame = frames[index]
                key = f"{frame['name']} ({Path(frame['file']).name})"
                if key not in seen:
                    seen.add(key)
                    incl_counts[key] += weight
    return {
        "samples": total,
        "threads": dict(per_thread.most_common(20)),
        "self": [(k, v, round(100 * v / total, 1)) for k, v in self_counts.most_common(top)],
        "inclusive": [(k, v, round(100 * v / total, 1)) for k, v in incl_counts.most_common(top)],
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        return child_main(argv[1:])
    from scripts import bench
    from scripts import bench_images as bi
    from tests.support import fixtures as fx

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--images", type=int, default=None)
    parser.add_argument("--registry", default=fx.DEFAULT_REGISTRY)
    parser.add_argument("--py-spy", action="store_true", help="also sample with py-spy")
    parser.add_argument("--idle", action="store_true", help="py-spy: include idle threads")
    parser.add_argument("--code", choices=("head", "worktree"), default="head")
    parser.add_argument(
        "--settle", type=float, default=61.0, help="at most this long for cheap file creation"
    )
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    args = parser.parse_args(argv)

    code, code_hash = bench.snapshot_code(args.code)
    print(f"asynccache under test: {code.relative_to(ROOT)}")
    images = bi.ensure_bench_images(args.registry, count=args.images)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    out_dir = bench.BENCH_DIR
    dataset = out_dir / "dataset-profile"
    if dataset.exists():
        shutil.rmtree(dataset)
    bi.write_bench_dataset(dataset, images)
    cache = out_dir / "cache"
    bench.set_aside(cache)
    bench.remove_bench_images()
    create_us = bench.settle(args.settle, out_dir)
    print(f"file creation before the run: {create_us:.0f} us")
    phases_path = out_dir / f"profile-{stamp}.phases.json"
    speedscope = out_dir / f"profile-{stamp}.speedscope.json"
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--dataset",
        str(dataset),
        "--split",
        bi.SPLIT,
        "--cache_dir",
        str(cache),
        "--concurrency",
        str(args.concurrency),
    ]
    if args.py_spy:
        spy = shutil.which("py-spy")
        if spy is None:
            print("py-spy is not installed (pip install py-spy)")
            return 2
        extra = ["--idle"] if args.idle else []
        command = [
            spy,
            "record",
            "--format",
            "speedscope",
            "--rate",
            str(args.rate),
            *extra,
            "-o",
            str(speedscope),
            "--",
            *command,
        ]
    daemon = bench.CpuProbe(bench.DAEMON_NAMES)
    daemon.start()
    started = time.perf_counter()
    env = {**bench.code_env(code), PHASES_ENV: str(phases_path)}
    log = out_dir / f"profile-{stamp}.log"
    with open(log, "wb") as handle:
        proc = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=code)
    wall = time.perf_counter() - started
    dockerd = daemon.stop()
    bench.remove_bench_images()
    bench.set_aside(cache)
    bench.empty_trash()
    phases = json.loads(phases_path.read_text()) if phases_path.exists() else {}
    result: dict[str, Any] = {
        "code_sha256_12": code_hash,
        "concurrency": args.concurrency,
        "images": len(images),
        "exit_code": proc.returncode,
        "wall_s": wall,
        "dockerd_cpu_s": dockerd,
        **phases,
    }
    print(
        f"c{args.concurrency}, {len(images)} images: {wall:.1f}s wall, exit {proc.returncode}, "
        f"process CPU {phases.get('process_cpu_s', 0):.1f}s "
        f"(user {phases.get('process_user_s', 0):.1f}, sys {phases.get('process_sys_s', 0):.1f}), "
        f"dockerd CPU {dockerd:.1f}s"
    )
    print(f"{'phase (summed over workers)':52} {'wall s':>8} {'thread CPU s':>12} {'calls':>6}")
    for name, item in sorted(phases.get("phases", {}).items(), key=lambda kv: -kv[1]["wall_s"]):
        print(f"{name:52} {item['wall_s']:8.1f} {item['thread_cpu_s']:12.1f} {item['calls']:6d}")
    if args.py_spy and speedscope.exists():
        summary = summarize_speedscope(speedscope)
        result["py_spy"] = summary
        result["speedscope"] = str(speedscope)
        print(f"\npy-spy: {summary['samples']} samples; threads: {summary['threads']}")
        print("top self time:")
        for key, count, pct in summary["self"][:25]:
            print(f"  {pct:5.1f}%  {count:8.1f}  {key}")
        print("top inclusive:")
        for key, count, pct in summary["inclusive"][:25]:
            print(f"  {pct:5.1f}%  {count:8.1f}  {key}")
    (out_dir / f"profile-{stamp}.json").write_text(
        json.dumps(result, indent=1, default=str), encoding="utf-8"
    )
    print(f"written {out_dir / f'profile-{stamp}.json'}")
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
