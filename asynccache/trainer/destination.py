"""A checkout's destination, held by file descriptor so that a swapped path cannot redirect it.

The parent folder is opened by its real path, one component at a time without following links
(a symlink that appears on the way during the call is refused); the destination is created by
this process, or taken only when it is an empty folder the caller owns. Everything after that
goes through ``/proc/<pid>/fd/<n>`` paths of those descriptors, which name the opened folders
whatever happens to the paths meanwhile.
"""

from __future__ import annotations

import os
import stat
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from asynccache.errors import CheckoutError

_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def fd_path(fd: int, *names: str) -> str:
    """A path naming the folder open at ``fd`` (and names beneath it), for any process."""
    return os.path.join(f"/proc/{os.getpid()}/fd/{fd}", *names)


def open_real_folder(folder: Path) -> int:
    """Open ``folder`` by its real path, refusing a link that appears on the way."""
    real = Path(os.path.realpath(folder))
    fd = os.open("/", _DIR_OPEN)
    try:
        for part in real.parts[1:]:
            child = os.open(part, _DIR_OPEN, dir_fd=fd)
            os.close(fd)
            fd = child
    except OSError as exc:
        os.close(fd)
        raise CheckoutError(
            f"{folder} changed while a checkout was being made there ({exc.strerror}); "
            "check who else writes to it"
        ) from None
    return fd


@dataclass
class Destination(AbstractContextManager["Destination"]):
    """An open checkout destination: its parent and itself, by descriptor."""

    path: Path
    parent_fd: int
    fd: int
    created: bool

    @property
    def name(self) -> str:
        """The destination's name in its parent."""
        return self.path.name

    def here(self, *names: str) -> str:
        """A path inside the destination that no path swap can redirect."""
        return fd_path(self.fd, *names)

    def beside(self, *names: str) -> str:
        """A path in the destination's parent that no path swap can redirect."""
        return fd_path(self.parent_fd, *names)

    def discard(self) -> None:
        """Remove the destination folder again if this call created it (and it is empty)."""
        if self.created:
            with suppress(OSError):
                os.rmdir(self.name, dir_fd=self.parent_fd)

    def close(self) -> None:
        """Close both descriptors."""
        for fd in (self.fd, self.parent_fd):
            with suppress(OSError):
                os.close(fd)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def claim_destination(dest: Path) -> Destination:
    """Create ``dest`` (mode 0700), or take it if it is an empty folder owned by the caller."""
    parent_fd = open_real_folder(dest.parent)
    try:
        created = True
        try:
            os.mkdir(dest.name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            created = False
        try:
            fd = os.open(dest.name, _DIR_OPEN, dir_fd=parent_fd)
        except OSError:
            raise CheckoutError(
                f"checkout destination {dest} exists and is not an empty folder"
            ) from None
        info = os.fstat(fd)
        if not created and (
            not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or os.listdir(fd)
        ):
            os.close(fd)
            raise CheckoutError(
                f"checkout destination {dest} exists and is not an empty folder of yours"
            )
    except BaseException:
        os.close(parent_fd)
        raise
    return Destination(dest, parent_fd, fd, created)
