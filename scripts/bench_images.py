"""Benchmark images shaped like R2E-Gym task images, pushed to the loopback registry.

Real images are ``FROM ubuntu`` + ``git clone <upstream> testbed`` + ``git checkout <buggy
commit>`` + an install that builds ``/testbed/.venv`` and leaves the tree dirty; each image is
built on its own, so images share only their OS layers, while their ``/testbed`` layers, though
separate, hold mostly the same files (the same ``.venv``, sources that differ by a few commits,
the same pack). These images are made the same way:

* one OS base shared by every image (``docker import`` of busybox plus ~20 MiB of
  ``/usr/lib`` files: stdlib-like text and a few shared objects), never holding ``/testbed``;
* per repository, an upstream history made with the real git CLI (scripts/bench_git.py: 900
  commits on ``main``, release tags, a maintenance branch and feature branches, binary test data
  replaced now and then);
* per image, in its own layers: a ``git clone --no-local`` checked out detached at one commit of
  ``main`` (several hundred commits, tags and branches lie past it; ``refs/remotes/origin/*``,
  reflogs, ``FETCH_HEAD`` and a stash are there, as in R2E images), then the repository's
  ``.venv`` (the same files in every image of the repository: a few thousand small ``.py``
  files, ``dist-info`` folders, incompressible ``.so``-like files, ``bin/python`` symlinks), then
  an install step that deletes one tracked file and edits another, then ``install.sh`` and
  ``run_tests.sh``. The commits of one repository's images are ``spacing`` commits apart.

Generated content is deterministic (``random.Random`` seeded by repository and file; git dates
fixed). Images are built with the legacy builder, pushed as
``{registry}/namanjain12/{repo}_final:{commit_hash}``, and removed locally (the bases too), so
that a benchmark has to pull them. Nothing is rebuilt when the registry already holds every
image with a matching content label (a hash of everything that shapes it).

Command line::

    python scripts/bench_images.py [--registry 127.0.0.1:5000] [--dataset-dir .bench/dataset]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import io
import json
import random
import shutil
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from scripts import bench_git  # noqa: E402
from tests.support import fixtures as fx  # noqa: E402
from tests.support import oci_fixtures as oci  # noqa: E402

#: Bumped whenever generated content or the way images are built changes.
BENCH_VERSION = "2"
#: Label holding the content hash of the spec a bench image was built from.
BENCH_LABEL = "io.asynccache.bench.hash"
#: Split name of the benchmark dataset.
SPLIT = "bench"
#: Default folder of the benchmark dataset.
DEFAULT_DATASET_DIR = ROOT / ".bench" / "dataset"
MIB = 1024 * 1024


@dataclass(frozen=True)
class RepoShape:
    """The shape of one repository's ``/testbed``."""

    name: str
    package: str
    src_files: int
    venv_files: int
    so_sizes: tuple[int, ...]
    commits: int = 6
    history: bench_git.History = field(default_factory=bench_git.History)
    #: main's commits between two images of the repository
    spacing: int = 15

    def spec_hash(self) -> str:
        """A digest of everything that shapes this repository's images."""
        text = json.dumps(
            {"version": BENCH_VERSION, "os": asdict(OS_SPEC), **asdict(self)}, sort_keys=True
        )
        return hashlib.sha256(text.encode()).hexdigest()

    def head_index(self, index: int) -> int:
        """Which commit of main (0 = the first) the index-th image has checked out."""
        return int(self.history.commits * 0.35) + index * self.spacing


@dataclass(frozen=True)
class OsShape:
    """The shared OS layer: stdlib-like text files and shared objects under /usr/lib."""

    text_files: int = 1500
    so_sizes: tuple[int, ...] = (4 * MIB, 3 * MIB) + (MIB,) * 6
    #: bumped to get a new layer (a daemon that lost track of the old one keeps it for good)
    revision: int = 3


OS_SPEC = OsShape()


