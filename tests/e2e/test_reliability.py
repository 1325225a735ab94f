"""Never lose or corrupt the cache: locks, crashes, signals, faults, rate limits, disks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from asynccache.cache.index import read_index
from asynccache.entries import Entry
from asynccache.sources.docker import DockerBackend
from tests.support.cli_runner import ROOT, cli_env, run_cli, start_cli
from tests.support.cli_runner import instance_id as default_instance_id
from tests.support.daemon_relay import DaemonRelay, daemon_relay
from tests.support.fixtures import (
    FixtureImage,
    ReferenceTrees,
    diff_deduplicated,
    row_for,
    write_dataset,
)
from tests.support.registry_proxy import RegistryProxy, registry_proxy


def require_root(why: str) -> None:
    """Skip a test that needs root outside CI; under CI (run as root) fail instead."""
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run as root: this test {why}")
        pytest.skip(why)


def instance_id(image: FixtureImage) -> str:
    return default_instance_id(image.repo, image.commit_hash)


def proxied(image: FixtureImage, proxy: RegistryProxy) -> str:
    return image.ref.replace(image.ref.split("/", 1)[0], proxy.address, 1)


def dataset_through(
    tmp_path: Path, images: list[FixtureImage], proxy: RegistryProxy | None
) -> Path:
    rows = [
        row_for(proxied(image, proxy) if proxy else image.ref, image.repo, image.commit_hash)
        for image in images
    ]
    dataset_dir = tmp_path / "dataset"
    write_dataset(dataset_dir, rows, "train")
    return dataset_dir


def wait_for(predicate: Callable[[], bool], timeout: float = 60, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def work_in_progress(cache_dir: Path) -> list[Path]:
    tmp = cache_dir / ".tmp"
    return list(tmp.iterdir()) if tmp.is_dir() else []


def extracting(cache_dir: Path) -> bool:
    """True when some work folder already holds extracted files."""
    return any(any(path.iterdir()) for path in work_in_progress(cache_dir) if path.is_dir())


def assert_cache_consistent(
    cache_dir: Path,
    images: list[FixtureImage],
    reference_trees: ReferenceTrees,
    leftover_containers: Callable[[Path], list[str]],
    foreign: frozenset[str] = frozenset(),
) -> dict[str, Any]:
    """index.json valid, every indexed folder complete and docker cp's with the history past HEAD
    removed, no leftovers.

    ``foreign`` names records a test planted without folders.
    """
    index = read_index(cache_dir / "index.json")
    by_id = {instance_id(image): image for image in images}
    for key in index.keys() - foreign:
        cached = cache_dir / key
        assert cached.is_dir(), f"{key} is indexed but its folder is missing"
        expected = reference_trees.guarded(by_id[key].ref)
        assert not diff_deduplicated(expected, cached), diff_deduplicated(expected, cached)
    assert leftover_containers(cache_dir) == []
    assert work_in_progress(cache_dir) == []
    return index


@pytest.fixture
def images(fixture_images: list[FixtureImage]) -> list[FixtureImage]:
    return fixture_images


# --- one run per cache folder ------------------------------------------------------------------


def test_second_run_on_the_same_cache_fails_at_once_naming_the_holder(
    tmp_path: Path, images: list[FixtureImage]
) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\n"
            "from asynccache.cache.layout import CacheDir\n"
            f"c = CacheDir({str(cache_dir)!r}); c.lock(); print('locked', flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "locked"
        dataset = dataset_through(tmp_path, images[:1], None)
        started = time.monotonic()
        done = run_cli("--dataset", dataset, "--cache_dir", cache_dir)
        assert time.monotonic() - started < 30
        assert done.returncode == 2
        assert f"in use by process {holder.pid}" in done.stderr
        assert done.stderr.strip().count("\n") == 0
    finally:
        holder.kill()
        holder.wait()
    # The kernel releases the lock with the process: the next run works.
    done = run_cli("--dataset", dataset, "--cache_dir", cache_dir)
    assert done.returncode == 0, done.stderr


# --- set-up errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("docker_host", ["unix:///nonexistent/docker.sock", "tcp://127.0.0.1:1"])
def test_unreachable_daemon_is_one_line_naming_the_address(
    tmp_path: Path, images: list[FixtureImage], docker_host: str
) -> None:
    dataset = dataset_through(tmp_path, images[:1], None)
    done = run_cli("--dataset", dataset, "--cache_dir", tmp_path / "cache", DOCKER_HOST=docker_host)
    assert done.returncode == 2
    assert docker_host in done.stderr
    assert "start dockerd" in done.stderr and "DOCKER_HOST" in done.stderr
    assert done.stderr.strip().count("\n") == 0


def test_unwritable_cache_dir_is_a_clear_error_before_any_pull(
    tmp_path: Path, images: list[FixtureImage]
) -> None:
    require_root("needs root to mount a read-only filesystem")
    cache_dir = tmp_path / "readonly"
    cache_dir.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(cache_dir)], check=True
    )
    try:
        dataset = dataset_through(tmp_path, images[:1], None)
        done = run_cli("--dataset", dataset, "--cache_dir", cache_dir)
        assert done.returncode == 2
        assert "not writable" in done.stderr
    finally:
        subprocess.run(["umount", str(cache_dir)], check=True)


# --- damaged index ------------------------------------------------------------------------------


def test_damaged_index_is_kept_aside_and_rebuilt_from_the_folders(
    tmp_path: Path,
    images: list[FixtureImage],
    reference_trees: ReferenceTrees,
    leftover_containers: Callable[[Path], list[str]],
) -> None:
    dataset = dataset_through(tmp_path, images[:3], None)
    cache_dir = tmp_path / "cache"
    assert (
        run_cli("--dataset", dataset, "--cache_dir", cache_dir, "--max_entries", "2").returncode
        == 0
    )
    index_path = cache_dir / "index.json"
    damaged = index_path.read_bytes()[:50]
    index_path.write_bytes(damaged)

    done = run_cli("--dataset", dataset, "--cache_dir", cache_dir)
    assert done.returncode == 0, done.stderr
    assert "Done: 1 cached, 2 skipped, 0 failed" in done.stdout
    assert "damaged" in done.stdout
    aside = list(cache_dir.glob("index.json.corrupt-*"))
    assert [path.read_bytes() for path in aside] == [damaged]
    index = assert_cache_consistent(cache_dir, images, reference_trees, leftover_containers)
    assert sorted(index) == sorted(instance_id(image) for image in images[:3])
    for key in index:
        assert sorted(os.listdir(cache_dir / key)) == sorted(
            os.listdir(
                reference_trees.path(images[[instance_id(i) for i in images].index(key)].ref)
            )
        ), "an instance folder must hold only what /testbed holds"


# --- crashes --------------------------------------------------------------------------------------


def _kill_and_rerun(
    tmp_path: Path,
    images: list[FixtureImage],
    reference_trees: ReferenceTrees,
    leftover_containers: Callable[[Path], list[str]],
    proxy: RegistryProxy,
    when: Callable[[Path], bool],
    what: str,
    foreign: frozenset[str] = frozenset(),
) -> None:
    dataset = dataset_through(tmp_path, images, proxy)
    cache_dir = tmp_path / "cache"
    run = start_cli("--dataset", dataset, "--cache_dir", cache_dir, "--concurrency", "4")
    try:
        wait_for(lambda: when(cache_dir) or run.poll() is not None, what=what)
        assert run.poll() is None, f"the run ended before {what}"
        run.send_signal(signal.SIGKILL)
        run.wait(30)
    finally:
        if run.poll() is None:
            run.kill()
    # The killed run may have left work folders and containers: the rerun repairs everything.
    proxy.faults.bytes_per_second = 0
    done = run_cli("--dataset", dataset, "--cache_dir", cache_dir, "--concurrency", "4")
    assert done.returncode == 0, done.stderr
    index = assert_cache_consistent(
        cache_dir, images, reference_trees, leftover_containers, foreign
    )
    assert sorted(index.keys() - foreign) == sorted(instance_id(image) for image in images)


def test_kill_during_pull_then_rerun_repairs_and_finishes(
    tmp_path: Path,
    images: list[FixtureImage],
    docker_services: str,
    reference_trees: ReferenceTrees,
    leftover_containers: Callable[[Path], list[str]],
) -> None:
    with registry_proxy(docker_services) as proxy:
        proxy.faults.bytes_per_second = 50_000
        _kill_and_rerun(
            tmp_path,
            images,
            reference_trees,
            leftover_containers,
            proxy,
            lambda _cache: proxy.faults.counts.get("manifest", 0) >= 2,
            "a pull under way",
        )


def test_kill_during_extraction_then_rerun_repairs_and_finishes(
    tmp_path: Path,
    images: list[FixtureImage],
    docker_services: str,
    reference_trees: ReferenceTrees,
    leftover_containers: Callable[[Path], list[str]],
) -> None:
    with registry_proxy(docker_services) as proxy:
        _kill_and_rerun(
            tmp_path,
            images,
            reference_trees,
            leftover_containers,
            proxy,
            extracting,
            "an extraction under way",
        )


def test_kill_during_index_write_then_rerun_repairs_and_finishes(
    tmp_path: Path,
    images: list[FixtureImage],
    docker_services: str,
    reference_trees: ReferenceTrees,
    leftover_containers: Callable[[Path], list[str]],
) -> None:
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    # A large index (records of folders that no longer exist) makes each rewrite slow enough
    # to be caught in the middle.
    filler = {
        f"gone__{i:012x}": {
            "instance_id": f"gone__{i:012x}",
            "repo_name": "gone",
            "docker_image": f"namanjain12/gone_final:{i:040x}",
            "commit_hash": f"{i:040x}",
            "cache_path": f"/nonexistent/gone__{i:012x}",
            "file_count": i,
            "size_mb": 1.0,
            "padding": "x" * 400,
        }
        for i in range(120_000)
    }
    (cache_dir / "index.json").write_text(json.dumps(filler))

    def writing_index(cache: Path) -> bool:
        return any(cache.glob(".index.json.*.tmp"))

    with registry_proxy(docker_services) as proxy:
        _kill_and_rerun(
            tmp_path,
            images,
            reference_trees,
            leftover_containers,
            proxy,
            writing_index,
            "an index write under way",
            frozenset(filler),
        )
    index = read_index(cache_dir / "index.json")
    assert len(index) == len(filler) + len(images)
    assert not list(cache_dir.glob(".index.json.*.tmp")), "a stale index temp file was left"


# --- signals --------------------------------------------------------------------------------------


def start_slow_run(
    tmp_path: Path, images: list[FixtureImage], proxy: RegistryProxy, cache_dir: Path
) -> tuple[subprocess.Popen[str], Path]:
    """A run pulling through a throttled proxy, returned once its first entry is cached."""
    dataset = dataset_through(tmp_path, images, proxy)
    proxy.faults.bytes_per_second = 100_000
    run = start_cli("--dataset", dataset, "--cache_dir", cache_dir, "--concurrency", "2")
    wait_for(
        lambda: (cache_dir / "index.json").exists() or run.poll() is not None,
        what="a first cached entry",
    )
    if run.poll() is not None:
        _stdout, stderr = run.communicate()
        raise AssertionError(f"the run ended before it could be signalled:\n{stderr[-4000:]}")
    return run, dataset


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_cleanly_writes_index_and_summary(
    tmp_path: Path,
    images: list[FixtureImage],
    docker_services: str,
    reference_trees: ReferenceTrees,
    leftover_containers: Callable[[Path], list[str]],
    signum: int,
    code: int,
) -> None:
    cache_dir = tmp_path / "cache"
    with registry_proxy(docker_services) as proxy:
        run, _dataset = start_slow_run(tmp_path, images, proxy, cache_dir)
        run.send_signal(signum)
        stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == code, stderr
    assert "Done:" in stdout
    index = assert_cache_consistent(cache_dir, images, reference_trees, leftover_containers)
    assert 1 <= len(index) < len(images)


def test_second_sigint_leaves_at_once_without_corrupting_the_index(
    tmp_path: Path,
    images: list[FixtureImage],
    docker_services: str,
    reference_trees: ReferenceTrees,
    leftover_containers: Callable[[Path], list[str]],
) -> None:
    cache_dir = tmp_path / "cache"
    with registry_proxy(docker_services) as proxy:
        run, dataset = start_slow_run(tmp_path, images, proxy, cache_dir)
        run.send_signal(signal.SIGINT)
        time.sleep(0.05)
        run.send_signal(signal.SIGINT)
        _stdout, stderr = run.communicate(timeout=60)
        assert run.returncode == 130, stderr
        read_index(cache_dir / "index.json")  # valid JSON of the right shape
        proxy.faults.bytes_per_second = 0
        done = run_cli("--dataset", dataset, "--cache_dir", cache_dir)
    assert done.returncode == 0, done.stderr
    assert_cache_consistent(cache_dir, images, reference_trees, leftover_containers)


# --- transient faults ----------------------------------------------------------------------------


def test_registry_5xx_and_connection_resets_are_retried(
    tmp_path: Path,
    images: list[FixtureImage],
    docker_services: str,
    reference_trees: ReferenceTrees,
    leftover_containers: Callable[[Path], list[str]],
) -> None:
    with registry_proxy(docker_services) as proxy:
        proxy.faults.server_errors = 3
        proxy.faults.resets = 2
        dataset = dataset_through(tmp_path, images[:3], proxy)
        cache_dir = tmp_path / "cache"
        done = run_cli("--dataset", dataset, "--cache_dir", cache_dir, "--concurrency", "3")
        assert proxy.faults.counts.get("503") == 3
    assert done.returncode == 0, done.stderr
    index = assert_cache_consistent(cache_dir, images, reference_trees, leftover_containers)
    assert len(index) == 3


# --- rate limits ---------------------------------------------------------------------------------


def test_rate_limit_pauses_all_pulls_together_then_resumes(
    tmp_path: Path,
    images: list[FixtureImage],
    docker_services: str,
    reference_trees: ReferenceTrees,
    leftover_containers: Callable[[Path], list[str]],
) -> None:
    with registry_proxy(docker_services) as proxy:
        dataset = dataset_through(tmp_path, images, proxy)
        cache_dir = tmp_path / "cache"
        proxy.faults.rate_limited_until = time.monotonic() + 4
        done = run_cli(
            "--dataset",
            dataset,
            "--cache_dir",
            cache_dir,
            "--concurrency",
            "6",
            ASYNCCACHE_RATE_LIMIT_PAUSE="1.5",
        )
        limited = proxy.faults.counts.get("429", 0)
    assert done.returncode == 0, done.stderr
    assert "rate limit: pulls paused, retrying at" in done.stderr
    # Workers pause together: a handful of pauses, not a 429 storm of every worker in a loop.
    assert 1 <= limited <= len(images) * 4
    assert_cache_consistent(cache_dir, images, reference_trees, leftover_containers)


def test_rate_limit_that_never_lifts_fails_remaining_entries_with_advice(
    tmp_path: Path,
    images: list[FixtureImage],
    docker_services: str,
    leftover_containers: Callable[[Path], list[str]],
) -> None:
    with registry_proxy(docker_services) as proxy:
        dataset = dataset_through(tmp_path, images[:3], proxy)
        cache_dir = tmp_path / "cache"
        proxy.faults.rate_limited_until = time.monotonic() + 3600
        done = run_cli(
            "--dataset",
            dataset,
            "--cache_dir",
            cache_dir,
            "--concurrency",
            "3",
            "--rate_limit_max_wait",
            "3",
            "--json",
            ASYNCCACHE_RATE_LIMIT_PAUSE="1",
        )
    # A later run can cache them: EX_TEMPFAIL, not "some entries failed for good".
    assert done.returncode == 75
    failures = json.loads((cache_dir / "failures.json").read_text())
    assert len(failures) == 3
    for failure in failures.values():
        assert "docker login" in failure["reason"] and "mirror" in failure["reason"]
    report = json.loads(done.stdout)
    assert report["exit_code"] == 75 and report["retry_later"] is True
    assert len(report["failures"]) == 3
    assert all(failure["retry_later"] for failure in report["failures"])
    assert leftover_containers(cache_dir) == []


# --- the daemon restarting ------------------------------------------------------------------------

#: Longer than the retries' whole budget (6 attempts, waits of 0.5 s doubling up to 10 s: about
#: 16 s), so that only waiting for the daemon gets a run through.
DAEMON_AWAY = 25.0


class Dockerd:
    """Stops the machine's dockerd and starts it again as scripts/services.sh does."""

    def __init__(self) -> None:
        self.stopped_at = 0.0

    @staticmethod
    def running() -> bool:
        return subprocess.run(["pidof", "dockerd"], capture_output=True).returncode == 0

    def stop(self) -> None:
        """SIGTERM, as a restart does; return once it is gone."""
        pid = subprocess.run(["pidof", "dockerd"], capture_output=True, text=True, check=True)
        os.kill(int(pid.stdout.split()[0]), signal.SIGTERM)
        self.stopped_at = time.monotonic()
        wait_for(lambda: not self.running(), timeout=90, what="dockerd to stop")

    def kill(self) -> None:
        """SIGKILL, as an out-of-memory kill does: the daemon leaves its pid file behind."""
        pid = subprocess.run(["pidof", "dockerd"], capture_output=True, text=True, check=True)
        os.kill(int(pid.stdout.split()[0]), signal.SIGKILL)
        wait_for(lambda: not self.running(), timeout=30, what="dockerd to die")

    def start_after(self, away: float) -> None:
        """Start it again once it has been away ``away`` seconds."""
        time.sleep(max(0.0, self.stopped_at + away - time.monotonic()))
        self.start()

    def start(self) -> None:
        # In a session of its own: the daemon outlives this test's process group, which a
        # timeout or a job control kill may end.
        subprocess.run(
            ["bash", str(ROOT / "scripts" / "services.sh"), "up"],
            check=True,
            capture_output=True,
            start_new_session=True,
        )


