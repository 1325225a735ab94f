"""What in a tree's ``.git`` still reaches past HEAD: the leak guard's work, checked afterwards.

``check_tree`` reads a repository (and its submodules) the way ``git_guard`` leaves it and names
every ref, reflog, state file, remote or object that an agent could reach past HEAD with.
git runs in a shadow git folder (``safe_git``): nothing the image's repository names is run.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from asynccache.errors import GitGuardFailed
from asynccache.tree.git_guard import (
    DEFAULT_TIMEOUT,
    MAX_GIT_FILES,
    OBJECT_ID,
    OBJECT_SIDECARS,
    STALE_FILES,
    STATE_FOLDERS,
    commits_present,
    git_dirs,
    head_of,
    is_ancestor,
    is_pseudo_ref,
    shallow_lines,
)
from asynccache.tree.safe_git import ShadowGit, find_special_files, sections

__all__ = ["check_tree"]

#: A pack's base name, and the files of a pack git reads (reverse index included).
_PACK_NAME = re.compile(r"pack-(?:[0-9a-f]{40}|[0-9a-f]{64})")
_PACK_FILES = {"pack", "idx", "rev"}
#: A loose objects' folder: the first two hex digits of their names.
_FANOUT = re.compile(r"[0-9a-f]{2}")


def check_tree(
    tree: Path, *, timeout: float = DEFAULT_TIMEOUT, scratch: Path | None = None
) -> list[str]:
    """What in ``tree/.git`` (and its submodules) reaches past HEAD; empty when nothing does.

    Reads the tree only; ``scratch`` (default: the system's temporary folder) holds the shadow.
    """
    dotgit = tree / ".git"
    if not dotgit.exists() and not dotgit.is_symlink():
        return []
    if dotgit.is_symlink() or not dotgit.is_dir():
        return [".git is not a folder"]
    special = list(find_special_files(dotgit, MAX_GIT_FILES))
    if special:
        return special[:5]
    deadline = time.monotonic() + timeout
    problems: list[str] = []
    for gitdir in git_dirs(dotgit):
        where = str(gitdir.relative_to(tree))
        try:
            with ShadowGit(gitdir, where, scratch, deadline) as git:
                problems += [f"{where}: {problem}" for problem in _check_git_dir(git)]
        except GitGuardFailed as exc:
            problems.append(f"{where}: {exc.detail}")
        except OSError as exc:
            problems.append(f"{where}: {exc.strerror or exc}")
    return problems


def _check_git_dir(git: ShadowGit) -> list[str]:
    """What in one git folder reaches past HEAD."""
    gitdir = git.gitdir
    problems = [f"{name} is present" for name in _leftovers(gitdir)]
    remotes = sections(list(git.config), "remote")
    problems += [f"remote {name or '(default)'} is configured" for name in remotes]
    head, _ = head_of(git)
    every_ref = git.run("for-each-ref", "--format=%(refname)")[1].split()
    merged: set[str] = set()
    if head:
        listing = git.run(
            "for-each-ref", "--merged=HEAD", "--format=%(refname)", "refs/heads", "refs/tags"
        )[1]
        merged = set(listing.split())
    past = [ref for ref in every_ref if ref not in merged]
    if past:
        shown = ", ".join(past[:3]) + (f" and {len(past) - 3} more" if len(past) > 3 else "")
        problems.append(f"refs not at HEAD or an ancestor of it: {shown}")
    problems += _reflog_problems(git, head)
    problems += _shallow_problems(git)
    problems += _unreachable(git)
    return problems


def _shallow_problems(git: ShadowGit) -> list[str]:
    """``shallow`` may name only commits the repository has (a clone lists every branch tip)."""
    shallow = git.gitdir / "shallow"
    if not shallow.is_file():
        return []
    listed = shallow_lines(shallow)
    if not all(OBJECT_ID.fullmatch(name) for name in listed):
        return ["shallow holds lines that are not commit names"]
    present = commits_present(git, listed)
    missing = [oid for oid in listed if oid not in present]
    if missing:
        return [f"shallow names {len(missing)} commits the repository lacks, e.g. {missing[0]}"]
    return []


def _leftovers(gitdir: Path) -> list[str]:
    """Files and folders the guard removes that are present in a git folder."""
    found = [p.name for p in sorted(gitdir.iterdir()) if is_pseudo_ref(p)]
    found += [name for name in STATE_FOLDERS if (gitdir / name).exists()]
    found += [name for name in STALE_FILES if (gitdir / name).exists()]
    found += [f"objects/{n}" for n in OBJECT_SIDECARS if (gitdir / "objects" / n).exists()]
    if "logs" in found and _only_head_reflog(gitdir):
        found.remove("logs")
    stray = _stray_object_files(gitdir / "objects") + _stray_pack_files(gitdir / "objects" / "pack")
    return found + [name for name in stray if name not in found]


def _stray_object_files(objects: Path) -> list[str]:
    """Entries of objects/ that are neither loose objects' folders, ``pack`` nor ``info``, and
    files under ``info``: git reads none of them, but one could be a pack of the history."""
    if not objects.is_dir():
        return []
    stray = []
    for path in sorted(objects.iterdir()):
        if path.name == "info" and path.is_dir():
            stray += [f"objects/info/{inner.name}" for inner in sorted(path.iterdir())]
        elif path.name != "pack" and not (_FANOUT.fullmatch(path.name) and path.is_dir()):
            stray.append(f"objects/{path.name}")
    return stray


def _stray_pack_files(pack: Path) -> list[str]:
    """Files of objects/pack that are not part of a pack git reads (a pack and its index): a
    pack without its index is invisible to git but ``git index-pack`` gives its objects back."""
    if not pack.is_dir():
        return []
    names = {path.name for path in pack.iterdir()}
    complete = {
        name.removesuffix(".idx")
        for name in names
        if name.endswith(".idx")
        and _PACK_NAME.fullmatch(name.removesuffix(".idx"))
        and name.replace(".idx", ".pack") in names
    }
    stray = []
    for name in sorted(names):
        base, _, kind = name.rpartition(".")
        if base not in complete or kind not in _PACK_FILES:
            stray.append(f"objects/pack/{name}")
    return stray


def _only_head_reflog(gitdir: Path) -> bool:
    return [p.name for p in (gitdir / "logs").iterdir()] == ["HEAD"]


def _reflog_problems(git: ShadowGit, head: str | None) -> list[str]:
    """The guard leaves at most one HEAD reflog entry, naming HEAD or an ancestor of it."""
    reflog = git.gitdir / "logs" / "HEAD"
    if not reflog.is_file():
        return []
    lines = reflog.read_bytes().splitlines()
    if len(lines) > 1:
        return [f"HEAD's reflog has {len(lines)} entries"]
    parts = lines[0].split(b" ", 2) if lines else []
    if len(parts) < 3 or parts[0].strip(b"0"):
        return ["HEAD's reflog names an earlier HEAD"]
    new = parts[1].decode("ascii", "replace")
    if new != head and not is_ancestor(git, new):
        return [f"HEAD's reflog names {new}, not HEAD or an ancestor of it"]
    return []


def _unreachable(git: ShadowGit) -> list[str]:
    """Objects that neither HEAD, the refs nor the index reach (and objects missing)."""
    report = git.shadow.parent / "fsck.txt"
    code, _ = git.run(
        "fsck", "--connectivity-only", "--unreachable", "--no-dangling", "--no-reflogs",
        "--no-progress", check=False, stdout_to=report,
    )  # fmt: skip
    count = 0
    first = ""
    with open(report, encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if line.startswith("unreachable "):
                count += 1
                first = first or line.split()[-1]
    problems = []
    if count:
        problems.append(f"{count} objects not reachable from HEAD or the index, e.g. {first}")
    if code != 0 and not count:
        problems.append("git fsck found the repository incomplete or damaged")
    return problems
