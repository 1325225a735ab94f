"""Shared fixtures: the Docker daemon, the loopback registry, sample images and datasets."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, NoReturn

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support import fixtures as fx  # noqa: E402
from tests.support.fixtures import (  # noqa: E402
    DEFAULT_SET,
    NO_TESTBED,
    FixtureError,
    FixtureImage,
    ReferenceTrees,
    docker_available,
    leftover_containers,
    missing_image_ref,
    registry_available,
    remove_local_image,
    rows_for,
    write_dataset,
)
from tests.support.leaky_repo import LeakyRepo, build_leaky_repo  # noqa: E402

SERVICES_SCRIPT = ROOT / "scripts" / "services.sh"
REGISTRY_PORT = os.environ.get("ASYNCCACHE_REGISTRY_PORT", "5000")
REGISTRY = f"127.0.0.1:{REGISTRY_PORT}"

#: Fixtures whose use makes a test a Docker test.
DOCKER_FIXTURES = frozenset(
    {
        "docker_services",
        "fixture_images",
        "no_testbed_image",
        "missing_image",
        "sample_dataset",
        "reference_trees",
        "images_by_name",
        "leftover_containers",
    }
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a Docker fixture with ``pytest.mark.docker``."""
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & DOCKER_FIXTURES:
            item.add_marker(pytest.mark.docker)


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"Docker services unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"Docker services unavailable: {reason}")


@pytest.fixture(autouse=True)
def own_layer_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Each test its own registry-backend blob cache: none reads another's, or the user's."""
    folder = tmp_path_factory.mktemp("layer-cache")
    monkeypatch.setenv("ASYNCCACHE_LAYER_CACHE_DIR", str(folder))
    return folder


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Run ``@pytest.mark.anyio`` tests on asyncio only."""
    return "asyncio"


_daemon_turn: list[IO[str]] = []


def _take_daemon_turn() -> None:
    """Hold the machine-wide Docker test lock until this process exits."""
    if _daemon_turn:
        return
    path = Path(os.environ.get("ASYNCCACHE_TEST_LOCK", "/var/tmp/asynccache-docker-tests.lock"))
    handle = open(path, "a", encoding="utf-8")  # noqa: SIM115 (held for the whole session)
    fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    _daemon_turn.append(handle)


@pytest.fixture(scope="session")
def docker_services() -> str:
    """Make sure dockerd and the loopback registry are up; return the registry address.

    Runs ``scripts/services.sh up`` when either is missing. Fails under CI, skips elsewhere,
    when they cannot be made available. Test sessions on one machine share the daemon (some
    tests restart it or check which images are local), so each session takes its turn: the
    first Docker test waits for a machine-wide lock that the session holds until it ends.
    """
    _take_daemon_turn()
    if docker_available() and registry_available(REGISTRY):
        return REGISTRY
    try:
        proc = subprocess.run(
            ["bash", str(SERVICES_SCRIPT), "up"],
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        _unavailable(f"scripts/services.sh up could not run: {exc}")
    if proc.returncode != 0:
        detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
        _unavailable(f"scripts/services.sh up exited {proc.returncode}: {' | '.join(detail)}")
    if not docker_available():
        _unavailable("docker info still fails after scripts/services.sh up")
    if not registry_available(REGISTRY):
        _unavailable(f"no registry answers on http://{REGISTRY}/v2/")
    return REGISTRY


@pytest.fixture(scope="session")
def fixture_images(docker_services: str) -> list[FixtureImage]:
    """The default sample images, built and pushed once per session (skipped when up to date).

    Each item has ``.spec`` (a FixtureSpec), ``.ref`` (the pushed reference), ``.repo`` and
    ``.commit_hash``. No local copy of any of them is left in the daemon.
    """
    try:
        images = fx.ensure_images(DEFAULT_SET, docker_services)
        for image in images:
            remove_local_image(image.ref)
    except FixtureError as exc:
        _unavailable(f"cannot build the fixture images: {exc}")
    return images


@pytest.fixture(scope="session")
def images_by_name(fixture_images: list[FixtureImage]) -> dict[str, FixtureImage]:
    """The default images keyed by spec name (e.g. ``"sampleproj-1"``)."""
    return {image.spec.name: image for image in fixture_images}


@pytest.fixture(scope="session")
def no_testbed_image(docker_services: str) -> FixtureImage:
    """A pushed image that has no /testbed at all."""
    try:
        return fx.ensure_images([NO_TESTBED], docker_services)[0]
    except FixtureError as exc:
        _unavailable(f"cannot build the no-testbed image: {exc}")


@pytest.fixture(scope="session")
def missing_image(docker_services: str) -> str:
    """A reference in the loopback registry that was never pushed."""
    return missing_image_ref(docker_services)


@pytest.fixture
def sample_dataset(
    tmp_path_factory: pytest.TempPathFactory, fixture_images: list[FixtureImage]
) -> tuple[Path, str, list[dict[str, Any]]]:
    """A fresh dataset folder (HF layout) with one row per default image.

    Returns ``(dataset_dir, split, rows)``; load it with
    ``datasets.load_dataset(str(dataset_dir), split=split)``.
    """
    dataset_dir = tmp_path_factory.mktemp("dataset")
    split = "train"
    rows = rows_for(fixture_images)
    write_dataset(dataset_dir, rows, split)
    return dataset_dir, split, rows


@pytest.fixture(scope="session")
def reference_trees(
    tmp_path_factory: pytest.TempPathFactory, fixture_images: list[FixtureImage]
) -> ReferenceTrees:
    """Per image reference, the snapshot of its ``docker cp`` extraction (computed once)."""
    return ReferenceTrees(tmp_path_factory.mktemp("reference-trees"))


@pytest.fixture(name="leftover_containers")
def leftover_containers_fixture(docker_services: str) -> Callable[[Path | str], list[str]]:
    """``leftover_containers(cache_dir) -> list[str]``: our containers still labelled for it."""
    return leftover_containers


def slurm_available() -> bool:
    """True when this host's slurmd answers and the controller reports its node usable."""
    try:
        slurmd = subprocess.run(
            ["scontrol", "show", "slurmd"], capture_output=True, timeout=20, check=False
        )
        state = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T", "-n", os.uname().nodename.split(".")[0]],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    states = state.stdout.split()
    usable = bool(states) and states[0] in {"idle", "mixed", "allocated", "completing"}
    return slurmd.returncode == 0 and usable


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """Make sure the single-node Slurm of ``scripts/services.sh`` is up; return the node name.

    Fails under CI, skips elsewhere, when it cannot be brought up.
    """
    node = os.uname().nodename.split(".")[0]
    if slurm_available():
        return node
    proc = subprocess.run(
        ["bash", str(SERVICES_SCRIPT), "up"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if slurm_available():
        return node
    detail = " | ".join((proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:])
    message = f"Slurm unavailable after scripts/services.sh up: {detail}"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def leaky_repo(tmp_path_factory: pytest.TempPathFactory) -> LeakyRepo:
    """A testbed-like clone whose .git reaches past HEAD as R2E images' do (copy, then change)."""
    return build_leaky_repo(tmp_path_factory.mktemp("leaky-repo"))
