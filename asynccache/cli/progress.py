"""Progress display: a live bar on a terminal, periodic log lines elsewhere."""

from __future__ import annotations

import logging
import time
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from asynccache.pipeline import Outcome

log = logging.getLogger("asynccache.cli.progress")


class ProgressReporter:
    """Counts outcomes and shows them: done/total, cached, skipped, failed, rate, ETA."""

    def __init__(
        self, total: int | None, *, live: bool, log_every: float = 10.0, label: str = ""
    ) -> None:
        self.total = total
        self.live = live
        #: Names what is cached, e.g. ``shard 3/16`` (a shard's run).
        self.label = label
        self.log_every = log_every
        self.cached = self.skipped = self.failed = 0
        self.status = ""
        self._started = time.monotonic()
        self._last_log = self._started
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    @property
    def done(self) -> int:
        """Entries finished in any way."""
        return self.cached + self.skipped + self.failed

    def __enter__(self) -> ProgressReporter:
        self._started = time.monotonic()
        if self.live:
            self._progress = Progress(
                TextColumn(f"[bold]{self.label or 'caching'}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[counts]}"),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(
                "cache", total=self.total, counts=self._counts(), rate="", status=""
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._refresh()
            self._progress.__exit__(exc_type, exc, tb)
            self._progress = None
        elif exc_type is None:
            self._log_line()

    def _counts(self) -> str:
        return f"{self.cached} cached, {self.skipped} skipped, {self.failed} failed"

    def _rate(self) -> float:
        elapsed = max(time.monotonic() - self._started, 1e-6)
        return self.cached / elapsed * 60

    def update(self, outcome: Outcome) -> None:
        """Count one finished entry and refresh the display."""
        if outcome.status == "cached":
            self.cached += 1
        elif outcome.status == "skipped":
            self.skipped += 1
        else:
            self.failed += 1
        self._refresh()

    def set_status(self, status: str) -> None:
        """Show a passing state (e.g. a rate-limit pause) beside the counts."""
        self.status = status
        if self._progress is None and status:
            log.warning("%s", status)
        self._refresh()

    def _refresh(self) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(
                self._task,
                completed=self.done,
                counts=self._counts(),
                rate=f"{self._rate():.1f}/min",
                status=self.status,
            )
        elif time.monotonic() - self._last_log >= self.log_every:
            self._log_line()

    def _log_line(self) -> None:
        self._last_log = time.monotonic()
        total = "?" if self.total is None else str(self.total)
        eta = ""
        rate = self._rate()
        if self.total is not None and rate > 0:
            remaining = max(self.total - self.done, 0)
            eta = f", ETA {remaining / rate * 60:.0f} s"
        prefix = f"{self.label}: " if self.label else "progress: "
        log.info(
            "%s%d/%s done (%s), %.1f/min%s", prefix, self.done, total, self._counts(), rate, eta
        )
