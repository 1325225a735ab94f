"""The solution-leak guard: a repository keeps HEAD with its whole history, and nothing past it.

An R2E-Gym image is ``git clone <upstream>`` then ``git checkout <buggy commit>``, tagged with the
fix: its ``.git`` still reaches the fix through branches, tags, remote refs, reflogs and the
objects they hold. ``guard_tree`` keeps HEAD (detached or on a branch) and every commit, tree and
blob reachable from it or from the index, keeps only the branches and tags at HEAD or one of its
ancestors, removes remotes, reflogs, stashes, notes, replace refs, ``FETCH_HEAD`` and the like,
and repacks (reusing the packs' deltas) so that no other object is left. The working tree and the
index are never touched. ``git_check.check_tree`` tells what of that does not hold in a tree.

git runs in a shadow git folder (``safe_git``): nothing the image's repository names is run.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from asynccache.errors import DiskFull, GitGuardFailed
from asynccache.tree.safe_git import ShadowGit, find_special_files, git_executable, sections

__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_GIT_FILES",
    "OBJECT_ID",
    "OBJECT_SIDECARS",
    "STALE_FILES",
    "STATE_FOLDERS",
    "GuardResult",
    "commits_present",
    "git_dirs",
    "git_executable",
    "guard_tree",
    "head_of",
    "is_ancestor",
    "is_pseudo_ref",
    "shallow_lines",
]

#: Seconds the guard may take for one tree, submodules included.
DEFAULT_TIMEOUT = 600.0
#: Most files a tree's .git may hold (loose objects of a never-packed repository included).
MAX_GIT_FILES = 2_000_000

#: Any all-capitals file at the top of a git folder is read by git as a ref (FETCH_HEAD, ORIG_HEAD,
#: MERGE_HEAD, CHERRY_PICK_HEAD, AUTO_MERGE, BISECT_*, ...) or holds a message (MERGE_MSG, ...).
_PSEUDO_REF = re.compile(r"[A-Z][A-Z_]*")
#: Folders that hold reflogs, other worktrees' HEADs and indexes, interrupted operations, or
#: recorded conflict resolutions: each can name or hold content past HEAD.
STATE_FOLDERS = ("logs", "worktrees", "rebase-merge", "rebase-apply", "sequencer", "rr-cache")
#: Files that add history or objects from elsewhere, or list refs and packs as they were.
STALE_FILES = ("info/grafts", "info/refs", "objects/info/packs")
#: Object-folder files that git would trust for reachability or lookups (a commit-graph can give a
#: commit parents it does not have, a bitmap objects a commit does not reach, alternates objects
#: from outside the tree) or that keep packs from being rewritten (.keep).
OBJECT_SIDECARS = (
    "info/alternates",
    "info/http-alternates",
    "info/commit-graph",
    "info/commit-graphs",
    "pack/multi-pack-index",
)
_PACK_SIDECARS = (".keep", ".bitmap", ".rev", ".promisor", ".mtimes")
#: Repository extensions the guard can work with; any other fails the repository.
_KNOWN_EXTENSIONS = {"objectformat", "worktreeconfig", "preciousobjects", "noop"}
#: Upstream keys of a kept branch's config section.
_UPSTREAM_KEYS = ("remote", "merge", "pushremote")
#: How much of the end of logs/HEAD is read to find the last checkout.
_REFLOG_TAIL = 4 << 20
_CHECKOUT = b"checkout: moving from "
#: An object name (sha1 or sha256), in full.
OBJECT_ID = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
#: What a ref name may hold (see git-check-ref-format); the rest is checked in _is_ref_name.
_REF_NAME = re.compile(r"refs/[^\x00-\x20\x7f~^:?*\[\\]+(?<![/.])")


@dataclass(frozen=True)
class GuardResult:
    """What the guard did to one tree."""

    repositories: int = 0
    refs_kept: int = 0


@dataclass(frozen=True)
class _Checkout:
    """The last "checkout: moving from" entry of HEAD's reflog (git status reads it)."""

    new: str
    rest: bytes  # identity, time, zone, tab and message, as written


