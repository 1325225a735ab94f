"""The benchmark's own helpers (no Docker needed): image set shape, aggregation, index sim."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

import pytest

from scripts import baseline_cache_repos as baseline
from scripts import bench, bench_git, bench_peers, bench_transfer, bench_trees
from scripts import bench_images as bi


def test_image_set_shape() -> None:
    images = bi.all_images("127.0.0.1:5000")
    assert len(images) >= 24
    assert len({image.repo for image in images}) >= 4
    assert len({image.ref for image in images}) == len(images)
    for image in images:
        assert re.fullmatch(
            r"127\.0\.0\.1:5000/namanjain12/[a-z0-9]+_final:[0-9a-f]{40}", image.ref
        )
        assert image.ref_on("127.0.0.1:5055").startswith("127.0.0.1:5055/namanjain12/")
    # interleaved: the first N images cover every repository as soon as N >= len(REPOS)
    assert {image.repo for image in images[: len(bi.REPOS)]} == {s.name for s in bi.REPOS}


def test_generated_content_is_deterministic(tmp_path: Path) -> None:
    shape = bi.RepoShape("tiny", "tiny", src_files=40, venv_files=60, so_sizes=(4096,))
    pool = bi._line_pool(shape.name, count=200)
    first = bi.write_venv(shape, tmp_path / "a", pool)
    second = bi.write_venv(shape, tmp_path / "b", pool)
    assert (first.files, first.bytes) == (second.files, second.bytes)
    assert first.files >= shape.venv_files
    names = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*"))
    assert names == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*"))
    assert bi.repo_files(shape, pool) == bi.repo_files(shape, pool)
    deleted, edited = bi.install_changes(shape, 1, bi.source_paths(shape))
    assert deleted != edited


def _git(repo: Path, *args: str) -> str:
    env = bench_git.git_env(repo.parent)
    return bench_git.git(repo, *args, env=env).stdout.decode().strip()


def test_bench_git_history_leaks_past_head_as_r2e_clones_do(tmp_path: Path) -> None:
    history = bench_git.History(
        commits=60, tag_every=10, data_files=2, data_bytes=2048, data_every=7,
        maintenance_commits=3, features=((0.5, 2), (0.9, 2)),
    )  # fmt: skip
    shape = bi.RepoShape("tiny", "tiny", 30, 10, (4096,), commits=2, history=history, spacing=5)
    pool = bi._line_pool(shape.name, count=200)
    ids = bench_git.make_upstream(
        tmp_path / "up.git", "tiny", bi.repo_files(shape, pool), history, pool, bi.new_source(pool)
    )
    assert len(ids) == 60
    again = bench_git.make_upstream(
        tmp_path / "up2.git", "tiny", bi.repo_files(shape, pool), history, pool, bi.new_source(pool)
    )
    assert again == ids, "fixed dates and content: the same commit ids every time"
    head = ids[shape.head_index(1)]
    url = "https://github.com/bench/tiny.git"
    repo = tmp_path / "testbed"
    bench_git.clone_at(tmp_path / "up.git", repo, head, url, bench_git.EPOCH + 10**6)
    assert _git(repo, "rev-parse", "HEAD") == head
    assert (repo / ".git" / "HEAD").read_text().strip() == head, "detached at the commit"
    assert int(_git(repo, "rev-list", "--count", "HEAD")) == shape.head_index(1) + 1
    assert int(_git(repo, "rev-list", "--count", "HEAD..origin/main")) == 60 - len(
        _git(repo, "rev-list", "HEAD").split()
    )
    assert _git(repo, "tag", "--contains", "HEAD").split(), "release tags past HEAD"
    remotes = _git(repo, "for-each-ref", "--format=%(refname)", "refs/remotes/origin/")
    assert "refs/remotes/origin/maintenance/0.x" in remotes.split()
    assert _git(repo, "remote", "get-url", "origin") == url
    assert _git(repo, "stash", "list").startswith("stash@{0}")
    assert (repo / ".git" / "FETCH_HEAD").is_file()
    assert (repo / ".git" / "logs" / "HEAD").read_text().count("\n") >= 2
    assert len(list((repo / ".git" / "objects" / "pack").glob("*.pack"))) == 1
    assert _git(repo, "status", "--porcelain") == "", "the stash took the local edit"


def test_baseline_count_matches_asynccache(tmp_path: Path) -> None:
    from asynccache.tree.digest import tree_stats

    rng = random.Random(1)
    for i in range(30):
        path = tmp_path / f"d{i % 4}" / f"f{i}"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randint(0, 5000)))
    os.symlink("d0/f0", tmp_path / "link")
    os.symlink("missing", tmp_path / "dangling")
    assert baseline.count_files(tmp_path) == tree_stats(tmp_path)
    assert bench.tree_totals(tmp_path) == tree_stats(tmp_path)


def test_median_and_table() -> None:
    runs = [
        {"contender": "c1", "ok": True, "wall_s": w, "images_per_min": 60 / w, "file_counts": {}}
        for w in (3.0, 1.0, 2.0)
    ]
    merged = bench.median_result(runs)
    assert merged["wall_s"] == 2.0
    assert merged["runs"] == 3
    text = bench.table("t", [merged])
    assert "c1" in text and "2.0" in text


def test_index_sim_small() -> None:
    result = bench.index_sim(200, None)
    assert result["updates"] == 200
    assert result["writes"] >= 1
    assert result["bytes_written"] >= result["final_index_bytes"] > 0
    original = bench.original_index_cost(200)
    assert original["bytes_written"] > result["final_index_bytes"]


def test_baseline_is_the_original_and_the_rmi_variant_is_labelled(tmp_path: Path) -> None:
    original = bench.contender_command("baseline", tmp_path, tmp_path, tmp_path / "s")
    variant = bench.contender_command("baseline-rmi", tmp_path, tmp_path, tmp_path / "s")
    assert str(bench.BASELINE_SCRIPT) in original
    assert "--remove_images" not in original
    assert variant == [*original[:-2], "--remove_images", *original[-2:]]


def test_code_snapshot_keeps_subpackages(tmp_path: Path) -> None:
    sources = bench._sources("worktree")
    assert "__init__.py" in sources
    assert any("/" in name for name in sources), "subpackages must be part of the snapshot"


def test_registry_contenders(tmp_path: Path) -> None:
    command = bench.contender_command("r4", tmp_path / "ds", tmp_path / "cache", tmp_path / "s")
    assert command[command.index("--backend") + 1] == "registry"
    assert command[command.index("--concurrency") + 1] == "4"
    assert "--backend" not in bench.contender_command("c16", tmp_path, tmp_path, tmp_path)
    assert bench.contender_env("r1", None)["DOCKER_HOST"] == "unix:///nonexistent"
    assert bench.contender_env("c1", None).get("DOCKER_HOST") == os.environ.get("DOCKER_HOST")
    log = tmp_path / "r4.log"
    log.write_bytes(
        b"00:00:01 INFO progress: 4/4 done\n"
        b"00:00:02 INFO registry backend: 139460608 bytes downloaded; layers fetched 9, "
        b"from cache 3, skipped as holding no /testbed 4\n"
    )
    assert bench.client_downloaded_bytes(log) == 139460608
    assert bench.client_downloaded_bytes(tmp_path / "missing.log") is None


def test_served_bytes_from_access_log() -> None:
    ua = b'"" "docker/20.10.24 UpstreamClient(Python/3.11 aiohttp/3.14.5)"\n'
    chunk = (
        b'127.0.0.1 - - [24/Nov/2026:23:56:58 +0000] "GET /v2/namanjain12/pandas_final/blobs/'
        b'sha256:ab HTTP/1.1" 200 1000 '
        + ua
        + b'127.0.0.1 - - [24/Nov/2026:23:56:58 +0000] "GET /v2/namanjain12/numpy_final/'
        b'manifests/0123 HTTP/1.1" 200 20 '
        + ua
        + b'127.0.0.1 - - [24/Nov/2026:23:56:58 +0000] "HEAD /v2/namanjain12/numpy_final/'
        b'manifests/0123 HTTP/1.1" 200 20 '
        + ua
        + b'127.0.0.1 - - [24/Nov/2026:23:56:58 +0000] "GET /v2/namanjain12/toolkit_final/'
        b'blobs/sha256:cd HTTP/1.1" 200 5000 ' + ua
    )
    repos = bi.bench_repositories()
    assert bench.served_bytes(chunk, repos) == 1020
    assert bench.served_bytes(chunk, []) == 0


def test_contender_names_and_feature_flags(tmp_path: Path) -> None:
    parsed = bench.parse_contender("r4+p2+nodedup")
    assert (parsed.kind, parsed.backend, parsed.concurrency) == ("asynccache", "registry", 4)
    assert parsed.needs == ("--processes", "--no_dedup")
    command = bench.contender_command("c1+keepgit", tmp_path, tmp_path / "c", tmp_path / "s")
    assert command[-1] == "--keep_git_history" and "--backend" not in command
    assert bench.parse_contender("shell4") == bench.Contender("shell4", "shell", "registry", 4)
    assert bench.parse_contender("skopeo").kind == "skopeo"
    assert not bench.parse_contender("skopeo").uses_docker
    assert bench.parse_contender("baseline-rmi").uses_docker
    for bad in ("r4+fast", "x1", "shellfish"):
        with pytest.raises(SystemExit):
            bench.parse_contender(bad)
    help_text = "usage: asynccache [--processes P] [--keep_git_history]\n  --no_dedupe  other"
    assert bench.missing_flags(parsed, help_text) == ["--no_dedup"]
    assert bench.guard_active(bench.parse_contender("r1"), help_text)
    assert not bench.guard_active(bench.parse_contender("r1+keepgit"), help_text)
    assert not bench.guard_active(bench.parse_contender("r1"), "usage: asynccache")
    assert not bench.guard_active(bench.parse_contender("baseline"), help_text)
    skipped: dict[str, str] = {}
    ready = bench.runnable(["r1", "r1+nodedup", "r4+p2"], help_text, skipped)
    assert [c.name for c in ready] == ["r1", "r4+p2"]
    assert "--no_dedup" in skipped["r1+nodedup"]


def test_peer_commands(tmp_path: Path) -> None:
    assert bench_peers.parse_peer("shell") == ("shell", 1)
    assert bench_peers.parse_peer("shell2") == ("shell", 2)
    assert bench_peers.parse_peer("r1") is None
    plan = tmp_path / "plan.txt"
    plan.write_text("id1 http://r/v2/x/blobs sha256:a sha256:b # r/x:1\n")
    command = bench_peers.peer_command("shell", 3, plan, tmp_path / "c", tmp_path / "w")
    assert command[:2] == ["bash", "-c"] and "xargs -P 3" in command[2]
    assert (tmp_path / "w" / "shell_one.sh").is_file()
    skopeo = bench_peers.peer_command("skopeo", 1, plan, tmp_path / "c", tmp_path / "w")
    assert "skopeo copy" in (tmp_path / "w" / "skopeo_one.sh").read_text()
    assert str(plan) in skopeo[2]
    env = bench_peers.peer_env(tmp_path / "c", tmp_path / "w")
    assert env["LAYOUT"].startswith(str(tmp_path / "w"))


def _tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def test_cache_usage_counts_shared_inodes_once(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    body = os.urandom(64 * 1024)
    _tree(cache / "a__1", {"x.py": body, "d/y.py": b"y"})
    _tree(cache / ".meta", {"a__1.json": b"{}"})
    (cache / "b__2").mkdir()
    os.link(cache / "a__1" / "x.py", cache / "b__2" / "x.py")
    _tree(cache / ".layers", {"blob": os.urandom(4096)})
    usage = bench_trees.cache_usage(cache)
    assert usage["logical_files"] == 3
    assert usage["logical_bytes"] == 2 * len(body) + 1
    assert usage["files_created"] == 3  # x.py once, y.py, the .meta record; .layers left out
    assert usage["physical_bytes"] < usage["logical_bytes"]
    assert [p.name for p in bench_trees.instance_folders(cache)] == ["a__1", "b__2"]


def test_compare_trees_with_and_without_git(tmp_path: Path) -> None:
    _tree(tmp_path / "ref" / "i__1", {"a.py": b"a", ".git/HEAD": b"x\n"})
    _tree(tmp_path / "cache" / "i__1", {"a.py": b"a", ".git/HEAD": b"y\n"})
    reference = {"i__1": bench_trees.tree_manifest(tmp_path / "ref" / "i__1")}
    full = bench_trees.compare_trees(reference, tmp_path / "cache")
    assert (full["compared"], full["equal"]) == (1, 0) and ".git/HEAD" in full["samples"][0]
    without_git = bench_trees.compare_trees(reference, tmp_path / "cache", skip_git=True)
    assert (without_git["compared"], without_git["equal"]) == (1, 1)
    assert bench_trees.compare_trees({"gone__2": {}}, tmp_path / "cache")["missing"] == ["gone__2"]


def test_transfer_method_counts_the_stream_and_copies(tmp_path: Path) -> None:
    source = tmp_path / "plain"
    _tree(source / "i__1", {"a.py": os.urandom(1000), "b/c.py": b"c" * 5000})
    _tree(source / ".layers", {"blob": b"left out"})
    methods = bench_transfer.transfer_methods(source, source, tmp_path / "dest", False)
    assert list(methods) == ["tar czf|tar xzf", "rsync -a"]
    producer, consumer = methods["tar czf|tar xzf"]
    log = tmp_path / "log"
    result = bench_transfer.run_method(producer, consumer, tmp_path / "dest", dict(os.environ), log)
    assert result["ok"], log.read_text()
    assert result["stream_mib"] > 0
    assert (result["tree_count"], result["logical_files"]) == (1, 2)
    assert not (tmp_path / "dest" / ".layers").exists()
    with_export = bench_transfer.transfer_methods(source, tmp_path / "p", tmp_path / "d", True)
    assert next(iter(with_export)) == "export|import" and "rsync -aH" in with_export


def test_comparisons_name_each_feature_pair() -> None:
    def row(name: str, wall: float, cpu: float, **extra: object) -> dict[str, object]:
        return {
            "contender": name, "wall_s": wall, "cpu_s": cpu, "images": 10,
            "cpu_per_image_s": cpu / 10, "files_created": 100, "physical_ratio": 0.5,
            "physical_mib": 50.0, "testbed_mib": 100.0, **extra,
        }  # fmt: skip

    rows = [
        row("r1", 10.0, 8.0, guard=True),
        row("r1+nodedup", 12.0, 9.0),
        row("r1+keepgit", 9.0, 7.0),
        row("r4+p1", 10.0, 8.0),
        row("r4+p2", 6.0, 9.0, pool_startup_s=0.25),
        row("shell1", 11.0, 5.0),
    ]
    lines = bench.comparisons(rows)  # type: ignore[arg-type]
    text = "\n".join(lines)
    assert "dedup r1 vs r1+nodedup" in text and "speed-up with dedup 1.20x" in text
    assert "leak guard r1 vs r1+keepgit" in text and "guard ~1.0 s" in text
    assert "processes r4+p1 vs r4+p2" in text and "speed-up 1.67x" in text
    assert "pool start-up 0.25 s" in text
    assert "r1 vs shell1: 10.0 vs 11.0 s (shell1 takes 1.10x r1's time)" in text


def test_markdown_has_every_row_comparison_and_skip() -> None:
    row = {"contender": "r1", "wall_s": 2.0, "images_per_min": 30.0, "ok": True}
    transfer = {"method": "rsync -a", "wall_s": 1.5, "tree_count": 3, "ok": True}
    output = {
        "scenarios": {
            "loopback": {
                "results": [row],
                "comparisons": ["r1 vs shell1: ..."],
                "skipped": {"r1+nodedup": "--no_dedup not in the CLI"},
            },
            "transfer": {"results": [transfer], "skipped": {}},
        }
    }
    text = bench.markdown(output)
    assert "| r1 | 2.0 | 30.0 |" in text
    assert "- r1 vs shell1: ..." in text and "- skipped r1+nodedup: --no_dedup" in text
    assert "| rsync -a | 1.5 |" in text
    tar = {"method": "tar czf|tar xzf", "wall_s": 9.0, "ok": True}
    output["scenarios"]["transfer"]["results"].append(tar)
    assert "| tar czf\\|tar xzf | 9.0 |" in bench.markdown(output)


def test_results_are_saved_with_finished_only_at_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench, "BENCH_DIR", tmp_path)
    output: dict[str, object] = {"host": {}, "scenarios": {}}
    bench.save_results(output, "T1", final=False)
    assert "finished" not in (tmp_path / "results-T1.json").read_text()
    assert (tmp_path / "latest.md").is_file()
    bench.save_results(output, "T1", final=True)
    assert "finished" in (tmp_path / "latest.json").read_text()
