"""Dataset rows become validated entries: instance ids, image references, safe folder names."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from asynccache.dataset import COLUMNS
from asynccache.errors import InvalidEntry, InvalidReference
from asynccache.reference import parse_reference

_SAFE_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,199}$")


@dataclass(frozen=True)
class Entry:
    """One dataset row to cache: an image and the folder name it goes to."""

    instance_id: str
    repo_name: str
    docker_image: str
    commit_hash: str
    row_number: int = 0

    def __post_init__(self) -> None:
        # Entries built by callers (not from dataset rows) name paths too: check them here.
        try:
            validate_instance_id(self.instance_id)
            validate_image_reference(self.docker_image)
        except ValueError as exc:
            raise InvalidEntry(self.row_number, f"{exc}; fix this entry") from None


InstanceIdFn = Callable[[Mapping[str, Any]], str]


def make_instance_id(row: Mapping[str, Any]) -> str:
    """The instance id of a row: ``{repo_name}__{commit_hash[:12]}``."""
    return f"{row['repo_name']}__{str(row['commit_hash'])[:12]}"


def validate_image_reference(ref: str) -> None:
    """Raise ValueError when ``ref`` is not a Docker image reference (reference.py)."""
    try:
        parse_reference(ref)
    except InvalidReference as exc:
        raise ValueError(str(exc)) from None


def validate_instance_id(instance_id: str) -> None:
    """Raise ValueError unless ``instance_id`` is a safe single folder name."""
    if not _SAFE_ID.match(instance_id) or ".." in instance_id:
        raise ValueError(
            f"instance id {instance_id!r} is not a safe folder name "
            "(letters, digits, _.+=- only; no '/', no '..', no leading dot)"
        )


def entry_from_row(
    row: Mapping[str, Any], row_number: int, instance_id_fn: InstanceIdFn = make_instance_id
) -> Entry:
    """Validate one dataset row into an Entry, or raise InvalidEntry naming the row and the fix."""
    values: dict[str, str] = {}
    for column in COLUMNS:
        value = row.get(column)
        if not isinstance(value, str) or not value.strip():
            raise InvalidEntry(row_number, f"field {column!r} is missing or empty")
        values[column] = value.strip()
    try:
        validate_image_reference(values["docker_image"])
        instance_id = instance_id_fn(row)
        validate_instance_id(instance_id)
    except ValueError as exc:
        raise InvalidEntry(row_number, str(exc)) from None
    return Entry(
        instance_id=instance_id,
        repo_name=values["repo_name"],
        docker_image=values["docker_image"],
        commit_hash=values["commit_hash"],
        row_number=row_number,
    )
