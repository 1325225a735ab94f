"""Benchmark rollout checkouts (overlay, copy) against `cp -r` of the same cached tree.

Builds two cached trees (a small repository, and a large one with a .venv-like subtree), then
for each destination (the same disk, and tmpfs when /dev/shm exists) times N repetitions of
checkout + release through RepoCache, and of `cp -r` + `rm -rf` as subprocesses, methods
interleaved, each after an (untimed) sync so that no method pays for another's writeback.
Prints the medians and their ratios to cp -r and writes every sample as JSON.

    python scripts/bench_checkout.py [--reps 15] [--out .bench/checkout.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import anyio  # noqa: E402

from asynccache.trainer.checkout import overlay_probe  # noqa: E402
from asynccache.trainer.repo_cache import RepoCache  # noqa: E402
from tests.support.cache_trees import build_generated_tree, cache_instance  # noqa: E402

TREES = {
    "small": {"files": 300, "total_bytes": 3 << 20, "venv_share": 0.0},
    "large": {"files": 9000, "total_bytes": 100 << 20, "venv_share": 0.7},
}
METHODS = ("overlay", "copy", "cp -r")


def build_cache(cache_dir: Path, names: list[str]) -> dict[str, dict[str, Any]]:
    """A fresh cache folder holding the benchmark trees; tree name -> index record."""
    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    records = {}
    for number, (name, shape) in enumerate(TREES.items()):
        if name not in names:
            continue

        def build(path: Path, shape: dict[str, Any] = shape, name: str = name) -> None:
            build_generated_tree(
                path,
                files=int(shape["files"]),
                total_bytes=int(shape["total_bytes"]),
                venv_share=float(shape["venv_share"]),
                seed=name,
            )

        records[name] = cache_instance(cache_dir, f"bench{name}", f"{number:x}" * 40, build)
    return records


def filesystem(path: Path) -> str:
    """The filesystem type of path, as stat -f says."""
    done = subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=False
    )
    return done.stdout.strip() or "unknown"


async def time_method(
    cache: RepoCache, method: str, instance_id: str, source: Path, dest: Path
) -> tuple[float, float]:
    """(checkout seconds, release seconds) of one repetition, from a clean page cache state."""
    os.sync()
    if method == "cp -r":
        started = time.perf_counter()
        subprocess.run(["cp", "-r", str(source), str(dest)], check=True)
        copied = time.perf_counter()
        subprocess.run(["rm", "-rf", str(dest)], check=True)
        return copied - started, time.perf_counter() - copied
    started = time.perf_counter()
    path = await cache.checkout(instance_id, dest, mode=method)  # type: ignore[arg-type]
    checked_out = time.perf_counter()
    await cache.release(path)
    return checked_out - started, time.perf_counter() - checked_out


async def bench(
    cache: RepoCache,
    records: dict[str, dict[str, Any]],
    targets: dict[str, Path],
    methods: tuple[str, ...],
    reps: int,
) -> list[dict[str, Any]]:
    """Every (tree, target, method) with its samples; methods interleaved per repetition."""
    results = []
    for tree, record in records.items():
        source = cache.path(record["instance_id"])
        for target, folder in targets.items():
            samples: dict[str, list[tuple[float, float]]] = {method: [] for method in methods}
            for rep in range(reps + 1):
                for method in methods:
                    dest = folder / f"{tree}-{method.replace(' ', '')}-{rep}"
                    timing = await time_method(cache, method, record["instance_id"], source, dest)
                    if rep:
                        samples[method].append(timing)
            for method in methods:
                checkout = [c for c, _ in samples[method]]
                total = [c + r for c, r in samples[method]]
                results.append(
                    {
                        "tree": tree,
                        "files": record["file_count"],
                        "bytes": record["size_bytes"],
                        "target": target,
                        "method": method,
                        "checkout_median_s": statistics.median(checkout),
                        "total_median_s": statistics.median(total),
                        "checkout_samples_s": checkout,
                        "total_samples_s": total,
                    }
                )
    baseline = {(r["tree"], r["target"]): r for r in results if r["method"] == "cp -r"}
    for result in results:
        base = baseline[(result["tree"], result["target"])]
        result["checkout_ratio_to_cp"] = result["checkout_median_s"] / base["checkout_median_s"]
        result["total_ratio_to_cp"] = result["total_median_s"] / base["total_median_s"]
    return results


def table(results: list[dict[str, Any]], reps: int) -> str:
    """The medians as a fixed-width table."""
    lines = [
        f"medians of {reps} repetitions; total = checkout + release "
        "(cp -r: cp -r + rm -rf, each a subprocess)",
        f"{'tree':<6} {'files':>6} {'MiB':>6} {'dest':<6} {'method':<8} "
        f"{'checkout ms':>12} {'total ms':>10} {'checkout/cp':>12} {'total/cp':>9}",
    ]
    for r in results:
        lines.append(
            f"{r['tree']:<6} {r['files']:>6} {r['bytes'] / 2**20:>6.1f} {r['target']:<6} "
            f"{r['method']:<8} {r['checkout_median_s'] * 1000:>12.2f} "
            f"{r['total_median_s'] * 1000:>10.2f} {r['checkout_ratio_to_cp']:>12.3f} "
            f"{r['total_ratio_to_cp']:>9.3f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Build the trees, run the benchmark, print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=15, help="timed repetitions per method")
    parser.add_argument("--work", type=Path, default=ROOT / ".bench", help="folder on the disk")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default WORK/...)")
    parser.add_argument("--no-shm", action="store_true", help="skip the tmpfs destination")
    parser.add_argument("--keep", action="store_true", help="keep the cached trees afterwards")
    parser.add_argument(
        "--trees", nargs="+", choices=list(TREES), default=list(TREES), help="trees to measure"
    )
    args = parser.parse_args(argv)

    work = args.work.resolve()
    cache_dir = work / "checkout-cache"
    targets = {"disk": work / "checkout-dests"}
    shm = Path("/dev/shm")
    if not args.no_shm and shm.is_dir():
        targets["tmpfs"] = shm / f"asynccache-bench-{os.getpid()}"
    probe = overlay_probe(work if work.is_dir() else None)
    methods = METHODS if probe.available else tuple(m for m in METHODS if m != "overlay")
    work.mkdir(parents=True, exist_ok=True)
    print(f"building the cached trees in {cache_dir} ...", flush=True)
    records = build_cache(cache_dir, args.trees)
    for folder in targets.values():
        folder.mkdir(parents=True, exist_ok=True)
    cache_fs = filesystem(cache_dir)
    target_fs = {name: {"path": str(p), "fs": filesystem(p)} for name, p in targets.items()}
    try:
        cache = RepoCache(cache_dir)
        results = anyio.run(bench, cache, records, targets, methods, args.reps)
    finally:
        for name, folder in targets.items():
            if name == "tmpfs" or not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(cache_dir, ignore_errors=True)
    report = {
        "reps": args.reps,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cache_fs": cache_fs,
        "targets": target_fs,
        "overlay": {
            "available": probe.available,
            "options": probe.options,
            "renames_dirs": probe.renames_dirs,
            "reason": probe.reason,
        },
        "results": results,
    }
    out = args.out or work / "checkout.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results, args.reps))
    if not probe.available:
        print(f"overlay not measured: {probe.reason}")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
