"""Paths left out of an extracted tree: gitignore-style patterns (``--exclude``)."""

from __future__ import annotations

import os
from collections.abc import Iterable

import pathspec

__all__ = ["ExcludeRules"]


class ExcludeRules:
    """gitignore-style patterns matched against paths relative to the extracted root.

    As in a ``.gitignore``, a pattern without a slash matches at any depth (``.venv``), a
    leading slash anchors it to the root, a trailing slash matches folders only, ``**``
    crosses folders, ``!`` re-includes; a matched folder leaves out everything under it.
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(patterns)
        for pattern in self.patterns:
            if not pattern.strip() or "\x00" in pattern or "\n" in pattern:
                raise ValueError(f"--exclude {pattern!r}: an empty or multi-line pattern")
        try:
            self._spec = pathspec.GitIgnoreSpec.from_lines(self.patterns)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"--exclude: {exc}") from None

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def excludes(self, rel: bytes, is_dir: bool) -> bool:
        """True when the path rel (relative to the root, never empty) is left out."""
        path = os.fsdecode(rel)
        return self._spec.match_file(path + "/" if is_dir else path)
