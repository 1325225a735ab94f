"""One daemon gate: an outage pauses every call, a ping that answers lets them go on, and the
run gives up only after the wait. The daemon here is a switch the test flips; the real daemon's
restarts are in tests/e2e/test_reliability.py."""

from __future__ import annotations

import multiprocessing
import pickle
import time
from collections.abc import Awaitable, Callable

import anyio
import pytest

from asynccache import config
from asynccache.errors import DaemonGone, DaemonInterrupted, DaemonUnavailable
from asynccache.pipeline import is_transient
from asynccache.sources.daemon_gate import QUICK_RETRIES, DaemonGate, SharedDaemonGateState

ADDRESS = "unix:///var/run/docker.sock"


class Daemon:
    """Answers pings and calls while ``up``; counts what it was asked."""

    def __init__(self) -> None:
        self.up = True
        self.pings = 0
        self.calls = 0
        self.calls_while_down = 0

    async def ping(self, timeout: float) -> None:
        self.pings += 1
        if not self.up:
            raise DaemonUnavailable(ADDRESS, "connection refused")

    async def call(self) -> str:
        self.calls += 1
        await anyio.sleep(0)
        if not self.up:
            self.calls_while_down += 1
            raise DaemonUnavailable(ADDRESS, "connection refused")
        return "answer"


def gate_for(
    daemon: Daemon,
    max_wait: float = 5.0,
    on_status: Callable[[str], None] | None = None,
    on_back: Callable[[], Awaitable[None]] | None = None,
) -> DaemonGate:
    return DaemonGate(
        daemon.ping,
        address=ADDRESS,
        max_wait=max_wait,
        ping_interval=0.01,
        on_status=on_status,
        on_back=on_back,
    )


def test_the_wait_defaults_to_the_config() -> None:
    gate = DaemonGate(Daemon().ping, address=ADDRESS)
    assert gate.max_wait == config.daemon_wait == 600.0


@pytest.mark.anyio
async def test_an_outage_pauses_every_call_until_the_daemon_answers_again() -> None:
    daemon = Daemon()
    statuses: list[str] = []
    back: list[float] = []

    async def on_back() -> None:
        back.append(time.monotonic())

    gate = gate_for(daemon, on_status=statuses.append, on_back=on_back)
    daemon.up = False
    results: list[str] = []

    async def caller() -> None:
        results.append(await gate.call(daemon.call))

    async with anyio.create_task_group() as tg:
        for _ in range(5):
            tg.start_soon(caller)
        with anyio.fail_after(5):
            while not gate.waiting:
                await anyio.sleep(0.01)
        await anyio.sleep(0.2)
        held_calls = daemon.calls
        await anyio.sleep(0.2)
        # Paused together: nobody calls while the daemon is away, only pings go out.
        assert daemon.calls == held_calls
        assert daemon.pings > 3
        daemon.up = True
    assert results == ["answer"] * 5
    assert daemon.calls_while_down <= 5
    assert not gate.waiting
    assert gate.state.down_since is None
    assert gate.state.outages == 1
    assert len(back) == 1
    assert "unreachable" in statuses[0]
    assert "--daemon_wait 5 s" in statuses[0]
    assert statuses[-1] == ""


@pytest.mark.anyio
async def test_a_daemon_away_past_the_wait_fails_waiting_and_new_calls_alike() -> None:
    daemon = Daemon()
    statuses: list[str] = []
    gate = gate_for(daemon, max_wait=0.3, on_status=statuses.append)
    daemon.up = False
    started = time.monotonic()
    with pytest.raises(DaemonGone) as waited:
        await gate.call(daemon.call)
    assert 0.3 <= time.monotonic() - started < 3
    assert gate.exhausted
    calls = daemon.calls
    with pytest.raises(DaemonGone):
        await gate.call(daemon.call)
    assert daemon.calls == calls  # after the wait nothing is asked of the daemon any more
    error = waited.value
    assert not is_transient(error)
    assert ADDRESS in str(error) and "--daemon_wait" in str(error) and "rerun" in str(error)
    assert statuses[-1] == ""


