"""Rollout checkouts of a cached tree: an overlayfs mount, or a private copy.

``overlay`` mounts the cached tree read-only as the lower layer of an overlayfs whose upper and
work folders live beside the destination (``dest.parent/.{dest.name}.overlay/``), so a checkout
costs one mount whatever the tree's size and every write lands in the upper folder.

``copy`` makes a real copy where mounts are not allowed: a reflink (FICLONE) per file where the
filesystems support it, else ``copy_file_range`` (or ``sendfile`` across filesystems). Fidelity:
the same tree of directories, regular files, symlinks (targets verbatim) and fifos, with the same
permission bits (setuid/setgid/sticky included); regular files keep their mtime so that Python's
timestamp-based ``.pyc`` files and make stay valid; directories and symlinks get fresh times;
every file is owned by the caller; files hard-linked together in the cache become separate files,
and nothing is ever hard-linked to the cache. Sockets are skipped.

The overlay is ``volatile`` (its upper folder is never synced: a rollout's writes are disposable,
and a plain umount would sync the whole upper filesystem). As root it is also mounted with
``redirect_dir=on`` so that folders coming from the cache can be renamed; without root (a user
namespace, ``userxattr``) the kernel refuses that option, and renaming such a folder fails with
EXDEV as across filesystems (``mv`` copes, ``os.rename`` does not): ``overlay_probe().renames_dirs``
tells which case applies.

``auto`` is overlay when this process may mount one (probed once per process), else copy.
Every function here blocks; call them from a worker thread.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from asynccache._fs import current_umask, remove_tree
from asynccache.errors import CacheError

__all__ = [
    "MODES",
    "CheckoutError",
    "Mode",
    "OverlayProbe",
    "checkout_tree",
    "copy_checkout",
    "overlay_checkout",
    "overlay_probe",
    "overlay_side_dir",
    "release_tree",
    "resolve_mode",
]

log = logging.getLogger(__name__)

Mode = Literal["auto", "overlay", "copy"]
MODES: tuple[Mode, ...] = ("auto", "overlay", "copy")

_FICLONE = 0x40049409
_MNT_DETACH = 2
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_CHUNK = 1 << 30
_NO_REFLINK = frozenset(
    {errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM}
)
_NO_COPY_RANGE = frozenset(
    {errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM, errno.EIO}
)


class CheckoutError(CacheError):
    """A checkout cannot be made or released."""


def overlay_side_dir(dest: Path) -> Path:
    """The folder holding an overlay checkout's upper and work folders."""
    return dest.parent / f".{dest.name}.overlay"


def checkout_tree(source: Path, dest: Path, mode: Mode = "auto") -> Mode:
    """Give ``dest`` a private writable view of ``source``; return the mode used."""
    if mode not in MODES:
        raise ValueError(f"unknown checkout mode {mode!r}; use one of {', '.join(MODES)}")
    source, dest = Path(os.path.abspath(source)), Path(os.path.abspath(dest))
    if not source.is_dir():
        raise CheckoutError(f"cached tree {source} is not a folder")
    dest.parent.mkdir(parents=True, exist_ok=True)
    if mode == "copy":
        copy_checkout(source, dest)
        return "copy"
    if mode == "overlay":
        overlay_checkout(source, dest)
        return "overlay"
    if resolve_mode("auto", dest.parent) == "overlay":
        try:
            overlay_checkout(source, dest)
            return "overlay"
        except CheckoutError as exc:
            log.debug("overlay checkout of %s failed, copying instead: %s", source, exc)
            _overlay_refused.add(_device(dest.parent))
    copy_checkout(source, dest)
    return "copy"


def release_tree(dest: Path) -> None:
    """Unmount an overlay checkout and delete it (upper, work and mount point), or a copy."""
    side = overlay_side_dir(dest)
    if side.is_dir() and not side.is_symlink():
        _unmount(dest)
        remove_tree(side)
    if dest.is_symlink() or dest.exists():
        if os.path.ismount(dest):
            raise CheckoutError(f"{dest} is still a mount point; unmount it first")
        remove_tree(dest)


def resolve_mode(mode: Mode, where: Path | None = None) -> Literal["overlay", "copy"]:
    """The concrete mode ``mode`` means in this process (for dests under ``where``)."""
    if mode == "overlay" or mode == "copy":
        return mode
    if where is not None and _device_or_none(where) in _overlay_refused:
        return "copy"
    return "overlay" if overlay_probe(where).available else "copy"


# --- overlay -----------------------------------------------------------------------------


@dataclass(frozen=True)
class OverlayProbe:
    """Whether overlays mount here, with which extra options, and whether cached dirs rename."""

    available: bool
    options: str = ""
    reason: str = ""
    renames_dirs: bool = False


