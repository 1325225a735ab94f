"""The solution-leak guard on repositories that leak the way R2E-Gym images do, checked with git."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from asynccache.errors import GitGuardFailed
from asynccache.tree.git_check import check_tree
from asynccache.tree.git_guard import GuardResult, guard_tree
from tests.support.leaky_repo import LeakyRepo, build_leaky_repo, git, git_env

Snapshot = dict[str, tuple[str, int, str]]


def snapshot(root: Path, *, skip_git: bool = True) -> Snapshot:
    """Every path under root: kind, mode and content hash (or link target); .git left out."""
    found: Snapshot = {}
    for folder, dirs, files in os.walk(root):
        rel_folder = Path(folder).relative_to(root)
        if skip_git and rel_folder == Path("."):
            dirs[:] = [d for d in dirs if d != ".git"]
        for name in [*dirs, *files]:
            path = Path(folder, name)
            rel = str(rel_folder / name)
            st = path.lstat()
            if path.is_symlink():
                found[rel] = ("link", 0, os.readlink(path))
            elif path.is_dir():
                found[rel] = ("dir", st.st_mode, "")
            else:
                found[rel] = ("file", st.st_mode, hashlib.sha256(path.read_bytes()).hexdigest())
    return found


def copy_tree(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest, symlinks=True)
    return dest


def status(repo: Path) -> str:
    """What an agent sees: the long `git status` and the porcelain one."""
    return git(repo, "status") + git(repo, "status", "--porcelain")


def has_object(gitdir: Path, oid: str) -> bool:
    return (
        subprocess.run(
            ["git", "--git-dir", str(gitdir), "cat-file", "-e", oid],
            env=git_env(),
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> LeakyRepo:
    return build_leaky_repo(tmp_path_factory.mktemp("leaky"))


@pytest.fixture()
def leaky(built: LeakyRepo, tmp_path: Path) -> LeakyRepo:
    """A private copy of the leaky testbed."""
    return dataclasses.replace(built, path=copy_tree(built.path, tmp_path / "testbed"))


@pytest.fixture()
def guarded(leaky: LeakyRepo, tmp_path: Path) -> tuple[LeakyRepo, Path]:
    """(the guarded testbed, an untouched copy of it as the image had it)."""
    before = copy_tree(leaky.path, tmp_path / "before")
    result = guard_tree(leaky.path)
    assert result.repositories == 2
    return leaky, before


def test_head_keeps_its_whole_history(guarded: tuple[LeakyRepo, Path]) -> None:
    repo, before = guarded
    assert git(repo.path, "rev-parse", "HEAD").strip() == repo.head
    assert git(repo.path, "rev-list", "HEAD") == git(before, "rev-list", "HEAD")
    assert git(repo.path, "log", "--stat", "HEAD") == git(before, "log", "--stat", "HEAD")
    assert git(repo.path, "show", "HEAD~5") == git(before, "show", "HEAD~5")
    assert git(repo.path, "blame", "HEAD", "--", "README.md") == git(
        before, "blame", "HEAD", "--", "README.md"
    )


def test_only_refs_at_head_or_its_ancestors_remain(guarded: tuple[LeakyRepo, Path]) -> None:
    repo, _ = guarded
    refs = git(repo.path, "for-each-ref", "--format=%(refname)").split()
    assert refs == [f"refs/tags/{tag}" for tag in repo.old_tags]
    for ref in refs:
        git(repo.path, "merge-base", "--is-ancestor", ref, "HEAD")
    assert git(repo.path, "tag", "--list") == "".join(f"{t}\n" for t in repo.old_tags)
    assert git(repo.path, "stash", "list") == ""
    assert git(repo.path, "notes", "list") == ""
    assert git(repo.path, "replace", "--list") == ""
    assert git(repo.path, "remote") == ""
    assert git(repo.path, "config", "--get-regexp", r"^(remote|branch)\.", check=False) == ""


def packed_by_git(packed: bytes, objects: Path, scratch: Path) -> bytes:
    """What `git pack-refs --all` writes for the refs of a packed-refs file (same objects)."""
    other = scratch / "other.git"
    subprocess.run(["git", "init", "-q", "--bare", str(other)], env=git_env(), check=True)
    (other / "objects/info/alternates").write_text(f"{objects}\n")
    for line in packed.splitlines():
        if line and line[:1] not in (b"#", b"^"):
            oid, name = line.split(b" ", 1)
            subprocess.run(
                [b"git", b"-C", bytes(other), b"update-ref", name, oid], env=git_env(), check=True
            )
    subprocess.run(
        ["git", "-C", str(other), "pack-refs", "--all", "--prune"], env=git_env(), check=True
    )
    return (other / "packed-refs").read_bytes()


@pytest.mark.parametrize("extra_tag", ["none", "nested", "latin-1"])
def test_kept_refs_are_packed_as_git_packs_them(
    leaky: LeakyRepo, tmp_path: Path, extra_tag: str
) -> None:
    """The guard writes packed-refs itself: byte for byte what git writes for the same refs,
    a tag of a tag (peeled to its commit) and a name that is not UTF-8 included."""
    if extra_tag == "nested":
        git(leaky.path, "tag", "-a", "nested", "-m", "a tag of a tag", "v0.2")
    elif extra_tag == "latin-1":
        oid = git(leaky.path, "rev-parse", "v0.1").strip()
        name = b"refs/tags/caf\xe9"  # git allows any bytes but a few in a ref name
        subprocess.run([b"git", b"-C", bytes(leaky.path), b"update-ref", name, oid.encode()],
                       env=git_env(), check=True)  # fmt: skip
    guard_tree(leaky.path)
    packed = leaky.path / ".git/packed-refs"
    written = packed.read_bytes()
    assert written == packed_by_git(written, leaky.path / ".git/objects", tmp_path)
    peeled = git(leaky.path, "rev-parse", "v0.2^{commit}").strip()
    assert f"^{peeled}\n".encode() in written  # the annotated tag, peeled to its commit
    if extra_tag == "nested":
        shown = git(leaky.path, "show-ref", "--dereference", "refs/tags/nested")
        assert f"{peeled} refs/tags/nested^{{}}" in shown
    if extra_tag == "latin-1":
        assert b" refs/tags/caf\xe9\n" in written
    git(leaky.path, "fsck", "--full", "--strict", "--no-progress")


def test_leftover_temporary_and_loose_files_are_removed(leaky: LeakyRepo) -> None:
    objects = leaky.path / ".git/objects"
    (objects / "pack/tmp_pack_leak").write_text("the fix, in a temporary file\n")
    (objects / "tmp_obj_leak").write_text("the fix, in a temporary file\n")
    (objects / "ab").mkdir(exist_ok=True)
    (objects / "ab/not-an-object").write_text("the fix\n")
    guard_tree(leaky.path)
    assert not (objects / "pack/tmp_pack_leak").exists()
    assert not (objects / "tmp_obj_leak").exists()
    assert not (objects / "ab").exists()
    assert git(leaky.path, "count-objects", "-v").splitlines()[0] == "count: 0"
    git(leaky.path, "fsck", "--full", "--strict", "--no-progress")


def test_objects_pack_holds_one_pack_and_its_index(leaky: LeakyRepo, tmp_path: Path) -> None:
    pack = leaky.path / ".git/objects/pack"
    (old,) = pack.glob("*.pack")  # holds the fix and the later commits
    # git never reads a pack without its index, but `git index-pack` gives its objects back
    shutil.copyfile(old, pack / "pack-stray.pack")
    (pack / "notes.txt").write_text("the fix is in pack-stray.pack\n")
    problems = "\n".join(check_tree(leaky.path))
    assert ".git: objects/pack/pack-stray.pack is present" in problems
    assert ".git: objects/pack/notes.txt is present" in problems
    guard_tree(leaky.path)
    assert check_tree(leaky.path) == []
    names = sorted(path.name for path in pack.iterdir())
    assert [Path(name).suffix for name in names] == [".idx", ".pack"], names
    assert Path(names[0]).stem == Path(names[1]).stem
    # an index made for what is left brings back nothing past HEAD
    revived = tmp_path / "revived"
    git(tmp_path, "init", "-q", "--bare", str(revived))
    subprocess.run(
        ["git", "--git-dir", str(revived), "index-pack", "--stdin", "--keep"],
        input=(pack / names[1]).read_bytes(), env=git_env(), capture_output=True, check=True,
    )  # fmt: skip
    assert has_object(revived, leaky.head)
    assert not has_object(revived, leaky.fix)
    git(leaky.path, "fsck", "--full", "--strict", "--no-progress")


def test_objects_keeps_nothing_but_its_pack(leaky: LeakyRepo, tmp_path: Path) -> None:
    objects = leaky.path / ".git/objects"
    (old,) = (objects / "pack").glob("*.pack")
    shutil.copyfile(old, objects / "leak.pack")  # the whole history, under another name
    (objects / "info").mkdir(exist_ok=True)
    shutil.copyfile(old, objects / "info/history")
    (objects / "pack/multi-pack-index").write_bytes(b"MIDX")
    problems = check_tree(leaky.path)
    for name in ("objects/leak.pack", "objects/info/history", "objects/pack/multi-pack-index"):
        assert [line for line in problems if f" {name} " in line] == [f".git: {name} is present"]
    guard_tree(leaky.path)
    assert sorted(path.name for path in objects.iterdir()) == ["info", "pack"]
    assert list((objects / "info").iterdir()) == []
    assert check_tree(leaky.path) == []
    git(leaky.path, "fsck", "--full", "--strict", "--no-progress")


def test_shallow_names_no_commit_the_guard_removed(tmp_path: Path) -> None:
    upstream = tmp_path / "upstream"
    main = _linear_repo(upstream, 3)
    git(upstream, "checkout", "-q", "-b", "fix")
    (upstream / "fix.txt").write_text("the fix\n")
    git(upstream, "add", "fix.txt")
    git(upstream, "commit", "-q", "-m", "fix")
    fix = git(upstream, "rev-parse", "HEAD").strip()
    git(upstream, "checkout", "-q", "main")
    repo = tmp_path / "testbed"
    # a shallow clone of every branch lists every branch's tip in .git/shallow
    git(tmp_path, "clone", "-q", "--depth", "1", "--no-single-branch", f"file://{upstream}",
        str(repo))  # fmt: skip
    assert fix in (repo / ".git/shallow").read_text()
    guard_tree(repo)
    assert (repo / ".git/shallow").read_text() == f"{main[-1]}\n"
    assert not has_object(repo / ".git", fix)
    assert check_tree(repo) == []
    git(repo, "fsck", "--full", "--no-progress")
    assert git(repo, "log", "--format=%H") == f"{main[-1]}\n"
    (repo / ".git/shallow").write_text(f"{main[-1]}\n{fix}\n")  # as the guard once left it
    assert check_tree(repo) == [f".git: shallow names 1 commits the repository lacks, e.g. {fix}"]


def test_a_failure_on_a_path_names_it(leaky: LeakyRepo) -> None:
    pack = leaky.path / ".git/objects/pack"
    shutil.rmtree(pack)
    pack.write_text("not a folder\n")
    with pytest.raises(GitGuardFailed) as failure:
        guard_tree(leaky.path)
    assert "(.git/objects/pack/" in str(failure.value)


def test_a_repository_that_reaches_nothing_keeps_no_object(tmp_path: Path) -> None:
    repo = tmp_path / "testbed"
    git(tmp_path, "init", "-q", str(repo))
    (repo / "a.txt").write_text("added then unstaged\n")
    oid = git(repo, "hash-object", "-w", "a.txt").strip()  # reached by nothing: HEAD is unborn
    subprocess.run(
        ["git", "pack-objects", "-q", ".git/objects/pack/pack"],
        cwd=repo, input=f"{oid}\n", text=True, env=git_env(), capture_output=True, check=True,
    )  # fmt: skip
    assert list((repo / ".git/objects/pack").glob("*.pack"))
    result = guard_tree(repo)
    assert result == GuardResult(repositories=1, refs_kept=0)
    assert list((repo / ".git/objects/pack").iterdir()) == []
    assert git(repo, "count-objects", "-v").splitlines()[0] == "count: 0"
    assert git(repo, "status", "--porcelain") == "?? a.txt\n"


def test_no_reflog_or_pseudo_ref_reaches_past_head(guarded: tuple[LeakyRepo, Path]) -> None:
    repo, _ = guarded
    dotgit = repo.path / ".git"
    for name in ("FETCH_HEAD", "ORIG_HEAD"):
        assert not (dotgit / name).exists()
        assert git(repo.path, "rev-parse", "--verify", "-q", name, check=False) == ""
    # One HEAD entry stays, naming HEAD: `git status` reads it for "HEAD detached at ...".
    assert [p.name for p in (dotgit / "logs").iterdir()] == ["HEAD"]
    assert git(repo.path, "reflog", "--format=%H %gs").splitlines() == [
        f"{repo.head} checkout: moving from {repo.fix} to {repo.head}"
    ]
    assert git(repo.path, "rev-parse", "--verify", "-q", "HEAD@{1}", check=False) == ""


def test_no_object_past_head_remains(guarded: tuple[LeakyRepo, Path]) -> None:
    repo, before = guarded
    dotgit = repo.path / ".git"
    assert has_object(before / ".git", repo.fix)
    for oid in [repo.fix, *repo.later_commits, repo.stash_blob]:
        assert not has_object(dotgit, oid), oid
    assert has_object(dotgit, repo.staged_blob)  # the index still reaches it
    assert git(repo.path, "fsck", "--unreachable", "--no-progress") == ""
    git(repo.path, "fsck", "--full", "--strict", "--no-progress")
    reachable = git(repo.path, "rev-list", "--objects", "--all", "--indexed-objects").splitlines()
    listed = git(repo.path, "cat-file", "--batch-all-objects", "--batch-check=%(objectname)")
    assert len(listed.splitlines()) == len(reachable)
    assert git(repo.path, "count-objects", "-v").splitlines()[0] == "count: 0"  # all packed


def test_working_tree_index_and_status_are_untouched(leaky: LeakyRepo, tmp_path: Path) -> None:
    before = copy_tree(leaky.path, tmp_path / "before")
    index = (leaky.path / ".git/index").read_bytes()
    guard_tree(leaky.path)
    assert snapshot(leaky.path) == snapshot(before)
    assert (leaky.path / ".git/index").read_bytes() == index
    assert status(leaky.path) == status(before)
    assert "HEAD detached at" in status(leaky.path)
    assert git(leaky.path, "submodule", "status") == git(before, "submodule", "status")


def test_submodules_keep_their_head_and_nothing_past_it(guarded: tuple[LeakyRepo, Path]) -> None:
    repo, before = guarded
    module = repo.path / ".git/modules" / repo.submodule
    checkout = repo.path / repo.submodule
    assert git(checkout, "rev-parse", "HEAD").strip() == repo.submodule_head
    assert git(checkout, "rev-list", "HEAD") == git(before / repo.submodule, "rev-list", "HEAD")
    for oid in repo.submodule_later:
        assert has_object(before / ".git/modules" / repo.submodule, oid)
        assert not has_object(module, oid)
    assert git(checkout, "for-each-ref") == ""
    assert git(checkout, "remote") == ""
    assert git(checkout, "fsck", "--unreachable", "--no-progress") == ""
    git(checkout, "fsck", "--full", "--no-progress")
    assert status(checkout) == status(before / repo.submodule)
    assert check_tree(repo.path) == []


def test_check_reports_every_leak_and_changes_nothing(leaky: LeakyRepo) -> None:
    dotgit = snapshot(leaky.path / ".git", skip_git=False)
    problems = check_tree(leaky.path)
    assert snapshot(leaky.path / ".git", skip_git=False) == dotgit
    text = "\n".join(problems)
    for expected in (
        ".git: FETCH_HEAD is present",
        ".git: ORIG_HEAD is present",
        ".git: remote origin is configured",
        "refs/notes/commits",
        "HEAD's reflog has 3 entries",
        ".git/modules/vendor/lib: remote origin is configured",
    ):
        assert expected in text
    guard_tree(leaky.path)
    assert check_tree(leaky.path) == []


def test_check_reports_objects_nothing_reaches(leaky: LeakyRepo) -> None:
    guard_tree(leaky.path)
    secret = leaky.path / "secret.txt"
    secret.write_text("the fix, smuggled in as a loose object\n")
    oid = git(leaky.path, "hash-object", "-w", "secret.txt").strip()
    secret.unlink()
    assert check_tree(leaky.path) == [
        f".git: 1 objects not reachable from HEAD or the index, e.g. {oid}"
    ]


def test_tree_without_git_is_left_alone(tmp_path: Path) -> None:
    (tmp_path / "tree/src").mkdir(parents=True)
    (tmp_path / "tree/src/a.py").write_text("print(1)\n")
    before = snapshot(tmp_path / "tree", skip_git=False)
    assert guard_tree(tmp_path / "tree") == GuardResult()
    assert check_tree(tmp_path / "tree") == []
    assert snapshot(tmp_path / "tree", skip_git=False) == before


def _install_traps(repo: Path, marker: Path) -> None:
    """Config, include and hooks that each write ``marker`` if anything runs them."""
    trap = repo / ".git/trap.sh"
    trap.write_text(f'#!/bin/sh\necho "$0 $*" >> {marker}\nexit 0\n')
    trap.chmod(0o755)
    hooks = repo / ".git/hooks"
    for name in (
        "reference-transaction", "pre-auto-gc", "post-checkout", "post-index-change",
        "post-rewrite", "pre-commit", "post-commit", "post-merge", "fsmonitor-watchman",
        "pre-push", "push-to-checkout", "sendemail-validate", "p4-pre-submit",
    ):  # fmt: skip
        shutil.copy(trap, hooks / name)
    (repo / ".git/included.cfg").write_text(f"[core]\n\tfsmonitor = {trap}\n")
    with open(repo / ".git/config", "a") as config:
        config.write(
            f"[include]\n\tpath = included.cfg\n"
            f"[core]\n\tfsmonitor = {trap}\n\thooksPath = {hooks}\n\tpager = {trap}\n"
            f"\tsshCommand = {trap}\n\talternateRefsCommand = {trap}\n\teditor = {trap}\n"
            f"[gc]\n\tauto = 1\n\tautoPackLimit = 1\n"
            f"[uploadpack]\n\tpackObjectsHook = {trap}\n"
            f"[diff]\n\texternal = {trap}\n"
            f'[filter "trap"]\n\tclean = {trap}\n\tsmudge = {trap}\n\tprocess = {trap}\n'
            f"[log]\n\tshowSignature = true\n[gpg]\n\tprogram = {trap}\n"
        )
    (repo / ".gitattributes").write_text("* filter=trap\n")


def test_nothing_the_repository_names_is_run(
    leaky: LeakyRepo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "marker"
    _install_traps(leaky.path, marker)
    # The traps are live: plain git in this repository runs them.
    subprocess.run(["git", "status"], cwd=leaky.path, env=git_env(), capture_output=True)
    assert marker.exists()
    marker.unlink()
    # Nor does the host's config reach the guard: a hostile HOME, global config and overrides.
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text(f"[core]\n\tfsmonitor = {leaky.path / '.git/trap.sh'}\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(home / ".gitconfig"))
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    monkeypatch.setenv("GIT_CONFIG_KEY_0", "core.hooksPath")
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", str(leaky.path / ".git/hooks"))
    monkeypatch.setenv("GIT_DIR", str(tmp_path / "elsewhere"))
    assert check_tree(leaky.path) != []
    guard_tree(leaky.path)
    assert check_tree(leaky.path) == []
    assert not marker.exists()
    monkeypatch.undo()
    assert not has_object(leaky.path / ".git", leaky.fix)
    # The image's own config is kept (only remotes and upstreams go): it is the image's.
    assert "included.cfg" in (leaky.path / ".git/config").read_text()


def test_alternates_are_removed_before_git_reads_them(leaky: LeakyRepo, tmp_path: Path) -> None:
    upstream_objects = leaky.upstream / ".git/objects"
    alternates = leaky.path / ".git/objects/info/alternates"
    alternates.parent.mkdir(exist_ok=True)
    other = tmp_path / "other.git"
    git(tmp_path, "clone", "-q", "--bare", "--no-local", f"file://{leaky.path}", str(other))
    alternates.write_text(f"{other / 'objects'}\n{upstream_objects}\n")
    guard_tree(leaky.path)
    assert not alternates.exists()
    assert not has_object(leaky.path / ".git", leaky.fix)
    git(leaky.path, "fsck", "--full", "--no-progress")


def test_repository_state_past_head_is_removed(leaky: LeakyRepo) -> None:
    dotgit = leaky.path / ".git"
    git(leaky.path, "update-ref", "MERGE_HEAD", leaky.fix)
    git(leaky.path, "update-ref", "CHERRY_PICK_HEAD", leaky.fix)
    (dotgit / "MERGE_MSG").write_text("Merge the fix\n")
    for folder in ("rebase-merge", "rr-cache/abc", "worktrees/other"):
        (dotgit / folder).mkdir(parents=True)
    (dotgit / "worktrees/other/HEAD").write_text(f"{leaky.fix}\n")
    (dotgit / "info/grafts").write_text(f"{leaky.head} {leaky.fix}\n")
    (dotgit / "COMMIT_EDITMSG").write_text("Fix the bug\n")
    guard_tree(leaky.path)
    for name in ("MERGE_HEAD", "CHERRY_PICK_HEAD", "MERGE_MSG", "COMMIT_EDITMSG", "info/grafts"):
        assert not (dotgit / name).exists(), name
    for name in ("rebase-merge", "rr-cache", "worktrees"):
        assert not (dotgit / name).exists(), name
    assert not has_object(dotgit, leaky.fix)
    assert check_tree(leaky.path) == []


def test_branch_head_keeps_its_branch_without_upstream(built: LeakyRepo, tmp_path: Path) -> None:
    repo = tmp_path / "clone"
    git(tmp_path, "clone", "-q", "--no-local", f"file://{built.upstream}", "clone")
    git(repo, "checkout", "-q", "-b", "work", "--track", "origin/feature")
    git(repo, "reset", "-q", "--hard", "HEAD~1")
    git(repo, "config", "branch.work.description", "local work")
    head = git(repo, "rev-parse", "HEAD").strip()
    guard_tree(repo)
    assert git(repo, "symbolic-ref", "HEAD").strip() == "refs/heads/work"
    assert git(repo, "rev-parse", "HEAD").strip() == head
    assert git(repo, "config", "--get-regexp", r"^(remote|branch)\.").splitlines() == [
        "branch.work.description local work"
    ]
    assert "On branch work\nnothing to commit" in git(repo, "status")
    assert not (repo / ".git/logs").exists()
    assert git(repo, "fsck", "--unreachable", "--no-progress") == ""
    assert check_tree(repo) == []


def test_status_keeps_its_abbreviation_when_objects_go(tmp_path: Path) -> None:
    """git abbreviates by the number of objects: 16,384 or more give 8 hex digits, fewer 7."""
    repo = tmp_path / "repo"
    head = _linear_repo(repo, 1)[0]
    blobs = b"".join(
        b"blob\nmark :%d\ndata %d\n%d\n" % (i + 1, len(b"%d" % i) + 1, i) for i in range(17000)
    )
    files = b"".join(b"M 100644 :%d f%d\n" % (i + 1, i) for i in range(17000))
    stream = blobs + b"commit refs/heads/future\ncommitter a <a@x> 0 +0000\ndata 7\nfuture\n"
    stream += b"from " + head.encode() + b"\n" + files + b"\n"
    subprocess.run(
        ["git", "fast-import", "--quiet"], cwd=repo, env=git_env(), input=stream, check=True
    )
    git(repo, "checkout", "-q", head)  # from main: "checkout: moving from main to <head>"
    before = status(repo)
    assert f"HEAD detached at {head[:8]}\n" in before
    guard_tree(repo)
    assert status(repo) == before
    assert git(repo, "config", "core.abbrev").strip() == "8"


def test_abbreviation_that_holds_is_not_pinned(leaky: LeakyRepo) -> None:
    """Removing the history past HEAD leaves git's 7 hex digits: config gets no core.abbrev."""
    head = git(leaky.path, "rev-parse", "HEAD").strip()
    assert git(leaky.path, "rev-parse", "--short", "HEAD").strip() == head[:7]
    guard_tree(leaky.path)
    assert git(leaky.path, "rev-parse", "--short", "HEAD").strip() == head[:7]
    unset = subprocess.run(
        ["git", "config", "core.abbrev"], cwd=leaky.path, env=git_env(), capture_output=True
    )
    assert unset.returncode == 1, unset.stdout


