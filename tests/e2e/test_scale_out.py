"""The scale-out examples as they are: a Slurm array of ``sbatch`` on this machine's Slurm, and
the Kubernetes Indexed Job's command run once per completion index, against the loopback
registry with ``--backend registry``. Each must give the cache a one-process run gives, with
every image's manifest fetched once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

from tests.support.cli_runner import ROOT, cli_env, run_cli
from tests.support.cli_runner import instance_id as default_instance_id
from tests.support.fixtures import (
    FixtureImage,
    ReferenceTrees,
    diff_deduplicated,
    row_for,
    snapshot_tree,
    write_dataset,
)
from tests.support.registry_proxy import RegistryProxy, registry_proxy

SBATCH = ROOT / "examples" / "slurm" / "cache-array.sbatch"
INDEXED_JOB = ROOT / "examples" / "kubernetes" / "cache-indexed-job.yaml"
#: What differs between two runs that cached the same entry.
#: Fields that differ between runs of the same entries: where and when, and (with dedup) how
#: many files an extraction wrote or linked, which depends on what the store held already.
RUN_FIELDS = {"cache_path", "seconds", "cached_at", "files_written", "files_linked"}


def proxied_dataset(tmp_path: Path, images: list[FixtureImage], proxy: RegistryProxy) -> Path:
    """A local split whose images are pulled through the counting proxy."""
    rows = [
        row_for(
            image.ref.replace(image.ref.split("/", 1)[0], proxy.address, 1),
            image.repo,
            image.commit_hash,
        )
        for image in images
    ]
    folder = tmp_path / "dataset"
    write_dataset(folder, rows, "train")
    return folder


def one_process_run(dataset: Path, cache_dir: Path) -> float:
    """The reference: the whole split in one process; returns its wall time."""
    started = time.monotonic()
    run = run_cli(
        "--dataset",
        dataset,
        "--cache_dir",
        cache_dir,
        "--backend",
        "registry",
        "--concurrency",
        "2",
    )
    assert run.returncode == 0, run.stderr
    return time.monotonic() - started


def assert_same_cache(
    merged_dir: Path,
    single_dir: Path,
    images: list[FixtureImage],
    reference_trees: ReferenceTrees,
) -> None:
    """Same index entries as the one-process run, every tree identical (docker cp's, guarded)."""
    merged = json.loads((merged_dir / "index.json").read_text())
    single = json.loads((single_dir / "index.json").read_text())
    assert sorted(merged) == sorted(single)
    assert len(merged) == len(images)
    for key, record in single.items():
        assert {k: v for k, v in merged[key].items() if k not in RUN_FIELDS} == {
            k: v for k, v in record.items() if k not in RUN_FIELDS
        }
    for image in images:
        key = default_instance_id(image.repo, image.commit_hash)
        tree = snapshot_tree(merged_dir / key, hardlinks=False)
        assert tree == snapshot_tree(single_dir / key, hardlinks=False)
        found = diff_deduplicated(reference_trees.guarded(image.ref), merged_dir / key)
        assert not found, found


def assert_each_manifest_once(gets: Counter[str], images: list[FixtureImage]) -> None:
    expected = {image.ref.split("/", 1)[1] for image in images}
    assert set(gets) == expected
    assert set(gets.values()) == {1}, gets


def test_slurm_array_of_the_example_equals_a_one_process_run(
    slurm_cluster: str,
    docker_services: str,
    fixture_images: list[FixtureImage],
    reference_trees: ReferenceTrees,
    tmp_path: Path,
) -> None:
    with registry_proxy(docker_services) as proxy:
        dataset = proxied_dataset(tmp_path, fixture_images, proxy)
        single_seconds = one_process_run(dataset, tmp_path / "single")
        proxy.faults.requests.clear()

        cache_dir = tmp_path / "cache"
        workdir = tmp_path / "slurm"
        workdir.mkdir()
        env = cli_env(
            DATASET=str(dataset),
            SPLIT="train",
            CACHE_DIR=str(cache_dir),
            BACKEND="registry",
            CONCURRENCY="2",
            PYTHON=sys.executable,
        )
        started = time.monotonic()
        submitted = subprocess.run(
            ["sbatch", "--export=ALL", "--wait", "--array=0-3", str(SBATCH)],
            capture_output=True,
            text=True,
            env=env,
            cwd=workdir,
            timeout=900,
            check=False,
        )
        array_seconds = time.monotonic() - started
        outputs = {path.name: path.read_text() for path in sorted(workdir.glob("asynccache-*.out"))}
        assert submitted.returncode == 0, f"{submitted.stderr}\n{outputs}"
        gets = proxy.faults.manifest_gets()

    assert len(outputs) == 4
    for index in range(4):
        (text,) = [text for name, text in outputs.items() if name.endswith(f"_{index}.out")]
        assert f"shard {index}/4: Done: " in text, text
        assert f"shard {index}/4: " in text.split("Done: ")[0], "progress names the shard"
    assert_each_manifest_once(gets, fixture_images)
    assert_same_cache(cache_dir, tmp_path / "single", fixture_images, reference_trees)
    merge = run_cli("merge", "--cache_dir", cache_dir)
    assert merge.returncode == 0, merge.stdout
    assert "shards: 4/4 done" in merge.stdout
    print(f"\none process: {single_seconds:.1f} s; 4-task Slurm array: {array_seconds:.1f} s")


def indexed_job() -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest's Job and PersistentVolumeClaim."""
    documents = {doc["kind"]: doc for doc in yaml.safe_load_all(INDEXED_JOB.read_text())}
    return documents["Job"], documents["PersistentVolumeClaim"]


def test_the_indexed_job_manifest_holds_together() -> None:
    job, claim = indexed_job()
    spec = job["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["ASYNCCACHE_SHARD_COUNT"])
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert volumes["cache"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    assert env["CACHE_DIR"].startswith(mounts["cache"] + "/")
    secret = volumes["docker-config"]["secret"]
    assert [item["key"] for item in secret["items"]] == ["config.json"]
    assert mounts["docker-config"] == f"{env['HOME']}/.docker"  # ~/.docker/config.json
    script = " ".join(container["command"])
    assert "--backend registry" in script and "--shard auto" in script
    assert "asynccache merge" in script
    assert "privileged" not in json.dumps(job)


def test_the_indexed_job_command_per_completion_index_equals_a_one_process_run(
    docker_services: str,
    fixture_images: list[FixtureImage],
    reference_trees: ReferenceTrees,
    tmp_path: Path,
) -> None:
    job, _claim = indexed_job()
    (container,) = job["spec"]["template"]["spec"]["containers"]
    completions = int(job["spec"]["completions"])
    home = tmp_path / "home"
    (home / ".docker").mkdir(parents=True)
    (home / ".docker" / "config.json").write_text('{"auths": {}}')
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)  # the image's `python`
    with registry_proxy(docker_services) as proxy:
        dataset = proxied_dataset(tmp_path, fixture_images, proxy)
        one_process_run(dataset, tmp_path / "single")
        proxy.faults.requests.clear()
        cache_dir = tmp_path / "cache"
        env = {item["name"]: item["value"] for item in container["env"]}
        env.update(
            DATASET=str(dataset),
            CACHE_DIR=str(cache_dir),
            CONCURRENCY="2",
            HOME=str(home),
            HF_HOME=str(tmp_path / "hf"),
            PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        )

        def pod(index: int) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                container["command"],
                capture_output=True,
                text=True,
                env=cli_env(**env, JOB_COMPLETION_INDEX=str(index)),
                timeout=600,
                check=False,
            )

        with ThreadPoolExecutor(max_workers=8) as pool:
            pods = list(pool.map(pod, range(completions)))
        gets = proxy.faults.manifest_gets()
    for index, done in enumerate(pods):
        assert done.returncode == 0, done.stderr
        assert f"shard {index}/{completions}: Done: " in done.stdout
    assert_each_manifest_once(gets, fixture_images)
    assert_same_cache(cache_dir, tmp_path / "single", fixture_images, reference_trees)