def guard_tree(
    tree: Path, *, timeout: float = DEFAULT_TIMEOUT, scratch: Path | None = None
) -> GuardResult:
    """Remove every ref, reflog and object past HEAD from ``tree/.git`` and its submodules.

    A tree without ``.git`` is left as it is. ``scratch`` (default: the tree's parent) holds a
    temporary folder per repository. On failure (``GitGuardFailed``, ``DiskFull``) the tree's
    ``.git`` is half done and the tree must be discarded.
    """
    dotgit = tree / ".git"
    if not dotgit.exists() and not dotgit.is_symlink():
        return GuardResult()
    if dotgit.is_symlink() or not dotgit.is_dir():
        raise GitGuardFailed(".git", "it is not a folder")
    for problem in find_special_files(dotgit, MAX_GIT_FILES):
        raise GitGuardFailed(".git", problem)
    deadline = time.monotonic() + timeout
    scratch = tree.parent if scratch is None else scratch
    kept = 0
    gitdirs = git_dirs(dotgit)
    for gitdir in gitdirs:
        where = str(gitdir.relative_to(tree))
        try:
            with ShadowGit(gitdir, where, scratch, deadline) as git:
                kept += _guard_git_dir(git)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise DiskFull(f"no space left while cleaning {where}: {exc.strerror}") from exc
            raise GitGuardFailed(where, _os_error_detail(exc, tree)) from exc
    return GuardResult(len(gitdirs), kept)


def _os_error_detail(exc: OSError, tree: Path) -> str:
    """An OSError in words, with the path it met inside the tree when it names one."""
    detail = exc.strerror or str(exc)
    if isinstance(exc.filename, str) and exc.filename.startswith(f"{tree}/"):
        detail += f" ({exc.filename.removeprefix(f'{tree}/')})"
    return detail


def git_dirs(dotgit: Path) -> list[Path]:
    """The tree's git folder, then every submodule's under ``modules/`` (nested ones too)."""
    found = [dotgit]
    pending = [dotgit / "modules"]
    while pending:
        folder = pending.pop()
        if not folder.is_dir():
            continue
        for child in sorted(folder.iterdir()):
            if not child.is_dir():
                continue
            if (child / "HEAD").is_file() and (child / "objects").is_dir():
                found.append(child)
                pending.append(child / "modules")
            else:  # a submodule's name may hold slashes: modules/libs/foo
                pending.append(child)
    return found


def _guard_git_dir(git: ShadowGit) -> int:
    """Clean one git folder; return how many refs it keeps."""
    gitdir = git.gitdir
    extensions = {k.removeprefix("extensions.") for k in git.config if k.startswith("extensions.")}
    unknown = sorted(extensions - _KNOWN_EXTENSIONS)
    if unknown:
        raise git.fail(f"unsupported repository extension {unknown[0]}")
    _remove_object_sidecars(gitdir)

    head, branch = head_of(git)
    checkout = _last_checkout(gitdir / "logs" / "HEAD") if head and branch is None else None
    abbrev_before = _abbrev(git, head, checkout)
    kept: list[_KeptRef] = []
    if head:
        listing = git.run(
            "for-each-ref", "--merged=HEAD",
            "--format=%(objectname) %(refname) %(*objectname) %(*objecttype)",
            "refs/heads", "refs/tags",
        )[1]  # fmt: skip
        fields = (line.split(" ") for line in listing.splitlines())
        kept = [_KeptRef(oid, name, peeled, kind) for oid, name, peeled, kind in fields]
        if branch and branch not in {ref.name for ref in kept}:
            kept.append(_KeptRef(head, branch, "", ""))  # HEAD's own branch, wherever it lives
    if checkout and checkout.new != head and not is_ancestor(git, checkout.new):
        checkout = _Checkout(head or checkout.new, checkout.rest)  # never keep a later commit

    git.reset_refs()
    _pack_refs(git, kept)
    _repack(git)
    _remove_unpacked(gitdir / "objects")
    _prune_shallow(git)
    # asked while the shadow still holds its refs (install_refs moves them into the real folder,
    # after which the shadow is no repository git would open)
    abbrev_after = _abbrev(git, head, checkout)
    pin = abbrev_before if abbrev_after < abbrev_before else 0

    _remove_state(gitdir)
    git.install_refs()
    if checkout and head:
        (gitdir / "logs").mkdir()
        (gitdir / "logs" / "HEAD").write_bytes(
            b"0" * len(head) + f" {checkout.new} ".encode() + checkout.rest + b"\n"
        )
    _clean_config(git, {ref.name.removeprefix("refs/heads/") for ref in kept}, pin)
    return len(kept)


@dataclass(frozen=True)
class _KeptRef:
    """A ref the guard keeps: its object, its name, and what a tag object peels to (one level:
    the object and its type)."""

    oid: str
    name: str
    peeled: str
    peeled_type: str


