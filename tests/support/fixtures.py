"""Sample R2E-Gym-like images, their loopback-registry push, and a local Hugging Face dataset.

The images mimic ``namanjain12/{repo}_final:{commit_hash}``: a ``/testbed`` written by several
layers (a clone, a checkout that deletes files and replaces a directory, an install that makes a
``.venv`` full of symlinks, and the copied ``install.sh``/``run_tests.sh``). They are built with
the Docker CLI (legacy builder) on a tiny busybox base made with ``docker import``, pushed to the
registry, and removed locally so that the code under test has to pull them.

Command line::

    python -m tests.support.fixtures --registry 127.0.0.1:5000 --dataset-dir DIR [--split demo]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import http.client
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from asynccache.tree.git_guard import guard_tree
from tests.support.leaky_repo import History, add_leaky_git

#: Registry used when none is given.
DEFAULT_REGISTRY = os.environ.get("ASYNCCACHE_REGISTRY", "127.0.0.1:5000")
#: Namespace of the R2E-Gym images on Docker Hub.
NAMESPACE = "namanjain12"
#: Tag of the busybox base every fixture image starts from.
BASE_IMAGE = "asynccache-fixture-base:1"
#: Label holding the content hash of the spec an image was built from.
FIXTURE_LABEL = "io.asynccache.fixture.hash"
#: Label put on the throw-away containers of :func:`docker_cp_tree`.
REFERENCE_LABEL = "io.asynccache.fixture.reference"
#: Label the code under test puts on its containers (value: absolute cache folder).
CACHE_DIR_LABEL = "io.asynccache.cache_dir"
#: Bumped whenever the way images are built changes, so that old pushes are rebuilt.
FIXTURE_VERSION = "4"
#: Where the testbed lives in every fixture image.
TESTBED = "/testbed"

_MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
    ]
)
_LOCK_PATH = Path(tempfile.gettempdir()) / "asynccache-fixtures.lock"
_BASE_DIRS = (
    ("bin", 0o755),
    ("sbin", 0o755),
    ("usr", 0o755),
    ("usr/bin", 0o755),
    ("usr/sbin", 0o755),
    ("usr/local", 0o755),
    ("usr/local/bin", 0o755),
    ("etc", 0o755),
    ("root", 0o700),
    ("tmp", 0o1777),
    ("var", 0o755),
    ("var/tmp", 0o1777),
    ("dev", 0o755),
    ("proc", 0o555),
    ("sys", 0o555),
)


class FixtureError(RuntimeError):
    """A fixture could not be built, pushed, extracted or described."""


# --------------------------------------------------------------------------------------------
# Specs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ContextFile:
    """One file of a generated build context."""

    path: str
    data: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class FixtureSpec:
    """How to build one sample image and what its ``/testbed`` must look like.

    ``steps`` are Dockerfile instructions written after ``FROM``; ``files`` is the build
    context. The remaining fields describe the expected tree (paths relative to ``/testbed``)
    so that tests can check an extraction without hard-coding them.
    """

    name: str
    repo: str
    steps: tuple[str, ...]
    files: tuple[ContextFile, ...] = ()
    cmd: bool = True
    has_testbed: bool = True
    covers: tuple[str, ...] = ()
    symlinks: tuple[tuple[str, str], ...] = ()
    absent: tuple[str, ...] = ()
    executables: tuple[str, ...] = ()
    modes: tuple[tuple[str, int], ...] = ()
    empty_dirs: tuple[str, ...] = ()
    hardlinks: tuple[tuple[str, ...], ...] = ()
    replaced_dirs: tuple[tuple[str, tuple[str, ...]], ...] = ()
    contents: tuple[tuple[str, bytes], ...] = ()
    min_entries: int = 0
    #: The history of the clone in ``repo/``: a ``.git`` that reaches past HEAD, as R2E's does.
    history: History | None = None

    @property
    def commit_hash(self) -> str:
        """The 40-hex "commit" used as the tag, stable for a given repo and name."""
        return hashlib.sha1(f"{self.repo}/{self.name}".encode()).hexdigest()

    def repository(self, registry: str) -> str:
        """``{registry}/namanjain12/{repo}_final``."""
        return f"{registry}/{NAMESPACE}/{self.repo}_final"

    def ref(self, registry: str) -> str:
        """The full image reference, as the dataset's ``docker_image`` column holds it."""
        return f"{self.repository(registry)}:{self.commit_hash}"

    def dockerfile(self) -> str:
        """The Dockerfile text (without the content-hash label, which is passed to build)."""
        lines = [f"FROM {BASE_IMAGE}", *self.steps]
        if self.cmd:
            lines.append('CMD ["/bin/sh"]')
        return "\n".join(lines) + "\n"

    def content_hash(self) -> str:
        """A digest of everything that shapes the image: version, Dockerfile and context."""
        digest = hashlib.sha256()
        digest.update(f"fixture-version {FIXTURE_VERSION}\n".encode())
        digest.update(self.dockerfile().encode())
        digest.update(f"history {self.history}\n".encode())
        for item in sorted(self.files, key=lambda f: f.path):
            digest.update(f"{item.path}\0{item.mode:o}\0{len(item.data)}\0".encode())
            digest.update(item.data)
        return digest.hexdigest()


@dataclass(frozen=True)
class FixtureImage:
    """A spec together with the reference it was pushed as."""

    spec: FixtureSpec
    ref: str
    built: bool = False

    @property
    def repo(self) -> str:
        """The dataset's ``repo_name``."""
        return self.spec.repo

    @property
    def commit_hash(self) -> str:
        """The dataset's ``commit_hash`` (also the tag)."""
        return self.spec.commit_hash


def _repo_files(
    tree: dict[str, str | bytes],
    *,
    executables: Iterable[str] = (),
    modes: dict[str, int] | None = None,
    prefix: str = "repo",
) -> tuple[ContextFile, ...]:
    """The files of a clone at its checked-out commit (``write_context`` adds its ``.git``)."""
    exec_set = set(executables)
    explicit = modes or {}
    out: list[ContextFile] = []
    for path, content in sorted(tree.items()):
        data = content.encode() if isinstance(content, str) else content
        mode = explicit.get(path, 0o755 if path in exec_set else 0o644)
        out.append(ContextFile(f"{prefix}/{path}", data, mode))
    return tuple(out)


#: The clone's history: HEAD 8 commits before the upstream tip, everything past it leaking.
_HISTORY = History(commits=24, head_back=8, submodule=False)
_HISTORY_WITH_SUBMODULE = History(commits=24, head_back=8, submodule=True)


