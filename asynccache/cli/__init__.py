"""The command line: subcommands (caching is the default), their flags, logs and progress."""

from asynccache.cli.app import main

__all__ = ["main"]