def _pack_refs(git: ShadowGit, kept: list[_KeptRef]) -> None:
    """Make the kept refs the shadow's packed-refs, as `git pack-refs --all` would.

    Written here rather than by ``update-ref`` then ``pack-refs`` (two git processes less a
    repository), except when a tag peels to another tag: git peels those to the end itself.
    Every name came from git's own listing; one that git would not write fails.
    """
    if any(ref.peeled_type == "tag" for ref in kept):
        commands = "".join(f"create {ref.name} {ref.oid}\n" for ref in kept)
        git.run("update-ref", "--stdin", stdin=os.fsencode(commands))
        git.run("pack-refs", "--all", "--prune")
        return
    lines = [b"# pack-refs with: peeled fully-peeled sorted \n"]
    for ref in sorted(kept, key=lambda ref: os.fsencode(ref.name)):
        if not _is_ref_name(ref.name) or not OBJECT_ID.fullmatch(ref.oid):
            raise git.fail(f"cannot keep the ref {ref.name!r}")
        lines.append(os.fsencode(f"{ref.oid} {ref.name}\n"))
        if ref.peeled:
            if not OBJECT_ID.fullmatch(ref.peeled):
                raise git.fail(f"cannot keep the ref {ref.name!r}")
            lines.append(f"^{ref.peeled}\n".encode())
    (git.shadow / "packed-refs").write_bytes(b"".join(lines))


def _is_ref_name(name: str) -> bool:
    """A full ref name that `git check-ref-format` accepts (refs/..., no odd component)."""
    if not _REF_NAME.fullmatch(name) or ".." in name or "@{" in name or "//" in name:
        return False
    return not any(part.startswith(".") or part.endswith(".lock") for part in name.split("/"))


def _repack(git: ShadowGit) -> None:
    """Make one pack of what HEAD, the kept refs and the index reach the only file of
    ``objects/pack``.

    What ``git repack -a -d`` does, run as its ``pack-objects`` directly, so that the process
    that walks the history is the one that dies with the worker (a repack's pack-objects would
    not). Every other file of the folder goes, a pack without its index too: git never reads
    one, but ``git index-pack`` would give its objects back.
    """
    pack = git.gitdir / "objects" / "pack"
    pack.mkdir(exist_ok=True)
    # The options repack gives pack-objects for -a; deltas and compressed data are reused.
    # --window=0: no new delta search. An object whose delta base is gone is stored whole
    # (a few percent more pack on the bench repositories) instead of searched against its
    # neighbours, which was 40% of the guard's CPU and grows with what a hostile pack holds.
    _, out = git.run(
        "pack-objects", "--keep-true-parents", "--non-empty", "--all", "--reflog",
        "--indexed-objects", "--delta-base-offset", "--window=0", "-q", str(pack / "pack"),
    )  # fmt: skip
    name = out.strip()  # nothing when nothing is reachable (--non-empty)
    if name and not OBJECT_ID.fullmatch(name):
        raise git.fail("git pack-objects named no pack")
    kept = {f"pack-{name}.pack", f"pack-{name}.idx", f"pack-{name}.rev"} if name else set()
    for path in pack.iterdir():
        if path.name not in kept:
            _remove(path)


def _remove_unpacked(objects: Path) -> None:
    """Leave in ``objects`` only the pack ``_repack`` wrote: loose objects, git's temporary
    files, ``info/`` files and anything else go.

    That pack holds every object HEAD, the kept refs and the index reach, so what is still
    loose nothing needs; this is what ``git prune-packed`` and ``git prune`` would remove,
    without prune's second walk of the whole history. Any other file there (a copy of the old
    pack under another name, say) could give objects back through ``git index-pack``.
    """
    for path in objects.iterdir():
        if path.name == "pack":
            continue
        if path.name == "info" and path.is_dir():
            for inner in path.iterdir():
                _remove(inner)
            continue
        _remove(path)


def _prune_shallow(git: ShadowGit) -> None:
    """Keep in ``shallow`` only the commits the repository still has, as ``git repack -a -d``
    does after packing: a shallow clone of every branch lists each branch's tip there."""
    shallow = git.shadow / "shallow"
    if not shallow.is_file():
        return
    listed = shallow_lines(shallow)
    present = commits_present(git, listed)
    kept = [oid for oid in dict.fromkeys(listed) if oid in present]
    if kept:
        shallow.write_text("".join(f"{oid}\n" for oid in kept))
    else:
        shallow.unlink()


def shallow_lines(shallow: Path) -> list[str]:
    """The words of a ``shallow`` file, as written (each should be a commit's name)."""
    return shallow.read_bytes().decode("ascii", "replace").split()


