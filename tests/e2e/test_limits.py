"""Hostile images through the command line: bombs, floods, trickling registries, planted links.

Each bad entry fails on its own with a one-line reason while the others are cached, and
nothing of it stays behind (work folders, partial downloads, blobs, containers, images).
Images are pushed to the loopback registry under ``ocitest/harden-limits``.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import tarfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import zstandard

from tests.support import oci_fixtures as oci
from tests.support.cli_runner import instance_id, run_cli
from tests.support.fixtures import (
    ReferenceTrees,
    image_exists,
    row_for,
    snapshot_tree,
    write_dataset,
)
from tests.support.oci_fixtures import file, folder
from tests.support.registry_proxy import registry_proxy

REPOSITORY = f"{oci.NAMESPACE}/harden-limits"
MiB = 1 << 20


def zeros_layer(name: str, size: int, compression: oci.Compression) -> oci.BuiltLayer:
    """A layer holding testbed/ and a file of size zero bytes, compressed as it is made."""
    folder_info = tarfile.TarInfo("testbed")
    folder_info.type, folder_info.mode, folder_info.mtime = tarfile.DIRTYPE, 0o755, oci.MTIME
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, oci.MTIME
    head = folder_info.tobuf(tarfile.PAX_FORMAT) + info.tobuf(tarfile.PAX_FORMAT)
    tail = b"\0" * (-size % 512) + b"\0" * 1024
    if compression == "gzip":
        gzip = zlib.compressobj(9, zlib.DEFLATED, 31)
        compress, flush = gzip.compress, gzip.flush
    else:
        zstd = zstandard.ZstdCompressor(level=3).compressobj()
        compress, flush = zstd.compress, zstd.flush
    diff = hashlib.sha256(head)
    parts = [compress(head)]
    block = bytes(MiB)
    for start in range(0, size, MiB):
        piece = block[: min(MiB, size - start)]
        diff.update(piece)
        parts.append(compress(piece))
    diff.update(tail)
    parts += [compress(tail), flush()]
    return oci.BuiltLayer(b"".join(parts), "sha256:" + diff.hexdigest(), compression)


def flood_layer(count: int) -> oci.Layer:
    """A layer of count empty files under /testbed."""
    return oci.layer(folder("testbed"), *(file(f"testbed/f{n:06d}") for n in range(count)))


def writable_layer() -> oci.Layer:
    """Files and folders writable by others, and extended attributes (a capability too)."""
    tool = file("testbed/tool", "#!/bin/sh\n", 0o755)
    tool.pax_headers = {
        "SCHILY.xattr.user.origin": "image",
        # VFS_CAP_REVISION_2 with cap_net_raw permitted and effective
        "SCHILY.xattr.security.capability": "\x01\x00\x00\x02\x00\x20\x00\x00" + "\x00" * 12,
    }
    return oci.layer(
        folder("testbed", 0o777),
        folder("testbed/shared", 0o777),
        file("testbed/shared/open.txt", "open", 0o666),
        file("testbed/kept.txt", "kept", 0o644),
        tool,
    )


def good_layer(text: str) -> oci.Layer:
    return oci.layer(folder("testbed"), file("testbed/README", text))


@dataclass(frozen=True)
class Pushed:
    name: str
    ref: str
    commit: str

    @property
    def instance_id(self) -> str:
        return instance_id(self.name, self.commit)

    def row(self, ref: str | None = None) -> dict[str, Any]:
        return row_for(ref or self.ref, self.name, self.commit)


@pytest.fixture(scope="module")
def pushed(docker_services: str) -> dict[str, Pushed]:
    """The hostile and the good images, pushed once."""
    base = oci.layer(folder("etc"), file("etc/os-release", "limits"))
    # 1 GiB of zeros: about 1 MiB as gzip (deflate's ratio is at most about 1:1000), 32 KiB as
    # zstd
    gzip_bomb = zeros_layer("testbed/zeros", 1 << 30, "gzip")
    zstd_bomb = zeros_layer("testbed/zeros", 1 << 30, "zstd")
    assert len(gzip_bomb.blob) < 1100 * 1024 and len(zstd_bomb.blob) < 40 * 1024
    layers: dict[str, list[oci.Layer | oci.BuiltLayer]] = {
        "good": [base, good_layer("good")],
        "other": [base, good_layer("other")],
        "gzipbomb": [base, gzip_bomb],
        "zstdbomb": [base, zstd_bomb],
        "smallbomb": [base, zeros_layer("testbed/zeros", 256 * MiB, "gzip")],
        "flood": [base, flood_layer(30_000)],
        "writable": [base, writable_layer()],
        # cut inside the README's data: the blob is intact (its digest holds), its tar is not
        "truncated": [base, oci.Layer(good_layer("cut").tar[: 512 * 2 + 100], "gzip")],
    }
    found = {}
    for number, (name, image_layers) in enumerate(layers.items()):
        ref = oci.push_image(docker_services, REPOSITORY, name, oci.build_image(image_layers))
        found[name] = Pushed(name, ref, f"{number + 1:x}" * 40)
    return found


def dataset(tmp_path: Path, rows: list[dict[str, Any]]) -> Path:
    folder_path = tmp_path / "dataset"
    write_dataset(folder_path, rows, "train")
    return folder_path


def failures(cache_dir: Path) -> dict[str, str]:
    recorded = json.loads((cache_dir / "failures.json").read_text())
    return {key: value["reason"] for key, value in recorded.items()}


def left_behind(cache_dir: Path, layers: Path | None = None) -> list[str]:
    """Work in progress in the cache folder, and partial downloads in the layer cache."""
    found = [str(path) for path in (cache_dir / ".tmp").iterdir()]
    partial = (layers or Path(os.environ["ASYNCCACHE_LAYER_CACHE_DIR"])) / ".partial"
    if partial.exists():  # a folder per shard or worker process may stay, empty
        found += [str(path) for path in partial.rglob("*") if not path.is_dir()]
    return found


def world_writable(root: Path) -> list[str]:
    found = []
    for current, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            info = os.lstat(os.path.join(current, name))
            if not stat.S_ISLNK(info.st_mode) and info.st_mode & 0o002:
                found.append(name)
    return found


@pytest.fixture
def victim(tmp_path: Path) -> Iterator[Path]:
    """A folder outside the cache holding files named as the blob cache names its own."""
    outside = tmp_path / "victim"
    (outside / ".partial").mkdir(parents=True)
    (outside / ".partial" / "sha256-1.abcd").write_text("partial")
    hours_ago = time.time() - 7200  # as old as a partial download of a run long gone
    os.utime(outside / ".partial" / "sha256-1.abcd", (hours_ago, hours_ago))
    (outside / ("sha256-" + "1" * 64)).write_text("blob")
    (outside / "untouched").write_text("")
    yield outside


def state(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {
        str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("processes", ["1", "2"])
def test_hostile_layers_fail_their_own_entries_with_the_registry_backend(
    tmp_path: Path, pushed: dict[str, Pushed], victim: Path, processes: str
) -> None:
    names = ["good", "gzipbomb", "zstdbomb", "flood", "writable", "truncated"]
    rows = [pushed[name].row() for name in names]
    cache_dir = tmp_path / "cache"
    layers = tmp_path / "layers"  # a layer cache other local users can write to
    layers.mkdir()
    (layers / ".partial").symlink_to(victim / ".partial")  # planted by one of them
    (layers / "untouched").symlink_to(victim / "untouched")
    before = state(victim)
    started = time.monotonic()
    done = run_cli(
        "--backend", "registry",
        "--dataset", dataset(tmp_path, rows),
        "--cache_dir", cache_dir,
        "--layer_cache_dir", layers,
        "--concurrency", "3",
        "--processes", processes,
        "--max_testbed_bytes", "64M",
        "--max_testbed_files", "10000",
        DOCKER_HOST="unix:///nonexistent",
    )  # fmt: skip
    seconds = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    assert "Done: 2 cached, 0 skipped, 4 failed" in done.stdout
    reasons = failures(cache_dir)
    bytes_reason = (
        "refused: more than 64.0 MiB of uncompressed archive data (--max_testbed_bytes "
        "67108864); raise --max_testbed_bytes if the image is genuine"
    )
    assert reasons[pushed["gzipbomb"].instance_id] == bytes_reason
    assert reasons[pushed["zstdbomb"].instance_id] == bytes_reason
    assert reasons[pushed["flood"].instance_id] == (
        "refused: more than 10000 archive members (--max_testbed_files 10000); "
        "raise --max_testbed_files if the image is genuine"
    )
    assert "ended" in reasons[pushed["truncated"].instance_id]
    for name in ("gzipbomb", "zstdbomb", "flood"):
        line = f"FAILED {pushed[name].instance_id}: refused: more than"
        assert line in done.stderr
    assert (cache_dir / pushed["good"].instance_id / "README").read_text() == "good"
    writable = cache_dir / pushed["writable"].instance_id
    assert world_writable(writable) == []
    assert os.listxattr(writable / "tool") == []
    assert f"{pushed['writable'].instance_id}: dropped write permission for others" in done.stderr
    assert f"{pushed['writable'].instance_id}: testbed/tool: dropped its file capabilities" in (
        done.stderr
    )
    # nothing of the failed entries stays behind, and nothing outside was touched
    kept = sorted(path.name for path in cache_dir.iterdir() if not path.name.startswith("."))
    assert kept == sorted(
        ["failures.json", "index.json", pushed["good"].instance_id, writable.name]
    )
    assert left_behind(cache_dir, layers) == []
    assert not (layers / ".partial").is_symlink() and not (layers / "untouched").is_symlink()
    assert state(victim) == before
    blobs = [path.name for path in layers.iterdir() if path.is_file()]
    assert all(len(name) < 80 for name in blobs)
    assert seconds < 300  # no bomb was inflated to its end (each is 1 GiB)


def test_a_trickling_registry_cannot_hold_a_worker(
    tmp_path: Path, pushed: dict[str, Pushed], docker_services: str
) -> None:
    with registry_proxy(docker_services) as proxy:
        proxy.faults.bytes_per_second = 1
        slow = pushed["other"].ref.replace(docker_services, proxy.address, 1)
        rows = [pushed["good"].row(), pushed["other"].row(slow)]
        cache_dir = tmp_path / "cache"
        started = time.monotonic()
        done = run_cli(
            "--backend", "registry",
            "--dataset", dataset(tmp_path, rows),
            "--cache_dir", cache_dir,
            "--pull_timeout", "2",
            DOCKER_HOST="unix:///nonexistent",
            timeout=300,
        )  # fmt: skip
        seconds = time.monotonic() - started
    assert done.returncode == 1, done.stderr
    assert "Done: 1 cached, 0 skipped, 1 failed" in done.stdout
    assert failures(cache_dir)[pushed["other"].instance_id] == (
        f"reading /testbed of {slow} from its registry took longer than 2 s; raise --pull_timeout"
    )
    assert (cache_dir / pushed["good"].instance_id / "README").read_text() == "good"
    assert left_behind(cache_dir) == []
    assert seconds < 120  # six tries of 2 s and their waits, not the registry's pace


def test_hostile_images_fail_their_own_entries_with_the_docker_backend(
    tmp_path: Path,
    pushed: dict[str, Pushed],
    reference_trees: ReferenceTrees,
    leftover_containers: Callable[[Path | str], list[str]],
) -> None:
    names = ["good", "smallbomb", "flood", "writable"]
    rows = [pushed[name].row() for name in names]
    for name in names:  # pulled by this run, so that it removes them again
        subprocess.run(["docker", "rmi", "-f", pushed[name].ref], capture_output=True, check=False)
    cache_dir = tmp_path / "cache"
    done = run_cli(
        "--dataset", dataset(tmp_path, rows),
        "--cache_dir", cache_dir,
        "--concurrency", "2",
        "--max_testbed_bytes", "32MiB",
        "--max_testbed_files", "10000",
    )  # fmt: skip
    assert done.returncode == 1, done.stderr
    assert "Done: 2 cached, 0 skipped, 2 failed" in done.stdout
    reasons = failures(cache_dir)
    assert reasons[pushed["smallbomb"].instance_id].startswith(
        "refused: more than 32.0 MiB of uncompressed archive data (--max_testbed_bytes 33554432)"
    )
    assert reasons[pushed["flood"].instance_id].startswith(
        "refused: more than 10000 archive members (--max_testbed_files 10000)"
    )
    writable = cache_dir / pushed["writable"].instance_id
    assert world_writable(writable) == []
    assert f"{pushed['writable'].instance_id}: dropped write permission for others" in done.stderr
    assert left_behind(cache_dir) == []
    assert leftover_containers(cache_dir) == []
    assert not any(image_exists(pushed[name].ref) for name in names)
    # docker cp gives no user.* attribute (its archive only carries file capabilities), and
    # the two backends give the same tree
    reference = reference_trees.path(pushed["writable"].ref)
    assert "user.origin" not in os.listxattr(reference / "tool")
    assert os.listxattr(writable / "tool") == []
    registry = tmp_path / "registry"
    again = run_cli(
        "--backend", "registry",
        "--dataset", dataset(tmp_path / "again", [pushed["writable"].row()]),
        "--cache_dir", registry,
        DOCKER_HOST="unix:///nonexistent",
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert snapshot_tree(registry / writable.name) == snapshot_tree(writable)


def test_the_limits_are_options_with_variables(tmp_path: Path) -> None:
    done = run_cli("run", "--help")
    assert "--max_testbed_bytes BYTES" in done.stdout
    assert "ASYNCCACHE_MAX_TESTBED_FILES" in done.stdout
    bad = run_cli("--max_testbed_bytes", "lots", "--dry_run", "--cache_dir", tmp_path)
    assert bad.returncode == 2
    assert "not a byte count: 'lots'" in bad.stderr
    env = run_cli("--dry_run", "--cache_dir", tmp_path, ASYNCCACHE_MAX_TESTBED_FILES="0")
    assert env.returncode == 2
    assert "--max_testbed_files (from ASYNCCACHE_MAX_TESTBED_FILES=0) must be at least 1" in (
        env.stderr
    )
