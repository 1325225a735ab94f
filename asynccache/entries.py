"""Dataset rows become validated entries: loading, instance ids and the producer."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import anyio

from asynccache.errors import DatasetError, InvalidEntry

#: The only columns read from the dataset.
COLUMNS = ("repo_name", "docker_image", "commit_hash")

_NAME_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
IMAGE_REFERENCE = re.compile(
    rf"^(?:(?P<domain>{_DOMAIN})/)?(?P<path>{_NAME_COMPONENT}(?:/{_NAME_COMPONENT})*)"
    r"(?::(?P<tag>[\w][\w.-]{0,127}))?"
    r"(?:@(?P<digest>[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}))?$"
)
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
    """Raise ValueError when ``ref`` is not a Docker image reference."""
    if len(ref) > 512 or not IMAGE_REFERENCE.match(ref):
        raise ValueError(f"malformed image reference {ref!r}")


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


def local_splits(dataset_dir: Path) -> dict[str, list[str]]:
    """Split name -> parquet files of a local copy laid out like the Hub repo."""
    splits: dict[str, list[str]] = {}
    for path in sorted((dataset_dir / "data").glob("*.parquet")):
        split = path.name.split("-", 1)[0]
        splits.setdefault(split, []).append(str(path))
    return splits


def load_rows(dataset: str, split: str) -> Iterator[Mapping[str, Any]]:
    """Rows of a split (only the needed columns), from a local folder or the Hub."""
    local = Path(dataset).expanduser()
    if local.is_dir():
        return _load_local(local, split)
    if dataset.startswith((".", "/", "~")):
        raise DatasetError(f"dataset folder {dataset} does not exist")
    return _load_hub(dataset, split)


def count_rows(dataset: str, split: str) -> int | None:
    """How many rows a split has, when that is cheap to know (a local copy)."""
    local = Path(dataset).expanduser()
    if not local.is_dir():
        return None
    import pyarrow.parquet as pq

    files = local_splits(local).get(split, [])
    return sum(pq.read_metadata(path).num_rows for path in files) if files else None


def _load_local(dataset_dir: Path, split: str) -> Iterator[Mapping[str, Any]]:
    """Rows of a local split, read straight from its parquet files with pyarrow.

    Gives what ``datasets.load_dataset("parquet", ...)`` gives for the needed columns, in
    the same order, without that library's second of start-up.
    """
    splits = local_splits(dataset_dir)
    if not splits:
        raise DatasetError(f"no data/*.parquet files under {dataset_dir}")
    if split not in splits:
        raise DatasetError(
            f"unknown split {split!r} in {dataset_dir}; splits: {', '.join(sorted(splits))}"
        )
    for path in splits[split]:
        _check_columns(path, dataset_dir)
    return _parquet_rows(splits[split])


def _parquet_rows(paths: list[str]) -> Iterator[Mapping[str, Any]]:
    import pyarrow.parquet as pq

    for path in paths:
        with pq.ParquetFile(path) as parquet:
            for batch in parquet.iter_batches(batch_size=1024, columns=list(COLUMNS)):
                yield from batch.to_pylist()


def _check_columns(parquet_file: str, dataset_dir: Path) -> None:
    import pyarrow.parquet as pq

    names = set(pq.read_schema(parquet_file).names)
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise DatasetError(f"dataset {dataset_dir} lacks columns {', '.join(missing)}")


def _load_hub(name: str, split: str) -> Iterator[Mapping[str, Any]]:
    import datasets

    try:
        stream = datasets.load_dataset(name, split=split, streaming=True)
        return iter(stream.select_columns(list(COLUMNS)))
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise DatasetError(f"unknown split {split!r} of {name}: {exc}") from None
        raise DatasetError(f"cannot load dataset {name}: {exc}") from None
    except Exception as exc:
        raise DatasetError(
            f"cannot load dataset {name} from the Hugging Face Hub ({type(exc).__name__}: "
            f"{exc}); pass --dataset /path/to/a/local/copy"
        ) from None


async def iterate_in_thread(
    rows: Iterable[Mapping[str, Any]], batch_size: int = 64
) -> AsyncIterator[Mapping[str, Any]]:
    """Iterate a blocking iterable from a worker thread, a batch at a time."""
    iterator = iter(rows)
    read = 0
    while True:
        try:
            batch = await anyio.to_thread.run_sync(lambda: list(islice(iterator, batch_size)))
        except DatasetError:
            raise
        except Exception as exc:
            raise DatasetError(
                f"reading the dataset failed after {read} rows ({type(exc).__name__}: {exc}); "
                "rerun to resume, or pass --dataset /path/to/a/local/copy"
            ) from exc
        read += len(batch)
        if not batch:
            return
        for row in batch:
            yield row
