"""The fleet's tables on disk: one Hive-partitioned dataset, ``OUT/host=H/capture=C/T.EXT``.

DuckDB, Polars, Spark, Trino and pyarrow read such a directory as one table and turn the
directory names back into ``host`` and ``capture`` columns, so those two are not stored in
the files (Hive's convention). Partition values are percent-encoded (``/`` → ``%2F``), which
those readers decode. Each file is written under a temporary name and renamed when
complete (:class:`~vsockmon.export.sinks.TableFile`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa

from vsockmon.export.sinks import FORMATS, TableFile
from vsockmon.fleet.sources import Capture, FleetError

PARTITION_COLUMNS = ("host", "capture")


def partition(out: Path, capture: Capture) -> Path:
    """The directory of one capture's partition."""
    return (out / f"host={quote(capture.host, safe='')}"
            / f"capture={quote(capture.name, safe='')}")


class Dataset:
    """A dataset being written: one ``table`` file per capture, in ``fmt``.

    Refuses, before any work, to replace a file it would write unless ``force``; other
    partitions already in ``out`` are left as they are (and read along with the new ones).
    """

    def __init__(self, out: Path, table: str, fmt: str, captures: Sequence[Capture],
                 force: bool = False) -> None:
        if fmt not in FORMATS:
            raise FleetError(f"unknown table format {fmt!r}; choose {', '.join(FORMATS)}")
        self.out, self.fmt = out, fmt
        self.file_name = f"{table}{FORMATS[fmt]}"
        if out.exists() and not out.is_dir():
            raise FleetError(f"{out}: exists and is not a directory")
        if not force:
            taken = [p for c in captures if (p := self.path(c)).exists()]
            if taken:
                more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
                raise FleetError(f"{taken[0]}: exists{more}; use --force to overwrite")
        self.rows = 0
        self.files = 0

    def path(self, capture: Capture) -> Path:
        return partition(self.out, capture) / self.file_name

    def write(self, capture: Capture, data: pa.Table) -> Path:
        """Write one capture's table (partition columns dropped) as its partition's file."""
        data = data.drop_columns([c for c in PARTITION_COLUMNS if c in data.column_names])
        path = self.path(capture)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            table_file = TableFile(path, self.fmt, data.schema)
        except OSError as e:
            raise FleetError(f"{path.parent}: cannot write: {e.strerror or e}") from None
        try:
            table_file.write(data)
        except BaseException:
            table_file.abort()
            raise
        table_file.commit()
        self.rows += data.num_rows
        self.files += 1
        return path