def _scripts(repo: str, marker: str) -> tuple[ContextFile, ...]:
    install = (
        "#!/bin/sh\nset -e\ncd /testbed\n"
        f"# install {repo} at {marker}\n"
        ". .venv/bin/activate 2>/dev/null || true\n"
        "echo installed\n"
    )
    run_tests = (
        "#!/bin/sh\nset -e\ncd /testbed\n"
        f"# tests of {repo} at {marker}\n"
        '.venv/bin/python -m pytest -rA tests "$@"\n'
    )
    return (
        ContextFile("install.sh", install.encode(), 0o755),
        ContextFile("run_tests.sh", run_tests.encode(), 0o755),
    )


def _pseudo_random(size: int, seed: str) -> bytes:
    """Deterministic incompressible-looking bytes."""
    chunks: list[bytes] = []
    counter = 0
    total = 0
    while total < size:
        block = hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        chunks.append(block)
        total += len(block)
        counter += 1
    return b"".join(chunks)[:size]


def _venv_step(project: str) -> str:
    return (
        "RUN set -e; cd /testbed; "
        "mkdir -p .venv/bin .venv/lib/python3.11/site-packages .venv/include; "
        "ln -s /usr/bin/python3 .venv/bin/python; "
        "ln -s python .venv/bin/python3; "
        "ln -s python .venv/bin/python3.11; "
        "ln -s lib .venv/lib64; "
        "printf 'home = /usr/bin\\ninclude-system-site-packages = false\\nversion = 3.11.7\\n' "
        "> .venv/pyvenv.cfg; "
        "printf '# activate\\nVIRTUAL_ENV=/testbed/.venv\\nexport VIRTUAL_ENV\\n' "
        "> .venv/bin/activate; "
        f"printf '#!/testbed/.venv/bin/python\\nimport {project}\\n' > .venv/bin/{project}; "
        f"chmod 755 .venv/bin/{project}; "
        f"printf '/testbed/src\\n' > .venv/lib/python3.11/site-packages/{project}.pth; "
        f"mkdir -p .venv/lib/python3.11/site-packages/{project}-0.0.0.dist-info; "
        f"printf 'Metadata-Version: 2.1\\nName: {project}\\n' "
        f"> .venv/lib/python3.11/site-packages/{project}-0.0.0.dist-info/METADATA"
    )


_VENV_SYMLINKS = (
    (".venv/bin/python", "/usr/bin/python3"),
    (".venv/bin/python3", "python"),
    (".venv/bin/python3.11", "python"),
    (".venv/lib64", "lib"),
)


def _sampleproj_1() -> FixtureSpec:
    name = "sampleproj-1"
    tree: dict[str, str | bytes] = {
        "README.md": f"# sampleproj\n\nState of {name}.\n",
        "setup.py": "from setuptools import setup\n\nsetup(name='sampleproj')\n",
        "src/sampleproj/__init__.py": "",
        "src/sampleproj/core.py": "def answer() -> int:\n    return 41\n",
        "src/sampleproj/obsolete.py": "OLD = True\n",
        "src/sampleproj/plugins/__init__.py": "OLD_PLUGINS = ['alpha', 'beta']\n",
        "src/sampleproj/plugins/alpha.py": "NAME = 'alpha'\n",
        "src/sampleproj/plugins/beta/__init__.py": "",
        "src/sampleproj/plugins/beta/gamma.py": "NAME = 'gamma'\n",
        "tests/test_core.py": "def test_answer():\n    assert True\n",
        "docs/naïve file.txt": "Un fichier naïf.\n",
        "docs/old notes.txt": "to be deleted\n",
        "données/résumé.md": "# Résumé\n",
        "data/original.txt": "shared by a hard link\n",
        "bin/tool": "#!/bin/sh\necho tool\n",
    }
    checkout = (
        "RUN set -e; cd /testbed; "
        "rm -f src/sampleproj/obsolete.py 'docs/old notes.txt'; "
        "rm -rf src/sampleproj/plugins; mkdir -p src/sampleproj/plugins; "
        "printf 'PLUGINS = [\"fresh\"]\\n' > src/sampleproj/plugins/__init__.py; "
        "printf 'NAME = \"fresh\"\\n' > src/sampleproj/plugins/fresh.py; "
        "printf 'def answer() -> int:\\n    return 42\\n' > src/sampleproj/core.py; "
        "ln data/original.txt data/hardlink.txt; "
        "mkdir -p build/empty 'données/été'; "
        "printf 'chaud\\n' > 'données/été/température.txt'; "
        f"printf 'checked out {name}\\n' >> README.md"
    )
    return FixtureSpec(
        name=name,
        repo="sampleproj",
        steps=(
            "WORKDIR /testbed",
            "COPY repo/ /testbed/",
            checkout,
            _venv_step("sampleproj"),
            "COPY install.sh run_tests.sh /testbed/",
        ),
        files=_repo_files(tree, executables=["bin/tool"]) + _scripts("sampleproj", name),
        covers=(
            "several layers writing /testbed: WORKDIR, COPY clone, RUN checkout, RUN install, COPY",
            "checkout deletes files (whiteouts) and replaces a whole directory (opaque dir)",
            ".venv with absolute and relative symlinks",
            "a clone's .git reaching past HEAD (origin refs, tags and branches at later commits,"
            " reflog, FETCH_HEAD, ORIG_HEAD, a stash, notes) and a submodule under .git/modules",
            "hard link, executables, empty directories, empty file",
            "names with spaces and non-ASCII characters",
            'CMD ["/bin/sh"]',
        ),
        symlinks=_VENV_SYMLINKS,
        absent=(
            "src/sampleproj/obsolete.py",
            "docs/old notes.txt",
            "src/sampleproj/plugins/alpha.py",
            "src/sampleproj/plugins/beta",
        ),
        executables=("install.sh", "run_tests.sh", "bin/tool", ".venv/bin/sampleproj"),
        modes=(("src/sampleproj/core.py", 0o644),),
        empty_dirs=("build/empty", ".venv/include"),
        hardlinks=(("data/hardlink.txt", "data/original.txt"),),
        replaced_dirs=(("src/sampleproj/plugins", ("__init__.py", "fresh.py")),),
        contents=(
            ("src/sampleproj/plugins/__init__.py", b'PLUGINS = ["fresh"]\n'),
            ("src/sampleproj/core.py", b"def answer() -> int:\n    return 42\n"),
            ("docs/naïve file.txt", "Un fichier naïf.\n".encode()),
            ("données/été/température.txt", b"chaud\n"),
            ("src/sampleproj/__init__.py", b""),
        ),
        history=_HISTORY_WITH_SUBMODULE,
        min_entries=30,
    )


