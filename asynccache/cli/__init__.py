"""Caching as a command: the run (default) and the maintenance commands."""

from asynccache.cli.run import main

__all__ = ["main"]
