"""A worker process told to cancel an entry answers only once nothing of the entry still runs:
the main process removes the entry's work folder on that answer."""

from __future__ import annotations

import asyncio
import multiprocessing
import pickle
import threading
import time
from pathlib import Path
from typing import Any

import anyio

from asynccache.entries import Entry
from asynccache.sources.finishing import finishing
from asynccache.sources.pool_worker import WorkerError, _run, _Sender
from asynccache.tree.extract import ExtractResult

ENTRY = Entry("alpha__aaaaaaaaaaaa", "alpha", "namanjain12/alpha_final:" + "a" * 40, "a" * 40)


class Extracted:
    """A source whose extraction is done at once (the tree's last step is what is cancelled)."""

    def __init__(self) -> None:
        self.extracted = 0

    async def prepare(self, entry: Entry) -> None:
        pass

    async def extract_into(self, entry: Entry, dest: Path) -> ExtractResult:
        self.extracted += 1
        return ExtractResult(0, 0, ())

    async def after_extraction(self, entry: Entry) -> None:
        pass


class SlowFinish:
    """A tree finisher (such as the git guard) that takes a while in its thread."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.returned = threading.Event()

    def __call__(self, tree: Path, result: ExtractResult) -> ExtractResult:
        self.started.set()
        time.sleep(0.5)
        self.returned.set()
        return result


def _answer(conn: Any) -> tuple[Any, ...]:
    assert conn.poll(10), "the worker never answered"
    message: tuple[Any, ...] = conn.recv()
    return message


def test_a_cancelled_entry_is_answered_only_once_its_tree_finisher_returned(
    tmp_path: Path,
) -> None:
    finish = SlowFinish()
    ours, theirs = multiprocessing.Pipe()
    returned_at_answer: list[bool] = []

    async def main() -> None:
        scope = anyio.CancelScope()
        source = finishing(Extracted(), finish)
        job = asyncio.create_task(
            _run(source, _Sender(theirs), "extract", 7, (ENTRY, str(tmp_path)), scope)
        )
        await anyio.to_thread.run_sync(finish.started.wait, 10)
        scope.cancel()  # what the worker does on the main process's "cancel"
        answered = anyio.to_thread.run_sync(ours.poll, 10)
        assert await answered
        returned_at_answer.append(finish.returned.is_set())
        await job

    asyncio.run(main())
    kind, job, payload = _answer(ours)
    assert (kind, job) == ("err", 7)
    assert str(pickle.loads(payload)) == "cancelled"
    assert returned_at_answer == [True], "answered while the finisher still ran in the folder"


def test_an_entry_cancelled_before_it_started_is_answered_and_never_extracted(
    tmp_path: Path,
) -> None:
    source = Extracted()
    ours, theirs = multiprocessing.Pipe()

    async def main() -> None:
        scope = anyio.CancelScope()
        job = asyncio.create_task(
            _run(source, _Sender(theirs), "extract", 8, (ENTRY, str(tmp_path)), scope)
        )
        scope.cancel()  # the "cancel" came before the job's task first ran
        await job

    asyncio.run(main())
    kind, job, payload = _answer(ours)
    assert (kind, job) == ("err", 8)
    error = pickle.loads(payload)
    assert isinstance(error, WorkerError) and str(error) == "cancelled"
    assert source.extracted == 0
