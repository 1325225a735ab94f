"""Throughput benchmark: asynccache against the original script and against its peers.

Scenarios (``--scenarios``, default ``loopback,tmpfs,transfer``):

* ``loopback``: the registry on 127.0.0.1:5000; the cache folder on the disk (``--cache-root``);
* ``wan``: the same registry behind a socat proxy that adds ~40 ms per new connection and caps
  each connection's responses at 20 MiB/s with pv;
* ``tmpfs``: like loopback, but each run's cache folder is on a tmpfs mounted for that run
  alone, so that the disk's noise stays out (``--processes 1`` against ``--processes 2``);
* ``transfer``: moving a cache folder (scripts/bench_transfer.py): ``asynccache export |
  asynccache import`` against ``tar czf | tar xzf`` and ``rsync -a``.

Contenders (``--contenders``, or each scenario's default list, ``DEFAULT_CONTENDERS``):

* ``baseline``: scripts/baseline_cache_repos.py, the original script (docker pull, create, cp,
  rm, one image at a time; it never removes an image, so shared layers are pulled once);
* ``baseline-rmi``: the same with ``docker rmi`` after each entry (not in the original);
* ``cN`` / ``rN``: ``python -m asynccache --concurrency N``, with the docker or the registry
  backend (``rN`` with ``DOCKER_HOST=unix:///nonexistent``, so that it cannot use dockerd), and
  modifiers: ``+pN`` (``--processes N``), ``+nodedup`` (``--no_dedup``), ``+keepgit``
  (``--keep_git_history``), ``+keepimages`` (``--keep_images``). A contender whose flag is not
  in ``python -m asynccache --help`` of the code under test (a feature not landed yet) is
  skipped with a printed note;
* ``shellN`` and ``skopeo``: the peers (scripts/bench_peers.py): ``curl | gzip -dc | tar -x``
  of every layer, N images at a time, no whiteouts; ``skopeo copy`` + ``umoci raw unpack``.

Contenders take turns, every other round in reverse order. Before each run the benchmark removes
every local image of the bench set, sets the cache folder aside, and waits (up to ``--settle`` s)
until creating a file costs little again. It records:

* wall time, images per minute, ratio to the scenario's first contender (the baseline);
* CPU seconds of the contender's process tree (``os.wait4`` rusage of the child: for the
  baseline that includes every docker CLI process it ran) and per image;
* for the baseline, the wall and CPU of each step per image (``docker cp`` alone included);
* CPU seconds of dockerd, containerd (and shims) and the registry (``/proc/PID/stat``), and of
  the WAN proxy; peak RSS of the child (``ru_maxrss``);
* MiB downloaded: for ``rN`` the client's own count (its ``registry backend: N bytes
  downloaded`` log line); for every contender, the bytes the registry served for the bench
  repositories (the sizes of the GET lines of its access log, found through
  ``/proc/PID/fd/1``);
* the cache folder (scripts/bench_trees.py): logical files and bytes of the cached trees,
  files created (distinct inodes) and physical bytes, and every tree compared with the
  baseline's (``docker cp``'s; without ``.git`` where the leak guard rewrites it).

Results: one table per scenario on stdout, with the comparisons the feature issues ask for
(dedup on/off, leak guard on/off, one process against two, asynccache against its peers), JSON
in ``.bench/results-<timestamp>.json`` and ``.bench/latest.json``. Every number is the median of
``--repeat`` runs (``--docker-repeat`` for the contenders that pull through dockerd).

``--index-sim N`` also feeds N records through ``asynccache.cache.index.IndexWriter`` (as fast as
possible, then at ``--index-pace`` records per second) and reports the bytes written to
index.json and the time per update, next to what rewriting the whole index after every entry
(the original script) costs.

Usage::

    python scripts/bench.py [--images N] [--scenarios loopback,wan,tmpfs,transfer]
                            [--contenders baseline,c4,r1,r1+nodedup,shell4,skopeo]
                            [--repeat N] [--docker-repeat N] [--code worktree|head]
                            [--index-sim 5000]
"""

from __future__ import annotations

import argparse
import contextlib
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
from scripts import bench_peers as bp  # noqa: E402
from scripts import bench_transfer  # noqa: E402
from scripts import bench_trees as bt  # noqa: E402
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


#: Contender modifiers: suffix -> asynccache flags (``pN``: ``--processes N``).
MODIFIERS: dict[str, tuple[str, ...]] = {
    "nodedup": ("--no_dedup",),
    "keepgit": ("--keep_git_history",),
    "keepimages": ("--keep_images",),
}
#: Flags that exist only once a feature has landed: detected in ``--help`` before use.
GUARD_FLAG = "--keep_git_history"


@dataclass(frozen=True)
class Contender:
    """One way of filling a cache folder, parsed from its name.

    ``baseline`` (the original script), ``baseline-rmi`` (the same, removing each image),
    ``cN`` / ``rN`` (asynccache, docker or registry backend, ``--concurrency N``) with modifiers
    after ``+`` (``+pN`` ``--processes N``, ``+nodedup`` ``--no_dedup``, ``+keepgit``
    ``--keep_git_history``, ``+keepimages`` ``--keep_images``), ``shellN`` and ``skopeo``
    (scripts/bench_peers.py).
    """

    name: str
    kind: str
    backend: str = "docker"
    concurrency: int = 1
    flags: tuple[str, ...] = ()

    @property
    def uses_docker(self) -> bool:
        """True when the contender pulls through dockerd."""
        return self.kind == "baseline" or (self.kind == "asynccache" and self.backend == "docker")

    @property
    def needs(self) -> tuple[str, ...]:
        """The asynccache flags this contender needs (to be found in ``--help``)."""
        return tuple(flag for flag in self.flags if flag.startswith("--"))


