"""Real git history for the benchmark images, made with the git CLI.

R2E-Gym images are ``git clone <upstream> testbed`` followed by ``git checkout <buggy commit>``:
their ``/testbed/.git`` holds the whole upstream history, the fix and everything after it
(``refs/remotes/origin/*``, tags, branches, reflogs). This module makes such a ``.git``:

* :func:`make_upstream` writes an upstream repository with ``git fast-import``: a ``main``
  branch of ``History.commits`` commits that edit a few lines of a few source files each (and now
  and then add or delete a file, or replace a binary data file), annotated release tags along it,
  a maintenance branch and feature branches, with fixed dates, so that the same history always
  has the same commit ids; then one ``git repack -a -d -f`` (one thread, so the pack is the same
  every time);
* :func:`clone_at` clones it as a network clone would (``--no-local``: one pack, origin remote,
  ``refs/remotes/origin/*``, reflogs), fetches (``FETCH_HEAD``), checks out a commit of ``main``
  detached, leaves a stash and points the remote at a public-looking URL.

Every git call runs with a private ``HOME``, no system config and fixed identities and dates.
"""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Seconds since the epoch of the first upstream commit; one hour between commits.
EPOCH = 1_500_000_000
IDENTITY = ("Bench Developer", "dev@bench.invalid")


@dataclass(frozen=True)
class History:
    """The shape of an upstream history."""

    #: commits on main
    commits: int = 900
    #: annotated tag every this many commits of main
    tag_every: int = 40
    #: source files each commit edits
    edits: int = 3
    #: binary data files in the tree (tests' fixtures), and how often one is replaced
    data_files: int = 10
    data_bytes: int = 160 * 1024
    data_every: int = 30
    #: the maintenance branch forks here (a fraction of main) and gets this many commits
    maintenance_at: float = 0.55
    maintenance_commits: int = 30
    #: feature branches: (fork point as a fraction of main, commits)
    features: tuple[tuple[float, int], ...] = ((0.3, 4), (0.7, 6), (0.95, 3))


def git_env(home: Path, when: int = EPOCH) -> dict[str, str]:
    """An environment in which git reads no user or system config and stamps fixed dates."""
    stamp = f"@{when} +0000"
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_AUTHOR_NAME": IDENTITY[0],
        "GIT_AUTHOR_EMAIL": IDENTITY[1],
        "GIT_COMMITTER_NAME": IDENTITY[0],
        "GIT_COMMITTER_EMAIL": IDENTITY[1],
        "GIT_AUTHOR_DATE": stamp,
        "GIT_COMMITTER_DATE": stamp,
        "LC_ALL": "C",
    }


