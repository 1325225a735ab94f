"""The registry backend: one pull gate, one manifest per image, and trees equal to docker cp."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from asynccache.api import cache_repos
from asynccache.errors import (
    DigestMismatch,
)
from asynccache.tree.digest import tree_stats
from tests.support import oci_fixtures as oci
from tests.support.cli_runner import instance_id
from tests.support.cli_runner import run_cli as run_asynccache
from tests.support.fake_registry import (
    FakeRegistry,
    backend,
    entry_for,
    extract,
    fake_registry,
    fast_gate,
    sample_image,
)
from tests.support.fixtures import (
    FixtureError,
    FixtureImage,
    ReferenceTrees,
    assert_deduplicated,
    diff_deduplicated,
    diff_snapshots,
    row_for,
    snapshot_tree,
    write_dataset,
)
from tests.support.oci_fixtures import file, folder, hardlink, layer, opaque, symlink, whiteout

Dataset = tuple[Path, str, list[dict[str, Any]]]


@pytest.mark.anyio
async def test_rate_limits_pause_the_gate_then_go_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    registry = FakeRegistry(manifest_429=2, blob_429=1)
    registry.add("proj/app", "v1", sample_image())
    gate = fast_gate()
    caplog.set_level(logging.INFO, logger="asynccache")
    async with fake_registry(registry) as host, backend(tmp_path, pull_gate=gate) as source:
        got = await extract(source, f"{host}/proj/app:v1", tmp_path / "d")
    assert got == {"a.txt": "a-one", "c.txt": "c"}
    assert gate.pauses == 3
    assert registry.counts["GET manifests"] == 3
    assert "42 pulls left of 100 (ratelimit-remaining)" in caplog.text


@pytest.mark.anyio
async def test_manifest_is_fetched_once_per_image_across_retries(tmp_path: Path) -> None:
    registry = FakeRegistry()
    image = sample_image()
    registry.add("proj/app", "v1", image)
    registry.corrupt.add(oci.sha256(oci.layer(folder("etc"), file("etc/os-release", "fake")).blob))
    async with fake_registry(registry) as host, backend(tmp_path) as source:
        for attempt in range(2):
            with pytest.raises(DigestMismatch):
                await extract(source, f"{host}/proj/app:v1", tmp_path / f"try{attempt}")
        assert registry.counts["GET manifests"] == 1
        assert registry.counts["HEAD manifests"] == 1
        await source.after_extraction(entry_for(f"{host}/proj/app:v1"))
        registry.corrupt.clear()
        await extract(source, f"{host}/proj/app:v1", tmp_path / "ok")
    assert registry.counts["GET manifests"] == 2


@pytest.mark.anyio
async def test_blob_with_a_wrong_digest_fails_and_nothing_is_published(tmp_path: Path) -> None:
    registry = FakeRegistry()
    image = sample_image()
    registry.add("proj/app", "v1", image)
    registry.add("proj/app", "good", sample_image("good"))
    testbed_layer = oci.layer(
        folder("testbed"), file("testbed/a.txt", "a-one"), file("testbed/b", "b")
    )
    registry.corrupt.add(oci.sha256(testbed_layer.blob))
    cache_dir = tmp_path / "cache"
    async with fake_registry(registry) as host:
        bad, good = f"{host}/proj/app:v1", f"{host}/proj/app:good"
        rows = [
            {"repo_name": "bad", "docker_image": bad, "commit_hash": "b" * 40},
            {"repo_name": "good", "docker_image": good, "commit_hash": "c" * 40},
        ]
        async with backend(tmp_path) as source:
            summary = await cache_repos(rows, cache_dir=cache_dir, source=source, concurrency=2)
    assert (summary.cached, summary.failed) == (1, 1)
    (failure,) = summary.failures
    assert failure.instance_id == "bad__bbbbbbbbbbbb"
    assert "does not match its digest" in failure.reason
    assert sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith(".")) == [
        "failures.json",
        "good__cccccccccccc",
        "index.json",
    ]
    assert list(json.loads((cache_dir / "index.json").read_text())) == ["good__cccccccccccc"]
    assert list((cache_dir / ".tmp").iterdir()) == []
    cached_blobs = [p.name for p in (cache_dir / ".layers").iterdir() if p.name.startswith("sha")]
    assert oci.sha256(testbed_layer.blob).replace(":", "-") not in cached_blobs


# --- against the loopback registry ------------------------------------------------------------


def run_cli(
    *args: str | Path, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_asynccache(
        "--backend", "registry", *args, DOCKER_HOST="unix:///nonexistent", **(env or {})
    )


@pytest.mark.parametrize("dedup", [True, False], ids=["dedup", "no_dedup"])
def test_cli_registry_backend_gives_the_docker_cp_tree_of_every_fixture_image(
    tmp_path: Path,
    sample_dataset: Dataset,
    fixture_images: list[FixtureImage],
    reference_trees: ReferenceTrees,
    dedup: bool,
) -> None:
    """With --no_dedup, exactly; with dedup, the same but for equal files sharing an inode."""
    dataset_dir, split, _rows = sample_dataset
    cache_dir = tmp_path / "cache"
    flags = [] if dedup else ["--no_dedup"]
    done = run_cli(
        "--dataset",
        dataset_dir,
        "--split",
        split,
        "--cache_dir",
        cache_dir,
        "--concurrency",
        "4",
        *flags,
    )
    assert done.returncode == 0, done.stderr
    assert f"Done: {len(fixture_images)} cached, 0 skipped, 0 failed" in done.stdout
    index = json.loads((cache_dir / "index.json").read_text())
    for image in fixture_images:
        key = instance_id(image.repo, image.commit_hash)
        cached = cache_dir / key
        expected = reference_trees.guarded(image.ref)
        actual = snapshot_tree(cached)
        if dedup:
            assert not diff_deduplicated(expected, cached), diff_deduplicated(expected, cached)
        else:
            assert actual == expected, diff_snapshots(expected, actual)
        assert (index[key]["file_count"], index[key]["size_bytes"]) == tree_stats(cached)
    if dedup:
        keys = [instance_id(image.repo, image.commit_hash) for image in fixture_images]
        trees = [cache_dir / key for key in keys]
        assert_deduplicated(cache_dir, trees, [index[key] for key in keys])
    assert list((cache_dir / ".tmp").iterdir()) == []


# Hand-built images: (tag, image or index, expected tree, can dockerd 20.10 pull it).
Expected = dict[str, tuple[Any, ...]]


def expected_snapshot(spec: Expected) -> dict[str, tuple[Any, ...]]:
    """spec values: ("file", mode, content[, group]) | ("dir", mode) | ("symlink", target)."""
    out: dict[str, tuple[Any, ...]] = {}
    for rel, value in spec.items():
        if value[0] == "file":
            group = value[3] if len(value) > 3 else None
            out[rel] = ("file", value[1], hashlib.sha256(value[2]).hexdigest(), group)
        elif value[0] == "dir":
            out[rel] = ("dir", value[1], None, None)
        else:
            out[rel] = ("symlink", None, value[1], None)
    return out


def _whiteouts_image() -> oci.Built:
    return oci.build_image(
        [
            layer(
                folder("etc"), file("etc/os-release", "ocitest"), file("usr/bin/tool", "t", 0o755)
            ),
            layer(
                folder("testbed"),
                file("testbed/keep.txt", "keep"),
                file("testbed/gone.txt", "gone"),
                folder("testbed/gone_dir"),
                file("testbed/gone_dir/a", "a"),
                folder("testbed/opaque"),
                file("testbed/opaque/old1", "old1"),
                folder("testbed/opaque/sub"),
                file("testbed/opaque/sub/old2", "old2"),
                file("testbed/flip", "flip-1"),
                folder("testbed/flop"),
                file("testbed/flop/inner.txt", "inner"),
                symlink("testbed/link", "keep.txt"),
                folder("testbed/.venv"),
                folder("testbed/.venv/bin"),
                symlink("testbed/.venv/bin/python", "/usr/bin/python3"),
                folder("testbed/private", 0o700),
                file("testbed/private/key", "k", 0o600),
            ),
            layer(
                folder("testbed"),
                whiteout("testbed/gone.txt"),
                whiteout("testbed/gone_dir"),
                folder("testbed/opaque"),
                file("testbed/opaque/new1", "new1"),
                opaque("testbed/opaque"),
                folder("testbed/flip"),
                file("testbed/flip/inside.txt", "inside"),
                file("testbed/flop", "flop-file"),
                file("testbed/link", "now a file"),
                folder("testbed/new_dir"),
                folder("testbed/new_dir/deep"),
                file("testbed/new_dir/deep/file.txt", "deep"),
            ),
            layer(
                folder("testbed"),
                file("testbed/flip", "flip-2", 0o755),
                folder("testbed/flop", 0o750),
                file("testbed/flop/again.txt", "again"),
            ),
        ]
    )


WHITEOUTS_TREE: Expected = {
    "keep.txt": ("file", 0o644, b"keep"),
    "opaque": ("dir", 0o755),
    "opaque/new1": ("file", 0o644, b"new1"),
    "flip": ("file", 0o755, b"flip-2"),
    "flop": ("dir", 0o750),
    "flop/again.txt": ("file", 0o644, b"again"),
    "link": ("file", 0o644, b"now a file"),
    ".venv": ("dir", 0o755),
    ".venv/bin": ("dir", 0o755),
    ".venv/bin/python": ("symlink", "/usr/bin/python3"),
    "private": ("dir", 0o700),
    "private/key": ("file", 0o600, b"k"),
    "new_dir": ("dir", 0o755),
    "new_dir/deep": ("dir", 0o755),
    "new_dir/deep/file.txt": ("file", 0o644, b"deep"),
}


def _uvlinks_image() -> oci.Built:
    return oci.build_image(
        [
            layer(folder("etc"), file("etc/os-release", "ocitest")),
            layer(
                folder("root"),
                folder("root/.cache"),
                folder("root/.cache/uv"),
                file("root/.cache/uv/mod.py", "mod = 1\n", 0o644),
                file("root/.cache/uv/data.bin", "data"),
                folder("testbed"),
                file("testbed/own.txt", "own"),
                hardlink("testbed/own_link", "testbed/own.txt"),
                folder("testbed/.venv"),
                hardlink("testbed/.venv/data.bin", "root/.cache/uv/data.bin"),
                hardlink("testbed/.venv/mod.py", "root/.cache/uv/mod.py"),
                hardlink("testbed/.venv/mod2.py", "root/.cache/uv/mod.py"),
            ),
        ]
    )


UVLINKS_TREE: Expected = {
    "own.txt": ("file", 0o644, b"own", "own.txt"),
    "own_link": ("file", 0o644, b"own", "own.txt"),
    ".venv": ("dir", 0o755),
    ".venv/data.bin": ("file", 0o644, b"data"),
    ".venv/mod.py": ("file", 0o644, b"mod = 1\n", ".venv/mod.py"),
    ".venv/mod2.py": ("file", 0o644, b"mod = 1\n", ".venv/mod.py"),
}


def _lowerlink_image() -> oci.Built:
    return oci.build_image(
        [
            layer(folder("testbed"), file("testbed/base.txt", "base")),
            layer(folder("testbed"), hardlink("testbed/hard", "testbed/base.txt")),
        ]
    )


LOWERLINK_TREE: Expected = {
    "base.txt": ("file", 0o644, b"base", "base.txt"),
    "hard": ("file", 0o644, b"base", "base.txt"),
}


def _compressions_image(second: oci.Compression, oci_manifest: bool) -> oci.Built:
    return oci.build_image(
        [
            layer(folder("testbed"), file("testbed/a.txt", "a"), file("testbed/z.txt", "z")),
            layer(
                folder("testbed"),
                file("testbed/b.txt", f"b-{second}"),
                whiteout("testbed/a.txt"),
                compression=second,
            ),
            layer(file("etc/hostname", "h"), compression="none"),
        ],
        oci=oci_manifest,
    )


def compressions_tree(second: str) -> Expected:
    return {
        "b.txt": ("file", 0o644, f"b-{second}".encode()),
        "z.txt": ("file", 0o644, b"z"),
    }


def _arch_image(arch: str, variant: str = "") -> oci.Built:
    return oci.build_image(
        [layer(folder("testbed"), file("testbed/arch.txt", arch))],
        oci=True,
        architecture=arch,
        variant=variant,
    )


@dataclass(frozen=True)
class HandBuilt:
    """A pushed hand-built image and what its /testbed must be."""

    name: str
    ref: str
    tree: Expected
    dockerd_can_pull: bool

    @property
    def commit(self) -> str:
        return hashlib.sha1(self.ref.encode()).hexdigest()

    @property
    def instance_id(self) -> str:
        return instance_id(self.name, self.commit)


@pytest.fixture(scope="module")
def hand_built(docker_services: str) -> dict[str, HandBuilt]:
    """Hand-built images pushed under {registry}/ocitest/layers with the registry's HTTP API."""
    registry, repo = docker_services, f"{oci.NAMESPACE}/layers"
    specs: list[tuple[str, Any, Expected, bool]] = [
        ("whiteouts", _whiteouts_image(), WHITEOUTS_TREE, True),
        ("uvlinks", _uvlinks_image(), UVLINKS_TREE, True),
        ("lowerlink", _lowerlink_image(), LOWERLINK_TREE, False),
        ("zstd", _compressions_image("zstd", True), compressions_tree("zstd"), False),
        ("plain", _compressions_image("none", False), compressions_tree("none"), True),
        (
            "multiarch",
            {"linux/amd64": _arch_image("amd64"), "linux/arm64/v8": _arch_image("arm64", "v8")},
            {"arch.txt": ("file", 0o644, b"amd64")},
            True,
        ),
    ]
    found: dict[str, HandBuilt] = {}
    for name, image, tree, pullable in specs:
        if isinstance(image, dict):
            ref = oci.push_index(registry, repo, name, image)
        else:
            ref = oci.push_image(registry, repo, name, image)
        found[name] = HandBuilt(name, ref, tree, pullable)
    return found