_probe_lock = threading.Lock()
_probe_result: tuple[int, OverlayProbe] | None = None
_overlay_refused: set[int] = set()


def overlay_probe(where: Path | None = None) -> OverlayProbe:
    """Probe once per process (in a scratch folder under ``where``) whether overlays mount."""
    global _probe_result
    pid = os.getpid()
    cached = _probe_result
    if cached is not None and cached[0] == pid:
        return cached[1]
    with _probe_lock:
        if _probe_result is not None and _probe_result[0] == pid:
            return _probe_result[1]
        result = _probe(where)
        _probe_result = (pid, result)
        if not result.available:
            log.info("overlay checkouts unavailable (%s); copying instead", result.reason)
        return result


def _probe(where: Path | None) -> OverlayProbe:
    base = where if where is not None and where.is_dir() else Path(tempfile.gettempdir())
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".asynccache-probe-", dir=base))
    except OSError as exc:
        return OverlayProbe(False, reason=f"no scratch folder in {base}: {exc.strerror}")
    try:
        return _probe_in(scratch)
    finally:
        remove_tree(scratch)


def _probe_in(scratch: Path) -> OverlayProbe:
    lower = scratch / "lower"
    (lower / "dir").mkdir(parents=True)
    (lower / "file").write_bytes(b"lower\n")
    reasons: list[str] = []
    fallback: OverlayProbe | None = None
    for number, extra in enumerate(_option_candidates()):
        attempt = scratch / f"try{number}"
        merged, upper, work = attempt / "merged", attempt / "upper", attempt / "work"
        for folder in (merged, upper, work):
            folder.mkdir(parents=True)
        try:
            _mount_overlay(lower, merged, upper, work, extra)
        except CheckoutError as exc:
            reasons.append(str(exc))
            continue
        try:
            works = _exercise(merged, lower)
            renames = works and _renames_dirs(merged, lower)
        finally:
            _unmount(merged)
        if renames:
            return OverlayProbe(True, options=extra, renames_dirs=True)
        if works and fallback is None:
            fallback = OverlayProbe(True, options=extra)
        if not works:
            reasons.append("writes through the mount reached the lower folder")
    return fallback or OverlayProbe(False, reason="; ".join(reasons))


def _exercise(merged: Path, lower: Path) -> bool:
    """Write, append and delete through a fresh overlay; True when the lower stayed intact."""
    try:
        with open(merged / "file", "ab") as handle:
            handle.write(b"upper\n")
        (merged / "new").write_bytes(b"new\n")
        (merged / "new").unlink()
        (merged / "file").unlink()
    except OSError:
        return False
    return (lower / "file").read_bytes() == b"lower\n" and not (lower / "new").exists()


def _renames_dirs(merged: Path, lower: Path) -> bool:
    """True when a folder of the lower layer can be renamed through the overlay."""
    try:
        os.rename(merged / "dir", merged / "moved")
    except OSError:
        return False
    return (lower / "dir").is_dir() and not (lower / "moved").exists()


def _option_candidates() -> list[str]:
    """Extra mount options to try, most capable first.

    ``volatile`` skips syncing the upper filesystem (a plain umount syncs all of it, which
    costs tens of ms on a busy disk); ``redirect_dir=on`` lets folders coming from the cache
    be renamed but needs trusted xattrs, so ``userxattr`` (user namespaces) goes without it.
    """
    if _initial_user_namespace():
        bases = [",redirect_dir=on", "", ",userxattr"]
    else:
        bases = [",userxattr", ""]
    return [option for base in bases for option in (f"{base},volatile", base)]


def _initial_user_namespace() -> bool:
    try:
        with open("/proc/self/uid_map", encoding="ascii") as handle:
            fields = handle.read().split()
    except OSError:
        return True
    return fields == ["0", "0", "4294967295"]


def overlay_checkout(source: Path, dest: Path) -> None:
    """Mount an overlay of ``source`` at ``dest``; its upper and work folders sit beside dest."""
    probe = overlay_probe(dest.parent)
    extra = probe.options if probe.available else _option_candidates()[0]
    side = overlay_side_dir(dest)
    mode = stat.S_IMODE(os.stat(source).st_mode)
    created = _make_dest(dest)
    try:
        os.mkdir(side, 0o700)
    except FileExistsError:
        if created:
            os.rmdir(dest)
        raise CheckoutError(
            f"{side} already exists (an earlier checkout at {dest} was not released)"
        ) from None
    try:
        upper = side / "upper"
        os.mkdir(upper, mode)
        if stat.S_IMODE(os.stat(upper).st_mode) != mode:
            os.chmod(upper, mode)
        os.mkdir(side / "work", 0o700)
        _mount_overlay(source, dest, upper, side / "work", extra)
    except BaseException:
        remove_tree(side)
        if created:
            os.rmdir(dest)
        raise