def test_unreadable_repository_fails_clearly(leaky: LeakyRepo) -> None:
    (leaky.path / ".git/HEAD").write_text("0123456789012345678901234567890123456789\n")
    with pytest.raises(GitGuardFailed) as failure:
        guard_tree(leaky.path)
    message = str(failure.value)
    assert message.startswith("cannot remove the git history past HEAD from .git: ")
    assert "HEAD does not name a commit" in message
    assert message.endswith("--keep_git_history keeps .git as the image has it")
    assert "\n" not in message


def _linear_repo(repo: Path, commits: int, *init: str) -> list[str]:
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main", *init)
    oids = []
    for n in range(commits):
        (repo / "a.txt").write_text(f"{n}\n")
        git(repo, "add", "a.txt")
        git(repo, "commit", "-q", "-m", f"c{n}")
        oids.append(git(repo, "rev-parse", "HEAD").strip())
    return oids


def test_missing_history_fails_clearly(tmp_path: Path) -> None:
    first = _linear_repo(tmp_path / "repo", 3)[0]
    (tmp_path / "repo/.git/objects" / first[:2] / first[2:]).unlink()
    with pytest.raises(GitGuardFailed, match=r"from \.git: `git [a-z-]+` failed: "):
        guard_tree(tmp_path / "repo")


