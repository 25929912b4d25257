"""Types of the compiled key map and per-row tracking pass (``_track.c``)."""

from typing import Any

from numpy.typing import NDArray
from typing_extensions import Buffer

_Column = Buffer | NDArray[Any]
_Layout = tuple[int, ...]

HEADER_FIELDS: tuple[tuple[str, int], ...]
COLUMNS: tuple[tuple[str, int, int], ...]
EVENT_COLUMNS: tuple[tuple[str, int, int], ...]
CONSTANTS: dict[str, int]

class KeyMap:
    def __len__(self) -> int: ...
    def put(self, headers: _Column, layout: _Layout, rows: _Column, streams: _Column) -> None: ...
    def assign(self, headers: _Column, layout: _Layout, rows: _Column, start: int, next: int,
               streams_out: _Column, starts_out: _Column, spilled: tuple[_Column, ...]
               ) -> tuple[int, int]: ...
    def discard(self, types: _Column, cids: _Column, ports: _Column,
                streams: _Column) -> None: ...
    def drop(self, streams: _Column) -> None: ...

def track(headers: _Column, layout: _Layout, rows: _Column, first: int, ts_ns: _Column,
          anomalies: _Column, slots: _Column, streams: _Column, capacity: int,
          columns: tuple[_Column, ...], sender: _Column, in_flight: _Column, limit: _Column,
          beyond: _Column, events: tuple[_Column, ...]) -> int: ...
