"""The one seam: a source writes an entry's /testbed into an empty folder."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from asynccache.entries import Entry
from asynccache.tree.extract import ExtractResult

__all__ = ["ExtractResult", "Source"]


class Source(Protocol):
    """Where an entry's /testbed comes from (a Docker daemon, or image layers from a registry).

    The pipeline calls ``prepare`` first, then ``extract_into`` while it holds one of its few
    extraction slots (extracting is CPU work; waiting for a pull is not), and
    ``after_extraction`` once the entry is done, cached or failed.
    """

    async def prepare(self, entry: Entry) -> None:
        """Fetch what the entry needs before an extraction slot is taken (e.g. pull its image)."""
        ...

    async def extract_into(self, entry: Entry, dest: Path) -> ExtractResult:
        """Write the entry's /testbed into the empty folder ``dest``; say what was written."""
        ...

    async def after_extraction(self, entry: Entry) -> None:
        """Release what the entry needed once it is done, cached or failed."""
        ...