def _sampleproj_2() -> FixtureSpec:
    name = "sampleproj-2"
    tree: dict[str, str | bytes] = {
        "README.md": f"# sampleproj\n\nState of {name}, a later commit.\n",
        "setup.py": "from setuptools import setup\n\nsetup(name='sampleproj', version='2')\n",
        "src/sampleproj/__init__.py": "__version__ = '2'\n",
        "src/sampleproj/core.py": "def answer() -> int:\n    return 2\n",
        "src/sampleproj/extra.py": "EXTRA = 2\n",
        "config": "a plain file that becomes a directory\n",
        "legacy/old_api.py": "def old():\n    pass\n",
        "legacy/nested/deep.py": "DEEP = 1\n",
        "notes/meeting notes 2024.txt": "agenda\n",
        "notes/keep.txt": "kept\n",
        "notes/drop me.txt": "dropped\n",
        "data/original.txt": "linked three times\n",
        "other/placeholder.txt": "other\n",
        "docs/index.rst": "Index\n=====\n",
        "tests/test_extra.py": "def test_extra():\n    assert True\n",
    }
    checkout = (
        "RUN set -e; cd /testbed; "
        "rm -f config; mkdir config; printf '[main]\\nkey = value\\n' > config/settings.ini; "
        "rm -rf legacy; ln -s src/sampleproj legacy; "
        "rm -f 'notes/drop me.txt'; "
        "ln -s missing/target dangling; "
        "ln -s /testbed/README.md readme-abs; "
        "ln -s docs docs-link; "
        "ln data/original.txt data/copy1.txt; ln data/original.txt other/copy2.txt; "
        "mkdir -p var/cache/empty; "
        f"printf 'checked out {name}\\n' >> README.md"
    )
    return FixtureSpec(
        name=name,
        repo="sampleproj",
        steps=(
            "WORKDIR /testbed",
            "COPY repo/ /testbed/",
            checkout,
            _venv_step("sampleproj"),
            "COPY install.sh run_tests.sh /testbed/",
        ),
        files=_repo_files(tree) + _scripts("sampleproj", name),
        covers=(
            "second commit of the same repo with a different tree",
            "a file replaced by a directory, a directory replaced by a symlink",
            "dangling, absolute and directory symlinks",
            "three-way hard link across directories",
            'CMD ["/bin/sh"]',
        ),
        symlinks=(
            *_VENV_SYMLINKS,
            ("legacy", "src/sampleproj"),
            ("dangling", "missing/target"),
            ("readme-abs", "/testbed/README.md"),
            ("docs-link", "docs"),
        ),
        absent=("notes/drop me.txt", "legacy/old_api.py"),
        executables=("install.sh", "run_tests.sh"),
        empty_dirs=("var/cache/empty", ".venv/include"),
        hardlinks=(("data/copy1.txt", "data/original.txt", "other/copy2.txt"),),
        replaced_dirs=(("config", ("settings.ini",)),),
        contents=(
            ("config/settings.ini", b"[main]\nkey = value\n"),
            ("notes/meeting notes 2024.txt", b"agenda\n"),
        ),
        history=_HISTORY,
        min_entries=30,
    )


def _toolkit_1() -> FixtureSpec:
    name = "toolkit-1"
    tree: dict[str, str | bytes] = {
        "README.rst": f"toolkit\n=======\n\n{name}\n",
        "toolkit/__init__.py": "",
        "toolkit/cli.py": "def main() -> None:\n    print('toolkit')\n",
        "toolkit/blob.bin": _pseudo_random(512 * 1024, name),
        "toolkit/empty.txt": b"",
        "secrets.txt": "not really secret\n",
        "conf.cfg": "[toolkit]\n",
        "private/key.txt": "k\n",
        "scripts/run-all": "#!/bin/sh\nexit 0\n",
        "readonly/frozen.txt": "frozen\n",
    }
    modes = {"secrets.txt": 0o600, "conf.cfg": 0o640, "scripts/run-all": 0o755}
    checkout = (
        "RUN set -e; cd /testbed; "
        "chmod 700 private; chmod 555 readonly; "
        "rm -f toolkit/cli.py; printf 'def main() -> None:\\n    print(1)\\n' > toolkit/cli.py; "
        "mkdir -p tmp/empty; "
        f"printf '{name}\\n' > VERSION"
    )
    return FixtureSpec(
        name=name,
        repo="toolkit",
        steps=(
            "WORKDIR /testbed",
            "COPY repo/ /testbed/",
            checkout,
            _venv_step("toolkit"),
            "COPY install.sh run_tests.sh /testbed/",
        ),
        files=_repo_files(tree, executables=["scripts/run-all"], modes=modes)
        + _scripts("toolkit", name),
        cmd=False,
        covers=(
            "image WITHOUT CMD (docker create needs an explicit command)",
            "512 KiB binary file, empty file",
            "modes 0600, 0640, 0700 dir, 0555 dir",
        ),
        symlinks=_VENV_SYMLINKS,
        executables=("install.sh", "run_tests.sh", "scripts/run-all"),
        modes=(
            ("secrets.txt", 0o600),
            ("conf.cfg", 0o640),
            ("private", 0o700),
            ("readonly", 0o555),
        ),
        empty_dirs=("tmp/empty",),
        contents=(("toolkit/empty.txt", b""), ("VERSION", f"{name}\n".encode())),
        history=_HISTORY,
        min_entries=20,
    )


def _toolkit_big() -> FixtureSpec:
    name = "toolkit-big"
    tree: dict[str, str | bytes] = {
        "README.rst": f"toolkit\n=======\n\n{name}: a large generated tree\n",
        "toolkit/__init__.py": "",
        "gen/.keep": "",
    }
    generate = (
        "RUN set -e; cd /testbed/gen; "
        "for d in $(seq -w 0 29); do mkdir pkg$d; "
        "for f in $(seq -w 0 99); do "
        'echo "VALUE = \\"$d-$f\\"" > pkg$d/mod_$f.py; '
        "done; done"
    )
    prune = (
        "RUN set -e; cd /testbed/gen; "
        "rm -f pkg07/mod_1*.py; rm -rf pkg08; "
        "mkdir pkg08; echo 'REPLACED = True' > pkg08/__init__.py; "
        "mkdir -p pkg09/empty"
    )
    return FixtureSpec(
        name=name,
        repo="toolkit",
        steps=(
            "WORKDIR /testbed",
            "COPY repo/ /testbed/",
            generate,
            prune,
            _venv_step("toolkit"),
            "COPY install.sh run_tests.sh /testbed/",
        ),
        files=_repo_files(tree) + _scripts("toolkit", name),
        covers=(
            "about 3000 files made by one RUN shell loop",
            "a later layer deleting 10 of them and replacing a 100-file directory",
            'CMD ["/bin/sh"]',
        ),
        symlinks=_VENV_SYMLINKS,
        absent=("gen/pkg07/mod_10.py", "gen/pkg08/mod_00.py"),
        executables=("install.sh", "run_tests.sh"),
        empty_dirs=("gen/pkg09/empty",),
        replaced_dirs=(("gen/pkg08", ("__init__.py",)),),
        contents=(("gen/pkg29/mod_99.py", b'VALUE = "29-99"\n'),),
        history=_HISTORY,
        min_entries=2900,
    )