@pytest.fixture
def dockerd(docker_services: str) -> Iterator[Dockerd]:
    """Control over dockerd; whatever the test does, the daemon is up again after it."""
    require_root("needs root to stop and start dockerd")
    control = Dockerd()
    try:
        yield control
    finally:
        if not control.running():
            control.start()


@pytest.fixture
def relay(dockerd: Dockerd) -> Iterator[DaemonRelay]:
    """The daemon behind a relay socket that can slow its answers down."""
    folder = Path(tempfile.mkdtemp(prefix="asynccache-relay-"))  # a socket path is short
    try:
        with daemon_relay(Path("/var/run/docker.sock"), folder / "docker.sock") as running:
            yield running
    finally:
        folder.rmdir()


def test_services_start_dockerd_again_after_it_was_killed(dockerd: Dockerd) -> None:
    dockerd.kill()
    assert Path("/var/run/docker.pid").exists()  # the stale pid file dockerd refuses to start on
    dockerd.start()
    assert dockerd.running()
    assert subprocess.run(["docker", "info"], capture_output=True).returncode == 0


def test_daemon_restart_in_the_middle_of_a_run_is_survived(
    tmp_path: Path,
    images: list[FixtureImage],
    docker_services: str,
    dockerd: Dockerd,
    reference_trees: ReferenceTrees,
    leftover_containers: Callable[[Path], list[str]],
) -> None:
    with registry_proxy(docker_services) as proxy:
        proxy.faults.bytes_per_second = 400_000
        dataset = dataset_through(tmp_path, images, proxy)
        cache_dir = tmp_path / "cache"
        run = start_cli(
            "--dataset", dataset, "--cache_dir", cache_dir, "--concurrency", "2",
            "--daemon_wait", "120",
        )  # fmt: skip
        wait_for(lambda: proxy.faults.counts.get("manifest", 0) >= 1, what="a first pull")
        dockerd.stop()
        dockerd.start_after(DAEMON_AWAY)
        proxy.faults.bytes_per_second = 0
        stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    assert f"Done: {len(images)} cached, 0 skipped, 0 failed" in stdout
    assert "unreachable" in stderr and "every call paused, waiting for it until" in stderr
    assert "--daemon_wait 120 s" in stderr
    assert "answers again after" in stderr
    assert "FAILED" not in stderr
    assert not (cache_dir / "failures.json").exists()
    index = assert_cache_consistent(cache_dir, images, reference_trees, leftover_containers)
    assert len(index) == len(images)