def _make_dest(dest: Path) -> bool:
    """Create dest (True), or accept it as an existing empty folder (False)."""
    try:
        os.mkdir(dest, 0o755)
        return True
    except FileExistsError:
        if dest.is_dir() and not dest.is_symlink():
            with os.scandir(dest) as entries:
                if next(entries, None) is None:
                    return False
        raise CheckoutError(
            f"checkout destination {dest} exists and is not an empty folder"
        ) from None


def _escape(path: Path) -> str:
    """A path as overlayfs reads it inside its mount options."""
    text = os.fspath(path)
    for char in ("\\", ",", ":"):
        text = text.replace(char, "\\" + char)
    return text


def _mount_overlay(lower: Path, dest: Path, upper: Path, work: Path, extra: str) -> None:
    data = f"lowerdir={_escape(lower)},upperdir={_escape(upper)},workdir={_escape(work)}{extra}"
    libc = _libc()
    if libc is None:
        _run_command(["mount", "-t", "overlay", "overlay", "-o", data, os.fspath(dest)])
        return
    if libc.mount(b"overlay", os.fsencode(dest), b"overlay", 0, os.fsencode(data)) != 0:
        code = ctypes.get_errno()
        raise CheckoutError(f"cannot mount an overlay at {dest}: {os.strerror(code)}")


def _unmount(dest: Path) -> None:
    """Unmount dest if it is a mount point; detach lazily when it is busy."""
    if not os.path.ismount(dest):
        return
    libc = _libc()
    if libc is None:
        try:
            _run_command(["umount", os.fspath(dest)])
        except CheckoutError:
            _run_command(["umount", "-l", os.fspath(dest)])
        return
    target = os.fsencode(dest)
    if libc.umount2(target, 0) == 0:
        return
    code = ctypes.get_errno()
    if code == errno.EBUSY:
        if libc.umount2(target, _MNT_DETACH) == 0:
            log.warning("%s was busy; detached it lazily", dest)
            return
        code = ctypes.get_errno()
    raise CheckoutError(f"cannot unmount {dest}: {os.strerror(code)}")


def _run_command(argv: list[str]) -> None:
    if shutil.which(argv[0]) is None:
        raise CheckoutError(f"no mount(2) through libc and no {argv[0]} command")
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise CheckoutError(f"{' '.join(argv[:2])} failed: {done.stderr.strip()}")


_libc_handle: ctypes.CDLL | None = None
_libc_loaded = False


def _libc() -> ctypes.CDLL | None:
    """The C library's mount and umount2, or None when they cannot be called."""
    global _libc_handle, _libc_loaded
    if _libc_loaded:
        return _libc_handle
    try:
        handle = ctypes.CDLL(None, use_errno=True)
        handle.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_char_p,
        ]
        handle.mount.restype = ctypes.c_int
        handle.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        handle.umount2.restype = ctypes.c_int
    except (OSError, AttributeError):
        handle = None
    _libc_handle, _libc_loaded = handle, True
    return handle


# --- copy --------------------------------------------------------------------------------


def copy_checkout(source: Path, dest: Path) -> None:
    """Copy ``source`` to ``dest`` in this thread (see the module docstring for fidelity)."""
    root_mode = stat.S_IMODE(os.stat(source).st_mode)
    _make_dest(dest)
    try:
        os.chmod(dest, 0o700)
        _Copier(os.stat(source).st_dev, os.stat(dest).st_dev).copy_tree(
            os.fspath(source), os.fspath(dest)
        )
        os.chmod(dest, root_mode)
    except BaseException:
        remove_tree(dest)
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
                mode = stat.S_IMODE(info.st_mode)
                if stat.S_ISREG(info.st_mode):
                    self._copy_file(src_fd, dst_fd, name, info, mode)
                elif stat.S_ISDIR(info.st_mode):
                    subdirs.append((f"{src_dir}/{name}", f"{dst_dir}/{name}", mode))
                elif stat.S_ISFIFO(info.st_mode):
                    os.mkfifo(name, mode, dir_fd=dst_fd)
                    if mode & umask:
                        os.chmod(name, mode, dir_fd=dst_fd)
                elif stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode):
                    os.mknod(name, info.st_mode, info.st_rdev, dir_fd=dst_fd)
                    if mode & umask:
                        os.chmod(name, mode, dir_fd=dst_fd)
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


def _device(path: Path) -> int:
    return os.stat(path).st_dev


def _device_or_none(path: Path) -> int | None:
    try:
        return _device(path)
    except OSError:
        return None
