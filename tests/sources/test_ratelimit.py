"""One pull gate: every pull goes through it, a rate limit pauses all, a success ends the pause."""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import pytest

from asynccache import config
from asynccache.errors import RateLimited, RateLimitExhausted
from asynccache.sources.ratelimit import PullGate, SharedGateState
from tests.support.fake_registry import (
    FakeRegistry,
    backend,
    extract,
    fake_registry,
    fast_gate,
    sample_image,
)


def test_gate_defaults_come_from_the_config() -> None:
    gate = PullGate()
    assert (gate.first_pause, gate.max_pause, gate.max_wait) == (
        config.rate_limit_pause,
        config.rate_limit_pause_max,
        config.rate_limit_max_wait,
    )


@pytest.mark.anyio
async def test_through_waits_out_a_rate_limit_and_ends_the_pause_on_success() -> None:
    gate = fast_gate()
    answers: list[str] = []

    async def pull() -> str:
        answers.append("asked")
        if len(answers) < 3:
            raise RateLimited("img", "slow", retry_after=0.01)
        return "pulled"

    assert await gate.through("img", pull) == "pulled"
    assert len(answers) == 3
    assert gate.pauses == 2
    assert gate.limited_since is None


@pytest.mark.anyio
async def test_through_gives_up_once_the_wait_is_spent() -> None:
    gate = PullGate(first_pause=0.01, max_pause=0.01, max_wait=0.05)

    async def pull() -> None:
        raise RateLimited("img", "slow")

    with pytest.raises(RateLimitExhausted):
        await gate.through("img", pull)


@pytest.mark.anyio
async def test_a_blob_that_gets_through_ends_the_pause_for_every_pull(tmp_path: Path) -> None:
    registry = FakeRegistry(blob_429=1)
    registry.add("proj/app", "v1", sample_image())
    gate = fast_gate()
    async with fake_registry(registry) as host, backend(tmp_path, pull_gate=gate) as source:
        await extract(source, f"{host}/proj/app:v1", tmp_path / "d")
    assert gate.pauses == 1
    assert gate.limited_since is None


def _limit_in_child(values: object, image: str) -> None:
    """A worker process meeting a rate limit, on the gate state it shares."""
    gate = PullGate(first_pause=30, max_pause=30, max_wait=600, state=SharedGateState(values))
    gate.limited(RateLimited(image, "toomanyrequests"))


def test_a_pause_one_process_meets_pauses_every_process() -> None:
    context = multiprocessing.get_context("spawn")
    state = SharedGateState.create(context, first_pause=30)
    gate = PullGate(first_pause=30, max_pause=30, max_wait=600, state=state)
    assert gate.resume_at <= time.monotonic()
    child = context.Process(target=_limit_in_child, args=(state.values, "a/b:1"))
    child.start()
    child.join(60)
    assert child.exitcode == 0
    # The main process's gate sees the pause the child met, on the same clock.
    assert gate.pauses == 1 and gate.limited_since is not None
    assert gate.resume_at - time.monotonic() > 20
    second = context.Process(target=_limit_in_child, args=(state.values, "a/c:1"))
    second.start()
    second.join(60)
    # A second process meeting the limit while paused does not pause again.
    assert gate.pauses == 1
    gate.succeeded()
    assert gate.limited_since is None
