"""What every subcommand shares: exit codes, the global flags, the cache folder, the parser."""

from __future__ import annotations

import argparse
import difflib
import re
import sys
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import TypeAlias

from asynccache import config
from asynccache.cli.environment import AFTER
from asynccache.cli.logs import FORMATS
from asynccache.errors import CacheError

#: Exit codes. 75 is sysexits' EX_TEMPFAIL: the run stopped for something a later retry can fix.
EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_TEMPFAIL = 0, 1, 2, 75
#: Stdout was closed by its reader (``| head``): what a shell reports for a SIGPIPE death.
EXIT_PIPE = 141

Subparsers: TypeAlias = "argparse._SubParsersAction[Parser]"
#: Adds one subcommand to the command line; its parser sets ``func`` (args -> exit code).
AddCommand = Callable[[Subparsers], argparse.ArgumentParser]
Handler = Callable[[argparse.Namespace], int]

_CHOICE = re.compile(r"invalid choice: '(?P<word>[^']*)' \(choose from (?P<choices>.*)\)")
_BYTES = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(?:([kmgt])(?:i?b)?|b)?\s*", re.IGNORECASE)
_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


class Parser(argparse.ArgumentParser):
    """argparse with exit code 2, a usage line, and a suggestion for a mistyped choice."""

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print the usage line and a one-line error; exit 2."""
        match = _CHOICE.search(message)
        if match is not None:
            choices = re.findall(r"'([^']*)'", match.group("choices"))
            close = difflib.get_close_matches(match.group("word"), choices, n=1)
            if close:
                message += f"; did you mean {close[0]!r}?"
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def flag(name: str) -> list[str]:
    """``--name`` and, for names with underscores, the dashed spelling too."""
    spellings = [f"--{name}"]
    if "_" in name:
        spellings.append(f"--{name.replace('_', '-')}")
    return spellings


def byte_count(text: str) -> int:
    """A number of bytes: plain, or with a binary unit (``64G``, ``512MiB``, ``1.5T``)."""
    match = _BYTES.fullmatch(text)
    if match is None:
        raise argparse.ArgumentTypeError(
            f"not a byte count: {text!r} (bytes, or with a unit: 64G, 512MiB, 1.5T)"
        )
    number, unit = match.groups()
    return int(Fraction(number) * _UNITS.get((unit or "").lower(), 1))


def add_global_flags(parser: argparse.ArgumentParser, *, after_command: bool = False) -> None:
    """-v, -q, --log_format, --cache_dir, --version: before the subcommand or after it.

    Copies after the subcommand default to SUPPRESS so that a value given before it stays;
    their counts land in ``<dest>_after`` and are added up by :func:`merge_global_flags`.
    """
    suffix = AFTER if after_command else ""

    def default(value: object) -> object:
        return argparse.SUPPRESS if after_command else value

    parser.add_argument(
        "--version",
        action="version",
        version=f"asynccache {_version()}",
        help="print the version and exit",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        dest=f"verbose{suffix}",
        default=default(0),
        help="more log lines: -v debug, -vv also the libraries'",
    )
    parser.add_argument(
        "-q",
        "--quiet",
        action="count",
        dest=f"quiet{suffix}",
        default=default(0),
        help="fewer log lines: -q warnings only, -qq errors only",
    )
    parser.add_argument(
        *flag("log_format"),
        choices=FORMATS,
        default=default("text"),
        help="log lines as text or as one JSON object each (default text)",
    )
    parser.add_argument(
        *flag("cache_dir"),
        type=Path,
        default=default(None),
        help=f"cache folder (default {config.repo_cache_dir})",
    )


def merge_global_flags(args: argparse.Namespace) -> None:
    """Add the counts of -v/-q given after the subcommand to those given before it."""
    for dest in ("verbose", "quiet"):
        after = getattr(args, dest + AFTER, 0)
        if hasattr(args, dest + AFTER):
            delattr(args, dest + AFTER)
        setattr(args, dest, getattr(args, dest, 0) + after)


def guarded(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """run(args), with an error of ours printed as one line and exit code 2."""
    try:
        return run(args)
    except CacheError as exc:
        print(f"asynccache: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


def cache_dir(args: argparse.Namespace) -> Path:
    """The cache folder: --cache_dir, else ASYNCCACHE_CACHE_DIR, else the default."""
    given = getattr(args, "cache_dir", None)
    return Path(given) if given is not None else config.default_cache_dir()


def verbosity(args: argparse.Namespace) -> int:
    """-v count minus -q count."""
    return int(getattr(args, "verbose", 0)) - int(getattr(args, "quiet", 0))


def _version() -> str:
    from asynccache import __version__

    return __version__