def test_an_archive_stream_cut_by_a_daemon_restart_starts_its_entry_again(
    tmp_path: Path,
    images: list[FixtureImage],
    relay: DaemonRelay,
    dockerd: Dockerd,
    reference_trees: ReferenceTrees,
    leftover_containers: Callable[[Path], list[str]],
) -> None:
    # Slow answers keep the big tree's archive stream (3,000 files, about 20 s at this rate)
    # in flight when the daemon stops.
    relay.bytes_per_second = 150_000
    big = next(image for image in images if image.spec.name == "toolkit-big")
    dataset = dataset_through(tmp_path, [big, *(i for i in images if i is not big)], None)
    cache_dir = tmp_path / "cache"
    run = start_cli(
        "--dataset", dataset, "--cache_dir", cache_dir, "--concurrency", "2",
        "--daemon_wait", "120", "--cp_timeout", "600",
        DOCKER_HOST=relay.docker_host,
    )  # fmt: skip

    def streaming_big() -> bool:
        try:
            folders = work_in_progress(cache_dir)
            return any(p.name.startswith(instance_id(big)) and any(p.iterdir()) for p in folders)
        except FileNotFoundError:  # a folder went between the listing and the look inside
            return False

    wait_for(streaming_big, timeout=120, what="the big tree's extraction")
    dockerd.stop()
    relay.bytes_per_second = 0
    dockerd.start_after(DAEMON_AWAY)
    stdout, stderr = run.communicate(timeout=300)
    assert run.returncode == 0, stderr
    assert f"Done: {len(images)} cached, 0 skipped, 0 failed" in stdout
    assert "the archive stream broke" in stderr and "starting it again" in stderr
    assert "answers again after" in stderr
    index = assert_cache_consistent(cache_dir, images, reference_trees, leftover_containers)
    assert len(index) == len(images)