def git(
    repo: Path, *args: str, env: dict[str, str], stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run git in repo (raises CalledProcessError with git's message on failure)."""
    try:
        return subprocess.run(
            ["git", "-C", str(repo), *args],
            input=stdin,
            capture_output=True,
            env=env,
            check=True,
            timeout=600,
        )
    except subprocess.CalledProcessError as exc:
        message = exc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"git {' '.join(args[:2])} failed: {' | '.join(message)}") from exc


def _data(tag: str, size: int) -> bytes:
    return random.Random(tag).randbytes(size)


class _Stream:
    """A git fast-import stream under construction."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.mark = 0

    def blob(self, data: bytes) -> int:
        self.mark += 1
        self.parts.append(b"blob\nmark :%d\ndata %d\n%s\n" % (self.mark, len(data), data))
        return self.mark

    def commit(
        self,
        ref: str,
        when: int,
        message: str,
        parent: int | None,
        changes: Sequence[tuple[str, str, int | None]],
    ) -> int:
        """changes: (path, mode, blob mark) to set, or (path, "D", None) to delete."""
        self.mark += 1
        who = f"{IDENTITY[0]} <{IDENTITY[1]}> {when} +0000".encode()
        text = message.encode()
        lines = [
            b"commit %s\nmark :%d\nauthor %s\ncommitter %s\ndata %d\n%s"
            % (ref.encode(), self.mark, who, who, len(text), text)
        ]
        if parent is not None:
            lines.append(b"from :%d" % parent)
        for path, mode, blob in changes:
            if mode == "D":
                lines.append(b"D %s" % path.encode())
            else:
                lines.append(b"M %s :%d %s" % (mode.encode(), blob, path.encode()))
        self.parts.append(b"\n".join(lines) + b"\n\n")
        return self.mark

    def tag(self, name: str, target: int, when: int) -> None:
        who = f"{IDENTITY[0]} <{IDENTITY[1]}> {when} +0000".encode()
        text = f"Release {name}\n".encode()
        self.parts.append(
            b"tag %s\nfrom :%d\ntagger %s\ndata %d\n%s\n"
            % (name.encode(), target, who, len(text), text)
        )

    def bytes(self) -> bytes:
        return b"".join(self.parts) + b"done\n"


def _edit(rng: random.Random, text: bytes, pool: Sequence[str]) -> bytes:
    """A small edit of a source file: a few lines replaced, inserted or removed."""
    lines = text.decode().split("\n")
    for _ in range(rng.randint(1, 6)):
        at = rng.randrange(len(lines))
        action = rng.randrange(3)
        if action == 0:
            lines[at] = rng.choice(pool)
        elif action == 1:
            lines.insert(at, rng.choice(pool))
        elif len(lines) > 3:
            del lines[at]
    return "\n".join(lines).encode()


def make_upstream(
    dest: Path,
    name: str,
    files: dict[str, bytes],
    history: History,
    pool: Sequence[str],
    new_file: Callable[[random.Random, str], bytes],
) -> list[str]:
    """Create the bare upstream repository at dest; return main's commit ids, oldest first.

    ``files`` is the initial tree (path -> content; ``*.sh`` files are executable); each
    later commit edits ``history.edits`` of its ``.py`` files, every 9th adds a file (made by
    ``new_file``), every 13th deletes one, every ``data_every``-th replaces a data file.
    """
    home = dest.parent / f".{dest.name}-home"
    home.mkdir(parents=True, exist_ok=True)
    env = git_env(home)
    dest.mkdir(parents=True)
    git(dest, "init", "-q", "--bare", "--initial-branch=main", env=env)
    git(dest, "config", "pack.threads", "1", env=env)
    rng = random.Random(f"{name}/history")
    stream = _Stream()
    tree = dict(files)
    for i in range(history.data_files):
        tree[f"{name}/tests/data/sample_{i}.bin"] = _data(f"{name}/data/{i}/0", history.data_bytes)

    def mode(path: str) -> str:
        return "100755" if path.endswith(".sh") else "100644"

    initial = [(path, mode(path), stream.blob(data)) for path, data in sorted(tree.items())]
    main_marks = [stream.commit("refs/heads/main", EPOCH, "Initial import\n", None, initial)]
    for number in range(1, history.commits):
        sources = sorted(path for path in tree if path.endswith(".py"))
        changes: list[tuple[str, str, int | None]] = []
        for path in rng.sample(sources, min(history.edits, len(sources))):
            tree[path] = _edit(rng, tree[path], pool)
            changes.append((path, mode(path), stream.blob(tree[path])))
        if number % 9 == 0:
            folder = os.path.dirname(rng.choice(sources))
            path = f"{folder}/added_{number}.py"
            tree[path] = new_file(rng, path)
            changes.append((path, mode(path), stream.blob(tree[path])))
        if number % 13 == 0:
            edited = {change[0] for change in changes}
            path = rng.choice([p for p in sources if p not in edited])
            del tree[path]
            changes.append((path, "D", None))
        if number % history.data_every == 0:
            path = f"{name}/tests/data/sample_{rng.randrange(history.data_files)}.bin"
            tree[path] = _data(f"{path}/{number}", history.data_bytes)
            changes.append((path, mode(path), stream.blob(tree[path])))
        message = f"Change {number}: {changes[0][0]}\n"
        main_marks.append(
            stream.commit(
                "refs/heads/main", EPOCH + number * 3600, message, main_marks[-1], changes
            )
        )
        if number % history.tag_every == 0:
            stream.tag(f"v0.{number // history.tag_every}.0", main_marks[-1], EPOCH + number * 3600)
    side = [("maintenance/0.x", history.maintenance_at, history.maintenance_commits)]
    side += [(f"feature/topic-{i}", at, n) for i, (at, n) in enumerate(history.features)]
    for branch, at, count in side:
        fork = min(history.commits - 1, int(history.commits * at))
        parent = main_marks[fork]
        for number in range(count):
            path = f"{name}/{branch.replace('/', '_')}_{number}.py"
            blob = stream.blob(new_file(rng, path))
            when = EPOCH + fork * 3600 + (number + 1) * 60
            parent = stream.commit(
                f"refs/heads/{branch}", when, f"{branch}: step {number}\n", parent,
                [(path, "100644", blob)],
            )  # fmt: skip
    marks = dest.parent / f".{dest.name}-marks"
    git(dest, "fast-import", "--quiet", f"--export-marks={marks}", env=env, stdin=stream.bytes())
    ids = dict(line.split(" ", 1) for line in marks.read_text().splitlines())
    marks.unlink()
    git(dest, "repack", "-a", "-d", "-f", "-q", "--threads=1", env=env)
    return [ids[f":{mark}"] for mark in main_marks]


def clone_at(upstream: Path, dest: Path, commit: str, url: str, when: int) -> None:
    """Clone upstream into dest as R2E images are made, then check out commit (detached).

    Leaves what a real image's clone has: one pack, ``refs/remotes/origin/*``, tags, local
    ``main`` at the tip, reflogs, ``FETCH_HEAD`` from a fetch, a stash, and the remote's URL.
    """
    home = dest.parent / f".{dest.name}-home"
    home.mkdir(parents=True, exist_ok=True)
    env = git_env(home, when)
    subprocess.run(
        ["git", "clone", "-q", "--no-local", str(upstream), str(dest)],
        capture_output=True,
        env=env,
        check=True,
        timeout=600,
    )
    git(dest, "fetch", "-q", "--tags", "origin", env=env)
    git(dest, "checkout", "-q", "--detach", commit, env=env)
    tracked = sorted(git(dest, "ls-files", "*.py", env=env).stdout.decode().split())
    target = dest / random.Random(f"{commit}/stash").choice(tracked)
    target.write_bytes(target.read_bytes() + b"\n# local experiment\n")
    git(dest, "stash", "push", "-q", "-m", "local experiment", env=env)
    git(dest, "remote", "set-url", "origin", url, env=env)
