"""Builds repositories whose .git leaks the fix the way R2E-Gym images do, with the git CLI.

An R2E-Gym image is ``git clone <upstream> testbed`` then ``git checkout <buggy commit>``; its
install script then dirties the working tree. So ``.git`` keeps the upstream branches, tags and
remote refs past HEAD, reflogs, ``FETCH_HEAD``, and here also ``ORIG_HEAD``, a stash, notes, a
replace ref and a submodule under ``.git/modules`` whose own history goes past its HEAD.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

#: When the first upstream commit was made; each next one is an hour later.
_EPOCH = 1_600_000_000


def git_env(home: Path | None = None) -> dict[str, str]:
    """An environment for running git in tests: no system or user config, fixed identities."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("GIT_") and key not in {"HOME", "XDG_CONFIG_HOME"}
    }
    env.update(
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_AUTHOR_NAME="Upstream Dev",
        GIT_AUTHOR_EMAIL="dev@example.com",
        GIT_COMMITTER_NAME="Upstream Dev",
        GIT_COMMITTER_EMAIL="dev@example.com",
        LC_ALL="C",
    )
    if home is not None:
        env["HOME"] = str(home)
    return env


def git(cwd: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    """Run git in ``cwd`` (file:// transport allowed, for the submodule) and return stdout."""
    proc = subprocess.run(
        ["git", "-c", "protocol.file.allow=always", *args],
        cwd=cwd,
        env=env or git_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed in {cwd}: {proc.stderr.strip()}")
    return proc.stdout


@dataclass
class LeakyRepo:
    """A testbed-like clone and what it holds past HEAD."""

    path: Path
    upstream: Path
    head: str
    #: The commit right after HEAD on the upstream branch: the fix.
    fix: str
    #: Every commit that only refs, reflogs or other state past HEAD reach.
    later_commits: list[str] = field(default_factory=list)
    #: Tags at HEAD or an ancestor, which stay.
    old_tags: list[str] = field(default_factory=list)
    #: Tags past HEAD, which go.
    new_tags: list[str] = field(default_factory=list)
    #: The submodule's checkout, its commit and the commits past it in its own history.
    submodule: str = "vendor/lib"
    submodule_head: str = ""
    submodule_later: list[str] = field(default_factory=list)
    #: The object written by the stash (the change it saved) that nothing else reaches.
    stash_blob: str = ""
    #: A blob only the index reaches (a staged new file).
    staged_blob: str = ""


@dataclass(frozen=True)
class History:
    """How much history a leaky clone gets (fixture images hash it into their content)."""

    commits: int = 40
    #: HEAD is this many commits before the upstream tip.
    head_back: int = 12
    submodule: bool = True


def _commit(
    repo: Path,
    number: int,
    files: Mapping[str, str | bytes],
    message: str,
    *,
    executables: Iterable[str] = (),
    remove: Iterable[str] = (),
) -> str:
    for name, content in files.items():
        path = repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        path.chmod(0o755 if name in executables else 0o644)
    for name in remove:
        (repo / name).unlink(missing_ok=True)
    env = git_env()
    stamp = f"@{_EPOCH + number * 3600} +0000"
    env.update(GIT_AUTHOR_DATE=stamp, GIT_COMMITTER_DATE=stamp)
    git(repo, "add", "-A", env=env)
    git(repo, "commit", "-q", "--allow-empty", "-m", message, env=env)
    return git(repo, "rev-parse", "HEAD").strip()


def _upstream_submodule(root: Path) -> list[str]:
    lib = root / "lib-upstream"
    lib.mkdir()
    git(lib, "init", "-q", "-b", "main")
    return [
        _commit(lib, n, {"lib.py": f"VERSION = {n}\n"}, f"lib release {n}") for n in range(1, 9)
    ]


def _generated_files(n: int) -> dict[str, str | bytes]:
    return {
        "src/pkg/core.py": f"def answer():\n    return {n}\n",
        f"src/pkg/mod{n % 7}.py": f"# module revision {n}\n",
        "pyproject.toml": f'[project]\nname = "pkg"\nversion = "0.{n}"\n',
        "README.md": f"# pkg\n\nrevision {n}\n",
    }


def build_leaky_repo(
    root: Path,
    history: History = History(),
    *,
    head_files: Mapping[str, tuple[bytes, int]] | None = None,
    dirty: bool = True,
) -> LeakyRepo:
    """Make ``root/upstream`` and ``root/testbed``, a clone checked out ``head_back`` commits
    before the upstream tip, with every kind of leak; return what it holds.

    ``head_files`` (path -> (content, mode)): HEAD's tree is exactly these files (plus the
    submodule); earlier and later commits change a HISTORY.txt that HEAD does not have.
    ``dirty``: leave the traces of an install script (edited, deleted, new and staged files).
    """
    root.mkdir(parents=True, exist_ok=True)
    commits, head_n = history.commits, history.commits - history.head_back
    if not 5 < head_n < commits - 3:
        raise ValueError(f"HEAD must be past commit 5 and 4 before the tip: {history}")
    lib_commits = _upstream_submodule(root) if history.submodule else []
    upstream = root / "upstream"
    upstream.mkdir()
    git(upstream, "init", "-q", "-b", "main")
    executables = [p for p, (_, mode) in (head_files or {}).items() if mode & 0o111]
    main: list[str] = []
    for n in range(1, commits + 1):
        files: dict[str, str | bytes]
        remove: list[str] = []
        if head_files is None:
            files = dict(_generated_files(n))
        elif n == head_n:
            files, remove = {}, ["HISTORY.txt"]
        else:
            past = " past the buggy commit" if n > head_n else ""
            files = {"HISTORY.txt": f"revision {n}{past}\n"}
            if n == 1:
                files.update({path: data for path, (data, _) in head_files.items()})
        main.append(
            _commit(upstream, n, files, f"change {n}", executables=executables, remove=remove)
        )
        if n == 4 and lib_commits:  # the submodule arrives before HEAD, at an early release
            git(upstream, "submodule", "add", "-q", f"file://{root / 'lib-upstream'}", "vendor/lib")
            git(upstream / "vendor/lib", "checkout", "-q", lib_commits[2])
            main[-1] = _commit(upstream, n, {}, "add vendor/lib")
        if n == commits - 3 and lib_commits:  # ... and moves to a later release after HEAD
            git(upstream / "vendor/lib", "checkout", "-q", lib_commits[-1])
            main[-1] = _commit(upstream, n, {}, "bump vendor/lib")
    head_index = head_n - 1
    head, fix = main[head_index], main[head_index + 1]
    old_tags = ["v0.1", "v0.2"]
    new_tags = ["v1.0", "v0.9-rc"]
    git(upstream, "tag", "v0.1", main[2])
    git(upstream, "tag", "-a", "v0.2", "-m", "release 0.2", main[head_index - 3])
    git(upstream, "tag", "-a", "v1.0", "-m", "release 1.0 with the fix", main[-2])
    git(upstream, "tag", "v0.9-rc", fix)
    git(upstream, "branch", "maint-0.1", main[3])  # at an ancestor of HEAD
    git(upstream, "checkout", "-q", "-b", "feature", main[head_index - 5])
    feature = [
        _commit(upstream, 100 + n, {"feature.txt": f"X = {n}\n"}, f"feature {n}") for n in range(3)
    ]
    git(upstream, "checkout", "-q", "main")

    testbed = root / "testbed"
    git(root, "clone", "-q", "--no-local", f"file://{upstream}", "testbed")
    git(testbed, "checkout", "-q", fix)  # moves HEAD past the buggy commit and back: reflog
    git(testbed, "checkout", "-q", head)
    if lib_commits:
        git(testbed, "submodule", "update", "--init", "-q")
    git(testbed, "fetch", "-q", "origin")  # FETCH_HEAD names every upstream tip
    git(testbed, "update-ref", "ORIG_HEAD", main[-1])
    git(testbed, "notes", "add", "-m", "this is where the bug was fixed", fix)
    git(testbed, "replace", main[-1], feature[-1])  # replaces a commit past HEAD only
    stashed = "src/pkg/core.py" if head_files is None else sorted(head_files)[0]
    saved = (testbed / stashed).read_bytes()
    (testbed / stashed).write_text("def answer():\n    return 'stashed fix'\n")
    stash_blob = git(testbed, "hash-object", stashed).strip()
    git(testbed, "stash", "-q")
    (testbed / stashed).write_bytes(saved)  # git stash rewrote it: same bytes, mode as before
    stash = git(testbed, "rev-parse", "refs/stash").strip()
    stash_parents = git(testbed, "rev-list", "--no-walk", "--parents", stash).split()[1:]
    later = main[head_index + 1 :] + feature + [stash, *stash_parents[1:]]
    later.append(git(testbed, "rev-parse", "refs/notes/commits").strip())

    staged_blob = ""
    if dirty:  # the install script's traces: edited, deleted, new and staged files
        (testbed / "src/pkg/core.py").write_text("def answer():\n    return 'patched'\n")
        (testbed / "pyproject.toml").unlink()
        (testbed / "build").mkdir()
        (testbed / "build/ext.so").write_bytes(b"\x7fELF built in place")
        (testbed / ".venv/bin").mkdir(parents=True)
        (testbed / ".venv/bin/python").symlink_to("/usr/bin/python3")
        (testbed / "STAGED.txt").write_text("staged by the install script\n")
        git(testbed, "add", "STAGED.txt")
        staged_blob = git(testbed, "rev-parse", ":STAGED.txt").strip()

    return LeakyRepo(
        path=testbed,
        upstream=upstream,
        head=head,
        fix=fix,
        later_commits=later,
        old_tags=old_tags,
        new_tags=new_tags,
        submodule_head=lib_commits[2] if lib_commits else "",
        submodule_later=lib_commits[3:],
        stash_blob=stash_blob,
        staged_blob=staged_blob,
    )


def add_leaky_git(repo_dir: Path, history: History) -> None:
    """Give a folder of files the ``.git`` of a leaky clone whose HEAD holds exactly them.

    Fixture images copy such a folder to /testbed, as R2E-Gym's clone step does. With a
    submodule, its checkout (``vendor/lib``) and ``.gitmodules`` are added too.
    """
    head_files = {
        path.relative_to(repo_dir).as_posix(): (path.read_bytes(), path.stat().st_mode & 0o777)
        for path in sorted(repo_dir.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }
    with tempfile.TemporaryDirectory(prefix="asynccache-leaky-") as tmp:
        repo = build_leaky_repo(Path(tmp), history, head_files=head_files, dirty=False)
        shutil.copytree(repo.path / ".git", repo_dir / ".git", symlinks=True)
        if history.submodule:
            shutil.copy2(repo.path / ".gitmodules", repo_dir / ".gitmodules")
            shutil.copytree(repo.path / "vendor/lib", repo_dir / "vendor/lib", symlinks=True)


def copy_repo(repo: Path, dest: Path) -> Path:
    """Copy a repository folder's content into ``dest`` (made if missing), hard links, modes and
    symlinks kept."""
    dest.mkdir(parents=True, exist_ok=True)
    subprocess.run(["cp", "-a", f"{repo}/.", str(dest)], check=True)
    return dest
