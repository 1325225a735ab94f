"""The object store's names on disk: where an object lives, and what a name found there means.

Objects live in ``cache_dir/.store/ab/cdef...<62 hex>.<mode in octal>[.<copy>]``: the sha256 of
the content fans out over 256 folders by its first byte (so no folder gets huge), the mode is
part of the name (a hardlink shares its mode), and a copy number starts a new inode before the
link count reaches the filesystem's limit (ext4 allows 65,000 links; think of empty
``__init__.py`` files).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "HEX_DIGITS",
    "Inode",
    "StoredObject",
    "is_digest",
    "object_name",
    "parse_object_name",
]

#: The digits of a sha256 in lower-case hex (and of a fan-out folder's name).
HEX_DIGITS = frozenset("0123456789abcdef")
#: Inode identity of a file: (st_dev, st_ino).
Inode = tuple[int, int]


def object_name(digest: str, mode: int, copy: int = 0) -> str:
    """The store path of an object, relative to the store: ``ab/cdef....644[.copy]``."""
    name = f"{digest[:2]}/{digest[2:]}.{mode:o}"
    return f"{name}.{copy}" if copy else name


def parse_object_name(fanout: str, name: str) -> tuple[str, int, int] | None:
    """(digest, mode, copy) of a file named ``name`` in folder ``fanout``; None if not an object."""
    parts = name.split(".")
    if len(fanout) != 2 or len(parts) not in (2, 3) or len(parts[0]) != 62:
        return None
    digest = fanout + parts[0]
    if not HEX_DIGITS.issuperset(digest):
        return None
    try:
        mode = int(parts[1], 8)
        copy = int(parts[2]) if len(parts) == 3 else 0
    except ValueError:
        return None
    if mode > 0o777 or copy < 0 or (len(parts) == 3 and (copy == 0 or parts[2] != str(copy))):
        return None
    if parts[1] != f"{mode:o}":
        return None
    return digest, mode, copy


def is_digest(text: str) -> bool:
    """True for a sha256 in lower-case hex."""
    return len(text) == 64 and HEX_DIGITS.issuperset(text)


@dataclass(frozen=True, slots=True)
class StoredObject:
    """One object as the store holds it."""

    name: str
    digest: str
    mode: int
    copy: int
    size: int
    links: int
    inode: Inode
    mtime_ns: int
