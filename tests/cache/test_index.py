"""index.json: validation, atomic writes, repair from per-instance metadata, the writer."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from asynccache._fs import write_json_atomic
from asynccache.cache.index import (
    IndexWriter,
    load_and_repair,
    parse_index,
    read_index,
    update_index,
)
from asynccache.cache.records import IndexRecord, write_meta
from asynccache.errors import IndexCorrupt
from tests.support.cache_trees import minimal_record as record


def test_absent_index_is_empty(tmp_path: Path) -> None:
    assert read_index(tmp_path / "index.json") == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"a": {"instance_id": "a"', "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"a": 3}', "not an object"),
        ('{"a": {"instance_id": "a"}}', "lacks repo_name"),
    ],
)
def test_damaged_index_text_is_rejected(text: str, message: str) -> None:
    with pytest.raises(IndexCorrupt, match=message):
        parse_index(text)


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "index.json"
    write_json_atomic(path, {"k": 1})
    write_json_atomic(path, {"k": 2})
    assert json.loads(path.read_text()) == {"k": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]


def test_damaged_index_is_kept_aside_and_rebuilt_from_complete_folders(tmp_path: Path) -> None:
    for name in ("a__1", "b__2", "c__3"):
        write_meta(tmp_path, record(name, tmp_path))
    (tmp_path / "a__1").mkdir()
    (tmp_path / "b__2").mkdir()  # c__3 has metadata but no folder: not complete
    (tmp_path / "index.json").write_text('{"a__1": {"trunc')
    records, notes = load_and_repair(tmp_path)
    assert sorted(records) == ["a__1", "b__2"]
    aside = list(tmp_path.glob("index.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == '{"a__1": {"trunc'
    assert any("damaged" in note for note in notes)
    assert sorted(json.loads((tmp_path / "index.json").read_text())) == ["a__1", "b__2"]


def test_complete_folder_missing_from_index_is_recovered(tmp_path: Path) -> None:
    update_index(tmp_path, put=[record("a__1", tmp_path)])
    (tmp_path / "a__1").mkdir()
    write_meta(tmp_path, record("b__2", tmp_path))
    (tmp_path / "b__2").mkdir()
    records, notes = load_and_repair(tmp_path)
    assert sorted(records) == ["a__1", "b__2"]
    assert notes == ["recovered 1 cached folders missing from index.json"]


@pytest.mark.anyio
async def test_writer_coalesces_and_writes_final_index(tmp_path: Path) -> None:
    writer = IndexWriter(tmp_path, {}, min_interval=0.05)
    send, receive = anyio.create_memory_object_stream[IndexRecord](10)
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run, receive)
        async with send:
            for i in range(200):
                await send.send(record(f"r__{i}", tmp_path))
    data = read_index(tmp_path / "index.json")
    assert len(data) == 200
    assert 1 <= writer.writes < 200


@pytest.mark.anyio
async def test_writer_bytes_stay_linear_for_thousands_of_entries(tmp_path: Path) -> None:
    writer = IndexWriter(tmp_path, {}, min_interval=0.0)
    send, receive = anyio.create_memory_object_stream[IndexRecord](1)
    entries = 3000
    async with anyio.create_task_group() as tg:
        tg.start_soon(writer.run, receive)
        async with send:
            for i in range(entries):
                await send.send(record(f"r__{i}", tmp_path))
                await anyio.sleep(0)
    final_size = (tmp_path / "index.json").stat().st_size
    # Whole rewrites after every entry would write about entries/2 times the final size.
    assert writer.bytes_written < 60 * final_size
