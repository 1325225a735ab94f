"""A gate's state kept in shared memory, so that worker processes see one state."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any, ClassVar


class SharedFields:
    """Mixin: the named fields of a state object live in a ``multiprocessing`` array of doubles.

    ``_FIELDS`` names them in order; ``_KINDS`` says how a double reads back (a float when not
    named); None is stored as NaN. ``time.monotonic`` is the system-wide CLOCK_MONOTONIC on
    Linux, so times kept here compare across the processes of one machine.
    """

    _FIELDS: ClassVar[tuple[str, ...]] = ()
    _KINDS: ClassVar[dict[str, Callable[[float], Any]]] = {}

    def __init__(self, values: Any) -> None:
        object.__setattr__(self, "_values", values)

    @property
    def values(self) -> Any:
        """The shared array, to hand to a worker process."""
        return object.__getattribute__(self, "_values")

    def __getattribute__(self, name: str) -> Any:
        fields = object.__getattribute__(self, "_FIELDS")
        if name in fields:
            value = object.__getattribute__(self, "_values")[fields.index(name)]
            kinds = object.__getattribute__(self, "_KINDS")
            return kinds.get(name, float)(value)
        return object.__getattribute__(self, name)

    def __setattr__(self, name: str, value: Any) -> None:
        fields = object.__getattribute__(self, "_FIELDS")
        if name not in fields:
            raise AttributeError(name)
        number = math.nan if value is None else float(value)
        object.__getattribute__(self, "_values")[fields.index(name)] = number

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the shared state still across processes."""
        with self.values.get_lock():
            yield


def optional_time(value: float) -> float | None:
    """A stored time, or None where NaN stands for none."""
    return None if math.isnan(value) else value