def commits_present(git: ShadowGit, names: list[str]) -> set[str]:
    """Which of ``names`` are commits of the repository; anything but a full object name is
    none (never handed to git, which would read it as a revision expression)."""
    oids = [name for name in names if OBJECT_ID.fullmatch(name)]
    if not oids:
        return set()
    _, out = git.run(
        "cat-file", "--batch-check=%(objectname) %(objecttype)",
        stdin="".join(f"{oid}\n" for oid in oids).encode(),
    )  # fmt: skip
    return {line.split(" ")[0] for line in out.splitlines() if line.endswith(" commit")}


def head_of(git: ShadowGit) -> tuple[str | None, str | None]:
    """(HEAD's commit or None when unborn, its branch ref or None when detached)."""
    code, symref = git.run("symbolic-ref", "-q", "HEAD", check=False)
    branch = symref.strip() if code == 0 else None
    code, out = git.run("rev-parse", "--verify", "-q", "HEAD^{commit}", check=False)
    head = out.strip() if code == 0 else None
    if head is None and branch is None:
        raise git.fail("HEAD does not name a commit of the repository")
    return head, branch


def is_ancestor(git: ShadowGit, oid: str) -> bool:
    code, _ = git.run("merge-base", "--is-ancestor", oid, "HEAD", check=False)
    return code == 0


def _last_checkout(reflog: Path) -> _Checkout | None:
    """The last "checkout: moving from" entry of HEAD's reflog, which `git status` shows."""
    if not reflog.is_file():
        return None
    with open(reflog, "rb") as handle:
        size = handle.seek(0, 2)
        handle.seek(max(0, size - _REFLOG_TAIL))
        lines = handle.read().splitlines()
    for line in reversed(lines):
        parts = line.split(b" ", 2)
        if len(parts) < 3 or not parts[2].partition(b"\t")[2].startswith(_CHECKOUT):
            continue
        new = parts[1].decode("ascii", "replace")
        if OBJECT_ID.fullmatch(new):
            return _Checkout(new, parts[2])
    return None


def _abbrev(git: ShadowGit, head: str | None, checkout: _Checkout | None) -> int:
    """How many hex digits git shows for HEAD (and the last checkout) now: it grows with the
    number of objects, so the guard pins it when removing objects would shorten what
    `git status` and `git log --oneline` print."""
    longest = 0
    for oid in {oid for oid in (head, checkout.new if checkout else None) if oid}:
        code, out = git.run("rev-parse", "--short", oid, check=False)  # one name a call
        longest = max(longest, len(out.strip()) if code == 0 else 0)
    return longest


def _remove_object_sidecars(gitdir: Path) -> None:
    objects = gitdir / "objects"
    for name in OBJECT_SIDECARS:
        _remove(objects / name)
    pack = objects / "pack"
    if pack.is_dir():
        for path in pack.iterdir():
            if path.suffix in _PACK_SIDECARS or path.name.startswith("multi-pack-index"):
                _remove(path)


def is_pseudo_ref(path: Path) -> bool:
    return path.is_file() and path.name != "HEAD" and bool(_PSEUDO_REF.fullmatch(path.name))


def _remove_state(gitdir: Path) -> None:
    for path in gitdir.iterdir():
        if is_pseudo_ref(path):
            path.unlink()
    for name in (*STATE_FOLDERS, *STALE_FILES):
        _remove(gitdir / name)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _clean_config(git: ShadowGit, kept_branches: set[str], abbrev: int) -> None:
    """Remove remotes, the sections of dropped branches and the upstreams of kept ones; pin
    ``core.abbrev`` to ``abbrev`` (when not 0 and the image does not set it)."""
    path = git.gitdir / "config"
    if not path.exists():
        return
    keys = git.config_keys_read  # the file as the shadow read it: nothing wrote it since
    for remote in sections(keys, "remote"):
        git.run("config", "--file", str(path), "--remove-section", _section("remote", remote))
    for branch in sections(keys, "branch"):
        name = _section("branch", branch)
        if branch not in kept_branches:
            git.run("config", "--file", str(path), "--remove-section", name)
            continue
        for key in _UPSTREAM_KEYS:
            if f"{name}.{key}".lower() in (k.lower() for k in keys):
                git.run("config", "--file", str(path), "--unset-all", f"{name}.{key}")
    if abbrev and "core.abbrev" not in git.config:
        git.run("config", "--file", str(path), "core.abbrev", str(abbrev))
    if sections(git.config_keys(path), "remote"):
        raise git.fail("a remote could not be removed from config")


def _section(section: str, sub: str | None) -> str:
    return section if sub is None else f"{section}.{sub}"
