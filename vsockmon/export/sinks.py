"""Where table batches go: Parquet, CSV or JSON Lines files, written batch by batch.

Each file is written under a temporary name and renamed when complete, so an interrupted
export never leaves a half-written table where a finished one is expected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Protocol

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from vsockmon.output import part_path

FORMATS = {"parquet": ".parquet", "csv": ".csv", "json": ".jsonl"}
"""Table formats and the suffix of their files."""


class Sink(Protocol):
    def write(self, data: pa.RecordBatch | pa.Table) -> None: ...

    def close(self) -> None: ...


class _JsonLines:
    """One JSON object per row; timestamps as ISO-8601 strings, dictionaries as strings."""

    def __init__(self, fp: BinaryIO, schema: pa.Schema) -> None:
        self._fp = fp
        self._cast = [i for i, f in enumerate(schema) if pa.types.is_timestamp(f.type)]

    def write(self, data: pa.RecordBatch | pa.Table) -> None:
        for i in self._cast:
            data = data.set_column(i, data.schema[i].name, data.column(i).cast(pa.string()))
        dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
        self._fp.write("".join(dumps(row) + "\n" for row in data.to_pylist()).encode())

    def close(self) -> None:
        self._fp.close()


class _Csv:
    def __init__(self, fp: BinaryIO, schema: pa.Schema) -> None:
        self._fp = fp
        self._writer = pacsv.CSVWriter(fp, schema)

    def write(self, data: pa.RecordBatch | pa.Table) -> None:
        self._writer.write(data)

    def close(self) -> None:
        self._writer.close()
        self._fp.close()


class _Parquet:
    def __init__(self, fp: BinaryIO, schema: pa.Schema) -> None:
        self._fp = fp
        self._writer = pq.ParquetWriter(fp, schema, compression="zstd")

    def write(self, data: pa.RecordBatch | pa.Table) -> None:
        if isinstance(data, pa.RecordBatch):
            self._writer.write_batch(data)
        else:
            self._writer.write_table(data)

    def close(self) -> None:
        self._writer.close()
        self._fp.close()


class TableFile:
    """A table file being written: ``write`` batches, then ``commit`` (or ``abort``)."""

    def __init__(self, path: Path, fmt: str, schema: pa.Schema) -> None:
        self.path = path
        self._tmp = part_path(path)
        fp = open(self._tmp, "wb")  # noqa: SIM115 - closed by the sink
        sinks: dict[str, Callable[[BinaryIO, pa.Schema], Sink]] = {
            "parquet": _Parquet, "csv": _Csv, "json": _JsonLines}
        self._sink = sinks[fmt](fp, schema)
        self.rows = 0

    def write(self, data: pa.RecordBatch | pa.Table) -> None:
        self._sink.write(data)
        self.rows += data.num_rows

    def commit(self) -> None:
        """Finish the file and put it in place; if that fails, no ``.part`` file is left
        (closing a sink twice is harmless)."""
        try:
            self._sink.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        try:
            self._sink.close()
        finally:
            self._tmp.unlink(missing_ok=True)
