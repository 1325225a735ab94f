"""One pause for every pull while a registry's rate limit lasts, across worker processes too."""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, ClassVar, TypeVar

import anyio

from asynccache import config
from asynccache.errors import RateLimited, RateLimitExhausted
from asynccache.sources.shared_state import SharedFields, optional_time

log = logging.getLogger(__name__)

StatusCallback = Callable[[str], None]
T = TypeVar("T")


class GateState:
    """A gate's changing state, for one process."""

    def __init__(self, first_pause: float) -> None:
        self.resume_at = 0.0
        self.limited_since: float | None = None
        self.exhausted = False
        self.pauses = 0
        self.next_pause = first_pause

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the state still while it is read and changed (one process: nothing to do)."""
        yield


class SharedGateState(SharedFields, GateState):
    """A gate's state in shared memory, so that worker processes pause together."""

    _FIELDS = ("resume_at", "limited_since", "exhausted", "pauses", "next_pause")
    _KINDS: ClassVar[dict[str, Callable[[float], Any]]] = {
        "limited_since": optional_time,
        "exhausted": bool,
        "pauses": int,
    }

    @classmethod
    def create(cls, context: Any, first_pause: float) -> SharedGateState:
        """New shared state from a multiprocessing context (pass ``.values`` to workers)."""
        return cls(context.Array("d", [0.0, math.nan, 0.0, 0.0, first_pause]))


class PullGate:
    """Pauses all pulls together after a rate-limit answer; gives up after ``max_wait``."""

    def __init__(
        self,
        *,
        first_pause: float = config.rate_limit_pause,
        max_pause: float = config.rate_limit_pause_max,
        max_wait: float = config.rate_limit_max_wait,
        on_status: StatusCallback | None = None,
        state: GateState | None = None,
    ) -> None:
        self.first_pause = first_pause
        self.max_pause = max_pause
        self.max_wait = max_wait
        self.on_status = on_status
        self.state = state if state is not None else GateState(first_pause)

    @property
    def resume_at(self) -> float:
        """When pulls may go on again (``time.monotonic``)."""
        return self.state.resume_at

    @property
    def limited_since(self) -> float | None:
        """When the current rate limit was first met, or None."""
        return self.state.limited_since

    @property
    def exhausted(self) -> bool:
        """True once the whole wait was spent: every later pull fails."""
        return self.state.exhausted

    @property
    def pauses(self) -> int:
        """How many pauses the run made."""
        return self.state.pauses

    async def through(self, image: str, pull: Callable[[], Awaitable[T]]) -> T:
        """Run ``pull`` once pulls may go on; after a rate-limit answer, wait and run it again.

        Every pull of a run goes through here, so that one answer pauses them all and one
        success ends the pause for all.
        """
        while True:
            await self.wait_open(image)
            try:
                result = await pull()
            except RateLimited as exc:
                self.limited(exc)
                continue
            self.succeeded()
            return result

    async def wait_open(self, image: str) -> None:
        """Return when pulls may go on; raise RateLimitExhausted once the wait is spent."""
        while True:
            if self.exhausted:
                raise RateLimitExhausted(image, self._waited())
            delay = self.resume_at - time.monotonic()
            if delay <= 0:
                return
            await anyio.sleep(delay)

    def limited(self, exc: RateLimited) -> None:
        """Record a rate-limit answer: pause every pull (once, however many workers hit it)."""
        state = self.state
        with state.locked():
            now = time.monotonic()
            if state.limited_since is None:
                state.limited_since = now
            since = state.limited_since
            if now - since >= self.max_wait:
                state.exhausted = True
                exhausted = True
            else:
                exhausted = False
                if now < state.resume_at:
                    return
                pause = exc.retry_after if exc.retry_after else state.next_pause
                pause = min(pause * random.uniform(1.0, 1.2), self.max_pause)
                pause = min(pause, since + self.max_wait - now)
                state.next_pause = min(state.next_pause * 2, self.max_pause)
                state.resume_at = now + pause
                state.pauses += 1
        if exhausted:
            self._status("")
            raise RateLimitExhausted(exc.image, self._waited()) from exc
        when = time.strftime("%H:%M:%S", time.localtime(time.time() + pause))
        self._status(f"registry rate limit: pulls paused, retrying at {when} ({pause:.0f} s)")

    @property
    def paused(self) -> bool:
        """Every pull waits now (a rate limit lasts)."""
        return time.monotonic() < self.resume_at

    def succeeded(self) -> None:
        """A pull went through: the limit is over."""
        state = self.state
        with state.locked():
            if state.limited_since is None:
                return
            state.limited_since = None
            state.next_pause = self.first_pause
        self._status("")

    def _waited(self) -> float:
        return 0.0 if self.limited_since is None else time.monotonic() - self.limited_since

    def _status(self, text: str) -> None:
        if text:
            log.warning("%s", text)
        if self.on_status is not None:
            self.on_status(text)
