"""verify: damage found, exit codes, repair, digests."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from asynccache.cache.index import load_and_repair, read_index, update_index
from asynccache.cache.layout import CacheDir
from asynccache.cache.records import digest_path, meta_path, read_digest
from asynccache.cache.verify import format_verify, verify_cache
from asynccache.errors import CacheLocked
from asynccache.trainer.repo_cache import RepoCache
from asynccache.tree.digest import tree_digest
from asynccache.tree.git_guard import guard_tree
from tests.support.cache_trees import build_sample_tree, cache_instance
from tests.support.cli_runner import run_cli
from tests.support.leaky_repo import LeakyRepo, copy_repo

ALPHA, BETA, GAMMA = "alpha__aaaaaaaaaaaa", "beta__bbbbbbbbbbbb", "gamma__cccccccccccc"


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, timeout=120, module="asynccache.cli.maintenance")


def test_a_healthy_cache_verifies(cache_dir: Path) -> None:
    for deep in (False, True):
        report = verify_cache(cache_dir, deep=deep)
        assert report.healthy and report.exit_code == 0
        assert report.ok == 3 and [c.instance_id for c in report.checks] == [ALPHA, BETA, GAMMA]
        assert report.no_digest == []
        assert all(check.digest_checked == deep for check in report.checks)
    done = run("verify", "--cache_dir", cache_dir, "--deep")
    assert done.returncode == 0, done.stderr
    assert "3 ok, 0 damaged, 0 missing" in done.stdout


def test_damage_is_reported(cache_dir: Path) -> None:
    (cache_dir / ALPHA / "pkg" / "core.py").unlink()
    core = cache_dir / BETA / "pkg" / "core.py"
    core.write_bytes(core.read_bytes().replace(b"41", b"42"))
    shutil.rmtree(cache_dir / GAMMA)

    quick = verify_cache(cache_dir)
    assert {c.instance_id: c.status for c in quick.problems} == {ALPHA: "damaged", GAMMA: "missing"}
    assert "files" in quick.problems[0].detail
    assert quick.exit_code == 1

    deep = verify_cache(cache_dir, deep=True)
    statuses = {c.instance_id: c.status for c in deep.problems}
    assert statuses == {ALPHA: "damaged", BETA: "damaged", GAMMA: "missing"}
    beta = next(c for c in deep.problems if c.instance_id == BETA)
    assert "digest" in beta.detail
    text = format_verify(deep)
    assert "0 ok, 2 damaged, 1 missing" in text and "--repair" in text

    done = run("verify", "--cache-dir", cache_dir)
    assert done.returncode == 1
    assert "1 ok, 1 damaged, 1 missing" in done.stdout
    assert run("verify", "--cache_dir", cache_dir, "--deep").returncode == 1


def test_deep_without_a_recorded_digest_says_so(cache_dir: Path) -> None:
    digest_path(cache_dir, BETA).unlink()
    core = cache_dir / BETA / "pkg" / "core.py"
    core.write_bytes(core.read_bytes().replace(b"41", b"42"))
    report = verify_cache(cache_dir, deep=True)
    assert report.healthy
    assert report.no_digest == [BETA]
    assert "no digest recorded for 1 instances" in format_verify(report)


def test_repair_drops_bad_instances_so_the_next_run_redoes_them(cache_dir: Path) -> None:
    core = cache_dir / BETA / "pkg" / "core.py"
    core.write_bytes(core.read_bytes().replace(b"41", b"42"))
    shutil.rmtree(cache_dir / GAMMA)
    done = run("verify", "--cache_dir", cache_dir, "--deep", "--repair")
    assert done.returncode == 1, done.stderr
    assert "dropped 2 instances" in done.stdout
    assert list(read_index(cache_dir / "index.json")) == [ALPHA]
    for instance_id in (BETA, GAMMA):
        assert not meta_path(cache_dir, instance_id).exists()
        assert read_digest(cache_dir, instance_id) is None
    assert meta_path(cache_dir, ALPHA).exists() and read_digest(cache_dir, ALPHA)
    records, notes = load_and_repair(cache_dir)
    assert list(records) == [ALPHA] and notes == []
    assert RepoCache(cache_dir).instance_ids == [ALPHA]
    again = run("verify", "--cache_dir", cache_dir, "--deep")
    assert again.returncode == 0 and "1 ok" in again.stdout


def test_repair_refuses_while_a_run_holds_the_folder(cache_dir: Path) -> None:
    shutil.rmtree(cache_dir / GAMMA)
    holder = CacheDir(cache_dir)
    holder.lock()
    try:
        with pytest.raises(CacheLocked):
            verify_cache(cache_dir, repair=True)
        done = run("verify", "--cache_dir", cache_dir, "--repair")
        assert done.returncode == 2
        assert "in use" in done.stderr and "Traceback" not in done.stderr
    finally:
        holder.unlock()
    assert GAMMA in read_index(cache_dir / "index.json")


def test_size_mb_is_used_when_size_bytes_is_absent(cache_dir: Path) -> None:
    index = read_index(cache_dir / "index.json")
    for record in index.values():
        del record["size_bytes"]
    update_index(cache_dir, put=index.values())
    assert verify_cache(cache_dir).healthy
    (cache_dir / ALPHA / "pkg" / "data" / "blob.bin").write_bytes(b"")
    report = verify_cache(cache_dir)
    assert [c.instance_id for c in report.problems] == [ALPHA]
    assert "MiB" in report.problems[0].detail


def test_a_moved_cache_verifies(cache_dir: Path, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    os.rename(cache_dir, moved)
    assert verify_cache(moved, deep=True).healthy


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    done = run("verify", "--cache_dir", tmp_path / "absent")
    assert done.returncode == 2 and "does not exist" in done.stderr
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "index.json").write_text("{not json")
    done = run("verify", "--cache_dir", tmp_path / "bad")
    assert done.returncode == 2 and "not JSON" in done.stderr
    assert run("status", "--cache_dir", tmp_path / "absent").returncode == 2
    assert run("frobnicate").returncode == 2


def test_tree_digest_sees_content_mode_and_links_but_not_times(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    build_sample_tree(one)
    subprocess.run(["cp", "-a", str(one), str(two)], check=True)
    for path in (two / "README.md", two / "pkg", two / "pkg" / "core.py"):
        os.utime(path, ns=(0, 0))
    reference = tree_digest(one)
    assert len(reference) == 64 and tree_digest(two) == reference

    def retarget() -> None:
        os.unlink(two / "rel-link")
        os.symlink("pkg/other.py", two / "rel-link")

    changes: list[Callable[[], object]] = [
        lambda: (two / "README.md").write_text("# sample\n\n"),
        lambda: os.chmod(two / "setup.py", 0o755),
        retarget,
        lambda: (two / "empty-dir" / "nested-empty").rmdir(),
        lambda: (two / "pkg" / "core.py").rename(two / "pkg" / "core2.py"),
    ]
    for change in changes:
        shutil.rmtree(two)
        subprocess.run(["cp", "-a", str(one), str(two)], check=True)
        assert tree_digest(two) == reference
        change()
        assert tree_digest(two) != reference


def test_a_repository_recorded_up_to_head_must_reach_nothing_past_it(
    tmp_path: Path, leaky_repo: LeakyRepo
) -> None:
    cache = tmp_path / "cache"

    def guarded(folder: Path) -> None:
        guard_tree(copy_repo(leaky_repo.path, folder))

    def as_extracted(folder: Path) -> None:
        copy_repo(leaky_repo.path, folder)

    clean = cache_instance(cache, "clean", "d" * 40, guarded, extra={"git_history": "head"})
    leaky = cache_instance(cache, "leaky", "e" * 40, as_extracted, extra={"git_history": "head"})
    full = cache_instance(cache, "full", "f" * 40, as_extracted, extra={"git_history": "full"})
    old = cache_instance(cache, "old", "a" * 40, as_extracted)  # cached before the guard
    report = verify_cache(cache)
    assert [(c.instance_id, c.status) for c in report.problems] == [
        (leaky["instance_id"], "damaged")
    ]
    assert report.problems[0].detail.startswith("git history past HEAD: .git: FETCH_HEAD is")
    assert report.ok == 3
    assert {clean["instance_id"], full["instance_id"], old["instance_id"]} == {
        c.instance_id for c in report.checks if c.status == "ok"
    }
    done = run("verify", "--cache_dir", cache)
    assert done.returncode == 1
    assert "git history past HEAD" in done.stdout
