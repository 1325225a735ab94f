"""Dataset rows become entries: ids, validation."""

from __future__ import annotations

import pytest

from asynccache.entries import entry_from_row, make_instance_id, validate_image_reference
from asynccache.errors import InvalidEntry

ROW = {
    "repo_name": "aiohttp",
    "docker_image": "namanjain12/aiohttp_final:f0d74880deec8fcd982bce639c93c5e130d41198",
    "commit_hash": "f0d74880deec8fcd982bce639c93c5e130d41198",
}


def test_instance_id_is_repo_and_first_twelve_hash_characters() -> None:
    assert make_instance_id(ROW) == "aiohttp__f0d74880deec"
    assert entry_from_row(ROW, 1).instance_id == "aiohttp__f0d74880deec"


def test_custom_instance_id_function_is_used() -> None:
    entry = entry_from_row(ROW, 1, lambda row: f"x-{row['commit_hash'][:6]}")
    assert entry.instance_id == "x-f0d748"


@pytest.mark.parametrize("column", ["repo_name", "docker_image", "commit_hash"])
@pytest.mark.parametrize("value", [None, "", "   ", 3])
def test_missing_or_empty_field_fails_the_row_naming_it(column: str, value: object) -> None:
    row = {**ROW, column: value}
    with pytest.raises(InvalidEntry, match=rf"row 7: field '{column}' is missing or empty"):
        entry_from_row(row, 7)


@pytest.mark.parametrize("repo_name", ["../etc", "a/b", ".hidden", "..", "a b", "x\x00y"])
def test_unsafe_instance_id_fails_the_row(repo_name: str) -> None:
    with pytest.raises(InvalidEntry, match="not a safe folder name"):
        entry_from_row({**ROW, "repo_name": repo_name}, 3)


@pytest.mark.parametrize(
    "image",
    [
        "namanjain12/aiohttp_final:abc",
        "ubuntu",
        "127.0.0.1:5000/namanjain12/x_final:" + "a" * 40,
        "localhost/x@sha256:" + "b" * 64,
        "registry.example:443/a/b/c:v1.2-rc",
    ],
)
def test_valid_image_references_pass(image: str) -> None:
    validate_image_reference(image)


@pytest.mark.parametrize(
    "image",
    [
        *["a/UPPER", "a//b", "x:tag with space", "-lead", "a:", "http://x/y", "a@sha256:zz"],
        *["Evil/img", "LOCALHOST/x:1"],
    ],
)
def test_malformed_image_reference_fails_the_row(image: str) -> None:
    with pytest.raises(InvalidEntry, match="malformed image reference"):
        entry_from_row({**ROW, "docker_image": image}, 2)
