"""The benchmark's own helpers (no Docker needed): image set shape, aggregation, index sim."""

from __future__ import annotations

import os
import random
import re
from pathlib import Path

from scripts import baseline_cache_repos as baseline
from scripts import bench
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
    shape = bi.RepoShape(
        "tiny", "tiny", src_files=40, venv_files=60, so_sizes=(4096,), pack_bytes=8192
    )
    pool = bi._line_pool(shape.name, count=200)
    first = bi.write_venv(shape, tmp_path / "a", pool)
    second = bi.write_venv(shape, tmp_path / "b", pool)
    assert (first.files, first.bytes) == (second.files, second.bytes)
    assert first.files >= shape.venv_files
    names = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*"))
    assert names == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*"))
    changed, added, deleted = bi.commit_changes(shape, 1)
    assert not set(deleted) & set(changed)
    assert set(changed + deleted) <= set(bi.source_paths(shape))
    assert added


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