@pytest.mark.parametrize("kind", ["symlink", "file"])
def test_dot_git_that_is_not_a_folder_fails(tmp_path: Path, kind: str) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    if kind == "symlink":
        (tree / ".git").symlink_to("/etc")
    else:
        (tree / ".git").write_text("gitdir: /elsewhere\n")
    with pytest.raises(GitGuardFailed, match=r"from \.git: it is not a folder"):
        guard_tree(tree)
    assert check_tree(tree) == [".git is not a folder"]


def test_symlink_inside_git_fails(leaky: LeakyRepo) -> None:
    (leaky.path / ".git/refs/tags/outside").symlink_to("/etc/passwd")
    with pytest.raises(GitGuardFailed, match=r"\.git/refs/tags/outside is a symlink"):
        guard_tree(leaky.path)
    assert check_tree(leaky.path) == [".git/refs/tags/outside is a symlink"]


def test_guard_is_bounded_in_time(leaky: LeakyRepo) -> None:
    with pytest.raises(GitGuardFailed, match="timed out"):
        guard_tree(leaky.path, timeout=0)


def test_sha256_repository(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    oids = _linear_repo(repo, 4, "--object-format=sha256")
    git(repo, "checkout", "-q", oids[1])
    guard_tree(repo)
    assert git(repo, "rev-list", "HEAD").split() == oids[1::-1]
    assert not has_object(repo / ".git", oids[2])
    assert git(repo, "fsck", "--unreachable", "--no-progress") == ""
    assert check_tree(repo) == []
