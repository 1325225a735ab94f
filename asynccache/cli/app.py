"""The ``asynccache`` command: subcommands (caching is the default), global flags, environment."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

from asynccache.cli import environment, logs
from asynccache.cli import maintenance as maintenance_cli
from asynccache.cli import run as run_cli
from asynccache.cli import transfer as transfer_cli
from asynccache.cli.common import (
    EXIT_PIPE,
    EXIT_USAGE,
    AddCommand,
    Handler,
    Parser,
    Subparsers,
    add_global_flags,
    merge_global_flags,
    verbosity,
)
from asynccache.errors import SetupError

#: Every subcommand, in the order ``--help`` lists them. Adding one is one line here and an
#: ``add_parser(subparsers)`` beside its handler.
COMMANDS: tuple[AddCommand, ...] = (
    run_cli.add_parser,
    maintenance_cli.add_verify_parser,
    maintenance_cli.add_status_parser,
    maintenance_cli.add_merge_parser,
    maintenance_cli.add_gc_parser,
    transfer_cli.add_export_parser,
    transfer_cli.add_import_parser,
)
#: The subcommand run when none is named: ``asynccache --split train`` caches.
DEFAULT_COMMAND = "run"


class CommandLine:
    """The parser of every subcommand, and which one an argument list names."""

    def __init__(self) -> None:
        self.parser = Parser(
            prog="asynccache",
            usage="asynccache [command] [options]",
            description="Cache /testbed of every R2E-Gym image into a folder, concurrently and "
            "safely. Caching (`run`) is the default command.",
            epilog=f"Every option can also be set by {environment.PREFIX}<OPTION> (e.g. "
            "ASYNCCACHE_CONCURRENCY=8); a flag wins over its variable.",
        )
        add_global_flags(self.parser)
        subparsers: Subparsers = self.parser.add_subparsers(
            dest="command",
            metavar="command",
            title="commands",
            prog="asynccache",
        )
        self.commands: dict[str, argparse.ArgumentParser] = {}
        for add in COMMANDS:
            command = add(subparsers)
            add_global_flags(command, after_command=True)
            self.commands[command.prog.split()[-1]] = command
        for parser in (self.parser, *self.commands.values()):
            environment.annotate_help(parser)
        self.commands[DEFAULT_COMMAND].epilog = self._listing(subparsers)

    def _listing(self, subparsers: Subparsers) -> str:
        lines = [f"{action.dest}: {action.help}" for action in subparsers._choices_actions]
        return (
            "commands: "
            + "; ".join(lines)
            + f". Every option can also be set by {environment.PREFIX}<OPTION>; a flag wins."
        )

    def command_position(self, argv: Sequence[str]) -> int | None:
        """Where the subcommand's name is in ``argv`` (None when it names none).

        The name is the first word that is neither an option nor an option's value. A word
        there that is no command is left for argparse to refuse as an invalid choice.
        """
        takes_value = {
            spelling: action.nargs != 0
            for parser in (self.parser, *self.commands.values())
            for action in environment.options(parser)
            for spelling in action.option_strings
        }
        skip = False
        for position, word in enumerate(argv):
            if skip:
                skip = False
            elif word == "--":
                return position + 1 if position + 1 < len(argv) else None
            elif word.startswith("-") and word != "-":
                skip = "=" not in word and takes_value.get(word, False)
            else:
                return position
        return None

    def parse(self, argv: Sequence[str], environ: Mapping[str, str]) -> argparse.Namespace:
        """Parse ``argv`` with defaults from ``environ``; exit 2 on a usage error."""
        words = list(argv)
        position = self.command_position(words)
        if position is None:
            words.insert(0, DEFAULT_COMMAND)
            name = DEFAULT_COMMAND
            # Errors and help of the default command read as the command's own.
            self.commands[DEFAULT_COMMAND].prog = self.parser.prog
        else:
            name = words[position]
        applied = environment.apply(self.parser, environ)
        if name in self.commands:
            applied += environment.apply(self.commands[name], environ)
        args = self.parser.parse_args(words)
        merge_global_flags(args)
        args.from_env = environment.sources(args, applied)
        return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``asynccache`` command; returns its exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    try:
        args = CommandLine().parse(arguments, os.environ)
        logs.configure(verbosity(args), args.log_format)
        handler: Handler = args.func
        return handler(args)
    except SetupError as exc:
        print(f"asynccache: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        return _closed_pipe()


def _closed_pipe() -> int:
    """The reader of stdout went away (``| head``): leave quietly, as `yes | head` does."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        # Python flushes stdout once more at exit; pointed at /dev/null it cannot fail again.
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass
    return EXIT_PIPE