def test_a_daemon_away_past_daemon_wait_fails_every_entry_not_done_with_exit_75(
    tmp_path: Path,
    images: list[FixtureImage],
    docker_services: str,
    dockerd: Dockerd,
    reference_trees: ReferenceTrees,
    leftover_containers: Callable[[Path], list[str]],
) -> None:
    with registry_proxy(docker_services) as proxy:
        proxy.faults.bytes_per_second = 400_000
        dataset = dataset_through(tmp_path, images, proxy)
        cache_dir = tmp_path / "cache"
        run = start_cli(
            "--dataset", dataset, "--cache_dir", cache_dir, "--concurrency", "2",
            "--daemon_wait", "8",
        )  # fmt: skip
        wait_for(lambda: proxy.faults.counts.get("manifest", 0) >= 1, what="a first pull")
        dockerd.stop()
        stdout, stderr = run.communicate(timeout=120)
        waited = time.monotonic() - dockerd.stopped_at
        dockerd.start()
        assert run.returncode == 75, stderr
        assert waited >= 8
        index = read_index(cache_dir / "index.json")
        failures = json.loads((cache_dir / "failures.json").read_text())
        # Every entry is either cached or reported, and every report names the wait.
        assert set(index) | set(failures) == {instance_id(image) for image in images}
        assert not set(index) & set(failures)
        assert failures
        for failure in failures.values():
            assert "did not answer again within 8 s (--daemon_wait)" in failure["reason"]
        assert f"{len(failures)} failed" in stdout
        assert sum(f"FAILED {key}:" in stderr for key in failures) == len(failures)
        assert work_in_progress(cache_dir) == []
        assert [path for path in cache_dir.iterdir() if path.name in failures] == []
        # What the daemon held when it went away (containers) is removed by the next run.
        again = run_cli("--dataset", dataset, "--cache_dir", cache_dir)
    assert again.returncode == 0, again.stderr
    index = assert_cache_consistent(cache_dir, images, reference_trees, leftover_containers)
    assert len(index) == len(images)


