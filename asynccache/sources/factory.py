"""The source a run's options name, built the same way in the main process and in workers."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from asynccache import config
from asynccache.config import CacheOptions
from asynccache.sources.ratelimit import GateState, PullGate, StatusCallback
from asynccache.tree.options import TreeOptions

if TYPE_CHECKING:
    from asynccache.sources.daemon_gate import DaemonGateState
    from asynccache.sources.docker import DockerBackend
    from asynccache.sources.registry.backend import RegistryBackend


def pull_gate(
    options: CacheOptions, on_status: StatusCallback | None, state: GateState | None = None
) -> PullGate:
    """The run's rate-limit gate (``state`` shared with other processes when given)."""
    return PullGate(
        first_pause=options.rate_limit_pause,
        max_pause=config.rate_limit_pause_max,
        max_wait=options.rate_limit_max_wait,
        on_status=on_status,
        state=state,
    )


def make_backend(
    options: CacheOptions,
    cache_root: Path,
    gate: PullGate,
    work_name: str | None,
    slot: int | None = None,
    *,
    on_status: StatusCallback | None = None,
    daemon_state: DaemonGateState | None = None,
    tree: TreeOptions | None = None,
) -> DockerBackend | RegistryBackend:
    """The backend ``options.backend`` names, not yet open (enter it with ``async with``).

    ``slot`` is a worker process's place in its pool: its partial downloads are its own, so
    one worker starting never sweeps another's. ``on_status`` hears the Docker daemon gate's
    pauses; ``daemon_state`` is that gate's state, shared with other processes when given.
    ``tree``: what its extractions link from and leave out.
    """
    tree = tree or TreeOptions()
    if options.backend == "registry":
        from asynccache.sources.registry.backend import RegistryBackend

        return RegistryBackend(
            options.layer_cache_dir,
            platform=options.platform,
            insecure_registries=options.insecure_registries,
            registry_mirror=options.registry_mirror,
            pull_gate=gate,
            testbed_path=options.testbed_path,
            work_name=_scoped(work_name, slot),
            log_totals=slot is None,
            entry_timeout=options.pull_timeout,
            max_testbed_bytes=options.max_testbed_bytes,
            max_testbed_files=options.max_testbed_files,
            store=tree.store,
            exclude=tree.exclude,
        )
    from asynccache.sources.docker import DockerBackend

    return DockerBackend(
        cache_root,
        pull_timeout=options.pull_timeout,
        cp_timeout=options.cp_timeout,
        skip_pull=options.skip_pull,
        keep_images=options.keep_images,
        testbed_path=options.testbed_path,
        pull_gate=gate,
        shard_name=work_name,
        daemon_wait=options.daemon_wait,
        on_status=on_status,
        daemon_state=daemon_state,
        max_testbed_bytes=options.max_testbed_bytes,
        max_testbed_files=options.max_testbed_files,
        store=tree.store,
        exclude=tree.exclude,
    )


def _scoped(work_name: str | None, slot: int | None) -> str | None:
    """A name of its own for one worker's partial files (the shard's, then the slot)."""
    if slot is None:
        return work_name
    return f"{work_name}/p{slot}" if work_name else f"p{slot}"
