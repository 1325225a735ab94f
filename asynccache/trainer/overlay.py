"""Overlay checkouts: the cached tree as the read-only lower layer of an overlayfs mount.

The upper and work folders live beside the destination (``dest.parent/.{dest.name}.overlay/``),
so a checkout costs one mount whatever the tree's size and every write lands in the upper folder.
The overlay is ``volatile`` (its upper folder is never synced: a rollout's writes are disposable,
and a plain umount would sync the whole upper filesystem). As root it is also mounted with
``redirect_dir=on`` so that folders coming from the cache can be renamed; without root (a user
namespace, ``userxattr``) the kernel refuses that option, and renaming such a folder fails with
EXDEV as across filesystems (``mv`` copes, ``os.rename`` does not): ``overlay_probe().renames_dirs``
tells which case applies. Every function here blocks; call them from a worker thread.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from asynccache._fs import remove_tree
from asynccache.errors import CheckoutError
from asynccache.trainer.destination import claim_destination, fd_path

log = logging.getLogger(__name__)

_MNT_DETACH = 2
_MS_NOSUID = 2
_MS_NODEV = 4
_PRIVILEGE_BITS = stat.S_ISUID | stat.S_ISGID
_DIR_OPEN = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def overlay_side_dir(dest: Path) -> Path:
    """The folder holding an overlay checkout's upper and work folders."""
    return dest.parent / f".{dest.name}.overlay"


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
    """Mount an overlay of ``source`` at ``dest``; its upper and work folders sit beside dest.

    The mount is ``nosuid,nodev``, and every path it is given names a folder this call opened
    (see trainer/destination.py), so swapping ``dest`` or a parent for a link changes nothing.
    """
    probe = overlay_probe(dest.parent)
    extra = probe.options if probe.available else _option_candidates()[0]
    side_name = overlay_side_dir(dest).name
    mode = stat.S_IMODE(os.stat(source).st_mode) & ~_PRIVILEGE_BITS
    with claim_destination(dest) as target:
        try:
            os.mkdir(side_name, 0o700, dir_fd=target.parent_fd)
        except FileExistsError:
            target.discard()
            raise CheckoutError(
                f"{overlay_side_dir(dest)} already exists (an earlier checkout at {dest} was not "
                "released)"
            ) from None
        try:
            side_fd = os.open(side_name, _DIR_OPEN, dir_fd=target.parent_fd)
            try:
                os.mkdir("upper", mode, dir_fd=side_fd)
                os.chmod("upper", mode, dir_fd=side_fd, follow_symlinks=False)
                os.mkdir("work", 0o700, dir_fd=side_fd)
                _mount_overlay(
                    source,
                    Path(target.here()),
                    Path(fd_path(side_fd, "upper")),
                    Path(fd_path(side_fd, "work")),
                    extra,
                )
            finally:
                os.close(side_fd)
        except BaseException:
            remove_tree(Path(target.beside(side_name)))
            target.discard()
            raise


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
        options = f"nosuid,nodev,{data}"
        _run_command(["mount", "-t", "overlay", "overlay", "-o", options, os.fspath(dest)])
        return
    flags = _MS_NOSUID | _MS_NODEV
    if libc.mount(b"overlay", os.fsencode(dest), b"overlay", flags, os.fsencode(data)) != 0:
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


def _device(path: Path) -> int:
    return os.stat(path).st_dev


def _device_or_none(path: Path) -> int | None:
    try:
        return _device(path)
    except OSError:
        return None


def overlay_refused(where: Path) -> bool:
    """True when an overlay mount under ``where`` failed earlier in this process."""
    return _device_or_none(where) in _overlay_refused


def remember_refused(where: Path) -> None:
    """Make ``auto`` copy under ``where`` from now on: its filesystem refused an overlay."""
    _overlay_refused.add(_device(where))


def unmount(dest: Path) -> None:
    """Unmount an overlay checkout at ``dest``."""
    _unmount(dest)
