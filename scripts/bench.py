"""Throughput benchmark: asynccache against the sequential docker-CLI script.

For each scenario (``loopback``: the registry on 127.0.0.1:5000 directly; ``wan``: the same
registry behind a socat proxy that adds ~40 ms per new connection and caps each connection's
responses at 20 MiB/s with pv) and each contender (``baseline``: scripts/baseline_cache_repos.py,
the original script, which never removes an image, so shared layers are pulled once;
``baseline-rmi``: the same with ``docker rmi`` after each entry, so every image is pulled whole;
``cN``: ``python -m asynccache --concurrency N``; ``rN``: ``python -m asynccache --backend
registry --concurrency N`` with ``DOCKER_HOST=unix:///nonexistent``, so that it cannot use
dockerd), the benchmark removes every local image of the bench set and sets the whole cache
folder aside (``.layers/`` included), runs the contender as a child process, and records:

* wall time, images per minute, MiB of /testbed extracted per second, ratio to the baseline;
* CPU seconds of the contender's process tree (``os.wait4`` rusage of the child: for the
  baseline that includes every docker CLI process it ran) and per image;
* for the baseline, the CPU of ``docker cp`` alone per image (the CLI's own extraction);
* CPU seconds of dockerd, containerd (and shims) and the registry (``/proc/PID/stat``), and of
  the WAN proxy;
* peak RSS of the child (``ru_maxrss``);
* MiB downloaded: for ``rN`` the client's own count (its ``registry backend: N bytes
  downloaded`` log line); for every contender, the bytes the registry served for the bench
  repositories (the sizes of the GET lines of its access log, found through
  ``/proc/PID/fd/1``), and the registry process's ``wchar`` growth (every write and sendfile,
  so any other client of the registry counts too) as a cross-check.

Results: one table per scenario on stdout, JSON in ``.bench/results-<timestamp>.json`` and
``.bench/latest.json``. With ``--repeat N`` every number is the median of N runs.

``--index-sim N`` also feeds N records through ``asynccache.cache.index.IndexWriter`` (as fast as
possible, then at ``--index-pace`` records per second) and reports the bytes written to
index.json and the time per update, next to what rewriting the whole index after every entry
(the original script) costs.

Usage::

    python scripts/bench.py [--images N] [--scenarios loopback,wan]
                            [--contenders baseline,baseline-rmi,c1,c4,c16,r1,r4,r16]
                            [--repeat N]
                            [--loopback-repeat N] [--code worktree|head] [--index-sim 5000]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts import bench_images as bi  # noqa: E402
from tests.support import fixtures as fx  # noqa: E402

BENCH_DIR = ROOT / ".bench"
BASELINE_SCRIPT = ROOT / "scripts" / "baseline_cache_repos.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")
MIB = 1024 * 1024
DAEMON_NAMES = ("dockerd", "containerd", "containerd-shim")
REGISTRY_NAMES = ("docker-registry", "registry")


# --------------------------------------------------------------------------------------------
# /proc accounting
# --------------------------------------------------------------------------------------------


def _proc_cpu(pid: int, children: bool = False) -> float:
    """utime+stime (plus cutime+cstime when children) of a process, in seconds; 0 if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw.rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def _pids_named(prefixes: Sequence[str]) -> dict[int, str]:
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if any(comm == name or comm.startswith(name) for name in prefixes):
            found[int(entry.name)] = comm
    return found


class CpuProbe:
    """CPU seconds used by a group of daemons between start() and stop()."""

    def __init__(self, names: Sequence[str], extra_pids: Sequence[int] = ()) -> None:
        self.names = names
        self.extra_pids = list(extra_pids)
        self.before: dict[int, float] = {}

    def _sample(self) -> dict[int, float]:
        pids = dict.fromkeys(_pids_named(self.names))
        pids.update(dict.fromkeys(self.extra_pids))
        # children too: dockerd re-executes itself (docker-untar, docker-tar) for layer
        # extraction and archives; their CPU lands in its cutime/cstime once reaped.
        return {pid: _proc_cpu(pid, children=True) for pid in pids}

    def start(self) -> None:
        self.before = self._sample()

    def stop(self) -> float:
        after = self._sample()
        return sum(max(0.0, cpu - self.before.get(pid, 0.0)) for pid, cpu in after.items())


ACCESS_RE = re.compile(rb'"GET /v2/([^ ]+)/(?:blobs|manifests)/[^ ]+ HTTP/[0-9.]+" (\d{3}) (\d+) ')


