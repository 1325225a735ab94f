"""One pause for every call to the Docker daemon while it is away (a restart, a crash).

A daemon restart can take well over a minute. Every call of the Docker source goes through
one gate: a connection-level failure that a ping confirms (the daemon does not answer) pauses
every call together, one caller pings the daemon every few seconds, and all go on when it
answers. A run gives up only when the daemon stays away for ``max_wait`` seconds: then every
call, waiting or new, raises :class:`DaemonGone`, which is not retried.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, ClassVar, TypeVar

import anyio

from asynccache import config
from asynccache.errors import DaemonGone, DaemonUnavailable
from asynccache.sources.ratelimit import StatusCallback
from asynccache.sources.shared_state import SharedFields, optional_time

log = logging.getLogger(__name__)

T = TypeVar("T")
#: Asks the daemon whether it answers within the given seconds; raises DaemonUnavailable if not.
Ping = Callable[[float], Awaitable[None]]

#: Longest wait for one ping's answer: a daemon starting up may accept and not yet answer.
PING_TIMEOUT = 10.0
#: Calls retried at once when the daemon answers a ping right after their failure (a pooled
#: connection to a daemon that has just restarted fails once, then a new one works).
QUICK_RETRIES = 3


class DaemonGateState:
    """A daemon gate's changing state, for one process (plain numbers only, so that
    :class:`SharedDaemonGateState` can hold them in shared memory)."""

    def __init__(self) -> None:
        #: When the current outage began (``time.monotonic``); None while calls succeed.
        #: A ping that answers does not clear it, a call that succeeds does: a daemon that
        #: answers pings but fails every call still runs out of ``max_wait``.
        self.down_since: float | None = None
        #: True while calls are held: from a confirmed failure to a ping that answers.
        self.waiting = False
        #: True once the daemon stayed away for the whole wait: every call fails.
        self.exhausted = False
        #: How many outages the run met.
        self.outages = 0

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the state still while it is read and changed (one process: nothing to do)."""
        yield


class SharedDaemonGateState(SharedFields, DaemonGateState):
    """A daemon gate's state in shared memory, so that worker processes pause together."""

    _FIELDS = ("down_since", "waiting", "exhausted", "outages")
    _KINDS: ClassVar[dict[str, Callable[[float], Any]]] = {
        "down_since": optional_time,
        "waiting": bool,
        "exhausted": bool,
        "outages": int,
    }

    @classmethod
    def create(cls, context: Any) -> SharedDaemonGateState:
        """New shared state from a multiprocessing context (pass ``.values`` to workers)."""
        return cls(context.Array("d", [math.nan, 0.0, 0.0, 0.0]))


class DaemonGate:
    """Pauses every daemon call while the daemon is away; gives up after ``max_wait``."""

    def __init__(
        self,
        ping: Ping,
        *,
        address: str,
        max_wait: float = config.daemon_wait,
        ping_interval: float = config.daemon_ping_interval,
        on_status: StatusCallback | None = None,
        on_back: Callable[[], Awaitable[None]] | None = None,
        state: DaemonGateState | None = None,
    ) -> None:
        self.ping = ping
        self.address = address
        self.max_wait = max_wait
        self.ping_interval = ping_interval
        self.on_status = on_status
        #: Run once by the caller that sees the daemon answer again (deferred clean-up).
        self.on_back = on_back
        self.state = state if state is not None else DaemonGateState()
        self._pinging = anyio.Lock()

    @property
    def exhausted(self) -> bool:
        """True once the daemon stayed away past the wait: every call fails."""
        return self.state.exhausted

    @property
    def waiting(self) -> bool:
        """True while calls are held for the daemon."""
        return self.state.waiting

    async def call(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run ``call`` once the daemon is there; when the daemon goes away during it, wait
        for it and run ``call`` again. Only for calls that may be repeated."""
        quick = 0
        while True:
            await self.wait_open()
            try:
                result = await call()
            except DaemonUnavailable as exc:
                if await self.confirm_down(exc):
                    continue
                quick += 1
                if quick > QUICK_RETRIES:
                    raise
                continue
            self.succeeded()
            return result

    async def wait_open(self) -> None:
        """Return when calls may go on; raise DaemonGone once the daemon stayed away too long.

        One caller at a time pings (every ``ping_interval`` seconds); the others wait for it.
        """
        while self.state.waiting or self.state.exhausted:
            self._check_wait()
            async with self._pinging:
                if not self.state.waiting:
                    break
                self._check_wait()
                try:
                    await self.ping(min(PING_TIMEOUT, max(self._left(), 0.1)))
                except DaemonUnavailable:
                    await anyio.sleep(min(self.ping_interval, max(self._left(), 0.0)))
                    continue
                await self._back()

    async def confirm_down(self, exc: DaemonUnavailable) -> bool:
        """After a connection-level failure: True when the daemon is away (calls now wait),
        False when it answers (the failure was the call's own, or the daemon just came back)."""
        if self.state.exhausted:
            return True
        if not self.state.waiting:
            try:
                await self.ping(PING_TIMEOUT)
            except DaemonUnavailable:
                pass
            else:
                return False
        self._went_down(exc)
        return True

    def succeeded(self) -> None:
        """A call went through: any outage is over."""
        state = self.state
        if state.down_since is None:
            return
        with state.locked():
            state.down_since = None

    def _went_down(self, exc: DaemonUnavailable) -> None:
        state = self.state
        with state.locked():
            now = time.monotonic()
            if state.down_since is None:
                state.down_since = now
                state.outages += 1
            if state.waiting or state.exhausted:
                return
            state.waiting = True
            since = state.down_since
        until = time.strftime("%H:%M:%S", time.localtime(time.time() + since + self.max_wait - now))
        self._status(
            f"Docker daemon at {self.address} unreachable ({exc.detail}): every call paused, "
            f"waiting for it until {until} (--daemon_wait {self.max_wait:.0f} s)"
        )

    async def _back(self) -> None:
        state = self.state
        with state.locked():
            if not state.waiting:
                return
            state.waiting = False
            since = state.down_since
        away = 0.0 if since is None else time.monotonic() - since
        log.warning("Docker daemon at %s answers again after %.0f s; going on", self.address, away)
        self._status("")
        if self.on_back is not None:
            await self.on_back()

    def _check_wait(self) -> None:
        state = self.state
        if not state.exhausted and state.waiting and self._left() <= 0:
            with state.locked():
                state.exhausted = True
            self._status("")
        if state.exhausted:
            raise DaemonGone(self.address, self.max_wait)

    def _left(self) -> float:
        since = self.state.down_since
        return self.max_wait if since is None else since + self.max_wait - time.monotonic()

    def _status(self, text: str) -> None:
        if text:
            log.warning("%s", text)
        if self.on_status is not None:
            self.on_status(text)
