"""Runs git on an untrusted repository without reading its config, hooks or the host's config.

git never sees the repository's own git folder as ``GIT_DIR``: it works in a *shadow* git folder
made outside it, holding our own config and copies of the repository's refs, with
``GIT_OBJECT_DIRECTORY`` and ``GIT_INDEX_FILE`` pointing at the real objects and index. So the
image's ``config`` (``core.fsmonitor``, ``core.hooksPath``, ``include.path``, ``core.worktree``,
...), its hooks and ``info/grafts`` are never read, and no system or global config leaks in.
Every run is bounded by a deadline; its whole process group is killed past it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from asynccache.errors import GitGuardFailed

#: Options on every command line too, should anything read a config other than ours.
_SAFE_OPTIONS = (
    "--no-pager",
    "--no-replace-objects",
    "-c",
    "core.hooksPath=/dev/null",
    "-c",
    "core.fsmonitor=false",
    "-c",
    "protocol.allow=never",
)

#: The shadow folder's config: no hooks or fsmonitor, no reflogs written, no commit-graph,
#: multi-pack-index, bitmap or replace ref trusted (any could name objects the refs do not), no
#: automatic gc, one pack thread (the guard runs beside the extraction workers), and zlib's
#: fastest level for the few objects a repack must compress anew (those whose delta base is
#: gone): a fifth less CPU for packs 2% larger on the bench repositories.
_SHADOW_CONFIG = """\
[core]
\trepositoryformatversion = {version}
\tbare = true
\tlogAllRefUpdates = false
\tcommitGraph = false
\tmultiPackIndex = false
\tuseReplaceRefs = false
\tfsmonitor = false
\thooksPath = /dev/null
[gc]
\tauto = 0
[maintenance]
\tauto = false
[pack]
\tuseBitmaps = false
\tthreads = 1
\tcompression = 1
[repack]
\twriteBitmaps = false
\tuseDeltaIslands = false
{extensions}"""

#: Commands that walk the history (as long as a hostile repository makes it): started so that
#: they die with the worker that started them. The others read a few files and end at once.
_WALKING = frozenset({"for-each-ref", "merge-base", "pack-objects", "fsck"})
#: Files of a git folder that the shadow copies (HEAD and refs; the split index's shared parts).
_COPIED_FILES = ("HEAD", "packed-refs", "shallow")
#: Largest HEAD, packed-refs or shallow file copied (a large fork's packed-refs: tens of MiB).
_MAX_COPIED_BYTES = 256 << 20
#: Most entries a refs/ folder may hold.
_MAX_REF_ENTRIES = 200_000
#: Most bytes of stderr kept for an error message.
_STDERR_KEPT = 4096


def git_executable() -> str | None:
    """Path of the git binary on PATH, or None."""
    return shutil.which("git")


def dies_with_parent() -> list[str]:
    """The prefix that makes a command die (SIGKILL) when the thread that started it ends.

    git runs in a session of its own (so that a timeout can kill it and what it started), so a
    worker process killed mid-guard would leave it running, unbounded, in a work folder being
    removed; util-linux's ``setpriv --pdeathsig`` prevents that. Empty without setpriv. Only
    commands that walk the history get it (``_WALKING``): it costs an exec each.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


