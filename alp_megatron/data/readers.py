"""Raw rows of a prompt file: JSON Lines (one object a line) or Parquet (one row a record).

Each reader yields ``(row_number, record)`` with ``row_number`` 1-based: the line of a JSONL file (blank lines are
skipped but counted), the row of a Parquet file. Problems raise :class:`DataError` naming the file and row.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, Optional, Tuple

from alp_megatron.errors import AlpError

SUPPORTED_SUFFIXES = (".jsonl", ".parquet")
PYARROW_HINT = "pip install 'pyarrow>=14'"


class DataError(AlpError, ValueError):
    """A dataset file or row is invalid; names the file, the row (1-based) and the field, and the fix."""

    def __init__(self, path: str, row: Optional[int], field: Optional[str], problem: str, fix: str):
        self.path = path
        self.row = row
        self.field = field
        self.problem = problem
        self.fix = fix
        where = path
        if row is not None:
            where += f", {'line' if path.lower().endswith('.jsonl') else 'row'} {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {problem}. Fix: {fix}")


def read_jsonl(path: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """Rows of a JSONL file; each non-blank line must be a JSON object."""
    with open(path, "r", encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line.rstrip("\r\n"))  # an unclosed object is reported where it ends
            except json.JSONDecodeError as error:
                raise DataError(
                    path, line_number, None, f"invalid JSON ({error.msg} at column {error.colno})",
                    "make every line one complete JSON object, e.g. {\"prompt\": \"...\", \"label\": \"...\"}",
                ) from None
            if not isinstance(record, dict):
                raise DataError(
                    path, line_number, None, f"the line holds a JSON {type(record).__name__}, not an object",
                    "make every line one JSON object with the prompt and label fields",
                )
            yield line_number, record


def read_parquet(path: str, batch_rows: int = 4096) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """Rows of a Parquet file as Python objects (lists of structs become lists of dicts)."""
    try:
        import pyarrow.parquet as parquet
    except ImportError as error:
        raise DataError(path, None, None, f"reading Parquet needs pyarrow, which cannot be imported ({error})",
                        PYARROW_HINT) from error
    try:
        parquet_file = parquet.ParquetFile(path)
        batches = parquet_file.iter_batches(batch_size=batch_rows)
        row_number = 0
        for batch in batches:
            for record in batch.to_pylist():
                row_number += 1
                yield row_number, record
    except DataError:
        raise
    except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid / ArrowIOError derive from these
        raise DataError(path, None, None, f"not a readable Parquet file ({error})",
                        "write the file with pyarrow/pandas .to_parquet(), or convert it to JSONL") from error


def parquet_columns(path: str) -> Optional[Tuple[str, ...]]:
    """The column names of a Parquet file from its schema (no rows read); None when unreadable."""
    try:
        import pyarrow.parquet as parquet

        return tuple(parquet.read_schema(path).names)
    except Exception:
        return None


def read_rows(path: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """Rows of ``path``, chosen by its suffix (:data:`SUPPORTED_SUFFIXES`)."""
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".jsonl":
        return read_jsonl(path)
    if suffix == ".parquet":
        return read_parquet(path)
    raise DataError(path, None, None, f"unsupported file type {suffix or '(no suffix)'!r}",
                    f"use a file ending in one of {', '.join(SUPPORTED_SUFFIXES)}")
