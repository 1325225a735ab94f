"""Builds repositories whose .git leaks the fix the way R2E-Gym images do, with the git CLI.

An R2E-Gym image is ``git clone <upstream> testbed`` then ``git checkout <buggy commit>``; its
install script then dirties the working tree. So ``.git`` keeps the upstream branches, tags and
remote refs past HEAD, reflogs, ``FETCH_HEAD``, and here also ``ORIG_HEAD``, a stash, notes, a
replace ref and a submodule under ``.git/modules`` whose own history goes past its HEAD.
"""

from __future__ import annotations

import os
import subprocess
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


def _commit(repo: Path, number: int, files: dict[str, str], message: str) -> str:
    for name, text in files.items():
        path = repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    env = git_env()
    stamp = f"@{_EPOCH + number * 3600} +0000"
    env.update(GIT_AUTHOR_DATE=stamp, GIT_COMMITTER_DATE=stamp)
    git(repo, "add", "-A", env=env)
    git(repo, "commit", "-q", "-m", message, env=env)
    return git(repo, "rev-parse", "HEAD").strip()


def _upstream_submodule(root: Path) -> list[str]:
    lib = root / "lib-upstream"
    lib.mkdir()
    git(lib, "init", "-q", "-b", "main")
    return [
        _commit(lib, n, {"lib.py": f"VERSION = {n}\n"}, f"lib release {n}") for n in range(1, 9)
    ]


def build_leaky_repo(root: Path, *, commits: int = 40, head_back: int = 12) -> LeakyRepo:
    """Make ``root/upstream`` and ``root/testbed``, a clone checked out ``head_back`` commits
    before the upstream tip, with every kind of leak; return what it holds."""
    root.mkdir(parents=True, exist_ok=True)
    lib_commits = _upstream_submodule(root)
    upstream = root / "upstream"
    upstream.mkdir()
    git(upstream, "init", "-q", "-b", "main")
    main: list[str] = []
    for n in range(1, commits + 1):
        files = {
            "src/pkg/core.py": f"def answer():\n    return {n}\n",
            f"src/pkg/mod{n % 7}.py": f"# module revision {n}\n",
            "pyproject.toml": f'[project]\nname = "pkg"\nversion = "0.{n}"\n',
            "README.md": f"# pkg\n\nrevision {n}\n",
        }
        main.append(_commit(upstream, n, files, f"change {n}"))
        if n == 4:  # the submodule arrives before HEAD, at an early release of the library
            git(upstream, "submodule", "add", "-q", f"file://{root / 'lib-upstream'}", "vendor/lib")
            git(upstream / "vendor/lib", "checkout", "-q", lib_commits[2])
            main[-1] = _commit(upstream, n, {}, "add vendor/lib")
        if n == commits - 3:  # ... and moves to a later release after HEAD
            git(upstream / "vendor/lib", "checkout", "-q", lib_commits[-1])
            main[-1] = _commit(upstream, n, {}, "bump vendor/lib")
    head_index = commits - 1 - head_back
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
        _commit(upstream, 100 + n, {"src/pkg/feature.py": f"X = {n}\n"}, f"feature {n}")
        for n in range(3)
    ]
    git(upstream, "checkout", "-q", "main")

    testbed = root / "testbed"
    git(root, "clone", "-q", "--no-local", f"file://{upstream}", "testbed")
    git(testbed, "checkout", "-q", fix)  # moves HEAD past the buggy commit and back: reflog
    git(testbed, "checkout", "-q", head)
    git(testbed, "submodule", "update", "--init", "-q")
    git(testbed, "fetch", "-q", "origin")  # FETCH_HEAD names every upstream tip
    git(testbed, "update-ref", "ORIG_HEAD", main[-1])
    git(testbed, "notes", "add", "-m", "this is where the bug was fixed", fix)
    git(testbed, "replace", main[-1], feature[-1])  # replaces a commit past HEAD only
    (testbed / "src/pkg/core.py").write_text("def answer():\n    return 'stashed fix'\n")
    stash_blob = git(testbed, "hash-object", "src/pkg/core.py").strip()
    git(testbed, "stash", "-q")
    stash = git(testbed, "rev-parse", "refs/stash").strip()
    stash_parents = git(testbed, "rev-list", "--no-walk", "--parents", stash).split()[1:]
    later = main[head_index + 1 :] + feature + [stash, *stash_parents[1:]]
    notes = git(testbed, "rev-parse", "refs/notes/commits").strip()
    later.append(notes)

    # The install script's traces: edited, deleted and new files, and a staged one.
    (testbed / "src/pkg/core.py").write_text("def answer():\n    return 'patched by install'\n")
    (testbed / "pyproject.toml").unlink()
    (testbed / "build").mkdir()
    (testbed / "build/ext.so").write_bytes(b"\x7fELF built in place")
    (testbed / ".venv/bin").mkdir(parents=True)
    (testbed / ".venv/bin/python").symlink_to("/usr/bin/python3")
    (testbed / "STAGED.txt").write_text("staged by the install script\n")
    git(testbed, "add", "STAGED.txt")
    staged_blob = git(testbed, "rev-parse", ":STAGED.txt").strip()

    sub_head = lib_commits[2]
    sub_later = lib_commits[3:]
    return LeakyRepo(
        path=testbed,
        upstream=upstream,
        head=head,
        fix=fix,
        later_commits=later,
        old_tags=old_tags,
        new_tags=new_tags,
        submodule_head=sub_head,
        submodule_later=sub_later,
        stash_blob=stash_blob,
        staged_blob=staged_blob,
    )
