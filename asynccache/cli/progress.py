"""Progress display: a live bar on a terminal (log lines print above it), or periodic lines."""

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

from asynccache.cli.logs import LineHandler
from asynccache.pipeline import Outcome

log = logging.getLogger("asynccache.cli.progress")

#: ``--progress``: auto (a bar on a terminal, else lines), bar, plain (lines), none.
MODES = ("auto", "bar", "plain", "none")


def resolve_mode(mode: str, *, terminal: bool, quiet: bool) -> str:
    """The display ``auto`` stands for: a bar on a terminal unless -q, else plain lines."""
    if mode != "auto":
        return mode
    return "bar" if terminal and not quiet else "plain"


class ProgressReporter:
    """Counts outcomes and shows them: done/total, cached, skipped, failed, rate, ETA."""

    def __init__(
        self,
        total: int | None,
        *,
        mode: str = "plain",
        log_every: float = 10.0,
        handler: LineHandler | None = None,
        label: str = "",
    ) -> None:
        self.total = total
        self.mode = mode
        #: Names what is cached, e.g. ``shard 3/16`` (a shard's run).
        self.label = label
        self.log_every = log_every
        self.handler = handler
        self.cached = self.skipped = self.failed = 0
        self.status = ""
        self._started = time.monotonic()
        self._last_log = self._started
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    @property
    def live(self) -> bool:
        """True when a live bar is shown."""
        return self.mode == "bar"

    @property
    def done(self) -> int:
        """Entries finished in any way."""
        return self.cached + self.skipped + self.failed

    def __enter__(self) -> ProgressReporter:
        self._started = time.monotonic()
        if self.live:
            console = Console(stderr=True, force_terminal=True)
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
                console=console,
                transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(
                "cache", total=self.total, counts=self._counts(), rate="", status=""
            )
            if self.handler is not None:
                # Log lines go through the live display, which prints them above the bar.
                self.handler.sink = self._print_above
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._refresh()
            if self.handler is not None:
                self.handler.sink = None
            self._progress.__exit__(exc_type, exc, tb)
            self._progress = None
        elif exc_type is None and self.mode == "plain":
            self._log_line()

    def _print_above(self, line: str) -> None:
        if self._progress is not None:
            self._progress.console.out(line, highlight=False)

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
        """Show a passing state (e.g. a rate-limit pause) beside the counts.

        Not logged here: the gates that report a pause log it themselves (once).
        """
        self.status = status
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
        elif self.mode == "plain" and time.monotonic() - self._last_log >= self.log_every:
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