REPOS: tuple[RepoShape, ...] = (
    RepoShape(
        "pandas",
        "pandas",
        src_files=1400,
        venv_files=3200,
        so_sizes=(6 * MIB, 4 * MIB, 3 * MIB) + (2 * MIB,) * 4 + (MIB,) * 6,
    ),
    RepoShape(
        "numpy",
        "numpy",
        src_files=900,
        venv_files=2200,
        so_sizes=(24 * MIB, 5 * MIB, 3 * MIB) + (MIB,) * 4,
    ),
    RepoShape(
        "pillow",
        "PIL",
        src_files=500,
        venv_files=2600,
        so_sizes=(3 * MIB,) + (2 * MIB,) * 3 + (MIB // 2,) * 8,
    ),
    RepoShape(
        "tornado",
        "tornado",
        src_files=400,
        venv_files=3600,
        so_sizes=(2 * MIB,) + (MIB,) * 4 + (300 * 1024,) * 6,
    ),
)


@dataclass(frozen=True)
class BenchImage:
    """One pushed benchmark image."""

    repo: str
    index: int
    commit_hash: str
    ref: str
    spec_hash: str

    @property
    def instance_id(self) -> str:
        """The instance id asynccache derives for it."""
        return f"{self.repo}__{self.commit_hash[:12]}"

    def ref_on(self, registry: str) -> str:
        """The same image as seen through another registry address (e.g. a proxy)."""
        return f"{registry}/{self.ref.split('/', 1)[1]}"


def commit_hash(shape: RepoShape, index: int) -> str:
    """The 40-hex "commit" (and tag) of a repository's index-th image."""
    return hashlib.sha1(f"bench/{shape.name}/{index}".encode()).hexdigest()


def image_spec_hash(shape: RepoShape, index: int) -> str:
    """The content label of one image."""
    return hashlib.sha256(f"{shape.spec_hash()}/{index}".encode()).hexdigest()


def all_images(registry: str = fx.DEFAULT_REGISTRY) -> list[BenchImage]:
    """Every benchmark image, interleaved across repositories (commit 0 of each, then 1, ...)."""
    images: list[BenchImage] = []
    for index in range(max(shape.commits for shape in REPOS)):
        for shape in REPOS:
            if index >= shape.commits:
                continue
            commit = commit_hash(shape, index)
            ref = f"{registry}/{fx.NAMESPACE}/{shape.name}_final:{commit}"
            images.append(BenchImage(shape.name, index, commit, ref, image_spec_hash(shape, index)))
    return images


def bench_repositories(registry: str | None = None) -> list[str]:
    """Repository names (without tags) of the bench images; any registry when None."""
    names = [f"{fx.NAMESPACE}/{shape.name}_final" for shape in REPOS]
    return [f"{registry}/{name}" for name in names] if registry else names


# --------------------------------------------------------------------------------------------
# Content generation
# --------------------------------------------------------------------------------------------

# fmt: off
_SYLLABLES = (
    "get", "set", "data", "frame", "index", "value", "array", "block", "cache", "read", "write",
    "parse", "load", "dump", "item", "key", "name", "path", "node", "tree", "list", "dict",
    "map", "reduce", "apply", "group", "sort", "merge", "join", "split", "chunk", "buffer",
    "stream", "codec", "dtype", "shape", "axis", "mask", "view", "copy", "fill", "count", "sum",
    "mean", "size", "offset", "handler", "request", "response", "client", "server", "config",
    "option", "error", "warn", "check", "valid", "test",
)
# fmt: on


def _ident(rng: random.Random, parts: int = 2) -> str:
    return "_".join(rng.choice(_SYLLABLES) for _ in range(parts))


def _camel(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES).capitalize() for _ in range(2))