def test_hand_built_layers_give_the_stated_trees(
    tmp_path: Path, hand_built: dict[str, HandBuilt]
) -> None:
    rows = [row_for(item.ref, item.name, item.commit) for item in hand_built.values()]
    write_dataset(tmp_path / "dataset", rows, "train")
    cache_dir = tmp_path / "cache"
    done = run_cli(
        "--dataset", tmp_path / "dataset", "--cache_dir", cache_dir, "--concurrency", "4"
    )
    assert done.returncode == 0, done.stderr
    assert f"Done: {len(rows)} cached, 0 skipped, 0 failed" in done.stdout
    for item in hand_built.values():
        expected = expected_snapshot(item.tree)
        found = diff_deduplicated(expected, cache_dir / item.instance_id)
        assert not found, f"{item.name}:\n{found}"

    arm = run_cli(
        "--dataset",
        tmp_path / "dataset",
        "--cache_dir",
        tmp_path / "arm",
        "--platform",
        "linux/arm64",
    )
    assert arm.returncode == 0, arm.stderr
    multiarch = hand_built["multiarch"]
    assert (tmp_path / "arm" / multiarch.instance_id / "arch.txt").read_text() == "arm64"


def test_hand_built_layers_match_docker_cp_where_dockerd_pulls_them(
    hand_built: dict[str, HandBuilt], reference_trees: ReferenceTrees
) -> None:
    compared = []
    for item in hand_built.values():
        if not item.dockerd_can_pull:
            continue
        try:
            reference = reference_trees[item.ref]
        except FixtureError as exc:
            pytest.fail(f"dockerd could not give {item.name}: {exc}")
        expected = expected_snapshot(item.tree)
        assert reference == expected, f"{item.name}:\n{diff_snapshots(expected, reference)}"
        compared.append(item.name)
    assert compared == ["whiteouts", "uvlinks", "plain", "multiarch"]