def parse_contender(name: str) -> Contender:
    """The contender a name stands for (SystemExit naming the grammar when unknown)."""
    if name in ("baseline", "baseline-rmi"):
        return Contender(name, "baseline")
    peer = bp.parse_peer(name)
    if peer is not None:
        return Contender(name, peer[0], "registry", peer[1])
    head, *mods = name.split("+")
    match = re.fullmatch(r"([cr])(\d+)", head)
    flags: list[str] = []
    for mod in mods:
        processes = re.fullmatch(r"p(\d+)", mod)
        if processes:
            flags += ["--processes", processes.group(1)]
        elif mod in MODIFIERS:
            flags += MODIFIERS[mod]
        else:
            match = None
    if not match:
        raise SystemExit(
            f"unknown contender {name!r} (baseline, baseline-rmi, cN or rN with +pN, +nodedup, "
            "+keepgit, +keepimages, shellN, skopeo)"
        )
    backend = "registry" if match.group(1) == "r" else "docker"
    return Contender(name, "asynccache", backend, int(match.group(2)), tuple(flags))


def contender_command(
    name: str, dataset: Path, cache: Path, stats: Path, extra: Sequence[str] = ()
) -> list[str]:
    """The command line of a baseline or asynccache contender (peers: bench_peers)."""
    common = ["--dataset", str(dataset), "--split", bi.SPLIT, "--cache_dir", str(cache)]
    contender = parse_contender(name)
    if contender.kind == "baseline":
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
    if contender.kind != "asynccache":
        raise SystemExit(f"{name} is a peer: see scripts/bench_peers.py")
    backend = ["--backend", "registry"] if contender.backend == "registry" else []
    return [
        sys.executable,
        "-m",
        "asynccache",
        *common,
        *backend,
        "--concurrency",
        str(contender.concurrency),
        *contender.flags,
        *extra,
    ]


def is_registry_contender(name: str) -> bool:
    """True for asynccache with --backend registry (no Docker)."""
    contender = parse_contender(name)
    return contender.kind == "asynccache" and contender.backend == "registry"


def contender_env(name: str, code: Path | None, cache: Path | None = None) -> dict[str, str]:
    """The child's environment: the frozen code, and no reachable dockerd for rN.

    An rN contender keeps its layer blobs in ``cache/.layers`` (by variable: older code reads
    none, and keeps them there anyway), so they go with the cache folder before each run.
    """
    env = code_env(code)
    if is_registry_contender(name):
        env["DOCKER_HOST"] = "unix:///nonexistent"
        if cache is not None:
            env["ASYNCCACHE_LAYER_CACHE_DIR"] = str(cache / ".layers")
    return env


@functools.cache
def cli_help(code: Path | None) -> str:
    """``python -m asynccache --help`` of the code under test (for feature detection)."""
    proc = subprocess.run(
        [sys.executable, "-m", "asynccache", "--help"],
        capture_output=True,
        text=True,
        cwd=code or ROOT,
        env=code_env(code),
        timeout=60,
    )
    return proc.stdout


@functools.cache
def has_subcommand(code: Path | None, name: str) -> bool:
    """True when ``python -m asynccache NAME --help`` exists in the code under test."""
    proc = subprocess.run(
        [sys.executable, "-m", "asynccache", name, "--help"],
        capture_output=True,
        text=True,
        cwd=code or ROOT,
        env=code_env(code),
        timeout=60,
    )
    return proc.returncode == 0 and name in proc.stdout


def missing_flags(contender: Contender, help_text: str) -> list[str]:
    """The flags the contender needs that the CLI does not have (yet)."""
    return [flag for flag in contender.needs if not re.search(rf"{flag}\b", help_text)]


def guard_active(contender: Contender, help_text: str) -> bool:
    """True when asynccache rewrites .git (the leak guard exists and is not opted out)."""
    return (
        contender.kind == "asynccache"
        and GUARD_FLAG in help_text
        and GUARD_FLAG not in contender.flags
    )


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


def settle(seconds: float, where: Path, cheap_us: float = 40.0) -> float:
    """Flush dirty pages and let the file system forget recent deletions; return create us.

    On ext4 without a journal (this machine's root file system) a new inode is never one freed
    less than 60 s ago (300 s while its inode table block is dirty; sync cleans it), and each
    create scans past every such inode: right after a mass delete (a cache folder, the layers
    of removed images) creating a file costs ~0.5 ms of CPU instead of ~20 us. Before every
    contender this waits, probing every 3 s, until creating a file in ``where`` costs at most
    ``cheap_us`` of CPU, or ``seconds`` have passed; the last probe is in the results.
    """
    subprocess.run(["sync"], check=False)
    deadline = time.monotonic() + seconds
    while True:
        cost = create_cost_us(where)
        if cost <= cheap_us or time.monotonic() >= deadline:
            return cost
        time.sleep(3)


@dataclass
class RunContext:
    """What every run of one scenario shares."""

    dataset: Path
    expected: int
    log_dir: Path
    code: Path | None
    help_text: str
    proxy: WanProxy | None = None
    settle_s: float = 61.0
    plan: Path | None = None
    #: instance id -> manifest of the docker cp tree (filled by the first baseline run)
    reference: dict[str, bt.Manifest] = field(default_factory=dict)
    compare: bool = True


