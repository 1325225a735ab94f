"""Bounded work per entry: the archive bytes it reads and the members they hold."""

from __future__ import annotations

from asynccache import config
from asynccache.errors import LimitExceeded

__all__ = ["Budget"]


def _size(count: int) -> str:
    """A byte count in words, in the largest binary unit that keeps it at 1 or more."""
    value = float(count)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


class Budget:
    """What one entry may still read: uncompressed archive bytes and archive members.

    Every byte read from an archive counts (the layers of an image for the registry backend,
    inside the root or not, each time one is read), the holes of sparse files count at their
    full size, and every member header; what a header claims is never trusted alone.
    """

    __slots__ = ("bytes", "max_bytes", "max_members", "members")

    def __init__(
        self,
        max_bytes: int = config.max_testbed_bytes,
        max_members: int = config.max_testbed_files,
    ) -> None:
        self.max_bytes = max_bytes
        self.max_members = max_members
        #: Bytes and members taken so far.
        self.bytes = 0
        self.members = 0

    def take_bytes(self, count: int) -> None:
        """Count bytes read or written; LimitExceeded past the bound."""
        self.bytes += count
        if self.bytes > self.max_bytes:
            what = f"{_size(self.max_bytes)} of uncompressed archive data"
            raise LimitExceeded(what, "max_testbed_bytes", self.max_bytes)

    def take_member(self) -> None:
        """Count one member header; LimitExceeded past the bound."""
        self.members += 1
        if self.members > self.max_members:
            raise LimitExceeded(
                f"{self.max_members} archive members", "max_testbed_files", self.max_members
            )
