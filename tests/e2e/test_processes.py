"""Worker processes: the same trees, a shared rate-limit gate, a killed worker replaced."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.e2e.test_reliability import (
    assert_cache_consistent,
    dataset_through,
    extracting,
    wait_for,
)
from tests.support.cli_runner import run_cli, start_cli
from tests.support.fixtures import FixtureImage, ReferenceTrees
from tests.support.registry_proxy import RegistryProxy, registry_proxy


@pytest.fixture
def images(fixture_images: list[FixtureImage]) -> list[FixtureImage]:
    return fixture_images


def workers_of(pid: int) -> list[int]:
    """The worker processes of the run ``pid`` (not multiprocessing's resource tracker)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"spawn_main" in command:
                found.append(int(child))
    return found


def start_pool_run(
    tmp_path: Path,
    images: list[FixtureImage],
    proxy: RegistryProxy,
    cache_dir: Path,
    *,
    bytes_per_second: int,
) -> subprocess.Popen[str]:
    """A two-process registry run through a throttled proxy, returned once it is extracting."""
    dataset = dataset_through(tmp_path, images, proxy)
    proxy.faults.bytes_per_second = bytes_per_second
    run = start_cli(
        "--dataset",
        dataset,
        "--cache_dir",
        cache_dir,
        "--backend",
        "registry",
        "--insecure_registry",
        proxy.address,
        "--processes",
        "2",
        "--concurrency",
        "4",
    )
    wait_for(
        lambda: extracting(cache_dir) or run.poll() is not None,
        timeout=120,
        what="an extraction under way",
    )
    return run


@pytest.mark.parametrize("backend", ["docker", "registry"])
def test_two_processes_give_the_trees_docker_cp_gives(
    tmp_path: Path,
    images: list[FixtureImage],
    docker_services: str,
    reference_trees: ReferenceTrees,
    leftover_containers: Callable[[Path], list[str]],
    backend: str,
) -> None:
    dataset = dataset_through(tmp_path, images, None)
    cache_dir = tmp_path / "cache"
    args = ["--dataset", dataset, "--cache_dir", cache_dir, "--processes", "2"]
    args += ["--backend", backend]
    if backend == "registry":
        args += ["--insecure_registry", docker_services]
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    index = assert_cache_consistent(cache_dir, images, reference_trees, leftover_containers)
    assert len(index) == len(images)


def start_with_git(
    tmp_path: Path, images: list[FixtureImage], registry: str, script: str
) -> tuple[subprocess.Popen[str], Path]:
    """A two-process registry run whose ``git`` is a shell script on PATH (``REAL_GIT`` in it
    names the real one); returns the run and its cache folder."""
    real_git = shutil.which("git")
    assert real_git is not None
    wrappers = tmp_path / "bin"
    wrappers.mkdir()
    (wrappers / "git").write_text("#!/bin/sh\n" + script.replace("REAL_GIT", real_git))
    (wrappers / "git").chmod(0o755)
    dataset = dataset_through(tmp_path, images, None)
    cache_dir = tmp_path / "cache"
    run = start_cli(
        "--dataset", dataset, "--cache_dir", cache_dir, "--processes", "2",
        "--backend", "registry", "--insecure_registry", registry,
        PATH=f"{wrappers}:{os.environ['PATH']}",
    )  # fmt: skip
    return run, cache_dir


def test_the_leak_guard_and_the_digest_run_in_the_worker_processes(
    tmp_path: Path,
    images: list[FixtureImage],
    docker_services: str,
    reference_trees: ReferenceTrees,
    leftover_containers: Callable[[Path], list[str]],
) -> None:
    # a git on PATH that notes which process ran it, then runs the real one
    callers = tmp_path / "git-callers"
    script = f'echo $PPID >> {callers}\nexec REAL_GIT "$@"\n'
    run, cache_dir = start_with_git(tmp_path, images, docker_services, script)
    _stdout, stderr = run.communicate(timeout=600)
    assert run.returncode == 0, stderr
    ran_git = {int(pid) for pid in callers.read_text().split()}
    assert ran_git and run.pid not in ran_git
    index = assert_cache_consistent(cache_dir, images, reference_trees, leftover_containers)
    assert len(index) == len(images)


def _running(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_worker_killed_in_the_leak_guard_leaves_no_git_running(
    tmp_path: Path,
    images: list[FixtureImage],
    docker_services: str,
    reference_trees: ReferenceTrees,
    leftover_containers: Callable[[Path], list[str]],
) -> None:
    # the first `git pack-objects` of the run notes its pid and hangs, as a repack of a huge (or
    # hostile) pack would; every other git call runs the real git
    hung, first = tmp_path / "hung-pid", tmp_path / "first-pack"
    script = (
        f'case " $* " in *" pack-objects "*) if mkdir {first} 2>/dev/null; then\n'
        f"  echo $$ > {hung}.tmp && mv {hung}.tmp {hung}; exec sleep 300; fi;; esac\n"
        'exec REAL_GIT "$@"\n'
    )
    run, cache_dir = start_with_git(tmp_path, images, docker_services, script)
    try:
        wait_for(lambda: hung.exists() or run.poll() is not None, timeout=300, what="a pack")
        assert run.poll() is None, "the run ended before its first pack-objects"
        git = int(hung.read_text())
        worker = int(Path(f"/proc/{git}/stat").read_text().rpartition(")")[2].split()[1])
        assert worker in workers_of(run.pid)
        os.kill(worker, signal.SIGKILL)
        wait_for(lambda: not _running(git), timeout=10, what="the killed worker's git to end")
        _stdout, stderr = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
        if hung.exists() and _running(int(hung.read_text())):
            os.kill(int(hung.read_text()), signal.SIGKILL)
    assert run.returncode == 0, stderr
    assert "ended (exit code -9); starting another" in stderr
    index = assert_cache_consistent(cache_dir, images, reference_trees, leftover_containers)
    assert len(index) == len(images)


def test_a_worker_killed_mid_entry_is_replaced_and_the_run_goes_on(
    tmp_path: Path,
    images: list[FixtureImage],
    docker_services: str,
    reference_trees: ReferenceTrees,
    leftover_containers: Callable[[Path], list[str]],
) -> None:
    cache_dir = tmp_path / "cache"
    with registry_proxy(docker_services) as proxy:
        run = start_pool_run(tmp_path, images, proxy, cache_dir, bytes_per_second=200_000)
        try:
            assert run.poll() is None, "the run ended before a worker could be killed"
            workers = workers_of(run.pid)
            assert len(workers) >= 2, workers
            os.kill(workers[0], signal.SIGKILL)
            proxy.faults.bytes_per_second = 0
            _stdout, stderr = run.communicate(timeout=300)
        finally:
            if run.poll() is None:
                run.kill()
                run.communicate()
    assert run.returncode == 0, stderr
    assert "ended (exit code -9); starting another" in stderr
    index = assert_cache_consistent(cache_dir, images, reference_trees, leftover_containers)
    assert len(index) == len(images)


def test_sigint_with_two_processes_leaves_no_work_folders_or_processes(
    tmp_path: Path,
    images: list[FixtureImage],
    docker_services: str,
    reference_trees: ReferenceTrees,
    leftover_containers: Callable[[Path], list[str]],
) -> None:
    cache_dir = tmp_path / "cache"
    with registry_proxy(docker_services) as proxy:
        run = start_pool_run(tmp_path, images, proxy, cache_dir, bytes_per_second=100_000)
        workers = workers_of(run.pid)
        run.send_signal(signal.SIGINT)
        _stdout, stderr = run.communicate(timeout=120)
    assert run.returncode == 130, stderr
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
        time.sleep(0.1)
    assert not [w for w in workers if Path(f"/proc/{w}").exists()], "a worker outlived the run"
    assert_cache_consistent(cache_dir, images, reference_trees, leftover_containers)
