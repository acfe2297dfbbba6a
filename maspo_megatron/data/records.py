"""Reading prompt files (jsonl, parquet) into rows, with errors that name the file and row.

Rows are numbered from 1 in both formats (jsonl: the line number).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator


class DataError(ValueError):
    """A bad data file or row. The message is one line: `file:row N: what is wrong`."""


def read_rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yields (row number, row mapping) from a .jsonl/.json/.parquet file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = _read_jsonl(path)
    elif suffix in (".parquet", ".pq"):
        rows = _read_parquet(path)
    else:
        raise DataError(f"{path}: unknown file type {suffix!r} (expected .jsonl, .json or .parquet)")
    count = 0
    for number, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{path}:row {number}: expected a JSON object, got {type(row).__name__}")
        count += 1
        yield number, row
    if count == 0:
        raise DataError(f"{path}: empty file (no rows)")


def _read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                raise DataError(f"{path}:row {number}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not line:
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:row {number}: invalid JSON ({exc.msg} at column {exc.colno})") from None


def _read_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file ({_first_line(exc)})") from None
    number = 0
    try:
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield number, row
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}:row {number + 1}: corrupt parquet data ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__
