"""Exports: an annotated pcapng for Wireshark, and packets/connections tables for analysis.

- :func:`export_pcapng` — every packet with a comment (connection, state, credit,
  anomalies, payload summary, plus caller-supplied lines such as diagnose findings).
- :func:`export_tables` — ``packets`` and ``connections`` tables as Parquet, CSV or JSON
  Lines, streamed batch by batch (flat memory); :func:`export_many` runs it over a directory
  of captures in parallel processes.
- :mod:`~vsockmon.export.tables` holds the column schemas (documented in docs/export.md).
"""

from vsockmon.export.comments import Annotator
from vsockmon.export.run import (
    ExportError,
    ExportResult,
    export_many,
    export_pcapng,
    export_tables,
    find_captures,
)
from vsockmon.export.sinks import FORMATS
from vsockmon.export.tables import CONNECTION_COLUMNS, PACKET_COLUMNS, PAYLOAD_COLUMNS

__all__ = [
    "CONNECTION_COLUMNS", "FORMATS", "PACKET_COLUMNS", "PAYLOAD_COLUMNS", "Annotator",
    "ExportError", "ExportResult", "export_many", "export_pcapng", "export_tables",
    "find_captures",
]
