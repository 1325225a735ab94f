"""The original sequential cache script, re-created as a benchmark baseline.

One entry at a time, with the Docker CLI, as the original ``cache_repos.py`` did it:

    docker pull IMAGE
    docker create IMAGE true            (a command, since some images have no CMD)
    docker cp CONTAINER:/testbed/. cache_dir/INSTANCE_ID
    docker rm -f CONTAINER
    count the files and bytes, rewrite index.json, next entry

Like the original it never removes an image, so layers shared by several images (the OS base,
and anything else two images have in common) are pulled once. Same flags as the original:
``--cache_dir``, ``--dataset`` (a Hugging Face id or a local folder with
``data/{split}-*.parquet``), ``--split``, ``--max_entries``, ``--skip_existing`` (on by
default), ``--cp_timeout``, ``--dry_run``.

``--remove_images`` (not in the original; the benchmark's ``baseline-rmi``) adds ``docker rmi
IMAGE`` after each entry, so that every image is pulled whole, shared layers included.

``--stats_json PATH`` (benchmark only) writes the wall and CPU seconds of every step of every
entry; the CPU of a docker CLI step is that child's user+system time (``RUSAGE_CHILDREN``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def make_instance_id(row: dict[str, Any]) -> str:
    """``{repo_name}__{commit_hash[:12]}``, as the original derives it."""
    return f"{row['repo_name']}__{row['commit_hash'][:12]}"


def load_rows(dataset: str, split: str) -> Any:
    """The split as a datasets.Dataset (a local folder or a Hub id)."""
    import datasets

    local = Path(dataset).expanduser()
    if local.is_dir():
        files = sorted(str(p) for p in (local / "data").glob(f"{split}-*.parquet"))
        if not files:
            raise SystemExit(f"no data/{split}-*.parquet under {local}")
        return datasets.load_dataset("parquet", data_files={split: files}, split=split)
    return datasets.load_dataset(dataset, split=split)


def load_index(path: Path) -> dict[str, Any]:
    if path.exists():
        with open(path) as handle:
            return dict(json.load(handle))
    return {}


def save_index(path: Path, index: dict[str, Any]) -> None:
    with open(path, "w") as handle:
        json.dump(index, handle, indent=2)


def count_files(root: Path) -> tuple[int, int]:
    """Regular files under root and their total size (symlinks are not followed)."""
    files = size = 0
    for current, _dirs, names in os.walk(root):
        for name in names:
            info = os.lstat(os.path.join(current, name))
            if stat.S_ISREG(info.st_mode):
                files += 1
                size += info.st_size
    return files, size


class Steps:
    """Wall and CPU time of each step of the current entry."""

    def __init__(self) -> None:
        self.entries: list[dict[str, Any]] = []
        self.current: dict[str, Any] = {}

    def run(self, name: str, args: list[str], timeout: float | None = None) -> str:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        finally:
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            self.current[name] = {
                "wall": time.perf_counter() - started,
                "cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
            }
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {proc.stderr.strip()}")
        return proc.stdout

    def local(self, name: str, started: float, cpu_before: resource.struct_rusage) -> None:
        after = resource.getrusage(resource.RUSAGE_SELF)
        self.current[name] = {
            "wall": time.perf_counter() - started,
            "cpu": (after.ru_utime - cpu_before.ru_utime) + (after.ru_stime - cpu_before.ru_stime),
        }


def extract(
    image: str, dest: Path, cp_timeout: float, steps: Steps, remove_image: bool = False
) -> None:
    """pull, create, cp, rm -f (and rmi with remove_image)."""
    steps.run("pull", ["docker", "pull", image])
    container = steps.run("create", ["docker", "create", image, "true"]).strip()
    try:
        dest.mkdir(parents=True, exist_ok=True)
        steps.run("cp", ["docker", "cp", f"{container}:/testbed/.", str(dest)], timeout=cp_timeout)
    finally:
        steps.run("rm", ["docker", "rm", "-f", container])
        if remove_image:
            try:
                steps.run("rmi", ["docker", "rmi", image])
            except RuntimeError as exc:
                print(f"warning: {exc}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Cache /testbed of R2E-Gym images (sequential).")
    parser.add_argument("--cache_dir", default="/data/repo-cache")
    parser.add_argument("--dataset", default="R2E-Gym/R2E-Gym-Lite")
    parser.add_argument("--split", default="train")
    parser.add_argument("--max_entries", type=int, default=None)
    parser.add_argument("--skip_existing", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cp_timeout", type=float, default=120)
    parser.add_argument("--dry_run", action="store_true")
    parser.add_argument(
        "--remove_images",
        action="store_true",
        help="not in the original: docker rmi each image after its entry",
    )
    parser.add_argument("--stats_json", default=None, help="write per-step timings here")
    args = parser.parse_args(argv)

    cache_dir = Path(args.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    index_path = cache_dir / "index.json"
    index = load_index(index_path)
    rows = load_rows(args.dataset, args.split)
    if args.max_entries is not None:
        rows = rows.select(range(min(args.max_entries, len(rows))))
    print(f"Loaded {len(rows)} entries from {args.dataset} ({args.split})")

    steps = Steps()
    done = skipped = failed = 0
    started = time.time()
    for number, row in enumerate(rows, 1):
        instance_id = make_instance_id(row)
        dest = cache_dir / instance_id
        if args.skip_existing and instance_id in index and dest.exists():
            skipped += 1
            continue
        if args.dry_run:
            print(f"would cache {instance_id} from {row['docker_image']}")
            continue
        print(f"[{number}/{len(rows)}] {instance_id}", flush=True)
        steps.current = {"instance_id": instance_id}
        entry_started = time.perf_counter()
        try:
            if dest.exists():
                shutil.rmtree(dest)
            extract(row["docker_image"], dest, args.cp_timeout, steps, args.remove_images)
        except (RuntimeError, subprocess.TimeoutExpired, OSError) as exc:
            print(f"  failed: {exc}", file=sys.stderr)
            shutil.rmtree(dest, ignore_errors=True)
            failed += 1
            steps.current["failed"] = str(exc)
            steps.entries.append(steps.current)
            continue
        count_started, cpu_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        file_count, size = count_files(dest)
        steps.local("count", count_started, cpu_before)
        index[instance_id] = {
            "instance_id": instance_id,
            "repo_name": row["repo_name"],
            "docker_image": row["docker_image"],
            "commit_hash": row["commit_hash"],
            "cache_path": str(dest),
            "file_count": file_count,
            "size_mb": round(size / (1024 * 1024), 2),
        }
        write_started, cpu_before = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        save_index(index_path, index)
        steps.local("index", write_started, cpu_before)
        steps.current["seconds"] = time.perf_counter() - entry_started
        steps.current["size_bytes"] = size
        steps.entries.append(steps.current)
        done += 1
        print(f"  {file_count} files, {size / (1024 * 1024):.1f} MB", flush=True)

    print(
        f"Done: {done} cached, {skipped} skipped, {failed} failed "
        f"in {time.time() - started:.1f}s; index {index_path}"
    )
    if args.stats_json:
        Path(args.stats_json).write_text(json.dumps(steps.entries, indent=1), encoding="utf-8")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
