"""The worker side of the process pool: a worker process's loop, serving one pipe.

A worker runs its own event loop with its own backend (the one a one-process run opens), does
``prepare``, ``extract_into`` and ``after_extraction`` for the entries the main process sends,
several at a time, and sends back each result, or the domain error itself (a ``WorkerError``
with its message and retry flags when it cannot travel as itself). See ``pool.py`` for the
main process's side.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import pickle
import signal
import threading
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel

from asynccache.config import CacheOptions
from asynccache.errors import CacheError
from asynccache.sources.base import Source
from asynccache.sources.daemon_gate import SharedDaemonGateState
from asynccache.sources.factory import make_backend, pull_gate
from asynccache.sources.finishing import finishing
from asynccache.sources.ratelimit import SharedGateState
from asynccache.sources.worker_memory import tune_for_worker
from asynccache.tree.extract import ExtractResult
from asynccache.tree.options import TreeFactory, TreeOptions

_PR_SET_PDEATHSIG = 1


class WorkerError(CacheError):
    """A failure in a worker process whose own error could not travel back as itself."""

    def __init__(self, message: str, transient: bool, retry_later: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
        self.retry_later = retry_later

    def __reduce__(self) -> tuple[Any, ...]:
        return (WorkerError, (str(self), self.transient, self.retry_later))


def error_payload(exc: BaseException) -> bytes:
    """The error as pickled bytes: itself when a round trip gives it back unchanged (an error
    whose constructor takes other arguments than its message may not), else a WorkerError with
    its message and retry flags."""
    try:
        data = pickle.dumps(exc)
        back = pickle.loads(data)
        if type(back) is type(exc) and str(back) == str(exc):
            return data
    except Exception:
        pass
    if isinstance(exc, CacheError):
        return pickle.dumps(WorkerError(str(exc), exc.transient, exc.retry_later))
    return pickle.dumps(WorkerError(f"{type(exc).__name__}: {exc}", False))


def worker_main(
    conn: Connection,
    options: CacheOptions,
    cache_root: str,
    work_name: str | None,
    slot: int,
    gate_values: Any,
    daemon_values: Any,
    log_levels: tuple[int, int],
    tree_factory: TreeFactory | None = None,
) -> None:
    """Entry point of a worker process: serve requests until told to stop or orphaned."""
    # The main process handles signals and tells workers what to do; a worker dies with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        return
    sender = _Sender(conn)
    root = logging.getLogger()
    root.handlers[:] = [_PipeLogHandler(sender)]
    # The main process's levels: the root's, and the package's own (the CLI shows our INFO
    # lines but only the warnings of libraries).
    root.setLevel(log_levels[0])
    logging.getLogger("asynccache").setLevel(log_levels[1])
    tune_for_worker()
    asyncio.run(
        _serve(
            conn,
            sender,
            options,
            Path(cache_root),
            work_name,
            slot,
            gate_values,
            daemon_values,
            tree_factory,
        )
    )


class _Sender:
    """Sends to the main process from any thread of the worker."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.lock = threading.Lock()

    def send(self, message: tuple[Any, ...]) -> None:
        with self.lock, contextlib.suppress(OSError, ValueError):
            self.conn.send(message)


class _PipeLogHandler(logging.Handler):
    """Worker log records go to the main process, which shows them with its own."""

    def __init__(self, sender: _Sender) -> None:
        super().__init__()
        self.sender = sender

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sender.send(("log", record.levelno, record.name, record.getMessage()))
        except Exception:
            self.handleError(record)


async def _serve(
    conn: Connection,
    sender: _Sender,
    options: CacheOptions,
    cache_root: Path,
    work_name: str | None,
    slot: int,
    gate_values: Any,
    daemon_values: Any,
    tree_factory: TreeFactory | None,
) -> None:
    loop = asyncio.get_running_loop()
    requests: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def read() -> None:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                message = ("stop",)
            loop.call_soon_threadsafe(requests.put_nowait, message)
            if message[0] == "stop":
                return

    def status(text: str) -> None:
        sender.send(("status", text))

    gate = pull_gate(options, status, SharedGateState(gate_values))
    try:
        tree = tree_factory(options, cache_root) if tree_factory is not None else TreeOptions()
    except BaseException as exc:
        sender.send(("failed", error_payload(exc)))
        return
    backend = make_backend(
        options,
        cache_root,
        gate,
        work_name,
        slot,
        on_status=status,
        daemon_state=SharedDaemonGateState(daemon_values),
        tree=tree,
    )
    try:
        await backend.__aenter__()
    except BaseException as exc:
        tree.close()
        sender.send(("failed", error_payload(exc)))
        return
    # each tree is finished (its history past HEAD removed, its digest taken) here too
    source = finishing(backend, tree.finish)
    threading.Thread(target=read, name="asynccache-requests", daemon=True).start()
    sender.send(("ready",))
    running: dict[int, tuple[asyncio.Task[None], anyio.CancelScope]] = {}
    try:
        while True:
            message = await requests.get()
            op = message[0]
            if op == "stop":
                break
            if op == "cancel":
                found = running.get(message[1])
                if found is not None:
                    found[1].cancel()
                continue
            job: int = message[1]
            scope = anyio.CancelScope()
            task = asyncio.create_task(_run(source, sender, op, job, message[2:], scope))
            running[job] = (task, scope)
            task.add_done_callback(functools.partial(_forget, running, job))
    finally:
        jobs = list(running.values())
        for _task, scope in jobs:
            scope.cancel()
        if jobs:
            await asyncio.gather(*(task for task, _scope in jobs), return_exceptions=True)
        with contextlib.suppress(Exception):
            await backend.__aexit__(None, None, None)
        tree.close()
        totals = getattr(backend, "totals", None)
        if totals is not None:
            sender.send(("totals", totals()))


def _cancelled() -> bytes:
    """The answer to a request cancelled before it finished."""
    return pickle.dumps(WorkerError("cancelled", False))


def _forget(
    running: dict[int, tuple[asyncio.Task[None], anyio.CancelScope]], job: int, _task: object
) -> None:
    running.pop(job, None)


async def _run(
    source: Source,
    sender: _Sender,
    op: str,
    job: int,
    args: tuple[Any, ...],
    scope: anyio.CancelScope,
) -> None:
    """Do one request and answer it. Cancelled through ``scope`` (the main process's
    "cancel"), it answers only once the entry's threads have returned: a cancel scope waits
    for a thread (the extraction's, the git guard's) where a bare task.cancel() would leave it
    running in a work folder that the main process removes on the answer."""
    value: ExtractResult | None = None
    try:
        with scope:
            await anyio.lowlevel.checkpoint()  # cancelled before it started: nothing starts
            if op == "prepare":
                await source.prepare(args[0])
            elif op == "extract":
                value = await source.extract_into(args[0], Path(args[1]))
            elif op == "release":
                await source.after_extraction(args[0])
            else:
                raise WorkerError(f"unknown request {op!r}", False)
    except asyncio.CancelledError:
        sender.send(("err", job, _cancelled()))
        raise
    except BaseException as exc:
        sender.send(("err", job, error_payload(exc)))
        return
    if scope.cancel_called:  # what it gave no longer matters to the main process
        sender.send(("err", job, _cancelled()))
        return
    sender.send(("ok", job, value))