_LONG_DIR = "/".join(["very-long-directory-name-for-tar-headers"] * 4)
_LONG_NAME = "a-file-name-longer-than-one-hundred-bytes-" + "x" * 80 + ".txt"


def _aiohttp_tree(name: str) -> dict[str, str | bytes]:
    return {
        "README.rst": "aiohttp\n=======\n",
        "aiohttp/__init__.py": "__version__ = '3.9.0'\n",
        "aiohttp/client.py": "class ClientSession:\n    pass\n",
        "aiohttp/web.py": "def run_app(app):\n    pass\n",
        "aiohttp/_websocket.pyx": "# cython\n",
        "tests/test_client.py": "def test_session():\n    assert True\n",
        "CHANGES/1234.bugfix": "Fixed something.\n",
        f"{_LONG_DIR}/{_LONG_NAME}": "long path\n",
        "odd/-leading-dash.txt": "dash\n",
        "odd/with'quote.txt": "quote\n",
        "odd/tab\tname.txt": "tab\n",
        "odd/ünïcödé—dash.txt": "unicode\n",
        "vendor/llhttp/README.md": f"llhttp vendored for {name}\n",
    }


def _aiohttp(name: str, fix: str) -> FixtureSpec:
    checkout = (
        "RUN set -e; cd /testbed; "
        "rm -rf vendor/llhttp; mkdir -p vendor/llhttp/src; "
        f"printf '/* {fix} */\\n' > vendor/llhttp/src/api.c; "
        f"printf '{fix}\\n' > CHANGES/{fix}.feature; "
        "ln -s données lien; mkdir -p 'données'; printf 'ok\\n' > 'données/fichier.txt'; "
        "mkdir -p .pytest_cache/empty"
    )
    return FixtureSpec(
        name=name,
        repo="aiohttp",
        steps=(
            "WORKDIR /testbed",
            "COPY repo/ /testbed/",
            checkout,
            _venv_step("aiohttp"),
            "COPY install.sh run_tests.sh /testbed/",
        ),
        files=_repo_files(_aiohttp_tree(name)) + _scripts("aiohttp", name),
        covers=(
            "paths and names longer than 100 bytes (tar long-name headers)",
            "names with a leading dash, a quote, a tab, non-ASCII; a non-ASCII symlink target",
            f"replaced vendor directory ({fix})",
            'CMD ["/bin/sh"]',
        ),
        symlinks=(*_VENV_SYMLINKS, ("lien", "données")),
        absent=("vendor/llhttp/README.md",),
        executables=("install.sh", "run_tests.sh"),
        empty_dirs=(".pytest_cache/empty",),
        replaced_dirs=(("vendor/llhttp", ("src",)),),
        contents=(
            (f"{_LONG_DIR}/{_LONG_NAME}", b"long path\n"),
            ("vendor/llhttp/src/api.c", f"/* {fix} */\n".encode()),
            ("odd/tab\tname.txt", b"tab\n"),
        ),
        history=_HISTORY,
        min_entries=25,
    )


def _no_testbed() -> FixtureSpec:
    return FixtureSpec(
        name="toolkit-no-testbed",
        repo="toolkit",
        steps=("RUN mkdir -p /app && echo 'no testbed here' > /app/README",),
        has_testbed=False,
        covers=("image without any /testbed",),
    )


#: The images the tests and the demo use.
DEFAULT_SET: tuple[FixtureSpec, ...] = (
    _sampleproj_1(),
    _sampleproj_2(),
    _toolkit_1(),
    _toolkit_big(),
    _aiohttp("aiohttp-1", "fix-1"),
    _aiohttp("aiohttp-2", "fix-2"),
)
#: An image that has no /testbed at all.
NO_TESTBED: FixtureSpec = _no_testbed()
#: Images built for failure tests.
FAILURE_SET: tuple[FixtureSpec, ...] = (NO_TESTBED,)
#: Named sets for the command line.
SETS: dict[str, tuple[FixtureSpec, ...]] = {
    "default": DEFAULT_SET,
    "failures": FAILURE_SET,
    "all": DEFAULT_SET + FAILURE_SET,
}


def spec_by_name(name: str) -> FixtureSpec:
    """The spec called ``name`` among all known specs."""
    for spec in SETS["all"]:
        if spec.name == name:
            return spec
    raise KeyError(name)


def missing_image_ref(registry: str = DEFAULT_REGISTRY, repo: str = "ghostproj") -> str:
    """A reference that is never pushed: pulling it must fail with "not found"."""
    commit = hashlib.sha1(f"missing/{repo}".encode()).hexdigest()
    return f"{registry}/{NAMESPACE}/{repo}_final:{commit}"


# --------------------------------------------------------------------------------------------
# Docker and registry plumbing
# --------------------------------------------------------------------------------------------


