"""Rollout checkouts of a cached tree: an overlayfs mount (trainer/overlay.py), or a private copy
(trainer/copy.py).

``auto`` is overlay when this process may mount one (probed once per process), else copy.
Every function here blocks; call them from a worker thread.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Literal

from asynccache._fs import remove_tree
from asynccache.errors import CheckoutError
from asynccache.trainer.copy import copy_checkout
from asynccache.trainer.overlay import (
    OverlayProbe,
    overlay_checkout,
    overlay_probe,
    overlay_refused,
    overlay_side_dir,
    remember_refused,
    unmount,
)

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
            remember_refused(dest.parent)
    copy_checkout(source, dest)
    return "copy"


def release_tree(dest: Path) -> None:
    """Unmount an overlay checkout and delete it (upper, work and mount point), or a copy."""
    side = overlay_side_dir(dest)
    if side.is_dir() and not side.is_symlink():
        unmount(dest)
        remove_tree(side)
    if dest.is_symlink() or dest.exists():
        if os.path.ismount(dest):
            raise CheckoutError(f"{dest} is still a mount point; unmount it first")
        remove_tree(dest)


def resolve_mode(mode: Mode, where: Path | None = None) -> Literal["overlay", "copy"]:
    """The concrete mode ``mode`` means in this process (for dests under ``where``)."""
    if mode == "overlay" or mode == "copy":
        return mode
    if where is not None and overlay_refused(where):
        return "copy"
    return "overlay" if overlay_probe(where).available else "copy"
