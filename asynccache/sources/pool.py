"""The per-entry work in long-lived worker processes: one source for the main process.

The GIL bounds one process to about one and a half cores of tar parsing, inflating, hashing and
writing. With ``--processes P`` the main process keeps the producer, the index writer, the
progress display, signals and the work folders (it makes and removes them); each worker process
runs its own event loop with its own backend (the same one a one-process run opens) and does
``prepare``, ``extract_into`` and ``after_extraction`` for the entries it is given, several at a
time. Requests and answers are small tuples over one pipe per worker; a result comes back as
the ``ExtractResult`` itself and a failure as the domain error itself (or, when it cannot be
pickled, a ``WorkerError`` with the same message and retry flags; the worker's side is in
``pool_worker.py``). The rate-limit gate's state lives in shared memory, so a pause seen by one
worker pauses them all. A worker that dies fails its entries in flight with a transient error
(so the pipeline retries them) and is replaced.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import pickle
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
import anyio.to_thread

from asynccache.config import CacheOptions
from asynccache.entries import Entry
from asynccache.errors import CacheError
from asynccache.sources.base import ExtractResult
from asynccache.sources.daemon_gate import SharedDaemonGateState
from asynccache.sources.pool_worker import worker_main
from asynccache.sources.ratelimit import SharedGateState, StatusCallback
from asynccache.sources.registry.totals import totals_line
from asynccache.tree.options import TreeFactory

log = logging.getLogger(__name__)

#: Seconds a worker has to stop an entry it was told to cancel before it is killed.
CANCEL_GRACE = 30.0
#: Seconds a new worker has to open its backend.
START_TIMEOUT = 120.0


class WorkerDied(CacheError):
    """The worker process doing an entry ended (killed, out of memory): retried elsewhere."""

    transient = True


class _Reply:
    """One request's answer, filled in by the pipe reader."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def settle(self, value: Any = None, error: BaseException | None = None) -> None:
        if not self.done.is_set():
            self.value, self.error = value, error
            self.done.set()


class _Worker:
    """The main process's handle on one worker process."""

    def __init__(self, number: int, slot: int, process: Any, conn: Connection) -> None:
        self.number = number
        self.slot = slot
        self.process = process
        self.conn = conn
        self.replies: dict[int, _Reply] = {}
        self.alive = True
        self.ready = anyio.Event()
        self.start_error: BaseException | None = None
        #: The thread reading this worker's pipe (it ends once the pipe is drained).
        self.reader: threading.Thread | None = None

    @property
    def load(self) -> int:
        return len(self.replies)

    def send(self, message: tuple[Any, ...]) -> None:
        """Send a request (from the event loop thread only)."""
        try:
            self.conn.send(message)
        except (OSError, ValueError):
            self.mark_dead()

    def mark_dead(self) -> None:
        """Fail every request in flight: the pipeline retries them on another worker."""
        self.alive = False
        for reply in self.replies.values():
            reply.settle(error=WorkerDied(f"worker process {self.number} ended during the entry"))
        self.replies.clear()
        if not self.ready.is_set():
            self.start_error = self.start_error or WorkerDied(
                f"worker process {self.number} ended while starting"
            )
            self.ready.set()