# --- disk -----------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    require_root("needs root to mount a small tmpfs")
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_fails_cleanly_and_stops_the_run(
    tmp_path: Path,
    small_disk: Path,
    images: list[FixtureImage],
    leftover_containers: Callable[[Path], list[str]],
) -> None:
    big = [image for image in images if image.spec.name == "toolkit-big"]
    others = [image for image in images if image.spec.name != "toolkit-big"]
    dataset = dataset_through(tmp_path, big + others, None)
    cache_dir = small_disk / "cache"
    done = run_cli("--dataset", dataset, "--cache_dir", cache_dir, "--concurrency", "1")
    assert done.returncode == 75, done.stderr  # EX_TEMPFAIL: free space, and a rerun finishes
    failures = json.loads((cache_dir / "failures.json").read_text())
    assert instance_id(big[0]) in failures
    assert "space" in failures[instance_id(big[0])]["reason"]
    assert "this run may fill the disk" in done.stderr
    assert "stays full" in done.stdout
    assert not (cache_dir / instance_id(big[0])).exists()
    assert read_index(cache_dir / "index.json") == {}
    assert work_in_progress(cache_dir) == []
    assert leftover_containers(cache_dir) == []


@pytest.mark.parametrize("delay", [0.0, 0.001, 0.005, 0.02, 0.05])
def test_a_container_create_cancelled_in_flight_leaves_no_container(
    tmp_path: Path,
    images: list[FixtureImage],
    leftover_containers: Callable[[Path], list[str]],
    delay: float,
) -> None:
    image = images[0]
    entry = Entry(instance_id(image), image.repo, image.ref, image.commit_hash)
    cache_dir = tmp_path / "cache"

    async def cancel_a_create() -> None:
        async with DockerBackend(cache_dir, keep_images=True) as backend:
            await backend.ensure_image(image.ref)
            created: str | None = None
            with anyio.move_on_after(delay):
                created = await backend.create_container(entry)
            if created is not None:  # the create finished: its id is the caller's to remove
                await backend.remove_container(created)

    anyio.run(cancel_a_create)
    assert leftover_containers(cache_dir) == []