def _proc_wchar(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def served_bytes(chunk: bytes, repositories: Sequence[str]) -> int:
    """Bytes of GET responses (manifests, blobs) for the given repositories in access-log text."""
    wanted = {name.encode() for name in repositories}
    return sum(
        int(size)
        for name, _status, size in ACCESS_RE.findall(chunk)
        if name in wanted or name.split(b"/", 1)[-1] in wanted
    )


class RegistryTraffic:
    """What the loopback registry sent between start() and stop().

    ``served``: the access-log sizes of GET responses for the bench repositories (the log is
    the registry's stdout/stderr when that is a regular file: ``/proc/PID/fd/1``). ``wchar``:
    the growth of the registry process's write counter (sendfile included), which also counts
    other clients of the same registry and its own log lines.
    """

    def __init__(self, repositories: Sequence[str]) -> None:
        self.repositories = list(repositories)
        self.pid: int | None = None
        self.log: Path | None = None
        self.offset = 0
        self.wchar: int | None = None

    def start(self) -> None:
        pids = sorted(_pids_named(REGISTRY_NAMES))
        self.pid = pids[0] if pids else None
        self.log = None
        if self.pid is None:
            return
        for fd in (1, 2):
            try:
                target = Path(os.readlink(f"/proc/{self.pid}/fd/{fd}"))
            except OSError:
                continue
            if target.is_file():
                self.log = target
                self.offset = target.stat().st_size
                break
        self.wchar = _proc_wchar(self.pid)

    def stop(self) -> dict[str, int | None]:
        served: int | None = None
        wchar: int | None = None
        if self.log is not None:
            with open(self.log, "rb") as handle:
                handle.seek(self.offset)
                served = served_bytes(handle.read(), self.repositories)
        if self.pid is not None and self.wchar is not None:
            after = _proc_wchar(self.pid)
            wchar = after - self.wchar if after is not None else None
        return {"served": served, "wchar": wchar}


# --------------------------------------------------------------------------------------------
# Docker housekeeping
# --------------------------------------------------------------------------------------------


_MANIFEST_TYPES = ", ".join(
    (
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
    )
)


def _registry_json(url: str, accept: str | None = None) -> Any:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@functools.cache
def bench_layer_ids(registry: str = fx.DEFAULT_REGISTRY) -> frozenset[str]:
    """The layers (uncompressed digests) of every pushed bench image, read from the registry."""
    found: set[str] = set()
    for image in bi.all_images(registry):
        name, _, tag = image.ref.removeprefix(f"{registry}/").rpartition(":")
        base = f"http://{registry}/v2/{name}"
        try:
            manifest = _registry_json(f"{base}/manifests/{tag}", _MANIFEST_TYPES)
            config = _registry_json(f"{base}/blobs/{manifest['config']['digest']}")
        except urllib.error.URLError:  # not pushed (yet), or no registry: nothing to match
            continue
        found.update(config["rootfs"]["diff_ids"])
    return frozenset(found)


def remove_bench_images(registry: str = fx.DEFAULT_REGISTRY) -> int:
    """Remove every local image named like a bench image or holding one of their layers.

    Test fixtures built on the bench images' base count too: a contender must not find any
    bench layer already pulled. Containers made from those images go first. Returns how many
    images (by id) were removed.
    """
    repos = set(bi.bench_repositories())
    layers = bench_layer_ids(registry)
    listing = fx.docker("images", "--no-trunc", "--format", "{{.ID}} {{.Repository}}", check=False)
    doomed: set[str] = set()
    local: set[str] = set()
    for line in listing.stdout.decode().splitlines():
        image_id, _, repository = line.partition(" ")
        local.add(image_id)
        if repository.split("/", 1)[-1] in repos or repository.startswith("asynccache-bench-"):
            doomed.add(image_id)
    if layers and local:
        held = fx.docker(
            "image", "inspect", "--format", "{{.Id}} {{json .RootFS.Layers}}", *local, check=False
        )
        for line in held.stdout.decode().splitlines():
            image_id, _, image_layers = line.partition(" ")
            if layers.intersection(json.loads(image_layers or "[]")):
                doomed.add(image_id)
    if not doomed:
        return 0
    containers = fx.docker("ps", "-a", "-q", "--no-trunc", check=False).stdout.decode().split()
    if containers:
        made = fx.docker("inspect", "--format", "{{.Id}} {{.Image}}", *containers, check=False)
        stale = [
            cid
            for cid, _, image in (row.partition(" ") for row in made.stdout.decode().splitlines())
            if image in doomed
        ]
        if stale:
            fx.docker("rm", "-f", *stale, check=False)
    fx.docker("rmi", "-f", *doomed, check=False, timeout=600)
    return len(doomed)


def insecure_loopback() -> bool:
    """True when dockerd treats 127.0.0.0/8 registries as plain-HTTP (insecure) ones."""
    out = fx.docker(
        "info", "--format", "{{json .RegistryConfig.InsecureRegistryCIDRs}}", check=False
    )
    return "127.0.0.0/8" in out.stdout.decode()


# --------------------------------------------------------------------------------------------
# The WAN proxy
# --------------------------------------------------------------------------------------------


@dataclass
class WanProxy:
    """socat listening on 127.0.0.1:port; each connection: sleep, then socat | pv -L rate."""

    port: int
    upstream: str
    latency: float = 0.04
    rate: str = "20m"
    proc: subprocess.Popen[bytes] | None = None
    script: Path | None = None
    checks: dict[str, Any] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        for tool in ("socat", "pv"):
            if shutil.which(tool) is None:
                raise SystemExit(f"the wan scenario needs {tool} (scripts/services.sh up)")
        host, _, port = self.upstream.partition(":")
        BENCH_DIR.mkdir(exist_ok=True)
        self.script = BENCH_DIR / f"wan-proxy-{self.port}.sh"
        self.script.write_text(
            "#!/bin/sh\n"
            f"sleep {self.latency}\n"
            f"exec socat STDIO TCP:{host}:{port} | pv -q -L {self.rate}\n",
            encoding="utf-8",
        )
        self.script.chmod(0o755)
        self.proc = subprocess.Popen(
            [
                "socat",
                f"TCP-LISTEN:{self.port},fork,reuseaddr,bind=127.0.0.1",
                f"EXEC:{self.script}",
            ],
            start_new_session=True,
            stdin=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not fx.registry_available(self.address):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the WAN proxy on {self.address} did not come up")
            time.sleep(0.1)
        self.checks = self._measure()

    def _measure(self) -> dict[str, Any]:
        """Connect latency and per-connection rate through the proxy, vs direct."""

        def fetch(base: str, path: str) -> tuple[float, int]:
            started = time.perf_counter()
            with urllib.request.urlopen(f"http://{base}{path}", timeout=60) as response:
                size = len(response.read())
            return time.perf_counter() - started, size

        direct, _ = fetch(self.upstream, "/v2/")
        proxied, _ = fetch(self.address, "/v2/")
        image = bi.all_images(self.upstream)[0]
        name, tag = image.ref.split("/", 1)[1].rsplit(":", 1)
        manifest_req = urllib.request.Request(
            f"http://{self.upstream}/v2/{name}/manifests/{tag}",
            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
        )
        with urllib.request.urlopen(manifest_req, timeout=10) as response:
            layers = json.loads(response.read())["layers"]
        biggest = max(layers, key=lambda layer: layer["size"])
        seconds, size = fetch(self.address, f"/v2/{name}/blobs/{biggest['digest']}")
        return {
            "insecure_loopback": insecure_loopback(),
            "v2_direct_ms": round(direct * 1000, 1),
            "v2_proxied_ms": round(proxied * 1000, 1),
            "blob_mib": round(size / MIB, 1),
            "blob_mib_per_s": round(size / MIB / seconds, 1),
        }

    def cpu(self) -> float:
        """CPU of the proxy and every connection it served (reaped children included)."""
        return _proc_cpu(self.proc.pid, children=True) if self.proc else 0.0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# --------------------------------------------------------------------------------------------
# The code under test
# --------------------------------------------------------------------------------------------


def _sources(which: str) -> dict[str, bytes]:
    """asynccache/**/*.py of the committed HEAD ("head") or of the working tree ("worktree").

    Keys are paths relative to asynccache/ (subpackages included).
    """
    if which == "head":
        listing = subprocess.run(
            ["git", "ls-tree", "-r", "--name-only", "HEAD", "asynccache/"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        return {
            name.removeprefix("asynccache/"): subprocess.run(
                ["git", "show", f"HEAD:{name}"], cwd=ROOT, capture_output=True, check=True
            ).stdout
            for name in listing
            if name.endswith(".py")
        }
    package = ROOT / "asynccache"
    return {
        path.relative_to(package).as_posix(): path.read_bytes()
        for path in sorted(package.rglob("*.py"))
        if "__pycache__" not in path.parts
    }


def snapshot_code(which: str = "head", wait: float = 120.0) -> tuple[Path, str]:
    """Freeze asynccache/ (HEAD's, or the working tree's once it compiles) into .bench/code-<hash>.

    Other people may edit the working tree while a benchmark runs: every contender of one
    invocation runs this frozen copy (``cwd`` and ``PYTHONPATH``), and the hash says which.
    """
    import hashlib
    import py_compile

    deadline = time.monotonic() + wait
    while True:
        blobs = _sources(which)
        digest = hashlib.sha256()
        for name, data in blobs.items():
            digest.update(name.encode() + b"\0" + data + b"\0")
        code_hash = digest.hexdigest()[:12]
        target = BENCH_DIR / f"code-{code_hash}"
        staging = BENCH_DIR / f".code-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        (staging / "asynccache").mkdir(parents=True)
        for name, data in blobs.items():
            (staging / "asynccache" / name).parent.mkdir(parents=True, exist_ok=True)
            (staging / "asynccache" / name).write_bytes(data)
        try:
            for path in (staging / "asynccache").rglob("*.py"):
                py_compile.compile(str(path), doraise=True)
        except py_compile.PyCompileError as exc:
            shutil.rmtree(staging)
            if time.monotonic() > deadline:
                raise SystemExit(f"asynccache does not compile: {exc.msg.strip()}") from None
            print("asynccache/ does not compile right now (being edited?); retrying in 5 s")
            time.sleep(5)
            continue
        if target.exists():
            shutil.rmtree(staging)
        else:
            staging.rename(target)
        return target, code_hash


def _git_head() -> str:
    proc = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return proc.stdout.strip()


def code_env(code: Path | None) -> dict[str, str]:
    """The environment of a child that must import asynccache from code."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(code), *filter(None, [env.get("PYTHONPATH")])])
        env["ASYNCCACHE_BENCH_CODE"] = str(code)
    return env


# --------------------------------------------------------------------------------------------
# Running one contender
# --------------------------------------------------------------------------------------------


def contender_command(
    name: str, dataset: Path, cache: Path, stats: Path, extra: Sequence[str] = ()
) -> list[str]:
    """The command line of a contender."""
    common = ["--dataset", str(dataset), "--split", bi.SPLIT, "--cache_dir", str(cache)]
    if name in ("baseline", "baseline-rmi"):
        # baseline: the original script, which never removes an image (shared layers are
        # pulled once); baseline-rmi: the same with `docker rmi` after each entry.
        removal = ["--remove_images"] if name == "baseline-rmi" else []
        return [
            sys.executable,
            str(BASELINE_SCRIPT),
            *common,
            *removal,
            "--stats_json",
            str(stats),
        ]
    match = re.fullmatch(r"([cr])(\d+)", name)
    if not match:
        raise SystemExit(f"unknown contender {name!r} (baseline, cN or rN)")
    backend = ["--backend", "registry"] if match.group(1) == "r" else []
    return [
        sys.executable,
        "-m",
        "asynccache",
        *common,
        *backend,
        "--concurrency",
        match.group(2),
        *extra,
    ]


def is_registry_contender(name: str) -> bool:
    """True for the rN contenders (--backend registry, no Docker)."""
    return re.fullmatch(r"r\d+", name) is not None


def contender_env(name: str, code: Path | None) -> dict[str, str]:
    """The child's environment: the frozen code, and no reachable dockerd for rN."""
    env = code_env(code)
    if is_registry_contender(name):
        env["DOCKER_HOST"] = "unix:///nonexistent"
    return env


DOWNLOADED_RE = re.compile(rb"registry backend: (\d+) bytes downloaded")


def client_downloaded_bytes(log: Path) -> int | None:
    """The byte count an rN contender logs when its registry backend closes (None if absent)."""
    try:
        found = DOWNLOADED_RE.findall(log.read_bytes())
    except OSError:
        return None
    return int(found[-1]) if found else None


def tree_totals(root: Path) -> tuple[int, int]:
    """(regular files, bytes) under root, symlinks not followed."""
    files = size = 0
    stack = [str(root)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    files += 1
                    size += entry.stat(follow_symlinks=False).st_size
    return files, size


def _is_tmpfs(path: Path) -> bool:
    proc = subprocess.run(["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True)
    return proc.stdout.strip() == "tmpfs"


def set_aside(path: Path) -> None:
    """Move a folder into a trash folder beside it (deleted by empty_trash(), see settle()).

    On tmpfs, where deleting has no after-effect, the folder is deleted at once instead.
    """
    if not path.exists():
        return
    if _is_tmpfs(path):
        shutil.rmtree(path)
        return
    trash = path.parent / "trash"
    trash.mkdir(parents=True, exist_ok=True)
    path.rename(trash / f"{path.name}-{time.time_ns()}")
    TRASHES.add(trash)


TRASHES: set[Path] = set()


def empty_trash() -> None:
    """Delete what set_aside() kept."""
    for trash in sorted(TRASHES):
        if trash.exists():
            shutil.rmtree(trash)
    TRASHES.clear()


def create_cost_us(where: Path, count: int = 300) -> float:
    """CPU microseconds to create one empty file in where now (kept, so it frees no inodes)."""
    probe = where / f"probe-{time.time_ns()}"
    probe.mkdir(parents=True)
    before = time.process_time()
    for i in range(count):
        os.close(os.open(probe / f"f{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
    cost = (time.process_time() - before) / count * 1e6
    set_aside(probe)
    return cost


def settle(seconds: float) -> None:
    """Flush dirty pages and let the file system forget recent deletions.

    On ext4 without a journal (this machine's root file system) a new inode is never one freed
    less than 60 s ago (300 s while its inode table block is dirty; sync cleans it), and each
    create scans past every such inode: right after a mass delete (a cache folder, the layers
    of removed images) creating a file costs ~0.5 ms of CPU instead of ~20 us. Every contender
    starts after the same quiet period; the create cost probed after it is in the results.
    """
    subprocess.run(["sync"], check=False)
    if seconds > 0:
        time.sleep(seconds)


def run_contender(
    name: str,
    dataset: Path,
    expected: int,
    log_dir: Path,
    label: str,
    proxy: WanProxy | None = None,
    wrapper: Sequence[str] = (),
    settle_s: float = 31.0,
    code: Path | None = None,
    cache_root: Path = BENCH_DIR,
) -> dict[str, Any]:
    """Clean up, run one contender, and measure it."""
    cache = cache_root / "cache"
    stats = log_dir / f"{label}.steps.json"
    set_aside(cache)
    removed = remove_bench_images()
    settle(settle_s)
    create_us = create_cost_us(cache_root)
    command = [*wrapper, *contender_command(name, dataset, cache, stats)]
    daemon = CpuProbe(DAEMON_NAMES)
    registry = CpuProbe(REGISTRY_NAMES)
    traffic = RegistryTraffic(bi.bench_repositories())
    proxy_before = proxy.cpu() if proxy else 0.0
    log_path = log_dir / f"{label}.log"
    load_before = os.getloadavg()
    daemon.start()
    registry.start()
    traffic.start()
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=code or ROOT,
            env=contender_env(name, code),
        )
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    daemon_cpu = daemon.stop()
    registry_cpu = registry.stop()
    sent = traffic.stop()
    client_bytes = client_downloaded_bytes(log_path) if is_registry_contender(name) else None
    proxy_cpu = (proxy.cpu() - proxy_before) if proxy else 0.0

    index_path = cache / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    files, size = tree_totals(cache) if cache.exists() else (0, 0)
    # bookkeeping, not /testbed: .meta/ records, and the registry backend's .layers/ store
    for aside in (".meta", ".layers", ".tmp"):
        if (cache / aside).is_dir():
            aside_files, aside_size = tree_totals(cache / aside)
            files, size = files - aside_files, size - aside_size
    files -= sum(1 for n in ("index.json", "failures.json", ".lock") if (cache / n).is_file())
    size -= sum(
        (cache / n).stat().st_size
        for n in ("index.json", "failures.json", ".lock")
        if (cache / n).is_file()
    )
    images = len(index)
    cpu = usage.ru_utime + usage.ru_stime
    result: dict[str, Any] = {
        "contender": name,
        "exit_code": proc.returncode,
        "images": images,
        "expected": expected,
        "ok": proc.returncode == 0 and images == expected,
        "wall_s": wall,
        "images_per_min": images / wall * 60 if wall else 0.0,
        "mib_per_s": size / MIB / wall if wall else 0.0,
        "testbed_mib": size / MIB,
        "testbed_files": files,
        "cpu_s": cpu,
        "cpu_user_s": usage.ru_utime,
        "cpu_sys_s": usage.ru_stime,
        "cpu_per_image_s": cpu / images if images else None,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "dockerd_cpu_s": daemon_cpu,
        "dockerd_cpu_per_image_s": daemon_cpu / images if images else None,
        "registry_cpu_s": registry_cpu,
        "proxy_cpu_s": proxy_cpu,
        "client_downloaded_mib": client_bytes / MIB if client_bytes is not None else None,
        "served_mib": sent["served"] / MIB if sent["served"] is not None else None,
        "registry_wchar_mib": sent["wchar"] / MIB if sent["wchar"] is not None else None,
        "removed_images_before": removed,
        "loadavg_before": list(load_before),
        "create_us_before": create_us,
        "file_counts": {key: rec.get("file_count") for key, rec in index.items()},
        "log": str(log_path.relative_to(ROOT)),
    }
    # the column: the client's own count for rN, else what the registry served
    result["downloaded_mib"] = (
        result["client_downloaded_mib"]
        if result["client_downloaded_mib"] is not None
        else result["served_mib"]
    )
    if name.startswith("baseline") and stats.exists():
        steps = json.loads(stats.read_text())
        good = [s for s in steps if "failed" not in s]
        for step in ("pull", "create", "cp", "rm", "rmi", "count", "index"):
            values = [s[step] for s in good if step in s]
            if values:
                result[f"{step}_cpu_per_image_s"] = sum(v["cpu"] for v in values) / len(values)
                result[f"{step}_wall_per_image_s"] = sum(v["wall"] for v in values) / len(values)
        result["docker_cp_cpu_per_image_s"] = result.get("cp_cpu_per_image_s")
    set_aside(cache)
    return result


# --------------------------------------------------------------------------------------------
# Aggregation and output
# --------------------------------------------------------------------------------------------

NUMERIC_SKIP = {"exit_code", "expected", "removed_images_before", "loadavg_before"}


def median_result(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every numeric field over repeated runs."""
    merged: dict[str, Any] = dict(runs[0])
    for key, value in runs[0].items():
        if key in NUMERIC_SKIP or isinstance(value, bool):
            continue
        if isinstance(value, int | float) or value is None:
            values: list[float] = [v for r in runs if isinstance(v := r.get(key), int | float)]
            merged[key] = statistics.median(values) if values else None
    merged["ok"] = all(r["ok"] for r in runs)
    merged["runs"] = len(runs)
    merged["wall_s_all"] = [round(r["wall_s"], 2) for r in runs]
    return merged


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


COLUMNS = (
    ("contender", "contender", 0),
    ("wall s", "wall_s", 1),
    ("img/min", "images_per_min", 1),
    ("MiB/s", "mib_per_s", 1),
    ("x base", "ratio_to_baseline", 2),
    ("CPU s", "cpu_s", 1),
    ("CPU/img", "cpu_per_image_s", 3),
    ("cp CPU/img", "docker_cp_cpu_per_image_s", 3),
    ("dockerd s", "dockerd_cpu_s", 1),
    ("dockerd/img", "dockerd_cpu_per_image_s", 3),
    ("registry s", "registry_cpu_s", 1),
    ("proxy s", "proxy_cpu_s", 1),
    ("RSS MiB", "peak_rss_mib", 0),
    ("MiB dl", "downloaded_mib", 0),
    ("served MiB", "served_mib", 0),
    ("create us", "create_us_before", 0),
    ("ok", "ok", 0),
)


def table(title: str, rows: list[dict[str, Any]]) -> str:
    """A plain-text table of results."""
    header = [name for name, _, _ in COLUMNS]
    body = [[_fmt(row.get(key), digits) for _, key, digits in COLUMNS] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def check_consistency(rows: list[dict[str, Any]]) -> list[str]:
    """Every contender must report the same file_count per instance."""
    problems: list[str] = []
    reference = next((r for r in rows if r["file_counts"]), None)
    if reference is None:
        return ["no contender cached anything"]
    for row in rows:
        for key, count in reference["file_counts"].items():
            other = row["file_counts"].get(key)
            if other != count:
                problems.append(
                    f"{row['contender']}: {key} file_count {other} vs "
                    f"{reference['contender']} {count}"
                )
    return problems


# --------------------------------------------------------------------------------------------
# Index writer simulation
# --------------------------------------------------------------------------------------------


def _fake_record(i: int, cache_dir: str) -> dict[str, Any]:
    repo = ("pandas", "numpy", "pillow", "tornado", "django", "sympy")[i % 6]
    commit = f"{i:08x}" + "ab" * 16
    instance_id = f"{repo}__{commit[:12]}"
    return {
        "instance_id": instance_id,
        "repo_name": repo,
        "docker_image": f"namanjain12/{repo}_final:{commit}",
        "commit_hash": commit,
        "cache_path": f"{cache_dir}/{instance_id}",
        "file_count": 3000 + i % 1000,
        "size_mb": 41.27,
        "size_bytes": 43274682,
        "seconds": 3.141,
        "cached_at": "2025-01-01T00:00:00Z",
    }


def index_sim(count: int, pace: float | None) -> dict[str, Any]:
    """Feed count records through IndexWriter (as fast as possible, or pace per second)."""
    import anyio

    from asynccache.cache.index import IndexWriter

    async def run(directory: Path) -> dict[str, Any]:
        writer = IndexWriter(directory, {})
        send, receive = anyio.create_memory_object_stream[dict[str, Any]](100)
        cpu_before = time.process_time()
        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            tg.start_soon(writer.run, receive)
            async with send:
                for i in range(count):
                    await send.send(_fake_record(i, str(directory)))
                    if pace:
                        delay = started + (i + 1) / pace - time.perf_counter()
                        if delay > 0:
                            await anyio.sleep(delay)
        seconds = time.perf_counter() - started
        return {
            "updates": count,
            "pace_per_s": pace,
            "seconds": seconds,
            "writes": writer.writes,
            "bytes_written": writer.bytes_written,
            "mib_written": writer.bytes_written / MIB,
            "final_index_bytes": (directory / "index.json").stat().st_size,
            "cpu_s": time.process_time() - cpu_before,
            "us_per_update": seconds / count * 1e6,
            "cpu_us_per_update": (time.process_time() - cpu_before) / count * 1e6,
        }

    BENCH_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=BENCH_DIR, prefix="index-sim-") as tmp:
        return anyio.run(run, Path(tmp))


def original_index_cost(count: int) -> dict[str, Any]:
    """What rewriting the whole index.json after every entry (the original) writes and costs."""
    cache_dir = str(BENCH_DIR / "cache")
    index: dict[str, Any] = {}
    per_record = 0.0
    samples: list[float] = []
    with tempfile.TemporaryDirectory(dir=BENCH_DIR, prefix="index-orig-") as tmp:
        path = Path(tmp, "index.json")
        for i in range(count):
            record = _fake_record(i, cache_dir)
            record = {k: record[k] for k in list(record)[:7]}
            index[record["instance_id"]] = record
            if i % max(1, count // 20) == 0 or i == count - 1:
                started = time.perf_counter()
                with open(path, "w") as handle:
                    json.dump(index, handle, indent=2)
                samples.append(time.perf_counter() - started)
                size = path.stat().st_size
                per_record = size / len(index)
        # bytes of every full rewrite: the index grows by one record each time
        total = int(per_record * count * (count + 1) / 2)
    mean_write = statistics.mean(samples)
    return {
        "updates": count,
        "bytes_written": total,
        "mib_written": total / MIB,
        "seconds_estimated": mean_write * count,
        "us_per_update": mean_write * 1e6,
    }


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=1, help="runs per contender (median)")
    parser.add_argument(
        "--loopback-repeat",
        type=int,
        default=None,
        help="runs per contender in the loopback scenario (default: --repeat)",
    )
    parser.add_argument("--scenarios", default="loopback,wan")
    parser.add_argument("--contenders", default="baseline,baseline-rmi,c1,c4,c16,r1,r4,r16")
    parser.add_argument("--images", type=int, default=None, help="the first N bench images")
    parser.add_argument("--registry", default=fx.DEFAULT_REGISTRY)
    parser.add_argument("--wan-port", type=int, default=5055)
    parser.add_argument("--wan-latency", type=float, default=0.04)
    parser.add_argument("--wan-rate", default="20m", help="pv -L rate per connection")
    parser.add_argument(
        "--settle", type=float, default=31.0, help="quiet seconds before each contender"
    )
    parser.add_argument(
        "--code",
        choices=("head", "worktree"),
        default="worktree",
        help="benchmark the working tree's asynccache/ (default) or the committed one",
    )
    parser.add_argument(
        "--cache-root",
        type=Path,
        default=BENCH_DIR,
        help="where the cache folder goes (e.g. /dev/shm/bench to leave out the disk)",
    )
    parser.add_argument("--index-sim", type=int, default=0, metavar="N")
    parser.add_argument("--index-pace", type=float, default=100.0, help="records/s when paced")
    args = parser.parse_args(argv)

    scenarios = [s for s in args.scenarios.split(",") if s]
    contenders = [c for c in args.contenders.split(",") if c]
    for scenario in scenarios:
        if scenario not in ("loopback", "wan"):
            parser.error(f"unknown scenario {scenario!r}")
    stamp = time.strftime("%Y%m%dT%H%M%S")
    log_dir = BENCH_DIR / "logs" / stamp
    log_dir.mkdir(parents=True, exist_ok=True)
    output: dict[str, Any] = {
        "started": stamp,
        "host": {"cpus": os.cpu_count(), "loadavg_before": os.getloadavg()},
        "args": vars(args),
        "scenarios": {},
    }

    if scenarios and contenders:
        if not fx.docker_available() or not fx.registry_available(args.registry):
            print("error: dockerd or the registry is not up (scripts/services.sh up)")
            return 2
        cache_root = args.cache_root.resolve()
        cache_root.mkdir(parents=True, exist_ok=True)
        output["cache_root"] = {"path": str(cache_root), "tmpfs": _is_tmpfs(cache_root)}
        code, code_hash = snapshot_code(args.code)
        output["code"] = {
            "which": args.code,
            "head": _git_head(),
            "path": str(code.relative_to(ROOT)),
            "sha256_12": code_hash,
        }
        print(f"asynccache under test: {code.relative_to(ROOT)} (frozen copy of asynccache/)")
        images = bi.ensure_bench_images(args.registry, count=args.images)
        if args.images is not None and args.images > len(images):
            print(f"note: only {len(images)} bench images exist")
        total_mib = 0.0
        output["images"] = [image.ref for image in images]
        print(
            f"{len(images)} images over {len({i.repo for i in images})} repos; "
            f"contenders {', '.join(contenders)}; repeat {args.repeat}"
        )
        for scenario in scenarios:
            proxy = None
            registry = args.registry
            if scenario == "wan":
                if not insecure_loopback():
                    print("error: dockerd does not treat 127.0.0.0/8 as insecure registries")
                    return 2
                proxy = WanProxy(args.wan_port, args.registry, args.wan_latency, args.wan_rate)
                proxy.start()
                registry = proxy.address
                print(f"wan proxy on {proxy.address}: {proxy.checks}")
            try:
                dataset = BENCH_DIR / f"dataset-{scenario}"
                if dataset.exists():
                    shutil.rmtree(dataset)
                bi.write_bench_dataset(dataset, images, registry)
                runs: dict[str, list[dict[str, Any]]] = {c: [] for c in contenders}
                repeats = args.repeat
                if scenario == "loopback" and args.loopback_repeat is not None:
                    repeats = args.loopback_repeat
                for repeat in range(repeats):
                    for contender in contenders:
                        label = f"{scenario}-{contender}-{repeat}"
                        result = run_contender(
                            contender,
                            dataset,
                            len(images),
                            log_dir,
                            label,
                            proxy,
                            settle_s=args.settle,
                            code=code,
                            cache_root=cache_root,
                        )
                        runs[contender].append(result)
                        total_mib = max(total_mib, result["testbed_mib"])
                        print(
                            f"  {label}: {result['wall_s']:.1f}s, "
                            f"{result['images_per_min']:.1f} img/min, CPU {result['cpu_s']:.1f}s, "
                            f"dockerd {result['dockerd_cpu_s']:.1f}s, "
                            f"dl {_fmt(result['downloaded_mib'], 0)} MiB, "
                            f"load {_fmt(result['loadavg_before'][0], 2)}, "
                            f"exit {result['exit_code']}{'' if result['ok'] else ' NOT OK'}",
                            flush=True,
                        )
                rows = [median_result(runs[c]) for c in contenders]
                base = next((r for r in rows if r["contender"] == "baseline"), None)
                for row in rows:
                    row["ratio_to_baseline"] = (
                        row["images_per_min"] / base["images_per_min"]
                        if base and base["images_per_min"]
                        else None
                    )
                    if base and not row["contender"].startswith("baseline"):
                        row["docker_cp_cpu_per_image_s"] = base.get("docker_cp_cpu_per_image_s")
                problems = check_consistency(rows)
                output["scenarios"][scenario] = {
                    "registry": registry,
                    "proxy": proxy.checks if proxy else None,
                    "results": rows,
                    "runs": runs,
                    "consistency_problems": problems,
                }
                print()
                print(table(f"== {scenario} ({registry}, {len(images)} images) ==", rows))
                if base:
                    print(
                        "   baseline steps per image (wall / CPU of the CLI process, s): "
                        + ", ".join(
                            f"{step} {_fmt(base.get(step + '_wall_per_image_s'), 2)}/"
                            f"{_fmt(base.get(step + '_cpu_per_image_s'), 3)}"
                            for step in ("pull", "create", "cp", "rm", "rmi", "count", "index")
                        )
                    )
                print(
                    "   MiB dl: rN = the client's own count (its 'registry backend: N bytes "
                    "downloaded' line); baseline/cN = 'served MiB', the bytes of the registry's "
                    "GET responses (manifests + compressed blobs) for the bench repositories, "
                    "from its access log"
                )
                for problem in problems[:10]:
                    print(f"   INCONSISTENT: {problem}")
                print()
            finally:
                if proxy:
                    proxy.stop()
        remove_bench_images()
        empty_trash()
        output["testbed_mib"] = total_mib

    if args.index_sim:
        print(f"index.json simulation: {args.index_sim} updates through IndexWriter")
        fast = index_sim(args.index_sim, None)
        paced = index_sim(args.index_sim, args.index_pace)
        original = original_index_cost(args.index_sim)
        output["index_sim"] = {"fast": fast, "paced": paced, "original_full_rewrite": original}
        for label, item in (("as fast as possible", fast), (f"{args.index_pace:g}/s", paced)):
            print(
                f"  IndexWriter {label}: {item['seconds']:.2f}s, {item['writes']} writes, "
                f"{item['mib_written']:.1f} MiB written, {item['us_per_update']:.0f} us/update "
                f"(CPU {item['cpu_us_per_update']:.0f} us/update)"
            )
        print(
            f"  original (rewrite after every entry): {original['mib_written']:.0f} MiB written, "
            f"~{original['seconds_estimated']:.1f}s, {original['us_per_update']:.0f} us/update"
        )

    output["finished"] = time.strftime("%Y%m%dT%H%M%S")
    output["host"]["loadavg_after"] = os.getloadavg()
    text = json.dumps(output, indent=1, default=str)
    (BENCH_DIR / f"results-{stamp}.json").write_text(text, encoding="utf-8")
    (BENCH_DIR / "latest.json").write_text(text, encoding="utf-8")
    print(f"results: {BENCH_DIR / f'results-{stamp}.json'} (and {BENCH_DIR / 'latest.json'})")
    ok = all(
        row["ok"] and not sc["consistency_problems"]
        for sc in output["scenarios"].values()
        for row in sc["results"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