def _mount_tmpfs(where: Path) -> None:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16g,mode=0755", "tmpfs", str(where)], check=True
    )


def _umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], check=False)
    with contextlib.suppress(OSError):
        where.rmdir()


def run_contender(
    name: str,
    ctx: RunContext,
    label: str,
    cache_root: Path = BENCH_DIR,
    fresh_tmpfs: bool = False,
) -> dict[str, Any]:
    """Clean up, run one contender, and measure it.

    With ``fresh_tmpfs`` the cache folder is on a tmpfs mounted for this run alone (under
    cache_root), unmounted afterwards.
    """
    contender = parse_contender(name)
    if fresh_tmpfs:
        cache_root = cache_root / f"tmpfs-{os.getpid()}"
        _mount_tmpfs(cache_root)
    try:
        return _run(contender, ctx, label, cache_root)
    finally:
        if fresh_tmpfs:
            _umount(cache_root)


def _run(contender: Contender, ctx: RunContext, label: str, cache_root: Path) -> dict[str, Any]:
    name = contender.name
    cache = cache_root / "cache"
    peer_work = cache_root / "peer-work"
    stats = ctx.log_dir / f"{label}.steps.json"
    set_aside(cache)
    set_aside(peer_work)
    removed = remove_bench_images()
    # the disk forgets deletions (ours, dockerd's); on tmpfs a contender without Docker
    # writes nothing to disk, so there is nothing to wait for
    quiet = 0.0 if _is_tmpfs(cache_root) and not contender.uses_docker else ctx.settle_s
    create_us = settle(quiet, cache_root)
    env = contender_env(name, ctx.code, cache)
    if contender.kind in ("shell", "skopeo"):
        if ctx.plan is None:
            raise SystemExit("the peers need a plan (bench_peers.write_plan)")
        command = bp.peer_command(contender.kind, contender.concurrency, ctx.plan, cache, peer_work)
        env.update(bp.peer_env(cache, peer_work))
    else:
        command = contender_command(name, ctx.dataset, cache, stats)
    daemon = CpuProbe(DAEMON_NAMES)
    registry = CpuProbe(REGISTRY_NAMES)
    traffic = RegistryTraffic(bi.bench_repositories())
    proxy_before = ctx.proxy.cpu() if ctx.proxy else 0.0
    log_path = ctx.log_dir / f"{label}.log"
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
            cwd=ctx.code or ROOT,
            env=env,
        )
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    daemon_cpu = daemon.stop()
    registry_cpu = registry.stop()
    sent = traffic.stop()
    client_bytes = client_downloaded_bytes(log_path) if is_registry_contender(name) else None
    proxy_cpu = (ctx.proxy.cpu() - proxy_before) if ctx.proxy else 0.0

    index_path = cache / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    folders = bt.instance_folders(cache)
    if contender.kind in ("shell", "skopeo"):
        # the peers keep no index: their trees are counted as asynccache counts them
        index = {folder.name: {"file_count": tree_totals(folder)[0]} for folder in folders}
    usage_counts = bt.cache_usage(cache)
    files, size = usage_counts["logical_files"], usage_counts["logical_bytes"]
    images = len(index)
    cpu = usage.ru_utime + usage.ru_stime
    result: dict[str, Any] = {
        "contender": name,
        "exit_code": proc.returncode,
        "images": images,
        "expected": ctx.expected,
        "ok": proc.returncode == 0 and images == ctx.expected,
        "wall_s": wall,
        "images_per_min": images / wall * 60 if wall else 0.0,
        "mib_per_s": size / MIB / wall if wall else 0.0,
        "testbed_mib": size / MIB,
        "testbed_files": files,
        "files_created": usage_counts["files_created"],
        "physical_mib": usage_counts["physical_bytes"] / MIB,
        "physical_ratio": usage_counts["physical_ratio"],
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
        "tmpfs": _is_tmpfs(cache_root),
        "guard": guard_active(contender, ctx.help_text),
        "file_counts": {key: rec.get("file_count") for key, rec in index.items()},
        "log": str(log_path.relative_to(ROOT)),
    }
    # the column: the client's own count for rN, else what the registry served
    result["downloaded_mib"] = (
        result["client_downloaded_mib"]
        if result["client_downloaded_mib"] is not None
        else result["served_mib"]
    )
    if contender.kind == "baseline" and stats.exists():
        steps = json.loads(stats.read_text())
        good = [s for s in steps if "failed" not in s]
        for step in ("pull", "create", "cp", "rm", "rmi", "count", "index"):
            values = [s[step] for s in good if step in s]
            if values:
                result[f"{step}_cpu_per_image_s"] = sum(v["cpu"] for v in values) / len(values)
                result[f"{step}_wall_per_image_s"] = sum(v["wall"] for v in values) / len(values)
        result["docker_cp_cpu_per_image_s"] = result.get("cp_cpu_per_image_s")
    if ctx.compare:
        if contender.kind == "baseline" and not ctx.reference and result["ok"]:
            # docker cp's trees: the reference every other contender is held to
            ctx.reference.update({f.name: bt.tree_manifest(f) for f in folders})
            result["reference"] = True
        elif ctx.reference:
            result["trees"] = bt.compare_trees(ctx.reference, cache, skip_git=result["guard"])
    set_aside(cache)
    set_aside(peer_work)
    return result


