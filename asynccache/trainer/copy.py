"""Copy checkouts: a private copy of a cached tree, for where mounts are not allowed.

A reflink (FICLONE) per file where the filesystems support it, else ``copy_file_range`` (or
``sendfile`` across filesystems). Fidelity: the same tree of directories, regular files, symlinks
(targets verbatim) and fifos, with the same permission bits except setuid and setgid;
regular files keep their mtime so that Python's timestamp-based ``.pyc`` files and make stay
valid; directories and symlinks get fresh times; every file is owned by the caller; files
hard-linked together in the cache become separate files, and nothing is ever hard-linked to the
cache. Sockets and device nodes are skipped. Every function here blocks; call it from a worker
thread. The destination is held by descriptor (trainer/destination.py).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from pathlib import Path

from asynccache._fs import current_umask, remove_tree
from asynccache.trainer.destination import claim_destination

log = logging.getLogger(__name__)

_FICLONE = 0x40049409
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 30
_PRIVILEGE_BITS = stat.S_ISUID | stat.S_ISGID
_NO_REFLINK = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM}
)
_NO_COPY_RANGE = frozenset(
    {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM, errno.EIO}
)


def copy_checkout(source: Path, dest: Path) -> None:
    """Copy ``source`` to ``dest`` in this thread (see the module docstring for fidelity)."""
    root_mode = stat.S_IMODE(os.stat(source).st_mode) & ~_PRIVILEGE_BITS
    with claim_destination(dest) as target:
        try:
            os.fchmod(target.fd, 0o700)
            _Copier(os.stat(source).st_dev, os.fstat(target.fd).st_dev).copy_tree(
                os.fspath(source), target.here()
            )
            os.fchmod(target.fd, root_mode)
        except BaseException:
            for name in os.listdir(target.fd):
                remove_tree(Path(target.here(name)))
            target.discard()
            raise


_reflink_ok: dict[tuple[int, int], bool] = {}
_copy_range_ok: dict[tuple[int, int], bool] = {}


class _Copier:
    """Copies one tree with few syscalls per file, in the calling thread."""

    def __init__(self, source_dev: int, dest_dev: int) -> None:
        self.devices = (source_dev, dest_dev)
        self.umask = current_umask()

    def copy_tree(self, source: str, dest: str) -> None:
        """Copy every entry of source into the existing, empty folder dest.

        Depth first, each folder created just before it is filled (creating all subfolders
        up front makes every file creation after it several times slower on ext4).
        """
        late_modes: list[tuple[str, int]] = []
        umask = self.umask
        stack: list[tuple[str, str, int]] = [(source, dest, -1)]
        while stack:
            src_dir, dst_dir, mode = stack.pop()
            if mode >= 0:
                os.mkdir(dst_dir, mode | 0o700)
                if mode & 0o700 != 0o700 or mode & umask:
                    late_modes.append((dst_dir, mode))
            src_fd = os.open(src_dir, _DIR_FLAGS)
            try:
                dst_fd = os.open(dst_dir, _DIR_FLAGS)
                try:
                    subdirs = self._copy_dir(src_fd, dst_fd, src_dir, dst_dir)
                finally:
                    os.close(dst_fd)
            finally:
                os.close(src_fd)
            stack.extend(reversed(subdirs))
        for path, mode in reversed(late_modes):
            os.chmod(path, mode)

    def _copy_dir(
        self, src_fd: int, dst_fd: int, src_dir: str, dst_dir: str
    ) -> list[tuple[str, str, int]]:
        """Copy the files, symlinks and fifos of one folder; return its subfolders to copy."""
        umask = self.umask
        subdirs: list[tuple[str, str, int]] = []
        with os.scandir(src_fd) as entries:
            for entry in entries:
                name = entry.name
                if entry.is_symlink():
                    os.symlink(os.readlink(name, dir_fd=src_fd), name, dir_fd=dst_fd)
                    continue
                info = entry.stat(follow_symlinks=False)
                mode = stat.S_IMODE(info.st_mode) & ~_PRIVILEGE_BITS
                if stat.S_ISREG(info.st_mode):
                    self._copy_file(src_fd, dst_fd, name, info, mode)
                elif stat.S_ISDIR(info.st_mode):
                    subdirs.append((f"{src_dir}/{name}", f"{dst_dir}/{name}", mode))
                elif stat.S_ISFIFO(info.st_mode):
                    os.mkfifo(name, mode, dir_fd=dst_fd)
                    if mode & umask:
                        os.chmod(name, mode, dir_fd=dst_fd)
                elif stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
                    # A device node in a rollout's tree would open the host's devices.
                    log.debug("not copying the device node %s/%s", src_dir, name)
        return subdirs

    def _copy_file(
        self, src_fd: int, dst_fd: int, name: str, info: os.stat_result, mode: int
    ) -> None:
        out = os.open(name, _WRITE_FLAGS, mode, dir_fd=dst_fd)
        try:
            if info.st_size:
                source = os.open(name, _READ_FLAGS, dir_fd=src_fd)
                try:
                    self._copy_data(source, out, info.st_size)
                finally:
                    os.close(source)
            if mode & self.umask:
                os.fchmod(out, mode)
            os.utime(out, ns=(info.st_atime_ns, info.st_mtime_ns))
        finally:
            os.close(out)

    def _copy_data(self, source: int, out: int, size: int) -> None:
        devices = self.devices
        if _reflink_ok.get(devices, True):
            try:
                fcntl.ioctl(out, _FICLONE, source)
                _reflink_ok[devices] = True
                return
            except OSError as exc:
                if exc.errno not in _NO_REFLINK:
                    raise
                _reflink_ok[devices] = False
        if _copy_range_ok.get(devices, True):
            try:
                self._copy_range(source, out, size)
                _copy_range_ok[devices] = True
                return
            except OSError as exc:
                if exc.errno not in _NO_COPY_RANGE or _copy_range_ok.get(devices):
                    raise
                _copy_range_ok[devices] = False
                os.lseek(source, 0, os.SEEK_SET)
                os.ftruncate(out, 0)
                os.lseek(out, 0, os.SEEK_SET)
        self._send(source, out, size)

    @staticmethod
    def _copy_range(source: int, out: int, size: int) -> None:
        left = size
        while left > 0:
            done = os.copy_file_range(source, out, min(left, _CHUNK))
            if done == 0:
                return
            left -= done

    @staticmethod
    def _send(source: int, out: int, size: int) -> None:
        offset = 0
        while offset < size:
            done = os.sendfile(out, source, offset, min(size - offset, _CHUNK))
            if done == 0:
                return
            offset += done