class ProcessPoolSource:
    """A Source that forwards each entry's work to a pool of worker processes."""

    def __init__(
        self,
        options: CacheOptions,
        cache_root: Path,
        *,
        work_name: str | None = None,
        on_status: StatusCallback | None = None,
        tree_factory: TreeFactory | None = None,
    ) -> None:
        self.options = options
        #: Makes each worker's TreeOptions (its own view of the object store) in the worker.
        self.tree_factory = tree_factory
        self.cache_root = cache_root
        self.work_name = work_name
        self.on_status = on_status
        # more workers than entries in flight would only idle
        self.size = max(1, min(options.processes, options.concurrency))
        self._context = multiprocessing.get_context("spawn")
        self._gate = SharedGateState.create(self._context, options.rate_limit_pause)
        #: The Docker daemon gate's state, shared by every worker: one outage pauses them all.
        self.daemon_state = SharedDaemonGateState.create(self._context)
        self._workers: list[_Worker] = []
        self._numbers = itertools.count()
        self._jobs = itertools.count()
        self._pinned: dict[str, _Worker] = {}
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._closing = False
        #: Seconds the pool took to start (every worker's backend open).
        self.start_seconds = 0.0
        #: What the workers' backends counted (bytes downloaded, ...), summed as each stops.
        self.totals: dict[str, int] = {}

    async def __aenter__(self) -> ProcessPoolSource:
        started = time.monotonic()
        self._token = anyio.lowlevel.current_token()
        try:
            workers = [self._spawn(slot) for slot in range(self.size)]
            for worker in workers:
                await worker.ready.wait()
                if worker.start_error is not None:
                    raise worker.start_error
        except BaseException:
            await self._shutdown()
            raise
        self.start_seconds = time.monotonic() - started
        log.debug("%d worker processes ready in %.2f s", self.size, self.start_seconds)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._shutdown()

    async def prepare(self, entry: Entry) -> None:
        """Pick the entry's worker (the least busy) and prepare the entry there."""
        worker = await self._least_busy()
        self._pinned[entry.instance_id] = worker
        await self._call(worker, "prepare", entry)

    async def extract_into(self, entry: Entry, dest: Path) -> ExtractResult:
        """Extract in the entry's worker; the work folder stays the main process's."""
        worker = self._pinned.get(entry.instance_id)
        if worker is None or not worker.alive:
            worker = await self._least_busy()
            self._pinned[entry.instance_id] = worker
        result: ExtractResult = await self._call(worker, "extract", entry, os.fspath(dest))
        return result

    async def after_extraction(self, entry: Entry) -> None:
        """Release the entry in its worker (nothing to do when that worker is gone)."""
        worker = self._pinned.pop(entry.instance_id, None)
        if worker is not None and worker.alive and not self._closing:
            with contextlib.suppress(CacheError):
                await self._call(worker, "release", entry)

    async def _least_busy(self) -> _Worker:
        while True:
            alive = [w for w in self._workers if w.alive and w.ready.is_set()]
            if alive:
                return min(alive, key=lambda w: w.load)
            if self._closing:
                raise WorkerDied("the worker processes are stopping")
            starting = [w for w in self._workers if w.alive]
            if not starting:
                raise WorkerDied("no worker process is running")
            with anyio.move_on_after(START_TIMEOUT):
                await starting[0].ready.wait()
            if starting[0].start_error is not None:
                raise starting[0].start_error

    async def _call(self, worker: _Worker, op: str, *args: Any) -> Any:
        if not worker.alive:
            raise WorkerDied(f"worker process {worker.number} has ended")
        job = next(self._jobs)
        reply = _Reply()
        worker.replies[job] = reply
        worker.send((op, job, *args))
        try:
            await reply.done.wait()
        except BaseException:
            # Cancelled (a signal, a stopped run): the worker stops the entry before the
            # main process removes its work folder; a worker that does not is killed.
            with anyio.CancelScope(shield=True):
                worker.send(("cancel", job))
                with anyio.move_on_after(CANCEL_GRACE):
                    await reply.done.wait()
                if not reply.done.is_set():
                    self._kill(worker)
            raise
        finally:
            worker.replies.pop(job, None)
        if reply.error is not None:
            raise reply.error
        return reply.value

    def _spawn(self, slot: int) -> _Worker:
        number = next(self._numbers)
        ours, theirs = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=worker_main,
            args=(
                theirs,
                self.options,
                os.fspath(self.cache_root),
                self.work_name,
                slot,
                self._gate.values,
                self.daemon_state.values,
                (
                    logging.getLogger().getEffectiveLevel(),
                    logging.getLogger("asynccache").getEffectiveLevel(),
                ),
                self.tree_factory,
            ),
            name=f"asynccache-worker-{number}",
            daemon=True,
        )
        # Started from the event loop's own thread: a worker dies when the thread that started
        # it ends (PR_SET_PDEATHSIG), and this thread lives as long as the run.
        process.start()
        theirs.close()
        worker = _Worker(number, slot, process, ours)
        self._workers.append(worker)
        reader = threading.Thread(
            target=self._read, args=(worker,), name=f"asynccache-pipe-{number}", daemon=True
        )
        reader.start()
        worker.reader = reader
        return worker

    def _read(self, worker: _Worker) -> None:
        """The pipe reader thread of one worker: hand each answer to the event loop."""
        while True:
            try:
                message = worker.conn.recv()
            except (EOFError, OSError):
                break
            except Exception as exc:
                log.warning("worker process %d sent an unreadable answer: %s", worker.number, exc)
                break
            try:
                anyio.from_thread.run_sync(self._deliver, worker, message, token=self._token)
            except RuntimeError:
                return
        with contextlib.suppress(RuntimeError):
            anyio.from_thread.run_sync(self._died, worker, token=self._token)

    def _deliver(self, worker: _Worker, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready":
            worker.ready.set()
        elif kind == "failed":
            worker.start_error = pickle.loads(message[1])
            worker.ready.set()
        elif kind == "totals":
            for key, value in message[1].items():
                self.totals[key] = self.totals.get(key, 0) + value
        elif kind == "status":
            if self.on_status is not None:
                self.on_status(message[1])
        elif kind == "log":
            _, level, name, text = message
            logging.getLogger(name).log(level, "%s", text)
        elif kind in ("ok", "err"):
            reply = worker.replies.get(message[1])
            if reply is not None:
                if kind == "ok":
                    reply.settle(value=message[2])
                else:
                    reply.settle(error=pickle.loads(message[2]))

    def _died(self, worker: _Worker) -> None:
        was_alive = worker.alive
        worker.mark_dead()
        with contextlib.suppress(OSError):
            worker.conn.close()
        if was_alive and not self._closing:
            worker.process.join(1)
            log.warning(
                "worker process %d ended (exit code %s); starting another",
                worker.number,
                worker.process.exitcode,
            )
            with contextlib.suppress(ValueError):
                self._workers.remove(worker)
            # The replacement takes the dead worker's slot (and sweeps its partial files).
            self._spawn(worker.slot)

    def _kill(self, worker: _Worker) -> None:
        with contextlib.suppress(OSError, AttributeError):
            worker.process.kill()

    async def _shutdown(self) -> None:
        self._closing = True
        with anyio.CancelScope(shield=True):
            for worker in self._workers:
                if worker.alive:
                    worker.send(("stop",))
            for worker in self._workers:
                await anyio.to_thread.run_sync(worker.process.join, 10)
                if worker.process.is_alive():
                    self._kill(worker)
                    await anyio.to_thread.run_sync(worker.process.join, 5)
                # What the worker said last (its closing log lines) is still in the pipe.
                if worker.reader is not None:
                    await anyio.to_thread.run_sync(worker.reader.join, 5)
                with contextlib.suppress(OSError):
                    worker.conn.close()
        if self.totals and self.options.backend == "registry":
            log.info("%s", totals_line(self.totals, self.options.testbed_path))