def _line_pool(seed: str, count: int = 3000) -> list[str]:
    """Python-looking lines to draw files from (so text compresses like real code)."""
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(count):
        kind = rng.randrange(14)
        a, b, c, d = (_ident(rng, rng.randint(1, 2)) for _ in range(4))
        n = rng.randint(0, 512)
        if kind == 0:
            lines.append(f"class {_camel(rng)}({_camel(rng)}):")
        elif kind == 1:
            lines.append(f"    def {a}(self, {b}, {c}=None):")
        elif kind == 2:
            lines.append(f"        {a} = {b}.{c}({d}, {n})")
        elif kind == 3:
            lines.append(f"        if {a} is not None and {b} > {n}:")
        elif kind == 4:
            lines.append(f"            return {a}[{n}:{c}]")
        elif kind == 5:
            words = " ".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(4, 12)))
            lines.append(f"    # {words}")
        elif kind == 6:
            lines.append(f'        """{a.replace("_", " ").capitalize()} the {b} of {c}."""')
        elif kind == 7:
            lines.append(f'            raise ValueError(f"{a} {b}: {{{c}!r}}")')
        elif kind == 8:
            lines.append(f"from .{a} import {b}, {c}")
        elif kind == 9:
            lines.append(f"        for {a} in self.{b}:")
        elif kind == 10:
            lines.append(f"            self.{a}.append({b}({c}, {d}={n}))")
        elif kind == 11:
            lines.append(f"    assert {a}({b}) == {n}, {c}")
        else:
            lines.append("")
    return lines


