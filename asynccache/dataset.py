"""Loading a dataset split's rows: the Hub through ``datasets`` (with the Hugging Face cache),
a local copy through pyarrow; only the needed columns, with the row count and the revision."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from asynccache.errors import DatasetError

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

#: The only columns read from the dataset.
COLUMNS = ("repo_name", "docker_image", "commit_hash")

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass
class SplitRows:
    """The rows of one split and what identifies them."""

    rows: Iterator[Mapping[str, Any]]
    dataset: str
    split: str
    #: The Hub commit the rows come from (None for a local copy).
    revision: str | None = None
    #: How many rows the split has, when known before reading them.
    total: int | None = None

    def take(self, max_entries: int | None) -> SplitRows:
        """The first ``max_entries`` rows only (all when None)."""
        if max_entries is None:
            return self
        total = None if self.total is None else min(self.total, max_entries)
        rows = islice(self.rows, max_entries)
        return SplitRows(rows, self.dataset, self.split, self.revision, total)


def open_split(dataset: str, split: str, revision: str | None = None) -> SplitRows:
    """The rows of ``split`` of a Hub dataset id or a local folder laid out like a Hub repo.

    A Hub dataset goes through ``datasets`` and the Hugging Face cache (``HF_HOME``,
    ``HF_HUB_CACHE``), so with ``HF_HUB_OFFLINE=1`` a split fetched once loads without the
    network; ``revision`` (a tag, branch or commit) pins its version. Blocking: call it from a
    worker thread in async code.
    """
    local = Path(dataset).expanduser()
    if local.is_dir():
        if revision is not None:
            raise DatasetError(
                f"--revision {revision} applies to Hugging Face Hub datasets, and {dataset} "
                "is a local folder; drop --revision or pass the Hub id"
            )
        files = _local_files(local, split)
        total = sum(_parquet_rows_count(path) for path in files)
        return SplitRows(_parquet_rows(files), dataset, split, None, total)
    if dataset.startswith((".", "/", "~")):
        raise DatasetError(f"dataset folder {dataset} does not exist")
    return _open_hub(dataset, split, revision)


def load_rows(dataset: str, split: str) -> Iterator[Mapping[str, Any]]:
    """Rows of a split (only the needed columns), from a local folder or the Hub."""
    return open_split(dataset, split).rows


def count_rows(dataset: str, split: str) -> int | None:
    """How many rows a split has, when that is cheap to know (a local copy)."""
    local = Path(dataset).expanduser()
    if not local.is_dir():
        return None
    files = local_splits(local).get(split, [])
    return sum(_parquet_rows_count(path) for path in files) if files else None


def local_splits(dataset_dir: Path) -> dict[str, list[str]]:
    """Split name -> parquet files of a local copy laid out like the Hub repo."""
    splits: dict[str, list[str]] = {}
    for path in sorted((dataset_dir / "data").glob("*.parquet")):
        split = path.name.split("-", 1)[0]
        splits.setdefault(split, []).append(str(path))
    return splits


def _local_files(dataset_dir: Path, split: str) -> list[str]:
    """The parquet files of a local split, each checked for the needed columns.

    Read with pyarrow directly: the rows ``datasets.load_dataset("parquet", ...)`` gives for
    the needed columns, in the same order, without that library's second of start-up.
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
    return splits[split]


def _parquet_rows_count(path: str) -> int:
    import pyarrow.parquet as pq

    return int(pq.read_metadata(path).num_rows)


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


def _open_hub(name: str, split: str, revision: str | None) -> SplitRows:
    """A Hub split through ``datasets``: fetched into the Hugging Face cache, or read from it."""
    builder = _builder(name, revision)
    from_cache = _from_cache(builder)
    if from_cache:
        _check_cached_revision(name, revision, builder.hash)
    try:
        builder.download_and_prepare()
        table = builder.as_dataset(split=split)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise DatasetError(f"unknown split {split!r} of {name}: {exc}") from None
        raise DatasetError(f"cannot load dataset {name}: {exc}") from None
    except Exception as exc:
        raise DatasetError(
            f"cannot load dataset {name} ({type(exc).__name__}: {exc}); pass --dataset "
            "/path/to/a/local/copy"
        ) from None
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise DatasetError(f"dataset {name} lacks columns {', '.join(missing)}")
    if len(table.column_names) > len(COLUMNS):
        table = table.select_columns(list(COLUMNS))
    where = "the Hugging Face cache" if from_cache else "the Hub (kept in the Hugging Face cache)"
    log.info(
        "dataset %s split %s: %d rows at revision %s, from %s",
        name,
        split,
        len(table),
        builder.hash,
        where,
    )
    return SplitRows(iter(table), name, split, builder.hash, len(table))


def _builder(name: str, revision: str | None) -> datasets.DatasetBuilder:
    import datasets

    try:
        try:
            # Parquet repositories (R2E-Gym's) keep only the needed columns in the cache.
            return datasets.load_dataset_builder(name, revision=revision, columns=list(COLUMNS))
        except ValueError as exc:
            if "columns" not in str(exc):
                raise
            return datasets.load_dataset_builder(name, revision=revision)
    except Exception as exc:
        offline = " (HF_HUB_OFFLINE is set)" if _offline() else ""
        raise DatasetError(
            f"cannot load dataset {name}{_at(revision)} from the Hugging Face Hub or its cache"
            f"{offline} ({type(exc).__name__}: {exc}); fetch it once with network access, or "
            "pass --dataset /path/to/a/local/copy"
        ) from None


def _from_cache(builder: datasets.DatasetBuilder) -> bool:
    """True when ``datasets`` could not reach the Hub and fell back to its cache."""
    return type(builder).__module__.startswith("datasets.packaged_modules.cache")


def _check_cached_revision(name: str, revision: str | None, cached: str | None) -> None:
    """Refuse a cached copy at another revision than the one asked for.

    Offline, ``datasets`` takes the newest cached copy whatever revision is asked for. A
    branch or tag is resolved as the Hub cache last saw it (``refs/<name>``).
    """
    offline = _offline()
    state = "offline" if offline else "the Hub could not be reached"
    if revision is None:
        level = logging.INFO if offline else logging.WARNING
        log.log(level, "%s: using the cached copy of %s at revision %s", state, name, cached)
        return
    wanted = revision if _COMMIT.match(revision) else _cached_ref(name, revision)
    if wanted is None:
        raise DatasetError(
            f"revision {revision} of {name} was never fetched into the Hugging Face cache "
            f"({state}); run once with network access and --revision {revision}"
        )
    if wanted != cached:
        raise DatasetError(
            f"the Hugging Face cache holds {name} at revision {cached}, not {revision} "
            f"({wanted}) ({state}); run once with network access and --revision {revision}"
        )


def _cached_ref(name: str, revision: str) -> str | None:
    """The commit a branch or tag pointed to when the Hub cache last fetched it."""
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"datasets--{name.replace('/', '--')}" / "refs"
    try:
        text = (ref / revision).read_text(encoding="utf-8").strip()
    except (OSError, ValueError):
        return None
    return text if _COMMIT.match(text) else None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _at(revision: str | None) -> str:
    return f" at revision {revision}" if revision else ""


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