def docker(
    *args: str,
    check: bool = True,
    input_bytes: bytes | None = None,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run the Docker CLI and return the finished process (raises FixtureError on failure)."""
    full_env = {**os.environ, **(env or {})}
    try:
        proc = subprocess.run(
            ["docker", *args],
            input=input_bytes,
            capture_output=True,
            timeout=timeout,
            env=full_env,
            check=False,
        )
    except FileNotFoundError as exc:
        raise FixtureError("the docker CLI is not installed") from exc
    except subprocess.TimeoutExpired as exc:
        raise FixtureError(f"docker {' '.join(args[:2])} timed out after {timeout:.0f}s") from exc
    if check and proc.returncode != 0:
        text = (
            proc.stderr.decode(errors="replace").strip()
            or proc.stdout.decode(errors="replace").strip()
        )
        lines = [line for line in text.splitlines() if line.strip()]
        detail = " | ".join(lines[-6:])
        raise FixtureError(f"docker {' '.join(args[:3])} failed ({proc.returncode}): {detail}")
    return proc


def docker_available() -> bool:
    """True when ``docker info`` succeeds."""
    try:
        return (
            docker("info", "--format", "{{.ServerVersion}}", check=False, timeout=20).returncode
            == 0
        )
    except FixtureError:
        return False


def registry_available(registry: str = DEFAULT_REGISTRY) -> bool:
    """True when ``http://{registry}/v2/`` answers 200."""
    try:
        with urllib.request.urlopen(f"http://{registry}/v2/", timeout=3) as response:
            return bool(response.status == 200)
    except (OSError, http.client.HTTPException, ValueError):
        return False


def image_exists(ref: str) -> bool:
    """True when the image is present in the local daemon."""
    return docker("image", "inspect", "--format", "{{.Id}}", ref, check=False).returncode == 0


def remove_local_image(ref: str) -> bool:
    """Remove a local image tag if present; True when something was removed."""
    if not image_exists(ref):
        return False
    return docker("rmi", ref, check=False).returncode == 0


def _split_ref(ref: str) -> tuple[str, str, str]:
    registry, _, rest = ref.partition("/")
    name, _, tag = rest.rpartition(":")
    if not registry or not name or not tag:
        raise FixtureError(f"not a registry/name:tag reference: {ref}")
    return registry, name, tag


def _http(url: str, *, method: str = "GET", accept: str | None = None) -> bytes | None:
    request = urllib.request.Request(url, method=method)
    if accept:
        request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return bytes(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise FixtureError(f"{method} {url}: HTTP {exc.code}") from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise FixtureError(f"{method} {url}: {exc!r}") from exc


def registry_labels(ref: str) -> dict[str, str] | None:
    """The config labels of a pushed image, or None when the tag or one of its blobs is missing."""
    registry, name, tag = _split_ref(ref)
    base = f"http://{registry}/v2/{name}"
    raw = _http(f"{base}/manifests/{tag}", accept=_MANIFEST_TYPES)
    if raw is None:
        return None
    manifest = json.loads(raw)
    config_digest = manifest.get("config", {}).get("digest")
    if not config_digest:
        return None
    for layer in manifest.get("layers", []):
        if _http(f"{base}/blobs/{layer['digest']}", method="HEAD") is None:
            return None
    config_raw = _http(f"{base}/blobs/{config_digest}")
    if config_raw is None:
        return None
    labels = (json.loads(config_raw).get("config") or {}).get("Labels") or {}
    return {str(k): str(v) for k, v in labels.items()}


def is_pushed(spec: FixtureSpec, registry: str) -> bool:
    """True when the registry holds the spec's tag, built from this very spec."""
    labels = registry_labels(spec.ref(registry))
    return labels is not None and labels.get(FIXTURE_LABEL) == spec.content_hash()


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    """Hold the machine-wide lock that keeps image builds of separate processes apart."""
    with open(_LOCK_PATH, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def _has_interpreter(path: Path) -> bool:
    with path.open("rb") as handle:
        header = handle.read(64)
        if header[:4] != b"\x7fELF" or header[4] != 2:
            return True
        (phoff,) = struct.unpack_from("<Q", header, 32)
        phentsize, phnum = struct.unpack_from("<HH", header, 54)
        handle.seek(phoff)
        table = handle.read(phentsize * phnum)
    return any(struct.unpack_from("<I", table, i * phentsize)[0] == 3 for i in range(phnum))


def find_static_busybox() -> Path:
    """The host's statically linked busybox (Debian's busybox-static)."""
    candidates = [Path("/bin/busybox"), Path("/usr/bin/busybox")]
    found = shutil.which("busybox")
    if found:
        candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and not _has_interpreter(candidate):
            return candidate
    raise FixtureError(
        "no statically linked busybox found: install busybox-static (scripts/services.sh up)"
    )


def base_rootfs_tar(busybox: Path) -> bytes:
    """A root filesystem tar: busybox plus a symlink for every applet it provides."""
    listing = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, check=True, timeout=30
    ).stdout.decode()
    applets = sorted({line.strip() for line in listing.splitlines() if "/" in line.strip()})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, mode in _BASE_DIRS:
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = mode
            tar.addfile(info)
        data = busybox.read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size = len(data)
        info.mode = 0o755
        tar.addfile(info, io.BytesIO(data))
        for name, text in (
            ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
            ("etc/group", "root:x:0:\n"),
        ):
            payload = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(payload))
        for applet in applets:
            if applet in ("bin/busybox", "linuxrc"):
                continue
            info = tarfile.TarInfo(applet)
            info.type = tarfile.SYMTYPE
            info.linkname = "/bin/busybox"
            info.mode = 0o777
            tar.addfile(info)
    return buffer.getvalue()


def build_base_image(*, force: bool = False) -> str:
    """Import the busybox base image (``BASE_IMAGE``) unless it already exists; return its tag."""
    if not force and image_exists(BASE_IMAGE):
        return BASE_IMAGE
    payload = base_rootfs_tar(find_static_busybox())
    docker(
        "import",
        "--change",
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "-",
        BASE_IMAGE,
        input_bytes=payload,
    )
    return BASE_IMAGE


def write_context(spec: FixtureSpec, directory: Path) -> Path:
    """Write the spec's Dockerfile and context files into ``directory``; return it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "Dockerfile").write_text(spec.dockerfile(), encoding="utf-8")
    for item in spec.files:
        target = directory / item.path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(item.data)
        target.chmod(item.mode)
    if spec.history is not None:
        add_leaky_git(directory / "repo", spec.history)
    return directory


def build_and_push(spec: FixtureSpec, registry: str, *, keep_local: bool = False) -> str:
    """Build the spec, push it to ``registry``, drop the local tag; return the reference."""
    ref = spec.ref(registry)
    with tempfile.TemporaryDirectory(prefix=f"asynccache-fx-{spec.name}-") as tmp:
        context = write_context(spec, Path(tmp))
        docker(
            "build",
            "--quiet",
            "--rm",
            "--force-rm",
            "--no-cache",
            "--label",
            f"{FIXTURE_LABEL}={spec.content_hash()}",
            "--label",
            f"io.asynccache.fixture.name={spec.name}",
            "--tag",
            ref,
            str(context),
            env={"DOCKER_BUILDKIT": "0"},
            timeout=600,
        )
    try:
        docker("push", "--quiet", ref, timeout=600)
    finally:
        if not keep_local:
            docker("rmi", ref, check=False)
    return ref


def ensure_image(spec: FixtureSpec, registry: str, *, force: bool = False) -> FixtureImage:
    """Make sure the registry holds the spec's image (building it when needed)."""
    ref = spec.ref(registry)
    if not force and is_pushed(spec, registry):
        return FixtureImage(spec, ref, built=False)
    build_base_image()
    build_and_push(spec, registry)
    return FixtureImage(spec, ref, built=True)


def ensure_images(
    specs: Sequence[FixtureSpec] = DEFAULT_SET,
    registry: str = DEFAULT_REGISTRY,
    *,
    force: bool = False,
    jobs: int = 3,
) -> list[FixtureImage]:
    """Make sure the registry holds every spec's image; build the missing ones in parallel."""
    with build_lock():
        todo = [spec for spec in specs if force or not is_pushed(spec, registry)]
        if todo:
            build_base_image()
        built: dict[str, FixtureImage] = {}
        if todo:
            with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
                futures = {spec.name: pool.submit(build_and_push, spec, registry) for spec in todo}
                for spec in todo:
                    ref = futures[spec.name].result()
                    built[spec.name] = FixtureImage(spec, ref, built=True)
        return [built.get(spec.name) or FixtureImage(spec, spec.ref(registry)) for spec in specs]


# --------------------------------------------------------------------------------------------
# Reference extraction and comparison
# --------------------------------------------------------------------------------------------


def docker_cp_tree(image_ref: str, dest: Path | str, *, path: str = TESTBED) -> Path:
    """Copy ``path`` of an image into ``dest`` the plain Docker way (create + cp + rm).

    The image is pulled when it is not local, and removed again afterwards in that case, so
    that the local image store looks as before.
    """
    target = Path(dest)
    target.mkdir(parents=True, exist_ok=True)
    pulled = False
    if not image_exists(image_ref):
        docker("pull", "--quiet", image_ref, timeout=600)
        pulled = True
    container = ""
    try:
        created = docker(
            "create", "--label", f"{REFERENCE_LABEL}=1", image_ref, "/bin/sh", "-c", "true"
        )
        container = created.stdout.decode().strip()
        docker("cp", f"{container}:{path.rstrip('/')}/.", str(target), timeout=600)
    finally:
        if container:
            docker("rm", "-f", container, check=False)
        if pulled:
            docker("rmi", image_ref, check=False)
    return target


#: One entry of :func:`snapshot_tree`: (kind, mode bits, symlink target or sha256, link group).
Entry = tuple[str, int | None, str | None, str | None]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def as_copied(snapshot: dict[str, Entry]) -> dict[str, Entry]:
    """What a copy checkout of a tree gives: no setuid/setgid bits, no device nodes."""
    return {
        path: (kind, mode & ~0o6000 if mode is not None else None, detail, group)
        for path, (kind, mode, detail, group) in snapshot.items()
        if kind not in ("chardev", "blockdev")
    }


def snapshot_tree(root: Path | str, *, hardlinks: bool = True) -> dict[str, Entry]:
    """Describe every path under ``root`` (relative, POSIX, root itself excluded).

    Each value is ``(kind, mode, detail, group)``: kind is file/dir/symlink/fifo/socket/
    chardev/blockdev; mode the permission bits (None for symlinks); detail the sha256 of a
    file or the verbatim target of a symlink; group, for files hard-linked to other files of
    the same tree, the smallest path of that group (None otherwise). Symlinks are never
    followed.
    """
    base = Path(root)
    result: dict[str, Entry] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for current, dirnames, filenames in os.walk(base, followlinks=False):
        for name in [*dirnames, *filenames]:
            full = Path(current, name)
            rel = full.relative_to(base).as_posix()
            st = full.lstat()
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                result[rel] = ("symlink", None, os.readlink(full), None)
            elif stat.S_ISDIR(st.st_mode):
                result[rel] = ("dir", mode, None, None)
            elif stat.S_ISREG(st.st_mode):
                result[rel] = ("file", mode, _sha256(full), None)
                if st.st_nlink > 1:
                    inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif stat.S_ISFIFO(st.st_mode):
                result[rel] = ("fifo", mode, None, None)
            elif stat.S_ISSOCK(st.st_mode):
                result[rel] = ("socket", mode, None, None)
            elif stat.S_ISCHR(st.st_mode):
                result[rel] = ("chardev", mode, f"{st.st_rdev}", None)
            elif stat.S_ISBLK(st.st_mode):
                result[rel] = ("blockdev", mode, f"{st.st_rdev}", None)
    if hardlinks:
        for members in inodes.values():
            if len(members) > 1:
                leader = min(members)
                for rel in members:
                    kind, mode_bits, detail, _ = result[rel]
                    result[rel] = (kind, mode_bits, detail, leader)
    return result


def diff_snapshots(expected: dict[str, Entry], actual: dict[str, Entry], limit: int = 20) -> str:
    """A short human-readable difference between two snapshots ('' when equal)."""
    lines: list[str] = []
    for rel in sorted(expected.keys() - actual.keys()):
        lines.append(f"missing: {rel!r} {expected[rel]}")
    for rel in sorted(actual.keys() - expected.keys()):
        lines.append(f"extra: {rel!r} {actual[rel]}")
    for rel in sorted(expected.keys() & actual.keys()):
        if expected[rel] != actual[rel]:
            lines.append(f"differs: {rel!r} expected {expected[rel]} got {actual[rel]}")
    if len(lines) > limit:
        lines = [*lines[:limit], f"... and {len(lines) - limit} more"]
    return "\n".join(lines)


def ungrouped(snapshot: dict[str, Entry]) -> dict[str, Entry]:
    """A snapshot without its hardlink groups (as ``snapshot_tree(..., hardlinks=False)``)."""
    return {rel: (kind, mode, detail, None) for rel, (kind, mode, detail, _) in snapshot.items()}


def diff_deduplicated(expected: dict[str, Entry], root: Path | str) -> str:
    """How a deduplicated tree differs from a ``docker cp`` snapshot ('' when it does not).

    Dedup links files of equal content and mode into one inode; everything else must be as
    ``docker cp`` gives it, and each of the image's own hardlink groups must stay one inode.
    """
    found = diff_snapshots(ungrouped(expected), snapshot_tree(root, hardlinks=False))
    lines = [found] if found else []
    for rel, (_, _, _, leader) in sorted(expected.items()):
        if leader is not None and not os.path.samefile(Path(root, rel), Path(root, leader)):
            lines.append(f"hardlink group lost: {rel!r} is no longer {leader!r}")
    return "\n".join(lines)


def assert_deduplicated(cache_dir: Path, trees: list[Path], records: list[dict[str, Any]]) -> None:
    """Every regular file of the trees is a stored object, and the trees share some."""
    from asynccache.cache.status import cache_status
    from asynccache.cache.store import Store

    stored = Store(cache_dir).inodes()
    for tree in trees:
        for path in tree.rglob("*"):
            if path.is_file() and not path.is_symlink():
                info = path.stat()
                assert (info.st_dev, info.st_ino) in stored, path
    assert sum(record["files_linked"] for record in records) > 0
    assert cache_status(cache_dir).physical_bytes < sum(r["size_bytes"] for r in records)


def check_expectations(spec: FixtureSpec, root: Path | str) -> list[str]:
    """Compare an extracted ``/testbed`` with what the spec promises; return the problems."""
    base = Path(root)
    problems: list[str] = []
    for rel, target in spec.symlinks:
        path = base / rel
        if not path.is_symlink():
            problems.append(f"{rel}: not a symlink")
        elif os.readlink(path) != target:
            problems.append(f"{rel}: points to {os.readlink(path)!r}, expected {target!r}")
    for rel in spec.absent:
        if os.path.lexists(base / rel):
            problems.append(f"{rel}: should be absent")
    for rel in spec.executables:
        path = base / rel
        if not path.is_file() or path.is_symlink():
            problems.append(f"{rel}: missing executable")
        elif path.lstat().st_mode & 0o111 != 0o111:
            problems.append(f"{rel}: mode {stat.S_IMODE(path.lstat().st_mode):o} not executable")
    for rel, mode in spec.modes:
        path = base / rel
        if not os.path.lexists(path):
            problems.append(f"{rel}: missing")
        elif stat.S_IMODE(path.lstat().st_mode) != mode:
            problems.append(
                f"{rel}: mode {stat.S_IMODE(path.lstat().st_mode):o}, expected {mode:o}"
            )
    for rel in spec.empty_dirs:
        path = base / rel
        if not path.is_dir() or path.is_symlink():
            problems.append(f"{rel}: missing empty directory")
        elif any(path.iterdir()):
            problems.append(f"{rel}: not empty")
    for group in spec.hardlinks:
        stats = [(base / rel).lstat() if os.path.lexists(base / rel) else None for rel in group]
        if any(st is None for st in stats):
            problems.append(f"{group}: hard link member missing")
        elif len({(st.st_dev, st.st_ino) for st in stats if st is not None}) != 1:
            problems.append(f"{group}: not one inode")
    for rel, listing in spec.replaced_dirs:
        path = base / rel
        if not path.is_dir() or path.is_symlink():
            problems.append(f"{rel}: missing replaced directory")
        elif sorted(os.listdir(path)) != sorted(listing):
            problems.append(f"{rel}: holds {sorted(os.listdir(path))}, expected {sorted(listing)}")
    for rel, data in spec.contents:
        path = base / rel
        if not path.is_file() or path.is_symlink():
            problems.append(f"{rel}: missing file")
        elif path.read_bytes() != data:
            problems.append(f"{rel}: unexpected content")
    count = sum(len(dirs) + len(files) for _, dirs, files in os.walk(base))
    if count < spec.min_entries:
        problems.append(f"only {count} entries, expected at least {spec.min_entries}")
    return problems


@dataclass
class ReferenceTrees:
    """Lazily extracted ``docker cp`` references, one per image reference.

    ``trees[ref]`` is the :func:`snapshot_tree` of ``/testbed`` as ``docker cp`` gives it;
    ``trees.path(ref)`` is the extracted folder itself (do not modify it). ``trees.guarded(ref)``
    is the snapshot of that tree after the git guard (what a run publishes by default): the
    same working tree, and a ``.git`` that reaches nothing past HEAD.
    """

    root: Path
    _paths: dict[str, Path] = field(default_factory=dict)
    _snapshots: dict[str, dict[str, Entry]] = field(default_factory=dict)
    _guarded: dict[str, dict[str, Entry]] = field(default_factory=dict)

    def path(self, ref: str) -> Path:
        """The folder holding the reference extraction of ``ref``."""
        if ref not in self._paths:
            target = Path(tempfile.mkdtemp(prefix="ref-", dir=self.root)) / "testbed"
            docker_cp_tree(ref, target)
            self._paths[ref] = target
        return self._paths[ref]

    def __getitem__(self, ref: str) -> dict[str, Entry]:
        if ref not in self._snapshots:
            self._snapshots[ref] = snapshot_tree(self.path(ref))
        return self._snapshots[ref]

    def __contains__(self, ref: object) -> bool:
        return ref in self._snapshots

    def guarded(self, ref: str) -> dict[str, Entry]:
        """The snapshot of a copy of the reference with the history past HEAD removed."""
        if ref not in self._guarded:
            copy = Path(tempfile.mkdtemp(prefix="guarded-", dir=self.root)) / "testbed"
            # cp -a keeps hard links, modes and symlinks as they are.
            subprocess.run(["cp", "-a", str(self.path(ref)), str(copy)], check=True)
            guard_tree(copy)
            self._guarded[ref] = snapshot_tree(copy)
        return self._guarded[ref]


def without_git(snapshot: dict[str, Entry]) -> dict[str, Entry]:
    """A snapshot's working tree: every entry but ``.git`` and what is under it."""
    return {rel: e for rel, e in snapshot.items() if rel != ".git" and not rel.startswith(".git/")}


def leftover_containers(cache_dir: Path | str) -> list[str]:
    """IDs of containers (any state) labelled with this cache folder by the code under test."""
    raw = os.fspath(cache_dir)
    values = {os.path.abspath(raw), str(Path(raw).resolve())}
    found: list[str] = []
    for value in sorted(values):
        proc = docker(
            "ps", "-a", "-q", "--no-trunc", "--filter", f"label={CACHE_DIR_LABEL}={value}"
        )
        found.extend(line for line in proc.stdout.decode().split() if line not in found)
    return found


# --------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------

ENTITY_TYPE = pa.struct(
    [
        ("ast_type_str", pa.string()),
        ("end_lineno", pa.int64()),
        ("file_name", pa.string()),
        ("name", pa.string()),
        ("start_lineno", pa.int64()),
        ("type", pa.string()),
    ]
)

#: The 14 columns of R2E-Gym-Lite, in order.
DATASET_SCHEMA = pa.schema(
    [
        ("repo_name", pa.string()),
        ("docker_image", pa.string()),
        ("commit_hash", pa.string()),
        ("problem_statement", pa.string()),
        ("expected_output_json", pa.string()),
        ("prompt", pa.string()),
        ("parsed_commit_content", pa.string()),
        ("execution_result_content", pa.string()),
        ("num_non_test_files", pa.int64()),
        ("num_non_test_func_methods", pa.int64()),
        ("num_non_test_lines", pa.int64()),
        ("modified_files", pa.list_(pa.string())),
        ("relevant_files", pa.list_(pa.string())),
        ("modified_entity_summaries", pa.list_(ENTITY_TYPE)),
    ]
)


def row_for(image_ref: str, repo: str, commit: str) -> dict[str, Any]:
    """One dataset row shaped like R2E-Gym-Lite, pointing at ``image_ref``."""
    module = f"{repo}/core.py"
    test_file = f"tests/test_{repo}_core.py"
    problem = (
        f"### Bug: `{repo}.core.answer` returns the wrong value\n\n"
        f"At commit `{commit[:12]}` calling `answer()` gives 41 instead of 42.\n\n"
        "```python\n"
        f"from {repo}.core import answer\n"
        "assert answer() == 42\n"
        "```\n\n"
        "**Expected**: 42. **Actual**: 41.\n"
    )
    expected_output = json.dumps(
        {
            f"{test_file}::test_answer": "PASSED",
            f"{test_file}::test_answer_type": "PASSED",
            f"{test_file}::test_legacy": "SKIPPED",
        }
    )
    prompt = (
        "You are given a repository at /testbed and an issue. Make the minimal change to the "
        f"non-test files so that the issue is resolved.\n\n<issue>\n{problem}</issue>\n"
    )
    parsed_commit = json.dumps(
        {
            "old_commit_hash": hashlib.sha1(f"parent/{commit}".encode()).hexdigest(),
            "new_commit_hash": commit,
            "commit_message": f"Fix answer() in {repo}",
            "commit_date": "2024-03-01T12:00:00",
            "metadata": {},
            "file_diffs": [
                {
                    "header": {"file": {"path": module}, "misc_line": None},
                    "index_line": {"old_commit_hash": "0" * 7, "new_commit_hash": "1" * 7},
                    "is_binary_file": False,
                    "hunks": [
                        {
                            "descriptor": {"old_range": {"start": 1, "length": 2}},
                            "line_group": {
                                "all_lines": [
                                    {"content": "def answer() -> int:", "type": "context"},
                                    {"content": "    return 41", "type": "deleted"},
                                    {"content": "    return 42", "type": "added"},
                                ]
                            },
                        }
                    ],
                }
            ],
        }
    )
    execution_result = json.dumps(
        {
            "test_file_codes": ["def test_answer():\n    assert answer() == 42\n"],
            "test_file_names": [test_file],
            "setup_res_code": 0,
            "setup_res_stdout": "installed\n",
            "setup_res_stderr": "",
            "old_test_res_code": 1,
            "old_test_res_stdout": f"{test_file}::test_answer FAILED\n",
            "new_test_res_code": 0,
            "new_test_res_stdout": f"{test_file}::test_answer PASSED\n",
            "docker_image": image_ref,
        }
    )
    return {
        "repo_name": repo,
        "docker_image": image_ref,
        "commit_hash": commit,
        "problem_statement": problem,
        "expected_output_json": expected_output,
        "prompt": prompt,
        "parsed_commit_content": parsed_commit,
        "execution_result_content": execution_result,
        "num_non_test_files": 1,
        "num_non_test_func_methods": 1,
        "num_non_test_lines": 2,
        "modified_files": [module],
        "relevant_files": [module, f"{repo}/__init__.py"],
        "modified_entity_summaries": [
            {
                "ast_type_str": "FunctionDef",
                "end_lineno": 2,
                "file_name": module,
                "name": "answer",
                "start_lineno": 1,
                "type": "function",
            }
        ],
    }


def rows_for(images: Iterable[FixtureImage]) -> list[dict[str, Any]]:
    """Dataset rows for pushed fixture images."""
    return [row_for(image.ref, image.repo, image.commit_hash) for image in images]


def _readme(splits: Sequence[str]) -> str:
    lines = ["---", "configs:", "- config_name: default", "  data_files:"]
    for split in splits:
        lines += [f"  - split: {split}", f"    path: data/{split}-*"]
    lines += [
        "---",
        "",
        "# asynccache fixture dataset",
        "",
        "Rows shaped like R2E-Gym-Lite, pointing at images in a loopback registry.",
        "",
    ]
    return "\n".join(lines)


def write_dataset(
    dataset_dir: Path | str, rows: Sequence[dict[str, Any]], split: str = "train"
) -> Path:
    """Write ``dataset_dir/data/{split}-00000-of-00001.parquet`` (and a README); return it."""
    base = Path(dataset_dir)
    data_dir = base / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(list(rows), schema=DATASET_SCHEMA)
    target = data_dir / f"{split}-00000-of-00001.parquet"
    pq.write_table(table, target)
    splits = sorted(
        p.name.split("-00000-of-")[0] for p in data_dir.glob("*-00000-of-00001.parquet")
    )
    (base / "README.md").write_text(_readme(splits), encoding="utf-8")
    return target


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Build and push a fixture set, then write its dataset; print what was made."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--registry", default=DEFAULT_REGISTRY, help="registry host:port")
    parser.add_argument("--dataset-dir", required=True, type=Path, help="dataset folder to write")
    parser.add_argument("--split", default="demo", help="split name (default: demo)")
    parser.add_argument("--set", dest="set_name", choices=sorted(SETS), default="default")
    parser.add_argument("--force", action="store_true", help="rebuild even if already pushed")
    parser.add_argument("--jobs", type=int, default=3, help="parallel builds (default: 3)")
    args = parser.parse_args(argv)

    if not docker_available():
        print("error: docker daemon not reachable (run scripts/services.sh up)", file=sys.stderr)
        return 1
    if not registry_available(args.registry):
        print(
            f"error: no registry on {args.registry} (run scripts/services.sh up)", file=sys.stderr
        )
        return 1
    started = time.monotonic()
    try:
        images = ensure_images(SETS[args.set_name], args.registry, force=args.force, jobs=args.jobs)
    except FixtureError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for image in images:
        state = "built+pushed" if image.built else "up to date"
        print(f"{state:12}  {image.spec.name:20}  {image.ref}")
    rows = rows_for(images)
    if args.set_name in ("failures", "all"):
        ghost = missing_image_ref(args.registry)
        rows.append(row_for(ghost, "ghostproj", ghost.rpartition(":")[2]))
        print(f"{'never pushed':12}  {'ghostproj':20}  {ghost}")
    path = write_dataset(args.dataset_dir, rows, args.split)
    print(f"dataset: {path} ({len(rows)} rows, split {args.split!r})")
    print(f"done in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
