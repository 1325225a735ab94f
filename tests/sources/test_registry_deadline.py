"""The registry backend's whole-entry deadline: what counts, what it does when it passes."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest

from asynccache.entries import Entry
from asynccache.errors import TransferFailed, UnsafeArchive
from asynccache.sources.ratelimit import PullGate
from asynccache.sources.registry.backend import RegistryBackend
from asynccache.tree.extract import ExtractResult

ENTRY = Entry("repo__" + "a" * 12, "repo", "127.0.0.1:5000/ocitest/repo:v1", "a" * 40)


class Timed(RegistryBackend):
    """A backend whose extraction takes a set time (or fails), to time the deadline around it."""

    def __init__(
        self, tmp_path: Path, takes: float, entry_timeout: float, fails: bool = False
    ) -> None:
        super().__init__(tmp_path, layer_cache_bytes=0, entry_timeout=entry_timeout)
        self.takes = takes
        self.fails = fails

    async def _extract(self, entry: Entry, dest: Path) -> ExtractResult:
        await anyio.sleep(self.takes)
        if self.fails:
            raise UnsafeArchive("testbed/x", "bad member")
        return ExtractResult(file_count=1, size_bytes=1, warnings=())


@pytest.mark.anyio
async def test_an_entry_past_its_deadline_fails_as_a_transfer(tmp_path: Path) -> None:
    backend = Timed(tmp_path, takes=3600, entry_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(TransferFailed, match=r"took longer than 0.5 s; raise --pull_timeout"):
        await backend.extract_into(ENTRY, tmp_path)
    assert time.monotonic() - started < 5


@pytest.mark.anyio
async def test_within_the_deadline_the_result_or_the_error_comes_through(tmp_path: Path) -> None:
    done = await Timed(tmp_path, takes=0.01, entry_timeout=5).extract_into(ENTRY, tmp_path)
    assert done.file_count == 1
    with pytest.raises(UnsafeArchive, match="bad member"):
        await Timed(tmp_path, takes=0.01, fails=True, entry_timeout=5).extract_into(ENTRY, tmp_path)


@pytest.mark.anyio
async def test_time_while_every_pull_pauses_is_not_counted(tmp_path: Path) -> None:
    gate = PullGate(first_pause=60, max_pause=900, max_wait=21600)
    backend = Timed(tmp_path, takes=2.5, entry_timeout=1.5)
    backend.pull_gate = gate
    gate.state.resume_at = time.monotonic() + 2  # a rate limit pauses every pull for 2 s
    done = await backend.extract_into(ENTRY, tmp_path)
    assert done.file_count == 1