@pytest.mark.anyio
async def test_a_failure_while_the_daemon_answers_is_retried_a_few_times_then_raised() -> None:
    daemon = Daemon()
    gate = gate_for(daemon)

    async def broken() -> str:
        daemon.calls += 1
        raise DaemonUnavailable(ADDRESS, "server disconnected")

    with pytest.raises(DaemonUnavailable):
        await gate.call(broken)
    assert daemon.calls == QUICK_RETRIES + 1
    assert not gate.waiting


@pytest.mark.anyio
async def test_a_daemon_that_answers_pings_but_fails_every_call_runs_out_of_the_wait() -> None:
    pings = 0

    async def flapping_ping(timeout: float) -> None:
        # Away right after each failed call, back for the next ping: calls are let through
        # again and again, and every one fails.
        nonlocal pings
        pings += 1
        if pings % 2:
            raise DaemonUnavailable(ADDRESS, "connection refused")

    async def failing() -> str:
        await anyio.sleep(0.02)
        raise DaemonUnavailable(ADDRESS, "connection reset")

    gate = DaemonGate(flapping_ping, address=ADDRESS, max_wait=0.3, ping_interval=0.01)
    started = time.monotonic()
    with anyio.fail_after(10), pytest.raises(DaemonGone):
        await gate.call(failing)
    assert time.monotonic() - started >= 0.3
    assert pings > 4  # let through several times, yet the wait counts from the first failure


@pytest.mark.anyio
async def test_a_call_that_succeeds_ends_the_outage() -> None:
    daemon = Daemon()
    gate = gate_for(daemon, max_wait=1.0)
    daemon.up = False
    assert await gate.confirm_down(DaemonUnavailable(ADDRESS, "refused"))
    assert gate.waiting
    daemon.up = True
    assert await gate.call(daemon.call) == "answer"
    assert gate.state.down_since is None
    # A later outage gets the whole wait again.
    daemon.up = False
    assert await gate.confirm_down(DaemonUnavailable(ADDRESS, "refused"))
    assert gate.state.outages == 2


@pytest.mark.anyio
async def test_confirm_down_is_false_when_the_daemon_answers() -> None:
    daemon = Daemon()
    gate = gate_for(daemon)
    assert not await gate.confirm_down(DaemonUnavailable(ADDRESS, "reset"))
    assert not gate.waiting


@pytest.mark.parametrize(
    "error", [DaemonGone(ADDRESS, 600.0), DaemonInterrupted("the archive stream broke: reset")]
)
def test_daemon_errors_travel_between_processes_as_themselves(error: Exception) -> None:
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is type(error)
    assert str(again) == str(error)


def _away_in_another_process(values: object) -> None:
    """Run in a child process: meet the daemon away there."""

    async def main() -> None:
        daemon = Daemon()
        daemon.up = False
        gate = DaemonGate(daemon.ping, address=ADDRESS, state=SharedDaemonGateState(values))
        assert await gate.confirm_down(DaemonUnavailable(ADDRESS, "refused"))

    anyio.run(main)


@pytest.mark.anyio
async def test_an_outage_met_in_one_worker_process_pauses_the_others() -> None:
    context = multiprocessing.get_context("spawn")
    state = SharedDaemonGateState.create(context)
    daemon = Daemon()
    statuses: list[str] = []
    here = DaemonGate(
        daemon.ping, address=ADDRESS, ping_interval=0.01, state=state, on_status=statuses.append
    )
    assert not here.waiting and state.down_since is None
    child = context.Process(target=_away_in_another_process, args=(state.values,))
    child.start()
    await anyio.to_thread.run_sync(child.join, 60)
    assert child.exitcode == 0
    # This process never saw a failure, yet its calls wait: the outage is the run's.
    assert here.waiting and state.down_since is not None and state.outages == 1
    assert await here.call(daemon.call) == "answer"
    assert daemon.pings >= 1  # it pinged before calling
    assert not state.waiting and state.down_since is None
    assert statuses == [""]  # the pause was announced where it was met; the end, here