# --------------------------------------------------------------------------------------------
# Aggregation and output
# --------------------------------------------------------------------------------------------

NUMERIC_SKIP = {"exit_code", "expected", "removed_images_before", "loadavg_before"}


def median_result(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every numeric field over repeated runs (trees: the worst run's)."""
    merged: dict[str, Any] = dict(runs[0])
    for key, value in runs[0].items():
        if key in NUMERIC_SKIP or isinstance(value, bool):
            continue
        if isinstance(value, int | float) or value is None:
            values: list[float] = [v for r in runs if isinstance(v := r.get(key), int | float)]
            merged[key] = statistics.median(values) if values else None
    trees = [r["trees"] for r in runs if isinstance(r.get("trees"), dict)]
    if trees:
        merged["trees"] = min(trees, key=lambda t: (t["equal"] - t["compared"], t["equal"]))
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


def trees_cell(row: dict[str, Any]) -> str:
    """'equal/compared' trees against docker cp's ('-' when not compared; '*' without .git)."""
    trees = row.get("trees")
    if row.get("reference"):
        return "ref"
    if not trees:
        return "-"
    return f"{trees['equal']}/{trees['compared']}{'*' if trees['skip_git'] else ''}"


COLUMNS = (
    ("contender", "contender", 0),
    ("wall s", "wall_s", 1),
    ("img/min", "images_per_min", 1),
    ("x ref", "ratio_to_ref", 2),
    ("CPU s", "cpu_s", 1),
    ("CPU/img", "cpu_per_image_s", 3),
    ("dockerd s", "dockerd_cpu_s", 1),
    ("RSS MiB", "peak_rss_mib", 0),
    ("MiB dl", "downloaded_mib", 0),
    ("files", "testbed_files", 0),
    ("created", "files_created", 0),
    ("logical MiB", "testbed_mib", 0),
    ("phys/log", "physical_ratio", 2),
    ("trees=cp", "trees_cell", 0),
    ("create us", "create_us_before", 0),
    ("ok", "ok", 0),
)


def table(title: str, rows: list[dict[str, Any]]) -> str:
    """A plain-text table of results."""
    header = [name for name, _, _ in COLUMNS]
    body = [_cells(row) for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in body]
    return "\n".join(lines)


def _cells(row: dict[str, Any], columns: Sequence[tuple[str, str, int]] = COLUMNS) -> list[str]:
    return [
        trees_cell(row) if key == "trees_cell" else _fmt(row.get(key), digits)
        for _, key, digits in columns
    ]


TRANSFER_COLUMNS = (
    ("method", "method", 0),
    ("wall s", "wall_s", 1),
    ("x tar (speed)", "speed_vs_tar", 2),
    ("CPU s", "cpu_s", 1),
    ("stream MiB", "stream_mib", 0),
    ("bytes x tar", "bytes_vs_tar", 2),
    ("dest physical MiB", "physical_mib", 0),
    ("trees", "tree_count", 0),
    ("=source", "trees_cell", 0),
    ("ok", "ok", 0),
)


def markdown(output: dict[str, Any]) -> str:
    """Every scenario's table, comparisons and skipped rows as Markdown (for the README)."""
    parts: list[str] = []
    for scenario, result in output["scenarios"].items():
        parts.append(f"**{scenario}**\n")
        columns = TRANSFER_COLUMNS if scenario == "transfer" else COLUMNS
        parts.append("| " + " | ".join(name for name, _, _ in columns) + " |")
        parts.append("|" + "---|" * len(columns))
        for row in result["results"]:
            cells = [cell.replace("|", "\\|") for cell in _cells(row, columns)]
            parts.append("| " + " | ".join(cells) + " |")
        parts.append("")
        parts += [f"- {line}" for line in result.get("comparisons", [])]
        parts += [f"- skipped {name}: {why}" for name, why in result.get("skipped", {}).items()]
        parts.append("")
    return "\n".join(parts)


def check_consistency(rows: list[dict[str, Any]]) -> list[str]:
    """Contenders that give docker cp's trees must report the same file_count per instance.

    Left out: the shell pipeline (no whiteouts: deleted files stay) and asynccache with its
    leak guard (it removes what .git holds past HEAD); their trees are compared without .git
    or not at all (see the trees column). Trees that differ from docker cp's where they should
    not are problems too.
    """
    problems: list[str] = []
    comparable = [r for r in rows if not r["contender"].startswith("shell") and not r.get("guard")]
    reference = next((r for r in comparable if r["file_counts"]), None)
    if reference is None:
        return []
    for row in comparable:
        for key, count in reference["file_counts"].items():
            other = row["file_counts"].get(key)
            if other != count:
                problems.append(
                    f"{row['contender']}: {key} file_count {other} vs "
                    f"{reference['contender']} {count}"
                )
    for row in rows:
        trees = row.get("trees")
        if (
            trees
            and not row["contender"].startswith("shell")
            and (trees["equal"] != trees["compared"] or trees["missing"])
        ):
            problems.append(
                f"{row['contender']}: {trees['equal']} of {trees['compared']} trees equal "
                f"to docker cp's; {'; '.join(trees['samples'][:2])}"
            )
    return problems


def _row(rows: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((r for r in rows if r["contender"] == name), None)


def _ratio(slow: float | None, fast: float | None) -> str:
    return f"{slow / fast:.2f}x" if slow and fast else "-"


def comparisons(rows: list[dict[str, Any]]) -> list[str]:
    """The lines the issues ask for: each feature on against off, asynccache against peers."""
    lines: list[str] = []
    for row in rows:
        name = row["contender"]
        if "+nodedup" in name:
            on = _row(rows, name.replace("+nodedup", ""))
            if on:
                lines.append(
                    f"dedup {on['contender']} vs {name}: wall {_fmt(on['wall_s'])} vs "
                    f"{_fmt(row['wall_s'])} s (speed-up with dedup "
                    f"{_ratio(row['wall_s'], on['wall_s'])}); "
                    f"files created {on['files_created']} vs {row['files_created']}; "
                    f"physical/logical {_fmt(on['physical_ratio'], 2)} vs "
                    f"{_fmt(row['physical_ratio'], 2)} ({_fmt(on['physical_mib'], 0)} vs "
                    f"{_fmt(row['physical_mib'], 0)} MiB of {_fmt(row['testbed_mib'], 0)})"
                )
        if "+keepgit" in name:
            on = _row(rows, name.replace("+keepgit", ""))
            if on and on.get("guard"):
                lines.append(
                    f"leak guard {on['contender']} vs {name}: wall {_fmt(on['wall_s'])} vs "
                    f"{_fmt(row['wall_s'])} s (x{_fmt(on['wall_s'] / row['wall_s'], 2)} with "
                    f"the guard); CPU {_fmt(on['cpu_s'])} vs {_fmt(row['cpu_s'])} s "
                    f"(guard ~{_fmt(on['cpu_s'] - row['cpu_s'], 1)} s, "
                    f"{_fmt((on['cpu_s'] - row['cpu_s']) / max(1, on['images']), 3)} s/img)"
                )
        processes = re.search(r"\+p(\d+)", name)
        if processes and processes.group(1) != "1":
            one = _row(rows, name.replace(processes.group(0), "+p1"))
            if one:
                lines.append(
                    f"processes {one['contender']} vs {name}: wall {_fmt(one['wall_s'])} vs "
                    f"{_fmt(row['wall_s'])} s (speed-up {_ratio(one['wall_s'], row['wall_s'])}); "
                    f"CPU/img {_fmt(one['cpu_per_image_s'], 3)} vs "
                    f"{_fmt(row['cpu_per_image_s'], 3)} s"
                    + (
                        f"; pool start-up {row['pool_startup_s']:.2f} s (one-entry runs against "
                        "--processes 1)"
                        if row.get("pool_startup_s") is not None
                        else ""
                    )
                )
    peers = [r for r in rows if r["contender"].startswith(("shell", "skopeo"))]
    ours = [r for r in rows if re.fullmatch(r"r\d+", r["contender"])]
    for row in ours:
        for peer in peers:
            lines.append(
                f"{row['contender']} vs {peer['contender']}: {_fmt(row['wall_s'])} vs "
                f"{_fmt(peer['wall_s'])} s ({peer['contender']} takes "
                f"{_ratio(peer['wall_s'], row['wall_s'])} {row['contender']}'s time)"
            )
    return lines


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


#: Scenarios: a table of contenders each, or the transfer of a cache folder.
SCENARIOS = ("loopback", "wan", "tmpfs", "transfer")
DEFAULT_SCENARIOS = "loopback,tmpfs,transfer"
#: Contenders per table scenario when --contenders is not given.
DEFAULT_CONTENDERS = {
    "loopback": (
        "baseline,baseline-rmi,c4,c4+keepimages,c4+nodedup,r1,r1+nodedup,r1+keepgit,r4,shell1,"
        "shell4,skopeo"
    ),
    "wan": "baseline,baseline-rmi,c4,r1,r4,shell4,skopeo",
    "tmpfs": "r1,r4+p1,r4+p2,shell2",
}


def runnable(contenders: Sequence[str], help_text: str, skipped: dict[str, str]) -> list[Contender]:
    """The contenders whose flags the code under test has; the others go to skipped, noted."""
    ready: list[Contender] = []
    for name in contenders:
        contender = parse_contender(name)
        missing = missing_flags(contender, help_text)
        if missing:
            reason = f"{' '.join(missing)} not in `python -m asynccache --help` (not landed yet)"
            skipped[name] = reason
            print(f"note: skipping {name}: {reason}")
            continue
        ready.append(contender)
    return ready


def pool_startup(name: str, ctx: RunContext, repeat: int) -> float | None:
    """What a pool of worker processes adds to a run: one-entry runs of ``name`` (``+pN``,
    N > 1) against the same with ``+p1``, medians of ``repeat``, each on a fresh tmpfs."""
    match = re.search(r"\+p(\d+)", name)
    if not match or match.group(1) == "1":
        return None
    walls: dict[str, list[float]] = {name: [], name.replace(match.group(0), "+p1"): []}
    root = BENCH_DIR / f"startup-{os.getpid()}"
    _mount_tmpfs(root)
    try:
        for number in range(repeat):
            for which in walls:
                cache = root / f"cache-{number}-{which}"
                command = contender_command(
                    which, ctx.dataset, cache, root / "unused", ["--max_entries", "1"]
                )
                started = time.perf_counter()
                subprocess.run(
                    command, env=contender_env(which, ctx.code), cwd=ctx.code or ROOT,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True,
                )  # fmt: skip
                walls[which].append(time.perf_counter() - started)
                shutil.rmtree(cache)
    except subprocess.CalledProcessError as exc:
        print(f"note: pool start-up of {name} not measured: {exc}")
        return None
    finally:
        _umount(root)
    many, one = (statistics.median(values) for values in walls.values())
    return many - one


def run_table(
    scenario: str,
    names: Sequence[str],
    args: argparse.Namespace,
    base: RunContext,
    images: Sequence[bi.BenchImage],
) -> dict[str, Any]:
    """Run every contender of a table scenario args.repeat times; print and return the table."""
    skipped: dict[str, str] = {}
    contenders = runnable(names, base.help_text, skipped)
    proxy = None
    registry = args.registry
    if scenario == "wan":
        if not insecure_loopback():
            raise SystemExit("error: dockerd does not treat 127.0.0.0/8 as insecure registries")
        proxy = WanProxy(args.wan_port, args.registry, args.wan_latency, args.wan_rate)
        proxy.start()
        registry = proxy.address
        print(f"wan proxy on {proxy.address}: {proxy.checks}")
    try:
        dataset = BENCH_DIR / f"dataset-{scenario}"
        if dataset.exists():
            shutil.rmtree(dataset)
        bi.write_bench_dataset(dataset, images, registry)
        plan = None
        if any(c.kind in ("shell", "skopeo") for c in contenders):
            plan = bp.write_plan(
                base.log_dir / f"plan-{scenario}.txt",
                [(image.instance_id, image.ref_on(registry)) for image in images],
            )
        ctx = RunContext(
            dataset=dataset,
            expected=len(images),
            log_dir=base.log_dir,
            code=base.code,
            help_text=base.help_text,
            proxy=proxy,
            settle_s=base.settle_s,
            plan=plan,
            reference=base.reference,
            compare=base.compare,
        )
        runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in contenders}
        for repeat in range(max(args.repeat, args.docker_repeat)):
            # every other round in reverse: a machine whose speed drifts during the run, or
            # what one contender leaves behind (dirty pages, freed inodes), does not always
            # favour the same contender
            for contender in contenders if repeat % 2 == 0 else contenders[::-1]:
                if repeat >= (args.docker_repeat if contender.uses_docker else args.repeat):
                    continue
                label = f"{scenario}-{contender.name}-{repeat}"
                result = run_contender(
                    contender.name,
                    ctx,
                    label,
                    cache_root=args.cache_root.resolve(),
                    fresh_tmpfs=scenario == "tmpfs",
                )
                runs[contender.name].append(result)
                print(
                    f"  {label}: {result['wall_s']:.1f}s, "
                    f"{result['images_per_min']:.1f} img/min, CPU {result['cpu_s']:.1f}s, "
                    f"dockerd {result['dockerd_cpu_s']:.1f}s, "
                    f"dl {_fmt(result['downloaded_mib'], 0)} MiB, "
                    f"created {result['files_created']}, trees {trees_cell(result)}, "
                    f"create {_fmt(result['create_us_before'], 0)} us, "
                    f"load {_fmt(result['loadavg_before'][0], 2)}, "
                    f"exit {result['exit_code']}{'' if result['ok'] else ' NOT OK'}",
                    flush=True,
                )
    finally:
        if proxy:
            proxy.stop()
    rows = [median_result(runs[c.name]) for c in contenders if runs[c.name]]
    if scenario == "tmpfs":
        for row in rows:
            startup = pool_startup(row["contender"], ctx, args.repeat)
            if startup is not None:
                row["pool_startup_s"] = startup
    ref = rows[0] if rows else None
    baseline = _row(rows, "baseline")
    for row in rows:
        row["ratio_to_ref"] = (
            row["images_per_min"] / ref["images_per_min"] if ref and ref["images_per_min"] else None
        )
    problems = check_consistency(rows)
    where = "a fresh tmpfs per run" if scenario == "tmpfs" else str(args.cache_root)
    title = (
        f"== {scenario} ({registry}, {len(images)} images, cache on {where}; "
        f"x ref = img/min against {ref['contender'] if ref else '-'}; median of "
        f"{args.repeat} runs, {args.docker_repeat} for contenders using dockerd) =="
    )
    print()
    print(table(title, rows))
    if baseline:
        print(
            "   baseline steps per image (wall / CPU of the CLI process, s): "
            + ", ".join(
                f"{step} {_fmt(baseline.get(step + '_wall_per_image_s'), 2)}/"
                f"{_fmt(baseline.get(step + '_cpu_per_image_s'), 3)}"
                for step in ("pull", "create", "cp", "rm", "rmi", "count", "index")
            )
        )
    print(
        "   MiB dl: rN = the client's own count; the others = the bytes of the registry's GET "
        "responses for the bench repositories (its access log). files/created: regular files "
        "of the cached trees / distinct inodes in the cache folder; phys/log: allocated bytes "
        "(distinct inodes) over the trees' bytes; trees=cp: trees equal to docker cp's "
        "(* = .git left out: the leak guard rewrites it)"
    )
    for line in comparisons(rows):
        print(f"   {line}")
    for name, reason in skipped.items():
        print(f"   skipped {name}: {reason}")
    for problem in problems[:10]:
        print(f"   INCONSISTENT: {problem}")
    print()
    return {
        "registry": registry,
        "proxy": proxy.checks if proxy else None,
        "results": rows,
        "runs": runs,
        "skipped": skipped,
        "comparisons": comparisons(rows),
        "consistency_problems": problems,
    }


def run_transfer(
    args: argparse.Namespace, base: RunContext, images: Sequence[bi.BenchImage]
) -> dict[str, Any]:
    """Fill a dedup and a plain cache (untimed), then time each transfer method on a tmpfs."""
    has_export = has_subcommand(base.code, "export") and has_subcommand(base.code, "import")
    dedup_flag = "--no_dedup" in base.help_text
    skipped: dict[str, str] = {}
    if not has_export:
        skipped["export|import"] = "`asynccache export`/`import` not in the CLI (not landed yet)"
    if not dedup_flag:
        skipped["plain cache"] = "--no_dedup not in the CLI: one cache serves as both"
    for name, reason in skipped.items():
        print(f"note: transfer: {name}: {reason}")
    root = args.cache_root.resolve() / f"transfer-{os.getpid()}"
    _mount_tmpfs(root)
    try:
        dataset = BENCH_DIR / "dataset-transfer"
        if dataset.exists():
            shutil.rmtree(dataset)
        bi.write_bench_dataset(dataset, images, args.registry)
        env = contender_env("r4", base.code, root)
        sources: dict[str, Path] = {}
        fills = {"dedup": "r4", "plain": "r4+nodedup"} if dedup_flag else {"dedup": "r4"}
        for kind, name in fills.items():
            sources[kind] = root / kind
            command = contender_command(name, dataset, sources[kind], root / "unused")
            with open(base.log_dir / f"transfer-fill-{kind}.log", "wb") as log:
                subprocess.run(
                    command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=base.code or ROOT,
                    check=True,
                )  # fmt: skip
        sources.setdefault("plain", sources["dedup"])
        reference = (
            {f.name: bt.tree_manifest(f) for f in bt.instance_folders(sources["plain"])}
            if base.compare
            else {}
        )
        usage = {kind: bt.cache_usage(path) for kind, path in sources.items()}
        methods = bench_transfer.transfer_methods(
            sources["dedup"], sources["plain"], root / "dest", has_export
        )
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in methods}
        for repeat in range(args.repeat):
            for name, (producer, consumer) in methods.items():
                dest = root / "dest"
                log = base.log_dir / f"transfer-{name.replace(' ', '_')}-{repeat}.log"
                result = bench_transfer.run_method(producer, consumer, dest, env, log)
                if repeat == 0 and base.compare:
                    # every method must hand over the same trees (content, modes, symlinks)
                    result["trees"] = bt.compare_trees(reference, dest)
                    trees = result["trees"]
                    result["ok"] = result["ok"] and trees["equal"] == len(reference)
                shutil.rmtree(dest)
                runs[name].append(result)
                print(
                    f"  transfer-{name}-{repeat}: {result['wall_s']:.1f}s, CPU "
                    f"{result['cpu_s']:.1f}s, stream {_fmt(result['stream_mib'], 0)} MiB, "
                    f"{result['tree_count']} trees{'' if result['ok'] else ' NOT OK'}",
                    flush=True,
                )
    finally:
        _umount(root)
    rows = []
    for name, results in runs.items():
        row = {"method": name, **median_result([{"contender": name, **r} for r in results])}
        rows.append(row)
    tar = next((r for r in rows if r["method"] == "tar czf|tar xzf"), None)
    print()
    print(
        f"== transfer ({len(images)} images; on a tmpfs; x tar = wall and stream bytes against "
        f"tar czf|tar xzf; median of {args.repeat}) =="
    )
    print(
        f"   sources: dedup cache {usage['dedup']['physical_bytes'] / MIB:.0f} MiB physical, "
        f"plain {usage['plain']['physical_bytes'] / MIB:.0f} MiB physical, "
        f"{usage['plain']['logical_bytes'] / MIB:.0f} MiB logical"
    )
    print(
        f"   {'method':>16}  {'wall s':>7}  {'x tar':>6}  {'CPU s':>6}  {'stream MiB':>10}  "
        f"{'bytes x tar':>11}  {'dest phys MiB':>13}  {'trees':>5}  {'=source':>7}  ok"
    )
    for row in rows:
        speed = tar["wall_s"] / row["wall_s"] if tar and row["wall_s"] else None
        size = (
            row["stream_mib"] / tar["stream_mib"]
            if tar and row.get("stream_mib") and tar.get("stream_mib")
            else None
        )
        row["speed_vs_tar"], row["bytes_vs_tar"] = speed, size
        print(
            f"   {row['method']:>16}  {_fmt(row['wall_s']):>7}  {_fmt(speed, 2):>6}  "
            f"{_fmt(row['cpu_s']):>6}  {_fmt(row.get('stream_mib'), 0):>10}  "
            f"{_fmt(size, 2):>11}  {_fmt(row['physical_mib'], 0):>13}  "
            f"{_fmt(row['tree_count']):>5}  {trees_cell(row):>7}  {row['ok']}"
        )
    for name, reason in skipped.items():
        print(f"   skipped {name}: {reason}")
    print()
    return {"results": rows, "runs": runs, "sources": usage, "skipped": skipped}


def save_results(output: dict[str, Any], stamp: str, final: bool) -> None:
    """Write results-<stamp>.json, latest.json and latest.md (``finished`` only when final)."""
    if final:
        output["finished"] = time.strftime("%Y%m%dT%H%M%S")
        output["host"]["loadavg_after"] = os.getloadavg()
    text = json.dumps(output, indent=1, default=str)
    (BENCH_DIR / f"results-{stamp}.json").write_text(text, encoding="utf-8")
    (BENCH_DIR / "latest.json").write_text(text, encoding="utf-8")
    (BENCH_DIR / "latest.md").write_text(markdown(output), encoding="utf-8")


def take_daemon_turn() -> Any:
    """Hold the machine-wide Docker lock that test sessions take (tests/conftest.py).

    Docker tests restart dockerd and count local images; a benchmark run must neither be
    disturbed by them nor disturb them. Returns the open lock file (held until it is closed).
    """
    import fcntl

    path = Path(os.environ.get("ASYNCCACHE_TEST_LOCK", "/var/tmp/asynccache-docker-tests.lock"))
    handle = open(path, "a")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"waiting for Docker test sessions to finish (lock {path})", flush=True)
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    return handle


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs per contender without Docker (median)"
    )
    parser.add_argument(
        "--docker-repeat",
        type=int,
        default=1,
        help="runs per contender that pulls through dockerd (median; they take minutes)",
    )
    parser.add_argument(
        "--scenarios",
        default=DEFAULT_SCENARIOS,
        help=f"comma-separated, of {', '.join(SCENARIOS)} (default {DEFAULT_SCENARIOS})",
    )
    parser.add_argument(
        "--contenders",
        default=None,
        help="for every table scenario (default: each scenario's own list, see the README)",
    )
    parser.add_argument(
        "--images", type=int, default=12, help="the first N bench images (0: all 24)"
    )
    parser.add_argument("--registry", default=fx.DEFAULT_REGISTRY)
    parser.add_argument("--wan-port", type=int, default=5055)
    parser.add_argument("--wan-latency", type=float, default=0.04)
    parser.add_argument("--wan-rate", default="20m", help="pv -L rate per connection")
    parser.add_argument(
        "--settle",
        type=float,
        default=61.0,
        help="at most this many seconds of waiting for cheap file creation before a contender",
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
        help="where the cache folder goes (the tmpfs and transfer scenarios mount theirs here)",
    )
    parser.add_argument(
        "--no-compare", action="store_true", help="do not compare trees with docker cp's"
    )
    parser.add_argument("--index-sim", type=int, default=0, metavar="N")
    parser.add_argument("--index-pace", type=float, default=100.0, help="records/s when paced")
    args = parser.parse_args(argv)

    scenarios = [s for s in args.scenarios.split(",") if s]
    for scenario in scenarios:
        if scenario not in SCENARIOS:
            parser.error(f"unknown scenario {scenario!r} (one of {', '.join(SCENARIOS)})")
    names = {
        scenario: [c for c in (args.contenders or DEFAULT_CONTENDERS[scenario]).split(",") if c]
        for scenario in scenarios
        if scenario != "transfer"
    }
    for listed in names.values():
        for name in listed:
            parse_contender(name)
    stamp = time.strftime("%Y%m%dT%H%M%S")
    log_dir = BENCH_DIR / "logs" / stamp
    log_dir.mkdir(parents=True, exist_ok=True)
    output: dict[str, Any] = {
        "started": stamp,
        "host": {"cpus": os.cpu_count(), "loadavg_before": os.getloadavg()},
        "args": vars(args),
        "scenarios": {},
    }

    if scenarios:
        turn = take_daemon_turn()
        output["daemon_turn"] = turn.name
        if not fx.docker_available() or not fx.registry_available(args.registry):
            print("error: dockerd or the registry is not up (scripts/services.sh up)")
            return 2
        cache_root = args.cache_root.resolve()
        cache_root.mkdir(parents=True, exist_ok=True)
        output["cache_root"] = {"path": str(cache_root), "tmpfs": _is_tmpfs(cache_root)}
        code, code_hash = snapshot_code(args.code)
        help_text = cli_help(code)
        output["code"] = {
            "which": args.code,
            "head": _git_head(),
            "path": str(code.relative_to(ROOT)),
            "sha256_12": code_hash,
            "help": help_text,
        }
        print(f"asynccache under test: {code.relative_to(ROOT)} (frozen copy of asynccache/)")
        images = bi.ensure_bench_images(args.registry, count=args.images or None)
        output["images"] = [image.ref for image in images]
        print(
            f"{len(images)} images over {len({i.repo for i in images})} repos; "
            f"scenarios {', '.join(scenarios)}; repeat {args.repeat} "
            f"({args.docker_repeat} with dockerd)"
        )
        base = RunContext(
            dataset=BENCH_DIR,
            expected=len(images),
            log_dir=log_dir,
            code=code,
            help_text=help_text,
            settle_s=args.settle,
            compare=not args.no_compare,
        )
        # the baseline's trees (docker cp) are the reference: its scenario goes first
        ordered = sorted(scenarios, key=lambda s: s == "transfer" or "baseline" not in names[s])
        try:
            for scenario in ordered:
                if scenario == "transfer":
                    output["scenarios"][scenario] = run_transfer(args, base, images)
                else:
                    output["scenarios"][scenario] = run_table(
                        scenario, names[scenario], args, base, images
                    )
                # a run stopped later keeps the scenarios it finished
                save_results(output, stamp, final=False)
        finally:
            remove_bench_images()
            empty_trash()

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

    save_results(output, stamp, final=True)
    print(f"results: {BENCH_DIR / f'results-{stamp}.json'} (and {BENCH_DIR / 'latest.json'})")
    ok = all(
        row["ok"] and not sc.get("consistency_problems")
        for sc in output["scenarios"].values()
        for row in sc["results"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
