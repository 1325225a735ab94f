"""One pause for every pull while a registry's rate limit lasts."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio

from asynccache import config
from asynccache.errors import RateLimited, RateLimitExhausted

log = logging.getLogger(__name__)

StatusCallback = Callable[[str], None]
T = TypeVar("T")


class PullGate:
    """Pauses all pulls together after a rate-limit answer; gives up after ``max_wait``."""

    def __init__(
        self,
        *,
        first_pause: float = config.rate_limit_pause,
        max_pause: float = config.rate_limit_pause_max,
        max_wait: float = config.rate_limit_max_wait,
        on_status: StatusCallback | None = None,
    ) -> None:
        self.first_pause = first_pause
        self.max_pause = max_pause
        self.max_wait = max_wait
        self.on_status = on_status
        self.resume_at = 0.0
        self.limited_since: float | None = None
        self.exhausted = False
        self.pauses = 0
        self._next_pause = first_pause

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
        now = time.monotonic()
        if self.limited_since is None:
            self.limited_since = now
        if now - self.limited_since >= self.max_wait:
            self.exhausted = True
            self._status("")
            raise RateLimitExhausted(exc.image, self._waited()) from exc
        if now < self.resume_at:
            return
        pause = exc.retry_after if exc.retry_after else self._next_pause
        pause = min(pause * random.uniform(1.0, 1.2), self.max_pause)
        pause = min(pause, self.limited_since + self.max_wait - now)
        self._next_pause = min(self._next_pause * 2, self.max_pause)
        self.resume_at = now + pause
        self.pauses += 1
        when = time.strftime("%H:%M:%S", time.localtime(time.time() + pause))
        self._status(f"registry rate limit: pulls paused, retrying at {when} ({pause:.0f} s)")

    def succeeded(self) -> None:
        """A pull went through: the limit is over."""
        if self.limited_since is not None:
            self.limited_since = None
            self._next_pause = self.first_pause
            self._status("")

    def _waited(self) -> float:
        return 0.0 if self.limited_since is None else time.monotonic() - self.limited_since

    def _status(self, text: str) -> None:
        if text:
            log.warning("%s", text)
        if self.on_status is not None:
            self.on_status(text)