class ShadowGit:
    """A shadow git folder for one repository's git folder, and a bounded git runner in it."""

    def __init__(self, gitdir: Path, where: str, scratch: Path | None, deadline: float) -> None:
        git = git_executable()
        if git is None:
            raise GitGuardFailed(where, "git is not installed")
        self.gitdir = gitdir
        self.where = where
        self._git = git
        self._prefix = dies_with_parent()
        self._deadline = deadline
        self._root = Path(tempfile.mkdtemp(prefix=".git-guard-", dir=scratch))
        try:
            self.shadow = self._root / "git"
            for folder in ("objects", "refs"):
                (self.shadow / folder).mkdir(parents=True)
            index = gitdir / "index"
            self._env = {
                "PATH": os.environ.get("PATH", os.defpath),
                "HOME": str(self._root),
                "XDG_CONFIG_HOME": str(self._root),
                "LC_ALL": "C",
                "LANG": "C",
                "GIT_DIR": str(self.shadow),
                "GIT_OBJECT_DIRECTORY": str(gitdir / "objects"),
                "GIT_INDEX_FILE": str(index if index.is_file() else self._root / "no-index"),
                "GIT_CONFIG_NOSYSTEM": "1",
                "GIT_CONFIG_SYSTEM": os.devnull,
                "GIT_CONFIG_GLOBAL": os.devnull,
                "GIT_NO_REPLACE_OBJECTS": "1",
                "GIT_TERMINAL_PROMPT": "0",
                "GIT_OPTIONAL_LOCKS": "0",
                "GIT_PAGER": "cat",
                "PAGER": "cat",
                "GIT_ATTR_NOSYSTEM": "1",
            }
            # A first config lets `git config --file` read the image's config as data.
            self._write_config("0", {})
            #: The image's config as read: every key in order, and the last value of each.
            self.config_keys_read, self.config = self.list_config(gitdir / "config")
            self._write_config(
                self.config.get("core.repositoryformatversion", "0"),
                {
                    key.removeprefix("extensions."): value
                    for key, value in self.config.items()
                    if key == "extensions.objectformat"
                },
            )
            self._copy_refs()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove the shadow folder."""
        shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> ShadowGit:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def fail(self, detail: str) -> GitGuardFailed:
        """The error for this git folder."""
        return GitGuardFailed(self.where, detail)

    def run(
        self,
        *args: str,
        stdin: bytes = b"",
        check: bool = True,
        stdout_to: Path | None = None,
    ) -> tuple[int, str]:
        """Run ``git args`` in the shadow; return (exit code, stdout). Fails past the deadline."""
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise self.fail(f"timed out before `git {args[0]}`")
        with contextlib.ExitStack() as stack:
            out = stack.enter_context(open(stdout_to, "wb")) if stdout_to else subprocess.PIPE
            prefix = self._prefix if args[0] in _WALKING else []
            proc = subprocess.Popen(
                [*prefix, self._git, *_SAFE_OPTIONS, *args],
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.PIPE,
                cwd=self._root,
                env=self._env,
                start_new_session=True,
            )
            try:
                stdout, stderr = proc.communicate(stdin, timeout=remaining)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                raise self.fail(f"`git {args[0]}` timed out") from None
            except BaseException:
                _kill_group(proc)
                raise
        text = (stdout or b"").decode("utf-8", "surrogateescape")
        if check and proc.returncode != 0:
            raise self.fail(f"`git {args[0]}` failed: {_last_line(stderr)}")
        return proc.returncode, text

    def list_config(self, path: Path) -> tuple[list[str], dict[str, str]]:
        """A config file's keys in order and the last value of each (includes not followed)."""
        if not path.exists():
            return [], {}
        if path.stat().st_size > _MAX_COPIED_BYTES:
            raise self.fail("config is too large")
        _, out = self.run("config", "--file", str(path), "--no-includes", "--null", "--list")
        keys: list[str] = []
        entries: dict[str, str] = {}
        for record in out.split("\0"):
            if record:
                key, _, value = record.partition("\n")
                keys.append(key)
                entries[key] = value
        return keys, entries

    def config_keys(self, path: Path) -> list[str]:
        """Every key of a config file, in order, includes not followed."""
        _, out = self.run("config", "--file", str(path), "--no-includes", "--null", "--list")
        return [record.partition("\n")[0] for record in out.split("\0") if record]

    def _write_config(self, version: str, extensions: dict[str, str]) -> None:
        lines = "".join(f"\t{key} = {value}\n" for key, value in extensions.items())
        text = _SHADOW_CONFIG.format(
            version=version, extensions=f"[extensions]\n{lines}" if lines else ""
        )
        (self.shadow / "config").write_text(text)

    def _copy_refs(self) -> None:
        """Copy HEAD, the refs, packed-refs, shallow and shared index parts into the shadow."""
        names = [*_COPIED_FILES, *(p.name for p in self.gitdir.glob("sharedindex.*"))]
        for name in names:
            source = self.gitdir / name
            if source.is_file():
                if source.stat().st_size > _MAX_COPIED_BYTES:
                    raise self.fail(f"{name} is too large")
                shutil.copyfile(source, self.shadow / name)
        refs = self.gitdir / "refs"
        if refs.is_dir():
            count = 0
            for folder, dirs, files in os.walk(refs):
                count += len(dirs) + len(files)
                if count > _MAX_REF_ENTRIES:
                    raise self.fail(f"more than {_MAX_REF_ENTRIES} entries under refs/")
                target = self.shadow / Path(folder).relative_to(self.gitdir)
                target.mkdir(exist_ok=True)
                for name in files:
                    shutil.copyfile(Path(folder, name), target / name)

    def reset_refs(self) -> None:
        """Drop every ref of the shadow (HEAD stays)."""
        shutil.rmtree(self.shadow / "refs")
        (self.shadow / "packed-refs").unlink(missing_ok=True)
        for folder in ("refs/heads", "refs/tags"):
            (self.shadow / folder).mkdir(parents=True)

    def install_refs(self) -> None:
        """Replace the real git folder's refs, packed-refs and shallow by the shadow's."""
        real_refs = self.gitdir / "refs"
        if real_refs.exists():
            shutil.rmtree(real_refs)
        shutil.move(self.shadow / "refs", real_refs)
        for name in ("packed-refs", "shallow"):
            (self.gitdir / name).unlink(missing_ok=True)
            if (self.shadow / name).exists():
                shutil.move(self.shadow / name, self.gitdir / name)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill a git command and the git processes it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def _last_line(stderr: bytes | None) -> str:
    text = (stderr or b"")[-_STDERR_KEPT:].decode("utf-8", "replace").strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "no message"


def find_special_files(gitdir: Path, limit: int) -> Iterator[str]:
    """Paths under a git folder that are neither plain files nor folders (symlinks, fifos, ...).

    git follows symlinks and blocks on fifos; a real repository has neither in its git folder.
    Stops with a message after ``limit`` entries.
    """
    seen = 0
    stack = [gitdir]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                seen += 1
                if seen > limit:
                    yield f"more than {limit} files under .git"
                    return
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif not entry.is_file(follow_symlinks=False):
                    kind = "a symlink" if entry.is_symlink() else "not a regular file"
                    yield f"{Path(entry.path).relative_to(gitdir.parent)} is {kind}"


def sections(keys: Sequence[str], section: str) -> list[str | None]:
    """The distinct subsections of ``section`` in config keys (None for the bare section)."""
    found: list[str | None] = []
    for key in keys:
        head, _, rest = key.partition(".")
        if head != section:
            continue
        sub = rest.rpartition(".")[0] or None
        if sub not in found:
            found.append(sub)
    return found
