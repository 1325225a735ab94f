"""Checks of the test infrastructure itself: sample images, reference extraction, dataset."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asynccache.tree.git_check import check_tree
from tests.support import fixtures as fx
from tests.support.fixtures import (
    CACHE_DIR_LABEL,
    DEFAULT_SET,
    FixtureError,
    FixtureImage,
    ReferenceTrees,
    docker,
    docker_cp_tree,
    image_exists,
    leftover_containers,
    missing_image_ref,
    row_for,
    snapshot_tree,
    write_dataset,
)
from tests.support.leaky_repo import git, git_env

EXPECTED_COLUMNS = [
    ("repo_name", pa.string()),
    ("docker_image", pa.string()),
    ("commit_hash", pa.string()),
    ("problem_statement", pa.string()),
    ("expected_output_json", pa.string()),
    ("prompt", pa.string()),
    ("parsed_commit_content", pa.string()),
    ("execution_result_content", pa.string()),
    ("num_non_test_files", pa.int64()),
    ("num_non_test_func_methods", pa.int64()),
    ("num_non_test_lines", pa.int64()),
    ("modified_files", pa.list_(pa.string())),
    ("relevant_files", pa.list_(pa.string())),
]


def _fake_rows() -> list[dict[str, Any]]:
    return [
        row_for(spec.ref("127.0.0.1:5000"), spec.repo, spec.commit_hash) for spec in DEFAULT_SET
    ]


def test_dataset_has_the_r2e_gym_lite_columns(tmp_path: Path) -> None:
    path = write_dataset(tmp_path, _fake_rows(), "demo")
    assert path == tmp_path / "data" / "demo-00000-of-00001.parquet"
    schema = pq.read_schema(path)
    assert len(schema) == 14
    assert [(f.name, f.type) for f in schema][:13] == EXPECTED_COLUMNS
    entities = schema.field("modified_entity_summaries").type
    assert pa.types.is_list(entities)
    assert pa.types.is_struct(entities.value_type)
    assert {entities.value_type.field(i).name for i in range(entities.value_type.num_fields)} >= {
        "name",
        "file_name",
        "type",
    }
    table = pq.read_table(path)
    assert table.num_rows == len(DEFAULT_SET)
    first = table.to_pylist()[0]
    assert first["docker_image"].startswith("127.0.0.1:5000/namanjain12/sampleproj_final:")
    assert len(first["commit_hash"]) == 40
    assert first["docker_image"].endswith(":" + first["commit_hash"])
    assert len(first["problem_statement"]) > 100


def test_dataset_loads_with_datasets(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    write_dataset(tmp_path, _fake_rows(), "demo")
    write_dataset(tmp_path, _fake_rows()[:2], "train")
    loaded = datasets.load_dataset(str(tmp_path), split="demo")
    assert len(loaded) == len(DEFAULT_SET)
    assert list(loaded.features) == [name for name, _ in EXPECTED_COLUMNS] + [
        "modified_entity_summaries"
    ]
    assert len(datasets.load_dataset(str(tmp_path), split="train")) == 2


def test_specs_are_distinct_and_well_formed() -> None:
    hashes = [spec.commit_hash for spec in DEFAULT_SET]
    assert len(set(hashes)) == len(hashes)
    assert all(len(h) == 40 and int(h, 16) >= 0 for h in hashes)
    assert len({spec.content_hash() for spec in DEFAULT_SET}) == len(DEFAULT_SET)
    assert len({spec.repo for spec in DEFAULT_SET}) >= 2
    assert [spec.name for spec in DEFAULT_SET if not spec.cmd] == ["toolkit-1"]
    assert not fx.NO_TESTBED.has_testbed
    assert missing_image_ref("r:1") not in {spec.ref("r:1") for spec in fx.SETS["all"]}


def test_snapshot_tree_never_follows_symlinks(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.txt").write_text("a")
    os.link(tmp_path / "dir" / "a.txt", tmp_path / "b.txt")
    (tmp_path / "loop").symlink_to("loop")
    (tmp_path / "to-dir").symlink_to("dir")
    (tmp_path / "run").write_text("#!/bin/sh\n")
    (tmp_path / "run").chmod(0o750)
    snap = snapshot_tree(tmp_path)
    assert snap["dir"] == ("dir", stat.S_IMODE((tmp_path / "dir").stat().st_mode), None, None)
    assert snap["loop"] == ("symlink", None, "loop", None)
    assert snap["to-dir"] == ("symlink", None, "dir", None)
    assert "to-dir/a.txt" not in snap
    assert snap["b.txt"][3] == snap["dir/a.txt"][3] == "b.txt"
    assert snap["run"][:2] == ("file", 0o750)
    assert snapshot_tree(tmp_path, hardlinks=False)["b.txt"][3] is None


def test_images_are_pushed_and_not_local(fixture_images: list[FixtureImage]) -> None:
    assert [image.spec for image in fixture_images] == list(DEFAULT_SET)
    for image in fixture_images:
        assert image.ref == image.spec.ref(image.ref.split("/")[0])
        assert fx.is_pushed(image.spec, image.ref.split("/")[0])
        assert not image_exists(image.ref)


def test_second_ensure_is_a_no_op(docker_services: str, fixture_images: list[FixtureImage]) -> None:
    again = fx.ensure_images(DEFAULT_SET, docker_services)
    assert not any(image.built for image in again)
    assert [image.ref for image in again] == [image.ref for image in fixture_images]


def test_sample_dataset_points_at_the_images(
    sample_dataset: tuple[Path, str, list[dict[str, Any]]],
    fixture_images: list[FixtureImage],
) -> None:
    dataset_dir, split, rows = sample_dataset
    assert (dataset_dir / "data" / f"{split}-00000-of-00001.parquet").is_file()
    assert [row["docker_image"] for row in rows] == [image.ref for image in fixture_images]
    assert [row["repo_name"] for row in rows] == [image.repo for image in fixture_images]


def test_docker_cp_reference_of_sampleproj(
    images_by_name: dict[str, FixtureImage], reference_trees: ReferenceTrees
) -> None:
    image = images_by_name["sampleproj-1"]
    root = reference_trees.path(image.ref)
    snap = reference_trees[image.ref]

    assert os.readlink(root / ".venv/bin/python") == "/usr/bin/python3"
    assert os.readlink(root / ".venv/lib64") == "lib"
    assert snap[".venv/bin/python"] == ("symlink", None, "/usr/bin/python3", None)

    assert not (root / "src/sampleproj/obsolete.py").exists()
    assert not (root / "docs/old notes.txt").exists()
    assert sorted(os.listdir(root / "src/sampleproj/plugins")) == ["__init__.py", "fresh.py"]
    assert (root / "src/sampleproj/plugins/__init__.py").read_text() == 'PLUGINS = ["fresh"]\n'

    for rel in ("install.sh", "run_tests.sh", "bin/tool"):
        assert stat.S_IMODE((root / rel).lstat().st_mode) == 0o755, rel
    assert stat.S_IMODE((root / "README.md").lstat().st_mode) == 0o644

    assert (root / "build/empty").is_dir()
    assert list((root / "build/empty").iterdir()) == []

    assert (root / "docs/naïve file.txt").read_text(encoding="utf-8") == "Un fichier naïf.\n"
    assert (root / "données/résumé.md").is_file()
    assert (root / "données/été/température.txt").read_bytes() == b"chaud\n"

    original = (root / "data/original.txt").lstat()
    linked = (root / "data/hardlink.txt").lstat()
    assert (original.st_dev, original.st_ino) == (linked.st_dev, linked.st_ino)
    assert snap["data/hardlink.txt"][3] == snap["data/original.txt"][3] == "data/hardlink.txt"

    objects = [rel for rel in snap if rel.startswith(".git/objects/") and snap[rel][0] == "file"]
    assert objects
    assert all(snap[rel][1] == 0o444 for rel in objects)
    assert not image_exists(image.ref)


@pytest.mark.parametrize("spec", DEFAULT_SET, ids=[spec.name for spec in DEFAULT_SET])
def test_every_image_matches_its_spec(
    spec: fx.FixtureSpec,
    images_by_name: dict[str, FixtureImage],
    reference_trees: ReferenceTrees,
) -> None:
    image = images_by_name[spec.name]
    assert fx.check_expectations(spec, reference_trees.path(image.ref)) == []
    assert len(reference_trees[image.ref]) >= spec.min_entries


@pytest.mark.parametrize(
    "spec", [s for s in DEFAULT_SET if s.history], ids=[s.name for s in DEFAULT_SET if s.history]
)
def test_every_image_leaks_history_past_head_as_r2e_images_do(
    spec: fx.FixtureSpec,
    images_by_name: dict[str, FixtureImage],
    reference_trees: ReferenceTrees,
) -> None:
    root = reference_trees.path(images_by_name[spec.name].ref)
    problems = "\n".join(check_tree(root))
    for leak in (
        ".git: FETCH_HEAD is present",
        ".git: ORIG_HEAD is present",
        ".git: remote origin is configured",
        "HEAD's reflog has",
    ):
        assert leak in problems, leak
    env = {**git_env(), "GIT_OPTIONAL_LOCKS": "0"}  # git status must not rewrite the index
    refs = set(git(root, "for-each-ref", "--format=%(refname)", env=env).split())
    for ref in ("refs/stash", "refs/notes/commits", "refs/remotes/origin/main", "refs/tags/v1.0"):
        assert ref in refs, ref
    assert len(git(root, "rev-list", "--all", env=env).split()) > len(
        git(root, "rev-list", "HEAD", env=env).split()
    )
    assert "HEAD detached at" in git(root, "status", env=env)
    if spec.history and spec.history.submodule:
        assert ".git/modules/vendor/lib: remote origin is configured" in problems


def test_trees_differ_between_commits(
    images_by_name: dict[str, FixtureImage], reference_trees: ReferenceTrees
) -> None:
    first = reference_trees[images_by_name["aiohttp-1"].ref]
    second = reference_trees[images_by_name["aiohttp-2"].ref]
    assert first != second
    assert fx.diff_snapshots(first, second)


def test_docker_cp_tree_fails_without_testbed(
    no_testbed_image: FixtureImage, tmp_path: Path
) -> None:
    with pytest.raises(FixtureError):
        docker_cp_tree(no_testbed_image.ref, tmp_path / "out")
    assert not image_exists(no_testbed_image.ref)


def test_missing_image_is_not_in_the_registry(missing_image: str, tmp_path: Path) -> None:
    assert fx.registry_labels(missing_image) is None
    with pytest.raises(FixtureError):
        docker_cp_tree(missing_image, tmp_path / "out")


def test_leftover_containers_finds_labelled_containers(
    fixture_images: list[FixtureImage], tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    assert leftover_containers(cache_dir) == []
    image = fixture_images[0].ref
    pulled = not image_exists(image)
    if pulled:
        docker("pull", "--quiet", image)
    created = docker(
        "create", "--label", f"{CACHE_DIR_LABEL}={cache_dir}", image, "/bin/sh", "-c", "true"
    )
    container = created.stdout.decode().strip()
    try:
        assert leftover_containers(cache_dir) == [container]
        assert leftover_containers(str(cache_dir)) == [container]
        assert leftover_containers(tmp_path / "other") == []
    finally:
        docker("rm", "-f", container, check=False)
        if pulled:
            docker("rmi", image, check=False)
    assert leftover_containers(cache_dir) == []
