"""A source whose every tree gets the run's last step (tree/options.py) before it is handed on."""

from __future__ import annotations

import functools
from pathlib import Path

import anyio.to_thread

from asynccache.entries import Entry
from asynccache.sources.base import Source
from asynccache.tree.extract import ExtractResult
from asynccache.tree.options import TreeFinisher

__all__ = ["FinishingSource", "finishing"]


class FinishingSource:
    """Wraps a source: each tree it extracts is finished (e.g. its git history closed) in a
    thread of the same process, before the caller sees it."""

    def __init__(self, inner: Source, finish: TreeFinisher) -> None:
        self.inner = inner
        self.finish = finish

    async def prepare(self, entry: Entry) -> None:
        await self.inner.prepare(entry)

    async def extract_into(self, entry: Entry, dest: Path) -> ExtractResult:
        result = await self.inner.extract_into(entry, dest)
        return await anyio.to_thread.run_sync(functools.partial(self.finish, dest, result))

    async def after_extraction(self, entry: Entry) -> None:
        await self.inner.after_extraction(entry)


def finishing(source: Source, finish: TreeFinisher | None) -> Source:
    """The source, finishing each tree with ``finish`` when one is given."""
    return source if finish is None else FinishingSource(source, finish)
