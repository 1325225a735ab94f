"""How a worker process keeps its memory: the cyclic collector and the C allocator, set for
a caching run. The main process, which may be a library user's, is left as it is."""

from __future__ import annotations

import contextlib
import ctypes
import gc

__all__ = [
    "KEEP_FREED_BYTES",
    "MAPPED_FROM_BYTES",
    "OLDER_GENERATIONS",
    "YOUNG_GENERATION",
    "tune_for_worker",
]

#: Allocations of container objects between two passes over the youngest generation (Python's
#: default is 700). An extraction makes several per member (its header, a job, lists, tuples)
#: and reference counting frees almost all of them; a pass every 700 walks the few that are
#: alive at that moment, promotes them, and every tenth pass walks those again, holding the
#: GIL that the extracting, writing and reading threads of the process share.
YOUNG_GENERATION = 20_000
#: Passes of a generation between two passes of the next (Python's default is 10).
OLDER_GENERATIONS = 20

#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Free memory a heap keeps at its top instead of giving it back to the kernel. The blob
#: reader, the inflater and the tar reader pass megabyte buffers between threads; with glibc's
#: default a thread's heap gives their pages back as they are freed and faults them in (zeroed)
#: again for the next ones: 130,000 page faults of the 300,000 of a bench run.
KEEP_FREED_BYTES = 16 << 20
#: Allocations this large or larger get pages of their own (mmap). Setting a trim threshold
#: stops glibc from raising this one by itself, so it is set above the 1 MiB buffers too.
MAPPED_FROM_BYTES = 4 << 20


def tune_for_worker() -> None:
    """Set the collector and the allocator for a process that only runs a caching job."""
    # Collect cycles less often, and never walk what exists now (modules, classes, the set-up):
    # the collector took 2.4% of a bench run's CPU, 0.9% after.
    gc.freeze()
    gc.set_threshold(YOUNG_GENERATION, OLDER_GENERATIONS, OLDER_GENERATIONS)
    # Another C library (or none to load) keeps its defaults.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES)
        libc.mallopt(_M_MMAP_THRESHOLD, MAPPED_FROM_BYTES)