class _Writer:
    """Writes generated files under a folder, keeping count."""

    def __init__(self, root: Path, pool: list[str]) -> None:
        self.root = root
        self.pool = pool
        self.files = 0
        self.bytes = 0

    def write(self, rel: str, data: bytes, mode: int = 0o644) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        if mode != 0o644:
            path.chmod(mode)
        self.files += 1
        self.bytes += len(data)

    def text(self, rng: random.Random, rel: str) -> bytes:
        size = min(200_000, max(64, int(rng.lognormvariate(8.0, 1.0))))
        lines = rng.choices(self.pool, k=max(1, size // 36))
        body = f'"""{rel}"""\n\n' + "\n".join(lines) + "\n"
        return body.encode()


def _tree_paths(rng: random.Random, prefix: str, count: int, fanout: int = 24) -> list[str]:
    """count file paths spread over nested folders of at most fanout files each."""
    paths: list[str] = []
    folder_index = 0
    while len(paths) < count:
        depth = rng.randint(0, 2)
        parts = [
            _ident(rng, 1) + (f"{folder_index}" if i == depth - 1 else "") for i in range(depth)
        ]
        folder = "/".join([prefix, *parts]) if parts else prefix
        folder_index += 1
        for _ in range(min(rng.randint(4, fanout), count - len(paths))):
            paths.append(f"{folder}/{_ident(rng, 2)}_{len(paths)}.py")
    return paths


def source_paths(shape: RepoShape) -> list[str]:
    """The source files (relative to /testbed) of a repository's base tree."""
    rng = random.Random(f"{shape.name}/paths")
    lib = int(shape.src_files * 0.65)
    tests = int(shape.src_files * 0.25)
    docs = shape.src_files - lib - tests
    paths = _tree_paths(rng, shape.package, lib)
    paths += _tree_paths(rng, f"{shape.package}/tests", tests)
    paths += [f"doc/source/{_ident(rng, 2)}_{i}.rst" for i in range(docs)]
    return paths


def repo_files(shape: RepoShape, pool: list[str]) -> dict[str, bytes]:
    """The upstream's first commit: source tree and top-level files (path -> content)."""
    out = _Writer(Path("/nonexistent"), pool)
    rng = random.Random(f"{shape.name}/repo")
    files = {rel: out.text(rng, rel) for rel in source_paths(shape)}
    for rel in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "tox.ini", "MANIFEST.in"):
        files[rel] = out.text(rng, rel)
    files["ci/run_checks.sh"] = b"#!/bin/sh\nset -e\npython -m pytest\n"
    return files


def new_source(pool: list[str]) -> Any:
    """A maker of new source files for the history (see bench_git.make_upstream)."""
    out = _Writer(Path("/nonexistent"), pool)
    return lambda rng, rel: out.text(rng, rel)


def write_venv(shape: RepoShape, root: Path, pool: list[str]) -> _Writer:
    """The installed environment (context folder ``root`` becomes /testbed/.venv)."""
    out = _Writer(root, pool)
    rng = random.Random(f"{shape.name}/venv")
    site = "lib/python3.11/site-packages"
    out.write(
        "pyvenv.cfg", b"home = /usr/bin\ninclude-system-site-packages = false\nversion = 3.11.7\n"
    )
    out.write("bin/activate", b"# activate\nVIRTUAL_ENV=/testbed/.venv\nexport VIRTUAL_ENV\n")
    for script in ("pip", "pytest", "py.test", "hypothesis", "coverage", "f2py", "normalizer"):
        out.write(
            f"bin/{script}", f"#!/testbed/.venv/bin/python\nimport {script}\n".encode(), 0o755
        )
    packages = [f"{_ident(rng, 1)}{i}" for i in range(28)] + [shape.package.lower() + "_deps"]
    weights = [rng.random() + 0.2 for _ in packages]
    total = sum(weights)
    remaining = shape.venv_files
    for number, (package, weight) in enumerate(zip(packages, weights, strict=True)):
        count = remaining if number == len(packages) - 1 else int(shape.venv_files * weight / total)
        remaining -= count
        files = _tree_paths(rng, f"{site}/{package}", max(1, count))
        for rel in files:
            out.write(rel, out.text(rng, rel))
        info = f"{site}/{package}-1.{number}.0.dist-info"
        out.write(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\n".encode())
        out.write(f"{info}/WHEEL", b"Wheel-Version: 1.0\nGenerator: bench\nRoot-Is-Purelib: true\n")
        out.write(f"{info}/INSTALLER", b"uv\n")
        record = "".join(f"{rel[len(site) + 1 :]},sha256=x,{number}\n" for rel in files)
        out.write(f"{info}/RECORD", record.encode())
    for number, size in enumerate(shape.so_sizes):
        package = packages[number % len(packages)]
        name = f"_{_ident(rng, 1)}{number}.cpython-311-x86_64-linux-gnu.so"
        if size >= 10 * MIB:
            name = f".libs/lib{_ident(rng, 1)}-{number:04x}.so"
        out.write(
            f"{site}/{package}/{name}", b"\x7fELF\x02\x01\x01" + rng.randbytes(size - 7), 0o755
        )
    out.write(f"{site}/{shape.package.lower()}.pth", b"/testbed\n")
    return out


_VENV_LINKS = (
    "RUN set -e; cd /testbed/.venv; mkdir -p include; "
    "ln -s /usr/bin/python3 bin/python; ln -s python bin/python3; "
    "ln -s python bin/python3.11; ln -s lib lib64"
)


def install_changes(shape: RepoShape, index: int, tracked: Sequence[str]) -> tuple[str, str]:
    """(deleted, edited): the tracked files the index-th image's install step dirties."""
    rng = random.Random(f"{shape.name}/install/{index}")
    deleted, edited = rng.sample(sorted(p for p in tracked if p.endswith(".py")), 2)
    return deleted, edited


def write_scripts(shape: RepoShape, commit: str, root: Path) -> None:
    """install.sh and run_tests.sh, as R2E images carry them."""
    install = f"#!/bin/sh\nset -e\ncd /testbed\n# install {shape.name} at {commit}\n"
    tests = f'#!/bin/sh\nset -e\ncd /testbed\n.venv/bin/python -m pytest -rA {shape.package} "$@"\n'
    for name, text in (("install.sh", install), ("run_tests.sh", tests)):
        (root / name).write_text(text, encoding="utf-8")
        (root / name).chmod(0o755)


def os_rootfs_tar() -> bytes:
    """The shared OS layer: the busybox root file system plus stdlib-like files in /usr/lib."""
    base = fx.base_rootfs_tar(fx.find_static_busybox())
    buffer = io.BytesIO()
    rng = random.Random(f"bench-os/{OS_SPEC.revision}")
    pool = _line_pool(f"bench-os/{OS_SPEC.revision}")
    out = _Writer(Path("/nonexistent"), pool)
    with (
        tarfile.open(fileobj=io.BytesIO(base)) as source,
        tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for member in source.getmembers():
            tar.addfile(member, source.extractfile(member) if member.isfile() else None)
        folders: set[str] = set()
        text_files, so_sizes = OS_SPEC.text_files, OS_SPEC.so_sizes
        paths = _tree_paths(rng, "usr/lib/python3.11", text_files)
        libs = "usr/lib/x86_64-linux-gnu"
        paths += [f"{libs}/lib{_ident(rng, 1)}{i}.so.1" for i in range(len(so_sizes))]
        for number, rel in enumerate(paths):
            parts = rel.split("/")
            for depth in range(1, len(parts)):
                folder = "/".join(parts[:depth])
                if folder not in folders and folder not in ("usr",):
                    folders.add(folder)
                    info = tarfile.TarInfo(folder)
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
            so = number - text_files
            data = (
                out.text(rng, rel)
                if so < 0
                else b"\x7fELF\x02\x01\x01" + rng.randbytes(so_sizes[so] - 7)
            )
            info = tarfile.TarInfo(rel)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def os_ref(registry: str) -> str:
    """The shared OS base in the registry (pushed through its HTTP API, never imported)."""
    text = json.dumps({"v": BENCH_VERSION, **asdict(OS_SPEC)})
    digest = hashlib.sha256(text.encode()).hexdigest()
    return f"{registry}/asynccache-bench-os:{digest[:12]}"


def build_os_base(registry: str) -> str:
    """Push the shared OS base to the registry unless it is there; return its reference.

    It goes straight to the registry and reaches dockerd by a pull: a ``docker import``ed layer
    outlives the removal of its image in this dockerd, and the benchmark needs every bench
    layer gone before each contender.
    """
    ref = os_ref(registry)
    name, _, tag = ref.removeprefix(f"{registry}/").rpartition(":")
    if fx.registry_labels(ref) is None:
        image = oci.build_image([oci.Layer(os_rootfs_tar(), "gzip")])
        oci.push_image(registry, name, tag, image)
    return ref


# --------------------------------------------------------------------------------------------
# Building and pushing
# --------------------------------------------------------------------------------------------


def is_pushed(image: BenchImage) -> bool:
    """True when the registry holds the image, built from this very spec."""
    try:
        labels = fx.registry_labels(image.ref)
    except fx.FixtureError:
        return False
    return labels is not None and labels.get(BENCH_LABEL) == image.spec_hash


def _docker_retrying(*args: str, env: dict[str, str] | None = None, attempts: int = 3) -> None:
    """A docker command, tried again after the daemon restarts (tests on this machine do)."""
    for attempt in range(attempts):
        try:
            fx.docker(*args, env=env, timeout=900)
            return
        except fx.FixtureError:
            if attempt == attempts - 1:
                raise
            deadline = time.monotonic() + 120
            while not fx.docker_available() and time.monotonic() < deadline:
                time.sleep(2)


def _build(context: Path, tag: str, labels: dict[str, str]) -> None:
    args = ["build", "--quiet", "--rm", "--force-rm", "--tag", tag]
    for key, value in labels.items():
        args += ["--label", f"{key}={value}"]
    _docker_retrying(*args, str(context), env={"DOCKER_BUILDKIT": "0"})


def build_repo(
    shape: RepoShape, images: Sequence[BenchImage], os_base: str, log: Any = print
) -> None:
    """Build the given images of one repository on the OS base; push them; remove them locally."""
    started = time.monotonic()
    pool = _line_pool(shape.name)
    with tempfile.TemporaryDirectory(prefix=f"asynccache-bench-{shape.name}-") as tmp:
        upstream = Path(tmp, "upstream.git")
        main_ids = bench_git.make_upstream(
            upstream, shape.package, repo_files(shape, pool), shape.history, pool, new_source(pool)
        )
        venv = write_venv(shape, Path(tmp, "venv"), pool)
        log(
            f"  {shape.name}: upstream of {len(main_ids)} commits on main and "
            f"{venv.files} .venv files made in {time.monotonic() - started:.1f}s"
        )
        for image in images:
            ctx = Path(tmp, f"image-{image.index}")
            ctx.mkdir()
            head = main_ids[shape.head_index(image.index)]
            when = bench_git.EPOCH + (shape.history.commits + 24 * image.index) * 3600
            url = f"https://github.com/bench/{shape.name}.git"
            bench_git.clone_at(upstream, ctx / "repo", head, url, when)
            # a copy, not links or the same mtimes: every image builds its own .venv
            shutil.copytree(Path(tmp, "venv"), ctx / "venv", copy_function=shutil.copy)
            write_scripts(shape, image.commit_hash, ctx)
            tracked = (
                bench_git.git(ctx / "repo", "ls-files", env=bench_git.git_env(Path(tmp)))
                .stdout.decode()
                .split()
            )
            deleted, edited = install_changes(shape, image.index, tracked)
            (ctx / "Dockerfile").write_text(
                f"FROM {os_base}\nWORKDIR /testbed\nCOPY repo/ /testbed/\n"
                f"COPY venv/ /testbed/.venv/\n{_VENV_LINKS}; cd /testbed; rm -f '{deleted}'; "
                f"echo '# patched by install.sh' >> '{edited}'\n"
                f'COPY install.sh run_tests.sh /testbed/\nCMD ["/bin/sh"]\n',
                encoding="utf-8",
            )
            _build(
                ctx,
                image.ref,
                {BENCH_LABEL: image.spec_hash, "io.asynccache.bench.repo": shape.name},
            )
            shutil.rmtree(ctx)
            try:
                _docker_retrying("push", "--quiet", image.ref)
            finally:
                fx.docker("rmi", image.ref, check=False)
    log(f"  {shape.name}: {len(images)} images pushed in {time.monotonic() - started:.1f}s")


_LOCK_PATH = Path(tempfile.gettempdir()) / "asynccache-bench-images.lock"


@contextlib.contextmanager
def _bench_lock() -> Any:
    """Keep builds of the bench images by separate processes apart."""
    with open(_LOCK_PATH, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_bench_images(
    registry: str = fx.DEFAULT_REGISTRY,
    *,
    count: int | None = None,
    force: bool = False,
    jobs: int = 2,
    log: Any = print,
) -> list[BenchImage]:
    """Make sure the registry holds the first ``count`` bench images; return them."""
    images = all_images(registry)[: count if count is not None else None]
    with _bench_lock():
        todo = [image for image in images if force or not is_pushed(image)]
        if not todo:
            return images
        log(f"building {len(todo)} bench images (once; later runs reuse the registry's copy)")
        os_base = build_os_base(registry)
        by_repo = {shape.name: shape for shape in REPOS}
        groups: dict[str, list[BenchImage]] = {}
        for image in todo:
            groups.setdefault(image.repo, []).append(image)
        try:
            with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
                futures = [
                    pool.submit(build_repo, by_repo[repo], group, os_base, log)
                    for repo, group in groups.items()
                ]
                for future in futures:
                    future.result()
        finally:
            fx.docker("rmi", os_base, check=False)
    return images


def write_bench_dataset(
    dataset_dir: Path, images: Sequence[BenchImage], registry: str | None = None
) -> Path:
    """Write the dataset (split ``bench``) for the images, optionally through another address."""
    rows = [
        fx.row_for(image.ref_on(registry) if registry else image.ref, image.repo, image.commit_hash)
        for image in images
    ]
    return fx.write_dataset(dataset_dir, rows, SPLIT)


def main(argv: Sequence[str] | None = None) -> int:
    """Build (when needed) and push the bench images; write their dataset."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--registry", default=fx.DEFAULT_REGISTRY, help="registry host:port")
    parser.add_argument("--dataset-dir", type=Path, default=DEFAULT_DATASET_DIR)
    parser.add_argument("--images", type=int, default=None, help="the first N images only")
    parser.add_argument("--force", action="store_true", help="rebuild even if already pushed")
    parser.add_argument("--jobs", type=int, default=2, help="repositories built in parallel")
    args = parser.parse_args(argv)
    if not fx.docker_available():
        print("error: docker daemon not reachable (run scripts/services.sh up)", file=sys.stderr)
        return 1
    if not fx.registry_available(args.registry):
        print(f"error: no registry on {args.registry} (scripts/services.sh up)", file=sys.stderr)
        return 1
    started = time.monotonic()
    try:
        images = ensure_bench_images(
            args.registry, count=args.images, force=args.force, jobs=args.jobs
        )
    except fx.FixtureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    path = write_bench_dataset(args.dataset_dir, images)
    print(f"{len(images)} images over {len({i.repo for i in images})} repos; dataset {path}")
    print(f"done in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
