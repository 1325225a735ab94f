"""Member name -> safe path under the extraction folder: only the root's content, never outside."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["NAME_MAX", "PATH_MAX", "BadName", "MemberPaths", "Outside", "link_target", "parts"]

#: Longest path component and longest path the kernel takes, in bytes.
NAME_MAX = 255
PATH_MAX = 4095


class BadName(Exception):
    """A member name that must not be extracted."""


class Outside(BadName):
    """A well-formed member name that lies outside the extracted root."""


def parts(name: str) -> list[str]:
    """The components of a safe member name (no empty, "." or ".." component)."""
    if not name:
        raise BadName("empty name")
    if "\x00" in name:
        raise BadName("NUL byte in name")
    if name[0] == "/":
        raise BadName("absolute name")
    found = [part for part in name.split("/") if part and part != "."]
    if ".." in found:
        raise BadName("'..' component")
    return found


def link_target(target: str) -> bytes:
    """A symlink member's target as it is written, verbatim (BadName when it cannot be)."""
    if not target:
        raise BadName("empty symlink target")
    if "\x00" in target:
        raise BadName("NUL byte in symlink target")
    try:
        raw = os.fsencode(target)
    except UnicodeError:
        raise BadName("symlink target cannot be encoded") from None
    if len(raw) > PATH_MAX:
        raise BadName(f"symlink target longer than {PATH_MAX} bytes")
    return raw


class MemberPaths:
    """Maps the names of an archive's members under ``root`` to paths relative to ``dest``."""

    def __init__(self, dest: Path, root: str) -> None:
        self.dest = os.fsencode(dest)
        #: dest with a trailing slash: ``base + rel`` is the path of rel on disk.
        self.base = os.path.join(self.dest, b"")
        self.root = root
        self.root_parts = [part for part in root.split("/") if part not in ("", ".")]
        if not self.root_parts or ".." in self.root_parts:
            raise ValueError(f"root must name a folder, not {root!r}")

    def relative(self, name: str) -> bytes:
        """The path under dest that a member name maps to (b"" for the root)."""
        found = parts(name)
        count = len(self.root_parts)
        if found[:count] != self.root_parts:
            raise Outside(f"outside {self.root}/")
        try:
            rel = os.fsencode("/".join(found[count:]))
        except UnicodeError:
            raise BadName("name cannot be encoded") from None
        if len(rel) > NAME_MAX and any(len(part) > NAME_MAX for part in rel.split(b"/")):
            raise BadName(f"a path component is longer than {NAME_MAX} bytes")
        if len(self.base) + len(rel) > PATH_MAX:
            raise BadName(f"path longer than {PATH_MAX} bytes once extracted")
        return rel
