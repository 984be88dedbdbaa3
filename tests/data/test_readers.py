"""Tests of alp_megatron/data/readers.py: raw rows and their 1-based numbers."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from alp_megatron.data.readers import DataError, read_rows


def test_jsonl_rows_carry_their_line_numbers(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n{"a": 3}')  # blank lines and no final newline
    assert list(read_rows(str(path))) == [(1, {"a": 1}), (4, {"a": 2}), (5, {"a": 3})]


def test_parquet_rows_carry_their_row_numbers_across_record_batches(tmp_path):
    path = str(tmp_path / "rows.parquet")
    rows = [{"a": i, "m": [{"role": "user", "content": str(i)}]} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)
    read = list(read_rows(path))
    assert [number for number, _ in read] == list(range(1, 11))
    assert [record for _, record in read] == rows


def test_unsupported_suffix(tmp_path):
    with pytest.raises(DataError, match=r"unsupported file type '\.csv'.*Fix: use a file ending in one of"):
        read_rows(str(tmp_path / "rows.csv"))


def test_invalid_json_names_the_line_and_column(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a": }\n')
    with pytest.raises(DataError) as info:
        list(read_rows(str(path)))
    assert (info.value.row, info.value.field) == (2, None)
    assert str(info.value).startswith(f"{path}, line 2: invalid JSON (Expecting value at column 7)")


def test_an_unclosed_object_is_reported_where_the_line_ends(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1, "b": 2\n{"a": 3}\n')
    with pytest.raises(DataError) as info:
        list(read_rows(str(path)))
    assert "line 1: invalid JSON (Expecting ',' delimiter at column 16)" in str(info.value)
