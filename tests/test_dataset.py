"""Loading a split's rows: a local copy through pyarrow, the Hub through datasets."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asynccache.dataset import count_rows, iterate_in_thread, load_rows
from asynccache.errors import DatasetError

ROW = {
    "repo_name": "aiohttp",
    "docker_image": "namanjain12/aiohttp_final:f0d74880deec8fcd982bce639c93c5e130d41198",
    "commit_hash": "f0d74880deec8fcd982bce639c93c5e130d41198",
}


def _write_split(root: Path, split: str, rows: list[dict[str, object]]) -> None:
    (root / "data").mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    pq.write_table(table, root / "data" / f"{split}-00000-of-00001.parquet")


def test_local_dataset_reads_only_needed_columns_in_order(tmp_path: Path) -> None:
    rows = [{**ROW, "commit_hash": f"{i:040x}", "problem_statement": "x" * 100} for i in range(5)]
    _write_split(tmp_path, "dev_10pr_v1", rows)
    loaded = list(load_rows(str(tmp_path), "dev_10pr_v1"))
    assert [row["commit_hash"] for row in loaded] == [f"{i:040x}" for i in range(5)]
    assert set(loaded[0]) == {"repo_name", "docker_image", "commit_hash"}
    assert count_rows(str(tmp_path), "dev_10pr_v1") == 5


def test_unknown_split_names_the_splits_that_exist(tmp_path: Path) -> None:
    _write_split(tmp_path, "dev_10pr_v1", [ROW])
    _write_split(tmp_path, "train", [ROW])
    with pytest.raises(DatasetError, match=r"unknown split .nope.*splits: dev_10pr_v1, train"):
        load_rows(str(tmp_path), "nope")


def test_local_dataset_without_needed_column_is_a_clear_error(tmp_path: Path) -> None:
    _write_split(tmp_path, "train", [{"repo_name": "a", "commit_hash": "b"}])
    with pytest.raises(DatasetError, match="lacks columns docker_image"):
        load_rows(str(tmp_path), "train")


def test_missing_local_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        load_rows(str(tmp_path / "nowhere"), "train")


def test_unreachable_hub_suggests_a_local_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")
    with pytest.raises(DatasetError, match="--dataset /path/to/a/local/copy"):
        list(load_rows("R2E-Gym/R2E-Gym-Lite-does-not-exist", "train"))


@pytest.mark.anyio
async def test_a_dataset_failing_mid_read_is_a_clear_dataset_error() -> None:
    def rows() -> Iterator[dict[str, str]]:
        yield ROW
        raise ConnectionError("hub went away")

    seen = []
    with pytest.raises(DatasetError, match=r"after 1 rows \(ConnectionError: hub went away\)"):
        async for row in iterate_in_thread(rows(), batch_size=1):
            seen.append(row)
    assert seen == [ROW]


def test_local_dataset_rows_equal_what_datasets_loads(tmp_path: Path) -> None:
    import datasets

    for part in range(3):
        rows = [{**ROW, "commit_hash": f"{part:02x}{i:038x}", "extra": i} for i in range(1500)]
        (tmp_path / "data").mkdir(exist_ok=True)
        pq.write_table(
            pa.Table.from_pylist(rows),
            tmp_path / "data" / f"train-{part:05d}-of-00003.parquet",
            row_group_size=700,
        )
    expected = datasets.load_dataset(str(tmp_path), split="train").select_columns(
        ["repo_name", "docker_image", "commit_hash"]
    )
    assert list(load_rows(str(tmp_path), "train")) == list(expected)


def test_reading_a_local_dataset_does_not_import_datasets(tmp_path: Path) -> None:
    _write_split(tmp_path, "train", [ROW])
    script = (
        "import sys\n"
        "from asynccache.dataset import load_rows\n"
        f"rows = list(load_rows({str(tmp_path)!r}, 'train'))\n"
        "assert len(rows) == 1, rows\n"
        "assert 'datasets' not in sys.modules, 'datasets was imported'\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


def test_a_later_parquet_file_without_needed_column_is_a_clear_error(tmp_path: Path) -> None:
    _write_split(tmp_path, "train", [ROW])
    pq.write_table(
        pa.Table.from_pylist([{"repo_name": "a", "commit_hash": "b"}]),
        tmp_path / "data" / "train-00001-of-00002.parquet",
    )
    with pytest.raises(DatasetError, match="lacks columns docker_image"):
        load_rows(str(tmp_path), "train")
