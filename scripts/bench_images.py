"""Benchmark images shaped like R2E-Gym task images, pushed to the loopback registry.

Every repository gets one local base image (the clone with a packed ``.git`` and an installed
``.venv``), and each of its "commits" is a small image on top of it that changes a few files,
adds one and deletes some, as a checkout would. Images of one repository therefore share their
large base layers, as the real ``namanjain12/{repo}_final:{commit}`` images share theirs.

Per image ``/testbed`` holds 30-60 MB in 3,000-6,000 files:

* ``.git`` with ``objects/pack/pack-*.pack`` (random bytes, a few MB), its ``.idx``, an index
  file, refs, hooks and a few loose objects;
* the source tree: several hundred Python-like text files (gzip compresses them about 3x);
* ``.venv``: a few thousand small ``.py`` files in site-packages, ``dist-info`` folders, a few
  large ``.so``-like files of random bytes (incompressible, like real shared objects), and the
  usual ``bin/python`` symlinks.

Content is deterministic (``random.Random`` seeded by repository and file), so a rebuild yields
identical trees. Images are built with the legacy builder on the fixtures' busybox base, pushed
as ``{registry}/namanjain12/{repo}_final:{commit_hash}``, and removed locally (the base too),
so that a benchmark has to pull them. Nothing is rebuilt when the registry already holds every
image with a matching content label.

Command line::

    python scripts/bench_images.py [--registry 127.0.0.1:5000] [--dataset-dir .bench/dataset]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import fixtures as fx  # noqa: E402

#: Bumped whenever generated content or the way images are built changes.
BENCH_VERSION = "1"
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
    pack_bytes: int
    commits: int = 6

    def spec_hash(self) -> str:
        """A digest of everything that shapes this repository's images."""
        text = json.dumps({"version": BENCH_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def base_tag(self) -> str:
        """The local tag of the per-repository base image (removed after the push)."""
        return f"asynccache-bench-base-{self.name}:{self.spec_hash()[:12]}"


REPOS: tuple[RepoShape, ...] = (
    RepoShape(
        "pandas",
        "pandas",
        src_files=1400,
        venv_files=3200,
        so_sizes=(6 * MIB, 4 * MIB, 3 * MIB) + (2 * MIB,) * 4 + (MIB,) * 6,
        pack_bytes=9 * MIB,
    ),
    RepoShape(
        "numpy",
        "numpy",
        src_files=900,
        venv_files=2200,
        so_sizes=(24 * MIB, 5 * MIB, 3 * MIB) + (MIB,) * 4,
        pack_bytes=7 * MIB,
    ),
    RepoShape(
        "pillow",
        "PIL",
        src_files=500,
        venv_files=2600,
        so_sizes=(3 * MIB,) + (2 * MIB,) * 3 + (MIB // 2,) * 8,
        pack_bytes=5 * MIB,
    ),
    RepoShape(
        "tornado",
        "tornado",
        src_files=400,
        venv_files=3600,
        so_sizes=(2 * MIB,) + (MIB,) * 4 + (300 * 1024,) * 6,
        pack_bytes=5 * MIB,
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


def write_repo(shape: RepoShape, root: Path, pool: list[str]) -> _Writer:
    """The clone: source tree, top-level files and a packed .git (context folder ``root``)."""
    out = _Writer(root, pool)
    rng = random.Random(f"{shape.name}/repo")
    for rel in source_paths(shape):
        out.write(rel, out.text(rng, rel))
    for rel in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "tox.ini", "MANIFEST.in"):
        out.write(rel, out.text(rng, rel))
    git = ".git"
    pack_id = hashlib.sha1(f"{shape.name}/pack".encode()).hexdigest()
    pack = b"PACK\x00\x00\x00\x02" + rng.randbytes(shape.pack_bytes - 8)
    out.write(f"{git}/objects/pack/pack-{pack_id}.pack", pack, 0o444)
    idx_size = max(4096, shape.pack_bytes // 40)
    out.write(f"{git}/objects/pack/pack-{pack_id}.idx", b"\xfftOc" + rng.randbytes(idx_size), 0o444)
    out.write(f"{git}/index", b"DIRC" + rng.randbytes(shape.src_files * 90))
    out.write(f"{git}/HEAD", b"ref: refs/heads/main\n")
    out.write(
        f"{git}/config",
        b"[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n"
        b'[remote "origin"]\n\turl = https://example.invalid/repo.git\n',
    )
    out.write(f"{git}/description", b"Unnamed repository.\n")
    refs = "".join(
        f"{hashlib.sha1(f'{shape.name}/tag/{i}'.encode()).hexdigest()} refs/tags/v0.{i}\n"
        for i in range(200)
    )
    out.write(
        f"{git}/packed-refs", ("# pack-refs with: peeled fully-peeled sorted\n" + refs).encode()
    )
    out.write(f"{git}/info/exclude", b"# git ls-files --others --exclude-from=.git/info/exclude\n")
    for hook in ("pre-commit", "pre-push", "commit-msg", "post-update", "pre-rebase", "update"):
        out.write(f"{git}/hooks/{hook}.sample", out.text(rng, hook), 0o755)
    for i in range(30):
        sha = hashlib.sha1(f"{shape.name}/loose/{i}".encode()).hexdigest()
        out.write(
            f"{git}/objects/{sha[:2]}/{sha[2:]}", rng.randbytes(rng.randint(100, 4000)), 0o444
        )
    out.write(f"{git}/refs/heads/main", f"{commit_hash(shape, 0)}\n".encode())
    return out


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


def commit_changes(shape: RepoShape, index: int) -> tuple[list[str], list[str], list[str]]:
    """(changed, added, deleted) source paths of a repository's index-th commit."""
    rng = random.Random(f"{shape.name}/commit/{index}")
    paths = source_paths(shape)
    picked = rng.sample(paths, 12)
    changed, deleted = picked[:9], picked[9:]
    added = [f"{shape.package}/{_ident(rng, 2)}_new{index}.py"]
    return changed, added, deleted


def write_commit(shape: RepoShape, index: int, root: Path, pool: list[str]) -> list[str]:
    """The context of one commit image: changed files, git metadata; returns deleted paths."""
    out = _Writer(root / "commit", pool)
    rng = random.Random(f"{shape.name}/commit/{index}/data")
    changed, added, deleted = commit_changes(shape, index)
    for rel in changed + added:
        out.write(rel, out.text(rng, rel))
    git = ".git"
    out.write(f"{git}/index", b"DIRC" + rng.randbytes(shape.src_files * 90))
    commit = commit_hash(shape, index)
    out.write(f"{git}/HEAD", f"{commit}\n".encode())
    out.write(f"{git}/ORIG_HEAD", f"{commit_hash(shape, 0)}\n".encode())
    out.write(f"{git}/logs/HEAD", f"checkout: moving to {commit}\n".encode())
    for i in range(5):
        sha = hashlib.sha1(f"{commit}/loose/{i}".encode()).hexdigest()
        out.write(
            f"{git}/objects/{sha[:2]}/{sha[2:]}", rng.randbytes(rng.randint(200, 3000)), 0o444
        )
    install = f"#!/bin/sh\nset -e\ncd /testbed\n# install {shape.name} at {commit}\n"
    tests = f'#!/bin/sh\nset -e\ncd /testbed\n.venv/bin/python -m pytest -rA {shape.package} "$@"\n'
    out.write("install.sh", install.encode(), 0o755)
    out.write("run_tests.sh", tests.encode(), 0o755)
    return deleted


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


def _build(context: Path, tag: str, labels: dict[str, str]) -> None:
    args = ["build", "--quiet", "--rm", "--force-rm", "--tag", tag]
    for key, value in labels.items():
        args += ["--label", f"{key}={value}"]
    fx.docker(*args, str(context), env={"DOCKER_BUILDKIT": "0"}, timeout=900)


def build_repo(shape: RepoShape, images: Sequence[BenchImage], log: Any = print) -> None:
    """Build the repository's base and the given commit images; push them; remove them locally."""
    started = time.monotonic()
    pool = _line_pool(shape.name)
    with tempfile.TemporaryDirectory(prefix=f"asynccache-bench-{shape.name}-") as tmp:
        base_ctx = Path(tmp, "base")
        repo = write_repo(shape, base_ctx / "repo", pool)
        venv = write_venv(shape, base_ctx / "venv", pool)
        (base_ctx / "Dockerfile").write_text(
            f"FROM {fx.BASE_IMAGE}\nWORKDIR /testbed\nCOPY repo/ /testbed/\n"
            f'COPY venv/ /testbed/.venv/\n{_VENV_LINKS}\nCMD ["/bin/sh"]\n',
            encoding="utf-8",
        )
        generated = time.monotonic()
        _build(base_ctx, shape.base_tag, {"io.asynccache.bench.base": shape.name})
        shutil.rmtree(base_ctx)
        log(
            f"  {shape.name}: base {repo.files + venv.files} files, "
            f"{(repo.bytes + venv.bytes) / MIB:.1f} MiB (generated in "
            f"{generated - started:.1f}s, built in {time.monotonic() - generated:.1f}s)"
        )
        try:
            for image in images:
                ctx = Path(tmp, f"commit-{image.index}")
                deleted = write_commit(shape, image.index, ctx, pool)
                removal = " ".join(f"'{path}'" for path in deleted)
                (ctx / "Dockerfile").write_text(
                    f"FROM {shape.base_tag}\nCOPY commit/ /testbed/\n"
                    f"RUN set -e; cd /testbed; rm -f {removal}\n",
                    encoding="utf-8",
                )
                _build(
                    ctx,
                    image.ref,
                    {BENCH_LABEL: image.spec_hash, "io.asynccache.bench.repo": shape.name},
                )
                try:
                    fx.docker("push", "--quiet", image.ref, timeout=900)
                finally:
                    fx.docker("rmi", image.ref, check=False)
        finally:
            fx.docker("rmi", shape.base_tag, check=False)
    log(f"  {shape.name}: {len(images)} images pushed in {time.monotonic() - started:.1f}s")


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
    with fx.build_lock():
        todo = [image for image in images if force or not is_pushed(image)]
        if not todo:
            return images
        log(f"building {len(todo)} bench images (once; later runs reuse the registry's copy)")
        fx.build_base_image()
        by_repo = {shape.name: shape for shape in REPOS}
        groups: dict[str, list[BenchImage]] = {}
        for image in todo:
            groups.setdefault(image.repo, []).append(image)
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            futures = [
                pool.submit(build_repo, by_repo[repo], group, log) for repo, group in groups.items()
            ]
            for future in futures:
                future.result()
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
