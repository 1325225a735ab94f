"""Logging of the command line: levels from -v/-q, text or JSON lines with ISO 8601 times."""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from datetime import datetime
from typing import TextIO

FORMATS = ("text", "json")

#: Writes one finished log line; the live progress display replaces it while it runs.
Sink = Callable[[str], None]


def iso_time(record: logging.LogRecord) -> str:
    """The record's time as ISO 8601 with the local offset, to the millisecond."""
    moment = datetime.fromtimestamp(record.created).astimezone()
    return moment.isoformat(timespec="milliseconds")


class TextFormatter(logging.Formatter):
    """``2026-11-29T19:31:09.123+00:00 INFO message``."""

    def format(self, record: logging.LogRecord) -> str:
        """One line (a traceback, at -v only, follows it)."""
        line = f"{iso_time(record)} {record.levelname} {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message (and the traceback, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as one line of JSON."""
        data = {
            "time": iso_time(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False)


class LineHandler(logging.Handler):
    """Hands each formatted line to a sink: stderr, or the live display while it runs."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self._stream = stream
        self.sink: Sink | None = None

    def emit(self, record: logging.LogRecord) -> None:
        """Format and write one record; never raise."""
        try:
            line = self.format(record)
            if self.sink is not None:
                self.sink(line)
            else:
                stream = self._stream or sys.stderr
                stream.write(line + "\n")
                stream.flush()
        except Exception:
            self.handleError(record)


def current_handler() -> LineHandler | None:
    """The handler :func:`configure` installed, if any."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LineHandler):
            return handler
    return None


def level_of(verbosity: int) -> int:
    """-q -q: errors; -q: warnings; none: info; -v: debug."""
    if verbosity <= -2:
        return logging.ERROR
    if verbosity == -1:
        return logging.WARNING
    if verbosity == 0:
        return logging.INFO
    return logging.DEBUG


def configure(verbosity: int, log_format: str = "text") -> LineHandler:
    """Send every log record to one handler on stderr; return it (to redirect its lines)."""
    handler = LineHandler()
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    logging.getLogger("asynccache").setLevel(level_of(verbosity))
    # Libraries (HTTP clients, datasets, ...) log at INFO about every request: their lines
    # drown the run's own, so below a warning they show only when asked twice (-vv).
    root.setLevel(logging.DEBUG if verbosity >= 2 else max(logging.WARNING, level_of(verbosity)))
    # datasets and huggingface_hub set their own level and handler when imported (later, and
    # only for Hub datasets); they read it from these variables, which a user's setting wins.
    for variable in ("DATASETS_VERBOSITY", "HF_HUB_VERBOSITY"):
        os.environ.setdefault(variable, "debug" if verbosity >= 2 else "error")
    return handler
